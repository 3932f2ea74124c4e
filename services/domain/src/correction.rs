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

/// Longest teacher model name accepted.
pub const MAX_TEACHER_CHARS: usize = 256;
/// Longest `client_id` accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;
/// Largest `metadata` object accepted, serialized as compact JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Deepest nesting of `metadata` accepted (the object itself is depth 1).
pub const MAX_METADATA_DEPTH: usize = 8;

impl CorrectionDraft {
    /// Checks the draft against the domain it is sent to. `max_text_chars` bounds `input`,
    /// `expected` and `model_output` each. Every text that is stored passes the domain's PII
    /// policy first — `metadata` keys and values at any depth and `teacher` are redacted, a
    /// `client_id` carrying personal data is refused (redacting an idempotency key would merge
    /// unrelated rows) — so the counts, and a `drop` policy's decision, see all of them.
    pub fn validate(self, spec: &DomainSpec, max_text_chars: usize) -> Result<Correction, Invalid> {
        let text = |field: &str, v: Option<String>| -> Result<String, Invalid> {
            let v = v.ok_or_else(|| Invalid::field(field, "is required"))?;
            check_text(field, &v, max_text_chars)?;
            Ok(v)
        };
        let input = text("input", self.input)?;
        let expected = text("expected", self.expected)?;
        if let Some(output) = &self.model_output {
            bounded("model_output", output, max_text_chars)?;
        }
        if let Some(teacher) = &self.teacher {
            if teacher.trim().is_empty() {
                return Err(Invalid::field("teacher", "must not be empty"));
            }
            bounded("teacher", teacher, MAX_TEACHER_CHARS)?;
        }
        let metadata = self.metadata.unwrap_or(serde_json::Value::Null);
        if !(metadata.is_object() || metadata.is_null()) {
            return Err(Invalid::field("metadata", "must be a JSON object"));
        }
        check_metadata(&metadata)?;
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
        let teacher = self
            .teacher
            .map(|t| crate::pii::redact(&t, pii, &mut redacted));
        let metadata = redact_json(metadata, pii, &mut redacted);
        if spec.task == Task::Classification && spec.label_index(&expected).is_none() {
            return Err(Invalid {
                field: "expected".into(),
                message: format!("`{expected}` is not a label of domain `{}`", spec.name),
                kind: InvalidKind::UnknownLabel,
            });
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > MAX_CLIENT_ID_BYTES {
                return Err(Invalid::field("client_id", "must be 1-128 characters"));
            }
            no_nul("client_id", id)?;
            if crate::pii::redact(id, pii, &mut crate::PiiCounts::new()) != *id {
                return Err(Invalid::field(
                    "client_id",
                    "contains personal data (an email, card or ID number, phone): use an opaque id",
                ));
            }
        }
        let source = self.source.unwrap_or(Source::Human);
        if source == Source::Human && teacher.is_some() {
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
            teacher,
            metadata,
            redacted,
        })
    }
}

/// A steward's new `expected` for a stored correction, checked and redacted as ingestion
/// checks it: a label of the domain, or (generation) text within `max_text_chars` whose
/// personal data the domain's policy redacts — or refuses, under `drop`, since the row would
/// not have been stored with it.
pub fn validate_expected(
    spec: &DomainSpec,
    expected: &str,
    max_text_chars: usize,
) -> Result<String, Invalid> {
    if expected.trim().is_empty() {
        return Err(Invalid::field("expected", "must not be empty"));
    }
    bounded("expected", expected, max_text_chars)?;
    match spec.task {
        Task::Classification => {
            if spec.label_index(expected).is_none() {
                return Err(Invalid {
                    field: "expected".into(),
                    message: format!("`{expected}` is not a label of domain `{}`", spec.name),
                    kind: InvalidKind::UnknownLabel,
                });
            }
            Ok(expected.to_owned())
        }
        Task::Generation => {
            let mut found = crate::PiiCounts::new();
            let redacted = crate::pii::redact(expected, &spec.policy.pii, &mut found);
            if spec.policy.pii.action == crate::PiiAction::Drop && !found.is_empty() {
                return Err(Invalid::field(
                    "expected",
                    "holds personal data, and this domain drops rows that do",
                ));
            }
            Ok(redacted)
        }
    }
}

/// Groups of stored corrections with the same normalized input and more than one `expected`:
/// the data contradicts itself there, so those rows train and evaluate nothing until a
/// steward relabels or removes one side. `rows` are `(id, input, expected)`.
pub fn conflicts<'a>(rows: impl IntoIterator<Item = (i64, &'a str, &'a str)>) -> Vec<Conflict> {
    let mut groups: std::collections::BTreeMap<String, Vec<(i64, &'a str)>> = Default::default();
    for (id, input, expected) in rows {
        groups
            .entry(normalize_text(input))
            .or_default()
            .push((id, expected));
    }
    groups
        .into_iter()
        .filter(|(_, rows)| rows.iter().any(|(_, e)| *e != rows[0].1))
        .map(|(input, rows)| {
            let mut labels: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
            for (id, expected) in rows {
                labels.entry(expected.to_owned()).or_default().push(id);
            }
            Conflict { input, labels }
        })
        .collect()
}

/// The teacher rows a person overruled: those whose normalized input a person's correction
/// also answers. A person's answer is the gold signal, so these rows neither train nor count
/// as contradicting it (feedback on an escalated prediction would otherwise void both). `rows`
/// are `(id, input, source)`.
pub fn outranked_by_people<'a>(
    rows: impl IntoIterator<Item = (i64, &'a str, Source)> + Clone,
) -> std::collections::HashSet<i64> {
    let answered: std::collections::HashSet<String> = rows
        .clone()
        .into_iter()
        .filter(|(_, _, source)| *source == Source::Human)
        .map(|(_, input, _)| normalize_text(input))
        .collect();
    rows.into_iter()
        .filter(|(_, input, source)| {
            *source == Source::Teacher && answered.contains(&normalize_text(input))
        })
        .map(|(id, ..)| id)
        .collect()
}

/// One contradiction: a normalized input and, per `expected`, the ids that say it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub input: String,
    pub labels: std::collections::BTreeMap<String, Vec<i64>>,
}

impl Conflict {
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.labels.values().flatten().copied()
    }
}

/// A text a model is asked about or trained on (a correction's input and answer, a query to
/// serve): not blank, at most `max_chars` characters, no NUL.
pub fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), Invalid> {
    if value.trim().is_empty() {
        return Err(Invalid::field(field, "must not be empty"));
    }
    bounded(field, value, max_chars)
}

/// `value` is at most `max_chars` characters and holds no NUL: PostgreSQL's text type cannot
/// store one, and no correction needs it.
fn bounded(field: &str, value: &str, max_chars: usize) -> Result<(), Invalid> {
    if value.chars().count() > max_chars {
        return Err(Invalid {
            field: field.into(),
            message: format!("is longer than {max_chars} characters"),
            kind: InvalidKind::TooLong,
        });
    }
    no_nul(field, value)
}

fn no_nul(field: &str, value: &str) -> Result<(), Invalid> {
    if value.contains('\0') {
        return Err(Invalid::field(
            field,
            "must not contain NUL (\\u0000) characters",
        ));
    }
    Ok(())
}

/// `metadata` within its size and depth limits, with no NUL in any key or string.
fn check_metadata(metadata: &serde_json::Value) -> Result<(), Invalid> {
    let size = serde_json::to_vec(metadata).map_or(usize::MAX, |v| v.len());
    if size > MAX_METADATA_BYTES {
        return Err(Invalid {
            field: "metadata".into(),
            message: format!("is larger than {MAX_METADATA_BYTES} bytes as JSON"),
            kind: InvalidKind::TooLong,
        });
    }
    fn walk(value: &serde_json::Value, path: &str, depth: usize) -> Result<(), Invalid> {
        use serde_json::Value;
        if depth > MAX_METADATA_DEPTH {
            return Err(Invalid::field(
                path,
                format!("nests deeper than {MAX_METADATA_DEPTH} levels"),
            ));
        }
        match value {
            Value::String(s) => no_nul(path, s),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| walk(v, &format!("{path}[{i}]"), depth + 1)),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                no_nul(path, k)?;
                walk(v, &format!("{path}.{k}"), depth + 1)
            }),
            _ => Ok(()),
        }
    }
    walk(metadata, "metadata", 0)
}

/// `value` with every string and object key redacted. Keys that redact alike keep apart as
/// `[EMAIL]`, `[EMAIL]#2`, … so no value is lost to a collision.
fn redact_json(
    value: serde_json::Value,
    policy: &crate::PiiPolicy,
    counts: &mut crate::PiiCounts,
) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(crate::pii::redact(&s, policy, counts)),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| redact_json(v, policy, counts))
                .collect(),
        ),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, v) in map {
                let key = crate::pii::redact(&key, policy, counts);
                let mut unique = key.clone();
                let mut n = 1;
                while out.contains_key(&unique) {
                    n += 1;
                    unique = format!("{key}#{n}");
                }
                out.insert(unique, redact_json(v, policy, counts));
            }
            Value::Object(out)
        }
        other => other,
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
            training: Default::default(),
            out_of_scope_label: None,
            serving: Default::default(),
            sources: Vec::new(),
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

    fn draft(input: &str) -> CorrectionDraft {
        CorrectionDraft {
            input: Some(input.into()),
            expected: Some("a".into()),
            ..Default::default()
        }
    }

    /// Personal data anywhere in what is stored is redacted and counted: metadata keys and
    /// values at any depth, the teacher's name; a client id carrying it is refused.
    #[test]
    fn every_stored_text_passes_the_redactor() {
        let d = CorrectionDraft {
            source: Some(Source::Teacher),
            teacher: Some("gpt for ann@example.com".into()),
            metadata: Some(serde_json::json!({
                "customer": {"email": "bob@example.com", "cards": ["4242 4242 4242 4242"]},
                "ann@example.com": "x",
                "carl@example.com": "y",
                "ssn 123-45-6789": 1,
            })),
            ..draft("plain text")
        };
        let c = d.validate(&spec(), 100).unwrap();
        let stored = serde_json::to_string(&c).unwrap();
        for secret in ["ann@", "bob@", "carl@", "4242 4242", "123-45"] {
            assert!(!stored.contains(secret), "{secret} stored: {stored}");
        }
        assert_eq!(c.teacher.as_deref(), Some("gpt for [EMAIL]"));
        assert_eq!(c.metadata["customer"]["cards"][0], "[CARD]");
        // Two keys that redact alike both survive.
        assert_eq!(
            (
                c.metadata["[EMAIL]"].as_str(),
                c.metadata["[EMAIL]#2"].as_str()
            ),
            (Some("x"), Some("y"))
        );
        let total: u32 = c.redacted.values().sum();
        assert_eq!(total, 6, "{:?}", c.redacted);

        let d = CorrectionDraft {
            client_id: Some("ann@example.com".into()),
            ..draft("plain text")
        };
        assert_eq!(d.validate(&spec(), 100).unwrap_err().field, "client_id");
    }

    /// A `drop` policy sees personal data that sits only in metadata.
    #[test]
    fn drop_counts_personal_data_in_metadata() {
        let mut spec = spec();
        spec.policy.pii.action = crate::PiiAction::Drop;
        let d = CorrectionDraft {
            metadata: Some(serde_json::json!({"note": "call +44 20 7946 0958"})),
            ..draft("plain text")
        };
        assert!(!d.validate(&spec, 100).unwrap().redacted.is_empty());
    }

    #[test]
    fn nul_is_refused_in_every_text_field() {
        let nul = "a\0b";
        let cases: [(&str, CorrectionDraft); 6] = [
            ("input", draft(nul)),
            (
                "expected",
                CorrectionDraft {
                    expected: Some(nul.into()),
                    ..draft("x")
                },
            ),
            (
                "model_output",
                CorrectionDraft {
                    model_output: Some(nul.into()),
                    ..draft("x")
                },
            ),
            (
                "teacher",
                CorrectionDraft {
                    source: Some(Source::Teacher),
                    teacher: Some(nul.into()),
                    ..draft("x")
                },
            ),
            (
                "client_id",
                CorrectionDraft {
                    client_id: Some(nul.into()),
                    ..draft("x")
                },
            ),
            (
                "metadata.k",
                CorrectionDraft {
                    metadata: Some(serde_json::json!({"k": nul})),
                    ..draft("x")
                },
            ),
        ];
        for (field, d) in cases {
            let e = d.validate(&spec(), 100).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.kind),
                (field, InvalidKind::Field),
                "{e}"
            );
        }
    }

    #[test]
    fn every_text_has_a_limit() {
        let long = CorrectionDraft {
            model_output: Some("x".repeat(101)),
            ..draft("x")
        };
        assert_eq!(
            long.validate(&spec(), 100).unwrap_err().kind,
            InvalidKind::TooLong
        );
        let teacher = CorrectionDraft {
            source: Some(Source::Teacher),
            teacher: Some("t".repeat(MAX_TEACHER_CHARS + 1)),
            ..draft("x")
        };
        assert_eq!(teacher.validate(&spec(), 100).unwrap_err().field, "teacher");
        let big = CorrectionDraft {
            metadata: Some(serde_json::json!({"k": "v".repeat(MAX_METADATA_BYTES)})),
            ..draft("x")
        };
        assert_eq!(
            big.validate(&spec(), 100).unwrap_err().kind,
            InvalidKind::TooLong
        );
        let mut deep = serde_json::json!(1);
        for _ in 0..MAX_METADATA_DEPTH + 1 {
            deep = serde_json::json!({ "k": deep });
        }
        let deep = CorrectionDraft {
            metadata: Some(deep),
            ..draft("x")
        };
        assert!(
            deep.validate(&spec(), 100)
                .unwrap_err()
                .message
                .contains("deeper")
        );
    }

    #[test]
    fn contradictions_are_found_by_normalized_input() {
        let rows = [
            (1, "Where is my card?", "card_arrival"),
            (2, "where is my  card?", "card_arrival"),
            (3, "WHERE IS MY CARD?", "lost_card"),
            (4, "pin blocked", "pin_blocked"),
            (5, "pin blocked", "pin_blocked"),
        ];
        let found = conflicts(rows);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].labels["card_arrival"], vec![1, 2]);
        assert_eq!(found[0].ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn a_persons_answer_overrules_the_teachers_on_the_same_input() {
        let rows = [
            (1, "Where is my card?", Source::Teacher),
            (2, "where is my card? ", Source::Human),
            (3, "I lost my card", Source::Teacher),
            (4, "where is my card?", Source::Teacher),
        ];
        let out = outranked_by_people(rows.iter().map(|(id, i, s)| (*id, *i, *s)));
        assert_eq!(out, [1, 4].into_iter().collect());
    }
}
