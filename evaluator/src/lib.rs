//! Held-out evaluation of a candidate adapter against the current champion, the promotion gate,
//! and the report a data steward reads.
//!
//! The evaluator owns metrics, the gate's rules and report rendering. Like the trainer it does
//! no network or database IO: an [`EvalSpec`] and local model files in, an [`Evaluation`] out.
//! Models run through the trainer's predictor, so no burn type crosses this crate's API either.

mod gate;
mod metrics;
mod report;

use std::path::PathBuf;

pub use gate::{Decision, GatePolicy, Rule, decide};
pub use metrics::{LabelMetrics, Metrics, classification_metrics, mcnemar_exact};
pub use report::render_markdown;

use flywheel_domain::normalize_text;
use flywheel_trainer::{ClassifierPredictor, TrainerError};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] TrainerError),
    #[error("holdout is empty: nothing to evaluate on")]
    EmptyHoldout,
    #[error("{0} holdout inputs also appear in the training snapshot; refusing to evaluate")]
    HoldoutLeak(usize),
}

/// One held-out row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldoutRow {
    pub text: String,
    pub label: usize,
}

/// What to compare on what.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    pub base_model_dir: PathBuf,
    pub candidate_dir: PathBuf,
    /// The champion's adapter; `None` when the domain has none yet and the base model (with
    /// an untrained head) is what production would run.
    pub champion_dir: Option<PathBuf>,
    pub champion_name: String,
    pub labels: Vec<String>,
    pub holdout: Vec<HoldoutRow>,
    /// Normalized inputs of the training snapshot, for the leak check.
    pub training_inputs: Vec<String>,
    pub policy: GatePolicy,
}

/// A flipped example: the champion and candidate disagree on correctness.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Flip {
    pub text: String,
    pub expected: String,
    pub champion: String,
    pub candidate: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub champion_name: String,
    pub holdout_size: usize,
    pub champion: Metrics,
    pub candidate: Metrics,
    /// Exact McNemar p-value of the paired correctness difference.
    pub mcnemar_p: f64,
    pub fixed: Vec<Flip>,
    pub broken: Vec<Flip>,
    pub decision: Decision,
}

const MAX_FLIPS_SHOWN: usize = 20;

pub fn evaluate(spec: &EvalSpec) -> Result<Evaluation, EvalError> {
    if spec.holdout.is_empty() {
        return Err(EvalError::EmptyHoldout);
    }
    let trained: std::collections::HashSet<&str> =
        spec.training_inputs.iter().map(String::as_str).collect();
    let leaks = spec
        .holdout
        .iter()
        .filter(|r| trained.contains(normalize_text(&r.text).as_str()))
        .count();
    if leaks > 0 {
        return Err(EvalError::HoldoutLeak(leaks));
    }
    let texts: Vec<&str> = spec.holdout.iter().map(|r| r.text.as_str()).collect();
    let gold: Vec<usize> = spec.holdout.iter().map(|r| r.label).collect();
    let champion = ClassifierPredictor::load(
        &spec.base_model_dir,
        spec.champion_dir.as_deref(),
        &spec.labels,
        0,
    )?
    .predict(&texts, 32)?;
    let candidate = ClassifierPredictor::load(
        &spec.base_model_dir,
        Some(&spec.candidate_dir),
        &spec.labels,
        0,
    )?
    .predict(&texts, 32)?;
    let champ_labels: Vec<usize> = champion.iter().map(|p| p.label).collect();
    let cand_labels: Vec<usize> = candidate.iter().map(|p| p.label).collect();
    let champion_metrics = classification_metrics(&gold, &champ_labels, &spec.labels);
    let candidate_metrics = classification_metrics(&gold, &cand_labels, &spec.labels);

    let (mut fixed, mut broken) = (Vec::new(), Vec::new());
    let (mut b, mut c) = (0u64, 0u64);
    for (i, row) in spec.holdout.iter().enumerate() {
        let (was, is) = (champ_labels[i] == row.label, cand_labels[i] == row.label);
        let flip = || Flip {
            text: row.text.clone(),
            expected: spec.labels[row.label].clone(),
            champion: spec.labels[champ_labels[i]].clone(),
            candidate: spec.labels[cand_labels[i]].clone(),
        };
        if !was && is {
            c += 1;
            if fixed.len() < MAX_FLIPS_SHOWN {
                fixed.push(flip());
            }
        } else if was && !is {
            b += 1;
            if broken.len() < MAX_FLIPS_SHOWN {
                broken.push(flip());
            }
        }
    }
    let mcnemar_p = mcnemar_exact(b, c);
    let decision = decide(&spec.policy, &champion_metrics, &candidate_metrics);
    Ok(Evaluation {
        champion_name: spec.champion_name.clone(),
        holdout_size: spec.holdout.len(),
        champion: champion_metrics,
        candidate: candidate_metrics,
        mcnemar_p,
        fixed,
        broken,
        decision,
    })
}
