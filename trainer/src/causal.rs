//! Causal-LM supervised fine-tuning on corrected completions (loss on completion tokens only)
//! and greedy generation for evaluation.

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::chat::ChatTemplate;
use crate::checkpoint::{Checkpoint, to_host};
use crate::error::{Result, TrainerError};
use crate::fit::ShardLoss;
use crate::llama::{Layout, Llama, LlamaConfig, layers_of};
use crate::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, write_peft_adapter};
use crate::spec::{TrainReport, TrainSpec, TrainStep};

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

/// Text to ids and back, in the model's prompt format. Kept in one place so training and
/// generation agree.
struct TextCodec {
    tokenizer: Tokenizer,
    /// Where generation stops: the template's end-of-turn token when it names one.
    eos: u32,
    chat: Option<ChatTemplate>,
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
        let tokenizer = crate::tokenize::read_tokenizer(&path)?;
        let chat = ChatTemplate::load(dir)?;
        let configured = chat.as_ref().and_then(|c| c.eos_token.as_deref());
        let eos = configured
            .into_iter()
            .chain(EOS_CANDIDATES)
            .find_map(|t| tokenizer.token_to_id(t))
            .ok_or_else(|| {
                TrainerError::Tokenizer("no end-of-sequence token in tokenizer.json".into())
            })?;
        Ok(Self {
            tokenizer,
            eos,
            chat,
        })
    }

    /// The text generation continues from.
    fn prompt(&self, prompt: &str) -> Result<String> {
        match &self.chat {
            Some(chat) => chat.prompt(prompt),
            None => Ok(format!("{prompt}\n")),
        }
    }

    /// A training row as ids. A chat template closes the assistant's turn itself; a plain
    /// prompt gets EOS after the completion so the model learns to stop.
    fn encode(&self, ex: &SftExample, max_len: usize) -> Result<Encoded> {
        let (prompt, completion, eos) = match &self.chat {
            Some(chat) => {
                let r = chat.split(&ex.prompt, &ex.completion)?;
                (r.prompt, r.completion, None)
            }
            None => (
                self.prompt(&ex.prompt)?,
                ex.completion.clone(),
                Some(self.eos),
            ),
        };
        // Keep at least a few completion tokens: a prompt that fills the window teaches nothing.
        let mut ids = shorten(self.ids(&prompt)?, max_len.saturating_sub(8).max(1));
        let completion_start = ids.len();
        ids.extend(self.ids(&completion)?);
        ids.extend(eos);
        ids.truncate(max_len);
        Ok(Encoded {
            ids,
            completion_start,
        })
    }

    /// The prompt's ids, at most `budget` of them, as generation sees them.
    fn prompt_ids(&self, prompt: &str, budget: usize) -> Result<Vec<u32>> {
        Ok(shorten(self.ids(&self.prompt(prompt)?)?, budget))
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

/// A prompt cut to `budget` tokens by dropping its middle: its head (the template's opening, the
/// start of the instructions) and its tail (the end of the question and, with a chat template,
/// the assistant's header that the answer must follow) both survive.
fn shorten(mut ids: Vec<u32>, budget: usize) -> Vec<u32> {
    if ids.len() > budget {
        let head = budget / 2;
        ids.drain(head..ids.len() - (budget - head));
    }
    ids
}

fn load_config(dir: &Path) -> Result<LlamaConfig> {
    LlamaConfig::from_json(&crate::checkpoint::read_config(dir)?)
}

/// A tokenized row: ids, and from which position on the tokens are the completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub completion_start: usize,
}

/// What SFT on `model_dir` knows of its rows before training: each row's tokens (templated
/// prompt, completion, EOS) with nothing truncated, and the longest sequence the model reads.
pub fn measure_sft(model_dir: &Path, rows: &[SftExample]) -> Result<(Vec<usize>, usize)> {
    let config = load_config(model_dir)?;
    let codec = TextCodec::load(model_dir)?;
    let lengths = rows
        .iter()
        .map(|r| codec.encode(r, usize::MAX).map(|e| e.ids.len()))
        .collect::<Result<_>>()?;
    Ok((lengths, config.max_position_embeddings))
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
    let device = crate::device::device().autodiff();
    device.seed(spec.seed);
    let config = load_config(&spec.base_model_dir)?;
    let codec = TextCodec::load(&spec.base_model_dir)?;
    let max_len = spec.max_seq_len.min(config.max_position_embeddings);
    let encoded: Vec<Encoded> = rows
        .iter()
        .map(|r| codec.encode(r, max_len))
        .collect::<Result<_>>()?;
    let mut ckpt = Checkpoint::open(&spec.base_model_dir)?;
    let mut model = config.load(&mut ckpt, Some(&spec.lora), &device)?;
    model.set_compute(spec.compute)?;
    let total_parameters = model.num_params();
    let trainable_parameters: usize = layers_of(&model)
        .map(|(_, p)| p.trainable_parameters())
        .sum();

    let (model, progress) = crate::fit::fit(
        spec,
        rows.len(),
        &[],
        |h| {
            for r in rows {
                h.write(r.prompt.as_bytes());
                h.write_u8(0);
                h.write(r.completion.as_bytes());
                h.write_u32(r.weight.to_bits());
            }
        },
        model,
        on_step,
        |model: &Llama, chunk| {
            let batch: Vec<(&Encoded, f32)> = chunk
                .iter()
                .map(|&i| (&encoded[i], rows[i].weight))
                .collect();
            Ok(sft_loss(model, &batch, codec.eos, &device))
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

/// Rows of a batch packed into as few rows as fit, each as long as the batch's longest: first
/// fit, longest first. `result[r]` lists the indices packed into row `r`, in order.
fn pack(lengths: &[usize]) -> Vec<Vec<usize>> {
    let capacity = lengths.iter().copied().max().unwrap_or(0);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let (mut bins, mut used): (Vec<Vec<usize>>, Vec<usize>) = (Vec::new(), Vec::new());
    for i in order {
        match used.iter().position(|&u| u + lengths[i] <= capacity) {
            Some(b) => {
                bins[b].push(i);
                used[b] += lengths[i];
            }
            None => {
                bins.push(vec![i]);
                used.push(lengths[i]);
            }
        }
    }
    bins
}

/// The SFT loss of a batch of (row, weight): the weighted mean cross-entropy of its completion
/// tokens, the total weight of those tokens, and how many tokens it holds. Rows are packed
/// (attention kept within each) rather than padded, and logits are computed only where a
/// completion token is predicted: variable-length corrections would otherwise spend most of a
/// step on padding and on the prompt's logits.
pub(crate) fn sft_loss(
    model: &Llama,
    batch: &[(&Encoded, f32)],
    pad: u32,
    device: &Device,
) -> ShardLoss {
    let lengths: Vec<usize> = batch.iter().map(|(e, _)| e.ids.len()).collect();
    let packed = pack(&lengths);
    let s = lengths.iter().copied().max().unwrap_or(1);
    let mut ids = vec![pad as i64; packed.len() * s];
    let (mut positions, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for (row, members) in packed.iter().enumerate() {
        let mut at = row * s;
        for &m in members {
            let (e, weight) = batch[m];
            for (j, &id) in e.ids.iter().enumerate() {
                ids[at + j] = id as i64;
                if j >= e.completion_start && j > 0 {
                    positions.push((at + j - 1) as i64);
                    targets.push(id as i64);
                    weights.push(weight);
                }
            }
            at += e.ids.len();
        }
    }
    let layout = Layout::packed(
        &packed
            .iter()
            .map(|members| members.iter().map(|&m| lengths[m]).collect())
            .collect::<Vec<_>>(),
        s,
    );
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [packed.len(), s]), device);
    let weight = weights.iter().sum();
    let weights = weights.iter().any(|&w| w != 1.0).then_some(weights);
    let hidden = model.hidden(input, &layout);
    ShardLoss {
        loss: next_token_loss(model, hidden, positions, targets, weights),
        weight,
        tokens: lengths.iter().sum(),
    }
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
    let picked = model.target_log_probs(picked, targets);
    match weights {
        None => picked.mean().neg(),
        Some(w) => {
            let total: f32 = w.iter().sum();
            let w = Tensor::<1>::from_data(TensorData::new(w, [n]), &device);
            (picked * w).sum().div_scalar(total).neg()
        }
    }
}

/// A base causal LM plus (optionally) an adapter, ready to generate.
pub struct Generator {
    model: Llama,
    codec: TextCodec,
    max_len: usize,
}

impl Generator {
    pub fn load(base_model_dir: &Path, adapter_dir: Option<&Path>) -> Result<Self> {
        let device = crate::device::device();
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
            max_len: config.max_position_embeddings,
        })
    }

    /// Multiplies by the frozen weights in `compute`'s precision (bf16 on AMX: the
    /// projections and the output head), as serving chooses.
    pub fn with_compute(mut self, compute: crate::spec::Compute) -> Result<Self> {
        self.model.set_compute(compute)?;
        Ok(self)
    }

    /// The logits after each of `ids` (one sequence), `[ids.len() × vocab]` row by row: what
    /// other runtimes of an exported model are compared with.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let hidden = self.model.hidden_of(ids);
        let [_, s, h] = hidden.dims();
        Ok(to_host(self.model.logits(hidden.reshape([s, h]))).1)
    }

    /// [`Generator::generate`] for each prompt, in order (several at once on the CPU's cores).
    pub fn generate_all(&self, prompts: &[&str], max_new_tokens: usize) -> Result<Vec<Generation>> {
        crate::device::map_on_pool(prompts, |prompt| self.generate(prompt, max_new_tokens))
    }

    /// Greedy decoding, up to `max_new_tokens` or end of sequence. The prompt goes through
    /// the model once; each further token is one token's pass over the key/value cache.
    pub fn generate(&self, prompt: &str, max_new_tokens: usize) -> Result<Generation> {
        let budget = self.max_len.saturating_sub(max_new_tokens).max(1);
        let mut ids = self.codec.prompt_ids(prompt, budget)?;
        let start = ids.len();
        let mut log_prob = 0.0f64;
        let mut cache = crate::decode::KvCache::new(&self.model);
        for _ in 0..max_new_tokens {
            let new = &ids[cache.len()..];
            let hidden = self.model.hidden_cached(new, &mut cache);
            let [_, n, h] = hidden.dims();
            let last = hidden.narrow(1, n - 1, 1).reshape([1, h]);
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

/// Runs one full SFT training step (forward, backward, AdamW) per batch of token rows, the
/// training loop's own batch code included (packing, logits only where the loss is), and
/// times all but the first `warmup`. A row with `completion_start` 0 has loss on every next
/// token, as `labels = input_ids` does in transformers.
pub fn bench_sft_steps(
    model_dir: &Path,
    lora: &crate::spec::LoraSpec,
    batches: &[Vec<Encoded>],
    warmup: usize,
    seed: u64,
    compute: crate::spec::Compute,
) -> Result<crate::spec::StepBench> {
    let device = crate::device::device().autodiff();
    let _turn = crate::fit::exclusive();
    device.seed(seed);
    let config = load_config(model_dir)?;
    let mut model = config.load(&mut Checkpoint::open(model_dir)?, Some(lora), &device)?;
    model.set_compute(compute)?;
    let total_parameters = model.num_params();
    let trainable_parameters: usize = layers_of(&model)
        .map(|(_, p)| p.trainable_parameters())
        .sum();
    let params = (trainable_parameters, total_parameters);
    crate::fit::timed_steps(model, warmup, batches, params, |model, rows| {
        let batch: Vec<(&Encoded, f32)> = rows.iter().map(|e| (e, 1.0)).collect();
        Ok(sft_loss(model, &batch, 0, &device))
    })
}

/// The largest change the adapter in `adapter_dir` makes to the model's logits on `texts`.
pub(crate) fn llama_adapter_delta(base: &Path, adapter_dir: &Path, texts: &[&str]) -> Result<f32> {
    let plain = Generator::load(base, None)?;
    let adapted = Generator::load(base, Some(adapter_dir))?;
    let mut delta = 0.0f32;
    for text in texts {
        let ids = plain.codec.prompt_ids(text, plain.max_len)?;
        let logits = |g: &Generator| {
            let hidden = g.model.hidden_of(&ids);
            let [_, s, h] = hidden.dims();
            g.model.logits(hidden.reshape([s, h]))
        };
        let d = to_host((logits(&adapted) - logits(&plain)).abs().max()).1[0];
        delta = delta.max(d);
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_fills_rows_longest_first() {
        assert_eq!(pack(&[8, 3, 5, 2]), vec![vec![0], vec![2, 1], vec![3]]);
        assert_eq!(pack(&[4, 4]), vec![vec![0], vec![1]]);
        assert_eq!(pack(&[]), Vec::<Vec<usize>>::new());
    }

    /// With a chat template the loss starts after the assistant's header and covers the
    /// template's own end of turn; no extra EOS follows it. Without one, `prompt\n` and EOS.
    #[test]
    fn rows_are_wrapped_in_the_chat_template() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = ["where is my card", "cards arrive in a week", "hello there"];
        let spec = crate::tiny::TinyLlamaSpec {
            vocab_size: 300,
            ..Default::default()
        };
        crate::tiny::init_tiny_llama(dir.path(), corpus.iter(), &spec).unwrap();
        let row = SftExample {
            prompt: "where is my card".into(),
            completion: "cards arrive in a week".into(),
            weight: 1.0,
        };
        let plain = TextCodec::load(dir.path()).unwrap();
        let e = plain.encode(&row, 512).unwrap();
        assert_eq!(
            plain.text(&e.ids[..e.completion_start]).unwrap(),
            "where is my card\n"
        );
        assert_eq!(e.ids.last(), Some(&plain.eos));

        let template = "{% for m in messages %}<|endoftext|>{{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}";
        let config = serde_json::json!({"chat_template": template, "eos_token": "<|endoftext|>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let chat = TextCodec::load(dir.path()).unwrap();
        let e = chat.encode(&row, 512).unwrap();
        let decode = |ids: &[u32]| chat.tokenizer.decode(ids, false).unwrap();
        assert_eq!(
            decode(&e.ids[..e.completion_start]),
            "<|endoftext|>user: where is my card\n<|endoftext|>assistant: "
        );
        assert_eq!(
            decode(&e.ids[e.completion_start..]),
            "cards arrive in a week<|endoftext|>\n"
        );
        assert_eq!(
            chat.prompt("hi").unwrap(),
            "<|endoftext|>user: hi\n<|endoftext|>assistant: "
        );

        // A prompt too long for the window loses its middle: the template's opening and the
        // assistant's header stay, and the completion still follows the header.
        let long = SftExample {
            prompt: ["where is my card"; 40].join(" "),
            ..row
        };
        let e = chat.encode(&long, 40).unwrap();
        assert_eq!(e.completion_start, 32);
        let prompt = decode(&e.ids[..e.completion_start]);
        assert!(prompt.starts_with("<|endoftext|>user: where"), "{prompt}");
        assert!(
            prompt.ends_with("card\n<|endoftext|>assistant: "),
            "{prompt}"
        );
        assert!(decode(&e.ids[e.completion_start..]).starts_with("cards arrive"));
    }

    /// A batch split into shards that run side by side has the whole batch's loss and gradient:
    /// each shard's mean weighs by its share of the targets, and a shard with no targets (the
    /// last, here) adds nothing instead of a NaN.
    #[test]
    fn sharded_gradients_equal_whole_batch_gradients() {
        use burn::module::{ModuleMapper, ModuleVisitor, Param};
        use burn::optim::GradientsParams;
        use burn::tensor::Distribution;

        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let device = crate::device::device().autodiff();
        let _turn = crate::fit::exclusive();
        device.seed(7);
        let lora = crate::spec::LoraSpec {
            target_modules: crate::spec::LLAMA_PROJECTIONS.map(String::from).to_vec(),
            ..Default::default()
        };
        let model = load_config(&dir)
            .unwrap()
            .load(&mut Checkpoint::open(&dir).unwrap(), Some(&lora), &device)
            .unwrap();
        // B starts at zero, which would leave A's gradient zero too: make both random.
        struct Randomize(Device);
        impl ModuleMapper for Randomize {
            fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
                p.map(|t| match t.is_require_grad() {
                    true => Tensor::random(t.shape(), Distribution::Normal(0.0, 0.1), &self.0)
                        .require_grad(),
                    false => t,
                })
            }
        }
        let model = model.map(&mut Randomize(device.clone()));
        let rows: Vec<(Encoded, f32)> = [
            (8, 3, 1.0),
            (3, 1, 2.0),
            (5, 2, 0.5),
            (2, 1, 1.0),
            (4, 4, 3.0),
        ]
        .into_iter()
        .map(|(n, completion_start, weight)| {
            let ids = (0..n)
                .map(|j| (7 * j as u32 + n as u32) % 100 + 1)
                .collect();
            (
                Encoded {
                    ids,
                    completion_start,
                },
                weight,
            )
        })
        .collect();
        let loss = |model: &Llama, part: &[(Encoded, f32)]| {
            let batch: Vec<(&Encoded, f32)> = part.iter().map(|(e, w)| (e, *w)).collect();
            Ok(sft_loss(model, &batch, 0, &device))
        };
        let (whole, whole_loss, whole_tokens) =
            crate::fit::batch_gradients(&model, &rows, 1, 0, &loss).unwrap();
        let (sharded, sharded_loss, sharded_tokens) =
            crate::fit::batch_gradients(&model, &rows, 3, 0, &loss).unwrap();
        assert_eq!(whole_tokens, 22);
        assert_eq!(sharded_tokens, 22);
        assert!(
            (whole_loss - sharded_loss).abs() < 1e-5 * whole_loss.abs(),
            "whole {whole_loss}, sharded {sharded_loss}"
        );

        struct Compare<'a>(&'a GradientsParams, &'a GradientsParams, usize, f32);
        impl ModuleVisitor for Compare<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(a) = self.0.get::<D>(param.id) {
                    let b = self.1.get::<D>(param.id).expect("the same parameters");
                    let scale = a.clone().abs().max().into_scalar::<f32>();
                    assert!(scale > 0.0, "a gradient that is all zero compares nothing");
                    let gap = (a - b).abs().max().into_scalar::<f32>() / scale;
                    self.2 += 1;
                    self.3 = self.3.max(gap);
                }
            }
        }
        let mut compare = Compare(&whole, &sharded, 0, 0.0);
        model.visit(&mut compare);
        assert_eq!(compare.2, 2 * 7 * 2, "A and B of 7 projections in 2 layers");
        assert!(compare.3 < 1e-4, "largest relative gap {}", compare.3);
    }

    /// Packed rows must give the loss that padding each sequence alone gives: attention stays
    /// inside a sequence and positions restart with it.
    #[test]
    fn packed_loss_equals_padded_loss() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        let device = crate::device::device();
        let config = load_config(&dir).unwrap();
        let model = config
            .load(&mut Checkpoint::open(&dir).unwrap(), None, &device)
            .unwrap();
        let rows: Vec<Encoded> = [(8, 3), (3, 1), (5, 2), (2, 1)]
            .into_iter()
            .map(|(n, completion_start)| Encoded {
                ids: (0..n)
                    .map(|j| (7 * j as u32 + n as u32) % 100 + 1)
                    .collect(),
                completion_start,
            })
            .collect();
        let weights = [1.0, 2.0, 0.5, 1.0];
        let batch: Vec<(&Encoded, f32)> = rows.iter().zip(weights).collect();
        assert_eq!(pack(&[8, 3, 5, 2]).len(), 3, "the batch really packs");
        let packed = sft_loss(&model, &batch, 0, &device);
        assert_eq!(packed.tokens, 18);
        assert_eq!(packed.weight, 2.0 * 2.0 + 1.0 * 5.0 + 0.5 * 3.0 + 1.0 * 1.0);
        let packed = packed.loss;

        // The same loss, one padded row per sequence.
        let s = 8;
        let mut ids = vec![0i64; rows.len() * s];
        let (mut positions, mut targets, mut w) = (Vec::new(), Vec::new(), Vec::new());
        for (r, (e, weight)) in batch.iter().enumerate() {
            for (j, &id) in e.ids.iter().enumerate() {
                ids[r * s + j] = id as i64;
                if j >= e.completion_start && j > 0 {
                    positions.push((r * s + j - 1) as i64);
                    targets.push(id as i64);
                    w.push(*weight);
                }
            }
        }
        let lengths: Vec<usize> = rows.iter().map(|e| e.ids.len()).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows.len(), s]), &device);
        let hidden = model.hidden(input, &Layout::padded(&lengths, s));
        let padded = next_token_loss(&model, hidden, positions, targets, Some(w));
        let (a, b) = (packed.into_scalar::<f32>(), padded.into_scalar::<f32>());
        assert!((a - b).abs() < 1e-5, "packed {a}, padded {b}");
    }
}
