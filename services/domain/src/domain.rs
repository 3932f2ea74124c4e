use serde::{Deserialize, Serialize};

use crate::Invalid;

/// A domain's name: lowercase ASCII letters, digits and dashes, starting with a letter, at most
/// 63 characters, so that it is safe in object-store paths, URLs and Kubernetes labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DomainName(String);

impl DomainName {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let ok_chars = raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        let starts_ok = raw.chars().next().is_some_and(|c| c.is_ascii_lowercase());
        if raw.is_empty() || raw.len() > 63 || !ok_chars || !starts_ok || raw.ends_with('-') {
            return Err(Invalid::field(
                "name",
                format!(
                    "`{raw}` is not a valid domain name: use 1-63 lowercase letters, digits or \
                     dashes, starting with a letter"
                ),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DomainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DomainName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// What a domain's model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Map an input to one of a fixed label set.
    Classification,
    /// Produce free text; corrections carry the text it should have produced.
    Generation,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Generation => "generation",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "classification" => Some(Task::Classification),
            "generation" => Some(Task::Generation),
            _ => None,
        }
    }
}

/// When to train and what a candidate must achieve to replace the champion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Train once this many corrections arrived since the last run.
    #[serde(default = "Policy::default_min_new")]
    pub min_new_corrections: u32,
    /// Share of corrections held out for evaluation, decided per input text.
    #[serde(default = "Policy::default_holdout")]
    pub holdout_fraction: f64,
    /// Floor on held-out accuracy for a candidate to be promoted.
    #[serde(default)]
    pub min_accuracy: f64,
    /// How much the candidate must beat the champion's held-out accuracy by (absolute).
    #[serde(default)]
    pub min_improvement: f64,
    /// The improvement must also be significant: the paired exact McNemar test's p-value must
    /// be below this.
    #[serde(default = "Policy::default_significance")]
    pub significance_level: f64,
    /// No label's recall may fall by more than this (absolute) against the production adapter,
    /// where the fall is real: the label has `min_label_support` holdout rows and the paired
    /// test on them passes `significance_level`.
    #[serde(default = "Policy::default_label_drop")]
    pub max_label_drop: f64,
    /// Holdout rows a label needs before its recall can hold a candidate back; on fewer, one
    /// row is many points and a drop says nothing.
    #[serde(default = "Policy::default_label_support")]
    pub min_label_support: u32,
    /// Ceiling on the candidate's expected calibration error (1 turns the rule off).
    #[serde(default = "Policy::default_one")]
    pub max_calibration_error: f64,
    /// Accuracy that answers kept by the small model must reach; sets the escalation threshold.
    #[serde(default = "Policy::default_target")]
    pub target_accuracy: f64,
    /// A candidate that passes waits for a data steward's approval before going live.
    #[serde(default)]
    pub require_approval: bool,
    /// Personal data in corrections: found and redacted before anything is stored.
    #[serde(default)]
    pub pii: crate::PiiPolicy,
    /// How corrections from a teacher model (`source: teacher`) count: distillation.
    #[serde(default)]
    pub teacher: TeacherPolicy,
    /// Train anyway once the oldest untrained correction is this old (seconds), however few
    /// arrived: a day by default, so rows below `min_new_corrections` are never stranded;
    /// `null` waits for `min_new_corrections` however long it takes.
    #[serde(default = "Policy::default_staleness")]
    pub max_staleness_seconds: Option<u32>,
    /// Train anyway, on whatever is new, once more than this share of the last hour's
    /// predictions (at least 50 of them) escalated: what the domain is asked has drifted from
    /// what its model knows. Unset (the default), escalations never start a run by themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_escalation_share: Option<f64>,
    /// Train on this cron schedule (UTC; 5 fields, or 6 with seconds) when anything is new.
    #[serde(default)]
    pub schedule: Option<String>,
    /// No automatic run starts until this long after the previous one ended (seconds).
    #[serde(default)]
    pub cooldown_seconds: u32,
    /// Hold back a tenth of the training rows, measure their loss every epoch, stop after two
    /// epochs without improvement and keep the best epoch's weights.
    #[serde(default)]
    pub early_stopping: bool,
    /// Where this domain's events are POSTed besides the deployment's `--webhook`s: versions
    /// awaiting approval, promoted, held back, rejected, rollbacks and failed jobs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<String>,
}

/// The most webhook URLs a domain's policy may name.
pub const MAX_WEBHOOKS: usize = 8;

/// Whether `url` can receive webhooks: an absolute `http://` or `https://` URL of sensible
/// length with a host and nothing a header or log line would choke on. The reason if not.
pub fn check_webhook_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    if url.len() > 2048 {
        return Err("must be at most 2,048 characters");
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Err("must name a host");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters");
    }
    Ok(())
}

/// How a domain uses corrections a larger model wrote (escalated queries it answered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherPolicy {
    /// Train and evaluate on teacher rows at all.
    #[serde(default = "TeacherPolicy::yes")]
    pub include: bool,
    /// Their weight in the training loss relative to a person's correction (1 = equal).
    #[serde(default = "TeacherPolicy::one")]
    pub weight: f64,
}

impl TeacherPolicy {
    fn yes() -> bool {
        true
    }
    fn one() -> f64 {
        1.0
    }
}

impl Default for TeacherPolicy {
    fn default() -> Self {
        Self {
            include: true,
            weight: 1.0,
        }
    }
}

impl Policy {
    fn default_min_new() -> u32 {
        100
    }
    fn default_holdout() -> f64 {
        0.2
    }
    fn default_significance() -> f64 {
        0.05
    }
    fn default_label_drop() -> f64 {
        0.10
    }
    fn default_staleness() -> Option<u32> {
        Some(86_400)
    }
    fn default_label_support() -> u32 {
        10
    }
    fn default_one() -> f64 {
        1.0
    }
    fn default_target() -> f64 {
        0.95
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.webhooks.len() > MAX_WEBHOOKS {
            return Err(Invalid::field(
                "policy.webhooks",
                format!("at most {MAX_WEBHOOKS} URLs"),
            ));
        }
        for (i, url) in self.webhooks.iter().enumerate() {
            check_webhook_url(url)
                .map_err(|why| Invalid::field(format!("policy.webhooks[{i}]"), why))?;
        }
        if self.min_new_corrections == 0 {
            return Err(Invalid::field(
                "policy.min_new_corrections",
                "must be at least 1",
            ));
        }
        if !(0.05..=0.5).contains(&self.holdout_fraction) {
            return Err(Invalid::field(
                "policy.holdout_fraction",
                "must be between 0.05 and 0.5",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_accuracy) {
            return Err(Invalid::field(
                "policy.min_accuracy",
                "must be between 0 and 1",
            ));
        }
        if !(self.significance_level > 0.0 && self.significance_level <= 1.0) {
            return Err(Invalid::field(
                "policy.significance_level",
                "must be in (0, 1]; 1 turns the test off",
            ));
        }
        for (field, v) in [
            ("policy.max_label_drop", self.max_label_drop),
            ("policy.max_calibration_error", self.max_calibration_error),
            ("policy.target_accuracy", self.target_accuracy),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Invalid::field(field, "must be between 0 and 1"));
            }
        }
        if !(-1.0..=1.0).contains(&self.min_improvement) {
            return Err(Invalid::field(
                "policy.min_improvement",
                "must be between -1 and 1",
            ));
        }
        if self.min_label_support == 0 {
            return Err(Invalid::field(
                "policy.min_label_support",
                "must be at least 1",
            ));
        }
        if let Some(raw) = &self.schedule {
            crate::schedule::parse_schedule(raw)?;
        }
        if self
            .max_escalation_share
            .is_some_and(|s| !(s > 0.0 && s < 1.0))
        {
            return Err(Invalid::field(
                "policy.max_escalation_share",
                "must be between 0 and 1 (exclusive), or left out",
            ));
        }
        if self.max_staleness_seconds == Some(0) {
            return Err(Invalid::field(
                "policy.max_staleness_seconds",
                "must be at least 1 (or left out)",
            ));
        }
        if !(self.teacher.weight > 0.0 && self.teacher.weight <= 10.0) {
            return Err(Invalid::field(
                "policy.teacher.weight",
                "must be in (0, 10]; to leave teacher rows out, set include: false",
            ));
        }
        Ok(())
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_new_corrections: Self::default_min_new(),
            holdout_fraction: Self::default_holdout(),
            min_accuracy: 0.0,
            min_improvement: 0.0,
            significance_level: Self::default_significance(),
            max_label_drop: Self::default_label_drop(),
            min_label_support: Self::default_label_support(),
            max_calibration_error: Self::default_one(),
            target_accuracy: Self::default_target(),
            require_approval: false,
            pii: Default::default(),
            teacher: Default::default(),
            max_staleness_seconds: Self::default_staleness(),
            max_escalation_share: None,
            schedule: None,
            cooldown_seconds: 0,
            early_stopping: false,
            webhooks: Vec::new(),
        }
    }
}

/// A registered domain: one department's model and the rules for improving it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    pub name: DomainName,
    pub task: Task,
    /// Path of a Hugging Face model directory the workers can read.
    pub base_model: String,
    /// The label set, for classification; empty for generation.
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    /// Hyperparameters, each a value or `"auto"`; the whole block may be `"auto"`.
    #[serde(default)]
    pub training: crate::Training,
    /// The label meaning "none of the above", if the domain has one; its recall is reported on
    /// its own, since missing it sends a query down a wrong path instead of escalating it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_of_scope_label: Option<String>,
    /// The teacher escalated queries go to, and what is kept of predictions.
    #[serde(default)]
    pub serving: crate::ServingSpec,
    /// Where the ingestion worker collects corrections from besides HTTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<crate::SourceSpec>,
}

impl DomainSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.base_model.trim().is_empty() {
            return Err(Invalid::field("base_model", "must not be empty"));
        }
        match self.task {
            Task::Classification => {
                if self.labels.len() < 2 {
                    return Err(Invalid::field(
                        "labels",
                        "a classification domain needs at least two labels",
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                for (i, l) in self.labels.iter().enumerate() {
                    if l.trim().is_empty() {
                        return Err(Invalid::field(format!("labels[{i}]"), "must not be empty"));
                    }
                    if !seen.insert(l) {
                        return Err(Invalid::field(
                            format!("labels[{i}]"),
                            format!("`{l}` appears twice"),
                        ));
                    }
                }
            }
            Task::Generation => {
                if self.out_of_scope_label.is_some() {
                    return Err(Invalid::field(
                        "out_of_scope_label",
                        "only a classification domain has labels",
                    ));
                }
                if !self.labels.is_empty() {
                    return Err(Invalid::field(
                        "labels",
                        "a generation domain has no label set",
                    ));
                }
            }
        }
        if let Some(l) = &self.out_of_scope_label
            && self.task == Task::Classification
            && self.label_index(l).is_none()
        {
            return Err(Invalid::field(
                "out_of_scope_label",
                format!("`{l}` is not one of the labels"),
            ));
        }
        self.policy.validate()?;
        self.serving.validate()?;
        crate::source::validate_sources(&self.sources)?;
        self.training.validate()
    }

    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names() {
        assert!(DomainName::parse("banking").is_ok());
        assert!(DomainName::parse("hr-2").is_ok());
        for bad in ["", "Banking", "2fa", "a_b", "a-", &"a".repeat(64), "a/b"] {
            assert!(DomainName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn policy_bounds() {
        let mut p = Policy::default();
        assert!(p.validate().is_ok());
        p.holdout_fraction = 0.9;
        assert_eq!(
            p.validate().unwrap_err().field,
            "policy.holdout_fraction".to_string()
        );
    }
}
