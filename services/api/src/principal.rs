//! Who is calling: the token's principal (or the anonymous admin without auth), which handlers
//! read to record the actor of what they do and to filter lists by scope.

use flywheel_domain::Role;

use crate::{ApiError, ErrorCode};

/// Whether requests must carry a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every route but `/healthz` and `/metrics` needs a valid token.
    Required,
    /// No tokens: every caller acts as an anonymous admin and names itself in `by` fields.
    /// For a laptop and the demo, never for a shared deployment.
    Off,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's name; recorded as the actor of what this caller does.
    pub name: String,
    pub role: Role,
    pub domains: Vec<String>,
    /// False with [`AuthMode::Off`].
    pub authenticated: bool,
    /// The sha256 of the caller's token (never the secret), so a long request can check
    /// that it was not revoked meanwhile; `None` without auth.
    pub token_hash: Option<String>,
}

impl Principal {
    pub(crate) fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
            domains: Vec::new(),
            authenticated: false,
            token_hash: None,
        }
    }

    /// Whether this caller may see `domain` at all.
    pub fn sees(&self, domain: &str) -> bool {
        self.role == Role::Admin || self.domains.iter().any(|d| d == domain)
    }

    /// The actor to record: the token's name; without auth, the `by` the caller gave.
    pub fn actor(&self, by: Option<String>) -> Result<String, ApiError> {
        match (self.authenticated, by) {
            (true, Some(by)) if by != self.name => Err(ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "by: you are authenticated as `{}`; leave `by` out or make it match",
                    self.name
                ),
            )),
            (true, _) => Ok(self.name.clone()),
            (false, Some(by)) if !by.trim().is_empty() => {
                if by.chars().count() > 128 || by.contains('\0') {
                    return Err(ApiError::new(
                        ErrorCode::InvalidField,
                        "by: at most 128 characters, no NUL",
                    ));
                }
                Ok(by)
            }
            (false, _) => Err(ApiError::new(
                ErrorCode::InvalidField,
                "by: must name who decides (or authenticate with a token)",
            )),
        }
    }
}
