//! A job's progress events.

use flywheel_domain::JobId;
use sqlx::types::Json;

use super::{Db, execute, fetch_all, from_row};
use crate::Result;
use crate::models::JobEvent;
use crate::sql::Stamp;

impl Db {
    pub async fn add_event(
        &self,
        job: &JobId,
        kind: &str,
        message: &str,
        data: Option<&serde_json::Value>,
    ) -> Result<()> {
        execute!(
            self,
            "INSERT INTO job_events (job_id, at, kind, message, data) VALUES ($1, $2, $3, $4, $5)",
            job.as_str(),
            Stamp::now(),
            kind,
            message,
            data.map(Json)
        );
        Ok(())
    }

    pub async fn events(&self, job: &JobId, after: i64) -> Result<Vec<JobEvent>> {
        fetch_all!(
            self,
            event_from_row,
            "SELECT * FROM job_events WHERE job_id = $1 AND id > $2 ORDER BY id",
            job.as_str(),
            after
        )
    }
}

from_row!(fn event_from_row -> JobEvent { id: int, at: time, kind: text, message: text, data: opt_json });
