//! LoRA fine-tuning of Hugging Face checkpoints with burn, and inference with the result.
//!
//! The trainer owns model code (one file per architecture, HF field names), checkpoint loading,
//! LoRA, the training loop and PEFT export. It does no network or database IO: a [`TrainSpec`]
//! and local files come in, adapter files and a [`TrainReport`] go out. burn types never appear
//! in its public API, so callers need not know burn exists.

#![forbid(unsafe_code)]

// Leaves: the vocabulary every other module shares, and nothing of theirs.
mod device;
mod dropout;
mod error;
mod spec;
// Files and text: checkpoints, tokenizers, chat templates.
mod chat;
mod checkpoint;
mod tokenize;
// The burn side of the fused CPU ops whose arithmetic is `flywheel_kernels`'.
mod attention;
mod bf16;
mod fused;
mod head;
mod low_rank;
// Then, each using only those before it in this order: adapters (`lora`), the architectures
// (`bert`, `llama`), the loop that trains them (`fit`), the two objectives (`classifier`,
// `causal`), and what builds on those (`merge`, `tiny`).
mod bert;
mod causal;
mod classifier;
mod decode;
mod fit;
mod gguf;
mod llama;
mod lora;
mod merge;
#[cfg(test)]
mod parity;
pub mod tiny;
// Parse-only entry points for the fuzzer (`tests/fuzz`); not an API.
#[doc(hidden)]
pub mod fuzzing;

pub use causal::{
    Encoded, Generation, Generator, SftExample, bench_sft_steps, measure_sft, train_causal_lm,
};
pub use classifier::{ClassifierPredictor, Example, Prediction, train_classifier};
pub use classifier::{bench_classifier_steps, measure_texts};
pub use decode::{GenerationBench, bench_generation};
pub use device::{Accelerator, use_accelerator};
pub use error::{Result, TrainerError};
pub use gguf::{GgufExport, GgufQuant, export_gguf};
pub use merge::export_merged;
pub use spec::{
    BERT_PROJECTIONS, Checkpointing, Compute, EarlyStopping, LLAMA_PROJECTIONS, LoraSpec,
    StepBench, TrainReport, TrainSpec, TrainStep,
};

use std::path::Path;

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
        "bert" => BERT_PROJECTIONS.map(String::from).to_vec(),
        "llama" | "mistral" | "qwen2" => LLAMA_PROJECTIONS.map(String::from).to_vec(),
        other => return Err(TrainerError::UnsupportedArchitecture(other.to_owned())),
    })
}
