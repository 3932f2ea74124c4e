//! The append-only audit log (the database refuses updates and deletes).

use flywheel_domain::VersionId;
use sqlx::types::Json;

use super::{Db, execute, fetch_all, from_row};
use crate::Result;
use crate::models::AuditEntry;
use crate::sql::Stamp;

impl Db {
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
        execute!(
            self,
            "INSERT INTO audit_log (domain_id, at, actor, action, version, reason, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            domain_id,
            Stamp::now(),
            actor,
            action,
            version.map(VersionId::as_str),
            reason,
            data.map(Json)
        );
        Ok(())
    }

    pub async fn audit_log(&self, domain_id: i64) -> Result<Vec<AuditEntry>> {
        fetch_all!(
            self,
            audit_from_row,
            "SELECT * FROM audit_log WHERE domain_id = $1 ORDER BY id",
            domain_id
        )
    }
}

from_row!(pub(super) fn audit_from_row -> AuditEntry {
    id: int, at: time, actor: text, action: text, version: opt_text, reason: text, data: opt_json,
});
