//! Small random-init Hugging Face model directories, so the whole loop runs with nothing
//! downloaded: a WordPiece `tokenizer.json` trained on the caller's text, a BERT `config.json`
//! and `model.safetensors` initialised as transformers would (normal(0, 0.02), zero bias,
//! unit LayerNorm).

use std::path::Path;

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::bert::BertConfig;
use crate::checkpoint::write_safetensors;
use crate::error::{Result, TrainerError, io_err};

/// Shape of a tiny BERT.
#[derive(Debug, Clone)]
pub struct TinyBertSpec {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// Upper bound on the WordPiece vocabulary; small corpora give fewer tokens.
    pub vocab_size: usize,
    pub seed: u64,
}

impl Default for TinyBertSpec {
    fn default() -> Self {
        Self {
            hidden_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 256,
            max_position_embeddings: 128,
            vocab_size: 2000,
            seed: 7,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub vocab_size: usize,
    pub parameters: usize,
}

const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Writes `config.json`, `tokenizer.json` and `model.safetensors` into `dir`.
pub fn init_tiny_bert<S: AsRef<str> + Send>(
    dir: &Path,
    corpus: impl Iterator<Item = S> + Send,
    spec: &TinyBertSpec,
) -> Result<TinyModel> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tokenizer = train_wordpiece(corpus, spec.vocab_size)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, true)
        .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
    let parameters = write_random_bert(dir, vocab_size, spec)?;
    Ok(TinyModel {
        vocab_size,
        parameters,
    })
}

/// Writes `config.json` and `model.safetensors` of a randomly initialised BERT (no tokenizer):
/// benchmarks need the shapes, not the words. Returns the parameter count.
pub fn write_random_bert(dir: &Path, vocab_size: usize, spec: &TinyBertSpec) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let config = BertConfig::new(
        vocab_size,
        spec.hidden_size,
        spec.num_hidden_layers,
        spec.num_attention_heads,
        spec.intermediate_size,
        spec.max_position_embeddings,
    );
    let config_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&config.to_json()).expect("json");
    std::fs::write(&config_path, json).map_err(io_err(&config_path))?;

    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut tensors = Vec::new();
    let mut normal = |name: String, shape: Vec<usize>, rng: &mut StdRng| {
        let n = shape.iter().product();
        tensors.push((
            name,
            shape,
            (0..n).map(|_| 0.02 * std_normal(rng)).collect(),
        ));
    };
    let h = spec.hidden_size;
    normal(
        "embeddings.word_embeddings.weight".into(),
        vec![vocab_size, h],
        &mut rng,
    );
    normal(
        "embeddings.position_embeddings.weight".into(),
        vec![spec.max_position_embeddings, h],
        &mut rng,
    );
    normal(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, h],
        &mut rng,
    );
    let mut linears = Vec::new();
    for i in 0..spec.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (m, d_in, d_out) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, spec.intermediate_size),
            ("output.dense", spec.intermediate_size, h),
        ] {
            normal(format!("{p}.{m}.weight"), vec![d_out, d_in], &mut rng);
            linears.push((format!("{p}.{m}.bias"), d_out));
        }
    }
    // Real BERT checkpoints carry the pooler (pre-training's [CLS] head) though a mean-pooled
    // classifier never reads it; the tiny one does too, so tests see what PEFT sees on load.
    normal("pooler.dense.weight".into(), vec![h, h], &mut rng);
    linears.push(("pooler.dense.bias".into(), h));
    let mut norms = vec!["embeddings.LayerNorm".to_string()];
    for i in 0..spec.num_hidden_layers {
        norms.push(format!("encoder.layer.{i}.attention.output.LayerNorm"));
        norms.push(format!("encoder.layer.{i}.output.LayerNorm"));
    }
    for (name, d) in linears {
        tensors.push((name, vec![d], vec![0.0; d]));
    }
    for n in norms {
        tensors.push((format!("{n}.weight"), vec![h], vec![1.0; h]));
        tensors.push((format!("{n}.bias"), vec![h], vec![0.0; h]));
    }
    let parameters = tensors.iter().map(|(_, _, d)| d.len()).sum();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    Ok(parameters)
}

fn train_wordpiece<S: AsRef<str> + Send>(
    corpus: impl Iterator<Item = S> + Send,
    vocab_size: usize,
) -> Result<Tokenizer> {
    let err = |e: tokenizers::Error| TrainerError::Tokenizer(e.to_string());
    let mut tokenizer = Tokenizer::new(WordPiece::default());
    tokenizer
        .with_normalizer(Some(BertNormalizer::default()))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    let mut trainer: tokenizers::models::TrainerWrapper = WordPieceTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(SPECIAL.iter().map(|t| AddedToken::from(*t, true)).collect())
        .build()
        .into();
    tokenizer.train(&mut trainer, corpus).map_err(err)?;
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .expect("special tokens are in the vocabulary")
    };
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .map_err(|e| TrainerError::Tokenizer(e.to_string()))?
        .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
        .map_err(|e| TrainerError::Tokenizer(e.to_string()))?
        .special_tokens(vec![("[CLS]", id("[CLS]")), ("[SEP]", id("[SEP]"))])
        .build()
        .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// Box-Muller: rand alone has no normal distribution and this needs no more.
fn std_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Shape of a tiny Llama.
#[derive(Debug, Clone)]
pub struct TinyLlamaSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    /// Upper bound on the byte-level BPE vocabulary.
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub seed: u64,
}

impl Default for TinyLlamaSpec {
    fn default() -> Self {
        Self {
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 256,
            vocab_size: 2000,
            tie_word_embeddings: true,
            seed: 11,
        }
    }
}

/// Writes a Llama-architecture `config.json`, `tokenizer.json` (byte-level BPE, `<|endoftext|>`
/// as id 0) and `model.safetensors` into `dir`.
pub fn init_tiny_llama<S: AsRef<str> + Send>(
    dir: &Path,
    corpus: impl Iterator<Item = S> + Send,
    spec: &TinyLlamaSpec,
) -> Result<TinyModel> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_decoder(Some(ByteLevel::default()));
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(spec.vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build()
        .into();
    tokenizer
        .train(&mut trainer, corpus)
        .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
    let vocab_size = tokenizer.get_vocab_size(true);
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| TrainerError::Tokenizer(e.to_string()))?;

    let parameters = write_random_llama(dir, vocab_size, spec)?;
    Ok(TinyModel {
        vocab_size,
        parameters,
    })
}

/// Writes `config.json` and a random `model.safetensors` for a Llama of this shape (no
/// tokenizer): what benchmarks and tests that feed token ids directly need. Returns the
/// parameter count.
pub fn write_random_llama(dir: &Path, vocab_size: usize, spec: &TinyLlamaSpec) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut config = crate::llama::LlamaConfig::new(
        vocab_size,
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_hidden_layers,
        spec.num_attention_heads,
        spec.num_key_value_heads,
        spec.max_position_embeddings,
    );
    config.tie_word_embeddings = spec.tie_word_embeddings;
    let config_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&config.to_json()).expect("json");
    std::fs::write(&config_path, json).map_err(io_err(&config_path))?;

    let mut rng = StdRng::seed_from_u64(spec.seed);
    let (h, f) = (spec.hidden_size, spec.intermediate_size);
    let kv = spec.num_key_value_heads * (h / spec.num_attention_heads);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut normal = |name: String, shape: Vec<usize>, std: f32| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| std * std_normal(&mut rng)).collect();
        tensors.push((name, shape, data));
    };
    // The head is frozen (tied, or lm_head) and the final RMSNorm pins |h| to sqrt(hidden), so
    // a logit can reach at most std * hidden. transformers' 0.02 caps a 128-wide model at 2.6,
    // too little for LoRA to ever make one token likely; 0.1 allows ~13.
    let embed_std = 0.1;
    normal(
        "model.embed_tokens.weight".into(),
        vec![vocab_size, h],
        embed_std,
    );
    for i in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{i}");
        normal(format!("{p}.self_attn.q_proj.weight"), vec![h, h], 0.02);
        normal(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], 0.02);
        normal(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], 0.02);
        normal(format!("{p}.self_attn.o_proj.weight"), vec![h, h], 0.02);
        normal(format!("{p}.mlp.gate_proj.weight"), vec![f, h], 0.02);
        normal(format!("{p}.mlp.up_proj.weight"), vec![f, h], 0.02);
        normal(format!("{p}.mlp.down_proj.weight"), vec![h, f], 0.02);
    }
    if !spec.tie_word_embeddings {
        normal("lm_head.weight".into(), vec![vocab_size, h], embed_std);
    }
    for i in 0..spec.num_hidden_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((
                format!("model.layers.{i}.{n}.weight"),
                vec![h],
                vec![1.0; h],
            ));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h], vec![1.0; h]));
    let parameters = tensors.iter().map(|(_, _, d)| d.len()).sum();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    Ok(parameters)
}
