//! What every process serves, API or not: liveness and Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use flywheel_domain::JobStatus;
use serde::Serialize;

use super::shared::ApiResult;
use crate::{ApiError, AppState, ErrorCode};

#[derive(Serialize)]
pub struct Health {
    status: &'static str,
}

pub async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state.db.ping().await?;
    Ok(Json(Health { status: "ok" }))
}

pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(want) = &state.metrics_token_hash {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .map(|t| flywheel_domain::auth::hash_token(t.trim()));
        // Hashes, not secrets, are compared, so the comparison's timing says nothing useful.
        if sent.as_ref() != Some(want) {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "/metrics needs `Authorization: Bearer <the metrics token>` on this server",
            ));
        }
    }
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
