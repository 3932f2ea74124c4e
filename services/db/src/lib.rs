//! Durable state of flywheel in SQL: domains, corrections, jobs and their events, versions,
//! tokens, the audit log and the prediction log, on SQLite (the embedded default) or PostgreSQL (to scale out).
//!
//! This crate owns the schema (through `migrations/sqlite` and `migrations/postgres`) and every
//! query. It knows nothing of HTTP or of the queue; callers get plain domain types back. Writes
//! that acknowledge client data are durable before they return: SQLite connections run
//! `synchronous = FULL`, PostgreSQL ones `synchronous_commit = on`.

pub mod backup;
mod models;
mod repo;
mod sql;

pub use models::{
    AuditEntry, CorrectionRow, DomainRow, IdConflict, IngestUnit, InsertOutcome, JobEvent, JobRow,
    NewPrediction, NewShadowScore, PolicyVersion, PredictionRow, ServingWindow, SessionRow,
    ShadowAgreement, SourceState, StoredCorrection, TokenRow, UnitAdvance, VersionRow,
};
pub use repo::{CorrectionFilter, Delivery, Edit, IngestTotals, NewDelivery, OutboxCounts};
pub use repo::{DatabaseUrl, Db, SQLITE_WRITER_CACHE_KIB};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("domain `{0}` already exists")]
    DomainExists(String),
    #[error("a live token is already named `{0}`")]
    TokenNameTaken(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
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
                // PostgreSQL: serialization failure, deadlock, too many connections, server
                // shutting down or starting up. SQLite says so in words.
                let code = d.code().unwrap_or_default();
                let message = d.message();
                matches!(&*code, "40001" | "40P01" | "53300" | "57P01" | "57P03")
                    || message.contains("locked")
                    || message.contains("busy")
            }),
            _ => false,
        }
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;
