//! The webhook outbox: what happened (audit rows past a cursor, failed jobs not yet
//! announced) is read here, turned into deliveries by `flywheel-notify`, and written back with
//! the cursor in one transaction; deliveries are then tried until a receiver takes them.

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
    /// Audit rows past the outbox cursor, oldest first, each with its domain's name; and the
    /// cursor they were read after.
    pub async fn audit_to_announce(&self, limit: i64) -> Result<(i64, Vec<(String, AuditEntry)>)> {
        with_pool!(self, pool => {
            let cursor: i64 = sqlx::query_scalar("SELECT audit_id FROM webhook_cursor WHERE id = 1")
                .fetch_one(pool)
                .await?;
            let rows = sqlx::query(
                "SELECT a.*, d.name AS domain FROM audit_log a JOIN domains d ON d.id = a.domain_id
                 WHERE a.id > $1 ORDER BY a.id LIMIT $2",
            )
            .bind(cursor)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            let entries = rows
                .iter()
                .map(|r| Ok((r.text("domain")?, audit_from_row(r)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok((cursor, entries))
        })
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

    /// Writes `deliveries` to the outbox, moves the audit cursor from `from` to `to` and marks
    /// `announced` jobs, all in one transaction. `false` (and nothing written) if another
    /// process moved the cursor first: it wrote these events.
    pub async fn enqueue_deliveries(
        &self,
        (from, to): (i64, i64),
        announced: &[JobId],
        deliveries: &[NewDelivery],
    ) -> Result<bool> {
        let now = Stamp::now();
        let res: std::result::Result<bool, sqlx::Error> = with_pool!(self, pool => async {
            let mut tx = pool.begin().await?;
            let moved = sqlx::query("UPDATE webhook_cursor SET audit_id = $1 WHERE id = 1 AND audit_id = $2")
                .bind(to)
                .bind(from)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if moved == 0 {
                return Ok(false);
            }
            for job in announced {
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
