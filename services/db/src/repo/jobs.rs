//! Training jobs: creation under the one-in-flight rule, claims, stages, leases and the
//! scheduler's view of a domain.

use chrono::Utc;
use flywheel_domain::{JobId, JobStatus, Training, Trigger, VersionId};
use sqlx::types::Json;

use super::{Db, execute, fetch_all, fetch_optional};
use crate::models::JobRow;
use crate::sql::{Cells, Stamp, with_pool};
use crate::{DbError, Result};

/// An open upload that has not committed a chunk for this long no longer holds a job's
/// snapshot back: its connection is gone (the API cuts a body paused for 30 s).
const OPEN_UPLOAD_TTL_SECONDS: i64 = 120;

impl Db {
    /// Marks an upload of `domain_id` as streaming: until [`Db::close_upload`] (or
    /// [`OPEN_UPLOAD_TTL_SECONDS`] without [`Db::touch_upload`]), no job snapshots a row it
    /// stores.
    pub async fn open_upload(&self, id: &str, domain_id: i64) -> Result<()> {
        execute!(
            self,
            "INSERT INTO open_uploads (id, domain_id, after_id, touched_at)
             SELECT $1, $2, COALESCE(MAX(id), 0), $3 FROM corrections WHERE domain_id = $2",
            id,
            domain_id,
            Stamp::now()
        );
        Ok(())
    }

    /// The upload is still streaming.
    pub async fn touch_upload(&self, id: &str) -> Result<()> {
        execute!(
            self,
            "UPDATE open_uploads SET touched_at = $1 WHERE id = $2",
            Stamp::now(),
            id
        );
        Ok(())
    }

    /// The upload ended (finished, refused or cut off): its rows may be snapshotted.
    pub async fn close_upload(&self, id: &str) -> Result<()> {
        execute!(self, "DELETE FROM open_uploads WHERE id = $1", id);
        Ok(())
    }

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
        self.try_create_job_with(domain_id, trigger, min_new, None)
            .await
    }

    /// [`Self::try_create_job`] for a job that overrides its domain's training block.
    pub async fn try_create_job_with(
        &self,
        domain_id: i64,
        trigger: Trigger,
        min_new: i64,
        training: Option<&Training>,
    ) -> Result<Option<JobId>> {
        let id = JobId::generate();
        let now = Stamp::now();
        // The snapshot ends below any upload still streaming in chunks (`open_uploads`), so a
        // job never trains on part of one; an upload quiet for longer than the API's body
        // pause limit is gone, and no longer holds the snapshot back.
        let live_since = Stamp(now.0 - chrono::Duration::seconds(OPEN_UPLOAD_TTL_SECONDS));
        let res = with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO training_jobs (id, domain_id, kind, status, stage, trigger, snapshot_max_id, created_at, training)
                 SELECT $1, $2, 'fine_tune', 'queued', 'train', $3, m.max_id, $4, $7
                 FROM (SELECT COALESCE(MAX(id), 0) AS max_id FROM corrections WHERE domain_id = $2
                       AND id <= COALESCE((SELECT MIN(after_id) FROM open_uploads
                                           WHERE domain_id = $2 AND touched_at > $6), id)) AS m
                 WHERE NOT EXISTS (SELECT 1 FROM training_jobs WHERE domain_id = $2 AND status IN ('queued', 'running'))
                 AND (SELECT COUNT(*) FROM corrections WHERE domain_id = $2 AND id <= m.max_id
                 AND id > (SELECT COALESCE(MAX(snapshot_max_id), 0) FROM training_jobs WHERE domain_id = $2)) >= $5
                 AND m.max_id > 0",
            )
            .bind(id.as_str())
            .bind(domain_id)
            .bind(trigger.as_str())
            .bind(now)
            .bind(min_new)
            .bind(live_since)
            .bind(training.map(Json))
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
        fetch_optional!(
            self,
            job_from_row,
            "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
             WHERE j.id = $1",
            id.as_str()
        )
    }

    pub async fn jobs_of(&self, domain_id: i64) -> Result<Vec<JobRow>> {
        fetch_all!(
            self,
            job_from_row,
            "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
             WHERE j.domain_id = $1 ORDER BY j.id DESC",
            domain_id
        )
    }

    /// Moves a queued job to running at its first stage; `false` if it is not queued (another
    /// worker has it, or it was cancelled).
    pub async fn claim_job(&self, id: &JobId) -> Result<bool> {
        let res = execute!(
            self,
            "UPDATE training_jobs SET status = 'running', stage = 'train',
             started_at = COALESCE(started_at, $1), heartbeat_at = $1, attempts = attempts + 1
             WHERE id = $2 AND status = 'queued'",
            Stamp::now(),
            id.as_str()
        );
        Ok(res == 1)
    }

    /// Marks a job running at `stage` (idempotent: a retried stage may call it again).
    pub async fn job_stage(&self, id: &JobId, stage: &str) -> Result<()> {
        execute!(
            self,
            "UPDATE training_jobs SET status = 'running', stage = $1,
             started_at = COALESCE(started_at, $2), heartbeat_at = $2
             WHERE id = $3 AND status = 'running'",
            stage,
            Stamp::now(),
            id.as_str()
        );
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
        let res = execute!(
            self,
            "UPDATE training_jobs SET status = $1, stage = 'done', error = $2, finished_at = $3
             WHERE id = $4 AND status IN ('queued', 'running')",
            status.as_str(),
            error,
            Stamp::now(),
            id.as_str()
        );
        Ok(res == 1)
    }

    /// Cancels a job that has not reached publishing. `Ok(false)`: it had ended, or it is
    /// publishing (a version is being written and will be recorded).
    pub async fn cancel_job(&self, id: &JobId, reason: &str) -> Result<bool> {
        let res = execute!(self, "UPDATE training_jobs SET status = 'cancelled', stage = 'done', error = $1, finished_at = $2
                 WHERE id = $3 AND status IN ('queued', 'running') AND stage != 'publish'", reason, Stamp::now(), id.as_str());
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
                last_hour: None,
            })
        })
    }

    /// Proves a running job's worker is alive.
    pub async fn heartbeat(&self, id: &JobId) -> Result<()> {
        execute!(
            self,
            "UPDATE training_jobs SET heartbeat_at = $1 WHERE id = $2 AND status = 'running'",
            Stamp::now(),
            id.as_str()
        );
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
        execute!(
            self,
            "UPDATE training_jobs SET enqueued_at = $1 WHERE id = $2",
            Stamp::now(),
            id.as_str()
        );
        Ok(())
    }

    /// Jobs across domains, newest first, optionally of one status.
    /// The newest `limit` jobs, of one domain (by name) or of all.
    pub async fn jobs(
        &self,
        status: Option<JobStatus>,
        domain: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        fetch_all!(
            self,
            job_from_row,
            "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
             WHERE ($1 IS NULL OR j.status = $1) AND ($2 IS NULL OR d.name = $2)
             ORDER BY j.created_at DESC, j.id DESC LIMIT $3",
            status.map(JobStatus::as_str),
            domain,
            limit
        )
    }

    pub async fn set_job_decision(
        &self,
        id: &JobId,
        version: &VersionId,
        decision: &serde_json::Value,
    ) -> Result<()> {
        execute!(
            self,
            "UPDATE training_jobs SET version = $1, decision = $2 WHERE id = $3",
            version.as_str(),
            Json(decision),
            id.as_str()
        );
        Ok(())
    }

    /// How many jobs each domain has in each state (only the states it has jobs in).
    pub async fn job_counts(&self) -> Result<Vec<(String, JobStatus, i64)>> {
        with_pool!(self, pool => {
            sqlx::query(
                "SELECT d.name AS domain, j.status, COUNT(*) AS n
                 FROM training_jobs j JOIN domains d ON d.id = j.domain_id
                 GROUP BY d.name, j.status",
            )
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                let s = r.text("status")?;
                let status = JobStatus::parse(&s).ok_or(DbError::Corrupt(s))?;
                Ok((r.text("domain")?, status, r.int("n")?))
            })
            .collect()
        })
    }
}

pub(super) fn job_from_row(r: &impl Cells) -> Result<JobRow> {
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
        training: r.opt_json("training")?,
        error: r.opt_text("error")?,
        created_at: r.time("created_at")?,
        started_at: r.opt_time("started_at")?,
        finished_at: r.opt_time("finished_at")?,
    })
}

fn job_ids(raw: Vec<String>) -> Result<Vec<JobId>> {
    raw.iter()
        .map(|i| JobId::parse(i).ok_or_else(|| DbError::Corrupt(format!("job id {i}"))))
        .collect()
}
