//! The vocabulary of flywheel: newtypes parsed at the edge, domain policies, corrections,
//! job states and the payloads the queue carries.
//!
//! This crate owns validation rules and the deterministic train/holdout split. It does no IO:
//! no database, no HTTP, no files, no clock beyond what callers pass in.

pub mod auth;
mod base_model;
mod correction;
mod domain;
mod job;
pub mod pii;
pub mod schedule;
mod serving;
mod source;
mod training;

pub use auth::Role;
pub use base_model::{ModelFiles, check_base_model};
pub use correction::{
    Conflict, Correction, CorrectionDraft, Source, Split, check_text, conflicts, content_hash,
    normalize_text, outranked_by_people, validate_expected,
};
pub use domain::{DomainName, DomainSpec, Policy, Task, check_webhook_url};
pub use job::{IngestTask, JobId, JobStatus, StageTask, Trigger, VersionId, VersionStatus};
pub use pii::{PiiAction, PiiCounts, PiiKind, PiiPolicy};
pub use schedule::{TriggerState, due};
pub use serving::{
    AnsweredBy, PRODUCTION, PredictionId, ServingSpec, TeacherEndpoint, is_alias_name,
};
pub use source::{FileFormat, MAX_TABLE_BATCH, Mapping, OnChange, SourceSpec};
pub use training::{
    Auto, AutoSearch, DataFacts, Lora, MAX_LORA_RANK, MAX_TRIALS, Resolved, Training,
};

/// A field-level validation failure. `field` names the offending JSON field so that the API can
/// tell the caller exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
    pub kind: InvalidKind,
}

/// Why a value was refused; the API maps each kind to a stable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidKind {
    /// Missing, empty, malformed or out-of-range value.
    Field,
    /// A classification label that the domain does not declare.
    UnknownLabel,
    /// Text longer than the configured limit.
    TooLong,
}

impl Invalid {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            kind: InvalidKind::Field,
        }
    }

    /// Prefixes the field path, e.g. `input` becomes `corrections[3].input`.
    pub fn at(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}
