//! Versions: the list with production, the promotion report, a steward's approval or
//! rejection, rollback, and the audit log of every such decision. Promotion itself (the claim,
//! the alias move, the audit row) is `flywheel_promotion`'s; these handlers read the request
//! and answer.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use flywheel_db::{AuditEntry, DomainRow, VersionRow};
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
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ReportFormat {
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
    report_response(&state, &name, &version, q.format).await
}

/// A version's published report in `format`, with its status now and decision trail added.
pub(crate) async fn report_response(
    state: &AppState,
    name: &str,
    version: &str,
    format: ReportFormat,
) -> ApiResult<Response> {
    let domain = domain_row(state, name).await?;
    let row = version_row(state, &domain, version).await?;
    let live = live(state, &domain, &row).await?;
    let (file, content_type) = match format {
        ReportFormat::Md => ("report.md", "text/markdown; charset=utf-8"),
        ReportFormat::Html => ("report.html", "text/html; charset=utf-8"),
        ReportFormat::Json => ("report.json", "application/json"),
    };
    let bytes = state
        .registry
        .read_file(&domain.spec.name, &row.version, file)
        .await?;
    let corrupt = || {
        ApiError::new(
            ErrorCode::VersionCorrupt,
            format!("version {name}/{}: {file} is not readable", row.version),
        )
    };
    let body = match format {
        ReportFormat::Json => {
            let mut report: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|_| corrupt())?;
            report["live"] = serde_json::to_value(&live).expect("json");
            serde_json::to_vec_pretty(&report).expect("json")
        }
        ReportFormat::Md => {
            let text = String::from_utf8(bytes.to_vec()).map_err(|_| corrupt())?;
            live.into_markdown(&text).into_bytes()
        }
        ReportFormat::Html => {
            let text = String::from_utf8(bytes.to_vec()).map_err(|_| corrupt())?;
            live.into_html(&text).into_bytes()
        }
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// What became of a version after its evaluation: its status now, whether production points
/// at it, and every decision about it, oldest first (the gate's, then each approval,
/// rejection, override, rollback and alias move that named it).
#[derive(Serialize)]
pub struct Live {
    pub status: VersionStatus,
    pub production: bool,
    pub decisions: Vec<AuditEntry>,
    /// The version production points at now (this one or another), for callers that judge
    /// against it.
    #[serde(skip)]
    pub current: Option<VersionId>,
}

pub(crate) async fn live(
    state: &AppState,
    domain: &DomainRow,
    row: &VersionRow,
) -> ApiResult<Live> {
    let production = Promotion::new(&state.db, &state.registry)
        .production(&domain.spec.name)
        .await?;
    let named = |e: &AuditEntry| {
        e.version.as_deref() == Some(row.version.as_str())
            || e.data
                .as_ref()
                .is_some_and(|d| d["from"].as_str() == Some(row.version.as_str()))
    };
    let decisions = state
        .db
        .audit_log(domain.id)
        .await?
        .into_iter()
        .filter(named)
        .collect();
    Ok(Live {
        status: row.status,
        production: production.as_ref() == Some(&row.version),
        decisions,
        current: production,
    })
}

/// A version's status as a steward says it.
pub(crate) fn status_words(status: VersionStatus) -> &'static str {
    match status {
        VersionStatus::Promoted => "promoted",
        VersionStatus::PendingApproval => "awaiting approval",
        VersionStatus::HeldBack => "held back",
        VersionStatus::Rejected => "rejected",
    }
}

impl Live {
    fn headline(&self) -> String {
        let now = status_words(self.status);
        match (self.status, self.production) {
            (_, true) => format!("{now}, serving as production"),
            (VersionStatus::Promoted, false) => format!("{now}, no longer production"),
            _ => now.to_owned(),
        }
    }

    /// The stored Markdown with the status now and the decision trail under its title.
    fn into_markdown(self, stored: &str) -> String {
        let mut live = format!(
            "**Status now:** {}.\n\n## Decision trail\n\n",
            self.headline()
        );
        live.push_str("| when (UTC) | who | what | reason |\n|---|---|---|---|\n");
        for d in &self.decisions {
            live.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                d.at.format("%Y-%m-%d %H:%M:%S"),
                cell(&d.actor),
                cell(&what(d)),
                cell(&d.reason)
            ));
        }
        live.push('\n');
        match stored.split_once("\n\n") {
            Some((title, rest)) => format!("{title}\n\n{live}{rest}"),
            None => format!("{stored}\n\n{live}"),
        }
    }

    /// The stored HTML with the status now and the decision trail where the report marks
    /// their place (under the title), or at the top of the body of an older report.
    fn into_html(self, stored: &str) -> String {
        use flywheel_evaluator::escape_html as esc;
        let mut live = format!(
            "<p><b>Status now:</b> <span class=\"badge {}\">{}</span></p>\n<h2>Decision trail</h2><style>.trail td,.trail th{{text-align:left!important}}</style><table class=\"trail\"><tr><th>when (UTC)</th><th>who</th><th>what</th><th>reason</th></tr>",
            match self.status {
                VersionStatus::Promoted => "ok",
                VersionStatus::PendingApproval => "wait",
                _ => "no",
            },
            esc(&self.headline())
        );
        for d in &self.decisions {
            live.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                d.at.format("%Y-%m-%d %H:%M:%S"),
                esc(&d.actor),
                esc(&what(d)),
                esc(&d.reason)
            ));
        }
        live.push_str("</table>");
        if stored.contains(flywheel_evaluator::LIVE_MARKER) {
            stored.replacen(flywheel_evaluator::LIVE_MARKER, &live, 1)
        } else {
            stored.replacen("<body>", &format!("<body>{live}"), 1)
        }
    }
}

/// What a trail row did, with the alias move it made: a row about another version's move
/// (production leaving this one) says so.
fn what(d: &AuditEntry) -> String {
    let Some(data) = &d.data else {
        return d.action.replace('_', " ");
    };
    match (data["alias"].as_str(), data["to"].as_str()) {
        (Some(alias), Some(to)) => format!(
            "{} ({alias}: {} → {to})",
            d.action.replace('_', " "),
            data["from"].as_str().unwrap_or("none")
        ),
        _ => d.action.replace('_', " "),
    }
}

/// Text for a Markdown table cell: one line, no column breaks.
fn cell(s: &str) -> String {
    s.replace('\n', " ").replace('|', "\\|")
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
    decide_request(req, Step::Approve).await
}

pub async fn reject(req: Acting<(String, String)>) -> ApiResult<Json<Decided>> {
    decide_request(req, Step::Reject).await
}

pub async fn override_hold(req: Acting<(String, String)>) -> ApiResult<Json<Decided>> {
    decide_request(req, Step::Override).await
}

/// A steward's decision on one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// A version awaiting approval goes live.
    Approve,
    /// A version awaiting approval never will.
    Reject,
    /// A held-back version goes live over the gate.
    Override,
}

async fn decide_request(
    (State(state), Extension(who), Path((name, version)), raw): Acting<(String, String)>,
    step: Step,
) -> ApiResult<Json<Decided>> {
    let review: Review = parse_body(raw)?;
    let by = who.actor(review.by)?;
    let domain = domain_row(&state, &name).await?;
    Ok(Json(
        decide(&state, &domain, &version, step, &by, &review.reason).await?,
    ))
}

/// Carries out a steward's decision, for the API and the console alike: the reason is
/// checked, the version found, and promotion does the rest.
pub(crate) async fn decide(
    state: &AppState,
    domain: &DomainRow,
    version: &str,
    step: Step,
    by: &str,
    reason: &str,
) -> ApiResult<Decided> {
    let row = version_row(state, domain, version).await?;
    check_reason(reason)?;
    let version = row.version.clone();
    let promotion = Promotion::new(&state.db, &state.registry);
    let (status, production) = match step {
        Step::Approve => {
            let moved = promotion.approve(domain, &version, by, reason).await?;
            (VersionStatus::Promoted, Some(moved.to))
        }
        Step::Override => {
            if row.status != VersionStatus::HeldBack {
                return Err(flywheel_promotion::PromotionError::NotHeldBack {
                    domain: domain.spec.name.to_string(),
                    version,
                }
                .into());
            }
            let evaluation = stored_evaluation(state, domain, &row).await?;
            let champion = same_champion(state, domain, &row, &evaluation).await?;
            let moved = promotion
                .override_hold(domain, &version, champion.as_ref(), by, reason)
                .await?;
            (VersionStatus::Promoted, Some(moved.to))
        }
        Step::Reject => {
            promotion.reject(domain, &version, by, reason).await?;
            (VersionStatus::Rejected, None)
        }
    };
    Ok(Decided {
        version,
        status,
        production,
    })
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

/// A version's published `report.json`, whole, with the evaluation in it read out.
pub(crate) async fn stored_report(
    state: &AppState,
    domain: &DomainRow,
    version: &VersionId,
) -> ApiResult<(serde_json::Value, flywheel_evaluator::Evaluation)> {
    let bytes = state
        .registry
        .read_file(&domain.spec.name, version, "report.json")
        .await?;
    let corrupt = || {
        ApiError::new(
            ErrorCode::VersionCorrupt,
            format!(
                "version {}/{version}: report.json holds no readable evaluation",
                domain.spec.name
            ),
        )
    };
    let report: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| corrupt())?;
    let evaluation = serde_json::from_value(report["evaluation"].clone()).map_err(|_| corrupt())?;
    Ok((report, evaluation))
}

/// The evaluation a version was published with, from its `report.json`.
pub(crate) async fn stored_evaluation(
    state: &AppState,
    domain: &DomainRow,
    row: &VersionRow,
) -> ApiResult<flywheel_evaluator::Evaluation> {
    Ok(stored_report(state, domain, &row.version).await?.1)
}

/// Production as it is now, if it is still the champion `row` was measured against; else
/// `409 champion_changed`: the comparison no longer holds.
async fn same_champion(
    state: &AppState,
    domain: &DomainRow,
    row: &VersionRow,
    evaluation: &flywheel_evaluator::Evaluation,
) -> ApiResult<Option<VersionId>> {
    let production = Promotion::new(&state.db, &state.registry)
        .production(&domain.spec.name)
        .await?;
    if evaluation.champion_version() != production.as_ref().map(VersionId::as_str) {
        return Err(ApiError::new(
            ErrorCode::ChampionChanged,
            format!(
                "version {}/{} was measured against {}, and production is {} now: the \
                 comparison no longer holds; start a new run instead",
                domain.spec.name,
                row.version,
                evaluation.champion_name,
                production
                    .as_ref()
                    .map_or("the base model", VersionId::as_str)
            ),
        ));
    }
    Ok(production)
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
    let production = same_champion(&state, &domain, &row, &evaluation).await?;
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
    pub production: String,
    from: Option<String>,
}

/// Points `production` back at a version that was live before.
pub async fn rollback(
    (State(state), Extension(who), Path(name), raw): Acting<String>,
) -> ApiResult<Json<RolledBack>> {
    let req: RollbackRequest = parse_body(raw)?;
    let by = who.actor(req.by)?;
    let domain = domain_row(&state, &name).await?;
    Ok(Json(
        roll_back(&state, &domain, &req.to, &by, &req.reason).await?,
    ))
}

/// Points production back at `to`, for the API and the console alike.
pub(crate) async fn roll_back(
    state: &AppState,
    domain: &DomainRow,
    to: &str,
    by: &str,
    reason: &str,
) -> ApiResult<RolledBack> {
    let target = version_row(state, domain, to).await?;
    check_reason(reason)?;
    let moved = Promotion::new(&state.db, &state.registry)
        .rollback(domain, &target, by, reason)
        .await?;
    Ok(RolledBack {
        production: moved.to,
        from: moved.from,
    })
}

pub async fn audit_log(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<List<AuditEntry>>> {
    Ok(Json(state.db.audit_log(domain.id).await?.into()))
}
