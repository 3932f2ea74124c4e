//! Will serving stacks load this adapter, and does it do anything? Checked before publishing.
//!
//! vLLM and LoRAX load PEFT LoRA adapters for Llama-family models when the adapter holds only
//! `lora_A`/`lora_B` pairs on the attention and MLP projections, no `modules_to_save`, no
//! full embedding or `lm_head` weights, no LoRA bias, and a rank within the server's
//! `--max-lora-rank`. BERT-family classifiers are served by PEFT itself, which accepts the
//! encoder's `query`/`key`/`value`/`dense` projections. Every problem is reported, not just
//! the first, so one fix-up round suffices.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

/// The serving fleet's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServingLimits {
    /// The largest rank the fleet's servers are started with (vLLM `--max-lora-rank`).
    pub max_rank: usize,
}

impl Default for ServingLimits {
    fn default() -> Self {
        Self { max_rank: 64 }
    }
}

/// One reason an adapter cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable name of the rule, for dashboards and tests.
    pub rule: &'static str,
    pub message: String,
}

/// What the lint saw.
#[derive(Debug, Clone, Serialize)]
pub struct LintReport {
    pub model_type: String,
    pub rank: usize,
    pub target_modules: Vec<String>,
    pub adapted_modules: usize,
    /// Largest Frobenius norm of an adapted module's update `s·B·A`.
    pub max_update_norm: f64,
    pub findings: Vec<Finding>,
}

impl LintReport {
    pub fn passed(&self) -> bool {
        self.findings.is_empty()
    }

    /// One line per finding, for a job's failure message.
    pub fn summary(&self) -> String {
        self.findings
            .iter()
            .map(|f| format!("[{}] {}", f.rule, f.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Module names (last path component) the serving stacks accept as LoRA targets, by
/// `model_type`.
pub fn servable_targets(model_type: &str) -> &'static [&'static str] {
    match model_type {
        "llama" | "mistral" | "qwen2" => &flywheel_trainer::LLAMA_PROJECTIONS,
        "bert" => &["query", "key", "value", "dense"],
        _ => &[],
    }
}

/// Whether PEFT adapts the module at `path` for this `target_modules` entry: the whole name,
/// or a suffix at a dot.
fn peft_targets(target: &str, path: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct LintError {
    pub path: String,
    pub message: String,
}

fn read(path: &Path) -> Result<Vec<u8>, LintError> {
    std::fs::read(path).map_err(|e| LintError {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Shapes of every tensor in the base model's checkpoint (single file or sharded).
fn base_shapes(base: &Path) -> Result<BTreeMap<String, Vec<usize>>, LintError> {
    let index = base.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let raw: serde_json::Value =
            serde_json::from_slice(&read(&index)?).map_err(|e| LintError {
                path: index.display().to_string(),
                message: e.to_string(),
            })?;
        let shards: BTreeSet<String> = raw["weight_map"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_str().map(str::to_owned))
            .collect();
        shards.into_iter().map(|f| base.join(f)).collect()
    } else {
        vec![base.join("model.safetensors")]
    };
    let mut shapes = BTreeMap::new();
    for file in files {
        let bytes = read(&file)?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| LintError {
            path: file.display().to_string(),
            message: e.to_string(),
        })?;
        for (name, info) in meta.tensors() {
            shapes.insert(name, info.shape.clone());
        }
    }
    Ok(shapes)
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Some(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            data.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            data.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// `‖B·A‖_F` without forming `B·A`: `Σ (BᵀB) ∘ (A·Aᵀ)`, two `r × r` products.
fn update_norm(a: &[f32], b: &[f32], r: usize, input: usize, output: usize) -> f64 {
    let mut gram_a = vec![0f64; r * r];
    let mut gram_b = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            gram_a[i * r + j] = (0..input)
                .map(|k| a[i * input + k] as f64 * a[j * input + k] as f64)
                .sum();
            gram_b[i * r + j] = (0..output)
                .map(|k| b[k * r + i] as f64 * b[k * r + j] as f64)
                .sum();
        }
    }
    gram_a
        .iter()
        .zip(&gram_b)
        .map(|(x, y)| x * y)
        .sum::<f64>()
        .max(0.0)
        .sqrt()
}

/// Lints the PEFT adapter in `adapter_dir` against the base model in `base_dir`.
pub fn lint_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    limits: &ServingLimits,
) -> Result<LintReport, LintError> {
    let mut findings = Vec::new();
    let mut flag = |rule: &'static str, message: String| findings.push(Finding { rule, message });

    let base_config_path = base_dir.join("config.json");
    let base_config: serde_json::Value = serde_json::from_slice(&read(&base_config_path)?)
        .map_err(|e| LintError {
            path: base_config_path.display().to_string(),
            message: e.to_string(),
        })?;
    let model_type = base_config["model_type"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let config_path = adapter_dir.join("adapter_config.json");
    let config: serde_json::Value =
        serde_json::from_slice(&read(&config_path)?).map_err(|e| LintError {
            path: config_path.display().to_string(),
            message: e.to_string(),
        })?;

    if config["peft_type"] != "LORA" {
        flag(
            "peft_type",
            format!(
                "peft_type is {}, serving stacks load LORA",
                config["peft_type"]
            ),
        );
    }
    let rank = config["r"].as_u64().unwrap_or(0) as usize;
    if rank == 0 {
        flag("rank", "adapter_config.json has no positive `r`".into());
    } else if rank > limits.max_rank {
        flag(
            "rank",
            format!(
                "rank {rank} exceeds the serving limit of {} (vLLM --max-lora-rank)",
                limits.max_rank
            ),
        );
    }
    let alpha = config["lora_alpha"].as_f64().unwrap_or(rank as f64);
    let scaling = if config["use_rslora"].as_bool().unwrap_or(false) {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank.max(1) as f64
    };
    match &config["modules_to_save"] {
        serde_json::Value::Null => {}
        serde_json::Value::Array(a) if a.is_empty() => {}
        other => flag(
            "modules_to_save",
            format!(
                "modules_to_save is {other}; vLLM and LoRAX refuse adapters with full module copies"
            ),
        ),
    }
    if !matches!(config["bias"].as_str(), None | Some("none")) {
        flag(
            "bias",
            format!(
                "bias is {}; serving stacks support only \"none\"",
                config["bias"]
            ),
        );
    }
    let targets: Vec<String> = match &config["target_modules"] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    };
    let servable = servable_targets(&model_type);
    if servable.is_empty() {
        flag(
            "architecture",
            format!("no serving stack we target loads LoRA for model_type `{model_type}`"),
        );
    }
    if targets.is_empty() {
        flag(
            "target_modules",
            "adapter_config.json names no target_modules".into(),
        );
    }
    for t in &targets {
        let leaf = t.rsplit('.').next().unwrap_or(t);
        if !servable.is_empty() && !servable.contains(&leaf) {
            flag(
                "target_modules",
                format!(
                    "target module `{t}` is not servable for {model_type} (allowed: {})",
                    servable.join(", ")
                ),
            );
        }
    }

    let weights_path = adapter_dir.join("adapter_model.safetensors");
    let bytes = read(&weights_path)?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| LintError {
        path: weights_path.display().to_string(),
        message: e.to_string(),
    })?;
    let shapes = base_shapes(base_dir)?;
    // module path -> (A, B) names present
    let mut modules: BTreeMap<String, [bool; 2]> = BTreeMap::new();
    let mut names = tensors.names();
    names.sort();
    for name in &names {
        let parsed = name.strip_prefix("base_model.model.").and_then(|rest| {
            rest.strip_suffix(".lora_A.weight")
                .map(|m| (m, 0))
                .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 1)))
        });
        let Some((module, which)) = parsed else {
            let rule = if name.contains("embed") || name.contains("lm_head") {
                "full_weights"
            } else {
                "key_name"
            };
            flag(
                rule,
                format!(
                    "`{name}` is not a PEFT LoRA key (base_model.model.<module>.lora_A|B.weight)"
                ),
            );
            continue;
        };
        if module.contains("embed") || module.ends_with("lm_head") {
            flag(
                "full_weights",
                format!("`{name}` adapts an embedding or lm_head"),
            );
        }
        if !targets.iter().any(|t| peft_targets(t, module)) {
            flag(
                "target_modules",
                format!("`{name}` adapts `{module}`, which no entry of target_modules matches"),
            );
        }
        modules.entry(module.to_owned()).or_default()[which] = true;
    }

    // PEFT wraps every linear layer of the base model that a target matches, and warns of
    // "missing adapter keys" for each one the adapter holds no weights for.
    for (weight, shape) in &shapes {
        let Some(module) = weight.strip_suffix(".weight") else {
            continue;
        };
        if shape.len() == 2
            && !module.contains("embed")
            && targets.iter().any(|t| peft_targets(t, module))
            && !modules.contains_key(module)
        {
            flag(
                "missing_keys",
                format!(
                    "target_modules also matches `{module}`, which the adapter has no weights for; PEFT would load it with missing keys"
                ),
            );
        }
    }

    let mut max_update_norm = 0f64;
    let mut checked = 0;
    for (module, &[has_a, has_b]) in &modules {
        if !(has_a && has_b) {
            flag(
                "pairs",
                format!(
                    "`{module}` has lora_{} without its partner",
                    if has_a { "A" } else { "B" }
                ),
            );
            continue;
        }
        let a = tensors
            .tensor(&format!("base_model.model.{module}.lora_A.weight"))
            .expect("listed");
        let b = tensors
            .tensor(&format!("base_model.model.{module}.lora_B.weight"))
            .expect("listed");
        let (Some(base_shape), [ra, input], [output, rb]) = (
            shapes.get(&format!("{module}.weight")),
            a.shape(),
            b.shape(),
        ) else {
            if !shapes.contains_key(&format!("{module}.weight")) {
                flag(
                    "shapes",
                    format!("the base model has no `{module}.weight` to adapt"),
                );
            } else {
                flag(
                    "shapes",
                    format!("`{module}`: lora_A and lora_B must be 2-D"),
                );
            }
            continue;
        };
        if *ra != rank || *rb != rank || base_shape != &vec![*output, *input] {
            flag(
                "shapes",
                format!(
                    "`{module}`: lora_A {:?} and lora_B {:?} do not fit r={rank} and the base weight {base_shape:?} ([out, in])",
                    a.shape(),
                    b.shape()
                ),
            );
            continue;
        }
        let (Some(av), Some(bv)) = (to_f32(&a), to_f32(&b)) else {
            flag(
                "dtype",
                format!("`{module}`: weights must be f32, f16 or bf16"),
            );
            continue;
        };
        checked += 1;
        max_update_norm =
            max_update_norm.max(scaling * update_norm(&av, &bv, rank, *input, *output));
    }
    if modules.is_empty() {
        flag("empty", "the adapter holds no LoRA weights".into());
    } else if checked == modules.len() && max_update_norm == 0.0 {
        flag(
            "no_op",
            "every update s·B·A is exactly zero: the adapter cannot change the model".into(),
        );
    }
    Ok(LintReport {
        model_type,
        rank,
        target_modules: targets,
        adapted_modules: modules.len(),
        max_update_norm,
        findings,
    })
}
