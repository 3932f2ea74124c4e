//! Whether a base model can train a domain's task, judged from what a model directory holds
//! (its file names and `config.json`'s `model_type`) before any job is queued, so that a
//! registration that could never train is refused with the reason instead of failing later.

use crate::{Invalid, Task};

/// The `model_type`s the trainer loads, and what each can do.
const ENCODERS: &[&str] = &["bert"];
const CAUSAL_LMS: &[&str] = &["llama", "mistral", "qwen2"];

/// What the caller found in the model directory (or the registry's manifest of it).
pub struct ModelFiles<'a> {
    /// `model_type` from `config.json`; `None` when there is no readable config.
    pub model_type: Option<&'a str>,
    /// The directory's file names, relative to it.
    pub files: &'a [String],
}

/// Checks that the model in `found` is a supported family with weights and a tokenizer, and
/// fits `task` (generation needs a causal LM). `what` names the model in messages.
pub fn check_base_model(
    task: Task,
    what: &str,
    found: &ModelFiles<'_>,
    target_modules: Option<&[String]>,
) -> Result<(), Invalid> {
    let has = |name: &str| found.files.iter().any(|f| f == name);
    let refuse = |message: String| Err(Invalid::field("base_model", message));
    if !has("config.json") {
        return refuse(format!(
            "{what} has no config.json; point base_model at a Hugging Face model directory \
             (config.json, model.safetensors, tokenizer.json)"
        ));
    }
    let Some(model_type) = found.model_type else {
        return refuse(format!(
            "{what}: config.json is not JSON with a `model_type`"
        ));
    };
    let families = || {
        format!(
            "flywheel trains {} (classification) and {} (classification or generation)",
            ENCODERS.join(", "),
            CAUSAL_LMS.join(", ")
        )
    };
    let encoder = ENCODERS.contains(&model_type);
    if !encoder && !CAUSAL_LMS.contains(&model_type) {
        return refuse(format!(
            "{what} is a `{model_type}` model, which is not supported; {}",
            families()
        ));
    }
    if encoder && task == Task::Generation {
        return refuse(format!(
            "{what} is a `{model_type}` encoder, which cannot generate text; a generation domain \
             needs a causal LM ({})",
            CAUSAL_LMS.join(", ")
        ));
    }
    let weights = has("model.safetensors") || has("model.safetensors.index.json");
    if !weights {
        return refuse(format!(
            "{what} has no model.safetensors (or model.safetensors.index.json with its shards); \
             flywheel reads safetensors weights only"
        ));
    }
    if !has("tokenizer.json") {
        return refuse(format!(
            "{what} has no tokenizer.json (the fast tokenizer's file); save the tokenizer with \
             transformers' `save_pretrained` next to the model"
        ));
    }
    // PEFT matches a target by its dotted suffix. Each must name projections the trainer
    // adapts: in an encoder a `dense` must say which (`intermediate.dense`, `output.dense`),
    // since a bare one also matches the pooler, which the adapter then lacks weights for.
    let projections: &[&str] = if encoder {
        &[
            "query",
            "key",
            "value",
            "intermediate.dense",
            "output.dense",
        ]
    } else {
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    };
    for t in target_modules.unwrap_or_default() {
        let names_one = |p: &&str| t == p || t.ends_with(&format!(".{p}"));
        if !projections.iter().any(names_one) {
            return Err(Invalid::field(
                "training.lora.target_modules",
                format!(
                    "`{t}` names no projection flywheel adapts in a `{model_type}` model; use {}",
                    projections.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_reason_a_model_cannot_train_is_named() {
        let full = files(&["config.json", "model.safetensors", "tokenizer.json"]);
        let check = |task, model_type, files: &[String]| {
            check_base_model(task, "the model", &ModelFiles { model_type, files }, None)
        };
        assert!(check(Task::Classification, Some("bert"), &full).is_ok());
        assert!(check(Task::Generation, Some("qwen2"), &full).is_ok());
        assert!(check(Task::Classification, Some("llama"), &full).is_ok());
        for (task, model_type, files, says) in [
            (
                Task::Generation,
                Some("bert"),
                full.clone(),
                "cannot generate",
            ),
            (Task::Classification, Some("gpt2"), full.clone(), "`gpt2`"),
            (Task::Classification, None, full.clone(), "model_type"),
            (
                Task::Classification,
                Some("bert"),
                files(&[]),
                "no config.json",
            ),
            (
                Task::Classification,
                Some("bert"),
                files(&["config.json", "tokenizer.json", "pytorch_model.bin"]),
                "model.safetensors",
            ),
            (
                Task::Classification,
                Some("bert"),
                files(&["config.json", "model.safetensors"]),
                "tokenizer.json",
            ),
        ] {
            let e = check(task, model_type, &files).unwrap_err();
            assert_eq!(e.field, "base_model");
            assert!(e.message.contains(says), "{says}: {}", e.message);
        }
        let targets = |names: &[&str], model_type| {
            let names = files(names);
            check_base_model(
                Task::Classification,
                "the model",
                &ModelFiles {
                    model_type: Some(model_type),
                    files: &full,
                },
                Some(&names),
            )
        };
        assert!(targets(&["query", "output.dense"], "bert").is_ok());
        assert!(targets(&["q_proj", "layers.0.mlp.up_proj"], "qwen2").is_ok());
        let e = targets(&["q_proj"], "bert").unwrap_err();
        assert_eq!(e.field, "training.lora.target_modules");
        assert!(
            e.message.contains("intermediate.dense, output.dense"),
            "{}",
            e.message
        );
        // A bare `dense` would also take the pooler.
        assert!(targets(&["dense"], "bert").is_err());
        assert!(targets(&["attention.output.dense"], "bert").is_ok());
    }
}
