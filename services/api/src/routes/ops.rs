//! What every process serves, API or not: liveness and Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use flywheel_domain::JobStatus;
use serde::Serialize;

use super::shared::ApiResult;
use crate::AppState;

#[derive(Serialize)]
pub struct Health {
    status: &'static str,
}

pub async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state.db.ping().await?;
    Ok(Json(Health { status: "ok" }))
}

pub async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
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
