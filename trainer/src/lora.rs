//! Low-rank adapters on frozen linear layers, named so they map one-to-one onto PEFT.
//!
//! A hand-written `base(x) + s·B(A(x))` rather than burn's `apply_lora`: it never forms the
//! dense `W + s·AB` (nor its gradient) per step, and `base` stays a real `Linear`, whose
//! `[in, out]` layout we transpose exactly once on export.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use std::sync::Arc;

use crate::spec::{Compute, LoraSpec};

/// A layer's `projections()` and `projections_mut()`: its adapted projections by their PEFT
/// module names, from one list of `"name" => field`.
macro_rules! projections {
    ($($name:literal => $field:ident),* $(,)?) => {
        pub fn projections(
            &self,
        ) -> [(&'static str, &crate::lora::LoraLinear); [$($name),*].len()] {
            [$(($name, &self.$field)),*]
        }

        pub fn projections_mut(
            &mut self,
        ) -> [(&'static str, &mut crate::lora::LoraLinear); [$($name),*].len()] {
            [$(($name, &mut self.$field)),*]
        }
    };
}
pub(crate) use projections;

/// A tensor copied out of burn: `(shape, row-major data)`.
pub type HostTensor = (Vec<usize>, Vec<f32>);

/// Configuration of one adapted projection.
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// Input features of the wrapped projection.
    pub d_input: usize,
    /// Output features of the wrapped projection.
    pub d_output: usize,
    /// Rank of the update.
    pub r: usize,
    /// Multiplier of the update.
    pub scaling: f64,
    /// Dropout on the adapter's input.
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// A linear layer with an optional low-rank update. `lora_a` is `[in, r]` and `lora_b` is
/// `[r, out]` (burn's layout); PEFT's `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]`
/// are their transposes.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: Linear,
    pub lora_a: Option<Param<Tensor<2>>>,
    pub lora_b: Option<Param<Tensor<2>>>,
    pub dropout: Dropout,
    pub scaling: f64,
    /// The frozen weight packed for bf16 products, when training computes in bf16.
    #[module(skip)]
    pub bf16: Option<Arc<crate::bf16::FrozenWeight>>,
}

impl LoraLinear {
    /// `base`, adapted as `lora` says for the module at `path` (PEFT's name matching), else
    /// frozen.
    pub fn wrap(base: Linear, path: &str, lora: Option<&LoraSpec>, device: &Device) -> Self {
        let [d_in, d_out] = base.weight.dims();
        match lora {
            Some(spec) if spec.targets(path) => Self::adapted(
                base,
                &LoraLinearConfig::new(d_in, d_out, spec.r, spec.scaling())
                    .with_dropout(spec.dropout),
                device,
            ),
            _ => Self::frozen(base),
        }
    }

    /// A frozen projection with no adapter.
    pub fn frozen(base: Linear) -> Self {
        Self {
            base,
            lora_a: None,
            lora_b: None,
            dropout: DropoutConfig::new(0.0).init(),
            scaling: 0.0,
            bf16: None,
        }
    }

    /// Wraps `base` with a fresh adapter: A Kaiming-uniform as in PEFT, B zero, so training
    /// starts exactly at the base model.
    pub fn adapted(base: Linear, config: &LoraLinearConfig, device: &Device) -> Self {
        let bound = 1.0 / (config.d_input as f64).sqrt();
        let a = Tensor::<2>::random(
            [config.d_input, config.r],
            Distribution::Uniform(-bound, bound),
            device,
        );
        let b = Tensor::<2>::zeros([config.r, config.d_output], device);
        Self {
            base,
            lora_a: Some(Param::from_tensor(a)),
            lora_b: Some(Param::from_tensor(b)),
            dropout: DropoutConfig::new(config.dropout).init(),
            scaling: config.scaling,
            bf16: None,
        }
    }

    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // One 2-D matmul over all rows: burn keeps `[batch, seq, in]` inputs batched, and the CPU
        // backend then packs the weight again for every sequence of the batch.
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in;
        let x: Tensor<2> = x.reshape([rows, d_in]);
        let y = self.fused(x.clone()).unwrap_or_else(|| self.composed(x));
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }

    /// The adapted projection as one op (see `low_rank`), where the backend has it and no
    /// dropout mask stands between `x` and the adapter.
    fn fused(&self, x: Tensor<2>) -> Option<Tensor<2>> {
        let (a, b) = (self.lora_a.as_ref()?, self.lora_b.as_ref()?);
        if self.dropout.prob > 0.0 && x.device().is_autodiff() {
            return None;
        }
        crate::low_rank::adapted(
            x,
            self.base.weight.val(),
            self.bf16.as_ref(),
            self.base.bias.as_ref().map(|b| b.val()),
            [a.val(), b.val()],
            self.scaling as f32,
        )
    }

    /// The projection from burn's ops (and the bf16 frozen product).
    fn composed(&self, x: Tensor<2>) -> Tensor<2> {
        let y = match &self.bf16 {
            Some(weight) => {
                let y = crate::bf16::frozen_matmul(x.clone(), weight);
                match &self.base.bias {
                    Some(bias) => y + bias.val().unsqueeze_dim(0),
                    None => y,
                }
            }
            None => self.base.forward(x.clone()),
        };
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => {
                let update = self.dropped(x).matmul(a.val()).matmul(b.val());
                y + update.mul_scalar(self.scaling)
            }
            _ => y,
        }
    }

    /// The adapter's input with dropout, as PEFT applies it: in training shards only, with
    /// masks from the shard's own generator (see `fit::dropout_mask`).
    fn dropped(&self, x: Tensor<2>) -> Tensor<2> {
        let p = self.dropout.prob;
        if p == 0.0 || !x.device().is_autodiff() {
            return x;
        }
        let [rows, cols] = x.dims();
        match crate::dropout::dropout_mask(rows * cols, 1.0 - p) {
            Some(mask) => {
                let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, cols]), &x.device());
                x * mask
            }
            None => x,
        }
    }

    /// From now on the frozen product runs in bf16. The weight is packed here, once: call it
    /// after the base weights are loaded, and not on a layer whose base weight will change.
    fn compute_in_bf16(&mut self) {
        self.bf16 = Some(Arc::new(crate::bf16::FrozenWeight::new(
            self.base.weight.val(),
        )));
    }

    /// Parameters the adapter trains (zero when not adapted).
    pub fn trainable_parameters(&self) -> usize {
        [&self.lora_a, &self.lora_b]
            .into_iter()
            .flatten()
            .map(|p| p.shape().num_elements())
            .sum()
    }

    /// PEFT-layout `(lora_A [r, in], lora_B [out, r])`, if adapted.
    pub fn peft_weights(&self) -> Option<(HostTensor, HostTensor)> {
        let a = self.lora_a.as_ref()?.val().transpose();
        let b = self.lora_b.as_ref()?.val().transpose();
        Some((crate::checkpoint::to_host(a), crate::checkpoint::to_host(b)))
    }

    /// Loads PEFT-layout weights into this layer's adapter.
    pub fn load_peft(
        &mut self,
        a: Vec<f32>,
        a_shape: [usize; 2],
        b: Vec<f32>,
        b_shape: [usize; 2],
        scaling: f64,
        device: &Device,
    ) {
        let a = Tensor::<2>::from_data(TensorData::new(a, a_shape), device).transpose();
        let b = Tensor::<2>::from_data(TensorData::new(b, b_shape), device).transpose();
        self.lora_a = Some(Param::from_tensor(a).set_require_grad(false));
        self.lora_b = Some(Param::from_tensor(b).set_require_grad(false));
        self.scaling = scaling;
    }
}

/// Sets the precision of the frozen products of `layers`. bf16 needs AMX on the CPU backend;
/// anywhere else it is refused with a message saying so, rather than quietly running in f32.
pub(crate) fn set_compute<'a>(
    compute: Compute,
    layers: impl Iterator<Item = &'a mut LoraLinear>,
) -> crate::error::Result<()> {
    compute.ensure_available()?;
    if compute == Compute::Float32 {
        return Ok(());
    }
    for layer in layers {
        layer.compute_in_bf16();
    }
    Ok(())
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout from
/// `(module path, layer)` pairs; unadapted layers are skipped.
pub(crate) fn write_peft_adapter<'a>(
    dir: &std::path::Path,
    base_model: &std::path::Path,
    spec: &LoraSpec,
    task_type: &str,
    layers: impl Iterator<Item = (String, &'a LoraLinear)>,
) -> crate::error::Result<()> {
    std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
    let mut tensors = Vec::new();
    for (path, proj) in layers {
        if let Some(((a_shape, a), (b_shape, b))) = proj.peft_weights() {
            tensors.push((format!("base_model.model.{path}.lora_A.weight"), a_shape, a));
            tensors.push((format!("base_model.model.{path}.lora_B.weight"), b_shape, b));
        }
    }
    crate::checkpoint::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model.display().to_string(),
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": spec.target_modules,
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        // Heads travel in files of their own: serving stacks that refuse full weights in an
        // adapter accept this one.
        "modules_to_save": null,
        "revision": null,
    });
    let path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json"))
        .map_err(crate::error::io_err(&path))
}

/// Loads a PEFT adapter from `dir` into the layers named by `(module path, layer)`.
pub(crate) fn load_peft_adapter<'a>(
    dir: &std::path::Path,
    layers: impl Iterator<Item = (String, &'a mut LoraLinear)>,
    device: &Device,
) -> crate::error::Result<()> {
    use crate::error::TrainerError;
    let raw = std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
        .map_err(crate::error::io_err(dir.join(ADAPTER_CONFIG)))?;
    let config: serde_json::Value =
        serde_json::from_str(&raw).map_err(|e| TrainerError::BadFile {
            file: dir.join(ADAPTER_CONFIG),
            message: e.to_string(),
        })?;
    let r = config["r"].as_f64().unwrap_or(8.0);
    let alpha = config["lora_alpha"].as_f64().unwrap_or(r);
    let scaling = if config["use_rslora"].as_bool().unwrap_or(false) {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    let file = dir.join(ADAPTER_WEIGHTS);
    let mut weights = crate::checkpoint::Checkpoint::open_file(&file)?;
    let mut loaded = 0;
    for (path, proj) in layers {
        let key = format!("base_model.model.{path}");
        let Some((a_shape, a)) = weights.take_any(&format!("{key}.lora_A.weight")) else {
            continue;
        };
        let (b_shape, b) = weights
            .take_any(&format!("{key}.lora_B.weight"))
            .ok_or_else(|| TrainerError::MissingTensor(format!("{key}.lora_B.weight")))?;
        if a_shape.len() != 2 || b_shape.len() != 2 {
            return Err(TrainerError::BadFile {
                file,
                message: format!("{key}: LoRA weights must be matrices"),
            });
        }
        // PEFT's A is [r, in] and B [out, r]; burn's base weight is [in, out].
        let [d_in, d_out] = proj.base.weight.val().dims();
        if a_shape[1] != d_in || b_shape[0] != d_out || a_shape[0] != b_shape[1] {
            return Err(TrainerError::BadFile {
                file,
                message: format!(
                    "{key}: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit a \
                     [{d_out}, {d_in}] projection"
                ),
            });
        }
        proj.load_peft(
            a,
            [a_shape[0], a_shape[1]],
            b,
            [b_shape[0], b_shape[1]],
            scaling,
            device,
        );
        loaded += 1;
    }
    if loaded == 0 {
        return Err(TrainerError::BadFile {
            file,
            message: "no LoRA weights match this base model".into(),
        });
    }
    Ok(())
}

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
