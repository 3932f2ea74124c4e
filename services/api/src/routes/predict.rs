//! Serving: predictions with escalation to the teacher, feedback on them, and what a domain's
//! serving looks like now. The answering is `flywheel-serving`'s; this file parses and checks.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::Utc;
use flywheel_db::{PredictionRow, ServingWindow, ShadowAgreement};
use flywheel_domain::PredictionId;
use flywheel_promotion::Promotion;
use flywheel_serving::{Resident, ServingError};
use serde::{Deserialize, Serialize};

use super::shared::{
    ApiResult, Domain, MAX_NAME_CHARS, Path, Query, domain_row, parse_body, short_text,
};
use crate::{ApiError, AppState, ErrorCode, Principal};

/// Most inputs in one predict call: a page of work, answered while the caller waits.
pub const MAX_PREDICT_BATCH: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    inputs: Option<Vec<String>>,
    /// Most tokens a generated answer may have (generation domains).
    #[serde(default)]
    max_tokens: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictQuery {
    #[serde(default)]
    alias: Option<String>,
}

#[derive(Serialize)]
struct Batch {
    data: Vec<serde_json::Value>,
}

impl From<ServingError> for ApiError {
    fn from(e: ServingError) -> Self {
        match e {
            ServingError::AliasNotSet { .. } => {
                ApiError::new(ErrorCode::VersionNotFound, e.to_string())
            }
            ServingError::NoModel(m) => ApiError::new(ErrorCode::NoModel, m),
            ServingError::Db(e) => e.into(),
            ServingError::Registry(e) => e.into(),
            ServingError::Model(m) => {
                tracing::error!(error = m, "serving: the model failed");
                ApiError::new(ErrorCode::Internal, "the model failed; see the server log")
            }
        }
    }
}

/// Answers one input (`{input}`, answered as one object) or several (`{inputs: [...]}`,
/// answered as `{data: [...]}` in the same order).
pub async fn predict(
    State(state): State<AppState>,
    Domain(domain): Domain,
    Query(query): Query<PredictQuery>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: PredictRequest = parse_body(raw)?;
    if let Some(alias) = &query.alias
        && !super::aliases::is_alias_name(alias)
    {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "query string: alias: 1 to 64 letters, digits, `-` or `_`",
        ));
    }
    let (inputs, single) = match (req.input, req.inputs) {
        (Some(one), None) => (vec![one], true),
        (None, Some(many)) => (many, false),
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "request body: send either `input` (one text) or `inputs` (a list of texts)",
            ));
        }
    };
    if inputs.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "inputs: must hold at least one text",
        ));
    }
    if inputs.len() > MAX_PREDICT_BATCH {
        return Err(ApiError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "inputs: {} texts; at most {MAX_PREDICT_BATCH} per call",
                inputs.len()
            ),
        ));
    }
    for (i, text) in inputs.iter().enumerate() {
        let field = if single {
            "input".to_owned()
        } else {
            format!("inputs[{i}]")
        };
        flywheel_domain::check_text(&field, text, state.limits.max_text_chars)?;
    }
    let answers = state
        .serving
        .predict(
            &domain,
            query.alias.as_deref(),
            &inputs,
            max_tokens(req.max_tokens)?,
        )
        .await?;
    if single {
        let answer = answers.into_iter().next().expect("one answer per input")?;
        return Ok(Json(answer).into_response());
    }
    // In a batch, an input nothing could answer is an error in its place; the rest stand.
    let data = answers
        .into_iter()
        .map(|a| match a {
            Ok(answer) => serde_json::to_value(answer).expect("an answer is JSON"),
            Err(e) => {
                let e = ApiError::from(e);
                serde_json::json!({"error": {"code": e.code, "message": e.message}})
            }
        })
        .collect();
    Ok(Json(Batch { data }).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The answer was right.
    #[serde(default)]
    correct: Option<bool>,
    /// What the answer should have been.
    #[serde(default)]
    expected: Option<String>,
    #[serde(default)]
    by: Option<String>,
}

#[derive(Serialize)]
pub struct FeedbackResponse {
    prediction_id: PredictionId,
    domain: String,
    expected: String,
    /// A correction was stored; false when the same feedback was given before, or the same
    /// answer to this input is stored already (the teacher's, say).
    stored: bool,
}

/// A person confirms (`{correct: true}`) or corrects (`{expected}`) a logged prediction; it
/// becomes a `source: human` correction linked to the prediction.
pub async fn feedback(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(raw_id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<FeedbackResponse>)> {
    let req: FeedbackRequest = parse_body(raw)?;
    let prediction = prediction_row(&state, &raw_id).await?;
    let domain = domain_row(&state, &prediction.domain).await?;
    if let Some(by) = &req.by {
        short_text("by", by, MAX_NAME_CHARS)?;
    }
    let by = who.actor(req.by.clone())?;
    let expected = match (req.correct, req.expected) {
        (Some(true), None) => prediction.prediction.output.clone(),
        (None | Some(false), Some(expected)) => expected,
        (Some(false), None) => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "expected: say what the answer should have been",
            ));
        }
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "request body: send either `correct: true` or `expected`",
            ));
        }
    };
    let correction = state
        .serving
        .feedback_correction(&domain, &prediction, &expected, &by)?;
    let outcome = state
        .db
        .insert_corrections(domain.id, std::slice::from_ref(&correction))
        .await?;
    if let Some(conflict) = outcome.conflicts.first() {
        return Err(ApiError::new(
            ErrorCode::IdempotencyConflict,
            format!(
                "prediction {}: other feedback was already given on it (`{}`); a steward can \
                 relabel the correction it became",
                prediction.prediction.id, conflict.client_id
            ),
        ));
    }
    if outcome.accepted > 0 {
        state
            .metrics
            .corrections_ingested
            .with_label_values(&[domain.spec.name.as_str()])
            .inc();
        state.nudge.notify_one();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(FeedbackResponse {
            prediction_id: prediction.prediction.id,
            domain: prediction.domain,
            expected: correction.expected,
            stored: outcome.accepted > 0,
        }),
    ))
}

/// Most tokens a generated answer may have, and the default.
pub const MAX_TOKENS: usize = 1_024;
const DEFAULT_MAX_TOKENS: usize = 256;

/// A request's `max_tokens`, checked.
pub fn max_tokens(asked: Option<usize>) -> ApiResult<usize> {
    match asked {
        None => Ok(DEFAULT_MAX_TOKENS),
        Some(n) if (1..=MAX_TOKENS).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("max_tokens: {n}; between 1 and {MAX_TOKENS}"),
        )),
    }
}

/// A logged prediction, or `404 prediction_not_found`.
pub async fn prediction_row(state: &AppState, raw: &str) -> ApiResult<PredictionRow> {
    let not_found = || {
        ApiError::new(
            ErrorCode::PredictionNotFound,
            format!("prediction `{raw}` was not logged (or is past its retention)"),
        )
    };
    let id = PredictionId::parse(raw).ok_or_else(not_found)?;
    state.serving.prediction(&id).await?.ok_or_else(not_found)
}

#[derive(Serialize)]
pub struct ServingView {
    domain: String,
    production: Option<String>,
    teacher: Option<TeacherView>,
    log_sample_rate: f64,
    canary_share: f64,
    shadow: Option<String>,
    /// The models this process holds for the domain now.
    resident: Vec<Resident>,
    /// Counts over logged predictions (all escalated ones; others as sampled).
    last_hour: ServingWindow,
    last_day: ServingWindow,
    /// How often each shadow version agreed with the live one, over the last day.
    shadow_last_day: Vec<ShadowAgreement>,
}

#[derive(Serialize)]
struct TeacherView {
    url: String,
    model: String,
    max_calls_per_hour: Option<u32>,
}

/// What serving looks like for a domain: its production version, teacher, resident models and
/// the escalation share over the last hour and day.
pub async fn serving(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<ServingView>> {
    let production = Promotion::new(&state.db, &state.registry)
        .production(&domain.spec.name)
        .await?
        .map(|v| v.0);
    let now = Utc::now();
    let last_hour = state
        .db
        .serving_window(domain.id, now - chrono::Duration::hours(1))
        .await?;
    let last_day = state
        .db
        .serving_window(domain.id, now - chrono::Duration::days(1))
        .await?;
    let shadow_last_day = state
        .db
        .shadow_agreement(domain.id, now - chrono::Duration::days(1))
        .await?;
    let serving = &domain.spec.serving;
    Ok(Json(ServingView {
        domain: domain.spec.name.to_string(),
        production,
        teacher: serving.teacher.as_ref().map(|t| TeacherView {
            url: t.url.clone(),
            model: t.model.clone(),
            max_calls_per_hour: t.max_calls_per_hour,
        }),
        log_sample_rate: serving.log_sample_rate,
        canary_share: serving.canary_share,
        shadow: serving.shadow.clone(),
        resident: state.serving.resident(domain.spec.name.as_str()),
        last_hour,
        last_day,
        shadow_last_day,
    }))
}
