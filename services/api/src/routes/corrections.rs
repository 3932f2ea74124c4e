//! Corrections in: one, a JSON batch (all-or-nothing), or NDJSON streamed and committed in
//! chunks; each answered only after its rows are durably committed.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use flywheel_db::DomainRow;
use flywheel_domain::CorrectionDraft;
use serde::{Deserialize, Serialize};

use super::shared::{ApiResult, domain_row, parse_json};
use crate::{ApiError, AppState, ErrorCode};

/// A batch may also come wrapped: `{"corrections": [...]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    corrections: Vec<CorrectionDraft>,
}

#[derive(Serialize)]
struct LineError {
    line: usize,
    code: ErrorCode,
    message: String,
}

#[derive(Serialize, Default)]
pub struct IngestResponse {
    accepted: usize,
    duplicates: usize,
    /// Personal data redacted from the stored rows, by kind (counts, never values).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    redacted: flywheel_domain::PiiCounts,
    /// Rows not stored because they held personal data under the `drop` policy.
    #[serde(skip_serializing_if = "is_zero")]
    dropped_pii: usize,
    /// Invalid NDJSON lines, the first [`MAX_LISTED_ERRORS`] of them listed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rejected: Vec<LineError>,
    #[serde(skip_serializing_if = "is_zero")]
    rejected_total: usize,
}

/// NDJSON is committed in chunks of this many valid lines, so an upload of any size holds
/// at most one chunk in memory.
const NDJSON_CHUNK: usize = 1_000;
/// A response lists at most this many bad lines (and counts the rest).
const MAX_LISTED_ERRORS: usize = 1_000;

/// One correction, a JSON batch (all-or-nothing: any invalid row refuses the batch, naming
/// the row, and at most `max_batch` rows), or NDJSON (`application/x-ndjson`), streamed:
/// valid lines are committed every [`NDJSON_CHUNK`], invalid ones reported by line number,
/// and the body is never held whole. Answers 202 only after the rows are durably committed.
pub async fn post(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<IngestResponse>)> {
    let domain = domain_row(&state, &name).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let ndjson = content_type.starts_with("application/x-ndjson")
        || content_type.starts_with("application/jsonl");
    if !ndjson && !content_type.starts_with("application/json") {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("content-type `{content_type}`: send application/json or application/x-ndjson"),
        ));
    }
    let mut response = IngestResponse::default();
    if ndjson {
        ingest_ndjson(&state, &domain, body, &mut response).await?;
    } else {
        let raw = axum::body::to_bytes(body, state.limits.max_body_bytes)
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "request body is larger than {} bytes; send NDJSON (application/x-ndjson) to stream large uploads",
                        state.limits.max_body_bytes
                    ),
                )
            })?;
        let valid = parse_batch(&state, &domain, &raw)?;
        store(&state, &domain, valid, &mut response).await?;
    }
    if response.accepted + response.duplicates > 0 {
        state.nudge.notify_one();
    }
    let stored_nothing = response.accepted + response.duplicates + response.dropped_pii == 0;
    let status = if stored_nothing {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(response)))
}

/// A JSON body: one correction, an array, or `{"corrections": [...]}`; all valid or none.
fn parse_batch(
    state: &AppState,
    domain: &DomainRow,
    raw: &[u8],
) -> ApiResult<Vec<flywheel_domain::Correction>> {
    let limits = &state.limits;
    let first = raw.iter().find(|b| !b.is_ascii_whitespace());
    let drafts = if first == Some(&b'[') {
        parse_json::<Vec<CorrectionDraft>>(raw)?
    } else if looks_wrapped(raw) {
        parse_json::<Wrapped>(raw)?.corrections
    } else {
        vec![parse_json::<CorrectionDraft>(raw)?]
    };
    if drafts.len() > limits.max_batch {
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "{} corrections in one batch; the limit is {} (stream NDJSON for more)",
                drafts.len(),
                limits.max_batch
            ),
        ));
    }
    if drafts.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "corrections: the batch is empty",
        ));
    }
    let many = drafts.len() > 1;
    drafts
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            d.validate(&domain.spec, limits.max_text_chars)
                .map_err(|e| {
                    ApiError::from(if many {
                        e.at(&format!("corrections[{i}]"))
                    } else {
                        e
                    })
                })
        })
        .collect()
}

/// Streams NDJSON: parses line by line as bytes arrive and commits every [`NDJSON_CHUNK`]
/// valid lines. A dropped connection leaves the committed chunks stored; a retry of the
/// whole file stores nothing twice (client ids and content hashes).
async fn ingest_ndjson(
    state: &AppState,
    domain: &DomainRow,
    body: axum::body::Body,
    response: &mut IngestResponse,
) -> ApiResult<()> {
    use futures::StreamExt;
    // A line holds one correction: its texts plus JSON overhead.
    let max_line = state.limits.max_text_chars * 3 * 4 + 64 * 1024;
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut line_no = 0usize;
    let mut pending = Vec::with_capacity(NDJSON_CHUNK);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                ErrorCode::MalformedJson,
                format!("reading the upload after line {line_no}: {e}"),
            )
        })?;
        buf.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            line_no += 1;
            ndjson_line(
                state,
                domain,
                &buf[start..start + pos],
                line_no,
                &mut pending,
                response,
            );
            start += pos + 1;
            if pending.len() >= NDJSON_CHUNK {
                store(state, domain, std::mem::take(&mut pending), response).await?;
            }
        }
        buf.drain(..start);
        if buf.len() > max_line {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "line {} is longer than {max_line} bytes; lines before it were stored",
                    line_no + 1
                ),
            ));
        }
    }
    if !buf.is_empty() {
        line_no += 1;
        ndjson_line(state, domain, &buf, line_no, &mut pending, response);
    }
    store(state, domain, pending, response).await
}

/// One NDJSON line: a valid correction joins `pending`; an invalid one is reported by number.
fn ndjson_line(
    state: &AppState,
    domain: &DomainRow,
    line: &[u8],
    line_no: usize,
    pending: &mut Vec<flywheel_domain::Correction>,
    response: &mut IngestResponse,
) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    let parsed = parse_json::<CorrectionDraft>(line).and_then(|d| {
        d.validate(&domain.spec, state.limits.max_text_chars)
            .map_err(ApiError::from)
    });
    match parsed {
        Ok(c) => pending.push(c),
        Err(e) => {
            state
                .metrics
                .corrections_rejected
                .with_label_values(&[e.code.as_str().as_str()])
                .inc();
            response.rejected_total += 1;
            if response.rejected.len() < MAX_LISTED_ERRORS {
                response.rejected.push(LineError {
                    line: line_no,
                    code: e.code,
                    message: e.message,
                });
            }
        }
    }
}

/// Commits validated corrections (minus those the PII policy drops) and counts them.
async fn store(
    state: &AppState,
    domain: &DomainRow,
    mut valid: Vec<flywheel_domain::Correction>,
    response: &mut IngestResponse,
) -> ApiResult<()> {
    let before = valid.len();
    if domain.spec.policy.pii.action == flywheel_domain::PiiAction::Drop {
        valid.retain(|c| c.redacted.is_empty());
    }
    let dropped = before - valid.len();
    if valid.is_empty() && dropped == 0 {
        return Ok(());
    }
    let outcome = state.db.insert_corrections(domain.id, &valid).await?;
    let name = domain.spec.name.as_str();
    for (kind, n) in &outcome.redacted {
        state
            .metrics
            .corrections_redacted
            .with_label_values(&[name, kind.as_str()])
            .inc_by(u64::from(*n));
        *response.redacted.entry(*kind).or_default() += n;
    }
    let rejected = &state.metrics.corrections_rejected;
    rejected
        .with_label_values(&["pii_dropped"])
        .inc_by(dropped as u64);
    rejected
        .with_label_values(&["duplicate"])
        .inc_by(outcome.duplicates as u64);
    state
        .metrics
        .corrections_ingested
        .with_label_values(&[name])
        .inc_by(outcome.accepted as u64);
    response.accepted += outcome.accepted;
    response.duplicates += outcome.duplicates;
    response.dropped_pii += dropped;
    Ok(())
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn looks_wrapped(raw: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(raw)
        .map(|m| m.contains_key("corrections"))
        .unwrap_or(false)
}
