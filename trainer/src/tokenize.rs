//! Text to padded id batches through a Hugging Face `tokenizer.json`.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Result, TrainerError};

pub struct TextEncoder {
    tokenizer: Tokenizer,
    pad_id: u32,
}

/// A batch padded to its longest row.
pub struct Batch {
    pub input_ids: Tensor<2, Int>,
    pub attention_mask: Tensor<2>,
    /// Real (non-pad) tokens in the batch.
    pub tokens: usize,
    /// Real tokens of each row (right-padded: they come first).
    pub lengths: Vec<usize>,
}

impl TextEncoder {
    pub fn load(model_dir: &Path, max_len: usize) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TrainerError::MissingFile {
                dir: model_dir.to_owned(),
                file: "tokenizer.json",
            });
        }
        let mut tokenizer =
            Tokenizer::from_file(&path).map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let pad_id = ["[PAD]", "<pad>", "<|endoftext|>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .unwrap_or(0);
        Ok(Self { tokenizer, pad_id })
    }

    pub fn encode(&self, texts: &[&str], device: &Device) -> Result<Batch> {
        let encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode(*t, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let b = texts.len();
        let mut ids = vec![self.pad_id as i64; b * seq];
        let mut mask = vec![0f32; b * seq];
        let mut tokens = 0;
        for (row, enc) in encodings.iter().enumerate() {
            for (j, &id) in enc.get_ids().iter().enumerate() {
                ids[row * seq + j] = id as i64;
                mask[row * seq + j] = 1.0;
            }
            tokens += enc.len();
        }
        Ok(Batch {
            input_ids: Tensor::from_data(TensorData::new(ids, [b, seq]), device),
            attention_mask: Tensor::from_data(TensorData::new(mask, [b, seq]), device),
            tokens,
            lengths: encodings.iter().map(|e| e.len()).collect(),
        })
    }
}
