//! A domain's ingestion sources: what each reads, when it was polled, and what it took and
//! refused, file by file.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use flywheel_db::{IngestTotals, IngestUnit};
use flywheel_domain::SourceSpec;
use serde::{Deserialize, Serialize};

use super::shared::{ApiResult, Domain, Query};
use crate::{ApiError, AppState, ErrorCode};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesQuery {
    /// Only files in this state: `reading`, `done`, `quarantined` or `changed`.
    state: Option<String>,
    /// Files listed per source, most recently read first (20; at most 500).
    limit: Option<i64>,
}

#[derive(Serialize)]
pub struct SourcesView {
    sources: Vec<SourceView>,
}

#[derive(Serialize)]
struct SourceView {
    #[serde(flatten)]
    spec: SourceSpec,
    status: SourceStatus,
    /// Rows over every file (or the table), and files by state.
    totals: IngestTotals,
    /// Files most recently read first (or the table's one entry, whose `position` is the
    /// last cursor value stored).
    units: Vec<IngestUnit>,
}

#[derive(Serialize, Default)]
struct SourceStatus {
    /// A poll is under way.
    polling: bool,
    next_poll_at: Option<DateTime<Utc>>,
    polled_at: Option<DateTime<Utc>>,
    /// When a poll last read everything there was.
    caught_up_at: Option<DateTime<Utc>>,
    /// Seconds since then (since the source was added, if never).
    lag_seconds: Option<i64>,
    last_error: Option<String>,
}

const UNIT_STATES: [&str; 4] = ["reading", "done", "quarantined", "changed"];

/// Every source of the domain with its status, totals and recent files.
pub async fn list(
    State(state): State<AppState>,
    Domain(domain): Domain,
    Query(q): Query<SourcesQuery>,
) -> ApiResult<Json<SourcesView>> {
    if let Some(s) = &q.state
        && !UNIT_STATES.contains(&s.as_str())
    {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("state: `{s}` is not one of {}", UNIT_STATES.join(", ")),
        ));
    }
    let limit = q.limit.unwrap_or(20);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "limit: between 1 and 500",
        ));
    }
    let states = state.db.source_states(domain.id).await?;
    let now = Utc::now();
    let mut sources = Vec::new();
    for spec in &domain.spec.sources {
        let status = states
            .iter()
            .find(|s| s.source == spec.name)
            .map(|s| SourceStatus {
                polling: s.claimed_until.is_some_and(|until| until > now),
                next_poll_at: Some(s.next_poll_at),
                polled_at: s.polled_at,
                caught_up_at: s.caught_up_at,
                lag_seconds: Some(
                    (now - s.caught_up_at.unwrap_or(domain.created_at))
                        .num_seconds()
                        .max(0),
                ),
                last_error: s.last_error.clone(),
            })
            .unwrap_or_default();
        sources.push(SourceView {
            status,
            totals: state.db.ingest_totals(domain.id, &spec.name).await?,
            units: state
                .db
                .ingest_units(domain.id, &spec.name, q.state.as_deref(), limit)
                .await?,
            spec: spec.clone(),
        });
    }
    Ok(Json(SourcesView { sources }))
}
