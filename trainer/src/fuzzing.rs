//! Parse-only entry points for `tests/fuzz` (`flywheel-fuzz`), which feeds them mutated
//! files. Each calls the private reader the trainer itself uses, on files in `dir`, and
//! returns a small summary so that a fuzz target can tell an accepted input from a refused
//! one. Nothing here is part of the trainer's API: no caller but the fuzzer should use it.

use std::path::Path;

use crate::error::Result;

/// `config.json` as the architectures read it: `read_config`, then `BertConfig::from_json`
/// or `LlamaConfig::from_json` as its `model_type` says (the dispatch
/// [`crate::classifier_target_modules`] and [`crate::adapter_output_delta`] make).
pub fn model_config(dir: &Path) -> Result<String> {
    let raw = crate::checkpoint::read_config(dir)?;
    Ok(match raw["model_type"].as_str().unwrap_or_default() {
        "bert" => format!("{:?}", crate::bert::BertConfig::from_json(&raw)?),
        _ => format!("{:?}", crate::llama::LlamaConfig::from_json(&raw)?),
    })
}

/// One safetensors file read as adapters and heads are (`Checkpoint::open_file`): the names
/// and shapes of its float tensors.
pub fn safetensors_file(file: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut ckpt = crate::checkpoint::Checkpoint::open_file(file)?;
    Ok(ckpt
        .names()
        .into_iter()
        .map(|n| {
            let (shape, _) = ckpt.take_any(&n).expect("listed");
            (n, shape)
        })
        .collect())
}

/// `tokenizer.json` in `dir` loaded as classifiers load it (`TextEncoder::load`, truncating
/// at `max_len`), then `texts` encoded as one padded batch: the real tokens it holds.
pub fn tokenizer(dir: &Path, max_len: usize, texts: &[&str]) -> Result<usize> {
    let encoder = crate::tokenize::TextEncoder::load(dir, max_len)?;
    let batch = encoder.encode(texts, &crate::device::device())?;
    Ok(batch.tokens)
}

/// The chat template in `dir` (`chat_template.jinja`, or `chat_template` in
/// `tokenizer_config.json`) loaded and rendered as SFT renders it: the generation prompt, and
/// `prompt`/`completion` split into the prompt and completion text. `None` without a
/// template.
pub fn chat_template(
    dir: &Path,
    prompt: &str,
    completion: &str,
) -> Result<Option<(String, String)>> {
    let Some(template) = crate::chat::ChatTemplate::load(dir)? else {
        return Ok(None);
    };
    template.prompt(prompt)?;
    let split = template.split(prompt, completion)?;
    Ok(Some((split.prompt, split.completion)))
}
