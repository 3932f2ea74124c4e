//! Llama-family causal LMs (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) as in transformers'
//! `modeling_llama.py`: RMSNorm, rotary embeddings with HF's `rotate_half` convention,
//! grouped-query attention, SwiGLU, tied or untied head.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm, RmsNormConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::lora::{LoraLinear, LoraLinearConfig, LoraSpec};
use crate::{Result, TrainerError};

/// `config.json` of a Llama-family checkpoint, with Hugging Face's field names.
#[derive(Config, Debug)]
pub struct LlamaConfig {
    /// Size of the token vocabulary.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Width of the SwiGLU block.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Longest sequence the model was trained on.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Whether the output head shares the token embedding matrix.
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2).
    #[config(default = false)]
    pub attention_bias: bool,
    /// `llama`, `mistral` or `qwen2`, as in config.json.
    #[config(default = "\"llama\".to_string()")]
    pub model_type: String,
}

impl LlamaConfig {
    pub fn from_json(raw: &serde_json::Value) -> Result<Self> {
        let model_type = raw["model_type"].as_str().unwrap_or("llama").to_owned();
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(TrainerError::UnsupportedArchitecture(model_type));
        }
        let int = |field: &str| -> Result<usize> {
            raw[field].as_u64().map(|v| v as usize).ok_or_else(|| {
                TrainerError::InvalidSpec(format!(
                    "config.json: `{field}` is missing or not a number"
                ))
            })
        };
        let heads = int("num_attention_heads")?;
        let mut c = LlamaConfig::new(
            int("vocab_size")?,
            int("hidden_size")?,
            int("intermediate_size")?,
            int("num_hidden_layers")?,
            heads,
            raw["num_key_value_heads"]
                .as_u64()
                .map_or(heads, |v| v as usize),
            int("max_position_embeddings")?,
        );
        if let Some(v) = raw["rms_norm_eps"].as_f64() {
            c.rms_norm_eps = v;
        }
        // transformers 5 nests rotary settings under `rope_parameters`; 4.x had them on top.
        let rope = raw
            .get("rope_parameters")
            .filter(|r| r.is_object())
            .unwrap_or(raw);
        if let Some(v) = rope["rope_theta"].as_f64() {
            c.rope_theta = v;
        }
        let rope_type = rope["rope_type"].as_str().unwrap_or("default");
        if rope_type != "default" {
            return Err(TrainerError::UnsupportedArchitecture(format!(
                "{model_type} with rope_type {rope_type}"
            )));
        }
        if let Some(v) = raw["tie_word_embeddings"].as_bool() {
            c.tie_word_embeddings = v;
        }
        c.attention_bias = raw["attention_bias"]
            .as_bool()
            .unwrap_or(model_type == "qwen2");
        if raw["rope_scaling"].is_object() {
            return Err(TrainerError::UnsupportedArchitecture(format!(
                "{model_type} with rope_scaling"
            )));
        }
        c.model_type = model_type;
        if !c.hidden_size.is_multiple_of(c.num_attention_heads)
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(TrainerError::InvalidSpec(
                "head counts do not divide the hidden size".into(),
            ));
        }
        Ok(c)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "float32",
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn load(
        &self,
        ckpt: &mut Checkpoint,
        lora: Option<&LoraSpec>,
        device: &Device,
    ) -> Result<Llama> {
        let (h, d) = (self.hidden_size, self.head_dim());
        let kv = self.num_key_value_heads * d;
        let proj = |ckpt: &mut Checkpoint,
                    path: String,
                    d_in: usize,
                    d_out: usize,
                    bias: bool|
         -> Result<LoraLinear> {
            let base = if bias {
                ckpt.linear(&path, d_in, d_out, device)?
            } else {
                ckpt.linear_no_bias(&path, d_in, d_out, device)?
            };
            Ok(match lora {
                Some(spec) if spec.targets(&path) => LoraLinear::adapted(
                    base,
                    &LoraLinearConfig::new(d_in, d_out, spec.r, spec.scaling())
                        .with_dropout(spec.dropout),
                    device,
                ),
                _ => LoraLinear::frozen(base),
            })
        };
        let norm = |ckpt: &mut Checkpoint, path: &str| -> Result<RmsNorm> {
            let mut n = RmsNormConfig::new(h)
                .with_epsilon(self.rms_norm_eps)
                .init(device);
            n.gamma = ckpt.param(&format!("{path}.weight"), [h], device)?;
            Ok(n)
        };
        let embed_tokens =
            ckpt.embedding("model.embed_tokens.weight", self.vocab_size, h, device)?;
        let mut layers = Vec::with_capacity(self.num_hidden_layers);
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let b = self.attention_bias;
            layers.push(LlamaLayer {
                q_proj: proj(ckpt, format!("{p}.self_attn.q_proj"), h, h, b)?,
                k_proj: proj(ckpt, format!("{p}.self_attn.k_proj"), h, kv, b)?,
                v_proj: proj(ckpt, format!("{p}.self_attn.v_proj"), h, kv, b)?,
                o_proj: proj(ckpt, format!("{p}.self_attn.o_proj"), h, h, false)?,
                gate_proj: proj(
                    ckpt,
                    format!("{p}.mlp.gate_proj"),
                    h,
                    self.intermediate_size,
                    false,
                )?,
                up_proj: proj(
                    ckpt,
                    format!("{p}.mlp.up_proj"),
                    h,
                    self.intermediate_size,
                    false,
                )?,
                down_proj: proj(
                    ckpt,
                    format!("{p}.mlp.down_proj"),
                    self.intermediate_size,
                    h,
                    false,
                )?,
                input_layernorm: norm(ckpt, &format!("{p}.input_layernorm"))?,
                post_attention_layernorm: norm(ckpt, &format!("{p}.post_attention_layernorm"))?,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
            });
        }
        let norm_f = norm(ckpt, "model.norm")?;
        let lm_head = if self.tie_word_embeddings || !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(ckpt.linear_no_bias("lm_head", h, self.vocab_size, device)?)
        };
        Ok(Llama {
            embed_tokens,
            layers,
            norm: norm_f,
            lm_head,
            head_bf16: None,
            rope_theta: self.rope_theta,
            head_dim: d,
        })
    }
}

#[derive(Module, Debug)]
pub struct LlamaLayer {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

impl LlamaLayer {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - rope: the rotations at each token's position
    /// - bias: `[batch, 1, seq, seq]` (causal, padding and packing mask: 0 or a large negative)
    pub fn forward(&self, x: Tensor<3>, rope: &Rope, bias: &Tensor<4>) -> Tensor<3> {
        let [b, s, h] = x.dims();
        let d = h / self.num_heads;
        let (heads, kv_heads) = (self.num_heads, self.num_kv_heads);
        let group = heads / kv_heads;
        let normed = self.input_layernorm.forward(x.clone());
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, d]).swap_dims(1, 2);
        let q = rope.query(split(self.q_proj.forward(normed.clone()), heads));
        let k = rope.key(split(self.k_proj.forward(normed.clone()), kv_heads));
        let v = split(self.v_proj.forward(normed), kv_heads);
        // Grouped-query attention without copying K and V once per query head: the `group`
        // query heads that share a KV head (adjacent, as HF numbers them) are stacked along
        // the sequence axis, so one batched matmul per KV head serves all of them.
        let q = q.reshape([b, kv_heads, group * s, d]);
        let scores = q.matmul(k.swap_dims(2, 3)).reshape([b, heads, s, s]) + bias.clone();
        let context = softmax(scores, 3)
            .reshape([b, kv_heads, group * s, s])
            .matmul(v)
            .reshape([b, heads, s, d])
            .swap_dims(1, 2)
            .reshape([b, s, h]);
        let x = x + self.o_proj.forward(context);
        let normed = self.post_attention_layernorm.forward(x.clone());
        let [b, s, h] = normed.dims();
        let rows: Tensor<2> = normed.reshape([b * s, h]);
        let mlp = self.down_proj.forward(crate::fused::swiglu(
            self.gate_proj.forward(rows.clone()),
            self.up_proj.forward(rows),
        ));
        let mlp: Tensor<3> = mlp.reshape([b, s, h]);
        x + mlp
    }

    pub fn projections(&self) -> [(&'static str, &LoraLinear); 7] {
        [
            ("self_attn.q_proj", &self.q_proj),
            ("self_attn.k_proj", &self.k_proj),
            ("self_attn.v_proj", &self.v_proj),
            ("self_attn.o_proj", &self.o_proj),
            ("mlp.gate_proj", &self.gate_proj),
            ("mlp.up_proj", &self.up_proj),
            ("mlp.down_proj", &self.down_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [(&'static str, &mut LoraLinear); 7] {
        [
            ("self_attn.q_proj", &mut self.q_proj),
            ("self_attn.k_proj", &mut self.k_proj),
            ("self_attn.v_proj", &mut self.v_proj),
            ("self_attn.o_proj", &mut self.o_proj),
            ("mlp.gate_proj", &mut self.gate_proj),
            ("mlp.up_proj", &mut self.up_proj),
            ("mlp.down_proj", &mut self.down_proj),
        ]
    }
}

/// HF's rotary embedding at each token's position: the head dimension is split in halves, not
/// interleaved pairs. `x·cos + rotate_half(x)·sin`, with `rotate_half(x) = [-x₂, x₁]`; the sign
/// lives in the sine table, and the query's tables carry attention's `1/√d`, so neither costs a
/// pass over the activations.
pub struct Rope {
    /// `[batch, 1, seq, head_dim]` each.
    cos: Tensor<4>,
    sin: Tensor<4>,
    query_cos: Tensor<4>,
    query_sin: Tensor<4>,
}

impl Rope {
    fn new(layout: &Layout, d: usize, theta: f64, device: &Device) -> Self {
        let half = d / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f64 / d as f64))
            .collect();
        let n = layout.position.len();
        let mut cos = Vec::with_capacity(n * d);
        let mut sin = Vec::with_capacity(n * d);
        for &pos in &layout.position {
            for j in 0..d {
                let angle = pos as f64 * inv_freq[j % half];
                cos.push(angle.cos() as f32);
                sin.push(if j < half { -angle.sin() } else { angle.sin() } as f32);
            }
        }
        let shape = [layout.batch, 1, layout.seq, d];
        let cos = Tensor::<4>::from_data(TensorData::new(cos, shape), device);
        let sin = Tensor::<4>::from_data(TensorData::new(sin, shape), device);
        let scale = 1.0 / (d as f64).sqrt();
        Self {
            query_cos: cos.clone().mul_scalar(scale),
            query_sin: sin.clone().mul_scalar(scale),
            cos,
            sin,
        }
    }

    /// The rotated query, already scaled by `1/√head_dim`.
    ///
    /// # Shapes
    /// - x, output: `[batch, heads, seq, head_dim]`
    fn query(&self, x: Tensor<4>) -> Tensor<4> {
        rotate(x, &self.query_cos, &self.query_sin)
    }

    /// The rotated key.
    fn key(&self, x: Tensor<4>) -> Tensor<4> {
        rotate(x, &self.cos, &self.sin)
    }
}

fn rotate(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let d = x.dims()[3];
    let halves_swapped = Tensor::cat(
        vec![
            x.clone().narrow(3, d / 2, d / 2),
            x.clone().narrow(3, 0, d / 2),
        ],
        3,
    );
    x * cos.clone() + halves_swapped * sin.clone()
}

#[derive(Module, Debug)]
pub struct Llama {
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// The output projection packed for bf16 products, when training computes in bf16.
    #[module(skip)]
    pub head_bf16: Option<std::sync::Arc<crate::bf16::FrozenWeight>>,
    pub rope_theta: f64,
    pub head_dim: usize,
}

impl Llama {
    /// Sets the precision of every frozen product: the projections and the output head (the
    /// vocabulary-wide one, and at SmolLM2's size a fifth of a step's work).
    pub fn set_compute(&mut self, compute: crate::Compute) -> crate::Result<()> {
        let projections = self
            .layers
            .iter_mut()
            .flat_map(|layer| layer.projections_mut().map(|(_, p)| p));
        crate::lora::set_compute(compute, projections)?;
        if compute == crate::Compute::Bfloat16 {
            let head = match &self.lm_head {
                Some(head) => head.weight.val(),
                None => self.embed_tokens.weight.val().transpose(),
            };
            self.head_bf16 = Some(std::sync::Arc::new(crate::bf16::FrozenWeight::new(head)));
        }
        Ok(())
    }

    /// Final hidden states.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`, laid out as `layout` says
    /// - output: `[batch, seq, hidden]`
    pub fn hidden(&self, input_ids: Tensor<2, Int>, layout: &Layout) -> Tensor<3> {
        let [b, s] = input_ids.dims();
        assert_eq!(
            [b, s],
            [layout.batch, layout.seq],
            "layout of another batch"
        );
        let device = input_ids.device();
        let rope = Rope::new(layout, self.head_dim, self.rope_theta, &device);
        let bias = layout.attention_bias(&device);
        let mut x = self.embed_tokens.forward(input_ids);
        for layer in &self.layers {
            x = layer.forward(x, &rope, &bias);
        }
        self.norm.forward(x)
    }

    /// Logits for the given hidden states.
    ///
    /// # Shapes
    /// - hidden: `[n, hidden]`
    /// - output: `[n, vocab]`
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        match (&self.head_bf16, &self.lm_head) {
            (Some(packed), _) => crate::bf16::frozen_matmul(hidden, packed),
            (None, Some(head)) => head.forward(hidden),
            (None, None) => hidden.matmul(self.embed_tokens.weight.val().transpose()),
        }
    }
}

/// Which sequence each token of a batch belongs to, and its position in that sequence. A padded
/// batch holds one sequence per row; a packed one puts several in a row, and attention must not
/// cross from one into the next.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    batch: usize,
    seq: usize,
    /// Per token: which sequence of its row it belongs to, counted from 1; 0 is padding.
    segment: Vec<u32>,
    /// Per token: its position within its sequence (what RoPE rotates by).
    position: Vec<u32>,
}

impl Layout {
    /// One right-padded sequence per row, of the given lengths.
    pub fn padded(lengths: &[usize], seq: usize) -> Self {
        let rows: Vec<Vec<usize>> = lengths.iter().map(|&n| vec![n]).collect();
        Self::packed(&rows, seq)
    }

    /// Each row holds the sequences of the given lengths one after another, then padding.
    pub fn packed(rows: &[Vec<usize>], seq: usize) -> Self {
        let mut segment = vec![0; rows.len() * seq];
        let mut position = vec![0; rows.len() * seq];
        for (row, lengths) in rows.iter().enumerate() {
            assert!(lengths.iter().sum::<usize>() <= seq, "row {row} overflows");
            let mut at = row * seq;
            for (k, &n) in lengths.iter().enumerate() {
                for p in 0..n {
                    segment[at] = k as u32 + 1;
                    position[at] = p as u32;
                    at += 1;
                }
            }
        }
        Self {
            batch: rows.len(),
            seq,
            segment,
            position,
        }
    }

    /// 0 where query `i` may attend to key `j` (same sequence, not later), a large negative
    /// elsewhere. Not -inf: a padding query sees nothing, and its softmax must stay finite.
    ///
    /// # Shapes
    /// - output: `[batch, 1, seq, seq]`
    fn attention_bias(&self, device: &Device) -> Tensor<4> {
        let s = self.seq;
        let mut bias = vec![-1.0e9f32; self.batch * s * s];
        for row in 0..self.batch {
            let seg = &self.segment[row * s..(row + 1) * s];
            for i in 0..s {
                if seg[i] == 0 {
                    continue;
                }
                // A sequence's tokens are contiguous: walk back from i while still in it.
                let out = &mut bias[(row * s + i) * s..];
                for j in (0..=i).rev().take_while(|&j| seg[j] == seg[i]) {
                    out[j] = 0.0;
                }
            }
        }
        Tensor::from_data(TensorData::new(bias, [self.batch, 1, s, s]), device)
    }
}
