//! LoRA fine-tuning of Hugging Face checkpoints with burn, and inference with the result.
//!
//! The trainer owns model code (one file per architecture, HF field names), checkpoint loading,
//! LoRA, the training loop and PEFT export. It does no network or database IO: a [`TrainSpec`]
//! and local files come in, adapter files and a [`TrainReport`] go out. burn types never appear
//! in its public API, so callers need not know burn exists.

mod amx;
mod attention;
mod bert;
mod bf16;
mod causal;
mod chat;
mod checkpoint;
mod classifier;
mod fit;
mod fused;
mod head;
mod llama;
mod lora;
mod low_rank;
mod merge;
#[cfg(test)]
mod parity;
pub mod tiny;
mod tokenize;

pub use causal::{
    Encoded, Generation, Generator, SftExample, StepBench, bench_sft_steps, train_causal_lm,
};
pub use classifier::bench_classifier_steps;
pub use classifier::{
    ClassifierPredictor, Example, Prediction, TrainReport, TrainSpec, TrainStep, train_classifier,
};
pub use fit::{Checkpointing, EarlyStopping};
pub use lora::{Compute, LLAMA_PROJECTIONS, LoraSpec};
pub use merge::export_merged;

use std::path::{Path, PathBuf};

/// The largest absolute change the PEFT adapter in `adapter_dir` makes to the base model's
/// outputs on `texts` (encoder hidden states for BERT, logits for causal LMs). Zero means the
/// adapter is a no-op, which publishing refuses.
pub fn adapter_output_delta(
    base_model_dir: &Path,
    adapter_dir: &Path,
    texts: &[&str],
) -> Result<f32> {
    let config = checkpoint::read_config(base_model_dir)?;
    match config["model_type"].as_str().unwrap_or_default() {
        "bert" => classifier::bert_adapter_delta(base_model_dir, adapter_dir, texts),
        _ => causal::llama_adapter_delta(base_model_dir, adapter_dir, texts),
    }
}

/// The LoRA target modules a classifier on `model_dir` trains by default: attention and
/// feed-forward projections, named as its family names them (PEFT's names).
pub fn classifier_target_modules(model_dir: &Path) -> Result<Vec<String>> {
    let config = checkpoint::read_config(model_dir)?;
    Ok(match config["model_type"].as_str().unwrap_or_default() {
        "bert" => ["query", "key", "value", "dense"]
            .map(String::from)
            .to_vec(),
        "llama" | "mistral" | "qwen2" => LLAMA_PROJECTIONS.map(String::from).to_vec(),
        other => return Err(TrainerError::UnsupportedArchitecture(other.to_owned())),
    })
}

/// Everything that can go wrong between a spec and an adapter.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    // Not `source`: the message already says it, and error chains would say it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("model directory {dir} has no {file}")]
    MissingFile { dir: PathBuf, file: &'static str },
    #[error("{file}: {message}")]
    BadFile { file: PathBuf, message: String },
    #[error("checkpoint has no tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error(
        "unsupported architecture `{0}`: supported are BERT-family encoders and Llama-family causal LMs (llama, mistral, qwen2)"
    )]
    UnsupportedArchitecture(String),
    #[error("invalid training spec: {0}")]
    InvalidSpec(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("training was cancelled")]
    Cancelled,
    #[error("{0}")]
    Device(String),
}

pub type Result<T, E = TrainerError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainerError {
    let path = path.into();
    move |error| TrainerError::Io { path, error }
}

/// Where training and inference run, chosen once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accelerator {
    /// burn's flex backend on the CPU's cores.
    #[default]
    Cpu,
    /// burn-wgpu: Vulkan, Metal or DirectX 12 GPUs (builds with the `wgpu` feature only).
    Wgpu,
}

impl std::str::FromStr for Accelerator {
    type Err = TrainerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            other => Err(TrainerError::Device(format!(
                "unknown device `{other}`: use cpu or wgpu"
            ))),
        }
    }
}

static ACCELERATOR: std::sync::OnceLock<Accelerator> = std::sync::OnceLock::new();

/// Picks the accelerator for the rest of the process; call it before any training. A build
/// without the `wgpu` feature refuses `Wgpu` rather than quietly training on the CPU.
pub fn use_accelerator(accelerator: Accelerator) -> Result<()> {
    if accelerator == Accelerator::Wgpu && !cfg!(feature = "wgpu") {
        return Err(TrainerError::Device(
            "this build has no GPU support: rebuild with `--features wgpu` or use --device cpu"
                .into(),
        ));
    }
    let chosen = *ACCELERATOR.get_or_init(|| accelerator);
    if chosen != accelerator {
        return Err(TrainerError::Device(format!(
            "the device was already set to {chosen:?}"
        )));
    }
    Ok(())
}

pub(crate) fn accelerator() -> Accelerator {
    #[cfg(test)]
    if ACCELERATOR.get().is_none() {
        test_accelerator();
    }
    ACCELERATOR.get().copied().unwrap_or_default()
}

/// Unit tests, the parity goldens among them, run where `FLYWHEEL_TEST_DEVICE` says: `wgpu`
/// in a `--features wgpu` build checks the GPU path against the same fixtures.
#[cfg(test)]
fn test_accelerator() {
    if let Ok(name) = std::env::var("FLYWHEEL_TEST_DEVICE") {
        let chosen = name.parse().and_then(use_accelerator);
        chosen.expect("FLYWHEEL_TEST_DEVICE");
    }
}

/// `f` over `items`, in order. On the CPU the items run side by side on burn's thread pool:
/// flex computes elementwise ops on the calling thread, so one item at a time leaves cores
/// idle. A GPU takes them one by one.
pub(crate) fn map_on_pool<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    use rayon::prelude::*;
    match accelerator() {
        Accelerator::Cpu => items.par_iter().map(&f).collect(),
        Accelerator::Wgpu => items.iter().map(f).collect(),
    }
}

/// The burn device the trainer runs on: flex on the CPU unless [`use_accelerator`] chose a
/// GPU.
pub(crate) fn device() -> burn::tensor::Device {
    match accelerator() {
        Accelerator::Cpu => burn::tensor::Device::flex(),
        #[cfg(feature = "wgpu")]
        Accelerator::Wgpu => burn::tensor::Device::wgpu(Default::default()),
        #[cfg(not(feature = "wgpu"))]
        Accelerator::Wgpu => unreachable!("use_accelerator refuses wgpu without the feature"),
    }
}
