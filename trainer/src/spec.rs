//! The vocabulary of a training run: what to train ([`TrainSpec`], [`LoraSpec`], [`Compute`],
//! [`Checkpointing`], [`EarlyStopping`]) and what it reports ([`TrainStep`], [`TrainReport`]).
//! A leaf: every other module may use it, and it uses none of theirs but the device choice.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device::{Accelerator, accelerator};
use crate::error::{Result, TrainerError};

/// Everything a training run needs besides its rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSpec {
    /// Hugging Face model directory of the base model.
    pub base_model_dir: PathBuf,
    /// Where the adapter files are written.
    pub output_dir: PathBuf,
    pub labels: Vec<String>,
    pub lora: LoraSpec,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Share of the steps spent warming the learning rate up; cosine decay after.
    pub warmup_ratio: f64,
    pub max_seq_len: usize,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Micro-batches of `batch_size` whose gradients make one optimizer step.
    #[serde(default = "one")]
    pub grad_accumulation: usize,
    /// Where to save the run's state every few steps, and resume it from after a crash.
    #[serde(default)]
    pub checkpointing: Option<Checkpointing>,
    /// All gradients are scaled down together when their joint L2 norm exceeds this, as HF's
    /// Trainer does. `None`: no clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
    /// Hold out part of the rows, stop when their loss stops improving, and keep the best
    /// weights seen. `None`: train every epoch on every row.
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// Precision of the frozen base model's products: bf16 is several times faster where the
    /// CPU has AMX, and rounds the base model's weights and inputs to 8 significant bits.
    #[serde(default)]
    pub compute: Compute,
    /// Batch rows of similar length together (classification): within each stretch of 50
    /// batches of the shuffled order, rows are sorted by length, so a batch pads to little
    /// more than its own rows. Short texts of mixed lengths otherwise spend most of a step
    /// on padding.
    #[serde(default)]
    pub group_by_length: bool,
}

fn one() -> usize {
    1
}

fn default_clip() -> Option<f64> {
    Some(1.0)
}

impl TrainSpec {
    /// Defaults for a causal LM learning corrected completions: LoRA on every projection.
    pub fn for_generation(base_model_dir: PathBuf, output_dir: PathBuf) -> Self {
        let mut spec = Self::new(base_model_dir, output_dir, vec![]);
        spec.lora.target_modules = LLAMA_PROJECTIONS.map(String::from).to_vec();
        spec.epochs = 20;
        spec.max_seq_len = 128;
        spec
    }

    /// Defaults for a BERT-family classifier: LoRA on attention and feed-forward projections.
    pub fn new(base_model_dir: PathBuf, output_dir: PathBuf, labels: Vec<String>) -> Self {
        Self {
            base_model_dir,
            output_dir,
            labels,
            lora: LoraSpec {
                target_modules: BERT_PROJECTIONS.map(String::from).to_vec(),
                ..LoraSpec::default()
            },
            epochs: 8,
            batch_size: 16,
            learning_rate: 3e-3,
            weight_decay: 0.01,
            warmup_ratio: 0.06,
            max_seq_len: 64,
            label_smoothing: 0.0,
            seed: 17,
            grad_accumulation: 1,
            checkpointing: None,
            max_grad_norm: default_clip(),
            early_stopping: None,
            compute: Compute::default(),
            group_by_length: false,
        }
    }
}

/// Progress of one optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct TrainStep {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    /// At this step's pace, how long the rest of the run takes.
    pub eta_seconds: f64,
    /// The checkpoint saved after this step, if one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    pub examples: usize,
    pub tokens: usize,
    pub wall_seconds: f64,
    pub tokens_per_second: f64,
    /// `(step, loss)` for every step.
    pub loss_curve: Vec<(usize, f64)>,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    /// Files written into the output directory.
    pub files: Vec<String>,
    /// `(step, loss)` on the validation rows, with early stopping.
    #[serde(default)]
    pub validation_curve: Vec<(usize, f64)>,
    /// With early stopping: the step whose weights were kept (the best validation loss).
    #[serde(default)]
    pub best_step: Option<usize>,
    /// Whether early stopping ended the run before its last planned step.
    #[serde(default)]
    pub stopped_early: bool,
}

/// Where and how often a run saves its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpointing {
    /// A directory of the run's own; a run started again with the same spec and data resumes
    /// from the newest checkpoint in it.
    pub dir: PathBuf,
    /// Optimizer steps between checkpoints.
    pub every_steps: usize,
}

/// Stop training when the loss on held-back rows stops improving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Share of the rows held back from training to measure the validation loss on (at least
    /// one row, chosen by the seed).
    pub validation_fraction: f64,
    /// Optimizer steps between validations; 0: once an epoch.
    pub eval_every_steps: usize,
    /// Validations in a row without an improvement of more than `min_delta` that stop the run.
    pub patience: usize,
    pub min_delta: f64,
}

/// LoRA hyperparameters, with PEFT's names and meanings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator: the update is multiplied by `alpha / r` (or `alpha / sqrt(r)`).
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Module names to adapt, as PEFT matches them (`query`, `value`, `q_proj`, …).
    pub target_modules: Vec<String>,
    /// Rank-stabilized scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "key".into(), "value".into()],
            use_rslora: false,
        }
    }
}

/// Every projection of a BERT layer, as PEFT matches module names (by dotted suffix):
/// `output.dense` takes the attention's and the feed-forward's output projections, and nothing
/// here matches the pooler's `dense`, which a mean-pooled classifier never uses; a bare `dense`
/// would, and PEFT would then miss adapter keys for it on load.
pub const BERT_PROJECTIONS: [&str; 5] = [
    "query",
    "key",
    "value",
    "intermediate.dense",
    "output.dense",
];

/// Every projection of a Llama-family layer, by PEFT's names.
pub const LLAMA_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl LoraSpec {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether PEFT would adapt a module of this (dotted) name.
    pub fn targets(&self, module_path: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module_path == t || module_path.ends_with(&format!(".{t}")))
    }
}

/// The precision of the frozen base model's matrix products while training. The adapter, the
/// head, attention and every sum stay f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// f32 products: what the parity fixtures were made with.
    #[default]
    Float32,
    /// Frozen weights and their inputs rounded to bf16, products summed in f32, on the CPU's
    /// AMX tiles (Intel Xeon 4th generation and later); refused where the CPU has none.
    Bfloat16,
}

impl Compute {
    /// Whether training can compute this way here.
    pub fn is_available(self) -> bool {
        self.ensure_available().is_ok()
    }

    /// [`Self::is_available`] as an error that says what to do instead: bf16 is the CPU's AMX
    /// path, so it needs such a CPU and training on it rather than on a GPU.
    pub fn ensure_available(self) -> Result<()> {
        let refused = |why: &str| Err(TrainerError::InvalidSpec(why.into()));
        match self {
            Compute::Float32 => Ok(()),
            Compute::Bfloat16 if accelerator() != Accelerator::Cpu => {
                refused("compute bfloat16 runs on the CPU only; use float32 on a GPU")
            }
            Compute::Bfloat16 if !flywheel_kernels::amx::available() => refused(
                "compute bfloat16 needs a CPU with AMX-BF16 (Intel Xeon 4th generation or later); use float32",
            ),
            Compute::Bfloat16 => Ok(()),
        }
    }
}

impl std::str::FromStr for Compute {
    type Err = TrainerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" => Ok(Self::Float32),
            "bfloat16" => Ok(Self::Bfloat16),
            other => Err(TrainerError::InvalidSpec(format!(
                "unknown compute `{other}`: use float32 or bfloat16"
            ))),
        }
    }
}

/// Timing of LoRA training steps, for comparison with PyTorch + PEFT on the same batches.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    pub steps: usize,
    pub median_step_seconds: f64,
    /// Real (non-padding) tokens over the timed steps' total time.
    pub tokens_per_second: f64,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub losses: Vec<f64>,
}

impl StepBench {
    pub(crate) fn new(
        times: &[f64],
        tokens: usize,
        losses: Vec<f64>,
        params: (usize, usize),
    ) -> Self {
        let mut sorted = times.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            steps: times.len(),
            median_step_seconds: sorted[sorted.len() / 2],
            tokens_per_second: tokens as f64 / times.iter().sum::<f64>(),
            trainable_parameters: params.0,
            total_parameters: params.1,
            losses,
        }
    }
}
