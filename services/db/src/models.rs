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
    /// The number of the domain's current policy: 1 at registration, one more per change.
    pub policy_version: i64,
}

/// One version of a domain's policy, kept whole: who set it, when and why.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyVersion {
    pub version: i64,
    pub policy: flywheel_domain::Policy,
    pub training: flywheel_domain::Training,
    /// The label set of this version (absent on versions recorded before labels could change).
    pub labels: Option<Vec<String>>,
    pub serving: flywheel_domain::ServingSpec,
    pub sources: Vec<flywheel_domain::SourceSpec>,
    pub actor: String,
    pub reason: String,
    pub at: DateTime<Utc>,
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

/// A correction as a steward reviews it.
#[derive(Debug, Clone, Serialize)]
pub struct StoredCorrection {
    pub id: i64,
    pub client_id: Option<String>,
    pub input: String,
    pub model_output: Option<String>,
    pub expected: String,
    pub source: Source,
    pub teacher: Option<String>,
    pub split: Split,
    pub created_at: DateTime<Utc>,
    /// When a steward removed it; it trains and evaluates nothing since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<DateTime<Utc>>,
}

/// The outcome of storing a batch: which rows are new, which were already there, and which
/// reused a client id that names other content.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct InsertOutcome {
    pub accepted: usize,
    /// Same content as a row stored earlier (under the same client id, or none): nothing new
    /// was written.
    pub duplicates: usize,
    /// Personal data redacted in the rows that were stored, by kind.
    pub redacted: flywheel_domain::PiiCounts,
    /// Rows not stored because their client id already names a correction with other
    /// content, in the order given.
    pub conflicts: Vec<IdConflict>,
    /// With a [`UnitAdvance`]: the unit had moved on from where this reader started (another
    /// worker read it), so nothing was stored.
    #[serde(skip)]
    pub unit_moved: bool,
}

impl InsertOutcome {
    /// What an all-or-nothing batch that conflicted reports: its conflicts, nothing stored.
    pub(crate) fn nothing_stored(self) -> Self {
        Self {
            conflicts: self.conflicts,
            ..Self::default()
        }
    }
}

/// A row whose `client_id` already names a different correction of its domain (stored
/// earlier, or earlier in the same batch).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IdConflict {
    /// The row's position in the slice given to the insert.
    pub index: usize,
    pub client_id: String,
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
    /// The job's overrides of its domain's training block, if it was started with any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<flywheel_domain::Training>,
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

/// A steward console session; the cookie's secret is stored only as its hash.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// The API token the session acts as; `None` when the server runs without auth.
    pub token_hash: Option<String>,
    /// Who signed in.
    pub name: String,
    /// The anti-forgery token every form of the session carries.
    pub csrf: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
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

/// A prediction as it is logged.
#[derive(Debug, Clone)]
pub struct NewPrediction {
    pub id: flywheel_domain::PredictionId,
    pub domain_id: i64,
    pub at: DateTime<Utc>,
    pub alias: String,
    pub version: Option<String>,
    /// Redacted under the domain's PII policy.
    pub input: String,
    pub output: String,
    pub model_output: Option<String>,
    pub confidence: Option<f64>,
    pub escalated: bool,
    pub answered_by: flywheel_domain::AnsweredBy,
    pub teacher_error: Option<String>,
    pub latency_ms: f64,
}

/// A logged prediction, with its domain's name.
#[derive(Debug, Clone)]
pub struct PredictionRow {
    pub domain: String,
    pub prediction: NewPrediction,
}

/// Counts over a domain's logged predictions since a moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServingWindow {
    pub since: DateTime<Utc>,
    pub predictions: i64,
    pub escalated: i64,
    pub answered_by_teacher: i64,
    /// Escalations the teacher did not answer (down, over budget, not a label).
    pub teacher_errors: i64,
    pub mean_confidence: Option<f64>,
}

/// One input a shadow alias's model also answered.
#[derive(Debug, Clone)]
pub struct NewShadowScore {
    pub domain_id: i64,
    pub at: DateTime<Utc>,
    pub alias: String,
    pub version: String,
    pub primary_version: String,
    pub agrees: bool,
}

/// How often a shadow version agreed with the live one since a moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowAgreement {
    pub alias: String,
    pub version: String,
    pub primary_version: String,
    pub scored: i64,
    pub agreed: i64,
}

/// What has been read of one file version, or of a table: where reading stands and what the
/// rows read so far became.
#[derive(Debug, Clone, Serialize)]
pub struct IngestUnit {
    #[serde(skip)]
    pub id: i64,
    pub source: String,
    /// The file's key under the prefix; empty for a table.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub unit: String,
    /// The file's ETag (or size and modification time).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    pub size: i64,
    /// `reading`, `done`, `quarantined` (unreadable, or no row of it valid) or `changed`
    /// (rewritten after it was read, left alone by the source's `on_change`).
    pub state: String,
    /// Lines or rows read of a file; the last cursor value read of a table.
    pub position: String,
    pub ingested: i64,
    pub duplicates: i64,
    pub rejected: i64,
    pub dropped_pii: i64,
    /// The first refusals, each with its line or row number.
    pub errors: serde_json::Value,
    pub first_seen: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A unit's move forward, committed with the rows read up to it: a compare-and-swap from
/// `from`, so two workers reading the same unit cannot both store what they read.
#[derive(Debug, Clone)]
pub struct UnitAdvance {
    pub unit_id: i64,
    pub from: String,
    pub to: String,
    /// Rows refused by validation (or for a client-id conflict, added here by the insert).
    pub rejected: i64,
    pub dropped_pii: i64,
    /// The unit's error list after this advance (the first few are kept).
    pub errors: serde_json::Value,
    /// `reading` while more may follow, else `done` or `quarantined`.
    pub state: &'static str,
}

/// When a source is polled, who polls it now, and how it last went.
#[derive(Debug, Clone, Serialize)]
pub struct SourceState {
    #[serde(skip)]
    pub domain_id: i64,
    pub source: String,
    pub next_poll_at: DateTime<Utc>,
    /// A worker holds the source until then.
    pub claimed_until: Option<DateTime<Utc>>,
    /// The token of the poll holding it.
    #[serde(skip)]
    pub claimed_by: Option<String>,
    pub polled_at: Option<DateTime<Utc>>,
    /// When a poll last found nothing left to read.
    pub caught_up_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}
