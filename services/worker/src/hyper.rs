//! A run's hyperparameters: the domain's training block with the job's overrides, its autos
//! resolved from the rows about to be trained on, and the optional search over the autos.
//! Runs on a compute thread: measuring tokenizes every row, and each trial is a training run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flywheel_domain::{DataFacts, Resolved, Task, Training};
use flywheel_trainer::{EarlyStopping, Example, SftExample, TrainReport, TrainSpec};
use serde::{Deserialize, Serialize};

use crate::WorkerError;

/// The rows of one run, as the trainer takes them.
pub(crate) enum TrainData {
    Labels(Vec<Example>),
    Completions(Vec<SftExample>),
}

impl TrainData {
    pub(crate) fn len(&self) -> usize {
        match self {
            TrainData::Labels(r) => r.len(),
            TrainData::Completions(r) => r.len(),
        }
    }

    pub(crate) fn train(
        &self,
        spec: &TrainSpec,
        on_step: &mut dyn FnMut(&flywheel_trainer::TrainStep) -> bool,
    ) -> flywheel_trainer::Result<TrainReport> {
        match self {
            TrainData::Labels(rows) => flywheel_trainer::train_classifier(spec, rows, on_step),
            TrainData::Completions(rows) => flywheel_trainer::train_causal_lm(spec, rows, on_step),
        }
    }

    /// Token counts of every row, untruncated, and the base model's longest sequence.
    fn measure(&self, spec: &TrainSpec) -> flywheel_trainer::Result<(Vec<usize>, usize)> {
        match self {
            TrainData::Labels(rows) => {
                let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
                flywheel_trainer::measure_texts(&spec.base_model_dir, &texts)
            }
            TrainData::Completions(rows) => {
                flywheel_trainer::measure_sft(&spec.base_model_dir, rows)
            }
        }
    }
}

/// The learning rate a multiplier of 1 means: what LoRA fine-tunes of these sizes train well
/// at (the trainer's default).
pub(crate) const BASE_LEARNING_RATE: f64 = 3e-3;

/// What the block asked for and what the run uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub requested: Training,
    /// The serving fleet's largest rank: no auto choice or trial goes above it.
    #[serde(skip)]
    pub max_rank: u32,
    pub resolved: Resolved,
    /// The auto search's trials, in the order they ran; empty without one.
    #[serde(default)]
    pub trials: Vec<Trial>,
}

/// One configuration an auto search trained, and how it did on the validation share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Trial {
    pub learning_rate_multiplier: f64,
    pub lora_r: u32,
    /// The lowest loss on the held-back rows over the run.
    pub validation_loss: f64,
    pub wall_seconds: f64,
    pub chosen: bool,
}

/// Resolves `requested` against `data` and writes the result into `spec`. `operator_epochs`
/// (the worker's `--epochs`) stands in for an auto `n_epochs`.
pub(crate) fn plan(
    requested: Training,
    task: Task,
    data: &TrainData,
    spec: &mut TrainSpec,
    policy_early_stopping: bool,
    operator_epochs: Option<usize>,
    max_rank: u32,
) -> Result<Plan, WorkerError> {
    let (token_lengths, max_positions) = data.measure(spec)?;
    let facts = DataFacts {
        train_rows: data.len(),
        token_lengths,
        max_positions,
        policy_early_stopping,
        max_rank,
    };
    let mut resolved = requested.resolve(task, &facts);
    if let (None, Some(epochs)) = (requested.n_epochs.value(), operator_epochs) {
        resolved.n_epochs = epochs as u32;
        resolved.why.retain(|w| !w.starts_with("n_epochs"));
        resolved
            .why
            .push(format!("n_epochs {epochs}: the worker's --epochs"));
    }
    apply(spec, &resolved);
    Ok(Plan {
        requested,
        resolved,
        max_rank,
        trials: Vec::new(),
    })
}

pub(crate) fn apply(spec: &mut TrainSpec, r: &Resolved) {
    spec.epochs = r.n_epochs as usize;
    spec.batch_size = r.batch_size as usize;
    spec.learning_rate = BASE_LEARNING_RATE * r.learning_rate_multiplier;
    spec.lora.r = r.lora_r as usize;
    spec.lora.alpha = r.lora_alpha;
    spec.lora.dropout = r.lora_dropout;
    if let Some(t) = &r.target_modules {
        spec.lora.target_modules = t.clone();
    }
    spec.max_seq_len = r.max_seq_len;
    spec.early_stopping = r.early_stopping.then_some(EarlyStopping {
        validation_fraction: 0.1,
        // Once an epoch.
        eval_every_steps: 0,
        patience: 2,
        min_delta: 0.0,
    });
}

/// Trains each configuration of the auto search on 90% of the rows, keeps the one with the
/// lowest validation loss on the other 10%, and sets `spec` to it (the caller retrains it on
/// every row). `report` hears each trial as it ends.
pub(crate) fn search(
    plan: &mut Plan,
    data: &TrainData,
    spec: &mut TrainSpec,
    cancelled: &Arc<AtomicBool>,
    report: &mut dyn FnMut(usize, usize, &Trial),
) -> Result<(), WorkerError> {
    let grid = plan.requested.search_grid(&plan.resolved, plan.max_rank);
    let alpha_auto = plan.requested.lora.alpha.value().is_none();
    for (i, &(multiplier, r)) in grid.iter().enumerate() {
        let mut trial = spec.clone();
        trial.learning_rate = BASE_LEARNING_RATE * multiplier;
        trial.lora.r = r as usize;
        if alpha_auto {
            trial.lora.alpha = 2.0 * r as f64;
        }
        trial.checkpointing = None;
        trial.output_dir = spec.output_dir.with_file_name(format!("trial-{i}"));
        // Every epoch is measured and the best kept: the trial is scored at its best.
        trial.early_stopping = Some(EarlyStopping {
            validation_fraction: 0.1,
            eval_every_steps: 0,
            patience: trial.epochs,
            min_delta: 0.0,
        });
        let started = std::time::Instant::now();
        let stop = cancelled.clone();
        let done = data.train(&trial, &mut |_| !stop.load(Ordering::Relaxed))?;
        let _ = std::fs::remove_dir_all(&trial.output_dir);
        let result = Trial {
            learning_rate_multiplier: multiplier,
            lora_r: r,
            validation_loss: done
                .validation_curve
                .iter()
                .map(|&(_, loss)| loss)
                .fold(f64::INFINITY, f64::min),
            wall_seconds: started.elapsed().as_secs_f64(),
            chosen: false,
        };
        report(i + 1, grid.len(), &result);
        plan.trials.push(result);
    }
    let Some(best) = plan
        .trials
        .iter_mut()
        .filter(|t| t.validation_loss.is_finite())
        .min_by(|a, b| a.validation_loss.total_cmp(&b.validation_loss))
    else {
        return Err(WorkerError::Job(
            "auto_search: no trial produced a validation loss".into(),
        ));
    };
    best.chosen = true;
    plan.resolved.learning_rate_multiplier = best.learning_rate_multiplier;
    plan.resolved.lora_r = best.lora_r;
    if alpha_auto {
        plan.resolved.lora_alpha = 2.0 * best.lora_r as f64;
    }
    plan.resolved.why.push(format!(
        "auto_search: learning_rate_multiplier {} and lora.r {} had the lowest validation loss ({:.4}) of {} trials",
        best.learning_rate_multiplier,
        best.lora_r,
        best.validation_loss,
        grid.len()
    ));
    apply(spec, &plan.resolved);
    Ok(())
}
