use serde::{Deserialize, Serialize};

/// Declares an id that is a UUIDv7 string (so ids sort by creation time): `generate`, `parse`
/// (any UUID spelling, stored in one), `as_str` and `Display`.
macro_rules! uuid_id {
    ($(#[$meta:meta])* pub struct $name:ident;) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
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

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
pub(crate) use uuid_id;

uuid_id! {
    /// A fine-tuning job's id.
    pub struct JobId;
}

/// Declares an enum whose variants are stored and sent as text: each variant beside its text,
/// from which the serde names, `ALL`, `as_str` and `parse` all come.
macro_rules! text_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant,)*
        }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            pub fn parse(raw: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|s| s.as_str() == raw)
            }
        }
    };
}

text_enum! {
    /// OpenAI-style job states.
    pub enum JobStatus {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobStatus {
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
    /// Too many of the last hour's predictions escalated.
    Drift,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::NewCorrections => "new_corrections",
            Trigger::Manual => "manual",
            Trigger::Staleness => "staleness",
            Trigger::Schedule => "schedule",
            Trigger::Drift => "drift",
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
    /// `v` and a number that fits a `u64`; anything longer is no version (a 300-digit id
    /// once reached the registry as an over-long file name).
    pub fn parse(raw: &str) -> Option<Self> {
        let n = raw.strip_prefix('v')?;
        let digits = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
        (digits && n.parse::<u64>().is_ok()).then(|| Self(raw.to_owned()))
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

text_enum! {
    /// Where a version stands. The gate sets the first three; a steward moves
    /// `pending_approval` to `promoted` or `rejected`. `promoted` means production has pointed
    /// at it (or an approval is moving it there), which is what a rollback may return to.
    pub enum VersionStatus {
        Promoted = "promoted",
        HeldBack = "held_back",
        PendingApproval = "pending_approval",
        Rejected = "rejected",
    }
}

/// The payload of every pipeline stage on the queue: the job row holds the rest, so a payload
/// never goes stale and a queue rename never strands data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTask {
    pub job_id: JobId,
}

/// The payload of an ingestion poll: one source of one domain, which the scheduler claimed
/// before pushing it. The domain's spec holds the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestTask {
    pub domain: String,
    pub source: String,
    /// The claim this poll holds: it works only while the source is claimed by it.
    pub claim: String,
}
