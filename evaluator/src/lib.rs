//! Held-out evaluation of a candidate adapter against the current champion, the promotion gate,
//! and the report a data steward reads.
//!
//! The evaluator owns metrics, the gate's rules and report rendering. Like the trainer it does
//! no network or database IO: an [`EvalSpec`] and local model files in, an [`Evaluation`] out.
//! Models run through the trainer's predictor, so no burn type crosses this crate's API either.

mod calibration;
mod gate;
mod html;
mod metrics;
mod report;
mod review;
pub mod serving;

use std::path::PathBuf;

pub use calibration::{
    Calibration, ReliabilityBin, Routing, RoutingPoint, ScopeThreshold, calibration,
    pick_scope_threshold, pick_threshold,
};
pub use gate::{Decision, Evidence, LabelFlips, Rule, decide, format_p};
pub use html::{LIVE_MARKER, charts, escape_html, render_html};
pub use metrics::{
    LabelMetrics, Metrics, classification_metrics, generation_metrics, mcnemar_exact,
};
pub use report::render_markdown;
pub use review::{LabelIssue, Reviewed, label_issues};
pub use serving::{LintReport, ServingLimits, lint_adapter};

use flywheel_domain::{Policy, Task, normalize_text};
use flywheel_trainer::{ClassifierPredictor, Generator, TrainerError};
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

/// One held-out row: the input and what the model should have answered (a label for
/// classification, text for generation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldoutRow {
    /// The stored correction's id, named in the label review.
    pub id: i64,
    pub text: String,
    pub expected: String,
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
    pub task: Task,
    /// The label set, for classification.
    pub labels: Vec<String>,
    /// The "none of the above" label, whose recall is reported on its own.
    pub out_of_scope_label: Option<String>,
    pub holdout: Vec<HoldoutRow>,
    /// Normalized inputs of the training snapshot, for the leak check.
    pub training_inputs: Vec<String>,
    /// Training rows to review for label noise with the candidate (classification); the
    /// holdout is always reviewed.
    pub review: Vec<HoldoutRow>,
    /// The domain's policy: its gate rules and target accuracy.
    pub policy: Policy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutOfScope {
    pub label: String,
    pub champion_recall: f64,
    pub candidate_recall: f64,
    pub support: usize,
    /// Below this confidence the candidate's answer should be taken as out of scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ScopeThreshold>,
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
    /// Rows only the candidate got right, and only the champion got right.
    pub fixed_count: u64,
    pub broken_count: u64,
    /// The examples of each, in holdout order, up to [`MAX_FLIPS_KEPT`]; reports show the
    /// first [`FLIPS_SHOWN`].
    pub fixed: Vec<Flip>,
    pub broken: Vec<Flip>,
    /// Per expected label, the flips behind its recall change (classification; empty for
    /// generation), so the gate can be applied again to a stored evaluation.
    #[serde(default)]
    pub label_flips: Vec<LabelFlips>,
    /// Recall on the out-of-scope label, champion and candidate, when the domain has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_of_scope: Option<OutOfScope>,
    /// Rows whose label the candidate confidently disagrees with, for a steward to review
    /// (classification).
    #[serde(default)]
    pub label_issues: Vec<LabelIssue>,
    /// The candidate's calibration on the holdout.
    pub calibration: Calibration,
    /// The candidate's escalation threshold for hybrid routing.
    pub routing: Routing,
    pub decision: Decision,
}

impl Evaluation {
    /// The production version this candidate was measured against; `None` when it was the
    /// base model (no production adapter yet).
    pub fn champion_version(&self) -> Option<&str> {
        (!self.champion_name.starts_with(BASE_CHAMPION))
            .then(|| self.champion_name.split(' ').next().unwrap_or_default())
    }

    /// The gate applied again to this stored evidence under `policy`: no model runs, so a
    /// policy change or a steward's review can settle a held-back version without retraining.
    pub fn regate(&self, policy: &Policy) -> Decision {
        decide(
            policy,
            &Evidence {
                champion: &self.champion,
                candidate: &self.candidate,
                p_value: self.mcnemar_p,
                ece: self.calibration.ece,
                champion_is_adapter: self.champion_version().is_some(),
                label_flips: &self.label_flips,
            },
        )
    }

    /// What the versions list shows of an evaluation, with the decision that stands.
    pub fn summary(&self, decision: &Decision) -> serde_json::Value {
        serde_json::json!({
            "champion_accuracy": self.champion.accuracy,
            "candidate_accuracy": self.candidate.accuracy,
            "candidate_macro_f1": self.candidate.macro_f1,
            "candidate_token_f1": self.candidate.token_f1,
            "mcnemar_p": self.mcnemar_p,
            "ece": self.calibration.ece,
            "escalation_threshold": self.routing.threshold,
            "holdout_size": self.holdout_size,
            "decision": decision,
        })
    }
}

/// How an evaluation names the base model as its champion: `champion_name` starts with it.
pub const BASE_CHAMPION: &str = "base model";

/// How many flipped examples of each kind an evaluation keeps, for a steward who wants all of
/// them (the console lists them); `fixed_count` and `broken_count` count every one.
pub const MAX_FLIPS_KEPT: usize = 1000;
/// How many of each a report shows.
pub const FLIPS_SHOWN: usize = 20;
/// The most label issues an evaluation lists.
const MAX_LABEL_ISSUES: usize = 200;
const CALIBRATION_BINS: usize = 10;
/// Longest answer generated during evaluation, in tokens.
const MAX_NEW_TOKENS: usize = 32;

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
    let expected: Vec<String> = spec.holdout.iter().map(|r| r.expected.clone()).collect();
    let champion_dir = spec.champion_dir.as_deref();
    let candidate_dir = Some(spec.candidate_dir.as_path());
    let mut label_issues = Vec::new();
    let (champion, candidate) = match spec.task {
        Task::Classification => {
            let load =
                |adapter| ClassifierPredictor::load(&spec.base_model_dir, adapter, &spec.labels, 0);
            let answers = |probabilities: &[Vec<f32>]| -> Vec<(String, f64)> {
                probabilities
                    .iter()
                    .map(|row| {
                        let p = flywheel_trainer::Prediction::most_likely(row);
                        (spec.labels[p.label].clone(), p.confidence as f64)
                    })
                    .collect()
            };
            let champion = answers(&load(champion_dir)?.probabilities(&texts, 32)?);
            let candidate = load(candidate_dir)?;
            let holdout = candidate.probabilities(&texts, 32)?;
            let train_texts: Vec<&str> = spec.review.iter().map(|r| r.text.as_str()).collect();
            let train = candidate.probabilities(&train_texts, 32)?;
            // Per split: in-sample training probabilities sit near 1 and would lift every
            // label's threshold out of the holdout's reach.
            let reviewed = |rows: &'_ [HoldoutRow], probabilities: &'_ [Vec<f32>], split| {
                let rows: Vec<Reviewed> = rows
                    .iter()
                    .zip(probabilities)
                    .map(|(r, p)| Reviewed {
                        id: r.id,
                        split,
                        text: &r.text,
                        given: &r.expected,
                        probabilities: p,
                    })
                    .collect();
                review::label_issues(&rows, &spec.labels, MAX_LABEL_ISSUES)
            };
            label_issues = reviewed(&spec.holdout, &holdout, "holdout");
            label_issues.extend(reviewed(&spec.review, &train, "train"));
            let margin = |i: &LabelIssue| i.suggested_probability - i.given_probability;
            label_issues.sort_by(|a, b| margin(b).total_cmp(&margin(a)).then(a.id.cmp(&b.id)));
            label_issues.truncate(MAX_LABEL_ISSUES);
            (champion, answers(&holdout))
        }
        Task::Generation => {
            let run = |adapter| -> Result<Vec<(String, f64)>, EvalError> {
                let g = Generator::load(&spec.base_model_dir, adapter)?;
                Ok(g.generate_all(&texts, MAX_NEW_TOKENS)?
                    .into_iter()
                    .map(|out| (out.text, out.confidence as f64))
                    .collect())
            };
            (run(champion_dir)?, run(candidate_dir)?)
        }
    };
    let metrics = |predicted: &[String]| match spec.task {
        Task::Classification => {
            let index = |l: &String| spec.labels.iter().position(|x| x == l).unwrap_or(0);
            let gold: Vec<usize> = expected.iter().map(index).collect();
            let pred: Vec<usize> = predicted.iter().map(index).collect();
            classification_metrics(&gold, &pred, &spec.labels)
        }
        Task::Generation => generation_metrics(&expected, predicted),
    };
    let (champion, _): (Vec<String>, Vec<f64>) = champion.into_iter().unzip();
    let (candidate, confidence): (Vec<String>, Vec<f64>) = candidate.into_iter().unzip();
    let champion_metrics = metrics(&champion);
    let candidate_metrics = metrics(&candidate);
    let right =
        |answer: &String, row: &HoldoutRow| normalize_text(answer) == normalize_text(&row.expected);

    let (mut fixed, mut broken) = (Vec::new(), Vec::new());
    let (mut b, mut c) = (0u64, 0u64);
    for (i, row) in spec.holdout.iter().enumerate() {
        let (was, is) = (right(&champion[i], row), right(&candidate[i], row));
        let flip = || Flip {
            text: row.text.clone(),
            expected: row.expected.clone(),
            champion: champion[i].clone(),
            candidate: candidate[i].clone(),
        };
        if !was && is {
            c += 1;
            if fixed.len() < MAX_FLIPS_KEPT {
                fixed.push(flip());
            }
        } else if was && !is {
            b += 1;
            if broken.len() < MAX_FLIPS_KEPT {
                broken.push(flip());
            }
        }
    }
    let mcnemar_p = mcnemar_exact(b, c);
    let label_flips = match spec.task {
        Task::Classification => label_flips(&spec.labels, &spec.holdout, |i, row| {
            (right(&champion[i], row), right(&candidate[i], row))
        }),
        Task::Generation => Vec::new(),
    };
    let correct: Vec<bool> = spec
        .holdout
        .iter()
        .zip(&candidate)
        .map(|(row, a)| right(a, row))
        .collect();
    let calibration = calibration::calibration(&confidence, &correct, CALIBRATION_BINS);
    let routing = pick_threshold(&confidence, &correct, spec.policy.target_accuracy);
    let decision = decide(
        &spec.policy,
        &Evidence {
            champion: &champion_metrics,
            candidate: &candidate_metrics,
            p_value: mcnemar_p,
            ece: calibration.ece,
            champion_is_adapter: spec.champion_dir.is_some(),
            label_flips: &label_flips,
        },
    );
    let out_of_scope = spec.out_of_scope_label.as_ref().and_then(|label| {
        let recall = |m: &Metrics| {
            m.per_label
                .iter()
                .find(|l| &l.label == label)
                .map(|l| (l.recall, l.support))
        };
        let (champion_recall, support) = recall(&champion_metrics)?;
        let (candidate_recall, _) = recall(&candidate_metrics)?;
        let is_oos: Vec<bool> = expected.iter().map(|e| e == label).collect();
        let predicted_oos: Vec<bool> = candidate.iter().map(|p| p == label).collect();
        Some(OutOfScope {
            label: label.clone(),
            champion_recall,
            candidate_recall,
            support,
            // On a handful of out-of-scope rows the sum's recall half is a coin toss that can
            // send most answers out of scope: no threshold below the policy's label support.
            threshold: (support >= spec.policy.min_label_support as usize)
                .then(|| pick_scope_threshold(&confidence, &correct, &predicted_oos, &is_oos)),
        })
    });
    Ok(Evaluation {
        out_of_scope,
        champion_name: spec.champion_name.clone(),
        holdout_size: spec.holdout.len(),
        champion: champion_metrics,
        candidate: candidate_metrics,
        mcnemar_p,
        fixed_count: c,
        broken_count: b,
        fixed,
        broken,
        label_flips,
        label_issues,
        calibration,
        routing,
        decision,
    })
}

/// Per label of `labels` (in order), how many of its holdout rows the candidate lost and
/// gained against the champion; `outcome(i, row)` is (champion right, candidate right).
fn label_flips(
    labels: &[String],
    holdout: &[HoldoutRow],
    outcome: impl Fn(usize, &HoldoutRow) -> (bool, bool),
) -> Vec<LabelFlips> {
    let mut flips: Vec<LabelFlips> = labels
        .iter()
        .map(|l| LabelFlips {
            label: l.clone(),
            support: 0,
            lost: 0,
            gained: 0,
        })
        .collect();
    for (i, row) in holdout.iter().enumerate() {
        let Some(f) = flips.iter_mut().find(|f| f.label == row.expected) else {
            continue;
        };
        f.support += 1;
        match outcome(i, row) {
            (true, false) => f.lost += 1,
            (false, true) => f.gained += 1,
            _ => {}
        }
    }
    flips
}
