use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{DomainSpec, Invalid, InvalidKind, Task};

/// Who said what the model should have said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A person reviewed the output.
    Human,
    /// A larger model the query was escalated to.
    Teacher,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Human => "human",
            Source::Teacher => "teacher",
        }
    }
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "human" => Some(Source::Human),
            "teacher" => Some(Source::Teacher),
            _ => None,
        }
    }
}

/// Which side of the train/holdout wall a row lives on, for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Holdout,
}

impl Split {
    /// Assigns by a hash of the normalized input alone, so a row never moves between splits and
    /// two corrections of the same input (say, with different labels) land on the same side:
    /// the holdout never evaluates an input the model was trained on.
    pub fn assign(input: &str, holdout_fraction: f64) -> Split {
        let digest = Sha256::digest(normalize_text(input).as_bytes());
        let bucket = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        let unit = bucket as f64 / u64::MAX as f64;
        if unit < holdout_fraction {
            Split::Holdout
        } else {
            Split::Train
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Holdout => "holdout",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "train" => Some(Split::Train),
            "holdout" => Some(Split::Holdout),
            _ => None,
        }
    }
}

/// Lowercase, trimmed, inner whitespace collapsed: the form used for hashing and for the
/// holdout-leak check, never for what is stored or trained on.
pub fn normalize_text(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Identity of a correction's content within a domain: the same input corrected to the same
/// answer twice is one correction.
pub fn content_hash(input: &str, expected: &str) -> String {
    let mut h = Sha256::new();
    h.update(normalize_text(input).as_bytes());
    h.update([0u8]);
    h.update(expected.trim().as_bytes());
    hex::encode(h.finalize())
}

/// A correction as a client sends it, before validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrectionDraft {
    /// The client's own id for this correction; a retry with the same id is a no-op.
    #[serde(default)]
    pub client_id: Option<String>,
    pub input: Option<String>,
    /// What the model said.
    #[serde(default)]
    pub model_output: Option<String>,
    /// What it should have said: the label for classification, the text for generation.
    pub expected: Option<String>,
    #[serde(default)]
    pub source: Option<Source>,
    /// Name of the teacher model, for `source: teacher`.
    #[serde(default)]
    pub teacher: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// A validated correction, ready to store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Correction {
    pub client_id: Option<String>,
    pub input: String,
    pub model_output: Option<String>,
    pub expected: String,
    pub source: Source,
    pub teacher: Option<String>,
    pub metadata: serde_json::Value,
    pub content_hash: String,
    pub split: Split,
    /// Personal data found (and redacted) in this correction, by kind.
    pub redacted: crate::PiiCounts,
}

impl CorrectionDraft {
    /// Checks the draft against the domain it is sent to. `max_text_chars` bounds each text.
    pub fn validate(self, spec: &DomainSpec, max_text_chars: usize) -> Result<Correction, Invalid> {
        let text = |field: &str, v: Option<String>| -> Result<String, Invalid> {
            let v = v.ok_or_else(|| Invalid::field(field, "is required"))?;
            if v.trim().is_empty() {
                return Err(Invalid::field(field, "must not be empty"));
            }
            if v.chars().count() > max_text_chars {
                return Err(Invalid {
                    field: field.into(),
                    message: format!("is longer than {max_text_chars} characters"),
                    kind: InvalidKind::TooLong,
                });
            }
            Ok(v)
        };
        let input = text("input", self.input)?;
        let expected = text("expected", self.expected)?;
        // Redacted before anything else sees the text: hashes, splits and storage all work
        // on what may be kept.
        let pii = &spec.policy.pii;
        let mut redacted = crate::PiiCounts::new();
        let input = crate::pii::redact(&input, pii, &mut redacted);
        let model_output = self
            .model_output
            .map(|o| crate::pii::redact(&o, pii, &mut redacted));
        let expected = match spec.task {
            Task::Generation => crate::pii::redact(&expected, pii, &mut redacted),
            Task::Classification => expected,
        };
        if spec.task == Task::Classification && spec.label_index(&expected).is_none() {
            return Err(Invalid {
                field: "expected".into(),
                message: format!("`{expected}` is not a label of domain `{}`", spec.name),
                kind: InvalidKind::UnknownLabel,
            });
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 128)
        {
            return Err(Invalid::field("client_id", "must be 1-128 characters"));
        }
        let metadata = self.metadata.unwrap_or(serde_json::Value::Null);
        if !(metadata.is_object() || metadata.is_null()) {
            return Err(Invalid::field("metadata", "must be a JSON object"));
        }
        let source = self.source.unwrap_or(Source::Human);
        if source == Source::Human && self.teacher.is_some() {
            return Err(Invalid::field(
                "teacher",
                "is only allowed with source `teacher`",
            ));
        }
        Ok(Correction {
            content_hash: content_hash(&input, &expected),
            split: Split::assign(&input, spec.policy.holdout_fraction),
            client_id: self.client_id,
            input,
            model_output,
            expected,
            source,
            teacher: self.teacher,
            metadata,
            redacted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DomainName, Policy};

    fn spec() -> DomainSpec {
        DomainSpec {
            name: DomainName::parse("banking").unwrap(),
            task: Task::Classification,
            base_model: "m".into(),
            labels: vec!["a".into(), "b".into()],
            policy: Policy::default(),
            out_of_scope_label: None,
        }
    }

    #[test]
    fn split_is_deterministic_and_ignores_case_and_spacing() {
        for i in 0..200 {
            let s = format!("Where is my card {i}?");
            assert_eq!(Split::assign(&s, 0.2), Split::assign(&s, 0.2));
            assert_eq!(
                Split::assign(&s, 0.2),
                Split::assign(&format!("  {}  ", s.to_uppercase()), 0.2)
            );
        }
    }

    #[test]
    fn split_fraction_is_close_to_policy() {
        let n = 20_000;
        let held = (0..n)
            .filter(|i| Split::assign(&format!("row {i}"), 0.2) == Split::Holdout)
            .count();
        let frac = held as f64 / n as f64;
        assert!((0.19..0.21).contains(&frac), "holdout fraction {frac}");
    }

    #[test]
    fn validation_names_the_field() {
        let d = CorrectionDraft {
            input: Some("hi".into()),
            expected: Some("c".into()),
            ..Default::default()
        };
        let e = d.validate(&spec(), 100).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.kind),
            ("expected", InvalidKind::UnknownLabel)
        );
        let d = CorrectionDraft {
            input: Some("   ".into()),
            expected: Some("a".into()),
            ..Default::default()
        };
        assert_eq!(d.validate(&spec(), 100).unwrap_err().field, "input");
        let d = CorrectionDraft {
            input: Some("x".repeat(101)),
            expected: Some("a".into()),
            ..Default::default()
        };
        assert_eq!(
            d.validate(&spec(), 100).unwrap_err().kind,
            InvalidKind::TooLong
        );
    }

    #[test]
    fn content_hash_ignores_input_formatting() {
        assert_eq!(
            content_hash("Hi  there", "a"),
            content_hash("hi there ", "a")
        );
        assert_ne!(content_hash("hi there", "a"), content_hash("hi there", "b"));
    }
}
