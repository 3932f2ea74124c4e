//! Causal-LM supervised fine-tuning on corrected completions (loss on completion tokens only)
//! and greedy generation for evaluation.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::checkpoint::{Checkpoint, to_host};
use crate::classifier::{TrainReport, TrainSpec, TrainStep};
use crate::llama::{Llama, LlamaConfig};
use crate::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, write_peft_adapter};
use crate::{Result, TrainerError};

/// One prompt and the completion the model should have produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub prompt: String,
    pub completion: String,
    /// Weight of this row's tokens in the loss (1 for a person's correction; a domain may
    /// weigh a teacher model's answers up or down).
    pub weight: f32,
}

/// What the model generated, with its confidence: the geometric mean of the chosen tokens'
/// probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub confidence: f32,
}

const EOS_CANDIDATES: [&str; 4] = ["<|endoftext|>", "</s>", "<|im_end|>", "<eos>"];

/// The prompt as the model sees it. Kept in one place so training and generation agree.
fn render_prompt(prompt: &str) -> String {
    format!("{prompt}\n")
}

struct TextCodec {
    tokenizer: Tokenizer,
    eos: u32,
}

impl TextCodec {
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TrainerError::MissingFile {
                dir: dir.to_owned(),
                file: "tokenizer.json",
            });
        }
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        let eos = EOS_CANDIDATES
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .ok_or_else(|| {
                TrainerError::Tokenizer("no end-of-sequence token in tokenizer.json".into())
            })?;
        Ok(Self { tokenizer, eos })
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    fn text(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| TrainerError::Tokenizer(e.to_string()))
    }
}

fn load_config(dir: &Path) -> Result<LlamaConfig> {
    LlamaConfig::from_json(&crate::checkpoint::read_config(dir)?)
}

pub(crate) fn layers_of(model: &Llama) -> impl Iterator<Item = (String, &crate::lora::LoraLinear)> {
    model.layers.iter().enumerate().flat_map(|(i, layer)| {
        layer
            .projections()
            .into_iter()
            .map(move |(name, p)| (format!("model.layers.{i}.{name}"), p))
    })
}

/// A tokenized row: ids, and from which position on the tokens are the completion.
struct Encoded {
    ids: Vec<u32>,
    completion_start: usize,
}

fn encode(codec: &TextCodec, ex: &SftExample, max_len: usize) -> Result<Encoded> {
    let mut ids = codec.ids(&render_prompt(&ex.prompt))?;
    // Keep at least a few completion tokens: a prompt that fills the window teaches nothing.
    ids.truncate(max_len.saturating_sub(8).max(1));
    let completion_start = ids.len();
    ids.extend(codec.ids(&ex.completion)?);
    ids.push(codec.eos);
    ids.truncate(max_len);
    Ok(Encoded {
        ids,
        completion_start,
    })
}

/// Trains a LoRA adapter for causal-LM SFT; the loss covers only completion tokens (and EOS).
pub fn train_causal_lm(
    spec: &TrainSpec,
    rows: &[SftExample],
    on_step: &mut dyn FnMut(&TrainStep) -> bool,
) -> Result<TrainReport> {
    if rows.is_empty() {
        return Err(TrainerError::InvalidSpec("no training rows".into()));
    }
    let _turn = crate::fit::exclusive();
    let device = crate::device().autodiff();
    device.seed(spec.seed);
    let config = load_config(&spec.base_model_dir)?;
    let codec = TextCodec::load(&spec.base_model_dir)?;
    let max_len = spec.max_seq_len.min(config.max_position_embeddings);
    let encoded: Vec<Encoded> = rows
        .iter()
        .map(|r| encode(&codec, r, max_len))
        .collect::<Result<_>>()?;
    let mut ckpt = Checkpoint::open(&spec.base_model_dir)?;
    let model = config.load(&mut ckpt, Some(&spec.lora), &device)?;
    let total_parameters = model.num_params();
    let trainable_parameters: usize = layers_of(&model)
        .map(|(_, p)| p.trainable_parameters())
        .sum();

    let fingerprint = crate::fit::fingerprint(spec, |h| {
        for r in rows {
            h.write(r.prompt.as_bytes());
            h.write_u8(0);
            h.write(r.completion.as_bytes());
            h.write_u32(r.weight.to_bits());
        }
    });
    let (model, progress) = crate::fit::fit(
        spec,
        &fingerprint,
        rows.len(),
        &device,
        model,
        on_step,
        |model: &Llama, chunk| {
            let batch: Vec<&Encoded> = chunk.iter().map(|&i| &encoded[i]).collect();
            let s = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
            let mut ids = vec![codec.eos as i64; batch.len() * s];
            let mut masks = Vec::with_capacity(batch.len());
            // Positions whose next token is a completion token: only their logits are computed.
            let (mut positions, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
            let mut tokens = 0;
            for (row, e) in batch.iter().enumerate() {
                let weight = rows[chunk[row]].weight;
                let mut mask = vec![0f32; s];
                for (j, &id) in e.ids.iter().enumerate() {
                    ids[row * s + j] = id as i64;
                    mask[j] = 1.0;
                    if j >= e.completion_start && j > 0 {
                        positions.push((row * s + j - 1) as i64);
                        targets.push(id as i64);
                        weights.push(weight);
                    }
                }
                tokens += e.ids.len();
                masks.push(mask);
            }
            let input =
                Tensor::<2, Int>::from_data(TensorData::new(ids, [batch.len(), s]), &device);
            let weights = weights.iter().any(|&w| w != 1.0).then_some(weights);
            let loss = next_token_loss(
                model,
                model.hidden(input, &masks),
                positions,
                targets,
                weights,
            );
            Ok((loss, tokens))
        },
    )?;
    write_peft_adapter(
        &spec.output_dir,
        &spec.base_model_dir,
        &spec.lora,
        "CAUSAL_LM",
        layers_of(&model),
    )?;
    let files = vec![ADAPTER_CONFIG.into(), ADAPTER_WEIGHTS.into()];
    Ok(progress.report(rows.len(), trainable_parameters, total_parameters, files))
}

/// Mean cross-entropy of the tokens at `positions + 1`, computing logits only at `positions`
/// (flattened `batch * seq` indices): nothing is spent on logits the loss throws away. With
/// `weights` (one per target), the weighted mean.
pub(crate) fn next_token_loss(
    model: &Llama,
    hidden: Tensor<3>,
    positions: Vec<i64>,
    targets: Vec<i64>,
    weights: Option<Vec<f32>>,
) -> Tensor<1> {
    let [b, s, h] = hidden.dims();
    let device = hidden.device();
    let n = positions.len();
    let picked = hidden.reshape([b * s, h]).select(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(positions, [n]), &device),
    );
    let logp = log_softmax(model.logits(picked), 1);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let picked = logp.gather(1, targets);
    match weights {
        None => picked.mean().neg(),
        Some(w) => {
            let total: f32 = w.iter().sum();
            let w = Tensor::<2>::from_data(TensorData::new(w, [n, 1]), &device);
            (picked * w).sum().div_scalar(total).neg()
        }
    }
}

/// A base causal LM plus (optionally) an adapter, ready to generate.
pub struct Generator {
    model: Llama,
    codec: TextCodec,
    device: Device,
    max_len: usize,
}

impl Generator {
    pub fn load(base_model_dir: &Path, adapter_dir: Option<&Path>) -> Result<Self> {
        let device = crate::device();
        let config = load_config(base_model_dir)?;
        let mut ckpt = Checkpoint::open(base_model_dir)?;
        let mut model = config.load(&mut ckpt, None, &device)?;
        if let Some(dir) = adapter_dir {
            let layers = model.layers.iter_mut().enumerate().flat_map(|(i, layer)| {
                layer
                    .projections_mut()
                    .into_iter()
                    .map(move |(name, p)| (format!("model.layers.{i}.{name}"), p))
            });
            load_peft_adapter(dir, layers, &device)?;
        }
        Ok(Self {
            model,
            codec: TextCodec::load(base_model_dir)?,
            device,
            max_len: config.max_position_embeddings,
        })
    }

    /// Greedy decoding, up to `max_new_tokens` or end of sequence.
    pub fn generate(&self, prompt: &str, max_new_tokens: usize) -> Result<Generation> {
        let mut ids = self.codec.ids(&render_prompt(prompt))?;
        ids.truncate(self.max_len.saturating_sub(max_new_tokens).max(1));
        let start = ids.len();
        let mut log_prob = 0.0f64;
        for _ in 0..max_new_tokens {
            let s = ids.len();
            let input = Tensor::<2, Int>::from_data(
                TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, s]),
                &self.device,
            );
            let hidden = self.model.hidden(input, &[vec![1.0; s]]);
            let h = hidden.dims()[2];
            let last = hidden.narrow(1, s - 1, 1).reshape([1, h]);
            let (_, logp) = to_host(log_softmax(self.model.logits(last), 1));
            let (next, lp) = logp
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("non-empty vocabulary");
            log_prob += *lp as f64;
            if next as u32 == self.codec.eos {
                break;
            }
            ids.push(next as u32);
        }
        let generated = ids.len() - start + 1;
        Ok(Generation {
            text: self.codec.text(&ids[start..])?.trim().to_owned(),
            confidence: (log_prob / generated as f64).exp() as f32,
        })
    }
}

/// Timing of LoRA training steps on random token batches, shaped like
/// `shared/bench/peft_lora_bench.py` so the two can be compared.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub median_step_seconds: f64,
    pub tokens_per_second: f64,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub losses: Vec<f64>,
}

/// Runs `warmup + steps` full training steps (forward, backward, AdamW) with loss on every
/// next token, as `labels = input_ids` does in transformers.
pub fn bench_lora_steps(
    model_dir: &Path,
    lora: &crate::LoraSpec,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
) -> Result<StepBench> {
    use rand::Rng;
    let device = crate::device().autodiff();
    let _turn = crate::fit::exclusive();
    device.seed(seed);
    let config = load_config(model_dir)?;
    let mut model = config.load(&mut Checkpoint::open(model_dir)?, Some(lora), &device)?;
    let total_parameters = model.num_params();
    let trainable_parameters: usize = layers_of(&model)
        .map(|(_, p)| p.trainable_parameters())
        .sum();
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let mut rng = StdRng::seed_from_u64(seed);
    let masks = vec![vec![1.0f32; seq]; batch];
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    for step in 0..warmup + steps {
        let ids: Vec<i64> = (0..batch * seq)
            .map(|_| rng.random_range(0..config.vocab_size as i64))
            .collect();
        let started = Instant::now();
        let input =
            Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [batch, seq]), &device);
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for row in 0..batch {
            for j in 0..seq - 1 {
                positions.push((row * seq + j) as i64);
                targets.push(ids[row * seq + j + 1]);
            }
        }
        let loss = next_token_loss(
            &model,
            model.hidden(input, &masks),
            positions,
            targets,
            None,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        // Reading the loss waits for the step to finish.
        let loss_value = loss.into_scalar::<f32>() as f64;
        let dt = started.elapsed().as_secs_f64();
        if step >= warmup {
            times.push(dt);
            losses.push(loss_value);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(StepBench {
        batch,
        seq,
        steps,
        median_step_seconds: median,
        tokens_per_second: (batch * seq) as f64 / median,
        trainable_parameters,
        total_parameters,
        losses,
    })
}

/// The largest change the adapter in `adapter_dir` makes to the model's logits on `texts`.
pub(crate) fn llama_adapter_delta(base: &Path, adapter_dir: &Path, texts: &[&str]) -> Result<f32> {
    let plain = Generator::load(base, None)?;
    let adapted = Generator::load(base, Some(adapter_dir))?;
    let mut delta = 0.0f32;
    for text in texts {
        let mut ids = plain.codec.ids(&render_prompt(text))?;
        ids.truncate(plain.max_len);
        let s = ids.len();
        let input = || {
            Tensor::<2, Int>::from_data(
                TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, s]),
                &plain.device,
            )
        };
        let logits = |g: &Generator| {
            let hidden = g.model.hidden(input(), &[vec![1.0; s]]);
            let h = hidden.dims()[2];
            g.model.logits(hidden.reshape([s, h]))
        };
        let d = to_host((logits(&adapted) - logits(&plain)).abs().max()).1[0];
        delta = delta.max(d);
    }
    Ok(delta)
}
