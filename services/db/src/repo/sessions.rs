//! Steward console sessions, stored as the sha256 of the cookie's secret.

use chrono::{DateTime, Utc};

use super::{Db, execute, fetch_optional, from_row};
use crate::Result;
use crate::models::SessionRow;
use crate::sql::Stamp;

impl Db {
    /// Opens a session that lasts until `expires_at`; `token_hash` is the API token it acts as
    /// (`None` without auth).
    pub async fn open_session(
        &self,
        session_hash: &str,
        token_hash: Option<&str>,
        name: &str,
        csrf: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        execute!(
            self,
            "INSERT INTO console_sessions (session_hash, token_hash, name, csrf, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            session_hash,
            token_hash,
            name,
            csrf,
            Stamp::now(),
            Stamp(expires_at)
        );
        Ok(())
    }

    /// The session with this hash, ended or not; the caller judges expiry.
    pub async fn session(&self, session_hash: &str) -> Result<Option<SessionRow>> {
        fetch_optional!(
            self,
            session_from_row,
            "SELECT * FROM console_sessions WHERE session_hash = $1",
            session_hash
        )
    }

    /// Ends a session (sign-out); `false` if it had already ended.
    pub async fn end_session(&self, session_hash: &str) -> Result<bool> {
        let ended = execute!(
            self,
            "UPDATE console_sessions SET ended_at = $1
             WHERE session_hash = $2 AND ended_at IS NULL",
            Stamp::now(),
            session_hash
        );
        Ok(ended == 1)
    }

    /// Forgets sessions that expired before `before`: they can no longer be used, and the
    /// table should not grow with every sign-in.
    pub async fn purge_sessions(&self, before: DateTime<Utc>) -> Result<u64> {
        Ok(execute!(
            self,
            "DELETE FROM console_sessions WHERE expires_at < $1",
            Stamp(before)
        ))
    }
}

from_row!(fn session_from_row -> SessionRow {
    token_hash: opt_text, name: text, csrf: text, created_at: time, expires_at: time,
    ended_at: opt_time,
});
