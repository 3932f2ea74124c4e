//! The route table, and the router built from it. Handlers live by resource, one file each.

mod aliases;
mod chat;
mod corrections;
mod domains;
pub(crate) mod inbox;
mod jobs;
mod ops;
mod predict;
mod review;
pub(crate) mod shared;
mod sources;
mod tokens;
pub(crate) mod versions;

use axum::Json;

use crate::route::{
    ADMIN_ONLY, ANY_ROLE, ANY_ROLE_OF_DOMAIN, Access, DEPARTMENT_OF_DOMAIN, DEPARTMENT_OF_JOB,
    DEPARTMENTS, JUDGE_OF_PREDICTION, PREDICTOR_OF_DOMAIN, PREDICTORS, PROBE, PUBLIC, Route,
    STEWARD_OF_DOMAIN, routes,
};
use crate::{ApiError, AppState, ErrorCode, Surface};

/// Every route the API serves: the router, the permission check (`auth`) and `/openapi.json`
/// are all read from here.
pub static ROUTES: &[Route] = routes![
    Get "/healthz" => ops::healthz, PROBE, 200,
        "Readiness: the database answers.", "";
    Get "/livez" => ops::livez, PROBE, 200,
        "Liveness: the process answers (a database outage does not restart it).", "";
    Get "/metrics" => ops::metrics, PROBE, 200,
        "Prometheus metrics (`flywheel_*`).", "";
    Get "/openapi.json" => self::openapi, PUBLIC, 200,
        "This document.", "";
    Post "/v1/domains" => domains::create, ADMIN_ONLY, 201,
        "Register a domain.", "{name, task: classification|generation, base_model: sha256:…|path, labels, policy?, training?: \"auto\"|{n_epochs, batch_size, learning_rate_multiplier, lora: {r, alpha, dropout, target_modules}, max_seq_len, early_stopping, auto_search?: {trials}}, out_of_scope_label?, serving?: {teacher?: {url, model, api_key_env?, prompt?, timeout_ms?, max_calls_per_hour?}, log_sample_rate?, log_retention_days?, canary_share?, shadow?}, sources?: [{name, files: s3://…|gs://…|az://…|/dir, format?: jsonl|csv|parquet, options?} or {name, table, cursor, connection|connection_env}, with mapping: {input, expected, model_output?, client_id?, source?, teacher?, metadata?: [...]}, interval_seconds?, on_change?: skip|reread]}";
    Get "/v1/domains" => domains::list, ANY_ROLE, 200,
        "The domains the caller may see, with correction counts and production version.", "";
    Get "/v1/domains/{domain}" => domains::get, ANY_ROLE_OF_DOMAIN, 200,
        "One domain.", "";
    Patch "/v1/domains/{domain}" => domains::change, STEWARD_OF_DOMAIN, 200,
        "Change a domain's policy or training block (JSON merge patches of them), out-of-scope label, or add labels; a new policy version, audited. Stewards may change the gate and approval rules only.", "{policy?: {...}, training?: {...}, labels?: [current..., added...], out_of_scope_label?, serving?: {...}, sources?: [...] (the whole list), reason, by? (without auth)}";
    Get "/v1/domains/{domain}/policy/history" => domains::policy_history, ANY_ROLE_OF_DOMAIN, 200,
        "Every version of the domain's policy: the whole policy, who set it, when and why.", "";
    Post "/v1/domains/{domain}/corrections" => corrections::post, DEPARTMENT_OF_DOMAIN, 202,
        "Send corrections: one object, a JSON array or {corrections: [...]}, or NDJSON (application/x-ndjson). 202 after a durable commit.", "{client_id?, input, model_output?, expected, source?: human|teacher, teacher?, metadata?}";
    Get "/v1/domains/{domain}/corrections" => review::list, STEWARD_OF_DOMAIN, 200,
        "The domain's corrections, oldest first: filter by expected, split, source, since/until (RFC 3339), q (text in the input), include_removed; page with after and limit (100, at most 1,000).", "";
    Get "/v1/domains/{domain}/corrections/conflicts" => review::conflicts, STEWARD_OF_DOMAIN, 200,
        "Inputs stored with more than one expected answer, with the ids saying each; they train and evaluate nothing until resolved.", "";
    Patch "/v1/domains/{domain}/corrections/{id}" => review::relabel, STEWARD_OF_DOMAIN, 200,
        "Relabel a correction (checked and redacted as ingestion would; its split stays); audited.", "{expected, reason, by? (without auth)}";
    Delete "/v1/domains/{domain}/corrections/{id}" => review::remove, STEWARD_OF_DOMAIN, 200,
        "Remove a correction: tombstoned, audited, left out of every later snapshot.", "{reason, by? (without auth)}";
    Get "/v1/domains/{domain}/sources" => sources::list, ANY_ROLE_OF_DOMAIN, 200,
        "The domain's ingestion sources (files under an object-store prefix, or a PostgreSQL table): each with its poll status and lag, rows ingested, duplicate, rejected and dropped for personal data, and its files most recently read first, each with its first refusals by line or row (?state=reading|done|quarantined|changed, ?limit= 20, at most 500).", "";
    Get "/v1/domains/{domain}/jobs" => jobs::of_domain, DEPARTMENT_OF_DOMAIN, 200,
        "The domain's fine-tune jobs, newest first.", "";
    Post "/v1/domains/{domain}/jobs" => jobs::start, DEPARTMENT_OF_DOMAIN, 201,
        "Start a run now on every correction so far, optionally overriding fields of the domain's training block.", "{training?: {...}} (optional)";
    Get "/v1/domains/{domain}/versions" => versions::list, ANY_ROLE_OF_DOMAIN, 200,
        "Every evaluated version with its metrics and gate decision.", "";
    Get "/v1/domains/{domain}/versions/{version}/report" => versions::report, ANY_ROLE_OF_DOMAIN, 200,
        "The evaluation report as published, with the version's status now and its decision trail added (?format=md|html; JSON by default, the trail under `live`).", "";
    Post "/v1/domains/{domain}/versions/{version}/approve" => versions::approve, STEWARD_OF_DOMAIN, 200,
        "Approve a version awaiting approval; production moves to it.", "{reason, by? (without auth)}";
    Get "/v1/domains/{domain}/versions/{version}/label-issues" => versions::label_issues, STEWARD_OF_DOMAIN, 200,
        "Stored rows whose label the version's candidate confidently disagreed with (confident learning), most confident first.", "";
    Post "/v1/domains/{domain}/versions/{version}/reevaluate" => versions::reevaluate, STEWARD_OF_DOMAIN, 200,
        "Apply the gate again to a held-back version's stored evaluation under the current policy, without retraining; production moves if it now passes (409 champion_changed once production has moved on).", "{reason, by? (without auth)}";
    Post "/v1/domains/{domain}/versions/{version}/reject" => versions::reject, STEWARD_OF_DOMAIN, 200,
        "Reject a version awaiting approval.", "{reason, by? (without auth)}";
    Post "/v1/domains/{domain}/versions/{version}/override" => versions::override_hold, STEWARD_OF_DOMAIN, 200,
        "Promote a held-back version over the gate's decision, with a reason: production moves to it, audited as `override`.", "{reason, by? (without auth)}";
    Post "/v1/domains/{domain}/rollback" => versions::rollback, STEWARD_OF_DOMAIN, 200,
        "Point production back at a version that was live.", "{to, reason, by? (without auth)}";
    Get "/v1/domains/{domain}/audit" => versions::audit_log, STEWARD_OF_DOMAIN, 200,
        "Every gate decision, approval, rejection, rollback and alias move.", "";
    Get "/v1/domains/{domain}/aliases/{alias}" => aliases::get, ANY_ROLE_OF_DOMAIN, 200,
        "For serving fleets: version, file URLs and sha256, base model, escalation threshold.", "";
    Put "/v1/domains/{domain}/aliases/{alias}" => aliases::move_by_hand, STEWARD_OF_DOMAIN, 200,
        "Move a non-production alias (compare-and-swap with `expected`).", "{to, expected?: version|null, reason, by? (without auth)}";
    Get "/v1/domains/{domain}/aliases/{alias}/history" => aliases::history, ANY_ROLE_OF_DOMAIN, 200,
        "Every move of an alias.", "";
    Post "/v1/domains/{domain}/predict" => predict::predict, PREDICTOR_OF_DOMAIN, 200,
        "Answer with the model the alias names (?alias=, production by default, or canary for the domain's canary_share); below its escalation threshold, or with no model yet, the domain's teacher answers and its answer becomes a `source: teacher` correction. One object per input with output (a label, or generated text), confidence, escalated, answered_by, version and prediction_id.", "{input} or {inputs: [...]} (at most 256), max_tokens? (generation, 256, at most 1024)";
    Get "/v1/domains/{domain}/serving" => predict::serving, ANY_ROLE_OF_DOMAIN, 200,
        "How the domain is served: production version, teacher, the models resident in this process, escalation share over the last hour and day.", "";
    Post "/v1/chat/completions" => chat::completions, PREDICTORS, 200,
        "OpenAI-compatible chat completions: `model` is a domain (`<domain>@<alias>` for an alias), the last user message is the input, the answer is the model's or, below its escalation threshold, the teacher's; `stream: true` answers as server-sent chunks. The token's scope is checked against `model`.", "{model, messages: [{role, content}], max_tokens?, stream?}";
    Post "/v1/predictions/{id}/feedback" => predict::feedback, JUDGE_OF_PREDICTION, 202,
        "Confirm or correct a logged prediction: it becomes a `source: human` correction linked to it.", "{correct: true} or {expected}, by? (without auth)";
    Get "/v1/reviews" => inbox::reviews, ANY_ROLE, 200,
        "What waits for a steward across the caller's domains, newest first: versions awaiting approval and held-back candidates newer than production (?state=pending|held_back|all; all by default), with the accuracy change and the deciding rule.", "";
    Get "/v1/jobs" => jobs::all, DEPARTMENTS, 200,
        "Jobs across the caller's domains (?status=&limit=).", "";
    Get "/v1/jobs/{id}" => jobs::get, DEPARTMENT_OF_JOB, 200,
        "One job.", "";
    Get "/v1/jobs/{id}/events" => jobs::events, DEPARTMENT_OF_JOB, 200,
        "A job's progress events (?after=N).", "";
    Get "/v1/jobs/{id}/checkpoints" => jobs::checkpoints, DEPARTMENT_OF_JOB, 200,
        "The training checkpoints a job saved, newest first: step, loss, where it is staged.", "";
    Post "/v1/jobs/{id}/cancel" => jobs::cancel, DEPARTMENT_OF_JOB, 200,
        "Cancel a queued or training job.", "";
    Post "/v1/tokens" => tokens::create, ADMIN_ONLY, 201,
        "Create an API token; its secret is in this response only.", "{name, role: admin|department|steward|serving, domains?}";
    Get "/v1/tokens" => tokens::list, ADMIN_ONLY, 200,
        "API tokens, without secrets.", "";
    Patch "/v1/tokens/{id}" => tokens::rescope, ADMIN_ONLY, 200,
        "Change the domains a department or steward token may act on.", "{domains: [...]}";
    Delete "/v1/tokens/{id}" => tokens::revoke, ADMIN_ONLY, 204,
        "Revoke a token.", "";
];

/// `/openapi.json`, built from the table.
async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document(ROUTES))
}

/// The routes `surface` serves, from [`ROUTES`].
pub fn router(surface: Surface) -> axum::Router<AppState> {
    ROUTES
        .iter()
        .filter(|r| surface == Surface::Full || r.access == Access::Probe)
        .fold(axum::Router::new(), |router, r| {
            router.route(r.path, (r.handler)(r.verb.filter()))
        })
}

/// A path no route serves: `404 route_not_found`.
pub fn no_route() -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, "no such route")
}

/// A route called with a method it does not take: `405 method_not_allowed`.
pub fn wrong_method(method: &axum::http::Method) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("this route does not take {method}; see /openapi.json"),
    )
}
