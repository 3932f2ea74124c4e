//! Corrections in: one, a JSON batch (all-or-nothing), or NDJSON streamed and committed in
//! chunks; each answered only after its rows are durably committed.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::{Extension, Json};
use flywheel_db::DomainRow;
use flywheel_domain::CorrectionDraft;
use serde::{Deserialize, Serialize};

use super::shared::{ApiResult, Path, domain_row, parse_json};
use crate::{ApiError, AppState, ErrorCode, Principal};

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
/// A `client_id` names one correction: the same content again is a duplicate, other content
/// under it `409 idempotency_conflict` (in NDJSON, that line's rejection).
pub async fn post(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
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
    let mut upload = Upload {
        state: &state,
        domain: &domain,
        who: &who,
        response: IngestResponse::default(),
        open: None,
    };
    if ndjson {
        upload.ndjson(body).await?;
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
        upload.batch(valid).await?;
    }
    if let Some(open) = upload.open.take() {
        open.close().await;
    }
    let response = upload.response;
    if response.accepted + response.duplicates > 0 {
        state.nudge.notify_one();
    }
    if response.accepted + response.duplicates + response.dropped_pii == 0 {
        return Err(nothing_stored(&response));
    }
    Ok((StatusCode::ACCEPTED, Json(response)))
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

/// The answer to an upload that stored nothing: `{code, message}` like every refusal. An
/// empty upload is `invalid_field`; one whose every line was refused carries the lines'
/// code if they share one (else `invalid_field`) and names the first of them.
fn nothing_stored(response: &IngestResponse) -> ApiError {
    const NAMED: usize = 5;
    if response.rejected_total == 0 {
        return ApiError::new(
            ErrorCode::InvalidField,
            "the upload holds no correction: send one JSON object per line",
        );
    }
    let mut codes = response.rejected.iter().map(|e| e.code);
    let first = codes.next().unwrap_or(ErrorCode::InvalidField);
    let shared = response.rejected.len() == response.rejected_total && codes.all(|c| c == first);
    let named: Vec<String> = response
        .rejected
        .iter()
        .take(NAMED)
        .map(|e| format!("line {}: {}", e.line, e.message))
        .collect();
    let more = if response.rejected_total > named.len() {
        format!("; and {} more", response.rejected_total - named.len())
    } else {
        String::new()
    };
    ApiError::new(
        if shared {
            first
        } else {
            ErrorCode::InvalidField
        },
        format!(
            "no line was stored: {} rejected ({}{more})",
            response.rejected_total,
            named.join("; ")
        ),
    )
}

/// One upload under way: what it was sent to, by whom, and what it has stored so far.
struct Upload<'a> {
    state: &'a AppState,
    domain: &'a DomainRow,
    who: &'a Principal,
    response: IngestResponse,
    /// Set once an NDJSON upload commits its first chunk with more to come: while it is, no
    /// job snapshots its rows, so a run never trains on part of one upload.
    open: Option<OpenUpload>,
}

/// An upload registered as streaming (`open_uploads`); closed when the request ends, however
/// it ends (a dropped connection drops the handler, and with it this).
struct OpenUpload {
    db: flywheel_db::Db,
    id: Option<String>,
}

impl OpenUpload {
    async fn close(mut self) {
        if let Some(id) = self.id.take() {
            close_upload(&self.db, &id).await;
        }
    }
}

impl Drop for OpenUpload {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let db = self.db.clone();
            tokio::spawn(async move { close_upload(&db, &id).await });
        }
    }
}

async fn close_upload(db: &flywheel_db::Db, id: &str) {
    // Left open, the row stops holding snapshots back after its time-to-live.
    if let Err(e) = db.close_upload(id).await {
        tracing::warn!(error = %e, upload = id, "could not close an upload");
    }
}

impl Upload<'_> {
    /// A validated JSON batch, stored whole or not at all: two rows under one `client_id`
    /// with different content, or a row whose `client_id` names a stored correction with
    /// other content, refuse it with `409 idempotency_conflict` naming the rows.
    async fn batch(&mut self, rows: Vec<flywheel_domain::Correction>) -> ApiResult<()> {
        let many = rows.len() > 1;
        let mut first: HashMap<&str, (usize, &str)> = HashMap::new();
        let mut clashes = Vec::new();
        for (i, c) in rows.iter().enumerate() {
            let Some(id) = c.client_id.as_deref() else {
                continue;
            };
            match first.get(id) {
                Some(&(j, hash)) if hash != c.content_hash => clashes.push(format!(
                    "corrections[{j}] and corrections[{i}]: client_id `{id}` names two different corrections"
                )),
                Some(_) => {}
                None => {
                    first.insert(id, (i, &c.content_hash));
                }
            }
        }
        if !clashes.is_empty() {
            return Err(conflict(clashes));
        }
        let rows = rows.into_iter().enumerate().collect();
        let conflicts = self.commit(rows, true).await?;
        if conflicts.is_empty() {
            return Ok(());
        }
        Err(conflict(
            conflicts
                .into_iter()
                .map(|(i, id)| {
                    let at = if many {
                        format!("corrections[{i}]: ")
                    } else {
                        String::new()
                    };
                    format!(
                        "{at}client_id `{id}` already names a stored correction with other content"
                    )
                })
                .collect(),
        ))
    }

    /// Streams NDJSON: parses line by line as bytes arrive and commits every
    /// [`NDJSON_CHUNK`] valid lines, re-checking the caller's token before each commit. A
    /// dropped connection leaves the committed chunks stored; a retry of the whole file
    /// stores nothing twice (client ids and content hashes). A line over the limit, or a
    /// token revoked meanwhile, ends the upload; what came before it was committed (or, for
    /// the token, what was committed before it was revoked) and the message says so.
    async fn ndjson(&mut self, body: axum::body::Body) -> ApiResult<()> {
        use futures::StreamExt;
        // A line holds one correction: its texts plus JSON overhead.
        let max_line = self.state.limits.max_text_chars * 3 * 4 + 64 * 1024;
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
            // A line is too long whether it arrived whole in one read or not.
            let mut too_long = false;
            while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
                if pos > max_line {
                    too_long = true;
                    break;
                }
                line_no += 1;
                self.line(&buf[start..start + pos], line_no, &mut pending);
                start += pos + 1;
                if pending.len() >= NDJSON_CHUNK {
                    self.mark_open().await?;
                    self.flush(&mut pending, line_no + 1).await?;
                }
            }
            buf.drain(..start);
            if too_long || buf.len() > max_line {
                // Flush, then refuse: the message says the lines before it were stored.
                self.flush(&mut pending, line_no + 1).await?;
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "line {} is longer than {max_line} bytes; the upload stopped there. The lines before it: {}",
                        line_no + 1,
                        self.progress()
                    ),
                ));
            }
        }
        if !buf.is_empty() {
            line_no += 1;
            self.line(&buf, line_no, &mut pending);
        }
        self.flush(&mut pending, line_no + 1).await?;
        self.response.rejected.sort_by_key(|e| e.line);
        Ok(())
    }

    /// Before a chunk that more may follow: registers the upload as streaming, or says it
    /// still is.
    async fn mark_open(&mut self) -> ApiResult<()> {
        match &self.open {
            Some(open) => {
                let id = open.id.as_deref().expect("closed only at the end");
                self.state.db.touch_upload(id).await?;
            }
            None => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                self.state.db.open_upload(&id, self.domain.id).await?;
                self.open = Some(OpenUpload {
                    db: self.state.db.clone(),
                    id: Some(id),
                });
            }
        }
        Ok(())
    }

    /// One NDJSON line: a valid correction joins `pending`; an invalid one is reported by
    /// number.
    fn line(
        &mut self,
        line: &[u8],
        line_no: usize,
        pending: &mut Vec<(usize, flywheel_domain::Correction)>,
    ) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let parsed = parse_json::<CorrectionDraft>(line).and_then(|d| {
            d.validate(&self.domain.spec, self.state.limits.max_text_chars)
                .map_err(ApiError::from)
        });
        match parsed {
            Ok(c) => pending.push((line_no, c)),
            Err(e) => self.reject(line_no, e),
        }
    }

    fn reject(&mut self, line: usize, e: ApiError) {
        self.state
            .metrics
            .corrections_rejected
            .with_label_values(&[self.domain.spec.name.as_str(), e.code.as_str().as_str()])
            .inc();
        self.response.rejected_total += 1;
        if self.response.rejected.len() < MAX_LISTED_ERRORS {
            self.response.rejected.push(LineError {
                line,
                code: e.code,
                message: e.message,
            });
        }
    }

    /// Commits the pending NDJSON lines, if the caller's token still stands; a line whose
    /// `client_id` names other content is rejected like any bad line. `next_line` is the
    /// first line not yet read, for the message if the token was revoked.
    async fn flush(
        &mut self,
        pending: &mut Vec<(usize, flywheel_domain::Correction)>,
        next_line: usize,
    ) -> ApiResult<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let first = pending.first().map_or(next_line, |(line, _)| *line);
        self.token_still_valid(first).await?;
        let conflicts = self.commit(std::mem::take(pending), false).await?;
        for (line, id) in conflicts {
            self.reject(
                line,
                ApiError::new(
                    ErrorCode::IdempotencyConflict,
                    format!(
                        "client_id `{id}` already names a correction with other content (stored earlier, or on an earlier line)"
                    ),
                ),
            );
        }
        Ok(())
    }

    /// With auth, the caller's token is looked up again (one indexed read per chunk): a
    /// token revoked while its upload streams stores nothing more.
    async fn token_still_valid(&self, first_unstored: usize) -> ApiResult<()> {
        let Some(hash) = &self.who.token_hash else {
            return Ok(());
        };
        match self.state.db.token_by_hash(hash).await? {
            Some(t) if t.revoked_at.is_none() => Ok(()),
            _ => Err(ApiError::new(
                ErrorCode::Unauthenticated,
                format!(
                    "this token was revoked during the upload; nothing from line {first_unstored} on was stored (so far: {})",
                    self.progress()
                ),
            )),
        }
    }

    /// What the upload has done so far, in words.
    fn progress(&self) -> String {
        let r = &self.response;
        let dropped = if r.dropped_pii > 0 {
            format!(", {} dropped for personal data", r.dropped_pii)
        } else {
            String::new()
        };
        format!(
            "{} stored ({} new, {} already stored), {} rejected{dropped}",
            r.accepted + r.duplicates,
            r.accepted,
            r.duplicates,
            r.rejected_total
        )
    }

    /// Commits validated corrections (minus those the PII policy drops), each with its
    /// position (batch index or line number), and counts them. Returns the rows whose
    /// `client_id` names other content, by position; with `all_or_nothing`, if there are
    /// any, nothing was stored and nothing is counted.
    async fn commit(
        &mut self,
        mut valid: Vec<(usize, flywheel_domain::Correction)>,
        all_or_nothing: bool,
    ) -> ApiResult<Vec<(usize, String)>> {
        let (state, domain) = (self.state, self.domain);
        let before = valid.len();
        if domain.spec.policy.pii.action == flywheel_domain::PiiAction::Drop {
            valid.retain(|(_, c)| c.redacted.is_empty());
        }
        let dropped = before - valid.len();
        if valid.is_empty() && dropped == 0 {
            return Ok(Vec::new());
        }
        let (positions, rows): (Vec<usize>, Vec<_>) = valid.into_iter().unzip();
        let outcome = if all_or_nothing {
            state
                .db
                .insert_corrections_all_or_nothing(domain.id, &rows)
                .await?
        } else {
            state.db.insert_corrections(domain.id, &rows).await?
        };
        let conflicts: Vec<(usize, String)> = outcome
            .conflicts
            .into_iter()
            .map(|c| (positions[c.index], c.client_id))
            .collect();
        if all_or_nothing && !conflicts.is_empty() {
            return Ok(conflicts);
        }
        let name = domain.spec.name.as_str();
        for (kind, n) in &outcome.redacted {
            state
                .metrics
                .corrections_redacted
                .with_label_values(&[name, kind.as_str()])
                .inc_by(u64::from(*n));
            *self.response.redacted.entry(*kind).or_default() += n;
        }
        let rejected = &state.metrics.corrections_rejected;
        rejected
            .with_label_values(&[name, "pii_dropped"])
            .inc_by(dropped as u64);
        rejected
            .with_label_values(&[name, "duplicate"])
            .inc_by(outcome.duplicates as u64);
        state
            .metrics
            .corrections_ingested
            .with_label_values(&[name])
            .inc_by(outcome.accepted as u64);
        self.response.accepted += outcome.accepted;
        self.response.duplicates += outcome.duplicates;
        self.response.dropped_pii += dropped;
        Ok(conflicts)
    }
}

/// `409 idempotency_conflict` naming the conflicting rows (the first ten of them).
fn conflict(mut rows: Vec<String>) -> ApiError {
    const NAMED: usize = 10;
    let more = rows.len().saturating_sub(NAMED);
    rows.truncate(NAMED);
    let more = if more > 0 {
        format!("; and {more} more")
    } else {
        String::new()
    };
    ApiError::new(
        ErrorCode::IdempotencyConflict,
        format!(
            "{}{more}. Nothing of this batch was stored: a client_id names one correction (send the same content to retry, new content under a new client_id)",
            rows.join("; ")
        ),
    )
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn looks_wrapped(raw: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(raw)
        .map(|m| m.contains_key("corrections"))
        .unwrap_or(false)
}
