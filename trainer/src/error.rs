//! What can go wrong between a spec and an adapter.

use std::path::PathBuf;

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
    /// A format or option an export cannot write.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = TrainerError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainerError {
    let path = path.into();
    move |error| TrainerError::Io { path, error }
}
