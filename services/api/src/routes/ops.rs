//! What every process serves, API or not: liveness and Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use flywheel_domain::{JobStatus, VersionStatus};
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

/// The process is alive; nothing else is asked, so a database outage of a minute does not
/// have every worker restarted in the middle of training.
pub async fn livez() -> Json<Health> {
    Json(Health { status: "ok" })
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
    if state.deployment_gauges {
        deployment_gauges(&state).await?;
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response())
}

/// The gauges read from the database, fresh at each scrape of the scheduler's process.
async fn deployment_gauges(state: &AppState) -> ApiResult<()> {
    let m = &state.metrics;
    let job_counts = state.db.job_counts().await?;
    for domain in state.db.domains().await? {
        let name = [domain.spec.name.as_str()];
        for status in JobStatus::ALL {
            let n = job_counts
                .iter()
                .find(|(d, s, _)| d == name[0] && s == status)
                .map_or(0, |(_, _, n)| *n);
            m.jobs.with_label_values(&[name[0], status.as_str()]).set(n);
        }
        if let Some(moved) = state
            .registry
            .resolve(&domain.spec.name, "production")
            .await?
        {
            let number = moved.to.trim_start_matches('v').parse().unwrap_or(0);
            m.production_version.with_label_values(&name).set(number);
            m.production_moved_timestamp_seconds
                .with_label_values(&name)
                .set(moved.at.timestamp());
        }
        let pending = state
            .db
            .versions(domain.id)
            .await?
            .iter()
            .filter(|v| v.status == VersionStatus::PendingApproval)
            .count();
        m.versions_pending_approval
            .with_label_values(&name)
            .set(pending as i64);
        let untrained = state
            .db
            .trigger_state(domain.id, domain.created_at)
            .await?
            .new_corrections;
        m.corrections_untrained
            .with_label_values(&name)
            .set(untrained);
        let states = state.db.source_states(domain.id).await?;
        let now = chrono::Utc::now();
        for source in &domain.spec.sources {
            let labels = [name[0], source.name.as_str()];
            let since = states
                .iter()
                .find(|s| s.source == source.name)
                .and_then(|s| s.caught_up_at)
                .unwrap_or(domain.created_at);
            m.source_lag_seconds
                .with_label_values(&labels)
                .set((now - since).num_seconds().max(0));
            let totals = state.db.ingest_totals(domain.id, &source.name).await?;
            for (unit_state, n) in [
                ("reading", totals.reading),
                ("done", totals.done),
                ("quarantined", totals.quarantined),
                ("changed", totals.changed),
            ] {
                m.source_files
                    .with_label_values(&[labels[0], labels[1], unit_state])
                    .set(n);
            }
        }
    }
    m.webhook_deliveries_pending
        .with_label_values::<&str>(&[])
        .set(state.db.outbox_counts().await?.pending);
    if let Some(bytes) = state.db.wal_bytes().await? {
        m.database_wal_bytes
            .with_label_values::<&str>(&[])
            .set(bytes as i64);
    }
    Ok(())
}
