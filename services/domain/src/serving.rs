//! How a domain is served: the teacher it escalates to, and what is kept of its predictions.

use serde::{Deserialize, Serialize};

use crate::Invalid;

/// The alias serving fleets follow, and the one `/predict` answers with unless asked otherwise.
pub const PRODUCTION: &str = "production";

/// The prefix every teacher API key variable has.
pub const TEACHER_KEY_PREFIX: &str = "FLYWHEEL_TEACHER_";

/// A domain's `serving` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingSpec {
    /// The large model asked when the small one is unsure (or there is none yet); its answers
    /// become `source: teacher` corrections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherEndpoint>,
    /// Share of predictions logged (0 to 1). Only a logged prediction can receive feedback;
    /// those the teacher answered are always logged, since their answer is training data.
    #[serde(default = "ServingSpec::one")]
    pub log_sample_rate: f64,
    /// Logged predictions older than this many days are deleted.
    #[serde(default = "ServingSpec::thirty")]
    pub log_retention_days: u32,
    /// Share of requests that name no alias answered by the `canary` alias, while it is set.
    #[serde(default)]
    pub canary_share: f64,
    /// An alias whose model also answers every request, behind the answer given (never to
    /// the caller), so its agreement with the live one is measured online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            teacher: None,
            log_sample_rate: 1.0,
            log_retention_days: 30,
            canary_share: 0.0,
            shadow: None,
        }
    }
}

/// An OpenAI-compatible chat-completions endpoint: what enterprises run their large model
/// behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherEndpoint {
    /// The API's base URL, as OpenAI clients take it (`…/v1`); `/chat/completions` is added.
    pub url: String,
    /// The `model` field sent.
    pub model: String,
    /// The environment variable holding the API key (its name starts `FLYWHEEL_TEACHER_`), sent
    /// as a bearer token; the key itself is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// The system prompt. For classification the label list is appended, with the instruction
    /// to answer with one of them exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// One call's deadline, retries included.
    #[serde(default = "TeacherEndpoint::ten_seconds")]
    pub timeout_ms: u32,
    /// At most this many calls in any hour; past it, the small model answers alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls_per_hour: Option<u32>,
}

impl ServingSpec {
    fn one() -> f64 {
        1.0
    }
    fn thirty() -> u32 {
        30
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if !(0.0..=1.0).contains(&self.log_sample_rate) {
            return Err(Invalid::field(
                "serving.log_sample_rate",
                "must be between 0 and 1",
            ));
        }
        if self.log_retention_days == 0 {
            return Err(Invalid::field(
                "serving.log_retention_days",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.canary_share) {
            return Err(Invalid::field(
                "serving.canary_share",
                "must be between 0 and 1",
            ));
        }
        if let Some(alias) = &self.shadow
            && (!is_alias_name(alias) || alias == PRODUCTION)
        {
            return Err(Invalid::field(
                "serving.shadow",
                "must name an alias other than production (1 to 64 letters, digits, - or _)",
            ));
        }
        if let Some(t) = &self.teacher {
            t.validate()?;
        }
        Ok(())
    }
}

impl TeacherEndpoint {
    fn ten_seconds() -> u32 {
        10_000
    }

    fn validate(&self) -> Result<(), Invalid> {
        let url = self.url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2_000 {
            return Err(Invalid::field(
                "serving.teacher.url",
                "must be an http:// or https:// URL (the API's base, like https://host/v1)",
            ));
        }
        if self.model.trim().is_empty() || self.model.len() > 200 {
            return Err(Invalid::field(
                "serving.teacher.model",
                "must name the model (1 to 200 characters)",
            ));
        }
        // Whoever may set a domain's teacher must not be able to send any of the server's
        // secrets (its database URL, its cloud keys, the admin token) to a URL of their
        // choosing: only variables made for teachers can be named.
        if let Some(var) = &self.api_key_env
            && (!var.starts_with(TEACHER_KEY_PREFIX)
                || var.len() == TEACHER_KEY_PREFIX.len()
                || !var
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        {
            return Err(Invalid::field(
                "serving.teacher.api_key_env",
                format!(
                    "must name an environment variable starting {TEACHER_KEY_PREFIX} (capitals, \
                     digits, _), like {TEACHER_KEY_PREFIX}API_KEY: the server sends no other \
                     variable to a teacher"
                ),
            ));
        }
        if self.prompt.as_ref().is_some_and(|p| p.len() > 8_000) {
            return Err(Invalid::field(
                "serving.teacher.prompt",
                "must be at most 8,000 bytes",
            ));
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            return Err(Invalid::field(
                "serving.teacher.timeout_ms",
                "must be between 100 and 120000",
            ));
        }
        if self.max_calls_per_hour == Some(0) {
            return Err(Invalid::field(
                "serving.teacher.max_calls_per_hour",
                "must be at least 1 (leave it out for no limit, or remove the teacher)",
            ));
        }
        Ok(())
    }
}

/// An alias names a file in the registry: short, and of characters every store accepts.
pub fn is_alias_name(alias: &str) -> bool {
    (1..=64).contains(&alias.len())
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

crate::job::uuid_id! {
    /// A logged prediction's id.
    pub struct PredictionId;
}

/// Who answered a prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnsweredBy {
    Model,
    Teacher,
}

impl AnsweredBy {
    pub fn as_str(self) -> &'static str {
        match self {
            AnsweredBy::Model => "model",
            AnsweredBy::Teacher => "teacher",
        }
    }
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "model" => Some(AnsweredBy::Model),
            "teacher" => Some(AnsweredBy::Teacher),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serving_block_is_checked_field_by_field() {
        let ok: ServingSpec = serde_json::from_value(serde_json::json!({
            "teacher": {"url": "http://teacher:8000/v1", "model": "big", "max_calls_per_hour": 100}
        }))
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.log_sample_rate, 1.0);
        for (bad, field) in [
            (
                serde_json::json!({"log_sample_rate": 1.5}),
                "serving.log_sample_rate",
            ),
            (
                serde_json::json!({"canary_share": -0.1}),
                "serving.canary_share",
            ),
            (
                serde_json::json!({"shadow": "production"}),
                "serving.shadow",
            ),
            (serde_json::json!({"shadow": "a/b"}), "serving.shadow"),
            (
                serde_json::json!({"teacher": {"url": "ftp://x", "model": "m"}}),
                "serving.teacher.url",
            ),
            (
                serde_json::json!({"teacher": {"url": "http://x", "model": "m", "api_key_env": "DATABASE_URL"}}),
                "serving.teacher.api_key_env",
            ),
            (
                serde_json::json!({"teacher": {"url": "http://x", "model": "m", "max_calls_per_hour": 0}}),
                "serving.teacher.max_calls_per_hour",
            ),
        ] {
            let spec: ServingSpec = serde_json::from_value(bad).unwrap();
            assert_eq!(spec.validate().unwrap_err().field, field);
        }
        assert!(
            serde_json::from_value::<ServingSpec>(serde_json::json!({"teachr": {}})).is_err(),
            "unknown fields are refused"
        );
    }
}
