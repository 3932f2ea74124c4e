//! Reads Hugging Face safetensors checkpoints (single file or sharded) into burn modules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, TrainerError, io_err};

/// A model directory's `config.json`, parsed, with an error naming what is missing or broken.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Err(TrainerError::MissingFile {
            dir: dir.to_owned(),
            file: "config.json",
        });
    }
    let raw = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&raw).map_err(|e| TrainerError::BadFile {
        file: path.clone(),
        message: e.to_string(),
    })
}

/// All tensors of a checkpoint as f32, consumed by name as the model is built.
pub struct Checkpoint {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// The prefix under which the base model's tensors live (`bert.` in `BertForX` checkpoints).
    pub prefix: String,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let raw = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let parsed: serde_json::Value =
                serde_json::from_str(&raw).map_err(|e| TrainerError::BadFile {
                    file: index.clone(),
                    message: e.to_string(),
                })?;
            let mut shards: Vec<String> = parsed["weight_map"]
                .as_object()
                .ok_or_else(|| TrainerError::BadFile {
                    file: index.clone(),
                    message: "no weight_map".into(),
                })?
                .values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(TrainerError::MissingFile {
                dir: dir.to_owned(),
                file: "model.safetensors",
            });
        };
        let mut tensors = HashMap::new();
        for file in files {
            let bytes = std::fs::read(&file).map_err(io_err(&file))?;
            read_into(&file, &bytes, &mut tensors)?;
        }
        Ok(Self {
            tensors,
            prefix: String::new(),
        })
    }

    /// One safetensors file (an adapter, a head), keys used as they are.
    pub fn open_file(file: &Path) -> Result<Self> {
        let bytes = std::fs::read(file).map_err(io_err(file))?;
        let mut tensors = HashMap::new();
        read_into(file, &bytes, &mut tensors)?;
        Ok(Self {
            tensors,
            prefix: String::new(),
        })
    }

    /// Removes a tensor of any shape, by full name.
    pub fn take_any(&mut self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        self.tensors.remove(name)
    }

    /// Names of the tensors not yet taken, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    /// Puts a tensor (back) under `name`.
    pub fn put(&mut self, name: String, shape: Vec<usize>, data: Vec<f32>) {
        self.tensors.insert(name, (shape, data));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn take(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let (shape, data) = self
            .tensors
            .remove(&full)
            .ok_or_else(|| TrainerError::MissingTensor(full.clone()))?;
        if shape != expected {
            return Err(TrainerError::ShapeMismatch {
                name: full,
                expected: expected.to_vec(),
                actual: shape,
            });
        }
        Ok(data)
    }

    /// A frozen parameter of the given shape.
    pub fn param<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Param<Tensor<D>>> {
        self.frozen(name, shape, device)
    }

    /// A frozen linear layer without bias, from HF's `[out, in]` weight.
    pub fn linear_no_bias(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Linear> {
        let w = self.take(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let w = Tensor::<2>::from_data(TensorData::new(w, [d_out, d_in]), device).transpose();
        // Zeros, not burn's random init: loading must not draw from the process-wide
        // generator a training run's dropout is drawing from.
        let mut linear = LinearConfig::new(d_in, d_out)
            .with_bias(false)
            .with_initializer(Initializer::Zeros)
            .init(device);
        linear.weight = Param::from_tensor(w).set_require_grad(false);
        Ok(linear)
    }

    fn frozen<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Param<Tensor<D>>> {
        let data = self.take(name, &shape)?;
        let t = Tensor::<D>::from_data(TensorData::new(data, shape), device);
        Ok(Param::from_tensor(t).set_require_grad(false))
    }

    /// A frozen linear layer from HF's `[out, in]` weight and bias, stored as burn's `[in, out]`.
    pub fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Linear> {
        let mut linear = self.linear_no_bias(prefix, d_in, d_out, device)?;
        linear.bias = Some(self.frozen(&format!("{prefix}.bias"), [d_out], device)?);
        Ok(linear)
    }

    pub fn layer_norm(
        &mut self,
        prefix: &str,
        d: usize,
        eps: f64,
        device: &Device,
    ) -> Result<LayerNorm> {
        // Old BERT checkpoints call these gamma/beta.
        let (w, b) = if self.contains(&format!("{}{prefix}.gamma", self.prefix)) {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        // The checkpoint's shapes before the shell: `d` is config.json's, unchecked.
        let gamma = self.frozen(&format!("{prefix}.{w}"), [d], device)?;
        let beta = self.frozen(&format!("{prefix}.{b}"), [d], device)?;
        let mut ln = LayerNormConfig::new(d).with_epsilon(eps).init(device);
        ln.gamma = gamma;
        ln.beta = Some(beta);
        Ok(ln)
    }

    pub fn embedding(
        &mut self,
        name: &str,
        n: usize,
        d: usize,
        device: &Device,
    ) -> Result<Embedding> {
        // The checkpoint's shape before the shell: `n` and `d` are config.json's, and a shell
        // of an unchecked `[n, d]` could be any size.
        let weight = self.frozen(name, [n, d], device)?;
        let mut e = EmbeddingConfig::new(n, d)
            .with_initializer(Initializer::Zeros)
            .init(device);
        e.weight = weight;
        Ok(e)
    }
}

fn read_into(
    file: &Path,
    bytes: &[u8],
    out: &mut HashMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<()> {
    let bad = |message: String| TrainerError::BadFile {
        file: file.to_owned(),
        message,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            // Integer buffers (e.g. BERT's position_ids) are not weights.
            Dtype::I64 | Dtype::I32 | Dtype::U8 | Dtype::BOOL => continue,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has unsupported dtype {other:?}"
                )));
            }
        };
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(())
}

/// Writes named f32 tensors as a safetensors file with `format: pt` metadata, which
/// transformers and PEFT require.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .expect("shape matches data");
            (n.clone(), v)
        })
        .collect();
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| TrainerError::BadFile {
        file: path.to_owned(),
        message: e.to_string(),
    })
}

/// Reads a tensor back out of burn as `(shape, data)`.
pub fn to_host<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    (shape, data)
}
