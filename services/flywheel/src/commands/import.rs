//! `flywheel import`: streams a JSONL or CSV file to a domain as one NDJSON upload and reports
//! what became of it, refusals by the file's own line numbers.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde_json::{Map, Value};

use super::{cell, print_json, say};
use crate::client::{Remote, segment};

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The domain to import into.
    pub domain: String,
    /// `.jsonl` of correction objects ({input, expected, client_id?, …}), or `.csv` with a
    /// header naming `input` (or `text`) and `expected` (or `label`, `category`) columns, and
    /// optionally `client_id`, `model_output`, `source`, `teacher`.
    pub file: PathBuf,
}

/// Bytes per read of a JSONL file: the upload streams, the file is never held whole.
const READ_CHUNK: usize = 256 * 1024;
/// CSV records per piece of the upload.
const CSV_CHUNK: usize = 500;
/// Refusals printed; the rest are counted.
const SHOWN_REFUSALS: usize = 20;

pub async fn run(remote: &Remote, args: ImportArgs) -> anyhow::Result<()> {
    let ImportArgs { domain, file } = args;
    let shown = file.display().to_string();
    let (body, lines) = if is_csv(&file) {
        csv_upload(&file)?
    } else {
        let reader = File::open(&file).with_context(|| format!("opening {shown}"))?;
        (jsonl_upload(reader), None)
    };
    let path = format!("/v1/domains/{}/corrections", segment("domain", &domain)?);
    let request = remote
        .request(Method::POST, &path)
        .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
        .body(body);
    let answer: Value = remote
        .send(request)
        .await?
        .json()
        .await
        .context("reading the server's answer")?;
    if remote.json {
        print_json(&answer)?;
    } else {
        say!("{shown} → `{domain}`: {}", summary(&answer));
    }
    let rejected = answer["rejected_total"].as_u64().unwrap_or(0);
    if rejected == 0 {
        return Ok(());
    }
    // A CSV line is its record's line in the file (a quoted field may span lines); a JSONL
    // line is the upload's line.
    let lines = lines.map(|l| l.lock().expect("not poisoned").clone());
    let listed = answer["rejected"].as_array().map_or(&[][..], Vec::as_slice);
    for refusal in listed.iter().take(SHOWN_REFUSALS) {
        let line = refusal["line"].as_u64().unwrap_or(0);
        let line = match &lines {
            Some(map) => map.get(line as usize - 1).copied().unwrap_or(line),
            None => line,
        };
        eprintln!(
            "{shown}:{line}: {} ({})",
            cell(&refusal["message"]),
            cell(&refusal["code"])
        );
    }
    if rejected as usize > SHOWN_REFUSALS.min(listed.len()) {
        eprintln!(
            "… and {} more",
            rejected as usize - SHOWN_REFUSALS.min(listed.len())
        );
    }
    bail!(
        "{rejected} line(s) refused; the others were stored: fix those lines and import the file \
         again (what is stored is not stored twice)"
    )
}

/// `123 accepted, 4 duplicates, 2 rejected; redacted: email 3, phone 1; 1 dropped for personal data`.
fn summary(answer: &Value) -> String {
    let count = |key: &str| answer[key].as_u64().unwrap_or(0);
    let mut line = format!(
        "{} accepted, {} duplicates, {} rejected",
        count("accepted"),
        count("duplicates"),
        count("rejected_total")
    );
    if let Some(redacted) = answer["redacted"].as_object().filter(|r| !r.is_empty()) {
        let kinds: Vec<String> = redacted.iter().map(|(k, n)| format!("{k} {n}")).collect();
        line.push_str(&format!("; personal data redacted: {}", kinds.join(", ")));
    }
    if count("dropped_pii") > 0 {
        line.push_str(&format!(
            "; {} dropped for personal data (the domain's policy)",
            count("dropped_pii")
        ));
    }
    line
}

fn is_csv(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

type Chunk = Result<Vec<u8>, std::io::Error>;
/// The file line each uploaded CSV record started on, filled in as the upload reads them.
type RecordLines = Arc<Mutex<Vec<u64>>>;

/// The file's bytes as they are read, for an NDJSON body whose line numbers are the file's.
fn jsonl_upload(mut reader: impl std::io::Read + Send + 'static) -> reqwest::Body {
    let chunks = std::iter::from_fn(move || {
        let mut buf = vec![0; READ_CHUNK];
        match reader.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some(Ok(buf))
            }
            Err(e) => Some(Err(e)),
        }
    });
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

/// The CSV's records as NDJSON lines, read as the upload goes, and the file line of each
/// (filled in as they are read). A missing column is an error before anything is sent.
fn csv_upload(path: &Path) -> anyhow::Result<(reqwest::Body, Option<RecordLines>)> {
    let shown = path.display().to_string();
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("opening {shown}"))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{shown}: reading the header"))?
        .clone();
    let col = |names: &[&str]| headers.iter().position(|h| names.contains(&h.trim()));
    let input = col(&["input", "text"])
        .with_context(|| format!("{shown}: the header needs an `input` (or `text`) column"))?;
    let expected = col(&["expected", "label", "category"]).with_context(|| {
        format!("{shown}: the header needs an `expected` (or `label`, `category`) column")
    })?;
    let mut columns = vec![("input", input), ("expected", expected)];
    for name in ["client_id", "model_output", "source", "teacher"] {
        if let Some(i) = col(&[name]) {
            columns.push((name, i));
        }
    }
    let lines = Arc::new(Mutex::new(Vec::new()));
    let record_lines = lines.clone();
    let mut records = reader.into_records();
    let mut failed = false;
    let chunks = std::iter::from_fn(move || -> Option<Chunk> {
        if failed {
            return None;
        }
        let mut out = Vec::new();
        for record in records.by_ref().take(CSV_CHUNK) {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    // Ends the upload: the server answers for what arrived, nothing is half a row.
                    failed = true;
                    return Some(Err(std::io::Error::other(format!("{shown}: {e}"))));
                }
            };
            let line = record.position().map_or(0, |p| p.line());
            record_lines.lock().expect("not poisoned").push(line);
            let row: Map<String, Value> = columns
                .iter()
                .filter_map(|(name, i)| {
                    let v = record.get(*i)?;
                    (!v.is_empty() || *name == "input" || *name == "expected")
                        .then(|| (name.to_string(), Value::String(v.to_owned())))
                })
                .collect();
            serde_json::to_writer(&mut out, &row).expect("a JSON object serializes");
            out.push(b'\n');
        }
        (!out.is_empty()).then_some(Ok(out))
    });
    Ok((
        reqwest::Body::wrap_stream(futures::stream::iter(chunks)),
        Some(lines),
    ))
}
