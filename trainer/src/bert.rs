//! BERT-family encoders (BERT, MiniLM, …) as in transformers' `modeling_bert.py`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, LayerNorm};
use burn::tensor::{Device, Int, Tensor};
use std::sync::Arc;

use crate::attention::Attention;

use crate::checkpoint::Checkpoint;
use crate::error::{Result, TrainerError};
use crate::lora::LoraLinear;
use crate::spec::LoraSpec;

/// `config.json` of a BERT-family checkpoint, with Hugging Face's field names.
#[derive(Config, Debug)]
pub struct BertConfig {
    /// Size of the token vocabulary.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; `hidden_size` must divide evenly.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// Number of segment (token type) ids.
    #[config(default = 2)]
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm.
    #[config(default = 1e-12)]
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward block; only `gelu` is supported.
    #[config(default = "\"gelu\".to_string()")]
    pub hidden_act: String,
    /// Id of the padding token.
    #[config(default = 0)]
    pub pad_token_id: usize,
}

impl BertConfig {
    /// Reads a transformers `config.json`, refusing architectures this file does not implement.
    pub fn from_json(raw: &serde_json::Value) -> Result<Self> {
        let model_type = raw["model_type"].as_str().unwrap_or("bert");
        if model_type != "bert" {
            return Err(TrainerError::UnsupportedArchitecture(model_type.to_owned()));
        }
        let int = |field: &str| -> Result<usize> {
            raw[field].as_u64().map(|v| v as usize).ok_or_else(|| {
                TrainerError::InvalidSpec(format!(
                    "config.json: `{field}` is missing or not a number"
                ))
            })
        };
        let mut config = BertConfig::new(
            int("vocab_size")?,
            int("hidden_size")?,
            int("num_hidden_layers")?,
            int("num_attention_heads")?,
            int("intermediate_size")?,
            int("max_position_embeddings")?,
        );
        if let Some(v) = raw["type_vocab_size"].as_u64() {
            config.type_vocab_size = v as usize;
        }
        if let Some(v) = raw["layer_norm_eps"].as_f64() {
            config.layer_norm_eps = v;
        }
        if let Some(v) = raw["hidden_act"].as_str() {
            config.hidden_act = v.to_owned();
        }
        if let Some(v) = raw["pad_token_id"].as_u64() {
            config.pad_token_id = v as usize;
        }
        if config.hidden_act != "gelu" {
            return Err(TrainerError::UnsupportedArchitecture(format!(
                "bert with hidden_act {}",
                config.hidden_act
            )));
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(TrainerError::InvalidSpec(
                "hidden_size is not a multiple of num_attention_heads".into(),
            ));
        }
        Ok(config)
    }

    /// The config as transformers writes it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "torch_dtype": "float32",
        })
    }

    /// Builds the encoder from a checkpoint, adapting the projections `lora` targets.
    pub fn load(
        &self,
        ckpt: &mut Checkpoint,
        lora: Option<&LoraSpec>,
        device: &Device,
    ) -> Result<Bert> {
        if ckpt.contains("bert.embeddings.word_embeddings.weight") {
            ckpt.prefix = "bert.".into();
        }
        let h = self.hidden_size;
        let eps = self.layer_norm_eps;
        let proj = |ckpt: &mut Checkpoint,
                    path: String,
                    d_in: usize,
                    d_out: usize|
         -> Result<LoraLinear> {
            let base = ckpt.linear(&path, d_in, d_out, device)?;
            Ok(LoraLinear::wrap(base, &path, lora, device))
        };
        let embeddings = BertEmbeddings {
            word_embeddings: ckpt.embedding(
                "embeddings.word_embeddings.weight",
                self.vocab_size,
                h,
                device,
            )?,
            position_embeddings: ckpt.embedding(
                "embeddings.position_embeddings.weight",
                self.max_position_embeddings,
                h,
                device,
            )?,
            token_type_embeddings: ckpt.embedding(
                "embeddings.token_type_embeddings.weight",
                self.type_vocab_size,
                h,
                device,
            )?,
            layer_norm: ckpt.layer_norm("embeddings.LayerNorm", h, eps, device)?,
        };
        // Not with_capacity: the count is config.json's, unchecked until the tensors run out.
        let mut layers = Vec::new();
        for i in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(BertLayer {
                query: proj(ckpt, format!("{p}.attention.self.query"), h, h)?,
                key: proj(ckpt, format!("{p}.attention.self.key"), h, h)?,
                value: proj(ckpt, format!("{p}.attention.self.value"), h, h)?,
                attention_output: proj(ckpt, format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: ckpt.layer_norm(
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    eps,
                    device,
                )?,
                intermediate: proj(
                    ckpt,
                    format!("{p}.intermediate.dense"),
                    h,
                    self.intermediate_size,
                )?,
                output: proj(ckpt, format!("{p}.output.dense"), self.intermediate_size, h)?,
                output_norm: ckpt.layer_norm(&format!("{p}.output.LayerNorm"), h, eps, device)?,
                num_heads: self.num_attention_heads,
                layer_norm_eps: eps,
            });
        }
        Ok(Bert {
            embeddings,
            layers,
            module_prefix: ckpt.prefix.clone(),
            layer_norm_eps: eps,
        })
    }
}

#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct BertLayer {
    pub query: LoraLinear,
    pub key: LoraLinear,
    pub value: LoraLinear,
    pub attention_output: LoraLinear,
    pub attention_norm: LayerNorm,
    pub intermediate: LoraLinear,
    pub output: LoraLinear,
    pub output_norm: LayerNorm,
    pub num_heads: usize,
    /// Epsilon of both norms (burn's `LayerNorm` keeps its own private).
    pub layer_norm_eps: f64,
}

impl BertLayer {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, attention: &Arc<Attention>) -> Tensor<3> {
        let context = attention.forward(
            self.query.forward(x.clone()),
            self.key.forward(x.clone()),
            self.value.forward(x.clone()),
        );
        let x = crate::fused::layer_norm(
            self.attention_output.forward(context) + x,
            &self.attention_norm,
            self.layer_norm_eps,
        );
        let ff = self
            .output
            .forward(crate::fused::gelu(self.intermediate.forward(x.clone())));
        crate::fused::layer_norm(ff + x, &self.output_norm, self.layer_norm_eps)
    }

    crate::lora::projections! {
        "attention.self.query" => query,
        "attention.self.key" => key,
        "attention.self.value" => value,
        "attention.output.dense" => attention_output,
        "intermediate.dense" => intermediate,
        "output.dense" => output,
    }
}

/// A BERT encoder without pooler.
#[derive(Module, Debug)]
pub struct Bert {
    pub embeddings: BertEmbeddings,
    pub layers: Vec<BertLayer>,
    /// Prefix of module names in the checkpoint (`bert.` for `BertForX`), kept for PEFT names.
    pub module_prefix: String,
    /// Epsilon of the embeddings' norm.
    pub layer_norm_eps: f64,
}

impl Bert {
    /// # Shapes
    /// - input_ids: `[batch, seq]`, each row's `lengths` real tokens first, then padding
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, lengths: &[usize]) -> Tensor<3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .repeat_dim(0, b);
        let token_types = Tensor::<2, Int>::zeros([b, s], &device);
        let e = &self.embeddings;
        let x = e.word_embeddings.forward(input_ids)
            + e.position_embeddings.forward(positions)
            + e.token_type_embeddings.forward(token_types);
        let mut x = crate::fused::layer_norm(x, &e.layer_norm, self.layer_norm_eps);
        // Every query, padding too, attends to its row's real tokens, as transformers' key
        // mask has it.
        assert_eq!(lengths.len(), b, "one length per row");
        let keys = lengths
            .iter()
            .flat_map(|&n| std::iter::repeat_n((0, n.clamp(1, s) as u32), s))
            .collect();
        let heads = self.layers.first().map_or(1, |l| l.num_heads);
        let h = x.dims()[2];
        let attention = Arc::new(Attention::new(
            [b, s],
            [heads, heads, h / heads],
            keys,
            None,
        ));
        for layer in &self.layers {
            x = layer.forward(x, &attention);
        }
        x
    }
}
