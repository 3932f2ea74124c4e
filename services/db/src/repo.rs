use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flywheel_domain::{
    Correction, DomainName, DomainSpec, JobId, JobStatus, Source, Split, Task, Trigger, VersionId,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::models::*;
use crate::{DbError, Result};

/// Handle on flywheel's database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn ts(raw: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DbError::Corrupt(format!("timestamp `{raw}`: {e}")))
}

fn json(raw: &str) -> Result<serde_json::Value> {
    serde_json::from_str(raw).map_err(|e| DbError::Corrupt(e.to_string()))
}

impl Db {
    /// Opens (creating if needed) the SQLite database at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        let db = Self { pool };
        db.migrate().await?;
        Ok(db)
    }

    pub async fn migrate(&self) -> Result<()> {
        let mut migrator = sqlx::migrate!("../../migrations/sqlite");
        // apalis records its own migrations in `_sqlx_migrations`; ours must not collide.
        migrator.dangerous_set_table_name("_app_migrations");
        migrator.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- domains ----

    pub async fn create_domain(&self, spec: &DomainSpec) -> Result<DomainRow> {
        let created_at = now();
        let res = sqlx::query(
            "INSERT INTO domains (name, task, base_model, labels, policy, out_of_scope_label, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(spec.name.as_str())
        .bind(spec.task.as_str())
        .bind(&spec.base_model)
        .bind(serde_json::to_string(&spec.labels).expect("json"))
        .bind(serde_json::to_string(&spec.policy).expect("json"))
        .bind(&spec.out_of_scope_label)
        .bind(&created_at)
        .execute(&self.pool)
        .await;
        match res {
            Ok(r) => Ok(DomainRow {
                id: r.last_insert_rowid(),
                spec: spec.clone(),
                created_at: ts(&created_at)?,
            }),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(DbError::DomainExists(spec.name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn domain(&self, name: &str) -> Result<Option<DomainRow>> {
        let row = sqlx::query("SELECT * FROM domains WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| domain_from_row(&r)).transpose()
    }

    pub async fn domains(&self) -> Result<Vec<DomainRow>> {
        let rows = sqlx::query("SELECT * FROM domains ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(domain_from_row).collect()
    }

    // ---- corrections ----

    /// Stores a batch in one transaction; duplicates (same content or same client id) are
    /// counted, not stored. Returns only after the commit is durable.
    pub async fn insert_corrections(
        &self,
        domain_id: i64,
        rows: &[Correction],
    ) -> Result<InsertOutcome> {
        // Multi-row INSERTs: per-statement overhead, not SQLite, is what limits a row-at-a-time
        // loop. RETURNING names the rows that were new; the rest were duplicates.
        const PER_STATEMENT: usize = 100;
        let mut tx = self.pool.begin().await?;
        let mut outcome = InsertOutcome::default();
        let created_at = now();
        for chunk in rows.chunks(PER_STATEMENT) {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO corrections
                   (domain_id, client_id, content_hash, input, model_output, expected, source,
                    teacher, metadata, split, created_at, pii_redacted) ",
            );
            query.push_values(chunk, |mut row, c| {
                row.push_bind(domain_id)
                    .push_bind(&c.client_id)
                    .push_bind(&c.content_hash)
                    .push_bind(&c.input)
                    .push_bind(&c.model_output)
                    .push_bind(&c.expected)
                    .push_bind(c.source.as_str())
                    .push_bind(&c.teacher)
                    .push_bind(c.metadata.to_string())
                    .push_bind(c.split.as_str())
                    .push_bind(&created_at)
                    .push_bind(
                        (!c.redacted.is_empty())
                            .then(|| serde_json::to_string(&c.redacted).expect("json")),
                    );
            });
            query.push(" ON CONFLICT DO NOTHING RETURNING content_hash");
            let inserted: Vec<String> = query.build_query_scalar().fetch_all(&mut *tx).await?;
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
        tx.commit().await?;
        Ok(outcome)
    }

    /// Personal data redacted from a domain's corrections up to `max_id`, by kind: counts for
    /// the report, never values.
    pub async fn redaction_counts(
        &self,
        domain_id: i64,
        max_id: i64,
    ) -> Result<flywheel_domain::PiiCounts> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT pii_redacted FROM corrections
             WHERE domain_id = ? AND id <= ? AND pii_redacted IS NOT NULL",
        )
        .bind(domain_id)
        .bind(max_id)
        .fetch_all(&self.pool)
        .await?;
        let mut total = flywheel_domain::PiiCounts::new();
        for raw in rows {
            let counts: flywheel_domain::PiiCounts =
                serde_json::from_str(&raw).map_err(|e| DbError::Corrupt(e.to_string()))?;
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
        let rows = sqlx::query(
            "SELECT id, client_id, input, model_output, expected, source, split FROM corrections
             WHERE domain_id = ? AND id <= ? AND (? IS NULL OR split = ?) ORDER BY id",
        )
        .bind(domain_id)
        .bind(max_id)
        .bind(split.map(Split::as_str))
        .bind(split.map(Split::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let source: String = r.try_get("source")?;
                let split: String = r.try_get("split")?;
                Ok(CorrectionRow {
                    id: r.try_get("id")?,
                    client_id: r.try_get("client_id")?,
                    input: r.try_get("input")?,
                    model_output: r.try_get("model_output")?,
                    expected: r.try_get("expected")?,
                    source: Source::parse(&source)
                        .ok_or_else(|| DbError::Corrupt(source.clone()))?,
                    split: Split::parse(&split).ok_or_else(|| DbError::Corrupt(split.clone()))?,
                })
            })
            .collect()
    }

    pub async fn correction_counts(&self, domain_id: i64) -> Result<(i64, i64)> {
        let r = sqlx::query(
            "SELECT COALESCE(SUM(split = 'train'), 0) AS train, COALESCE(SUM(split = 'holdout'), 0) AS holdout
             FROM corrections WHERE domain_id = ?",
        )
        .bind(domain_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((r.try_get("train")?, r.try_get("holdout")?))
    }

    // ---- jobs ----

    /// Creates a queued job over every correction stored so far, unless the domain already has
    /// a job queued or running, or (for automatic triggers) fewer than `min_new` corrections
    /// arrived since the last job's snapshot. The check and the insert are one statement, so
    /// two schedulers cannot both start a run.
    pub async fn try_create_job(
        &self,
        domain_id: i64,
        trigger: Trigger,
        min_new: i64,
    ) -> Result<Option<JobId>> {
        let id = JobId::generate();
        let res = sqlx::query(
            "INSERT INTO training_jobs (id, domain_id, kind, status, stage, trigger, snapshot_max_id, created_at)
             SELECT ?, ?, 'fine_tune', 'queued', 'train', ?, m.max_id, ?
             FROM (SELECT COALESCE(MAX(id), 0) AS max_id FROM corrections WHERE domain_id = ?) AS m
             WHERE NOT EXISTS (SELECT 1 FROM training_jobs WHERE domain_id = ? AND status IN ('queued', 'running'))
               AND (SELECT COUNT(*) FROM corrections WHERE domain_id = ?
                      AND id > (SELECT COALESCE(MAX(snapshot_max_id), 0) FROM training_jobs WHERE domain_id = ?)) >= ?
               AND m.max_id > 0",
        )
        .bind(id.as_str())
        .bind(domain_id)
        .bind(trigger.as_str())
        .bind(now())
        .bind(domain_id)
        .bind(domain_id)
        .bind(domain_id)
        .bind(domain_id)
        .bind(min_new)
        .execute(&self.pool)
        .await?;
        Ok((res.rows_affected() == 1).then_some(id))
    }

    pub async fn job(&self, id: &JobId) -> Result<Option<JobRow>> {
        let row = sqlx::query(
            "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id WHERE j.id = ?",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    pub async fn jobs_of(&self, domain_id: i64) -> Result<Vec<JobRow>> {
        let rows = sqlx::query(
            "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
             WHERE j.domain_id = ? ORDER BY j.id DESC",
        )
        .bind(domain_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Moves a queued job to running at its first stage; `false` if it is not queued (another
    /// worker has it, or it was cancelled).
    pub async fn claim_job(&self, id: &JobId) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE training_jobs SET status = 'running', stage = 'train',
               started_at = COALESCE(started_at, ?1), heartbeat_at = ?1, attempts = attempts + 1
             WHERE id = ?2 AND status = 'queued'",
        )
        .bind(now())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Marks a job running at `stage` (idempotent: a retried stage may call it again).
    pub async fn job_stage(&self, id: &JobId, stage: &str) -> Result<()> {
        sqlx::query(
            "UPDATE training_jobs SET status = 'running', stage = ?1,
               started_at = COALESCE(started_at, ?2), heartbeat_at = ?2
             WHERE id = ?3 AND status = 'running'",
        )
        .bind(stage)
        .bind(now())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
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
        let res = sqlx::query(
            "UPDATE training_jobs SET status = ?, stage = 'done', error = ?, finished_at = ?
             WHERE id = ? AND status IN ('queued', 'running')",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(now())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Cancels a job that has not reached publishing. `Ok(false)`: it had ended, or it is
    /// publishing (a version is being written and will be recorded).
    pub async fn cancel_job(&self, id: &JobId, reason: &str) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE training_jobs SET status = 'cancelled', stage = 'done', error = ?, finished_at = ?
             WHERE id = ? AND status IN ('queued', 'running') AND stage != 'publish'",
        )
        .bind(reason)
        .bind(now())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// What the scheduler needs to decide whether `domain_id` trains now.
    pub async fn trigger_state(
        &self,
        domain_id: i64,
        domain_created_at: DateTime<Utc>,
    ) -> Result<flywheel_domain::TriggerState> {
        let row = sqlx::query(
            "WITH seen AS (SELECT COALESCE(MAX(snapshot_max_id), 0) AS max_id
                           FROM training_jobs WHERE domain_id = ?1)
             SELECT
               (SELECT COUNT(*) FROM corrections, seen WHERE domain_id = ?1 AND id > seen.max_id) AS new_rows,
               (SELECT MIN(created_at) FROM corrections, seen WHERE domain_id = ?1 AND id > seen.max_id) AS oldest_new,
               (SELECT MAX(created_at) FROM training_jobs WHERE domain_id = ?1) AS last_started,
               (SELECT MAX(finished_at) FROM training_jobs WHERE domain_id = ?1) AS last_finished,
               EXISTS (SELECT 1 FROM training_jobs WHERE domain_id = ?1
                       AND status IN ('queued', 'running')) AS in_flight",
        )
        .bind(domain_id)
        .fetch_one(&self.pool)
        .await?;
        let time = |col: &str| r_opt_ts(&row, col);
        Ok(flywheel_domain::TriggerState {
            new_corrections: row.try_get("new_rows")?,
            oldest_new_at: time("oldest_new")?,
            last_started_at: time("last_started")?.unwrap_or(domain_created_at),
            last_finished_at: time("last_finished")?,
            in_flight: row.try_get("in_flight")?,
        })
    }

    /// Proves a running job's worker is alive.
    pub async fn heartbeat(&self, id: &JobId) -> Result<()> {
        sqlx::query(
            "UPDATE training_jobs SET heartbeat_at = ? WHERE id = ? AND status = 'running'",
        )
        .bind(now())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Running jobs whose heartbeat is older than `lease`: those with attempts left go back
    /// to the queue (from training: stages keep nothing a restart could trust), the rest
    /// fail. Returns `(requeued, failed)`.
    pub async fn reclaim_stale_jobs(
        &self,
        lease: std::time::Duration,
        max_attempts: i64,
    ) -> Result<(Vec<JobId>, Vec<JobId>)> {
        let cutoff = (Utc::now() - chrono::Duration::from_std(lease).unwrap_or_default())
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let failed: Vec<String> = sqlx::query_scalar(
            "UPDATE training_jobs SET status = 'failed', stage = 'done', finished_at = ?1,
               error = 'its worker stopped answering ' || attempts || ' times'
             WHERE status = 'running' AND heartbeat_at < ?2 AND attempts >= ?3 RETURNING id",
        )
        .bind(now())
        .bind(&cutoff)
        .bind(max_attempts)
        .fetch_all(&self.pool)
        .await?;
        let requeued: Vec<String> = sqlx::query_scalar(
            "UPDATE training_jobs SET status = 'queued', stage = 'train', enqueued_at = NULL
             WHERE status = 'running' AND heartbeat_at < ?1 RETURNING id",
        )
        .bind(&cutoff)
        .fetch_all(&self.pool)
        .await?;
        Ok((job_ids(requeued)?, job_ids(failed)?))
    }

    /// Queued jobs not yet handed to the queue, oldest first.
    pub async fn unenqueued_jobs(&self) -> Result<Vec<JobId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM training_jobs WHERE status = 'queued' AND enqueued_at IS NULL ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        job_ids(ids)
    }

    pub async fn mark_enqueued(&self, id: &JobId) -> Result<()> {
        sqlx::query("UPDATE training_jobs SET enqueued_at = ? WHERE id = ?")
            .bind(now())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Jobs across domains, newest first, optionally of one status.
    pub async fn jobs(&self, status: Option<JobStatus>, limit: i64) -> Result<Vec<JobRow>> {
        let rows = sqlx::query(
            "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
             WHERE (? IS NULL OR j.status = ?) ORDER BY j.created_at DESC LIMIT ?",
        )
        .bind(status.map(JobStatus::as_str))
        .bind(status.map(JobStatus::as_str))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    pub async fn set_job_decision(
        &self,
        id: &JobId,
        version: &VersionId,
        decision: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query("UPDATE training_jobs SET version = ?, decision = ? WHERE id = ?")
            .bind(version.as_str())
            .bind(decision.to_string())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn job_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM training_jobs GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get("status")?;
                Ok((
                    JobStatus::parse(&s).ok_or(DbError::Corrupt(s))?,
                    r.try_get("n")?,
                ))
            })
            .collect()
    }

    pub async fn add_event(
        &self,
        job: &JobId,
        kind: &str,
        message: &str,
        data: Option<&serde_json::Value>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO job_events (job_id, at, kind, message, data) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(job.as_str())
        .bind(now())
        .bind(kind)
        .bind(message)
        .bind(data.map(|d| d.to_string()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn events(&self, job: &JobId, after: i64) -> Result<Vec<JobEvent>> {
        let rows = sqlx::query("SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id")
            .bind(job.as_str())
            .bind(after)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let data: Option<String> = r.try_get("data")?;
                Ok(JobEvent {
                    id: r.try_get("id")?,
                    at: ts(&r.try_get::<String, _>("at")?)?,
                    kind: r.try_get("kind")?,
                    message: r.try_get("message")?,
                    data: data.as_deref().map(json).transpose()?,
                })
            })
            .collect()
    }

    // ---- versions ----

    /// Reserves the next version id of a domain for `job` (idempotent per job). One statement,
    /// so concurrent publishers never take the same number and no read lock is upgraded.
    pub async fn reserve_version(&self, domain_id: i64, job: &JobId) -> Result<VersionId> {
        sqlx::query(
            "INSERT INTO versions (domain_id, version, seq, job_id, promoted, metrics, created_at)
             SELECT ?, 'v' || m.next, m.next, ?, 0, '{}', ?
             FROM (SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM versions WHERE domain_id = ?) AS m
             WHERE NOT EXISTS (SELECT 1 FROM versions WHERE job_id = ?)",
        )
        .bind(domain_id)
        .bind(job.as_str())
        .bind(now())
        .bind(domain_id)
        .bind(job.as_str())
        .execute(&self.pool)
        .await?;
        let version: String = sqlx::query("SELECT version FROM versions WHERE job_id = ?")
            .bind(job.as_str())
            .fetch_one(&self.pool)
            .await?
            .try_get("version")?;
        Ok(VersionId(version))
    }

    /// Records the gate's verdict: `status` is `promoted`, `held_back` or `pending_approval`.
    pub async fn record_version(
        &self,
        domain_id: i64,
        version: &VersionId,
        status: &str,
        metrics: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE versions SET promoted = ?, status = ?, metrics = ? WHERE domain_id = ? AND version = ?",
        )
        .bind(status != "held_back")
        .bind(status)
        .bind(metrics.to_string())
        .bind(domain_id)
        .bind(version.as_str())
        .execute(&self.pool)
        .await?;
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
        let res = sqlx::query(
            "UPDATE versions SET status = ? WHERE domain_id = ? AND version = ? AND status = ?",
        )
        .bind(to)
        .bind(domain_id)
        .bind(version.as_str())
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    pub async fn versions(&self, domain_id: i64) -> Result<Vec<VersionRow>> {
        let rows = sqlx::query("SELECT * FROM versions WHERE domain_id = ? ORDER BY seq")
            .bind(domain_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(VersionRow {
                    version: VersionId(r.try_get("version")?),
                    job_id: JobId(r.try_get("job_id")?),
                    status: r.try_get("status")?,
                    metrics: json(&r.try_get::<String, _>("metrics")?)?,
                    created_at: ts(&r.try_get::<String, _>("created_at")?)?,
                })
            })
            .collect()
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
        sqlx::query(
            "INSERT INTO audit_log (domain_id, at, actor, action, version, reason, data)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(domain_id)
        .bind(now())
        .bind(actor)
        .bind(action)
        .bind(version.map(VersionId::as_str))
        .bind(reason)
        .bind(data.map(|d| d.to_string()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn audit_log(&self, domain_id: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query("SELECT * FROM audit_log WHERE domain_id = ? ORDER BY id")
            .bind(domain_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let data: Option<String> = r.try_get("data")?;
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: ts(&r.try_get::<String, _>("at")?)?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    version: r.try_get("version")?,
                    reason: r.try_get("reason")?,
                    data: data.as_deref().map(json).transpose()?,
                })
            })
            .collect()
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
        sqlx::query(
            "INSERT INTO api_tokens (name, role, domains, token_hash, created_at, created_by)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(serde_json::to_string(domains).expect("json"))
        .bind(token_hash)
        .bind(now())
        .bind(created_by)
        .execute(&self.pool)
        .await?;
        self.token_by_hash(token_hash)
            .await?
            .ok_or_else(|| DbError::Corrupt("token vanished after insert".into()))
    }

    /// The live (not revoked) token with this hash.
    pub async fn token_by_hash(&self, token_hash: &str) -> Result<Option<TokenRow>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE token_hash = ?")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        let rows = sqlx::query("SELECT * FROM api_tokens ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Revokes a token; `false` if there is no such live token.
    pub async fn revoke_token(&self, id: i64) -> Result<bool> {
        let res =
            sqlx::query("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(res.rows_affected() == 1)
    }
}

fn domain_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<DomainRow> {
    let name: String = r.try_get("name")?;
    let task: String = r.try_get("task")?;
    let spec = DomainSpec {
        name: DomainName::parse(&name).map_err(|e| DbError::Corrupt(e.to_string()))?,
        task: Task::parse(&task).ok_or_else(|| DbError::Corrupt(task.clone()))?,
        base_model: r.try_get("base_model")?,
        labels: serde_json::from_str(&r.try_get::<String, _>("labels")?)
            .map_err(|e| DbError::Corrupt(e.to_string()))?,
        policy: serde_json::from_str(&r.try_get::<String, _>("policy")?)
            .map_err(|e| DbError::Corrupt(e.to_string()))?,
        out_of_scope_label: r.try_get("out_of_scope_label")?,
    };
    Ok(DomainRow {
        id: r.try_get("id")?,
        spec,
        created_at: ts(&r.try_get::<String, _>("created_at")?)?,
    })
}

fn job_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<JobRow> {
    let status: String = r.try_get("status")?;
    let opt_ts = |col: &str| -> Result<Option<DateTime<Utc>>> {
        r.try_get::<Option<String>, _>(col)?
            .as_deref()
            .map(ts)
            .transpose()
    };
    Ok(JobRow {
        id: JobId(r.try_get("id")?),
        domain: r.try_get("domain")?,
        kind: r.try_get("kind")?,
        status: JobStatus::parse(&status).ok_or_else(|| DbError::Corrupt(status.clone()))?,
        stage: r.try_get("stage")?,
        trigger: r.try_get("trigger")?,
        snapshot_max_id: r.try_get("snapshot_max_id")?,
        version: r.try_get::<Option<String>, _>("version")?.map(VersionId),
        decision: r
            .try_get::<Option<String>, _>("decision")?
            .as_deref()
            .map(json)
            .transpose()?,
        error: r.try_get("error")?,
        created_at: ts(&r.try_get::<String, _>("created_at")?)?,
        started_at: opt_ts("started_at")?,
        finished_at: opt_ts("finished_at")?,
    })
}

fn token_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<TokenRow> {
    let role: String = r.try_get("role")?;
    Ok(TokenRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role: flywheel_domain::Role::parse(&role).ok_or_else(|| DbError::Corrupt(role.clone()))?,
        domains: serde_json::from_str(&r.try_get::<String, _>("domains")?)
            .map_err(|e| DbError::Corrupt(e.to_string()))?,
        created_at: ts(&r.try_get::<String, _>("created_at")?)?,
        created_by: r.try_get("created_by")?,
        revoked_at: r_opt_ts(r, "revoked_at")?,
    })
}

fn job_ids(raw: Vec<String>) -> Result<Vec<JobId>> {
    raw.iter()
        .map(|i| JobId::parse(i).ok_or_else(|| DbError::Corrupt(format!("job id {i}"))))
        .collect()
}

fn r_opt_ts(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    let raw: Option<String> = row.try_get(col)?;
    raw.as_deref().map(ts).transpose()
}
