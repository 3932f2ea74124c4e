//! The material seeds are made of, built once per process from the project's own code and
//! fixtures: tiny models written by `flywheel_trainer::tiny`, PEFT adapters (one PEFT wrote,
//! two our trainer wrote) from `trainer/tests/fixtures`, the chat templates transformers
//! rendered for the golden test, and the Banking77 slice the demo imports.

use std::path::{Path, PathBuf};

use flywheel_trainer::tiny::{TinyBertSpec, TinyLlamaSpec, init_tiny_bert, init_tiny_llama};

/// A chat template case of `trainer/tests/fixtures/chat-templates/golden.json`.
#[derive(Debug, Clone)]
pub struct ChatCase {
    pub name: String,
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
    pub prompt: String,
    pub completion: String,
}

pub struct Fixtures {
    _dir: tempfile::TempDir,
    /// A tiny Llama written by the trainer (config.json, tokenizer.json, model.safetensors)
    /// with the SmolLM2 (ChatML) template in tokenizer_config.json. Its shapes are those of
    /// `trainer/tests/fixtures/tiny-llama`, so the fixture adapters fit it.
    pub llama: PathBuf,
    /// A tiny BERT written by the trainer.
    pub bert: PathBuf,
    /// `trainer/tests/fixtures`.
    pub trainer_fixtures: PathBuf,
    /// `services/ingest/tests/fixtures`.
    pub ingest_fixtures: PathBuf,
    /// Adapter directories (adapter_config.json + adapter_model.safetensors) that fit `llama`.
    pub adapters: Vec<PathBuf>,
    pub chat: Vec<ChatCase>,
}

/// The corpus the tiny tokenizers are trained on: the demo's Banking77 rows.
pub fn corpus() -> Vec<String> {
    flywheel::BANKING77_MINI
        .lines()
        .skip(1)
        .take(300)
        .map(|l| l.rsplit_once(',').map_or(l, |(text, _)| text).to_owned())
        .collect()
}

impl Fixtures {
    pub fn build() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("flywheel-fuzz-fixtures-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let texts = corpus();
        let llama = dir.path().join("tiny-llama");
        init_tiny_llama(
            &llama,
            texts.iter(),
            &TinyLlamaSpec {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                max_position_embeddings: 64,
                vocab_size: 400,
                tie_word_embeddings: true,
                seed: 3,
            },
        )
        .map_err(|e| format!("tiny llama: {e}"))?;
        let bert = dir.path().join("tiny-bert");
        init_tiny_bert(
            &bert,
            texts.iter(),
            &TinyBertSpec {
                hidden_size: 32,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 64,
                max_position_embeddings: 64,
                vocab_size: 400,
                seed: 3,
            },
        )
        .map_err(|e| format!("tiny bert: {e}"))?;
        let trainer_fixtures =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../trainer/tests/fixtures");
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(trainer_fixtures.join("chat-templates/golden.json"))
                .map_err(|e| format!("chat-templates/golden.json: {e}"))?,
        )
        .map_err(|e| e.to_string())?;
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let chat: Vec<ChatCase> = golden["cases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| ChatCase {
                name: s(&c["name"]),
                template: s(&c["chat_template"]),
                bos_token: s(&c["bos_token"]),
                eos_token: s(&c["eos_token"]),
                prompt: s(&c["prompt"]),
                completion: s(&c["completion"]),
            })
            .collect();
        let chatml = chat
            .iter()
            .find(|c| c.name == "chatml")
            .ok_or("golden.json has no chatml case")?;
        std::fs::write(
            llama.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "chat_template": chatml.template,
                "bos_token": chatml.bos_token,
                "eos_token": {"content": chatml.eos_token, "special": true},
            }))
            .expect("json"),
        )
        .map_err(|e| e.to_string())?;
        let adapters = ["tiny-llama-ours", "tiny-llama-lora", "tiny-llama-train"]
            .iter()
            .map(|d| trainer_fixtures.join(d))
            .collect();
        Ok(Self {
            _dir: dir,
            llama,
            bert,
            trainer_fixtures,
            ingest_fixtures: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../services/ingest/tests/fixtures"),
            adapters,
            chat,
        })
    }

    /// A path in the fixtures' own temporary directory, for seeds written at start-up.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self._dir.path().join(name)
    }

    /// A fixture file's bytes; fixtures are part of the tree, so a missing one is a bug.
    pub fn read(&self, path: impl AsRef<Path>) -> Vec<u8> {
        let path = path.as_ref();
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }
}
