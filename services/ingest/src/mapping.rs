//! One record of a source (a JSON line, a CSV row, a Parquet row or a table row, each as a
//! JSON object) turned into a correction draft through the source's mapping. Validation,
//! redaction and the split happen after, in `CorrectionDraft::validate`, as for HTTP.

use flywheel_domain::{CorrectionDraft, Mapping, Source};
use serde_json::{Map, Value};

/// Why a record could not become a draft: its code (as the API would say it) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowError {
    pub code: &'static str,
    pub message: String,
}

impl RowError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The value at `path` in `record`: the key itself if the record has it (column names may
/// contain dots), else a dotted path into nested objects (`request.text`).
fn lookup<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = record.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(record, |v, key| v.get(key))
}

/// A field's text: strings as they are, numbers and booleans as written, objects and arrays
/// as compact JSON; null is absent.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The draft `record` makes under `mapping`. `provenance` joins the metadata as
/// `flywheel_source`, so a steward can find the file and line a stored row came from.
pub(crate) fn draft(
    record: &Value,
    mapping: &Mapping,
    provenance: Value,
) -> Result<CorrectionDraft, RowError> {
    if !record.is_object() {
        return Err(RowError::new(
            "malformed_json",
            "the record is not a JSON object",
        ));
    }
    let field = |path: &str| lookup(record, path).and_then(text);
    let required = |path: &str, what: &str| {
        field(path).ok_or_else(|| {
            RowError::new(
                "invalid_field",
                format!("`{path}` (the mapping's {what}) is missing or null"),
            )
        })
    };
    let input = required(&mapping.input, "input")?;
    let expected = required(&mapping.expected, "expected")?;
    let source = match mapping.source.as_deref().and_then(field) {
        None => None,
        Some(raw) => Some(Source::parse(raw.trim()).ok_or_else(|| {
            RowError::new(
                "invalid_field",
                format!(
                    "`{}` is `{raw}`; a source is `human` or `teacher`",
                    mapping.source.as_deref().unwrap_or_default()
                ),
            )
        })?),
    };
    let mut metadata = Map::new();
    for name in &mapping.metadata {
        if let Some(v) = lookup(record, name)
            && !v.is_null()
        {
            metadata.insert(name.clone(), v.clone());
        }
    }
    metadata.insert("flywheel_source".into(), provenance);
    Ok(CorrectionDraft {
        client_id: mapping.client_id.as_deref().and_then(field),
        input: Some(input),
        model_output: mapping.model_output.as_deref().and_then(field),
        expected: Some(expected),
        source,
        teacher: mapping.teacher.as_deref().and_then(field),
        metadata: Some(Value::Object(metadata)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping() -> Mapping {
        serde_json::from_value(json!({
            "input": "request.text", "expected": "label", "model_output": "prediction",
            "client_id": "id", "source": "who", "metadata": ["region", "ticket.priority"]
        }))
        .unwrap()
    }

    #[test]
    fn nested_paths_numbers_and_metadata() {
        let record = json!({
            "request": {"text": "card lost"}, "label": "lost_card", "prediction": 3, "id": 17,
            "who": "teacher", "region": "eu", "ticket": {"priority": 2}
        });
        let d = draft(&record, &mapping(), json!({"line": 4})).unwrap();
        assert_eq!(d.input.as_deref(), Some("card lost"));
        assert_eq!(d.model_output.as_deref(), Some("3"));
        assert_eq!(d.client_id.as_deref(), Some("17"));
        assert_eq!(d.source, Some(Source::Teacher));
        assert_eq!(
            d.metadata.unwrap(),
            json!({"region": "eu", "ticket.priority": 2, "flywheel_source": {"line": 4}})
        );
    }

    #[test]
    fn a_key_with_a_dot_wins_over_the_path() {
        let record = json!({"request.text": "flat", "request": {"text": "nested"}, "label": "x"});
        let d = draft(&record, &mapping(), Value::Null).unwrap();
        assert_eq!(d.input.as_deref(), Some("flat"));
    }

    #[test]
    fn what_is_missing_or_wrong_is_named() {
        let err = draft(&json!({"label": "x"}), &mapping(), Value::Null).unwrap_err();
        assert!(err.message.contains("`request.text`"), "{err:?}");
        let err = draft(
            &json!({"request": {"text": "a"}, "label": "x", "who": "robot"}),
            &mapping(),
            Value::Null,
        )
        .unwrap_err();
        assert!(err.message.contains("`robot`"), "{err:?}");
        let err = draft(&json!([1, 2]), &mapping(), Value::Null).unwrap_err();
        assert_eq!(err.code, "malformed_json");
    }
}
