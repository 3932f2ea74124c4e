use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flywheel_db::DomainRow;
use flywheel_domain::{CorrectionDraft, DomainName, DomainSpec, JobId, JobStatus, VersionId};
use flywheel_registry::{MODEL_REF_PREFIX, parse_model_ref};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ApiError, AppState, ErrorCode, Principal};
use axum::Extension;

type ApiResult<T> = Result<T, ApiError>;

/// Probes and scraping: what every process serves.
pub fn ops_routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(ErrorCode::RouteNotFound, "no such route") })
}

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .route("/v1/domains", post(create_domain).get(list_domains))
        .route("/v1/domains/{domain}", get(get_domain))
        .route("/v1/domains/{domain}/corrections", post(post_corrections))
        .route("/v1/domains/{domain}/jobs", get(list_jobs).post(start_job))
        .route("/v1/jobs", get(all_jobs))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/domains/{domain}/versions", get(list_versions))
        .route(
            "/v1/domains/{domain}/versions/{version}/report",
            get(get_report),
        )
        .route(
            "/v1/domains/{domain}/versions/{version}/approve",
            post(approve),
        )
        .route(
            "/v1/domains/{domain}/versions/{version}/reject",
            post(reject),
        )
        .route("/v1/domains/{domain}/rollback", post(rollback))
        .route("/v1/domains/{domain}/audit", get(audit_log))
        .route(
            "/v1/domains/{domain}/aliases/{alias}",
            get(get_alias).put(move_alias),
        )
        .route(
            "/v1/domains/{domain}/aliases/{alias}/history",
            get(alias_history),
        )
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/events", get(get_events))
        .route("/v1/jobs/{id}/checkpoints", get(get_checkpoints))
        .fallback(|| async { ApiError::new(ErrorCode::RouteNotFound, "no such route") })
}

/// Parses a JSON body, naming the path of the offending field on failure.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let code = if inner.is_syntax() || inner.is_eof() {
            ErrorCode::MalformedJson
        } else {
            ErrorCode::InvalidField
        };
        // serde's positions ("at line 1 column 9") mean nothing to the sender of a batch; the
        // path names the field instead.
        let text = inner.to_string();
        let text = match text.rfind(" at line ") {
            Some(i) if inner.line() > 0 => text[..i].to_owned(),
            _ => text,
        };
        let message = if path == "." {
            format!("request body: {text}")
        } else {
            format!("{path}: {text}")
        };
        ApiError::new(code, message)
    })
}

fn body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body is larger than the server accepts",
            )
        } else {
            ApiError::new(ErrorCode::MalformedJson, e.body_text())
        }
    })
}

async fn domain_row(state: &AppState, name: &str) -> ApiResult<DomainRow> {
    state.db.domain(name).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::DomainNotFound,
            format!("domain `{name}` does not exist"),
        )
    })
}

async fn healthz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    state.db.ping().await?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    for status in JobStatus::ALL {
        state
            .metrics
            .jobs
            .with_label_values(&[status.as_str()])
            .set(0);
    }
    for (status, n) in state.db.job_counts().await? {
        state
            .metrics
            .jobs
            .with_label_values(&[status.as_str()])
            .set(n);
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response())
}

#[derive(Serialize)]
struct DomainView {
    #[serde(flatten)]
    domain: DomainRow,
    corrections: CorrectionCounts,
    production: Option<String>,
}

#[derive(Serialize)]
struct CorrectionCounts {
    train: i64,
    holdout: i64,
}

async fn view(state: &AppState, domain: DomainRow) -> ApiResult<DomainView> {
    let (train, holdout) = state.db.correction_counts(domain.id).await?;
    let production = state
        .registry
        .resolve(&domain.spec.name, "production")
        .await?
        .map(|m| m.to);
    Ok(DomainView {
        domain,
        corrections: CorrectionCounts { train, holdout },
        production,
    })
}

async fn create_domain(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<DomainView>)> {
    let spec: DomainSpec = parse_json(&body(raw)?)?;
    spec.validate()?;
    if spec.base_model.starts_with(MODEL_REF_PREFIX) {
        let id = parse_model_ref(&spec.base_model).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidField,
                "base_model: `sha256:` must be followed by 64 lowercase hex digits",
            )
        })?;
        state.registry.model_manifest(id).await?;
    }
    let row = state.db.create_domain(&spec).await?;
    Ok((StatusCode::CREATED, Json(view(&state, row).await?)))
}

async fn list_domains(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> ApiResult<Json<serde_json::Value>> {
    let mut domains = state.db.domains().await?;
    domains.retain(|d| who.sees(d.spec.name.as_str()));
    Ok(Json(serde_json::json!({ "data": domains })))
}

async fn get_domain(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<DomainView>> {
    let row = domain_row(&state, &name).await?;
    Ok(Json(view(&state, row).await?))
}

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
struct IngestResponse {
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
async fn post_corrections(
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

async fn list_jobs(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let domain = domain_row(&state, &name).await?;
    let jobs = state.db.jobs_of(domain.id).await?;
    Ok(Json(serde_json::json!({ "data": jobs })))
}

/// Starts a fine-tune now, on every correction so far (`trigger: manual`).
async fn start_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<flywheel_db::JobRow>)> {
    let domain = domain_row(&state, &name).await?;
    if let Some(running) = state
        .db
        .jobs_of(domain.id)
        .await?
        .into_iter()
        .find(|j| !j.status.is_terminal())
    {
        return Err(ApiError::new(
            ErrorCode::JobInFlight,
            format!(
                "job {} of {name} is {}; one run at a time",
                running.id,
                running.status.as_str()
            ),
        ));
    }
    let id = state
        .db
        .try_create_job(domain.id, flywheel_domain::Trigger::Manual, 0)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidField,
                format!("{name} has no corrections yet (or another run just started)"),
            )
        })?;
    state
        .db
        .add_event(
            &id,
            "message",
            &format!("queued: started by {}", who.name),
            None,
        )
        .await?;
    // The scheduler hands queued jobs to the queue.
    state.nudge.notify_one();
    let job = state.db.job(&id).await?.expect("just created");
    Ok((StatusCode::CREATED, Json(job)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    status: Option<String>,
    limit: Option<i64>,
}

/// Jobs across the caller's domains, newest first.
async fn all_jobs(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let status = match q.status.as_deref() {
        None => None,
        Some(raw) => Some(JobStatus::parse(raw).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "status: `{raw}` is not one of queued, running, succeeded, failed, cancelled"
                ),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let mut jobs = state.db.jobs(status, limit).await?;
    jobs.retain(|j| who.sees(&j.domain));
    Ok(Json(serde_json::json!({ "data": jobs })))
}

/// Stops a queued or training job. Publishing is not interrupted: by then a version is being
/// written, and it is recorded.
async fn cancel_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<flywheel_db::JobRow>> {
    let job = job_row(&state, &id).await?;
    let id = job.id.clone();
    let reason = format!("cancelled by {}", who.name);
    if !state.db.cancel_job(&id, &reason).await? {
        let job = job_row(&state, id.as_str()).await?;
        return Err(ApiError::new(
            ErrorCode::JobNotCancellable,
            format!(
                "job {id} is {} (stage {}); only queued or training jobs can be cancelled",
                job.status.as_str(),
                job.stage
            ),
        ));
    }
    state.db.add_event(&id, "message", &reason, None).await?;
    state
        .metrics
        .job_duration_seconds
        .with_label_values(&["cancelled"])
        .observe(job.age_seconds());
    Ok(Json(job_row(&state, id.as_str()).await?))
}

/// The job named by a path segment, or `404 job_not_found`.
async fn job_row(state: &AppState, raw: &str) -> ApiResult<flywheel_db::JobRow> {
    let not_found = || {
        ApiError::new(
            ErrorCode::JobNotFound,
            format!("job `{raw}` does not exist"),
        )
    };
    let id = JobId::parse(raw).ok_or_else(not_found)?;
    state.db.job(&id).await?.ok_or_else(not_found)
}

async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<flywheel_db::JobRow>> {
    Ok(Json(job_row(&state, &id).await?))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: i64,
}

async fn get_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = job_row(&state, &id).await?.id;
    let events = state.db.events(&id, q.after).await?;
    Ok(Json(serde_json::json!({ "data": events })))
}

/// The checkpoints a job's training saved, newest first (OpenAI's
/// `fine_tuning/jobs/{id}/checkpoints`): step, loss, and where it is staged. Only the newest
/// is kept; a job whose worker dies resumes from it.
async fn get_checkpoints(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id = job_row(&state, &id).await?.id;
    let mut checkpoints: Vec<serde_json::Value> = state
        .db
        .events(&id, 0)
        .await?
        .into_iter()
        .filter(|e| e.kind == "checkpoint")
        .map(|e| {
            let mut data = e.data.unwrap_or_default();
            data["created_at"] = serde_json::json!(e.at);
            data
        })
        .collect();
    checkpoints.reverse();
    Ok(Json(serde_json::json!({ "data": checkpoints })))
}

async fn list_versions(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let domain = domain_row(&state, &name).await?;
    let versions = state.db.versions(domain.id).await?;
    let production = state
        .registry
        .resolve(&domain.spec.name, "production")
        .await?
        .map(|m| m.to);
    Ok(Json(
        serde_json::json!({ "production": production, "data": versions }),
    ))
}

#[derive(Deserialize)]
struct ReportQuery {
    format: Option<String>,
}

async fn get_report(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    Query(q): Query<ReportQuery>,
) -> ApiResult<Response> {
    let domain = domain_row(&state, &name).await?;
    let not_found = || {
        ApiError::new(
            ErrorCode::VersionNotFound,
            format!("version {name}/{version} does not exist"),
        )
    };
    let version = VersionId::parse(&version).ok_or_else(not_found)?;
    let name = DomainName::parse(domain.spec.name.as_str())?;
    let (file, content_type) = match q.format.as_deref() {
        Some("md") | Some("markdown") => ("report.md", "text/markdown; charset=utf-8"),
        Some("html") => ("report.html", "text/html; charset=utf-8"),
        _ => ("report.json", "application/json"),
    };
    let bytes = state.registry.read_file(&name, &version, file).await?;
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}

/// A steward's decision: who and why.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Review {
    #[serde(default)]
    by: Option<String>,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveAlias {
    to: String,
    /// The version the caller believes the alias points at (`null`: unset). When given, the
    /// move is a compare-and-swap on it; when absent, on whatever the alias points at now.
    #[serde(default, deserialize_with = "present")]
    expected: Option<Option<String>>,
    #[serde(default)]
    by: Option<String>,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: flywheel_domain::Role,
    /// Domains a `department` or `steward` token may act on.
    #[serde(default)]
    domains: Vec<String>,
}

/// Creates a token; the secret is in this response and nowhere else, ever.
async fn create_token(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let req: NewToken = parse_json(&body(raw)?)?;
    non_empty("name", &req.name)?;
    match (req.role, req.domains.is_empty()) {
        (flywheel_domain::Role::Admin, false) => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "domains: admin tokens are not scoped; leave `domains` out",
            ));
        }
        (flywheel_domain::Role::Department | flywheel_domain::Role::Steward, true) => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "domains: name the domains this token may act on",
            ));
        }
        _ => {}
    }
    for d in &req.domains {
        domain_row(&state, d).await?;
    }
    let secret = flywheel_domain::auth::new_token();
    let row = state
        .db
        .create_token(
            &req.name,
            req.role,
            &req.domains,
            &flywheel_domain::auth::hash_token(&secret),
            &who.name,
        )
        .await?;
    let mut view = serde_json::to_value(&row).expect("json");
    view["token"] = serde_json::Value::String(secret);
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list_tokens(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(
        serde_json::json!({ "data": state.db.tokens().await? }),
    ))
}

async fn revoke_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let not_found = || {
        ApiError::new(
            ErrorCode::TokenNotFound,
            format!("no live token with id `{id}`"),
        )
    };
    let n: i64 = id.parse().map_err(|_| not_found())?;
    if state.db.revoke_token(n).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollback {
    to: String,
    #[serde(default)]
    by: Option<String>,
    reason: String,
}

fn non_empty(field: &str, v: &str) -> ApiResult<()> {
    if v.trim().is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("{field}: must not be empty"),
        ));
    }
    Ok(())
}

async fn version_of(
    state: &AppState,
    domain: &DomainRow,
    raw: &str,
) -> ApiResult<flywheel_db::VersionRow> {
    let not_found = || {
        ApiError::new(
            ErrorCode::VersionNotFound,
            format!("version {}/{raw} does not exist", domain.spec.name),
        )
    };
    let v = VersionId::parse(raw).ok_or_else(not_found)?;
    state.db.version(domain.id, &v).await?.ok_or_else(not_found)
}

const PRODUCTION: &str = "production";

/// Parses a steward's review and claims the version's move out of `pending_approval` into
/// `to`: of two concurrent reviews, one wins here.
/// A steward's decision on a pending version: who (the token, or `by` without auth), why.
struct Claimed {
    by: String,
    reason: String,
    domain: DomainRow,
    version: VersionId,
}

async fn claim_pending(
    state: &AppState,
    who: &Principal,
    name: &str,
    version: &str,
    raw: Result<Bytes, BytesRejection>,
    to: &str,
) -> ApiResult<Claimed> {
    let review: Review = parse_json(&body(raw)?)?;
    let by = who.actor(review.by)?;
    non_empty("reason", &review.reason)?;
    let domain = domain_row(state, name).await?;
    let v = version_of(state, &domain, version).await?.version;
    if !state
        .db
        .transition_version(domain.id, &v, "pending_approval", to)
        .await?
    {
        return Err(ApiError::new(
            ErrorCode::VersionNotPending,
            format!("version {name}/{v} is not awaiting approval"),
        ));
    }
    Ok(Claimed {
        by,
        reason: review.reason,
        domain,
        version: v,
    })
}

async fn approve(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((name, version)): Path<(String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Claimed {
        by,
        reason,
        domain,
        version: v,
    } = claim_pending(&state, &who, &name, &version, raw, "promoted").await?;
    let current = state
        .registry
        .resolve(&domain.spec.name, PRODUCTION)
        .await?
        .map(|m| VersionId(m.to));
    let moved = state
        .registry
        .move_alias(
            &domain.spec.name,
            PRODUCTION,
            current.as_ref(),
            &v,
            &by,
            &reason,
        )
        .await;
    let moved = match moved {
        Ok(m) => m,
        Err(e) => {
            // Give the claim back so the approval can be retried.
            state
                .db
                .transition_version(domain.id, &v, "promoted", "pending_approval")
                .await?;
            return Err(e.into());
        }
    };
    let data = serde_json::json!({ "alias": PRODUCTION, "from": moved.from, "to": moved.to });
    state
        .db
        .audit(domain.id, &by, "approve", Some(&v), &reason, Some(&data))
        .await?;
    Ok(Json(
        serde_json::json!({ "version": v, "status": "promoted", "production": moved.to }),
    ))
}

async fn reject(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((name, version)): Path<(String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Claimed {
        by,
        reason,
        domain,
        version: v,
    } = claim_pending(&state, &who, &name, &version, raw, "rejected").await?;
    state
        .db
        .audit(domain.id, &by, "reject", Some(&v), &reason, None)
        .await?;
    Ok(Json(
        serde_json::json!({ "version": v, "status": "rejected" }),
    ))
}

/// Points `production` back at a version that was live before.
async fn rollback(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let req: Rollback = parse_json(&body(raw)?)?;
    let by = who.actor(req.by)?;
    non_empty("reason", &req.reason)?;
    let domain = domain_row(&state, &name).await?;
    let target = version_of(&state, &domain, &req.to).await?;
    if target.status != "promoted" {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!(
                "to: version {name}/{} was never promoted ({}); only a version that was live can come back",
                target.version, target.status
            ),
        ));
    }
    let current = state
        .registry
        .resolve(&domain.spec.name, PRODUCTION)
        .await?
        .map(|m| VersionId(m.to));
    if current.as_ref() == Some(&target.version) {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("to: {} is already production", target.version),
        ));
    }
    let moved = move_audited(
        &state,
        &domain,
        PRODUCTION,
        current.as_ref(),
        &target.version,
        (&by, &req.reason, "rollback"),
    )
    .await?;
    Ok(Json(
        serde_json::json!({ "production": moved.to, "from": moved.from }),
    ))
}

/// Moves `alias` from `expected` to `to` (compare-and-swap) and writes the audit row;
/// The last argument is `(actor, reason, audit action)`.
async fn move_audited(
    state: &AppState,
    domain: &DomainRow,
    alias: &str,
    expected: Option<&VersionId>,
    to: &VersionId,
    (by, reason, action): (&str, &str, &str),
) -> ApiResult<flywheel_registry::AliasMove> {
    let moved = state
        .registry
        .move_alias(&domain.spec.name, alias, expected, to, by, reason)
        .await?;
    let data = serde_json::json!({ "alias": alias, "from": moved.from, "to": moved.to });
    state
        .db
        .audit(domain.id, by, action, Some(to), reason, Some(&data))
        .await?;
    Ok(moved)
}

/// Moves any alias but `production` (which moves through the gate, approval and rollback) to
/// a published version: `staging`, `canary`, a customer's pin.
async fn move_alias(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((name, alias)): Path<(String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let req: MoveAlias = parse_json(&body(raw)?)?;
    let by = who.actor(req.by)?;
    non_empty("reason", &req.reason)?;
    if !is_alias_name(&alias) {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("alias `{alias}`: use letters, digits, `-` and `_`"),
        ));
    }
    if alias == PRODUCTION {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "production moves through the gate, /approve and /rollback, not by hand",
        ));
    }
    let domain = domain_row(&state, &name).await?;
    let target = version_of(&state, &domain, &req.to).await?;
    let expected = match req.expected {
        Some(expected) => expected.map(VersionId),
        None => state
            .registry
            .resolve(&domain.spec.name, &alias)
            .await?
            .map(|m| VersionId(m.to)),
    };
    let moved = move_audited(
        &state,
        &domain,
        &alias,
        expected.as_ref(),
        &target.version,
        (&by, &req.reason, "alias_move"),
    )
    .await?;
    Ok(Json(serde_json::to_value(&moved).expect("json")))
}

async fn audit_log(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let domain = domain_row(&state, &name).await?;
    Ok(Json(
        serde_json::json!({ "data": state.db.audit_log(domain.id).await? }),
    ))
}

/// What a serving fleet needs: the version an alias points at, where its adapter files are,
/// and the confidence below which to escalate.
async fn get_alias(
    State(state): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let domain = domain_row(&state, &name).await?;
    let not_set = || {
        ApiError::new(
            ErrorCode::VersionNotFound,
            format!("alias `{alias}` of {name} is not set"),
        )
    };
    if !is_alias_name(&alias) {
        return Err(not_set());
    }
    let mv = state
        .registry
        .resolve(&domain.spec.name, &alias)
        .await?
        .ok_or_else(not_set)?;
    let v = VersionId(mv.to.clone());
    let manifest = state.registry.manifest(&domain.spec.name, &v).await?;
    let files: Vec<serde_json::Value> = manifest
        .files
        .iter()
        .map(|f| {
            serde_json::json!({
                "name": f.name,
                "sha256": f.sha256,
                "bytes": f.bytes,
                "url": state.registry.file_url(&domain.spec.name, &v, &f.name),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "alias": alias,
        "version": v,
        "generation": mv.generation,
        "moved_at": mv.at,
        "moved_by": mv.by,
        "escalation": manifest.lineage["escalation"],
        "base_model": manifest.lineage["base_model"],
        "files": files,
    })))
}

/// Every move of an alias, oldest first: who, when, from, to, why.
async fn alias_history(
    State(state): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let domain = domain_row(&state, &name).await?;
    if !is_alias_name(&alias) {
        return Err(ApiError::new(
            ErrorCode::VersionNotFound,
            format!("alias `{alias}` of {name} is not set"),
        ));
    }
    let moves = state
        .registry
        .alias_history(&domain.spec.name, &alias)
        .await?;
    Ok(Json(serde_json::json!({ "data": moves })))
}

/// Alias names are plain words: they become object keys.
fn is_alias_name(alias: &str) -> bool {
    !alias.is_empty()
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
