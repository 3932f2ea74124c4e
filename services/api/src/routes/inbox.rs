//! What waits for a steward: every version awaiting approval and every held-back candidate
//! newer than production, across the caller's domains, newest first. The JSON list and the
//! console's inbox are the one list.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use flywheel_db::DomainRow;
use flywheel_domain::{VersionId, VersionStatus};
use flywheel_promotion::Promotion;
use serde::{Deserialize, Serialize};

use super::shared::{ApiResult, List, Query};
use crate::{AppState, Principal};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewQuery {
    #[serde(default)]
    state: ReviewState,
}

/// `?state=`: which reviews to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReviewState {
    /// Versions awaiting approval.
    Pending,
    /// Candidates the gate held back that are newer than production: a steward may override
    /// the gate, or judge them again under a changed policy.
    HeldBack,
    #[default]
    All,
}

/// One version that waits for a decision.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewItem {
    pub domain: String,
    pub version: VersionId,
    pub status: VersionStatus,
    pub champion_accuracy: Option<f64>,
    pub candidate_accuracy: Option<f64>,
    /// Candidate minus champion, on the same holdout.
    pub accuracy_change: Option<f64>,
    /// The gate rule that decided, and its reason.
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub age_seconds: i64,
}

pub async fn reviews(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<ReviewQuery>,
) -> ApiResult<Json<List<ReviewItem>>> {
    let visible = visible_domains(&state, &who).await?;
    Ok(Json(reviews_of(&state, &visible, q.state).await?.into()))
}

/// The domains `who` may see, each with the version production points at.
pub(crate) async fn visible_domains(
    state: &AppState,
    who: &Principal,
) -> ApiResult<Vec<(DomainRow, Option<VersionId>)>> {
    let promotion = Promotion::new(&state.db, &state.registry);
    let mut out = Vec::new();
    for domain in state.db.domains().await? {
        if who.sees(domain.spec.name.as_str()) {
            let production = promotion.production(&domain.spec.name).await?;
            out.push((domain, production));
        }
    }
    Ok(out)
}

/// The reviews waiting in `domains` (as [`visible_domains`] lists them), newest first.
pub(crate) async fn reviews_of(
    state: &AppState,
    domains: &[(DomainRow, Option<VersionId>)],
    which: ReviewState,
) -> ApiResult<Vec<ReviewItem>> {
    let mut out = Vec::new();
    for (domain, production) in domains {
        let name = domain.spec.name.to_string();
        let versions = state.db.versions(domain.id).await?;
        let live_since = versions
            .iter()
            .find(|v| Some(&v.version) == production.as_ref())
            .map(|v| v.created_at);
        for v in versions {
            let wanted = match v.status {
                VersionStatus::PendingApproval => which != ReviewState::HeldBack,
                // A candidate older than production was overtaken: nothing to decide.
                VersionStatus::HeldBack => {
                    which != ReviewState::Pending && live_since.is_none_or(|t| v.created_at > t)
                }
                _ => false,
            };
            if !wanted {
                continue;
            }
            let m = &v.metrics;
            let champion = m["champion_accuracy"].as_f64();
            let candidate = m["candidate_accuracy"].as_f64();
            out.push(ReviewItem {
                domain: name.clone(),
                version: v.version.clone(),
                status: v.status,
                champion_accuracy: champion,
                candidate_accuracy: candidate,
                accuracy_change: champion.zip(candidate).map(|(a, b)| b - a),
                rule: m["decision"]["rule"].as_str().map(str::to_owned),
                reason: m["decision"]["reason"].as_str().map(str::to_owned),
                age_seconds: (Utc::now() - v.created_at).num_seconds().max(0),
                created_at: v.created_at,
            });
        }
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    Ok(out)
}
