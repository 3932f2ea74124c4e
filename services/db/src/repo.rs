use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use flywheel_domain::{
    Correction, DomainName, DomainSpec, JobId, JobStatus, Source, Split, Task, Trigger, VersionId,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;

use crate::models::*;
use crate::sql::{Cells, Pool, Stamp, with_pool};
use crate::{DbError, Result};

/// Inserts `rows` on `conn` (inside the caller's transaction) and counts what was new.
/// Multi-row INSERTs: per-statement overhead, not the database, is what limits a
/// row-at-a-time loop. RETURNING names the rows that were new; the rest were duplicates.
/// A macro rather than a function so one body serves both drivers' connections.
macro_rules! insert_rows {
    ($conn:expr, $domain_id:expr, $rows:expr, $created_at:expr) => {{
        const PER_STATEMENT: usize = 100;
        let mut outcome = InsertOutcome::default();
        for chunk in $rows.chunks(PER_STATEMENT) {
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO corrections
                   (domain_id, client_id, content_hash, input, model_output, expected, source,
                    teacher, metadata, split, created_at, pii_redacted) ",
            );
            query.push_values(chunk, |mut row, c: &Correction| {
                row.push_bind($domain_id)
                    .push_bind(&c.client_id)
                    .push_bind(&c.content_hash)
                    .push_bind(&c.input)
                    .push_bind(&c.model_output)
                    .push_bind(&c.expected)
                    .push_bind(c.source.as_str())
                    .push_bind(&c.teacher)
                    .push_bind(Json(&c.metadata))
                    .push_bind(c.split.as_str())
                    .push_bind($created_at)
                    .push_bind((!c.redacted.is_empty()).then_some(Json(&c.redacted)));
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
        outcome
    }};
}

/// Handle on flywheel's database, SQLite or PostgreSQL. Cheap to clone.
///
/// Every query is written once, with `$N` placeholders (SQLite reads them as positions too),
/// in SQL both dialects accept; the few places where they behave differently say so.
#[derive(Clone, Debug)]
pub struct Db {
    pool: Pool,
    /// SQLite: corrections are written by one task on one connection (see `group_writer`).
    writer: Option<(tokio::sync::mpsc::Sender<WriteRequest>, sqlx::SqlitePool)>,
    /// SQLite: while any clone of this handle lives, WAL checkpoints run in the background.
    _alive: Option<std::sync::Arc<()>>,
}

/// WAL frames (pages) past which the writer helps the log restart: 64 MiB at SQLite's 4 KiB
/// pages.
const WAL_RESTART_FRAMES: i64 = 16_384;
/// What a restarted log is truncated to, so a burst leaves no large file behind.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

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
async fn checkpoint_in_background(
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
struct WriteRequest {
    domain_id: i64,
    rows: Vec<Correction>,
    reply: tokio::sync::oneshot::Sender<Result<InsertOutcome>>,
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
async fn group_writer(
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
        SQLITE_BUSY_TIMEOUT.as_millis()
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
        outcomes.push(insert_rows!(
            &mut *tx,
            request.domain_id,
            &request.rows,
            created_at
        ));
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// The writer's page cache, in KiB: enough for the content-hash index of a few million rows.
pub const SQLITE_WRITER_CACHE_KIB: i64 = 64 * 1024;

/// Which database an instance uses, parsed from `--database`: a `postgres://` (or
/// `postgresql://`) URL, or a SQLite file given as a path or `sqlite://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self> {
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(raw.to_owned()));
        }
        if let Some(path) = raw.strip_prefix("sqlite://") {
            return Ok(DatabaseUrl::Sqlite(path.into()));
        }
        if let Some((scheme, _)) = raw.split_once("://") {
            return Err(DbError::Unsupported(format!(
                "database `{raw}`: {scheme}:// is not supported; give a postgres:// URL, a sqlite:// URL or a file path"
            )));
        }
        Ok(DatabaseUrl::Sqlite(raw.into()))
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => path.display().to_string(),
            DatabaseUrl::Postgres(url) => match (url.split_once("://"), url.rfind('@')) {
                (Some((scheme, rest)), Some(_)) => {
                    let (auth, host) = rest.rsplit_once('@').expect("has @");
                    let user = auth.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}@{host}")
                }
                _ => url.clone(),
            },
        }
    }
}

/// How many statements of a write may wait for each other: SQLite has one writer whatever
/// the pool size, PostgreSQL serves a connection per request.
const SQLITE_CONNECTIONS: u32 = 8;
/// How long a statement waits for a lock another connection holds.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
const POSTGRES_CONNECTIONS: u32 = 16;

impl Db {
    /// Opens the database `url` names, creating a SQLite file if needed, and migrates it.
    pub async fn open(url: &DatabaseUrl) -> Result<Self> {
        match url {
            DatabaseUrl::Sqlite(path) => Self::open_sqlite(path).await,
            DatabaseUrl::Postgres(url) => Self::open_postgres(url).await,
        }
    }

    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT_BYTES.to_string())
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(SQLITE_CONNECTIONS)
            .connect_with(options.clone())
            .await?;
        let writer_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(
                options
                    .pragma("cache_size", format!("-{SQLITE_WRITER_CACHE_KIB}"))
                    .pragma("wal_autocheckpoint", "0"),
            )
            .await?;
        let alive = std::sync::Arc::new(());
        let restart = std::sync::Arc::default();
        tokio::spawn(checkpoint_in_background(
            pool.clone(),
            std::sync::Arc::clone(&restart),
            std::sync::Arc::downgrade(&alive),
        ));
        let (send, receive) = tokio::sync::mpsc::channel(64);
        tokio::spawn(group_writer(writer_pool.clone(), restart, receive));
        let db = Self {
            pool: Pool::Sqlite(pool),
            writer: Some((send, writer_pool)),
            _alive: Some(alive),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Connects to PostgreSQL at `url` and migrates it. Commits wait for the WAL flush
    /// (`synchronous_commit` is forced on), so an acknowledged correction survives a crash
    /// whatever the server's default.
    pub async fn open_postgres(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.options([("synchronous_commit", "on")]);
        let pool = PgPoolOptions::new()
            .max_connections(POSTGRES_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        let db = Self {
            pool: Pool::Postgres(pool),
            writer: None,
            _alive: None,
        };
        db.migrate().await?;
        Ok(db)
    }

    pub async fn migrate(&self) -> Result<()> {
        // apalis records its own migrations in `_sqlx_migrations`; ours must not collide.
        match &self.pool {
            Pool::Sqlite(pool) => {
                let mut migrator = sqlx::migrate!("../../migrations/sqlite");
                migrator.dangerous_set_table_name("_app_migrations");
                migrator.run(pool).await?;
            }
            Pool::Postgres(pool) => {
                let mut migrator = sqlx::migrate!("../../migrations/postgres");
                migrator.dangerous_set_table_name("_app_migrations");
                migrator.run(pool).await?;
            }
        }
        Ok(())
    }

    /// Creates an empty database called `name` on the PostgreSQL server `server_url` points
    /// at (through a database that exists there, usually `postgres`) and returns its URL.
    /// For tests and benchmarks, which each want a database of their own.
    pub async fn create_postgres_database(server_url: &str, name: &str) -> Result<String> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DbError::Unsupported(format!("database name `{name}`")));
        }
        use sqlx::Connection;
        let options: PgConnectOptions = server_url.parse()?;
        let mut conn = sqlx::PgConnection::connect_with(&options).await?;
        // The name was checked above: identifiers cannot be bound as parameters.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let base = server_url
            .rsplit_once('/')
            .map_or(server_url, |(base, _)| base);
        Ok(format!("{base}/{name}"))
    }

    /// `sqlite` or `postgres`: for logs, metrics and benchmarks.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> Result<()> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await);
        if let Some((_, writer)) = &self.writer {
            writer.close().await;
        }
    }

    // ---- domains ----

    pub async fn create_domain(&self, spec: &DomainSpec) -> Result<DomainRow> {
        let created_at = Stamp::now();
        let res: std::result::Result<i64, sqlx::Error> = with_pool!(self, pool => {
            sqlx::query_scalar(
                "INSERT INTO domains (name, task, base_model, labels, policy, out_of_scope_label, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(spec.name.as_str())
            .bind(spec.task.as_str())
            .bind(&spec.base_model)
            .bind(Json(&spec.labels))
            .bind(Json(&spec.policy))
            .bind(&spec.out_of_scope_label)
            .bind(created_at)
            .fetch_one(pool)
            .await
        });
        match res {
            Ok(id) => Ok(DomainRow {
                id,
                spec: spec.clone(),
                created_at: created_at.0,
            }),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(DbError::DomainExists(spec.name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn domain(&self, name: &str) -> Result<Option<DomainRow>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT * FROM domains WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(domain_from_row)
                .transpose()
        })
    }

    pub async fn domains(&self) -> Result<Vec<DomainRow>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT * FROM domains ORDER BY name")
                .fetch_all(pool)
                .await?
                .iter()
                .map(domain_from_row)
                .collect()
        })
    }

    // ---- corrections ----

    /// Stores a batch in one transaction; duplicates (same content or same client id) are
    /// counted, not stored. Returns only after the commit is durable.
    pub async fn insert_corrections(
        &self,
        domain_id: i64,
        rows: &[Correction],
    ) -> Result<InsertOutcome> {
        if let Some((writer, _)) = &self.writer {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            let request = WriteRequest {
                domain_id,
                rows: rows.to_vec(),
                reply,
            };
            let gone = || DbError::Unsupported("the database writer has stopped".into());
            writer.send(request).await.map_err(|_| gone())?;
            return outcome.await.map_err(|_| gone())?;
        }
        let created_at = Stamp::now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let outcome = insert_rows!(&mut *tx, domain_id, rows, created_at);
            tx.commit().await?;
            Ok(outcome)
        })
    }

    /// Personal data redacted from a domain's corrections up to `max_id`, by kind: counts for
    /// the report, never values.
    pub async fn redaction_counts(
        &self,
        domain_id: i64,
        max_id: i64,
    ) -> Result<flywheel_domain::PiiCounts> {
        let rows: Vec<Json<flywheel_domain::PiiCounts>> = with_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT pii_redacted FROM corrections
                 WHERE domain_id = $1 AND id <= $2 AND pii_redacted IS NOT NULL",
            )
            .bind(domain_id)
            .bind(max_id)
            .fetch_all(pool)
            .await?
        });
        let mut total = flywheel_domain::PiiCounts::new();
        for Json(counts) in rows {
            for (kind, n) in counts {
                *total.entry(kind).or_default() += n;
            }
        }
        Ok(total)
    }

    /// Corrections of a domain up to and including `max_id`, in id order.
    pub async fn corrections(
        &self,
        domain_id: i64,
        max_id: i64,
        split: Option<Split>,
    ) -> Result<Vec<CorrectionRow>> {
        with_pool!(self, pool => {
            sqlx::query(
                "SELECT id, client_id, input, model_output, expected, source, split FROM corrections
                 WHERE domain_id = $1 AND id <= $2 AND ($3 IS NULL OR split = $3) ORDER BY id",
            )
            .bind(domain_id)
            .bind(max_id)
            .bind(split.map(Split::as_str))
            .fetch_all(pool)
            .await?
            .iter()
            .map(correction_from_row)
            .collect()
        })
    }

    pub async fn correction_counts(&self, domain_id: i64) -> Result<(i64, i64)> {
        with_pool!(self, pool => {
            let r = sqlx::query(
                "SELECT COUNT(*) FILTER (WHERE split = 'train') AS train,
                        COUNT(*) FILTER (WHERE split = 'holdout') AS holdout
                 FROM corrections WHERE domain_id = $1",
            )
            .bind(domain_id)
            .fetch_one(pool)
            .await?;
            Ok((r.int("train")?, r.int("holdout")?))
        })
    }

    // ---- jobs ----

    /// Creates a queued job over every correction stored so far, unless the domain already has
    /// a job queued or running, or (for automatic triggers) fewer than `min_new` corrections
    /// arrived since the last job's snapshot. The check and the insert are one statement (on
    /// PostgreSQL a unique index on live jobs settles a race between two schedulers), so two
    /// schedulers cannot both start a run.
    pub async fn try_create_job(
        &self,
        domain_id: i64,
        trigger: Trigger,
        min_new: i64,
    ) -> Result<Option<JobId>> {
        let id = JobId::generate();
        let res = with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO training_jobs (id, domain_id, kind, status, stage, trigger, snapshot_max_id, created_at)
                 SELECT $1, $2, 'fine_tune', 'queued', 'train', $3, m.max_id, $4
                 FROM (SELECT COALESCE(MAX(id), 0) AS max_id FROM corrections WHERE domain_id = $2) AS m
                 WHERE NOT EXISTS (SELECT 1 FROM training_jobs WHERE domain_id = $2 AND status IN ('queued', 'running'))
                   AND (SELECT COUNT(*) FROM corrections WHERE domain_id = $2
                          AND id > (SELECT COALESCE(MAX(snapshot_max_id), 0) FROM training_jobs WHERE domain_id = $2)) >= $5
                   AND m.max_id > 0",
            )
            .bind(id.as_str())
            .bind(domain_id)
            .bind(trigger.as_str())
            .bind(Stamp::now())
            .bind(min_new)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        });
        match res {
            Ok(rows) => Ok((rows == 1).then_some(id)),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn job(&self, id: &JobId) -> Result<Option<JobRow>> {
        with_pool!(self, pool => {
            sqlx::query(
                "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
                 WHERE j.id = $1",
            )
            .bind(id.as_str())
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
        })
    }

    pub async fn jobs_of(&self, domain_id: i64) -> Result<Vec<JobRow>> {
        with_pool!(self, pool => {
            sqlx::query(
                "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
                 WHERE j.domain_id = $1 ORDER BY j.id DESC",
            )
            .bind(domain_id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(job_from_row)
            .collect()
        })
    }

    /// Moves a queued job to running at its first stage; `false` if it is not queued (another
    /// worker has it, or it was cancelled).
    pub async fn claim_job(&self, id: &JobId) -> Result<bool> {
        let res = with_pool!(self, pool => {
            sqlx::query(
                "UPDATE training_jobs SET status = 'running', stage = 'train',
                   started_at = COALESCE(started_at, $1), heartbeat_at = $1, attempts = attempts + 1
                 WHERE id = $2 AND status = 'queued'",
            )
            .bind(Stamp::now())
            .bind(id.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(res == 1)
    }

    /// Marks a job running at `stage` (idempotent: a retried stage may call it again).
    pub async fn job_stage(&self, id: &JobId, stage: &str) -> Result<()> {
        with_pool!(self, pool => {
            sqlx::query(
                "UPDATE training_jobs SET status = 'running', stage = $1,
                   started_at = COALESCE(started_at, $2), heartbeat_at = $2
                 WHERE id = $3 AND status = 'running'",
            )
            .bind(stage)
            .bind(Stamp::now())
            .bind(id.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Ends a job that is still queued or running; `false` if it had already ended (a
    /// cancelled job stays cancelled whatever its stage says afterwards).
    pub async fn finish_job(
        &self,
        id: &JobId,
        status: JobStatus,
        error: Option<&str>,
    ) -> Result<bool> {
        let res = with_pool!(self, pool => {
            sqlx::query(
                "UPDATE training_jobs SET status = $1, stage = 'done', error = $2, finished_at = $3
                 WHERE id = $4 AND status IN ('queued', 'running')",
            )
            .bind(status.as_str())
            .bind(error)
            .bind(Stamp::now())
            .bind(id.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(res == 1)
    }

    /// Cancels a job that has not reached publishing. `Ok(false)`: it had ended, or it is
    /// publishing (a version is being written and will be recorded).
    pub async fn cancel_job(&self, id: &JobId, reason: &str) -> Result<bool> {
        let res = with_pool!(self, pool => {
            sqlx::query(
                "UPDATE training_jobs SET status = 'cancelled', stage = 'done', error = $1, finished_at = $2
                 WHERE id = $3 AND status IN ('queued', 'running') AND stage != 'publish'",
            )
            .bind(reason)
            .bind(Stamp::now())
            .bind(id.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(res == 1)
    }

    /// What the scheduler needs to decide whether `domain_id` trains now.
    pub async fn trigger_state(
        &self,
        domain_id: i64,
        domain_created_at: chrono::DateTime<Utc>,
    ) -> Result<flywheel_domain::TriggerState> {
        with_pool!(self, pool => {
            let row = sqlx::query(
                "WITH seen AS (SELECT COALESCE(MAX(snapshot_max_id), 0) AS max_id
                               FROM training_jobs WHERE domain_id = $1)
                 SELECT
                   (SELECT COUNT(*) FROM corrections, seen WHERE domain_id = $1 AND id > seen.max_id) AS new_rows,
                   (SELECT MIN(created_at) FROM corrections, seen WHERE domain_id = $1 AND id > seen.max_id) AS oldest_new,
                   (SELECT MAX(created_at) FROM training_jobs WHERE domain_id = $1) AS last_started,
                   (SELECT MAX(finished_at) FROM training_jobs WHERE domain_id = $1) AS last_finished,
                   EXISTS (SELECT 1 FROM training_jobs WHERE domain_id = $1
                           AND status IN ('queued', 'running')) AS in_flight",
            )
            .bind(domain_id)
            .fetch_one(pool)
            .await?;
            Ok(flywheel_domain::TriggerState {
                new_corrections: row.int("new_rows")?,
                oldest_new_at: row.opt_time("oldest_new")?,
                last_started_at: row.opt_time("last_started")?.unwrap_or(domain_created_at),
                last_finished_at: row.opt_time("last_finished")?,
                in_flight: row.flag("in_flight")?,
            })
        })
    }

    /// Proves a running job's worker is alive.
    pub async fn heartbeat(&self, id: &JobId) -> Result<()> {
        with_pool!(self, pool => {
            sqlx::query(
                "UPDATE training_jobs SET heartbeat_at = $1 WHERE id = $2 AND status = 'running'",
            )
            .bind(Stamp::now())
            .bind(id.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Running jobs whose heartbeat is older than `lease`: those with attempts left go back
    /// to the queue at training (which resumes from its newest checkpoint), the rest fail.
    /// Returns `(requeued, failed)`.
    pub async fn reclaim_stale_jobs(
        &self,
        lease: std::time::Duration,
        max_attempts: i64,
    ) -> Result<(Vec<JobId>, Vec<JobId>)> {
        let cutoff = Stamp(Utc::now() - chrono::Duration::from_std(lease).unwrap_or_default());
        let (requeued, failed): (Vec<String>, Vec<String>) = with_pool!(self, pool => {
            let failed = sqlx::query_scalar(
                "UPDATE training_jobs SET status = 'failed', stage = 'done', finished_at = $1,
                   error = 'its worker stopped answering ' || attempts || ' times'
                 WHERE status = 'running' AND heartbeat_at < $2 AND attempts >= $3 RETURNING id",
            )
            .bind(Stamp::now())
            .bind(cutoff)
            .bind(max_attempts)
            .fetch_all(pool)
            .await?;
            let requeued = sqlx::query_scalar(
                "UPDATE training_jobs SET status = 'queued', stage = 'train', enqueued_at = NULL
                 WHERE status = 'running' AND heartbeat_at < $1 RETURNING id",
            )
            .bind(cutoff)
            .fetch_all(pool)
            .await?;
            (requeued, failed)
        });
        Ok((job_ids(requeued)?, job_ids(failed)?))
    }

    /// Queued jobs not yet handed to the queue, oldest first.
    pub async fn unenqueued_jobs(&self) -> Result<Vec<JobId>> {
        let ids: Vec<String> = with_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT id FROM training_jobs WHERE status = 'queued' AND enqueued_at IS NULL
                 ORDER BY created_at",
            )
            .fetch_all(pool)
            .await?
        });
        job_ids(ids)
    }

    pub async fn mark_enqueued(&self, id: &JobId) -> Result<()> {
        with_pool!(self, pool => {
            sqlx::query("UPDATE training_jobs SET enqueued_at = $1 WHERE id = $2")
                .bind(Stamp::now())
                .bind(id.as_str())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Jobs across domains, newest first, optionally of one status.
    pub async fn jobs(&self, status: Option<JobStatus>, limit: i64) -> Result<Vec<JobRow>> {
        with_pool!(self, pool => {
            sqlx::query(
                "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
                 WHERE ($1 IS NULL OR j.status = $1) ORDER BY j.created_at DESC LIMIT $2",
            )
            .bind(status.map(JobStatus::as_str))
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(job_from_row)
            .collect()
        })
    }

    pub async fn set_job_decision(
        &self,
        id: &JobId,
        version: &VersionId,
        decision: &serde_json::Value,
    ) -> Result<()> {
        with_pool!(self, pool => {
            sqlx::query("UPDATE training_jobs SET version = $1, decision = $2 WHERE id = $3")
                .bind(version.as_str())
                .bind(Json(decision))
                .bind(id.as_str())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    pub async fn job_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT status, COUNT(*) AS n FROM training_jobs GROUP BY status")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    let s = r.text("status")?;
                    Ok((JobStatus::parse(&s).ok_or(DbError::Corrupt(s))?, r.int("n")?))
                })
                .collect()
        })
    }

    pub async fn add_event(
        &self,
        job: &JobId,
        kind: &str,
        message: &str,
        data: Option<&serde_json::Value>,
    ) -> Result<()> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO job_events (job_id, at, kind, message, data) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(job.as_str())
            .bind(Stamp::now())
            .bind(kind)
            .bind(message)
            .bind(data.map(Json))
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    pub async fn events(&self, job: &JobId, after: i64) -> Result<Vec<JobEvent>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT * FROM job_events WHERE job_id = $1 AND id > $2 ORDER BY id")
                .bind(job.as_str())
                .bind(after)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(JobEvent {
                        id: r.int("id")?,
                        at: r.time("at")?,
                        kind: r.text("kind")?,
                        message: r.text("message")?,
                        data: r.opt_json("data")?,
                    })
                })
                .collect()
        })
    }

    // ---- versions ----

    /// Reserves the next version id of a domain for `job` (idempotent per job). One statement,
    /// so concurrent publishers never take the same number and no read lock is upgraded; on
    /// PostgreSQL two publishers may both compute the same number, and the loser tries again.
    pub async fn reserve_version(&self, domain_id: i64, job: &JobId) -> Result<VersionId> {
        for _ in 0..8 {
            let version: Option<String> = with_pool!(self, pool => {
                sqlx::query(
                    "INSERT INTO versions (domain_id, version, seq, job_id, promoted, metrics, created_at)
                     SELECT $1, 'v' || m.next, m.next, $2, FALSE, $3, $4
                     FROM (SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM versions WHERE domain_id = $1) AS m
                     WHERE NOT EXISTS (SELECT 1 FROM versions WHERE job_id = $2)
                     ON CONFLICT DO NOTHING",
                )
                .bind(domain_id)
                .bind(job.as_str())
                .bind(Json(serde_json::json!({})))
                .bind(Stamp::now())
                .execute(pool)
                .await?;
                sqlx::query_scalar("SELECT version FROM versions WHERE job_id = $1")
                    .bind(job.as_str())
                    .fetch_optional(pool)
                    .await?
            });
            if let Some(version) = version {
                return Ok(VersionId(version));
            }
        }
        Err(DbError::Corrupt(format!(
            "no version could be reserved for job {}: every number was taken",
            job.as_str()
        )))
    }

    /// Records the gate's verdict: `status` is `promoted`, `held_back` or `pending_approval`.
    pub async fn record_version(
        &self,
        domain_id: i64,
        version: &VersionId,
        status: &str,
        metrics: &serde_json::Value,
    ) -> Result<()> {
        with_pool!(self, pool => {
            sqlx::query(
                "UPDATE versions SET promoted = $1, status = $2, metrics = $3
                 WHERE domain_id = $4 AND version = $5",
            )
            .bind(status != "held_back")
            .bind(status)
            .bind(Json(metrics))
            .bind(domain_id)
            .bind(version.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Moves a version from one status to another; false if it was not in `from`.
    pub async fn transition_version(
        &self,
        domain_id: i64,
        version: &VersionId,
        from: &str,
        to: &str,
    ) -> Result<bool> {
        let res = with_pool!(self, pool => {
            sqlx::query(
                "UPDATE versions SET status = $1 WHERE domain_id = $2 AND version = $3 AND status = $4",
            )
            .bind(to)
            .bind(domain_id)
            .bind(version.as_str())
            .bind(from)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(res == 1)
    }

    pub async fn versions(&self, domain_id: i64) -> Result<Vec<VersionRow>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT * FROM versions WHERE domain_id = $1 ORDER BY seq")
                .bind(domain_id)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(VersionRow {
                        version: VersionId(r.text("version")?),
                        job_id: JobId(r.text("job_id")?),
                        status: r.text("status")?,
                        metrics: r.json("metrics")?,
                        created_at: r.time("created_at")?,
                    })
                })
                .collect()
        })
    }

    pub async fn version(&self, domain_id: i64, version: &VersionId) -> Result<Option<VersionRow>> {
        Ok(self
            .versions(domain_id)
            .await?
            .into_iter()
            .find(|v| &v.version == version))
    }

    // ---- audit ----

    /// Appends to the audit log (the table refuses updates and deletes).
    pub async fn audit(
        &self,
        domain_id: i64,
        actor: &str,
        action: &str,
        version: Option<&VersionId>,
        reason: &str,
        data: Option<&serde_json::Value>,
    ) -> Result<()> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO audit_log (domain_id, at, actor, action, version, reason, data)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(domain_id)
            .bind(Stamp::now())
            .bind(actor)
            .bind(action)
            .bind(version.map(VersionId::as_str))
            .bind(reason)
            .bind(data.map(Json))
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    pub async fn audit_log(&self, domain_id: i64) -> Result<Vec<AuditEntry>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT * FROM audit_log WHERE domain_id = $1 ORDER BY id")
                .bind(domain_id)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(AuditEntry {
                        id: r.int("id")?,
                        at: r.time("at")?,
                        actor: r.text("actor")?,
                        action: r.text("action")?,
                        version: r.opt_text("version")?,
                        reason: r.text("reason")?,
                        data: r.opt_json("data")?,
                    })
                })
                .collect()
        })
    }

    // ---- tokens ----

    /// Stores a token's hash; returns its row.
    pub async fn create_token(
        &self,
        name: &str,
        role: flywheel_domain::Role,
        domains: &[String],
        token_hash: &str,
        created_by: &str,
    ) -> Result<TokenRow> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO api_tokens (name, role, domains, token_hash, created_at, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (token_hash) DO NOTHING",
            )
            .bind(name)
            .bind(role.as_str())
            .bind(Json(domains))
            .bind(token_hash)
            .bind(Stamp::now())
            .bind(created_by)
            .execute(pool)
            .await?
            .rows_affected()
        });
        self.token_by_hash(token_hash)
            .await?
            .ok_or_else(|| DbError::Corrupt("token vanished after insert".into()))
    }

    /// The token with this hash, revoked or not.
    pub async fn token_by_hash(&self, token_hash: &str) -> Result<Option<TokenRow>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT * FROM api_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(token_from_row)
                .transpose()
        })
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        with_pool!(self, pool => {
            sqlx::query("SELECT * FROM api_tokens ORDER BY id")
                .fetch_all(pool)
                .await?
                .iter()
                .map(token_from_row)
                .collect()
        })
    }

    /// Revokes a token; `false` if there is no such live token.
    pub async fn revoke_token(&self, id: i64) -> Result<bool> {
        let res = with_pool!(self, pool => {
            sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(Stamp::now())
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(res == 1)
    }
}

fn domain_from_row(r: &impl Cells) -> Result<DomainRow> {
    let name = r.text("name")?;
    let task = r.text("task")?;
    let spec = DomainSpec {
        name: DomainName::parse(&name).map_err(|e| DbError::Corrupt(e.to_string()))?,
        task: Task::parse(&task).ok_or_else(|| DbError::Corrupt(task.clone()))?,
        base_model: r.text("base_model")?,
        labels: r.json("labels")?,
        policy: r.json("policy")?,
        out_of_scope_label: r.opt_text("out_of_scope_label")?,
    };
    Ok(DomainRow {
        id: r.int("id")?,
        spec,
        created_at: r.time("created_at")?,
    })
}

fn correction_from_row(r: &impl Cells) -> Result<CorrectionRow> {
    let source = r.text("source")?;
    let split = r.text("split")?;
    Ok(CorrectionRow {
        id: r.int("id")?,
        client_id: r.opt_text("client_id")?,
        input: r.text("input")?,
        model_output: r.opt_text("model_output")?,
        expected: r.text("expected")?,
        source: Source::parse(&source).ok_or_else(|| DbError::Corrupt(source.clone()))?,
        split: Split::parse(&split).ok_or_else(|| DbError::Corrupt(split.clone()))?,
    })
}

fn job_from_row(r: &impl Cells) -> Result<JobRow> {
    let status = r.text("status")?;
    Ok(JobRow {
        id: JobId(r.text("id")?),
        domain: r.text("domain")?,
        kind: r.text("kind")?,
        status: JobStatus::parse(&status).ok_or_else(|| DbError::Corrupt(status.clone()))?,
        stage: r.text("stage")?,
        trigger: r.text("trigger")?,
        snapshot_max_id: r.int("snapshot_max_id")?,
        version: r.opt_text("version")?.map(VersionId),
        decision: r.opt_json("decision")?,
        error: r.opt_text("error")?,
        created_at: r.time("created_at")?,
        started_at: r.opt_time("started_at")?,
        finished_at: r.opt_time("finished_at")?,
    })
}

fn token_from_row(r: &impl Cells) -> Result<TokenRow> {
    let role = r.text("role")?;
    Ok(TokenRow {
        id: r.int("id")?,
        name: r.text("name")?,
        role: flywheel_domain::Role::parse(&role).ok_or_else(|| DbError::Corrupt(role.clone()))?,
        domains: r.json("domains")?,
        created_at: r.time("created_at")?,
        created_by: r.text("created_by")?,
        revoked_at: r.opt_time("revoked_at")?,
    })
}

fn job_ids(raw: Vec<String>) -> Result<Vec<JobId>> {
    raw.iter()
        .map(|i| JobId::parse(i).ok_or_else(|| DbError::Corrupt(format!("job id {i}"))))
        .collect()
}
