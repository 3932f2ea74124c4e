//! Durable state of flywheel in SQL: domains, corrections, jobs and their events, versions.
//!
//! This crate owns the schema (through `migrations/`) and every query. It knows nothing of HTTP
//! or of the queue; callers get plain domain types back. Writes that acknowledge client data go
//! through a pool whose connections run `synchronous = FULL`, so an acknowledged correction
//! survives power loss.

mod models;
mod repo;

pub use models::{
    AuditEntry, CorrectionRow, DomainRow, InsertOutcome, JobEvent, JobRow, TokenRow, VersionRow,
};
pub use repo::Db;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("domain `{0}` already exists")]
    DomainExists(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl DbError {
    /// Whether trying again later may succeed: the database was unreachable, saturated or
    /// locked, not wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlx(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed,
            ) => true,
            DbError::Sqlx(e) => e.as_database_error().is_some_and(|d| {
                let message = d.message();
                message.contains("locked") || message.contains("busy")
            }),
            _ => false,
        }
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;
