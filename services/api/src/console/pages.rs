//! The pages a steward reads: the inbox, a domain, its jobs, a version. Each gathers what
//! the API would answer and hands it to a template; nothing here decides anything.

use axum::Extension;
use axum::extract::State;
use chrono::{DateTime, Utc};
use flywheel_db::{AuditEntry, DomainRow, JobRow};
use flywheel_domain::{JobStatus, Role, VersionStatus};
use flywheel_evaluator::{Evaluation, FLIPS_SHOWN, LabelMetrics};
use flywheel_promotion::{PRODUCTION, Promotion};
use serde::Serialize;

use super::session::Session;
use super::{PageResult, charts, render};
use crate::routes::inbox::{ReviewState, reviews_of, visible_domains};
use crate::routes::shared::{Path, domain_row, version_row};
use crate::routes::versions::{ReportFormat, live, report_response, status_words, stored_report};
use crate::{AppState, Principal};

/// What every page's frame shows: who is signed in and the anti-forgery token for its forms.
#[derive(Serialize)]
struct Frame {
    user: String,
    role: &'static str,
    csrf: String,
    /// Whether the caller may decide (approve, reject, override, roll back, move aliases).
    decides: bool,
}

impl Frame {
    fn new(who: &Principal, session: &Session) -> Self {
        Self {
            user: who.name.clone(),
            role: who.role.as_str(),
            csrf: session.csrf.clone(),
            decides: matches!(who.role, Role::Admin | Role::Steward),
        }
    }
}

/// "3 minutes ago", for ages a person reads at a glance.
fn ago(at: DateTime<Utc>) -> String {
    let s = (Utc::now() - at).num_seconds().max(0);
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

pub async fn inbox(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(session): Extension<Session>,
) -> PageResult {
    let visible = visible_domains(&state, &who).await?;
    let reviews: Vec<_> = reviews_of(&state, &visible, ReviewState::All)
        .await?
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "domain": r.domain,
                "version": r.version,
                "status": status_words(r.status),
                "pending": r.status == VersionStatus::PendingApproval,
                "champion": r.champion_accuracy,
                "candidate": r.candidate_accuracy,
                "change": r.accuracy_change,
                "rule": r.rule,
                "reason": r.reason,
                "age": ago(r.created_at),
            })
        })
        .collect();
    let domains: Vec<_> = visible
        .iter()
        .map(|(d, production)| {
            serde_json::json!({
                "name": d.spec.name,
                "task": d.spec.task,
                "production": production,
            })
        })
        .collect();
    Ok(render(
        "inbox.html",
        minijinja::context! {
            title => "Inbox",
            frame => Frame::new(&who, &session),
            reviews => reviews,
            domains => domains,
        },
    ))
}

/// A job as the domain page lists it: what it is doing and, while training, how far along.
#[derive(Serialize)]
struct JobLine {
    id: String,
    status: &'static str,
    stage: String,
    trigger: String,
    version: Option<String>,
    age: String,
    running: bool,
    step: Option<u64>,
    total_steps: Option<u64>,
    loss: Option<f64>,
    eta: Option<String>,
    error: Option<String>,
}

async fn job_lines(state: &AppState, domain: &DomainRow) -> PageResult<Vec<JobLine>> {
    let mut lines = Vec::new();
    for job in state.db.jobs_of(domain.id).await?.into_iter().take(10) {
        lines.push(job_line(state, job).await?);
    }
    Ok(lines)
}

async fn job_line(state: &AppState, job: JobRow) -> PageResult<JobLine> {
    let running = job.status == JobStatus::Running;
    let (mut step, mut total_steps, mut loss, mut eta) = (None, None, None, None);
    if running {
        let last = state
            .db
            .events(&job.id, 0)
            .await?
            .into_iter()
            .rev()
            .find(|e| e.kind == "metrics");
        if let Some(data) = last.and_then(|e| e.data) {
            step = data["step"].as_u64();
            total_steps = data["total_steps"].as_u64();
            loss = data["loss"].as_f64();
            // The rate so far, from the stage's start, says how long the rest will take.
            if let (Some(s), Some(t), Some(started)) = (step, total_steps, job.started_at)
                && s > 0
            {
                let spent = (Utc::now() - started).num_seconds().max(0) as f64;
                let left = spent * (t.saturating_sub(s)) as f64 / s as f64;
                eta = Some(format!("~{} s", left.round() as i64));
            }
        }
    }
    Ok(JobLine {
        id: job.id.to_string(),
        status: job.status.as_str(),
        stage: job.stage,
        trigger: job.trigger,
        version: job.version.map(|v| v.0),
        age: ago(job.created_at),
        running,
        step,
        total_steps,
        loss,
        eta,
        error: job.error,
    })
}

pub async fn jobs(State(state): State<AppState>, Path(name): Path<String>) -> PageResult {
    let domain = domain_row(&state, &name).await?;
    let jobs = job_lines(&state, &domain).await?;
    Ok(render(
        "jobs.html",
        minijinja::context! { domain => name, jobs => jobs },
    ))
}

pub async fn domain(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> PageResult {
    let domain = domain_row(&state, &name).await?;
    let promotion = Promotion::new(&state.db, &state.registry);
    let production = promotion.production(&domain.spec.name).await?;
    let versions = state.db.versions(domain.id).await?;
    let (train, holdout) = state.db.correction_counts(domain.id).await?;
    let backlog = state
        .db
        .trigger_state(domain.id, domain.created_at)
        .await?
        .new_corrections;
    // Threshold and coverage of what production serves, from its own evaluation.
    let routing = match &production {
        Some(v) => stored_report(&state, &domain, v)
            .await
            .ok()
            .map(|(_, e)| e.routing),
        None => None,
    };
    let points: Vec<charts::Point> = versions
        .iter()
        .filter_map(|v| {
            Some(charts::Point {
                label: v.version.0.clone(),
                value: v.metrics["candidate_accuracy"].as_f64()?,
                live: Some(&v.version) == production.as_ref(),
                status: v.status.as_str(),
            })
        })
        .collect();
    let history = state
        .registry
        .alias_history(&domain.spec.name, PRODUCTION)
        .await?;
    let aliases: Vec<_> = history
        .iter()
        .rev()
        .take(20)
        .map(|m| {
            serde_json::json!({
                "from": m.from, "to": m.to, "by": m.by, "reason": m.reason,
                "at": m.at.format("%Y-%m-%d %H:%M").to_string(),
            })
        })
        .collect();
    let audit: Vec<_> = state
        .db
        .audit_log(domain.id)
        .await?
        .into_iter()
        .rev()
        .take(50)
        .map(trail_row)
        .collect();
    let version_rows: Vec<_> = versions
        .iter()
        .rev()
        .map(|v| {
            serde_json::json!({
                "version": v.version,
                "status": status_words(v.status),
                "status_class": v.status.as_str(),
                "accuracy": v.metrics["candidate_accuracy"].as_f64(),
                "champion": v.metrics["champion_accuracy"].as_f64(),
                "live": Some(&v.version) == production.as_ref(),
                "age": ago(v.created_at),
            })
        })
        .collect();
    Ok(render(
        "domain.html",
        minijinja::context! {
            title => name,
            frame => Frame::new(&who, &session),
            domain => name,
            task => domain.spec.task,
            production => production,
            threshold => routing.as_ref().and_then(|r| r.threshold),
            coverage => routing.as_ref().map(|r| r.coverage),
            routed_accuracy => routing.as_ref().map(|r| r.accuracy),
            target => domain.spec.policy.target_accuracy,
            train => train,
            holdout => holdout,
            backlog => backlog,
            chart => charts::accuracy_over_versions(&points),
            versions => version_rows,
            jobs => job_lines(&state, &domain).await?,
            sources => source_lines(&state, &domain).await?,
            aliases => aliases,
            audit => audit,
        },
    ))
}

/// The domain's ingestion sources as the domain page lists them: what each reads, how its
/// last poll went, what it stored and refused, and the files that need a look (quarantined or
/// changed), each with its first refusal.
async fn source_lines(state: &AppState, domain: &DomainRow) -> PageResult<Vec<serde_json::Value>> {
    if domain.spec.sources.is_empty() {
        return Ok(Vec::new());
    }
    let states = state.db.source_states(domain.id).await?;
    let mut lines = Vec::new();
    for spec in &domain.spec.sources {
        let polled = states.iter().find(|s| s.source == spec.name);
        let totals = state.db.ingest_totals(domain.id, &spec.name).await?;
        let mut attention = Vec::new();
        for unit_state in ["quarantined", "changed"] {
            for unit in state
                .db
                .ingest_units(domain.id, &spec.name, Some(unit_state), 10)
                .await?
            {
                let first = &unit.errors[0];
                let at = ["line", "row"]
                    .iter()
                    .find_map(|k| first[k].as_i64().map(|n| format!("{k} {n}: ")))
                    .unwrap_or_default();
                // A file by its name under the source's prefix, which the row above shows.
                let name = spec
                    .files_prefix()
                    .and_then(|p| unit.unit.strip_prefix(p)?.strip_prefix('/'))
                    .unwrap_or(&unit.unit);
                attention.push(serde_json::json!({
                    "unit": name,
                    "state": unit.state,
                    "why": format!("{at}{}", first["message"].as_str().unwrap_or("")),
                }));
            }
        }
        let reads = match (&spec.files, &spec.table) {
            (Some(url), _) => url.clone(),
            (None, Some(table)) => format!(
                "table {table} by {}",
                spec.cursor.as_deref().unwrap_or_default()
            ),
            (None, None) => String::new(),
        };
        lines.push(serde_json::json!({
            "name": spec.name,
            "reads": reads,
            "polled": polled.and_then(|s| s.polled_at).map(ago),
            "error": polled.and_then(|s| s.last_error.clone()),
            "totals": totals,
            "attention": attention,
        }));
    }
    Ok(lines)
}

/// One row of a decision trail or audit log.
fn trail_row(e: AuditEntry) -> serde_json::Value {
    serde_json::json!({
        "at": e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
        "actor": e.actor,
        "action": e.action.replace('_', " "),
        "version": e.version,
        "reason": e.reason,
        "override": e.action == "override",
        "moved": e.data.as_ref().and_then(|d| {
            Some(format!("{}: {} → {}", d["alias"].as_str()?, d["from"].as_str().unwrap_or("none"), d["to"].as_str()?))
        }),
    })
}

/// A label's recall, champion against candidate.
#[derive(Serialize)]
struct LabelChange {
    label: String,
    support: usize,
    champion: f64,
    candidate: f64,
    change: f64,
}

fn label_changes(eval: &Evaluation) -> Vec<LabelChange> {
    let champion = |label: &str| -> Option<&LabelMetrics> {
        eval.champion.per_label.iter().find(|m| m.label == label)
    };
    let mut out: Vec<LabelChange> = eval
        .candidate
        .per_label
        .iter()
        .map(|m| {
            let before = champion(&m.label).map_or(0.0, |c| c.recall);
            LabelChange {
                label: m.label.clone(),
                support: m.support,
                champion: before,
                candidate: m.recall,
                change: m.recall - before,
            }
        })
        .collect();
    // What got worse first: that is what a steward signs off on.
    out.sort_by(|a, b| {
        a.change
            .total_cmp(&b.change)
            .then(b.support.cmp(&a.support))
    });
    out
}

/// The cells of the candidate's confusion matrix off its diagonal, largest first.
fn confused_pairs(eval: &Evaluation, n: usize) -> Vec<serde_json::Value> {
    let labels: Vec<&str> = eval
        .candidate
        .per_label
        .iter()
        .map(|m| m.label.as_str())
        .collect();
    let mut pairs = Vec::new();
    for (i, row) in eval.candidate.confusion.iter().enumerate() {
        for (j, &count) in row.iter().enumerate() {
            if i != j && count > 0 {
                let before = eval
                    .champion
                    .confusion
                    .get(i)
                    .and_then(|r| r.get(j))
                    .copied();
                pairs.push((count, i, j, before));
            }
        }
    }
    pairs.sort_by_key(|p| std::cmp::Reverse(p.0));
    pairs
        .into_iter()
        .take(n)
        .map(|(count, i, j, before)| {
            serde_json::json!({
                "expected": labels.get(i), "predicted": labels.get(j),
                "count": count, "champion": before,
            })
        })
        .collect()
}

/// Lineage as rows of a table: nested objects flattened to dotted keys.
fn lineage_rows(lineage: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &serde_json::Value, depth: usize, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) if depth < 2 => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, depth + 1, out);
                }
            }
            serde_json::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", lineage, 0, &mut out);
    out
}

pub async fn version(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(session): Extension<Session>,
    Path((name, version)): Path<(String, String)>,
) -> PageResult {
    let domain = domain_row(&state, &name).await?;
    let row = version_row(&state, &domain, &version).await?;
    let live = live(&state, &domain, &row).await?;
    let (report, eval) = stored_report(&state, &domain, &row.version).await?;
    let loss: Vec<(usize, f64)> =
        serde_json::from_value(report["training"]["loss_curve"].clone()).unwrap_or_default();
    let many_labels = eval.candidate.per_label.len() > 15;
    let changes = label_changes(&eval);
    let (supported, unsupported): (Vec<_>, Vec<_>) =
        changes.into_iter().partition(|c| c.support > 0);
    // Production's own history says what was live (the gate's promotions write no alias
    // audit row); a rollback may return only there.
    let was_live = state
        .registry
        .alias_history(&domain.spec.name, PRODUCTION)
        .await?
        .iter()
        .any(|m| m.to == row.version.as_str());
    // An override compares against production: only while it is still the champion this
    // version was measured against.
    let champion_holds = eval.champion_version() == live.current.as_ref().map(|v| v.as_str());
    let mut aliases = Vec::new();
    for alias in ["staging", "canary"] {
        let here = state
            .registry
            .resolve(&domain.spec.name, alias)
            .await?
            .is_some_and(|m| m.to == row.version.as_str());
        if here {
            aliases.push(alias);
        }
    }
    let decision = &eval.decision;
    let rule = serde_json::to_value(decision.rule).ok();
    Ok(render(
        "version.html",
        minijinja::context! {
            title => format!("{name} {}", row.version),
            frame => Frame::new(&who, &session),
            domain => name,
            version => row.version,
            status => status_words(live.status),
            status_class => live.status.as_str(),
            production => live.production,
            aliases => aliases,
            can_approve => live.status == VersionStatus::PendingApproval,
            can_override => live.status == VersionStatus::HeldBack && champion_holds,
            overtaken => live.status == VersionStatus::HeldBack && !champion_holds,
            can_roll_back => live.status == VersionStatus::Promoted && !live.production && was_live,
            trail => live.decisions.into_iter().map(trail_row).collect::<Vec<_>>(),
            summary => summary(&eval),
            gate => serde_json::json!({
                "verdict": decision.verdict().0,
                "reason": decision.reason,
                "rule": rule,
                // The reason opens with the verdict, shown in bold before it.
                "detail": decision
                    .reason
                    .strip_prefix(decision.verdict().0)
                    .map_or_else(|| format!(": {}", decision.reason), str::to_owned),
                "remedy": decision.remedy,
            }),
            champion_name => eval.champion_name,
            holdout => eval.holdout_size,
            metrics => serde_json::json!({
                "champion": eval.champion.accuracy,
                "candidate": eval.candidate.accuracy,
                "champion_f1": eval.champion.macro_f1.or(eval.champion.token_f1),
                "candidate_f1": eval.candidate.macro_f1.or(eval.candidate.token_f1),
                "ece": eval.calibration.ece,
                "p": flywheel_evaluator::format_p(eval.mcnemar_p),
            }),
            labels => supported,
            unsupported => unsupported,
            pairs => if many_labels { confused_pairs(&eval, 10) } else { Vec::new() },
            charts => flywheel_evaluator::charts(&eval, &loss, !many_labels),
            fixed => eval.fixed.iter().take(FLIPS_SHOWN).collect::<Vec<_>>(),
            fixed_count => eval.fixed_count,
            broken => eval.broken.iter().take(FLIPS_SHOWN).collect::<Vec<_>>(),
            broken_count => eval.broken_count,
            lineage => lineage_rows(&report["lineage"]),
        },
    ))
}

/// The evaluation in one plain paragraph: how much the model answers itself and how well,
/// and what changed against the champion.
fn summary(eval: &Evaluation) -> String {
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    let r = &eval.routing;
    let answers = match r.threshold {
        Some(t) => format!(
            "Answers {} of questions itself at {} accuracy; below confidence {t:.2} it \
             escalates.",
            pct(r.coverage),
            pct(r.accuracy)
        ),
        None => format!(
            "No confidence threshold reaches the {} accuracy target on this holdout, so every \
             question would be escalated.",
            pct(r.target_accuracy)
        ),
    };
    let plural = |n: u64, one: &str, many: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{n} {many}")
        }
    };
    format!(
        "{answers} On {} held-out questions, {} it used to get wrong {} now right and {} now \
         wrong (accuracy {:.1}% → {:.1}%; compared with {}).",
        eval.holdout_size,
        plural(eval.fixed_count, "question", "questions"),
        if eval.fixed_count == 1 { "is" } else { "are" },
        plural(eval.broken_count, "right one is", "right ones are"),
        100.0 * eval.champion.accuracy,
        100.0 * eval.candidate.accuracy,
        eval.champion_name
    )
}

/// The published HTML report, with the status now and the decision trail, as the API
/// answers `?format=html`.
pub async fn report(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> PageResult {
    Ok(report_response(&state, &name, &version, ReportFormat::Html).await?)
}

/// Every flipped example a version's evaluation kept: what the version page shows 20 of.
pub async fn flips(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(session): Extension<Session>,
    Path((name, version)): Path<(String, String)>,
) -> PageResult {
    let domain = domain_row(&state, &name).await?;
    let row = version_row(&state, &domain, &version).await?;
    let (_, eval) = stored_report(&state, &domain, &row.version).await?;
    Ok(render(
        "flips.html",
        minijinja::context! {
            title => format!("{name} {}: flipped answers", row.version),
            frame => Frame::new(&who, &session),
            domain => name,
            version => row.version,
            fixed => eval.fixed,
            fixed_count => eval.fixed_count,
            broken => eval.broken,
            broken_count => eval.broken_count,
        },
    ))
}
