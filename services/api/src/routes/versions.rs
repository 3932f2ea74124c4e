//! Versions: the list with production, the promotion report, a steward's approval or
//! rejection, rollback, and the audit log of every such decision. Promotion itself (the claim,
//! the alias move, the audit row) is `flywheel_promotion`'s; these handlers read the request
//! and answer.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use flywheel_db::{AuditEntry, VersionRow};
use flywheel_domain::{VersionId, VersionStatus};
use flywheel_promotion::{Promotion, Verdict};
use serde::{Deserialize, Serialize};

use super::shared::{
    Acting, ApiResult, Domain, List, Path, Query, check_reason, domain_row, parse_body, version_row,
};
use crate::{ApiError, AppState, ErrorCode};

pub async fn list(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<VersionList>> {
    let data = state.db.versions(domain.id).await?;
    let production = Promotion::new(&state.db, &state.registry)
        .production(&domain.spec.name)
        .await?;
    Ok(Json(VersionList { production, data }))
}

/// The list envelope, with the version production points at beside it.
#[derive(Serialize)]
pub struct VersionList {
    production: Option<VersionId>,
    data: Vec<VersionRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    #[serde(default)]
    format: ReportFormat,
}

/// `?format=`: the report as JSON (the default), Markdown or HTML.
#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum ReportFormat {
    #[default]
    Json,
    #[serde(alias = "markdown")]
    Md,
    Html,
}

pub async fn report(
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
    let (file, content_type) = match q.format {
        ReportFormat::Md => ("report.md", "text/markdown; charset=utf-8"),
        ReportFormat::Html => ("report.html", "text/html; charset=utf-8"),
        ReportFormat::Json => ("report.json", "application/json"),
    };
    let bytes = state
        .registry
        .read_file(&domain.spec.name, &version, file)
        .await?;
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

#[derive(Serialize)]
pub struct Decided {
    version: VersionId,
    status: VersionStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    production: Option<String>,
}

pub async fn approve(req: Acting<(String, String)>) -> ApiResult<Json<Decided>> {
    decide(req, VersionStatus::Promoted).await
}

pub async fn reject(req: Acting<(String, String)>) -> ApiResult<Json<Decided>> {
    decide(req, VersionStatus::Rejected).await
}

/// A steward's decision on a version awaiting approval: `to` is `promoted` or `rejected`.
async fn decide(
    (State(state), Extension(who), Path((name, version)), raw): Acting<(String, String)>,
    to: VersionStatus,
) -> ApiResult<Json<Decided>> {
    let review: Review = parse_body(raw)?;
    let by = who.actor(review.by)?;
    check_reason(&review.reason)?;
    let domain = domain_row(&state, &name).await?;
    let version = version_row(&state, &domain, &version).await?.version;
    let promotion = Promotion::new(&state.db, &state.registry);
    let production = if to == VersionStatus::Promoted {
        let moved = promotion
            .approve(&domain, &version, &by, &review.reason)
            .await?;
        Some(moved.to)
    } else {
        promotion
            .reject(&domain, &version, &by, &review.reason)
            .await?;
        None
    };
    Ok(Json(Decided {
        version,
        status: to,
        production,
    }))
}

/// Rows whose stored label the version's candidate confidently disagreed with, most confident
/// first (confident learning), for a steward to relabel or remove.
pub async fn label_issues(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<List<flywheel_evaluator::LabelIssue>>> {
    let domain = domain_row(&state, &name).await?;
    let row = version_row(&state, &domain, &version).await?;
    let evaluation = stored_evaluation(&state, &domain, &row).await?;
    Ok(Json(evaluation.label_issues.into()))
}

/// The evaluation a version was published with, from its `report.json`.
async fn stored_evaluation(
    state: &AppState,
    domain: &flywheel_db::DomainRow,
    row: &VersionRow,
) -> ApiResult<flywheel_evaluator::Evaluation> {
    let report = state
        .registry
        .read_file(&domain.spec.name, &row.version, "report.json")
        .await?;
    serde_json::from_slice::<serde_json::Value>(&report)
        .ok()
        .and_then(|r| serde_json::from_value(r["evaluation"].clone()).ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::VersionCorrupt,
                format!(
                    "version {}/{}: report.json holds no readable evaluation",
                    domain.spec.name, row.version
                ),
            )
        })
}

#[derive(Serialize)]
pub struct Reevaluated {
    version: VersionId,
    status: VersionStatus,
    /// The gate's decision under the policy as it is now.
    decision: flywheel_evaluator::Decision,
    policy_version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    production: Option<VersionId>,
}

/// Applies the gate again to a held-back version's stored evaluation, under the domain's
/// policy as it is now: after a policy change, a version the old rules held back can go live
/// (or await approval) without retraining. Only while the champion it was measured against
/// is still production; otherwise the comparison no longer holds.
pub async fn reevaluate(
    (State(state), Extension(who), Path((name, version)), raw): Acting<(String, String)>,
) -> ApiResult<Json<Reevaluated>> {
    let review: Review = parse_body(raw)?;
    let by = who.actor(review.by)?;
    check_reason(&review.reason)?;
    let domain = domain_row(&state, &name).await?;
    let row = version_row(&state, &domain, &version).await?;
    if row.status != VersionStatus::HeldBack {
        return Err(ApiError::new(
            ErrorCode::VersionNotHeldBack,
            format!(
                "version {name}/{} is {}; only a held-back version is judged again",
                row.version,
                row.status.as_str()
            ),
        ));
    }
    let evaluation = stored_evaluation(&state, &domain, &row).await?;
    let promotion = Promotion::new(&state.db, &state.registry);
    let production = promotion.production(&domain.spec.name).await?;
    if evaluation.champion_version() != production.as_ref().map(VersionId::as_str) {
        return Err(ApiError::new(
            ErrorCode::ChampionChanged,
            format!(
                "version {name}/{} was measured against {}, and production is {} now: the \
                 comparison no longer holds; start a new run instead",
                row.version,
                evaluation.champion_name,
                production
                    .as_ref()
                    .map_or("the base model", VersionId::as_str)
            ),
        ));
    }
    let decision = evaluation.regate(&domain.spec.policy);
    let mut summary = evaluation.summary(&decision);
    summary["policy_version"] = domain.policy_version.into();
    let verdict = Verdict::of(decision.promote, decision.awaiting_approval);
    let status = promotion
        .regate(
            &domain,
            &row.version,
            production.as_ref(),
            verdict,
            &by,
            &review.reason,
            &summary,
        )
        .await?;
    Ok(Json(Reevaluated {
        production: (status == VersionStatus::Promoted).then(|| row.version.clone()),
        version: row.version,
        status,
        decision,
        policy_version: domain.policy_version,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    to: String,
    #[serde(default)]
    by: Option<String>,
    reason: String,
}

#[derive(Serialize)]
pub struct RolledBack {
    production: String,
    from: Option<String>,
}

/// Points `production` back at a version that was live before.
pub async fn rollback(
    (State(state), Extension(who), Path(name), raw): Acting<String>,
) -> ApiResult<Json<RolledBack>> {
    let req: RollbackRequest = parse_body(raw)?;
    let by = who.actor(req.by)?;
    check_reason(&req.reason)?;
    let domain = domain_row(&state, &name).await?;
    let target = version_row(&state, &domain, &req.to).await?;
    let moved = Promotion::new(&state.db, &state.registry)
        .rollback(&domain, &target, &by, &req.reason)
        .await?;
    Ok(Json(RolledBack {
        production: moved.to,
        from: moved.from,
    }))
}

pub async fn audit_log(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<List<AuditEntry>>> {
    Ok(Json(state.db.audit_log(domain.id).await?.into()))
}
