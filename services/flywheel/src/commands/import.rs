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
    let csv = match file.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("csv") => true,
        Some(e)
            if ["jsonl", "ndjson"]
                .iter()
                .any(|j| e.eq_ignore_ascii_case(j)) =>
        {
            false
        }
        _ => bail!("{shown}: name a .jsonl (or .ndjson) file of correction objects, or a .csv"),
    };
    let (body, csv_state) = if csv {
        let (body, state) = csv_upload(&file)?;
        (body, Some(state))
    } else {
        let reader = File::open(&file).with_context(|| format!("opening {shown}"))?;
        (jsonl_upload(reader), None)
    };
    let path = format!("/v1/domains/{}/corrections", segment("domain", &domain)?);
    let request = remote
        .request(Method::POST, &path)
        .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
        .body(body);
    let sent = remote.send(request).await;
    // A CSV that broke mid-file ended the upload there: what the server stored is the rows
    // before it, and the CSV's own error is the one to show.
    let broken = csv_state
        .as_ref()
        .and_then(|s| s.lock().expect("not poisoned").error.take());
    let mut answer: Value = match sent {
        Ok(response) => response
            .json()
            .await
            .context("reading the server's answer")?,
        Err(_) if broken.is_some() => Value::Null,
        Err(e) => return Err(e),
    };
    // A CSV record's line is its line in the file (a quoted field may span lines); the
    // server numbers the upload's lines.
    if let Some(state) = &csv_state {
        let lines = &state.lock().expect("not poisoned").lines;
        for refusal in answer["rejected"].as_array_mut().into_iter().flatten() {
            let line = refusal["line"].as_u64().unwrap_or(0) as usize;
            if let Some(at) = line.checked_sub(1).and_then(|i| lines.get(i)) {
                refusal["line"] = Value::from(*at);
            }
        }
    }
    if let Some(error) = broken {
        if !answer.is_null() {
            say!("{shown} → `{domain}`: {}", summary(&answer));
        }
        bail!("{error}; the rows before it were sent, the rest were not: fix it and import again");
    }
    if remote.json {
        print_json(&answer)?;
    } else {
        say!("{shown} → `{domain}`: {}", summary(&answer));
    }
    let rejected = answer["rejected_total"].as_u64().unwrap_or(0);
    if rejected == 0 {
        return Ok(());
    }
    let listed = answer["rejected"].as_array().map_or(&[][..], Vec::as_slice);
    for refusal in listed.iter().take(SHOWN_REFUSALS) {
        eprintln!(
            "{shown}:{}: {} ({})",
            refusal["line"],
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

type Chunk = Result<Vec<u8>, std::io::Error>;
/// What the upload learns while it reads a CSV: the file line each record started on, and
/// the error that ended it early, if one did.
#[derive(Default)]
struct CsvRead {
    lines: Vec<u64>,
    error: Option<String>,
}

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
fn csv_upload(path: &Path) -> anyhow::Result<(reqwest::Body, Arc<Mutex<CsvRead>>)> {
    let shown = path.display().to_string();
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("opening {shown}"))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{shown}: reading the header"))?
        .clone();
    let header = crate::CsvHeader(headers);
    let (input, expected) = header.required().with_context(|| shown.clone())?;
    let mut columns = vec![("input", input), ("expected", expected)];
    for name in ["client_id", "model_output", "source", "teacher"] {
        if let Some(i) = header.column(&[name]) {
            columns.push((name, i));
        }
    }
    let state = Arc::new(Mutex::new(CsvRead::default()));
    let read = state.clone();
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
                    // Ends the upload after the rows before it (whole lines only); the caller
                    // reports this error by its line.
                    failed = true;
                    let line = e.position().map_or(0, |p| p.line());
                    let what = match e.kind() {
                        csv::ErrorKind::UnequalLengths {
                            expected_len, len, ..
                        } => format!("{len} fields where the header has {expected_len}"),
                        _ => e.to_string(),
                    };
                    read.lock().expect("not poisoned").error =
                        Some(format!("{shown}:{line}: {what}"));
                    break;
                }
            };
            let line = record.position().map_or(0, |p| p.line());
            read.lock().expect("not poisoned").lines.push(line);
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
        state,
    ))
}
