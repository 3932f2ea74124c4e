//! The `merged` export: a full Hugging Face checkpoint with a LoRA adapter folded into its
//! weights (`W' = W + s·B·A`), for runtimes that serve no adapters. Host arithmetic on the
//! safetensors themselves; no model is built.

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::{Checkpoint, write_safetensors};
use crate::error::{Result, TrainerError, io_err};
use crate::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, HostTensor};

/// Writes `base_model_dir` with the PEFT adapter in `adapter_dir` folded in to `out_dir`:
/// `model.safetensors` (float32), the base's config with `torch_dtype: float32`, and every
/// other file of the base (tokenizer, generation config) as it is. Returns the files written.
pub fn export_merged(
    base_model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<String>> {
    let bad = |file: &Path, message: String| TrainerError::BadFile {
        file: file.to_owned(),
        message,
    };
    let mut base = merged(base_model_dir, adapter_dir)?;
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = base
        .names()
        .into_iter()
        .map(|n| {
            let (shape, data) = base.take_any(&n).expect("listed");
            (n, shape, data)
        })
        .collect();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    write_safetensors(&out_dir.join("model.safetensors"), &tensors)?;
    let mut written = vec!["model.safetensors".to_string()];
    for entry in std::fs::read_dir(base_model_dir).map_err(io_err(base_model_dir))? {
        let path = entry.map_err(io_err(base_model_dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !path.is_file()
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
        {
            continue;
        }
        let target = out_dir.join(&name);
        if name == "config.json" {
            let raw = std::fs::read_to_string(&path).map_err(io_err(&path))?;
            let mut config: serde_json::Value =
                serde_json::from_str(&raw).map_err(|e| bad(&path, e.to_string()))?;
            config["torch_dtype"] = "float32".into();
            std::fs::write(
                &target,
                serde_json::to_string_pretty(&config).expect("json"),
            )
            .map_err(io_err(&target))?;
        } else {
            std::fs::copy(&path, &target).map_err(io_err(&target))?;
        }
        written.push(name);
    }
    written.sort();
    Ok(written)
}

/// The base model's tensors with the PEFT adapter in `adapter_dir` folded in.
pub(crate) fn merged(base_model_dir: &Path, adapter_dir: &Path) -> Result<Checkpoint> {
    let bad = |file: &Path, message: String| TrainerError::BadFile {
        file: file.to_owned(),
        message,
    };
    let config_path = adapter_dir.join(ADAPTER_CONFIG);
    let raw = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let adapter: serde_json::Value =
        serde_json::from_str(&raw).map_err(|e| bad(&config_path, e.to_string()))?;
    let r = adapter["r"]
        .as_f64()
        .filter(|r| *r > 0.0)
        .ok_or_else(|| bad(&config_path, "no positive `r`".into()))?;
    let alpha = adapter["lora_alpha"].as_f64().unwrap_or(r);
    let scaling = if adapter["use_rslora"].as_bool().unwrap_or(false) {
        alpha / r.sqrt()
    } else {
        alpha / r
    } as f32;

    // Pair each module's A and B.
    let mut lora = Checkpoint::open_file(&adapter_dir.join(ADAPTER_WEIGHTS))?;
    let mut modules: BTreeMap<String, [Option<HostTensor>; 2]> = BTreeMap::new();
    for name in lora.names() {
        let (module, which) = match name.strip_prefix("base_model.model.").and_then(|n| {
            n.strip_suffix(".lora_A.weight")
                .map(|m| (m, 0))
                .or_else(|| n.strip_suffix(".lora_B.weight").map(|m| (m, 1)))
        }) {
            Some(found) => found,
            None => {
                return Err(bad(
                    &adapter_dir.join(ADAPTER_WEIGHTS),
                    format!("`{name}` is not a LoRA A/B weight"),
                ));
            }
        };
        let tensor = lora.take_any(&name).expect("listed");
        modules.entry(module.to_owned()).or_default()[which] = Some(tensor);
    }

    let mut base = Checkpoint::open(base_model_dir)?;
    let mut merged = 0;
    for (module, pair) in &modules {
        let [Some((a_shape, a)), Some((b_shape, b))] = pair else {
            return Err(bad(
                adapter_dir,
                format!("`{module}` lacks its lora_A or lora_B"),
            ));
        };
        if a_shape.len() != 2 || b_shape.len() != 2 {
            return Err(bad(
                &adapter_dir.join(ADAPTER_WEIGHTS),
                format!("`{module}`: LoRA weights must be matrices"),
            ));
        }
        let weight = format!("{module}.weight");
        let (w_shape, mut w) = base
            .take_any(&weight)
            .ok_or_else(|| TrainerError::MissingTensor(weight.clone()))?;
        let (rank, d_in, d_out) = (a_shape[0], a_shape[1], b_shape[0]);
        if w_shape != [d_out, d_in] || b_shape[1] != rank {
            return Err(TrainerError::ShapeMismatch {
                name: weight,
                expected: vec![d_out, d_in],
                actual: w_shape,
            });
        }
        // W[o, i] += s · Σ_k B[o, k] · A[k, i]
        for o in 0..d_out {
            let row = &mut w[o * d_in..(o + 1) * d_in];
            for k in 0..rank {
                let bk = scaling * b[o * rank + k];
                if bk != 0.0 {
                    for (x, ai) in row.iter_mut().zip(&a[k * d_in..(k + 1) * d_in]) {
                        *x += bk * ai;
                    }
                }
            }
        }
        base.put(weight, w_shape, w);
        merged += 1;
    }
    if merged == 0 {
        return Err(bad(adapter_dir, "the adapter has no LoRA weights".into()));
    }
    Ok(base)
}
