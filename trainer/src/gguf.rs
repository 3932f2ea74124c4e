//! The `gguf` export: a Llama-family checkpoint, with a LoRA adapter folded in, as one GGUF
//! file (version 3) that llama.cpp and Ollama load — tensors renamed and laid out as
//! llama.cpp's own `convert_hf_to_gguf.py` writes them, the byte-level BPE tokenizer and the
//! chat template in the metadata, weights in f16 or q8_0.
//!
//! Host arithmetic only; no model is built.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Result, TrainerError, io_err};

/// How the matrices are stored; vectors (the norms) stay f32, as llama.cpp's converter keeps
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F16,
    /// 8-bit blocks of 32 with an f16 scale (a matrix whose rows are not a multiple of 32
    /// stays f16).
    Q8_0,
}

impl std::str::FromStr for GgufQuant {
    type Err = TrainerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(TrainerError::Unsupported(format!(
                "quantization `{other}`: use f16 or q8_0"
            ))),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub tensors: usize,
    pub bytes: u64,
}

// GGUF's value and tensor types (ggml.h, gguf.h).
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q8_0: u32 = 8;
const ALIGNMENT: u64 = 32;
const Q8_BLOCK: usize = 32;
// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Writes the Llama-family model in `base_model_dir`, with the PEFT adapter in `adapter_dir`
/// folded in if given, to the GGUF file `out`.
pub fn export_gguf(
    base_model_dir: &Path,
    adapter_dir: Option<&Path>,
    out: &Path,
    quant: GgufQuant,
) -> Result<GgufExport> {
    let config = crate::checkpoint::read_config(base_model_dir)?;
    let model_type = config["model_type"].as_str().unwrap_or_default();
    if !matches!(model_type, "llama" | "mistral") {
        return Err(TrainerError::Unsupported(format!(
            "GGUF export of `{model_type}`: Llama and Mistral checkpoints only"
        )));
    }
    let llama = crate::llama::LlamaConfig::from_json(&config)?;
    let mut weights = match adapter_dir {
        Some(adapter) => crate::merge::merged(base_model_dir, adapter)?,
        None => Checkpoint::open(base_model_dir)?,
    };
    let tokenizer = Vocabulary::read(base_model_dir, &config, llama.vocab_size)?;

    let heads = llama.num_attention_heads;
    let kv_heads = llama.num_key_value_heads;
    let mut tensors: Vec<Tensor> = Vec::new();
    let mut take = |hf: &str, gguf: String, permute_heads: Option<usize>| -> Result<()> {
        let (shape, mut data) = weights
            .take_any(hf)
            .ok_or_else(|| TrainerError::MissingTensor(hf.to_owned()))?;
        if let Some(n) = permute_heads {
            data = permute_rows(&data, &shape, n);
        }
        tensors.push(Tensor::new(gguf, shape, data, quant));
        Ok(())
    };
    take(
        "model.embed_tokens.weight",
        "token_embd.weight".into(),
        None,
    )?;
    for i in 0..llama.num_hidden_layers {
        let hf = |name: &str| format!("model.layers.{i}.{name}.weight");
        let gg = |name: &str| format!("blk.{i}.{name}.weight");
        take(&hf("input_layernorm"), gg("attn_norm"), None)?;
        take(&hf("self_attn.q_proj"), gg("attn_q"), Some(heads))?;
        take(&hf("self_attn.k_proj"), gg("attn_k"), Some(kv_heads))?;
        take(&hf("self_attn.v_proj"), gg("attn_v"), None)?;
        take(&hf("self_attn.o_proj"), gg("attn_output"), None)?;
        take(&hf("post_attention_layernorm"), gg("ffn_norm"), None)?;
        take(&hf("mlp.gate_proj"), gg("ffn_gate"), None)?;
        take(&hf("mlp.up_proj"), gg("ffn_up"), None)?;
        take(&hf("mlp.down_proj"), gg("ffn_down"), None)?;
    }
    take("model.norm.weight", "output_norm.weight".into(), None)?;
    if !llama.tie_word_embeddings {
        take("lm_head.weight", "output.weight".into(), None)?;
    }

    let name = base_model_dir
        .file_name()
        .map_or_else(|| "flywheel".into(), |n| n.to_string_lossy().into_owned());
    let mut meta = Metadata::default();
    meta.string("general.architecture", "llama");
    meta.string("general.name", &name);
    meta.u32("general.alignment", ALIGNMENT as u32);
    meta.u32(
        "general.file_type",
        match quant {
            GgufQuant::F16 => 1,
            GgufQuant::Q8_0 => 7,
        },
    );
    meta.u32("llama.vocab_size", llama.vocab_size as u32);
    meta.u32("llama.context_length", llama.max_position_embeddings as u32);
    meta.u32("llama.embedding_length", llama.hidden_size as u32);
    meta.u32("llama.block_count", llama.num_hidden_layers as u32);
    meta.u32("llama.feed_forward_length", llama.intermediate_size as u32);
    meta.u32("llama.attention.head_count", heads as u32);
    meta.u32("llama.attention.head_count_kv", kv_heads as u32);
    meta.u32("llama.rope.dimension_count", llama.head_dim() as u32);
    meta.f32("llama.rope.freq_base", llama.rope_theta as f32);
    meta.f32(
        "llama.attention.layer_norm_rms_epsilon",
        llama.rms_norm_eps as f32,
    );
    tokenizer.describe(&mut meta);

    let file = std::fs::File::create(out).map_err(io_err(out))?;
    let mut w = BufWriter::new(file);
    let io = io_err(out);
    (|| -> std::io::Result<()> {
        w.write_all(b"GGUF")?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(meta.count as u64).to_le_bytes())?;
        w.write_all(&meta.bytes)?;
        let mut offset = 0u64;
        for t in &tensors {
            write_string(&mut w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            // ggml counts dimensions innermost first.
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&t.kind.to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset += padded(t.data.len() as u64);
        }
        pad(&mut w)?;
        for t in &tensors {
            w.write_all(&t.data)?;
            pad(&mut w)?;
        }
        w.flush()
    })()
    .map_err(io)?;
    let bytes = w.stream_position().map_err(io_err(out))?;
    Ok(GgufExport {
        tensors: tensors.len(),
        bytes,
    })
}

/// One tensor as stored: its GGUF name, its shape (outermost first, as in safetensors) and
/// its bytes in `kind`.
struct Tensor {
    name: String,
    shape: Vec<usize>,
    kind: u32,
    data: Vec<u8>,
}

impl Tensor {
    fn new(name: String, shape: Vec<usize>, values: Vec<f32>, quant: GgufQuant) -> Self {
        let row = shape.last().copied().unwrap_or(0);
        let (kind, data) = match quant {
            _ if shape.len() < 2 => (
                GGML_F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            GgufQuant::Q8_0 if row % Q8_BLOCK == 0 => (GGML_Q8_0, q8_0(&values)),
            _ => (
                GGML_F16,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        };
        Self {
            name,
            shape,
            kind,
            data,
        }
    }
}

/// ggml's `quantize_row_q8_0_ref`: per block of 32, `d = max|x| / 127` (as f16) and
/// `round(x / d)` as i8.
fn q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_BLOCK * (2 + Q8_BLOCK));
    for block in values.chunks_exact(Q8_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * inverse).round() as i8 as u8));
    }
    out
}

/// The rows of a q or k projection reordered as llama.cpp's converter does: transformers
/// rotates the two halves of each head (`rotate_half`), ggml adjacent pairs, so within each of
/// the `heads` heads the rows `[0, d/2)` and `[d/2, d)` are interleaved.
fn permute_rows(data: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
    let (rows, cols) = (shape[0], shape[1]);
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for (k, from) in [h * d + j, h * d + half + j].into_iter().enumerate() {
                let to = h * d + 2 * j + k;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&data[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn pad<W: Write + Seek>(w: &mut W) -> std::io::Result<()> {
    let at = w.stream_position()?;
    w.write_all(&vec![0u8; (padded(at) - at) as usize])
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's key-value section, as written.
#[derive(Default)]
struct Metadata {
    bytes: Vec<u8>,
    count: usize,
}

impl Metadata {
    fn key(&mut self, key: &str, kind: u32) {
        write_string(&mut self.bytes, key).expect("writing to a Vec");
        self.bytes.extend(kind.to_le_bytes());
        self.count += 1;
    }

    fn u32(&mut self, key: &str, value: u32) {
        self.key(key, TYPE_U32);
        self.bytes.extend(value.to_le_bytes());
    }

    fn f32(&mut self, key: &str, value: f32) {
        self.key(key, TYPE_F32);
        self.bytes.extend(value.to_le_bytes());
    }

    fn string(&mut self, key: &str, value: &str) {
        self.key(key, TYPE_STRING);
        write_string(&mut self.bytes, value).expect("writing to a Vec");
    }

    fn strings(&mut self, key: &str, values: &[String]) {
        self.key(key, TYPE_ARRAY);
        self.bytes.extend(TYPE_STRING.to_le_bytes());
        self.bytes.extend((values.len() as u64).to_le_bytes());
        for v in values {
            write_string(&mut self.bytes, v).expect("writing to a Vec");
        }
    }

    fn i32s(&mut self, key: &str, values: &[i32]) {
        self.key(key, TYPE_ARRAY);
        self.bytes.extend(TYPE_I32.to_le_bytes());
        self.bytes.extend((values.len() as u64).to_le_bytes());
        for v in values {
            self.bytes.extend(v.to_le_bytes());
        }
    }
}

/// A byte-level BPE tokenizer (GPT-2, SmolLM2, Llama 3) as GGUF's `gpt2` tokenizer model.
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    chat_template: Option<String>,
}

impl Vocabulary {
    fn read(dir: &Path, config: &serde_json::Value, vocab_size: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bad = |message: String| TrainerError::BadFile {
            file: path.clone(),
            message,
        };
        let raw = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let json: serde_json::Value = serde_json::from_str(&raw).map_err(|e| bad(e.to_string()))?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(TrainerError::Unsupported(format!(
                "GGUF export of a `{}` tokenizer: byte-level BPE only",
                model["type"].as_str().unwrap_or("unknown")
            )));
        }
        let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
        let mut types = vec![TOKEN_UNUSED; vocab_size];
        let mut place = |id: u64, text: &str, kind: i32| -> Result<()> {
            let slot = tokens
                .get_mut(id as usize)
                .ok_or_else(|| bad(format!("token id {id} is past the model's {vocab_size}")))?;
            *slot = Some(text.to_owned());
            types[id as usize] = kind;
            Ok(())
        };
        for (text, id) in model["vocab"].as_object().into_iter().flatten() {
            let id = id
                .as_u64()
                .ok_or_else(|| bad(format!("`{text}` has no id")))?;
            place(id, text, TOKEN_NORMAL)?;
        }
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
                continue;
            };
            let kind = if added["special"].as_bool().unwrap_or(false) {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            };
            place(id, text, kind)?;
        }
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
            .collect();
        // Merges are "a b" strings, or [a, b] pairs in newer files.
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(pair) => Some(format!(
                    "{} {}",
                    pair.first()?.as_str()?,
                    pair.get(1)?.as_str()?
                )),
                _ => None,
            })
            .collect();
        let id = |key: &str| config[key].as_u64().map(|v| v as u32);
        let chat_template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(&raw).ok())
            .and_then(|c| c["chat_template"].as_str().map(str::to_owned));
        Ok(Self {
            tokens,
            types,
            merges,
            bos: id("bos_token_id"),
            eos: id("eos_token_id"),
            chat_template,
        })
    }

    fn describe(&self, meta: &mut Metadata) {
        meta.string("tokenizer.ggml.model", "gpt2");
        // llama.cpp's name for the GPT-2 pre-tokenizer regex (byte-level BPE's default).
        meta.string("tokenizer.ggml.pre", "gpt-2");
        meta.strings("tokenizer.ggml.tokens", &self.tokens);
        meta.i32s("tokenizer.ggml.token_type", &self.types);
        meta.strings("tokenizer.ggml.merges", &self.merges);
        if let Some(bos) = self.bos {
            meta.u32("tokenizer.ggml.bos_token_id", bos);
        }
        if let Some(eos) = self.eos {
            meta.u32("tokenizer.ggml.eos_token_id", eos);
        }
        if let Some(template) = &self.chat_template {
            meta.string("tokenizer.chat_template", template);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row `2j` of a head is transformers' row `j`, row `2j + 1` its row `d/2 + j`.
    #[test]
    fn q_and_k_rows_interleave_the_halves_of_each_head() {
        // 2 heads of 4 rows, 1 column: rows numbered 0..8.
        let data: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(
            permute_rows(&data, &[8, 1], 2),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }

    /// A tiny Llama (untied head, grouped-query attention) with a random LoRA on q, k and v,
    /// exported in f16 and q8_0 and read back by llama.cpp's own reader (PyPI `gguf`, from
    /// `.ci/services`): metadata, llama.cpp's tensor names and shapes, every value against
    /// the merged Hugging Face export within f16's and q8_0's rounding, the tokenizer.
    #[test]
    fn llama_cpps_reader_finds_the_merged_model() {
        let python = std::env::var("FLYWHEEL_TEST_PYTHON").expect(
            "FLYWHEEL_TEST_PYTHON is not set: `eval \"$(.ci/services)\"` installs the gguf reader",
        );
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let spec = crate::tiny::TinyLlamaSpec {
            tie_word_embeddings: false,
            ..Default::default()
        };
        let corpus = [
            "my card has not arrived",
            "what is the exchange rate",
            "hello world",
        ];
        crate::tiny::init_tiny_llama(&base, corpus.iter().cycle().take(60), &spec).unwrap();
        let config = crate::checkpoint::read_config(&base).unwrap();
        let hidden = config["hidden_size"].as_u64().unwrap() as usize;
        let kv = hidden / 4 * 2;
        let adapter = dir.path().join("adapter");
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(
            adapter.join("adapter_config.json"),
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]}"#,
        )
        .unwrap();
        let mut seed = 5u64;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                })
                .collect()
        };
        let mut tensors = Vec::new();
        for layer in 0..2 {
            for (proj, out) in [("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)] {
                let name = |ab: &str| {
                    format!(
                        "base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"
                    )
                };
                tensors.push((name("A"), vec![4, hidden], random(4 * hidden)));
                tensors.push((name("B"), vec![out, 4], random(out * 4)));
            }
        }
        crate::checkpoint::write_safetensors(&adapter.join("adapter_model.safetensors"), &tensors)
            .unwrap();
        let merged = dir.path().join("merged");
        crate::merge::export_merged(&base, &adapter, &merged).unwrap();
        let check =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_gguf.py");
        for (quant, name) in [(GgufQuant::F16, "f16"), (GgufQuant::Q8_0, "q8_0")] {
            let out = dir.path().join(format!("model-{name}.gguf"));
            let written = export_gguf(&base, Some(&adapter), &out, quant).unwrap();
            assert_eq!(written.tensors, 2 + 2 * 9 + 1);
            assert_eq!(written.bytes, std::fs::metadata(&out).unwrap().len());
            let run = std::process::Command::new(&python)
                .arg(&check)
                .arg(&out)
                .arg(&merged)
                .arg(name)
                .output()
                .unwrap();
            assert!(
                run.status.success(),
                "{name}: {}{}",
                String::from_utf8_lossy(&run.stdout),
                String::from_utf8_lossy(&run.stderr)
            );
        }
        // What llama.cpp cannot load is refused, naming why.
        let bert =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert");
        let refused = export_gguf(&bert, None, &dir.path().join("x.gguf"), GgufQuant::F16);
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("Llama and Mistral checkpoints only")
        );
    }

    #[test]
    fn q8_0_blocks_are_a_scale_and_32_rounded_bytes() {
        let mut values = vec![0f32; 32];
        values[0] = 1.27;
        values[1] = -0.5;
        let block = q8_0(&values);
        assert_eq!(block.len(), 34);
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        assert!((d - 0.01).abs() < 1e-4, "{d}");
        assert_eq!(block[2] as i8, 127);
        assert_eq!(block[3] as i8, -50);
    }
}
