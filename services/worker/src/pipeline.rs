//! The stages of a fine-tuning job (train and evaluate here, publish in `publish.rs`) and what
//! they share. Each reads the job row, does its work, records what happened, and enqueues the
//! next stage; any error fails the job with a message a person can act on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use apalis::prelude::{BoxDynError, Data};
use flywheel_db::{DomainRow, JobRow};
use flywheel_domain::{JobId, JobStatus, Source, Split, StageTask, Task, normalize_text};
use flywheel_evaluator::{EvalSpec, HoldoutRow};
use flywheel_promotion::Promotion;
use flywheel_trainer::{Checkpointing, Example, SftExample, TrainSpec};

use crate::hyper::TrainData;
use crate::{Context, EVALUATE_QUEUE, PUBLISH_QUEUE, WorkerError};

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |error| WorkerError::Io {
        path: path.to_owned(),
        error,
    }
}

pub(crate) fn job_dir(ctx: &Context, job: &JobRow) -> PathBuf {
    ctx.config.data_dir.join("jobs").join(job.id.as_str())
}

/// The base model's local directory: a path as given, or this machine's verified copy of a
/// `sha256:` registry model, fetched on first use.
pub(crate) async fn base_model_dir(
    ctx: &Context,
    domain: &DomainRow,
) -> Result<PathBuf, WorkerError> {
    let cache = ctx.config.data_dir.join("cache").join("models");
    Ok(ctx
        .registry
        .base_model_dir(&domain.spec.base_model, &cache)
        .await?)
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
pub(crate) async fn stage<F, Fut>(
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
        .with_label_values(&[domain.spec.name.as_str(), name, outcome])
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
        // Teacher rows left out first: one that never trains must not void a person's.
        let (rows, conflicting) = without_conflicts(
            ctx.db
                .corrections(domain.id, job.snapshot_max_id, None)
                .await?
                .into_iter()
                .filter(|r| teacher.include || r.source != Source::Teacher)
                .collect(),
        );
        if conflicting > 0 {
            let message = format!(
                "left out {conflicting} corrections whose input was stored with different \
                 answers; resolve them under /v1/domains/{}/corrections/conflicts",
                domain.spec.name
            );
            ctx.db.add_event(&job.id, "message", &message, None).await?;
        }
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.split == Split::Train)
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
                // Corrections are short texts of mixed lengths: batched by length they pad
                // little.
                spec.group_by_length = true;
                spec
            }
            Task::Generation => TrainSpec::for_generation(base, dir.join("candidate")),
        };
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
        ctx.db
            .add_event(
                &job.id,
                "message",
                &format!("training on {} corrections", data.len()),
                None,
            )
            .await?;
        // Set when the job is cancelled; the trainer stops at its next step.
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A run that resumes keeps the plan it started with: the domain's block may have
        // changed since, and an auto search is not repeated (nor allowed to pick otherwise).
        ctx.registry
            .fetch_staged_under(job.id.as_str(), PLAN, &dir.join(PLAN))
            .await?;
        let planned = dir.join(PLAN).join(PLAN_FILE);
        let (spec, data, plan) = if planned.exists() {
            let plan: crate::hyper::Plan = read_json(&planned)?;
            let mut spec = spec;
            crate::hyper::apply(&mut spec, &plan.resolved);
            ctx.db
                .add_event(
                    &job.id,
                    "message",
                    "resumed with the hyperparameters it planned",
                    None,
                )
                .await?;
            (spec, data, plan)
        } else {
            let (spec, data, plan) = plan_run(ctx, &job, &domain, spec, data, &cancelled).await?;
            write_json(&planned, &plan)?;
            ctx.registry
                .stage_file(job.id.as_str(), &format!("{PLAN}/{PLAN_FILE}"), &planned)
                .await?;
            (spec, data, plan)
        };
        write_json(&dir.join("training_plan.json"), &plan)?;

        // Progress flows from the blocking trainer to the database through a channel, a
        // few events per epoch rather than one per step.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let train_spec = spec.clone();
        let stop = cancelled.clone();
        let handle = crate::compute::spawn("train", move || {
            data.train(&train_spec, &mut |step: &flywheel_trainer::TrainStep| {
                let _ = tx.send(step.clone());
                !stop.load(std::sync::atomic::Ordering::Relaxed)
            })
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
                let name = match stage_checkpoint(ctx, &job.id, checkpoint, staged_checkpoint.clone())
                    .await
                {
                    Ok(name) => name,
                    // The trainer deletes a checkpoint once a newer one is in place; when the
                    // events lag behind it (a loaded machine), this one is gone and the newer
                    // one's own event will stage it. Anything else is a failure.
                    Err(_) if !checkpoint.join("state.json").exists() => {
                        tracing::debug!(job = %job.id, checkpoint = %checkpoint.display(), "checkpoint superseded before it was staged");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
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
        let report = handle.await??;
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
        let (rows, _) = without_conflicts(
            rows.into_iter()
                .filter(|r| include_teacher || r.source != Source::Teacher)
                .collect(),
        );
        let holdout: Vec<HoldoutRow> = rows
            .iter()
            .filter(|r| r.split == Split::Holdout)
            .filter(|r| include_teacher || r.source != Source::Teacher)
            .map(|r| HoldoutRow {
                id: r.id,
                text: r.input.clone(),
                expected: r.expected.clone(),
            })
            .collect();
        let training_inputs = rows
            .iter()
            .filter(|r| r.split == Split::Train)
            .map(|r| normalize_text(&r.input))
            .collect();
        // The candidate's view of the rows it trained on, for the label review: an even
        // spread of at most MAX_REVIEWED of them, since scoring them all would cost a large
        // domain as much as its training did (the holdout, out of sample, is always scored).
        let train_rows = rows.iter().filter(|r| r.split == Split::Train).count();
        let stride = train_rows.div_ceil(MAX_REVIEWED).max(1);
        let review = rows
            .iter()
            .filter(|r| r.split == Split::Train)
            .step_by(stride)
            .map(|r| HoldoutRow {
                id: r.id,
                text: r.input.clone(),
                expected: r.expected.clone(),
            })
            .collect();
        let champion = Promotion::new(&ctx.db, &ctx.registry)
            .production(&domain.spec.name)
            .await?;
        let (champion_dir, champion_name) = match champion {
            Some(version) => {
                let dir = ctx
                    .config
                    .data_dir
                    .join("cache")
                    .join(domain.spec.name.as_str())
                    .join(version.as_str());
                ctx.registry
                    .fetch_version(&domain.spec.name, &version, &dir)
                    .await?;
                (Some(dir), format!("{} (production)", version))
            }
            None => (
                None,
                format!(
                    "{} (no production adapter yet)",
                    flywheel_evaluator::BASE_CHAMPION
                ),
            ),
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
            review,
            policy: domain.spec.policy.clone(),
        };
        let evaluation =
            crate::compute::spawn("evaluate", move || flywheel_evaluator::evaluate(&spec))
                .await??;
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

/// Records a finished job's wall time, queued to now.
pub(crate) fn observe_job(ctx: &Context, job: &JobRow, outcome: &str) {
    ctx.metrics
        .job_duration_seconds
        .with_label_values(&[job.domain.as_str(), outcome])
        .observe(job.age_seconds());
}

/// Training rows, by task.
/// Rows whose normalized input was stored with more than one `expected` contradict each
/// other: none of them trains or evaluates until a steward resolves it. Teacher rows a person
/// overruled (`outranked_by_people`) are dropped first and are no contradiction. Returns the
/// rest and how many contradicting rows were left out.
fn without_conflicts(
    rows: Vec<flywheel_db::CorrectionRow>,
) -> (Vec<flywheel_db::CorrectionRow>, usize) {
    let overruled = flywheel_domain::outranked_by_people(
        rows.iter().map(|r| (r.id, r.input.as_str(), r.source)),
    );
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| !overruled.contains(&r.id))
        .collect();
    let conflicting: std::collections::HashSet<i64> = flywheel_domain::conflicts(
        rows.iter()
            .map(|r| (r.id, r.input.as_str(), r.expected.as_str())),
    )
    .iter()
    .flat_map(|c| c.ids().collect::<Vec<_>>())
    .collect();
    let before = rows.len();
    let kept: Vec<_> = rows
        .into_iter()
        .filter(|r| !conflicting.contains(&r.id))
        .collect();
    let left_out = before - kept.len();
    (kept, left_out)
}

/// Resolves the run's hyperparameters (the domain's training block, the job's overrides) on
/// a compute thread, running the auto search if one is asked for, and records them.
async fn plan_run(
    ctx: &Context,
    job: &JobRow,
    domain: &DomainRow,
    mut spec: TrainSpec,
    data: TrainData,
    cancelled: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<(TrainSpec, TrainData, crate::hyper::Plan), WorkerError> {
    let requested = match &job.training {
        Some(over) => domain.spec.training.overridden_by(over),
        None => domain.spec.training.clone(),
    };
    let task = domain.spec.task;
    let early = domain.spec.policy.early_stopping;
    let epochs = ctx.config.epochs;
    let max_rank = ctx.config.serving.max_rank as u32;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stop = cancelled.clone();
    let handle = crate::compute::spawn("plan", move || {
        let mut plan =
            crate::hyper::plan(requested, task, &data, &mut spec, early, epochs, max_rank)?;
        if plan.requested.auto_search.is_some() {
            crate::hyper::search(&mut plan, &data, &mut spec, &stop, &mut |i, n, t| {
                let _ = tx.send(format!(
                    "auto_search trial {i}/{n}: learning_rate_multiplier {} lora.r {} → validation loss {:.4} ({:.1}s)",
                    t.learning_rate_multiplier, t.lora_r, t.validation_loss, t.wall_seconds
                ));
            })?;
        }
        Ok::<_, WorkerError>((spec, data, plan))
    });
    // A trial runs for minutes: cancellation is looked for on a timer, not between trials.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            message = rx.recv() => match message {
                Some(message) => ctx.db.add_event(&job.id, "message", &message, None).await?,
                None => break,
            },
            _ = tick.tick() => {
                if ctx
                    .db
                    .job(&job.id)
                    .await?
                    .is_some_and(|j| j.status == JobStatus::Cancelled)
                {
                    cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
    let (spec, data, plan) = handle.await??;
    let r = &plan.resolved;
    let message = format!(
        "hyperparameters: n_epochs {}, batch_size {}, learning rate {:.2e}, LoRA r {} alpha {} \
         dropout {}, max_seq_len {} ({} of {} rows truncated){}",
        spec.epochs,
        spec.batch_size,
        spec.learning_rate,
        spec.lora.r,
        spec.lora.alpha,
        spec.lora.dropout,
        spec.max_seq_len,
        r.truncated_rows,
        data.len(),
        if spec.early_stopping.is_some() {
            ", early stopping"
        } else {
            ""
        },
    );
    let event = serde_json::to_value(&plan).expect("json");
    ctx.db
        .add_event(&job.id, "hyperparameters", &message, Some(&event))
        .await?;
    Ok((spec, data, plan))
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), WorkerError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value).expect("json")).map_err(io(path))
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, WorkerError> {
    let raw = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&raw).map_err(|e| WorkerError::Job(format!("{}: {e}", path.display())))
}

/// Where a job's training checkpoints live, in its work directory and among its staged files.
const CHECKPOINTS: &str = "checkpoints";
/// The most training rows the label review scores per run.
const MAX_REVIEWED: usize = 2_000;
/// Where a job's resolved hyperparameters are staged, so a resumed run trains the same spec.
const PLAN: &str = "plan";
const PLAN_FILE: &str = "plan.json";

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
