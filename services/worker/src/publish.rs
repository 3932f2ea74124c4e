//! The publish stage: checks the candidate is servable, writes it into the registry as an
//! immutable version with its report and lineage, has promotion carry out the gate's verdict,
//! and ends the job.

use std::path::Path;
use std::sync::Arc;

use apalis::prelude::{BoxDynError, Data};
use flywheel_db::{CorrectionRow, DomainRow, JobRow};
use flywheel_domain::{JobStatus, Split, StageTask, VersionId};
use flywheel_evaluator::{Decision, Evaluation};
use flywheel_promotion::{Promotion, Verdict};
use flywheel_registry::RegistryError;
use flywheel_trainer::{TrainReport, TrainSpec};
use sha2::{Digest, Sha256};

use crate::pipeline::{base_model_dir, io, job_dir, observe_job, read_json, stage};
use crate::{Context, WorkerError};

pub async fn publish(task: StageTask, ctx: Data<Arc<Context>>) -> Result<(), BoxDynError> {
    let ctx: &Context = &ctx;
    stage(ctx, task, "publish", |job, domain| async move {
        let dir = job_dir(ctx, &job);
        ctx.registry.fetch_staged(job.id.as_str(), &dir).await?;
        let staged = Staged::read(&dir)?;
        let candidate = dir.join("candidate");
        let base = base_model_dir(ctx, &domain).await?;
        let rows = ctx
            .db
            .corrections(domain.id, job.snapshot_max_id, None)
            .await?;
        let serving = serving_checks(ctx, &base, &candidate, probes(&rows)).await?;
        let version = ctx.db.reserve_version(domain.id, &job.id).await?;
        let lineage = lineage(ctx, &job, &domain, &base, &rows, &staged, serving).await?;
        write_version(ctx, &domain, &version, &staged, &candidate, lineage).await?;
        let decision = carry_out_gate(ctx, &domain, &version, &staged.evaluation).await?;
        finish(ctx, &job, &version, &decision).await?;
        // The work directory is in the registry now.
        ctx.registry.drop_staged(job.id.as_str()).await?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
    .await
}

/// What the earlier stages left in the work directory.
struct Staged {
    evaluation: Evaluation,
    train_report: TrainReport,
    spec: TrainSpec,
    /// The training block as asked for, as resolved, and any auto-search trials.
    plan: Option<serde_json::Value>,
}

impl Staged {
    fn read(dir: &Path) -> Result<Self, WorkerError> {
        Ok(Self {
            evaluation: read_json(&dir.join("evaluation.json"))?,
            train_report: read_json(&dir.join("train_report.json"))?,
            spec: read_json(&dir.join("train_spec.json"))?,
            plan: match dir.join("training_plan.json") {
                p if p.exists() => Some(read_json(&p)?),
                _ => None,
            },
        })
    }
}

/// A few held-out inputs, to check that the adapter moves the base model's outputs.
fn probes(rows: &[CorrectionRow]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.split == Split::Holdout)
        .take(8)
        .map(|r| r.input.clone())
        .collect()
}

/// The serving-compatibility lint, then a check that the adapter changes the base model's
/// outputs on `probes`. Either failing fails the job: nothing unservable or inert reaches the
/// registry.
async fn serving_checks(
    ctx: &Context,
    base: &Path,
    candidate: &Path,
    probes: Vec<String>,
) -> Result<serde_json::Value, WorkerError> {
    let lint = flywheel_evaluator::lint_adapter(base, candidate, &ctx.config.serving)
        .map_err(|e| WorkerError::Job(format!("serving lint could not read the adapter: {e}")))?;
    if !lint.passed() {
        return Err(WorkerError::Job(format!(
            "the adapter is not servable: {}",
            lint.summary()
        )));
    }
    let (base_dir, adapter_dir) = (base.to_owned(), candidate.to_owned());
    let delta = crate::compute::spawn("adapter-check", move || {
        let texts: Vec<&str> = probes.iter().map(String::as_str).collect();
        flywheel_trainer::adapter_output_delta(&base_dir, &adapter_dir, &texts)
    })
    .await??;
    // Below f32 noise on these magnitudes the adapter does nothing.
    if delta <= 1e-6 {
        return Err(WorkerError::Job(format!(
            "the adapter is a no-op: it moves the base model's outputs by at most {delta:e}"
        )));
    }
    Ok(serde_json::json!({
        "lint": lint,
        "max_output_delta": delta,
    }))
}

/// A hash of the snapshot's rows (id, split, answer, input), so a version names its data.
fn snapshot_sha256(rows: &[CorrectionRow]) -> String {
    let mut snapshot = Sha256::new();
    for r in rows {
        snapshot.update(format!(
            "{}\t{}\t{}\t{}\n",
            r.id,
            r.split.as_str(),
            r.expected,
            r.input
        ));
    }
    hex::encode(snapshot.finalize())
}

/// Where the version came from: base model, data, hyperparameters, training, the gate's
/// decision, the escalation threshold serving fleets read, and the serving checks.
async fn lineage(
    ctx: &Context,
    job: &JobRow,
    domain: &DomainRow,
    base: &Path,
    rows: &[CorrectionRow],
    staged: &Staged,
    serving: serde_json::Value,
) -> Result<serde_json::Value, WorkerError> {
    let Staged {
        evaluation,
        train_report,
        spec,
        plan,
    } = staged;
    let pii_redacted = ctx
        .db
        .redaction_counts(domain.id, job.snapshot_max_id)
        .await?;
    let (base_id, _) = flywheel_registry::models::model_content_id(base).await?;
    Ok(serde_json::json!({
        "job_id": job.id,
        "trigger": job.trigger,
        // `content_id` is what `flywheel models import` would name it: `sha256:<content_id>`.
        "base_model": { "ref": domain.spec.base_model, "content_id": base_id },
        "dataset": {
            "snapshot_sha256": snapshot_sha256(rows),
            "corrections": rows.len(),
            "train": rows.iter().filter(|r| r.split == Split::Train).count(),
            "holdout": rows.iter().filter(|r| r.split == Split::Holdout).count(),
            "max_correction_id": job.snapshot_max_id,
            // Counts of personal data redacted at ingestion; the values were never stored.
            "pii_redacted": pii_redacted,
        },
        "hyperparameters": {
            "lora": spec.lora,
            "epochs": spec.epochs,
            "batch_size": spec.batch_size,
            "learning_rate": spec.learning_rate,
            "weight_decay": spec.weight_decay,
            "warmup_ratio": spec.warmup_ratio,
            "max_seq_len": spec.max_seq_len,
            "seed": spec.seed,
            "grad_accumulation": spec.grad_accumulation,
            "max_grad_norm": spec.max_grad_norm,
            "early_stopping": spec.early_stopping,
            "compute": spec.compute,
        },
        // The domain's training block (with the job's overrides) as asked for, why each
        // "auto" came out as it did, rows truncated, and the auto search's trials.
        "training_plan": plan,
        "training": {
            "steps": train_report.steps,
            "wall_seconds": train_report.wall_seconds,
            "tokens_per_second": train_report.tokens_per_second,
            "trainable_parameters": train_report.trainable_parameters,
            // With early stopping: the held-back rows' loss and the step whose weights
            // were kept.
            "validation_curve": train_report.validation_curve,
            "best_step": train_report.best_step,
            "stopped_early": train_report.stopped_early,
        },
        // The policy version the gate applied (the domain's as the version is published).
        "policy": { "version": domain.policy_version, "rules": domain.spec.policy },
        "decision": evaluation.decision,
        // Serving fleets read this: below it, escalate to the larger model.
        "escalation": {
            "threshold": evaluation.routing.threshold,
            "target_accuracy": evaluation.routing.target_accuracy,
            "coverage": evaluation.routing.coverage,
        },
        // For a domain with an out-of-scope label: below this confidence, serve the
        // out-of-scope answer (chosen for in-scope accuracy plus out-of-scope recall).
        "out_of_scope": evaluation.out_of_scope.as_ref().map(|o| serde_json::json!({
            "label": o.label,
            "threshold": o.threshold.map(|t| t.threshold),
            "in_scope_accuracy": o.threshold.map(|t| t.in_scope_accuracy),
            "out_of_scope_recall": o.threshold.map(|t| t.out_of_scope_recall),
        })),
        "calibration_ece": evaluation.calibration.ece,
        "serving": serving,
        "code_version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Writes the version: the adapter's files, then the reports (JSON, Markdown, HTML). A retried
/// publish finds its own earlier upload and leaves it.
async fn write_version(
    ctx: &Context,
    domain: &DomainRow,
    version: &VersionId,
    staged: &Staged,
    candidate: &Path,
    lineage: serde_json::Value,
) -> Result<(), WorkerError> {
    let name = &domain.spec.name;
    let Staged {
        evaluation,
        train_report,
        ..
    } = staged;
    let report_json = serde_json::json!({
        "schema_version": 1,
        "domain": name,
        "version": version,
        "evaluation": evaluation,
        "training": train_report,
        "lineage": lineage,
    });
    let report_md =
        flywheel_evaluator::render_markdown(name.as_str(), version.as_str(), evaluation, &lineage);
    let report_html = flywheel_evaluator::render_html(
        name.as_str(),
        version.as_str(),
        evaluation,
        &train_report.loss_curve,
        &lineage,
    );
    let mut files = Vec::new();
    for file in &train_report.files {
        let path = candidate.join(file);
        files.push((file.clone(), std::fs::read(&path).map_err(io(&path))?));
    }
    files.push((
        "report.json".into(),
        serde_json::to_vec_pretty(&report_json).expect("json"),
    ));
    files.push(("report.md".into(), report_md.into_bytes()));
    files.push(("report.html".into(), report_html.into_bytes()));
    match ctx.registry.publish(name, version, files, lineage).await {
        Ok(_) | Err(RegistryError::VersionExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Has promotion carry out the gate's verdict (moving production if it promoted without
/// approval) and record it: the version's status, its metrics summary, the audit row.
/// Returns the decision as it stands: a promotion whose alias move was refused is held back.
async fn carry_out_gate(
    ctx: &Context,
    domain: &DomainRow,
    version: &VersionId,
    evaluation: &Evaluation,
) -> Result<Decision, WorkerError> {
    let name = &domain.spec.name;
    let promotion = Promotion::new(&ctx.db, &ctx.registry);
    let mut decision = evaluation.decision.clone();
    let verdict = Verdict::of(decision.promote, decision.awaiting_approval);
    let outcome = promotion
        .carry_out(name, version, verdict, &decision.reason)
        .await?;
    if let Some(e) = outcome.refused {
        decision.promote = false;
        decision.reason = format!("gate passed but the alias did not move: {e}");
    }
    ctx.metrics
        .promotion_decisions
        .with_label_values(&[name.as_str(), outcome.status.as_str()])
        .inc();
    let summary = evaluation.summary(&decision);
    promotion
        .record_gate(domain, version, outcome.status, &decision.reason, &summary)
        .await?;
    Ok(decision)
}

/// Ends the job: its version and decision, a closing event, and `succeeded`.
async fn finish(
    ctx: &Context,
    job: &JobRow,
    version: &VersionId,
    decision: &Decision,
) -> Result<(), WorkerError> {
    ctx.db
        .set_job_decision(
            &job.id,
            version,
            &serde_json::to_value(decision).expect("json"),
        )
        .await?;
    ctx.db
        .add_event(
            &job.id,
            "message",
            &format!("{version}: {}", decision.reason),
            None,
        )
        .await?;
    if ctx
        .db
        .finish_job(&job.id, JobStatus::Succeeded, None)
        .await?
    {
        observe_job(ctx, job, "succeeded");
    }
    Ok(())
}
