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

/// `Tokenizer::from_file`, with a panic inside the tokenizers crate turned into an error:
/// 0.22.2 panics on some malformed files (a syntax error inside `decoder`, a BPE merge shorter
/// than `continuing_subword_prefix`) instead of returning one, and a base model's
/// `tokenizer.json` is outside input.
/// A post-processor naming a special token it has no id for panics on every encode, so one
/// probe encode under `catch_unwind` refuses such a file at load, not on the first row.
pub(crate) fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    let panicked = || {
        TrainerError::Tokenizer(format!(
            "{}: the tokenizers crate panicked reading it; the file is malformed",
            path.display()
        ))
    };
    let tokenizer = std::panic::catch_unwind(|| Tokenizer::from_file(path))
        .map_err(|_| panicked())?
        .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
    // Batches carry ids as burn's Int elements (i32 on some backends).
    if let Some(max) = tokenizer.get_vocab(true).into_values().max()
        && max > i32::MAX as u32
    {
        return Err(TrainerError::Tokenizer(format!(
            "{}: token id {max} is out of range",
            path.display()
        )));
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = tokenizer.encode("a", true);
    }))
    .map_err(|_| panicked())?;
    Ok(tokenizer)
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
        let mut tokenizer = read_tokenizer(&path)?;
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

    /// Tokens of each text as [`Self::encode`] would give them.
    pub fn lengths(&self, texts: &[&str]) -> Result<Vec<usize>> {
        texts
            .iter()
            .map(|t| self.tokenizer.encode(*t, true).map(|e| e.len()))
            .collect::<Result<_, _>>()
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))
    }

    pub fn encode(&self, texts: &[&str], device: &Device) -> Result<Batch> {
        let encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode(*t, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        // An id past i32::MAX (a vocabulary or added token that far out) cannot be a tensor
        // element on every backend: refused, not panicked on.
        if let Some(id) = encodings
            .iter()
            .flat_map(|e| e.get_ids())
            .copied()
            .chain([self.pad_id])
            .find(|&id| id > i32::MAX as u32)
        {
            return Err(TrainerError::Tokenizer(format!(
                "token id {id} is out of range"
            )));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `flywheel-fuzz` (tokenizer): files that made tokenizers 0.22.2 panic are
    /// refused with an error.
    #[test]
    fn a_tokenizer_json_the_tokenizers_crate_panics_on_is_refused() {
        let head = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":null,"#;
        for (what, rest) in [
            (
                "a syntax error inside decoder",
                r#""post_processor":null,"decoder":{"type":"ByteLevel",,},"model":{"type":"WordLevel","vocab":{"[UNK]":0},"unk_token":"[UNK]"}}"#,
            ),
            (
                "a merge shorter than continuing_subword_prefix",
                r###""post_processor":null,"decoder":null,"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":"##","end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"vocab":{"a":0,"b":1,"ab":2},"merges":[["a","b"]]}}"###,
            ),
            (
                "a template naming a special token it has no id for",
                r#""decoder":null,"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"[CLS]","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],"pair":[{"Sequence":{"id":"A","type_id":0}}],"special_tokens":{}},"model":{"type":"WordLevel","vocab":{"[UNK]":0,"a":1},"unk_token":"[UNK]"}}"#,
            ),
            (
                "a token id past i32::MAX, which burn's Int tensors panicked on",
                r#""post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"a":2147483648},"unk_token":"[UNK]"}}"#,
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("tokenizer.json"), format!("{head}{rest}")).unwrap();
            let err = TextEncoder::load(dir.path(), 16)
                .err()
                .expect(what)
                .to_string();
            assert!(err.contains("tokenizer"), "{what}: {err}");
        }
    }
}
