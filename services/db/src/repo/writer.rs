//! SQLite's write path for corrections: one task on one connection commits uploads in groups,
//! and WAL checkpoints run beside it, off the commit path.

use std::time::Duration;

use flywheel_domain::Correction;

use crate::Result;
use crate::models::InsertOutcome;
use crate::sql::Stamp;

/// Inserts `rows` on `conn` (inside the caller's transaction) and counts what was new.
/// Multi-row INSERTs: per-statement overhead, not the database, is what limits a
/// row-at-a-time loop. RETURNING names the rows that were new; the rest were duplicates.
/// A macro rather than a function so one body serves both drivers' connections.
macro_rules! insert_rows {
    ($conn:expr, $domain_id:expr, $rows:expr, $created_at:expr) => {{
        const PER_STATEMENT: usize = 100;
        let mut outcome = $crate::models::InsertOutcome::default();
        for chunk in $rows.chunks(PER_STATEMENT) {
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO corrections
                 (domain_id, client_id, content_hash, input, model_output, expected, source,
                 teacher, metadata, split, created_at, pii_redacted) ",
            );
            query.push_values(chunk, |mut row, c: &flywheel_domain::Correction| {
                row.push_bind($domain_id)
                    .push_bind(&c.client_id)
                    .push_bind(&c.content_hash)
                    .push_bind(&c.input)
                    .push_bind(&c.model_output)
                    .push_bind(&c.expected)
                    .push_bind(c.source.as_str())
                    .push_bind(&c.teacher)
                    .push_bind(sqlx::types::Json(&c.metadata))
                    .push_bind(c.split.as_str())
                    .push_bind($created_at)
                    .push_bind((!c.redacted.is_empty()).then_some(sqlx::types::Json(&c.redacted)));
            });
            query.push(" ON CONFLICT DO NOTHING RETURNING content_hash");
            let inserted: Vec<String> = query.build_query_scalar().fetch_all($conn).await?;
            outcome.accepted += inserted.len();
            outcome.duplicates += chunk.len() - inserted.len();
            for hash in &inserted {
                if let Some(c) = chunk.iter().find(|c| &c.content_hash == hash) {
                    for (kind, n) in &c.redacted {
                        *outcome.redacted.entry(*kind).or_default() += n;
                    }
                }
            }
        }
        // A row the index on (domain_id, client_id) refused is no duplicate if its id names
        // other content: that is a conflict, reported, never swallowed. Read after the
        // inserts, so this sees the rows of this transaction and, on PostgreSQL (read
        // committed: each statement reads what is committed when it starts), the row of a
        // racing upload the insert waited for. Only the row that holds the id has its hash.
        const PER_LOOKUP: usize = 500;
        let with_ids: Vec<(usize, &str, &str)> = $rows
            .iter()
            .enumerate()
            .filter_map(|(i, c): (usize, &flywheel_domain::Correction)| {
                c.client_id
                    .as_deref()
                    .map(|id| (i, id, c.content_hash.as_str()))
            })
            .collect();
        for ids in with_ids.chunks(PER_LOOKUP) {
            let mut query = sqlx::QueryBuilder::new(
                "SELECT client_id, content_hash FROM corrections WHERE domain_id = ",
            );
            query.push_bind($domain_id).push(" AND client_id IN (");
            let mut list = query.separated(", ");
            for (_, id, _) in ids {
                list.push_bind(*id);
            }
            list.push_unseparated(")");
            let stored: std::collections::HashMap<String, String> = query
                .build_query_as::<(String, String)>()
                .fetch_all($conn)
                .await?
                .into_iter()
                .collect();
            for (index, id, hash) in ids {
                if stored.get(*id).is_some_and(|held| held != hash) {
                    outcome.conflicts.push($crate::models::IdConflict {
                        index: *index,
                        client_id: (*id).to_owned(),
                    });
                }
            }
        }
        // Conflicting rows were refused by the index, so they were counted as duplicates.
        outcome.duplicates -= outcome.conflicts.len();
        outcome
    }};
}
pub(super) use insert_rows;

/// Moves an ingestion unit forward inside the transaction that stored its rows (`$outcome`,
/// whose counts it adds), if it still stands where its reader started. Evaluates to whether
/// it did; if not, the caller rolls the rows back.
macro_rules! advance_unit {
    ($conn:expr, $advance:expr, $outcome:expr, $at:expr) => {{
        let a: &$crate::models::UnitAdvance = $advance;
        let o: &$crate::models::InsertOutcome = $outcome;
        sqlx::query(
            "UPDATE ingest_units SET position = $1, ingested = ingested + $2,
             duplicates = duplicates + $3, rejected = rejected + $4,
             dropped_pii = dropped_pii + $5, errors = $6, state = $7, updated_at = $8
             WHERE id = $9 AND position = $10 AND state = 'reading'",
        )
        .bind(&a.to)
        .bind(o.accepted as i64)
        .bind(o.duplicates as i64)
        .bind(a.rejected + o.conflicts.len() as i64)
        .bind(a.dropped_pii)
        .bind(sqlx::types::Json(&a.errors))
        .bind(a.state)
        .bind($at)
        .bind(a.unit_id)
        .bind(&a.from)
        .execute($conn)
        .await?
        .rows_affected()
            == 1
    }};
}
pub(super) use advance_unit;

/// WAL frames (pages) past which the writer helps the log restart: 64 MiB at SQLite's 4 KiB
/// pages.
const WAL_RESTART_FRAMES: i64 = 16_384;
/// What a restarted log is truncated to, so a burst leaves no large file behind.
pub(super) const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// Copies SQLite's write-ahead log back into the database off the commit path. Left to the
/// writer, every commit that crosses the WAL's size threshold pays for the copy (and its
/// fsync) before the client hears back; here a reader connection does it twice a second,
/// PASSIVE so it never blocks a writer.
///
/// The log only starts again from its beginning when a write finds every frame copied back,
/// and under sustained writes the copy is always behind by the frames committed since: the
/// log grew without bound (3 GB against a 242 MB database in 75 s). So past
/// [`WAL_RESTART_FRAMES`] this asks the writer (`restart`) to restart the log itself between
/// two commits ([`restart_log`]). Run here, from a reader connection, the same checkpoint
/// waited for the writer, which never paused, and stalled every upload for seconds.
/// Stops when the last handle on the database drops.
pub(super) async fn checkpoint_in_background(
    pool: sqlx::SqlitePool,
    restart: std::sync::Arc<std::sync::atomic::AtomicBool>,
    alive: std::sync::Weak<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if alive.strong_count() == 0 || pool.is_closed() {
            return;
        }
        // (busy, frames in the log, frames copied back)
        let passive: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await;
        match passive {
            Ok((_, frames, _)) if frames > WAL_RESTART_FRAMES => {
                restart.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; the next one tries again"),
        }
    }
}

/// One upload's rows, waiting for the writer.
#[derive(Debug)]
pub(super) struct WriteRequest {
    pub(super) domain_id: i64,
    pub(super) rows: Vec<Correction>,
    /// Store nothing of this upload if any row conflicts (a JSON batch).
    pub(super) all_or_nothing: bool,
    /// An ingestion unit to move forward with these rows, or store nothing.
    pub(super) advance: Option<crate::models::UnitAdvance>,
    pub(super) reply: tokio::sync::oneshot::Sender<Result<InsertOutcome>>,
}

/// Rows one group commit takes at most.
const GROUP_ROWS: usize = 20_000;

/// Writes corrections to SQLite with group commit. SQLite has one writer anyway; a connection
/// of its own keeps its page cache (the content-hash index, whose keys land at random) warm
/// instead of re-reading pages other connections' commits made stale, and uploads queue here
/// instead of sleeping in SQLite's busy handler. Uploads that arrived while a commit was under
/// way share the next one: a page the index touches is written to the WAL once per group, not
/// once per upload, and each upload still hears back only after its rows are durable. A group
/// that fails is retried upload by upload, so one upload's error is never another's.
pub(super) async fn group_writer(
    pool: sqlx::SqlitePool,
    restart: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut requests: tokio::sync::mpsc::Receiver<WriteRequest>,
) {
    while let Some(first) = requests.recv().await {
        let mut rows = first.rows.len();
        let mut group = vec![first];
        while rows < GROUP_ROWS {
            match requests.try_recv() {
                Ok(next) => {
                    rows += next.rows.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let created_at = Stamp::now();
        match commit_group(&pool, &group, created_at).await {
            Ok(outcomes) => {
                for (request, outcome) in group.into_iter().zip(outcomes) {
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(e) if group.len() == 1 => {
                let _ = group.pop().expect("one").reply.send(Err(e));
            }
            Err(_) => {
                for request in group {
                    let alone = commit_group(&pool, std::slice::from_ref(&request), created_at)
                        .await
                        .map(|mut outcomes| outcomes.remove(0));
                    let _ = request.reply.send(alone);
                }
            }
        }
        if restart.swap(false, std::sync::atomic::Ordering::Relaxed)
            && let Err(e) = restart_log(&pool).await
        {
            tracing::warn!(error = %e, "WAL restart failed; the next one tries again");
        }
    }
}

/// Copies the whole log back and starts it again, from the writer's own connection between
/// two commits, so no correction is written meanwhile. It waits at most a quarter second for
/// readers still on old frames (they take milliseconds; new ones read the database file once
/// the log is copied); if they outlast it, nothing is lost and the next request tries again.
async fn restart_log(pool: &sqlx::SqlitePool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    sqlx::query("PRAGMA busy_timeout = 250")
        .execute(&mut *conn)
        .await?;
    let done = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut *conn)
        .await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {}",
        super::SQLITE_BUSY_TIMEOUT.as_millis()
    )))
    .execute(&mut *conn)
    .await?;
    done?;
    Ok(())
}

async fn commit_group(
    pool: &sqlx::SqlitePool,
    group: &[WriteRequest],
    created_at: Stamp,
) -> Result<Vec<InsertOutcome>> {
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(group.len());
    for request in group {
        // A batch that may conflict, or that moves an ingestion unit, commits or rolls back
        // on its own, inside the group.
        let atomic = request.advance.is_some()
            || request.all_or_nothing && request.rows.iter().any(|c| c.client_id.is_some());
        if atomic {
            sqlx::query("SAVEPOINT upload").execute(&mut *tx).await?;
        }
        let mut outcome = insert_rows!(&mut *tx, request.domain_id, &request.rows, created_at);
        if atomic {
            let refused = request.all_or_nothing && !outcome.conflicts.is_empty();
            let moved = match &request.advance {
                Some(advance) if !refused => {
                    !advance_unit!(&mut *tx, advance, &outcome, created_at)
                }
                _ => false,
            };
            if refused || moved {
                sqlx::query("ROLLBACK TO SAVEPOINT upload")
                    .execute(&mut *tx)
                    .await?;
                outcome = outcome.nothing_stored();
                outcome.unit_moved = moved;
            }
            sqlx::query("RELEASE SAVEPOINT upload")
                .execute(&mut *tx)
                .await?;
        }
        outcomes.push(outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// The writer's page cache, in KiB: enough for the content-hash index of a few million rows.
pub const SQLITE_WRITER_CACHE_KIB: i64 = 64 * 1024;
