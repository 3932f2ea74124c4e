//! Llama-family causal LMs (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) as in transformers'
//! `modeling_llama.py`: RMSNorm, rotary embeddings with HF's `rotate_half` convention,
//! grouped-query attention, SwiGLU, tied or untied head.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, Linear, RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Int, Tensor};
use std::sync::Arc;

use crate::attention::Attention;

use crate::checkpoint::Checkpoint;
use crate::error::{Result, TrainerError};
use crate::lora::LoraLinear;
use crate::spec::LoraSpec;

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
            // burn's RmsNorm panics on anything else.
            if !(v > 0.0 && v.is_finite()) {
                return Err(TrainerError::InvalidSpec(format!(
                    "config.json: `rms_norm_eps` must be positive, not {v}"
                )));
            }
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

    pub(crate) fn head_dim(&self) -> usize {
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
            Ok(LoraLinear::wrap(base, &path, lora, device))
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
        // Not with_capacity: the count is config.json's, unchecked until the tensors run out.
        let mut layers = Vec::new();
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
    pub fn forward(&self, x: Tensor<3>, attention: &Arc<Attention>) -> Tensor<3> {
        let normed = crate::fused::rms_norm(x.clone(), &self.input_layernorm);
        let context = attention.forward(
            self.q_proj.forward(normed.clone()),
            self.k_proj.forward(normed.clone()),
            self.v_proj.forward(normed),
        );
        self.after_attention(x, context)
    }

    /// The rest of the layer once attention has run: its output projection added to the
    /// residual, then the SwiGLU block added to that.
    ///
    /// # Shapes
    /// - x (the layer's input), context: `[batch, seq, hidden]`
    pub(crate) fn after_attention(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let x = x + self.o_proj.forward(context);
        let normed = crate::fused::rms_norm(x.clone(), &self.post_attention_layernorm);
        let [b, s, h] = normed.dims();
        let rows: Tensor<2> = normed.reshape([b * s, h]);
        let mlp = self.down_proj.forward(crate::fused::swiglu(
            self.gate_proj.forward(rows.clone()),
            self.up_proj.forward(rows),
        ));
        let mlp: Tensor<3> = mlp.reshape([b, s, h]);
        x + mlp
    }

    crate::lora::projections! {
        "self_attn.q_proj" => q_proj,
        "self_attn.k_proj" => k_proj,
        "self_attn.v_proj" => v_proj,
        "self_attn.o_proj" => o_proj,
        "mlp.gate_proj" => gate_proj,
        "mlp.up_proj" => up_proj,
        "mlp.down_proj" => down_proj,
    }
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
    pub head_bf16: Option<std::sync::Arc<crate::head::Head>>,
    pub rope_theta: f64,
    pub head_dim: usize,
}

impl Llama {
    /// Sets the precision of every frozen product: the projections and the output head (the
    /// vocabulary-wide one, and at SmolLM2's size a fifth of a step's work).
    pub fn set_compute(&mut self, compute: crate::spec::Compute) -> crate::error::Result<()> {
        let projections = self
            .layers
            .iter_mut()
            .flat_map(|layer| layer.projections_mut().map(|(_, p)| p));
        crate::lora::set_compute(compute, projections)?;
        if compute == crate::spec::Compute::Bfloat16 {
            let head = match &self.lm_head {
                Some(head) => head.weight.val(),
                None => self.embed_tokens.weight.val().transpose(),
            };
            self.head_bf16 = Some(std::sync::Arc::new(crate::head::Head::new(head)));
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
        let heads = self
            .layers
            .first()
            .map_or([1, 1], |l| [l.num_heads, l.num_kv_heads]);
        let attention =
            Arc::new(layout.attention([heads[0], heads[1], self.head_dim], self.rope_theta));
        let mut x = self.embed_tokens.forward(input_ids);
        for layer in &self.layers {
            x = layer.forward(x, &attention);
        }
        crate::fused::rms_norm(x, &self.norm)
    }

    /// Final hidden states of one whole sequence of token ids.
    ///
    /// # Shapes
    /// - output: `[1, ids.len(), hidden]`
    pub(crate) fn hidden_of(&self, ids: &[u32]) -> Tensor<3> {
        let s = ids.len();
        let input = one_row(ids, &self.embed_tokens.weight.device());
        self.hidden(input, &Layout::padded(&[s], s))
    }

    /// `log p` of each row's target token, computing logits only for the rows given (and, in
    /// bf16, never all of them at once).
    ///
    /// # Shapes
    /// - hidden: `[n, hidden]`
    /// - output: `[n]`
    pub fn target_log_probs(&self, hidden: Tensor<2>, targets: Vec<i64>) -> Tensor<1> {
        match &self.head_bf16 {
            Some(packed) => crate::head::target_log_probs(hidden, packed, targets),
            None => crate::fused::target_log_probs(self.logits(hidden), targets),
        }
    }

    /// Logits for the given hidden states.
    ///
    /// # Shapes
    /// - hidden: `[n, hidden]`
    /// - output: `[n, vocab]`
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        match (&self.head_bf16, &self.lm_head) {
            (Some(head), _) => head.logits(hidden),
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

    /// Attention over this layout, with rotary embeddings of base `theta` by each token's
    /// position in its sequence.
    pub(crate) fn attention(&self, heads: [usize; 3], theta: f64) -> Attention {
        let rope = Some((theta, self.position.as_slice()));
        Attention::new([self.batch, self.seq], heads, self.keys(), rope)
    }

    /// Per token, the keys its query attends to: its own sequence up to itself. A padding
    /// query attends to itself alone, so its softmax stays finite.
    fn keys(&self) -> Vec<(u32, u32)> {
        let s = self.seq;
        let mut keys = Vec::with_capacity(self.segment.len());
        for seg in self.segment.chunks(s) {
            let mut start = 0;
            for i in 0..s {
                if i > 0 && seg[i] != seg[i - 1] {
                    start = i;
                }
                let lo = if seg[i] == 0 { i } else { start };
                keys.push((lo as u32, i as u32 + 1));
            }
        }
        keys
    }
}

/// One sequence of token ids as a batch of one row.
///
/// # Shapes
/// - output: `[1, ids.len()]`
pub(crate) fn one_row(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let n = ids.len();
    Tensor::from_data(burn::tensor::TensorData::new(ids, [1, n]), device)
}

pub(crate) fn layers_of(model: &Llama) -> impl Iterator<Item = (String, &LoraLinear)> {
    model.layers.iter().enumerate().flat_map(|(i, layer)| {
        layer
            .projections()
            .into_iter()
            .map(move |(name, p)| (format!("model.layers.{i}.{name}"), p))
    })
}
