use serde::{Deserialize, Serialize};

/// A fine-tuning job's id (a UUIDv7 string, so ids sort by creation time).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl JobId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
    pub fn parse(raw: &str) -> Option<Self> {
        uuid::Uuid::parse_str(raw).ok().map(|u| Self(u.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// OpenAI-style job states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Why a job was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Enough new corrections arrived.
    NewCorrections,
    /// Someone asked for it.
    Manual,
    /// The oldest untrained correction waited longer than the policy allows.
    Staleness,
    /// The domain's cron schedule fired.
    Schedule,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::NewCorrections => "new_corrections",
            Trigger::Manual => "manual",
            Trigger::Staleness => "staleness",
            Trigger::Schedule => "schedule",
        }
    }
}

/// A published version of a domain's adapter: `v1`, `v2`, … in order of creation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct VersionId(pub String);

impl VersionId {
    pub fn nth(n: u64) -> Self {
        Self(format!("v{n}"))
    }
    pub fn parse(raw: &str) -> Option<Self> {
        let n = raw.strip_prefix('v')?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| Self(raw.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VersionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a version stands. The gate sets the first three; a steward moves `pending_approval` to
/// `promoted` or `rejected`. `promoted` means production has pointed at it (or is being moved
/// there), which is what a rollback may return to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionStatus {
    Promoted,
    HeldBack,
    PendingApproval,
    Rejected,
}

impl VersionStatus {
    pub const ALL: [VersionStatus; 4] = [
        VersionStatus::Promoted,
        VersionStatus::HeldBack,
        VersionStatus::PendingApproval,
        VersionStatus::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Promoted => "promoted",
            VersionStatus::HeldBack => "held_back",
            VersionStatus::PendingApproval => "pending_approval",
            VersionStatus::Rejected => "rejected",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// The payload of every pipeline stage on the queue: the job row holds the rest, so a payload
/// never goes stale and a queue rename never strands data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTask {
    pub job_id: JobId,
}
