use chrono::{DateTime, Utc};
use flywheel_domain::{DomainSpec, JobId, JobStatus, Source, Split, VersionId, VersionStatus};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct DomainRow {
    #[serde(skip)]
    pub id: i64,
    #[serde(flatten)]
    pub spec: DomainSpec,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CorrectionRow {
    pub id: i64,
    pub client_id: Option<String>,
    pub input: String,
    pub model_output: Option<String>,
    pub expected: String,
    pub source: Source,
    pub split: Split,
}

/// The outcome of storing a batch: which rows are new and which were already there.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct InsertOutcome {
    pub accepted: usize,
    /// Same content, or same client id, as a row stored earlier: nothing new was written.
    pub duplicates: usize,
    /// Personal data redacted in the rows that were stored, by kind.
    pub redacted: flywheel_domain::PiiCounts,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub id: JobId,
    pub domain: String,
    pub kind: String,
    pub status: JobStatus,
    pub stage: String,
    pub trigger: String,
    pub snapshot_max_id: i64,
    pub version: Option<VersionId>,
    pub decision: Option<serde_json::Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl JobRow {
    /// Seconds since the job was created: its wall time, once it ends.
    pub fn age_seconds(&self) -> f64 {
        (Utc::now() - self.created_at).as_seconds_f64().max(0.0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionRow {
    pub version: VersionId,
    pub job_id: JobId,
    pub status: VersionStatus,
    pub metrics: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// An API token, without its secret.
#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    pub id: i64,
    pub name: String,
    pub role: flywheel_domain::Role,
    pub domains: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub version: Option<String>,
    pub reason: String,
    pub data: Option<serde_json::Value>,
}
