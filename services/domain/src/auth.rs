//! Who may do what: roles, and the tokens that carry them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A token's role. Scoping to domains applies to `department` and `steward`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The platform team: domains, tokens, everything.
    Admin,
    /// A department: sends corrections to its domains and reads their jobs, versions, reports.
    Department,
    /// A data steward: reads reports, approves, rejects and rolls back for its domains.
    Steward,
    /// A production application: asks its domains for predictions and sends feedback on
    /// them, nothing else.
    Serving,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Department => "department",
            Role::Steward => "steward",
            Role::Serving => "serving",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "admin" => Some(Role::Admin),
            "department" => Some(Role::Department),
            "steward" => Some(Role::Steward),
            "serving" => Some(Role::Serving),
            _ => None,
        }
    }
}

/// A fresh API token: `fw_` and 64 hex digits (244 random bits from two v4 UUIDs).
pub fn new_token() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("fw_{a}{b}")
}

/// What is stored of a token. Tokens are long random strings, so one round of sha256 is as
/// good as a slow KDF here and keeps every request's lookup a single indexed read.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
