//! The three stages of a fine-tuning job. Each reads the job row, does its work, records what
//! happened, and enqueues the next stage; any error fails the job with a message a person can
//! act on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use apalis::prelude::{BoxDynError, Data};
use flywheel_db::{DomainRow, JobRow};
use flywheel_domain::{JobId, JobStatus, Source, Split, StageTask, Task, normalize_text};
use flywheel_evaluator::{EvalSpec, Evaluation, HoldoutRow};
use flywheel_registry::RegistryError;
use flywheel_trainer::{Checkpointing, EarlyStopping, Example, SftExample, TrainReport, TrainSpec};
use sha2::{Digest, Sha256};

use crate::{Context, EVALUATE_QUEUE, PUBLISH_QUEUE, WorkerError};

const PRODUCTION: &str = "production";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |error| WorkerError::Io {
        path: path.to_owned(),
        error,
    }
}

fn job_dir(ctx: &Context, job: &JobRow) -> PathBuf {
    ctx.config.data_dir.join("jobs").join(job.id.as_str())
}

/// The base model's local directory: a path as given, or this machine's verified copy of a
/// `sha256:` registry model, fetched on first use.
async fn base_model_dir(ctx: &Context, domain: &DomainRow) -> Result<PathBuf, WorkerError> {
    match flywheel_registry::parse_model_ref(&domain.spec.base_model) {
        Some(id) => Ok(ctx
            .registry
            .fetch_model(id, &ctx.config.data_dir.join("cache").join("models"))
            .await?),
        None => Ok(PathBuf::from(&domain.spec.base_model)),
    }
}

async fn load(ctx: &Context, task: &StageTask) -> Result<Option<(JobRow, DomainRow)>, WorkerError> {
    let job = ctx
        .db
        .job(&task.job_id)
        .await?
        .ok_or_else(|| WorkerError::Job(format!("job {} does not exist", task.job_id)))?;
    if job.status.is_terminal() {
        // A job cancelled (or failed) between stages leaves nothing staged behind.
        ctx.registry.drop_staged(job.id.as_str()).await?;
        let _ = std::fs::remove_dir_all(job_dir(ctx, &job));
        return Ok(None);
    }
    let domain = ctx
        .db
        .domain(&job.domain)
        .await?
        .ok_or_else(|| WorkerError::Job(format!("domain {} does not exist", job.domain)))?;
    Ok(Some((job, domain)))
}

/// Runs a stage, retrying it after transient failures (the database, store or queue was
/// unreachable) with the configured backoff, and failing the job (never the worker) if it
/// errs for good. Every stage is safe to run again: outputs are overwritten or idempotent.
async fn stage<F, Fut>(
    ctx: &Context,
    task: StageTask,
    name: &str,
    body: F,
) -> Result<(), BoxDynError>
where
    F: Fn(JobRow, DomainRow) -> Fut,
    Fut: std::future::Future<Output = Result<(), WorkerError>>,
{
    let Some((job, domain)) = load(ctx, &task).await? else {
        return Ok(());
    };
    if name == "train" {
        if !ctx.db.claim_job(&job.id).await? {
            tracing::warn!(job = %job.id, "train stage skipped: the job is not queued any more");
            return Ok(());
        }
    } else {
        ctx.db.job_stage(&job.id, name).await?;
    }
    let started = Instant::now();
    // The lease: while this stage runs, its job is seen alive.
    let beat = {
        let (db, id) = (ctx.db.clone(), job.id.clone());
        let every = ctx.config.job_lease / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = db.heartbeat(&id).await {
                    tracing::warn!(job = %id, error = %e, "heartbeat failed");
                }
            }
        })
    };
    let result = crate::retry_transient(
        &ctx.config.retry_backoff,
        || body(job.clone(), domain.clone()),
        |e, wait| tracing::warn!(job = %job.id, stage = name, error = %e, ?wait, "retrying after a transient failure"),
    )
    .await;
    beat.abort();
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .stage_seconds
        .with_label_values(&[name, outcome])
        .observe(started.elapsed().as_secs_f64());
    if let Err(WorkerError::Train(flywheel_trainer::TrainerError::Cancelled)) = result {
        ctx.db
            .add_event(&job.id, "message", "stopped: the job was cancelled", None)
            .await?;
    } else if let Err(e) = result {
        tracing::error!(job = %job.id, stage = name, error = %e, "stage failed");
        let message = format!("{name} failed: {e}");
        ctx.db.add_event(&job.id, "message", &message, None).await?;
        if ctx
            .db
            .finish_job(&job.id, JobStatus::Failed, Some(&message))
            .await?
        {
            observe_job(ctx, &job, "failed");
        }
        // Nothing will pick the staged files up; a failure to delete them is only litter.
        if let Err(e) = ctx.registry.drop_staged(job.id.as_str()).await {
            tracing::warn!(job = %job.id, error = %e, "could not remove staged files");
        }
    }
    Ok(())
}

pub async fn train(task: StageTask, ctx: Data<Arc<Context>>) -> Result<(), BoxDynError> {
    let ctx: &Context = &ctx;
    stage(ctx, task, "train", |job, domain| async move {
        let teacher = &domain.spec.policy.teacher;
        let rows: Vec<_> = ctx
            .db
            .corrections(domain.id, job.snapshot_max_id, Some(Split::Train))
            .await?
            .into_iter()
            .filter(|r| teacher.include || r.source != Source::Teacher)
            .collect();
        let weight = |r: &flywheel_db::CorrectionRow| match r.source {
            Source::Teacher => teacher.weight as f32,
            Source::Human => 1.0,
        };
        let dir = job_dir(ctx, &job);
        let base = base_model_dir(ctx, &domain).await?;
        let mut spec = match domain.spec.task {
            Task::Classification => {
                let mut spec = TrainSpec::new(
                    base.clone(),
                    dir.join("candidate"),
                    domain.spec.labels.clone(),
                );
                // A BERT-family encoder or a causal LM, each with its own projection names.
                spec.lora.target_modules = flywheel_trainer::classifier_target_modules(&base)?;
                spec
            }
            Task::Generation => TrainSpec::for_generation(base, dir.join("candidate")),
        };
        if let Some(epochs) = ctx.config.epochs {
            spec.epochs = epochs;
        }
        spec.compute = ctx.config.compute;
        // A job whose worker died resumes from its newest checkpoint, wherever it was saved:
        // checkpoints are staged in the registry as they are written.
        spec.checkpointing = (ctx.config.checkpoint_every_steps > 0).then(|| Checkpointing {
            dir: dir.join(CHECKPOINTS),
            every_steps: ctx.config.checkpoint_every_steps,
        });
        ctx.registry
            .fetch_staged_under(job.id.as_str(), CHECKPOINTS, &dir.join(CHECKPOINTS))
            .await?;
        let data = match domain.spec.task {
            Task::Classification => TrainData::Labels(
                rows.iter()
                    .filter_map(|r| {
                        domain.spec.label_index(&r.expected).map(|label| Example {
                            text: r.input.clone(),
                            label,
                            weight: weight(r),
                        })
                    })
                    .collect(),
            ),
            Task::Generation => TrainData::Completions(
                rows.iter()
                    .map(|r| SftExample {
                        prompt: r.input.clone(),
                        completion: r.expected.clone(),
                        weight: weight(r),
                    })
                    .collect(),
            ),
        };
        if domain.spec.policy.early_stopping {
            spec.early_stopping = Some(EarlyStopping {
                validation_fraction: 0.1,
                // Once an epoch.
                eval_every_steps: 0,
                patience: 2,
                min_delta: 0.0,
            });
        }
        ctx.db
            .add_event(
                &job.id,
                "message",
                &format!("training on {} corrections", data.len()),
                None,
            )
            .await?;

        // Progress flows from the blocking trainer to the database through a channel, a
        // few events per epoch rather than one per step.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let train_spec = spec.clone();
        // Set when the job is cancelled; the trainer stops at its next step.
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = cancelled.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let mut on_step = |step: &flywheel_trainer::TrainStep| {
                let _ = tx.send(step.clone());
                !stop.load(std::sync::atomic::Ordering::Relaxed)
            };
            match data {
                TrainData::Labels(rows) => {
                    flywheel_trainer::train_classifier(&train_spec, &rows, &mut on_step)
                }
                TrainData::Completions(rows) => {
                    flywheel_trainer::train_causal_lm(&train_spec, &rows, &mut on_step)
                }
            }
        });
        let mut last_logged = 0;
        let mut last_check = Instant::now();
        let mut staged_checkpoint: Option<String> = None;
        let mut first = true;
        while let Some(step) = rx.recv().await {
            if std::mem::take(&mut first) && step.step > 1 {
                ctx.db
                    .add_event(
                        &job.id,
                        "message",
                        &format!("resumed from the checkpoint of step {}", step.step - 1),
                        None,
                    )
                    .await?;
            }
            if let Some(checkpoint) = &step.checkpoint {
                let name =
                    stage_checkpoint(ctx, &job.id, checkpoint, staged_checkpoint.take()).await?;
                let data = serde_json::json!({
                    "step": step.step,
                    "loss": step.loss,
                    "checkpoint": format!("{CHECKPOINTS}/{name}"),
                });
                ctx.db
                    .add_event(
                        &job.id,
                        "checkpoint",
                        &format!("checkpoint at step {}", step.step),
                        Some(&data),
                    )
                    .await?;
                staged_checkpoint = Some(name);
            }
            if last_check.elapsed() >= std::time::Duration::from_millis(250) {
                last_check = Instant::now();
                if ctx
                    .db
                    .job(&job.id)
                    .await?
                    .is_some_and(|j| j.status == JobStatus::Cancelled)
                {
                    cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if step.step == step.total_steps
                || step.step >= last_logged + (step.total_steps / 10).max(1)
            {
                last_logged = step.step;
                let domain_label = [domain.spec.name.as_str()];
                ctx.metrics
                    .training_loss
                    .with_label_values(&domain_label)
                    .set(step.loss);
                ctx.metrics
                    .training_tokens_per_second
                    .with_label_values(&domain_label)
                    .set(step.tokens_per_second);
                let message = format!(
                    "step {}/{} loss {:.4} ({:.0} tokens/s)",
                    step.step, step.total_steps, step.loss, step.tokens_per_second
                );
                let data = serde_json::to_value(&step).expect("json");
                ctx.db
                    .add_event(&job.id, "metrics", &message, Some(&data))
                    .await?;
            }
        }
        let report = handle
            .await
            .map_err(|e| WorkerError::Job(format!("trainer panicked: {e}")))??;
        write_json(&dir.join("train_report.json"), &report)?;
        write_json(&dir.join("train_spec.json"), &spec)?;
        // Training is done: its checkpoints are not needed again, here or in the registry.
        let _ = std::fs::remove_dir_all(dir.join(CHECKPOINTS));
        ctx.registry
            .drop_staged_under(job.id.as_str(), CHECKPOINTS)
            .await?;
        // The next stages may run on another machine.
        ctx.registry.stage_files(job.id.as_str(), &dir).await?;
        ctx.db
            .add_event(
                &job.id,
                "message",
                &format!(
                    "trained {} steps in {:.1}s",
                    report.steps, report.wall_seconds
                ),
                None,
            )
            .await?;
        ctx.enqueue(EVALUATE_QUEUE, &job.id).await
    })
    .await
}

pub async fn evaluate(task: StageTask, ctx: Data<Arc<Context>>) -> Result<(), BoxDynError> {
    let ctx: &Context = &ctx;
    stage(ctx, task, "evaluate", |job, domain| async move {
        let rows = ctx
            .db
            .corrections(domain.id, job.snapshot_max_id, None)
            .await?;
        // Excluded teacher rows are excluded from judging too.
        let include_teacher = domain.spec.policy.teacher.include;
        let holdout: Vec<HoldoutRow> = rows
            .iter()
            .filter(|r| r.split == Split::Holdout)
            .filter(|r| include_teacher || r.source != Source::Teacher)
            .map(|r| HoldoutRow {
                text: r.input.clone(),
                expected: r.expected.clone(),
            })
            .collect();
        let training_inputs = rows
            .iter()
            .filter(|r| r.split == Split::Train)
            .map(|r| normalize_text(&r.input))
            .collect();
        let champion = ctx.registry.resolve(&domain.spec.name, PRODUCTION).await?;
        let (champion_dir, champion_name) = match &champion {
            Some(mv) => {
                let version = flywheel_domain::VersionId(mv.to.clone());
                let dir = ctx
                    .config
                    .data_dir
                    .join("cache")
                    .join(domain.spec.name.as_str())
                    .join(version.as_str());
                if !dir.join(flywheel_registry::MANIFEST).exists() {
                    ctx.registry
                        .download(&domain.spec.name, &version, &dir)
                        .await?;
                    // The manifest marks a complete download.
                    let manifest = ctx.registry.manifest(&domain.spec.name, &version).await?;
                    write_json(&dir.join(flywheel_registry::MANIFEST), &manifest)?;
                }
                (Some(dir), format!("{} (production)", version))
            }
            None => (None, "base model (no production adapter yet)".to_string()),
        };
        let dir = job_dir(ctx, &job);
        ctx.registry.fetch_staged(job.id.as_str(), &dir).await?;
        let spec = EvalSpec {
            base_model_dir: base_model_dir(ctx, &domain).await?,
            candidate_dir: dir.join("candidate"),
            champion_dir,
            champion_name,
            task: domain.spec.task,
            labels: domain.spec.labels.clone(),
            out_of_scope_label: domain.spec.out_of_scope_label.clone(),
            holdout,
            training_inputs,
            policy: domain.spec.policy.clone(),
        };
        let evaluation = tokio::task::spawn_blocking(move || flywheel_evaluator::evaluate(&spec))
            .await
            .map_err(|e| WorkerError::Job(format!("evaluator panicked: {e}")))??;
        write_json(&dir.join("evaluation.json"), &evaluation)?;
        ctx.registry
            .stage_file(
                job.id.as_str(),
                "evaluation.json",
                &dir.join("evaluation.json"),
            )
            .await?;
        ctx.db
            .add_event(
                &job.id,
                "message",
                &format!(
                    "evaluated on {} held-out rows: champion {:.1}%, candidate {:.1}%",
                    evaluation.holdout_size,
                    100.0 * evaluation.champion.accuracy,
                    100.0 * evaluation.candidate.accuracy
                ),
                None,
            )
            .await?;
        ctx.enqueue(PUBLISH_QUEUE, &job.id).await
    })
    .await
}

pub async fn publish(task: StageTask, ctx: Data<Arc<Context>>) -> Result<(), BoxDynError> {
    let ctx: &Context = &ctx;
    stage(ctx, task, "publish", |job, domain| async move {
        let dir = job_dir(ctx, &job);
        ctx.registry.fetch_staged(job.id.as_str(), &dir).await?;
        let evaluation: Evaluation = read_json(&dir.join("evaluation.json"))?;
        let train_report: TrainReport = read_json(&dir.join("train_report.json"))?;
        let spec: TrainSpec = read_json(&dir.join("train_spec.json"))?;
        let candidate = dir.join("candidate");
        let base = base_model_dir(ctx, &domain).await?;
        let rows = ctx
            .db
            .corrections(domain.id, job.snapshot_max_id, None)
            .await?;
        let probes: Vec<String> = rows
            .iter()
            .filter(|r| r.split == Split::Holdout)
            .take(8)
            .map(|r| r.input.clone())
            .collect();
        let serving = serving_checks(ctx, &base, &candidate, probes).await?;
        let version = ctx.db.reserve_version(domain.id, &job.id).await?;
        let name = &domain.spec.name;

        let mut snapshot = Sha256::new();
        for r in &rows {
            snapshot.update(format!(
                "{}\t{}\t{}\t{}\n",
                r.id,
                r.split.as_str(),
                r.expected,
                r.input
            ));
        }
        let pii_redacted = ctx
            .db
            .redaction_counts(domain.id, job.snapshot_max_id)
            .await?;
        let (base_id, _) = flywheel_registry::models::model_content_id(&base).await?;
        let lineage = serde_json::json!({
            "job_id": job.id,
            "trigger": job.trigger,
            // `content_id` is what `flywheel models import` would name it: `sha256:<content_id>`.
            "base_model": { "ref": domain.spec.base_model, "content_id": base_id },
            "dataset": {
                "snapshot_sha256": hex::encode(snapshot.finalize()),
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
            "decision": evaluation.decision,
            // Serving fleets read this: below it, escalate to the larger model.
            "escalation": {
                "threshold": evaluation.routing.threshold,
                "target_accuracy": evaluation.routing.target_accuracy,
                "coverage": evaluation.routing.coverage,
            },
            "calibration_ece": evaluation.calibration.ece,
            "serving": serving,
            "code_version": env!("CARGO_PKG_VERSION"),
        });
        let report_json = serde_json::json!({
            "schema_version": 1,
            "domain": name,
            "version": version,
            "evaluation": evaluation,
            "training": train_report,
            "lineage": lineage,
        });
        let report_md = flywheel_evaluator::render_markdown(
            name.as_str(),
            version.as_str(),
            &evaluation,
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
        let report_html = flywheel_evaluator::render_html(
            name.as_str(),
            version.as_str(),
            &evaluation,
            &train_report.loss_curve,
            &lineage,
        );
        files.push(("report.html".into(), report_html.into_bytes()));
        match ctx.registry.publish(name, &version, files, lineage).await {
            // A retried publish finds its own earlier upload.
            Ok(_) | Err(RegistryError::VersionExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }

        let mut decision = evaluation.decision.clone();
        if decision.promote && !decision.awaiting_approval {
            let current = ctx.registry.resolve(name, PRODUCTION).await?;
            let expected = current.map(|m| flywheel_domain::VersionId(m.to));
            if let Err(e) = ctx
                .registry
                .move_alias(
                    name,
                    PRODUCTION,
                    expected.as_ref(),
                    &version,
                    "flywheel-gate",
                    &decision.reason,
                )
                .await
            {
                decision.promote = false;
                decision.reason = format!("gate passed but the alias did not move: {e}");
            }
        }
        let outcome = match (decision.promote, decision.awaiting_approval) {
            (true, false) => "promoted",
            (true, true) => "pending_approval",
            (false, _) => "held_back",
        };
        ctx.metrics
            .promotion_decisions
            .with_label_values(&[name.as_str(), outcome])
            .inc();
        let summary = serde_json::json!({
            "champion_accuracy": evaluation.champion.accuracy,
            "candidate_accuracy": evaluation.candidate.accuracy,
            "candidate_macro_f1": evaluation.candidate.macro_f1,
            "candidate_token_f1": evaluation.candidate.token_f1,
            "mcnemar_p": evaluation.mcnemar_p,
            "ece": evaluation.calibration.ece,
            "escalation_threshold": evaluation.routing.threshold,
            "holdout_size": evaluation.holdout_size,
            "decision": decision,
        });
        ctx.db
            .record_version(domain.id, &version, outcome, &summary)
            .await?;
        ctx.db
            .audit(
                domain.id,
                "flywheel-gate",
                "gate_decision",
                Some(&version),
                &decision.reason,
                Some(&summary),
            )
            .await?;
        ctx.db
            .set_job_decision(
                &job.id,
                &version,
                &serde_json::to_value(&decision).expect("json"),
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
            observe_job(ctx, &job, "succeeded");
        }
        // The work directory is in the registry now.
        ctx.registry.drop_staged(job.id.as_str()).await?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
    .await
}

/// The serving-compatibility lint, then a check that the adapter changes the base model's
/// outputs on `probes` (a few held-out inputs). Either failing fails the job: nothing
/// unservable or inert reaches the registry.
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
    let delta = tokio::task::spawn_blocking(move || {
        let texts: Vec<&str> = probes.iter().map(String::as_str).collect();
        flywheel_trainer::adapter_output_delta(&base_dir, &adapter_dir, &texts)
    })
    .await
    .map_err(|e| WorkerError::Job(format!("adapter check panicked: {e}")))??;
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

/// Records a finished job's wall time, queued to now.
fn observe_job(ctx: &Context, job: &JobRow, outcome: &str) {
    ctx.metrics
        .job_duration_seconds
        .with_label_values(&[outcome])
        .observe(job.age_seconds());
}

/// Training rows, by task.
enum TrainData {
    Labels(Vec<Example>),
    Completions(Vec<SftExample>),
}

impl TrainData {
    fn len(&self) -> usize {
        match self {
            TrainData::Labels(r) => r.len(),
            TrainData::Completions(r) => r.len(),
        }
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), WorkerError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value).expect("json")).map_err(io(path))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, WorkerError> {
    let raw = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&raw).map_err(|e| WorkerError::Job(format!("{}: {e}", path.display())))
}

/// Where a job's training checkpoints live, in its work directory and among its staged files.
const CHECKPOINTS: &str = "checkpoints";

/// Stages a checkpoint the trainer just wrote, `state.json` last (a checkpoint without it is
/// incomplete and never resumed), then drops the one it supersedes. Returns its name.
async fn stage_checkpoint(
    ctx: &Context,
    job: &JobId,
    checkpoint: &Path,
    previous: Option<String>,
) -> Result<String, WorkerError> {
    let name = checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| WorkerError::Job(format!("checkpoint {}", checkpoint.display())))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(checkpoint)
        .map_err(io(checkpoint))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort_by_key(|p| p.file_name().is_some_and(|n| n == "state.json"));
    for file in files {
        let relative = format!(
            "{CHECKPOINTS}/{name}/{}",
            file.file_name().expect("a file").to_string_lossy()
        );
        ctx.registry
            .stage_file(job.as_str(), &relative, &file)
            .await?;
    }
    if let Some(previous) = previous.filter(|p| *p != name) {
        ctx.registry
            .drop_staged_under(job.as_str(), &format!("{CHECKPOINTS}/{previous}"))
            .await?;
    }
    Ok(name)
}
