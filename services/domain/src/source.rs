//! Where a domain's corrections are collected from besides HTTP: files under an object-store
//! prefix, or a PostgreSQL table read by an increasing cursor column. The spec says where and
//! how to read them; `flywheel-ingest` does the reading.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Invalid;

/// Sources a domain may have.
pub const MAX_SOURCES: usize = 16;
/// Rows of a table a poll takes at most in one transaction.
pub const MAX_TABLE_BATCH: usize = 10_000;

/// One place a domain's corrections come from. Exactly one of `files` and `table`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Names the source in listings, metrics and derived client ids: lowercase letters,
    /// digits and `-`.
    pub name: String,
    /// Files under a prefix: `s3://bucket/prefix/`, `gs://…`, `az://…`, `file:///dir` or an
    /// absolute directory path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<String>,
    /// How the files are written; by default each file's extension says (`.jsonl`/`.ndjson`,
    /// `.csv`, `.parquet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
    /// A PostgreSQL table or view (`schema.table`), read in the order of `cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The increasing column rows are read by (an id or a timestamp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// The table's database: a `postgres://` URL without a password…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    /// …or the name of the ingest worker's environment variable holding the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_env: Option<String>,
    /// Which field (a JSON path like `request.text`, a CSV header or a column) holds what.
    pub mapping: Mapping,
    /// Seconds between polls.
    #[serde(default = "default_interval")]
    pub interval_seconds: u64,
    /// What a file whose content changed after it was read becomes.
    #[serde(default)]
    pub on_change: OnChange,
    /// object_store options for the prefix (`aws_endpoint`, `aws_region`, `aws_allow_http`,
    /// …). Credentials are not accepted here: the worker reads them from its environment
    /// (`AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_KEY`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

fn default_interval() -> u64 {
    60
}

/// Field names in the source for each part of a correction. `input` and `expected` are
/// required; `metadata` copies the named fields into the correction's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub input: String,
    pub expected: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// A field holding `human` or `teacher`; without it every row is `human`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<String>,
}

impl Mapping {
    /// Every source field the mapping reads, with the correction field it fills.
    pub fn fields(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![("input", self.input.as_str()), ("expected", &self.expected)];
        for (to, from) in [
            ("model_output", &self.model_output),
            ("client_id", &self.client_id),
            ("source", &self.source),
            ("teacher", &self.teacher),
        ] {
            if let Some(from) = from {
                out.push((to, from));
            }
        }
        out.extend(self.metadata.iter().map(|m| ("metadata", m.as_str())));
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    Jsonl,
    Csv,
    Parquet,
}

impl FileFormat {
    /// The format a file's name says it has.
    pub fn of_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") || lower.ends_with(".json") {
            Some(Self::Jsonl)
        } else if lower.ends_with(".csv") {
            Some(Self::Csv)
        } else if lower.ends_with(".parquet") {
            Some(Self::Parquet)
        } else {
            None
        }
    }
}

/// A file read before whose size or ETag has since changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnChange {
    /// Listed as changed and left alone: a log shipper rewrites nothing it has closed, so a
    /// change is worth a look, not a silent re-read.
    #[default]
    Skip,
    /// Read again as a new file; rows already stored count as duplicates.
    Reread,
}

/// Option keys that hold credentials, refused in a spec that every steward can read.
const SECRET_WORDS: [&str; 7] = [
    "secret",
    "password",
    "token",
    "access_key",
    "account_key",
    "sas",
    "credential",
];

impl SourceSpec {
    /// What a file of this source is named under (its unit's name is this, `/`, its key): the
    /// `files` URL without a trailing `/`, a `file://` URL and a path to the same directory
    /// alike, so rewriting one as the other reads nothing again.
    pub fn files_prefix(&self) -> Option<&str> {
        let url = self.files.as_deref()?;
        Some(
            url.strip_prefix("file://")
                .unwrap_or(url)
                .trim_end_matches('/'),
        )
    }

    /// Checks one source; `at` is its path in the spec (`sources[2]`).
    pub fn validate(&self, at: &str) -> Result<(), Invalid> {
        let field = |f: &str, why: String| Invalid::field(format!("{at}.{f}"), why);
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(field(
                "name",
                "1 to 64 lowercase letters, digits and `-`".into(),
            ));
        }
        if !(5..=86_400).contains(&self.interval_seconds) {
            return Err(field(
                "interval_seconds",
                "between 5 seconds and a day".into(),
            ));
        }
        for (to, from) in self.mapping.fields() {
            if from.trim().is_empty() || from.len() > 256 {
                return Err(field(
                    &format!("mapping.{to}"),
                    "a field name of 1 to 256 characters".into(),
                ));
            }
        }
        match (&self.files, &self.table) {
            (Some(url), None) => self.validate_files(url, &field),
            (None, Some(table)) => self.validate_table(table, &field),
            _ => Err(field(
                "files",
                "give exactly one of `files` (an object-store prefix or directory) and `table` \
                 (a PostgreSQL table)"
                    .into(),
            )),
        }
    }

    fn validate_files(
        &self,
        url: &str,
        field: &impl Fn(&str, String) -> Invalid,
    ) -> Result<(), Invalid> {
        let scheme_ok = match url.split_once("://") {
            Some((scheme, rest)) => {
                ["s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "file"].contains(&scheme)
                    && !rest.is_empty()
            }
            None => url.starts_with('/'),
        };
        if !scheme_ok {
            return Err(field(
                "files",
                "an s3://, gs://, az:// or file:// URL, or an absolute directory path".into(),
            ));
        }
        let authority = url.split_once("://").map_or("", |(_, rest)| rest);
        if authority.split('/').next().unwrap_or("").contains('@') {
            return Err(field(
                "files",
                "credentials are not kept in a domain spec (every steward can read it): name \
                 the bucket alone and set them in the ingest worker's environment"
                    .into(),
            ));
        }
        for extra in [
            ("table", self.table.is_some()),
            ("cursor", self.cursor.is_some()),
            ("connection", self.connection.is_some()),
            ("connection_env", self.connection_env.is_some()),
        ] {
            if extra.1 {
                return Err(field(extra.0, "only a `table` source has one".into()));
            }
        }
        for key in self.options.keys() {
            let lower = key.to_ascii_lowercase();
            if SECRET_WORDS.iter().any(|w| lower.contains(w)) {
                return Err(field(
                    &format!("options.{key}"),
                    "credentials are not kept in a domain spec (every steward can read it): \
                     set them in the ingest worker's environment (AWS_SECRET_ACCESS_KEY, \
                     AZURE_STORAGE_ACCOUNT_KEY, GOOGLE_SERVICE_ACCOUNT, …)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_table(
        &self,
        table: &str,
        field: &impl Fn(&str, String) -> Invalid,
    ) -> Result<(), Invalid> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !table.split('.').all(ident) || table.split('.').count() > 2 {
            return Err(field(
                "table",
                "a table or view name, optionally `schema.table`, of letters, digits and `_`"
                    .into(),
            ));
        }
        match &self.cursor {
            Some(c) if ident(c) => {}
            _ => {
                return Err(field(
                    "cursor",
                    "the increasing column rows are read by (an id or a timestamp)".into(),
                ));
            }
        }
        for (to, from) in self.mapping.fields() {
            if !ident(from) {
                return Err(field(
                    &format!("mapping.{to}"),
                    format!("`{from}` is not a column name"),
                ));
            }
        }
        match (&self.connection, &self.connection_env) {
            (Some(url), None) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(field("connection", "a postgres:// URL".into()));
                }
                let authority = url.split("://").nth(1).unwrap_or("");
                let userinfo = authority.split('/').next().unwrap_or("");
                if userinfo.contains('@') && userinfo.split('@').next().unwrap_or("").contains(':')
                    || url.contains("password=")
                {
                    return Err(field(
                        "connection",
                        "a password is not kept in a domain spec (every steward can read it): \
                         put the URL in the ingest worker's environment and name the variable \
                         in `connection_env`"
                            .into(),
                    ));
                }
            }
            (None, Some(var)) => {
                if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(field(
                        "connection_env",
                        "an environment variable name".into(),
                    ));
                }
            }
            _ => {
                return Err(field(
                    "connection",
                    "give exactly one of `connection` (a URL without a password) and \
                     `connection_env` (the variable holding the URL)"
                        .into(),
                ));
            }
        }
        if self.format.is_some() || !self.options.is_empty() {
            return Err(field(
                "format",
                "only a `files` source has a format or options".into(),
            ));
        }
        Ok(())
    }
}

/// Checks a domain's source list: each source, and names unique.
pub fn validate_sources(sources: &[SourceSpec]) -> Result<(), Invalid> {
    if sources.len() > MAX_SOURCES {
        return Err(Invalid::field(
            "sources",
            format!("at most {MAX_SOURCES} sources"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, s) in sources.iter().enumerate() {
        s.validate(&format!("sources[{i}]"))?;
        if !seen.insert(&s.name) {
            return Err(Invalid::field(
                format!("sources[{i}].name"),
                format!("`{}` names two sources", s.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<SourceSpec, String> {
        let s: SourceSpec = serde_json::from_value(json).map_err(|e| e.to_string())?;
        s.validate("sources[0]").map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn a_files_source_and_a_table_source() {
        let files = spec(serde_json::json!({
            "name": "logs", "files": "s3://bucket/support/",
            "mapping": {"input": "request.text", "expected": "label"},
            "options": {"aws_endpoint": "http://minio:9000"}
        }))
        .unwrap();
        assert_eq!(
            (files.interval_seconds, files.on_change),
            (60, OnChange::Skip)
        );
        spec(serde_json::json!({
            "name": "tickets", "table": "public.tickets", "cursor": "id",
            "connection_env": "TICKETS_URL",
            "mapping": {"input": "body", "expected": "queue", "metadata": ["priority"]}
        }))
        .unwrap();
    }

    #[test]
    fn what_is_refused_names_the_field() {
        let cases = [
            (
                serde_json::json!({"name": "x", "mapping": {"input": "a", "expected": "b"}}),
                "sources[0].files",
            ),
            (
                serde_json::json!({"name": "x", "files": "/d", "options": {"aws_secret_access_key": "k"},
                    "mapping": {"input": "a", "expected": "b"}}),
                "sources[0].options.aws_secret_access_key",
            ),
            (
                serde_json::json!({"name": "x", "table": "t", "cursor": "id",
                    "connection": "postgres://app:hunter2@db/app",
                    "mapping": {"input": "a", "expected": "b"}}),
                "sources[0].connection",
            ),
            (
                serde_json::json!({"name": "x", "table": "t; drop table x", "cursor": "id",
                    "connection_env": "U", "mapping": {"input": "a", "expected": "b"}}),
                "sources[0].table",
            ),
            (
                serde_json::json!({"name": "x", "table": "t", "cursor": "id", "connection_env": "U",
                    "mapping": {"input": "a\"; --", "expected": "b"}}),
                "sources[0].mapping.input",
            ),
            (
                serde_json::json!({"name": "X", "files": "/d", "mapping": {"input": "a", "expected": "b"}}),
                "sources[0].name",
            ),
            (
                serde_json::json!({"name": "x", "files": "relative/dir", "mapping": {"input": "a", "expected": "b"}}),
                "sources[0].files",
            ),
            (
                serde_json::json!({"name": "x", "files": "s3://AKIA:secret@bucket/p/", "mapping": {"input": "a", "expected": "b"}}),
                "sources[0].files",
            ),
        ];
        for (json, field) in cases {
            let err = spec(json.clone()).unwrap_err();
            assert!(err.starts_with(&format!("{field}:")), "{json}: {err}");
        }
    }

    #[test]
    fn a_file_url_and_its_path_name_files_alike() {
        let source = |files: &str| {
            spec(serde_json::json!({"name": "x", "files": files,
                "mapping": {"input": "a", "expected": "b"}}))
            .unwrap()
        };
        assert_eq!(
            source("file:///srv/logs/").files_prefix(),
            Some("/srv/logs")
        );
        assert_eq!(source("/srv/logs").files_prefix(), Some("/srv/logs"));
        assert_eq!(source("s3://b/p/").files_prefix(), Some("s3://b/p"));
    }

    #[test]
    fn formats_come_from_names() {
        assert_eq!(FileFormat::of_name("a/b.JSONL"), Some(FileFormat::Jsonl));
        assert_eq!(FileFormat::of_name("x.parquet"), Some(FileFormat::Parquet));
        assert_eq!(FileFormat::of_name("x.csv"), Some(FileFormat::Csv));
        assert_eq!(FileFormat::of_name("x.gz"), None);
    }
}
