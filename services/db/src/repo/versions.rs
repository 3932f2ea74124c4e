//! Versions: reserved numbers, the gate's verdict and status transitions.

use flywheel_domain::{JobId, VersionId, VersionStatus};
use sqlx::types::Json;

use super::{Db, execute, fetch_all};
use crate::models::VersionRow;
use crate::sql::{Cells, Stamp, with_pool};
use crate::{DbError, Result};

impl Db {
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
        status: VersionStatus,
        metrics: &serde_json::Value,
    ) -> Result<()> {
        execute!(
            self,
            "UPDATE versions SET promoted = $1, status = $2, metrics = $3
             WHERE domain_id = $4 AND version = $5",
            status != VersionStatus::HeldBack,
            status.as_str(),
            Json(metrics),
            domain_id,
            version.as_str()
        );
        Ok(())
    }

    /// Moves a version from one status to another; false if it was not in `from`.
    pub async fn transition_version(
        &self,
        domain_id: i64,
        version: &VersionId,
        from: VersionStatus,
        to: VersionStatus,
    ) -> Result<bool> {
        let res = execute!(
            self,
            "UPDATE versions SET status = $1 WHERE domain_id = $2 AND version = $3 AND status = $4",
            to.as_str(),
            domain_id,
            version.as_str(),
            from.as_str()
        );
        Ok(res == 1)
    }

    pub async fn versions(&self, domain_id: i64) -> Result<Vec<VersionRow>> {
        fetch_all!(
            self,
            version_from_row,
            "SELECT * FROM versions WHERE domain_id = $1 ORDER BY seq",
            domain_id
        )
    }

    pub async fn version(&self, domain_id: i64, version: &VersionId) -> Result<Option<VersionRow>> {
        Ok(self
            .versions(domain_id)
            .await?
            .into_iter()
            .find(|v| &v.version == version))
    }
}

fn version_from_row(r: &impl Cells) -> Result<VersionRow> {
    let status = r.text("status")?;
    Ok(VersionRow {
        version: VersionId(r.text("version")?),
        job_id: JobId(r.text("job_id")?),
        status: VersionStatus::parse(&status).ok_or(DbError::Corrupt(status))?,
        metrics: r.json("metrics")?,
        created_at: r.time("created_at")?,
    })
}
