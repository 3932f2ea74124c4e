//! The webhook outbox: what happened (audit rows and failed jobs not yet announced) is read
//! here, turned into deliveries by `flywheel-notify`, and written back with the record of
//! their announcement in one transaction; deliveries are then tried until a receiver takes
//! them.

use chrono::{DateTime, Utc};
use flywheel_domain::JobId;

use super::audit::audit_from_row;
use super::jobs::job_from_row;
use super::{Db, execute, fetch_all};
use crate::models::{AuditEntry, JobRow};
use crate::sql::{Cells, Stamp, with_pool};
use crate::{DbError, Result};

/// One event for one receiver, to be written to the outbox.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub event_id: String,
    pub event_type: String,
    pub url: String,
    /// The exact bytes that are signed and sent.
    pub body: String,
}

/// A delivery not yet taken by its receiver.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub url: String,
    pub body: String,
    pub attempts: i64,
}

/// What the outbox holds, for metrics and the operator.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutboxCounts {
    pub pending: i64,
    pub delivered: i64,
}

impl Db {
    /// Audit rows not yet announced, oldest first, each with its domain's name. Only rows past
    /// the cursor are searched: below it, every row is announced.
    pub async fn audit_to_announce(&self, limit: i64) -> Result<Vec<(String, AuditEntry)>> {
        with_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT a.*, d.name AS domain FROM audit_log a JOIN domains d ON d.id = a.domain_id
                 WHERE a.id > (SELECT audit_id FROM webhook_cursor WHERE id = 1)
                   AND NOT EXISTS (SELECT 1 FROM webhook_announced w WHERE w.audit_id = a.id)
                 ORDER BY a.id LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| Ok((r.text("domain")?, audit_from_row(r)?)))
                .collect::<Result<Vec<_>>>()
        })
    }

    /// Moves the cursor up to the newest audit row written before `settled` below which every
    /// row is announced, and forgets the announcements under it. An id PostgreSQL handed out
    /// but had not committed when a later one was read is not skipped: it was written (`at`)
    /// after `settled`, or is unannounced and stops the cursor.
    pub async fn advance_announced(&self, settled: DateTime<Utc>) -> Result<()> {
        execute!(
            self,
            "UPDATE webhook_cursor SET audit_id = COALESCE((
                 SELECT MAX(a.id) FROM audit_log a
                 WHERE a.id > webhook_cursor.audit_id AND a.at < $1
                   AND a.id < COALESCE((
                       SELECT MIN(u.id) FROM audit_log u
                       WHERE u.id > webhook_cursor.audit_id
                         AND NOT EXISTS (SELECT 1 FROM webhook_announced w WHERE w.audit_id = u.id)
                   ), 9223372036854775807)
             ), audit_id)
             WHERE id = 1",
            Stamp(settled)
        );
        execute!(
            self,
            "DELETE FROM webhook_announced
             WHERE audit_id <= (SELECT audit_id FROM webhook_cursor WHERE id = 1)"
        );
        Ok(())
    }

    /// Failed jobs whose failure was not announced yet.
    pub async fn failures_to_announce(&self, limit: i64) -> Result<Vec<JobRow>> {
        fetch_all!(
            self,
            job_from_row,
            "SELECT j.*, d.name AS domain FROM training_jobs j JOIN domains d ON d.id = j.domain_id
             WHERE j.status = 'failed' AND NOT j.failure_announced ORDER BY j.id LIMIT $1",
            limit
        )
    }

    /// Writes `deliveries` to the outbox and records the audit rows and jobs they announce,
    /// all in one transaction. `false` (and nothing written) if another process announced
    /// any of them first: it wrote these events.
    pub async fn enqueue_deliveries(
        &self,
        audit: &[i64],
        jobs: &[JobId],
        deliveries: &[NewDelivery],
    ) -> Result<bool> {
        let now = Stamp::now();
        let res: std::result::Result<bool, sqlx::Error> = with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            for id in audit {
                let fresh = sqlx::query(
                    "INSERT INTO webhook_announced (audit_id) VALUES ($1) ON CONFLICT (audit_id) DO NOTHING",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if fresh == 0 {
                    return Ok(false);
                }
            }
            for job in jobs {
                let marked = sqlx::query(
                    "UPDATE training_jobs SET failure_announced = $1 WHERE id = $2 AND NOT failure_announced",
                )
                .bind(true)
                .bind(job.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if marked == 0 {
                    return Ok(false);
                }
            }
            for d in deliveries {
                sqlx::query(
                    "INSERT INTO webhook_deliveries (event_id, event_type, url, body, created_at, next_attempt_at)
                     VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (event_id, url) DO NOTHING",
                )
                .bind(&d.event_id)
                .bind(&d.event_type)
                .bind(&d.url)
                .bind(&d.body)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        }.await);
        res.map_err(DbError::from)
    }

    /// Deliveries due by `now` that have been tried fewer than `max_attempts` times, oldest
    /// first.
    pub async fn due_deliveries(
        &self,
        now: DateTime<Utc>,
        max_attempts: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>> {
        fetch_all!(
            self,
            delivery_from_row,
            "SELECT * FROM webhook_deliveries
             WHERE delivered_at IS NULL AND next_attempt_at <= $1 AND attempts < $2
             ORDER BY id LIMIT $3",
            Stamp(now),
            max_attempts,
            limit
        )
    }

    pub async fn delivery_done(&self, id: i64) -> Result<()> {
        execute!(
            self,
            "UPDATE webhook_deliveries SET delivered_at = $1, attempts = attempts + 1, last_error = NULL
             WHERE id = $2",
            Stamp::now(),
            id
        );
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    pub async fn delivery_failed(
        &self,
        id: i64,
        retry_at: DateTime<Utc>,
        error: &str,
    ) -> Result<()> {
        execute!(
            self,
            "UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2
             WHERE id = $3",
            Stamp(retry_at),
            error,
            id
        );
        Ok(())
    }

    pub async fn outbox_counts(&self) -> Result<OutboxCounts> {
        with_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT (SELECT COUNT(*) FROM webhook_deliveries WHERE delivered_at IS NULL) AS pending,
                        (SELECT COUNT(*) FROM webhook_deliveries WHERE delivered_at IS NOT NULL) AS delivered",
            )
            .fetch_one(pool)
            .await?;
            Ok(OutboxCounts { pending: row.int("pending")?, delivered: row.int("delivered")? })
        })
    }
}

fn delivery_from_row(r: &impl Cells) -> Result<Delivery> {
    Ok(Delivery {
        id: r.int("id")?,
        event_id: r.text("event_id")?,
        event_type: r.text("event_type")?,
        url: r.text("url")?,
        body: r.text("body")?,
        attempts: r.int("attempts")?,
    })
}
