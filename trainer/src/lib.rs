//! LoRA fine-tuning of Hugging Face checkpoints with burn, and inference with the result.
//!
//! The trainer owns model code (one file per architecture, HF field names), checkpoint loading,
//! LoRA, the training loop and PEFT export. It does no network or database IO: a [`TrainSpec`]
//! and local files come in, adapter files and a [`TrainReport`] go out. burn types never appear
//! in its public API, so callers need not know burn exists.

mod bert;
mod causal;
mod chat;
mod checkpoint;
mod classifier;
mod fit;
mod llama;
mod lora;
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
pub use lora::{LLAMA_PROJECTIONS, LoraSpec};
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
}

pub type Result<T, E = TrainerError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainerError {
    let path = path.into();
    move |error| TrainerError::Io { path, error }
}

/// The burn device the trainer runs on. CPU (flex) unless the build has GPU support and the
/// caller asks for it.
pub(crate) fn device() -> burn::tensor::Device {
    burn::tensor::Device::flex()
}
