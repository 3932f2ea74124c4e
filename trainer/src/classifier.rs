//! Sequence classification: a linear head over a BERT-family encoder (mean pooling) or a
//! Llama-family causal LM (the last real token's state, the only one that has seen the whole
//! text), LoRA on the backbone. Training, PEFT export and inference.

use std::path::Path;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::bert::{Bert, BertConfig};
use crate::checkpoint::{Checkpoint, to_host, write_safetensors};
use crate::error::{Result, TrainerError, io_err};
use crate::fit::ShardLoss;
use crate::llama::{Layout, Llama, LlamaConfig};
use crate::lora::LoraLinear;
use crate::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, write_peft_adapter};
use crate::spec::{Compute, LoraSpec, TrainReport, TrainSpec, TrainStep};
use crate::tokenize::{Batch, TextEncoder};

/// File names of a classifier's head, beside the PEFT adapter.
pub const HEAD_WEIGHTS: &str = "classifier_head.safetensors";
pub const HEAD_CONFIG: &str = "classifier_config.json";

/// One labelled training row.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: usize,
    /// Weight in the loss (1 for a person's correction; a domain may weigh a teacher model's
    /// answers up or down).
    pub weight: f32,
}

/// Whether `spec` can train on `rows`, saying what is wrong if not.
fn validate(spec: &TrainSpec, rows: &[Example]) -> Result<()> {
    let bad = |m: String| Err(TrainerError::InvalidSpec(m));
    if spec.labels.len() < 2 {
        return bad("need at least two labels".into());
    }
    if rows.is_empty() {
        return bad("no training rows".into());
    }
    if let Some(r) = rows.iter().find(|r| r.label >= spec.labels.len()) {
        return bad(format!("label index {} out of range", r.label));
    }
    if spec.lora.r == 0 || spec.epochs == 0 || spec.batch_size == 0 || spec.grad_accumulation == 0 {
        return bad("rank, epochs, batch size and grad_accumulation must be positive".into());
    }
    if !(0.0..1.0).contains(&spec.label_smoothing) {
        return bad("label_smoothing must be in [0, 1)".into());
    }
    if let Some(r) = rows
        .iter()
        .find(|r| !(r.weight.is_finite() && r.weight > 0.0))
    {
        return bad(format!("row weight {} must be positive", r.weight));
    }
    Ok(())
}

/// The network under the head.
#[derive(Module, Debug)]
enum Backbone {
    Bert(Bert),
    Llama(Llama),
}

impl Backbone {
    /// One vector per row: the mean of an encoder's token states, or a causal LM's state at
    /// the row's last real token.
    ///
    /// # Shapes
    /// - batch: `[batch, seq]` ids and mask
    /// - output: `[batch, hidden]`
    fn pooled(&self, batch: &Batch) -> Tensor<2> {
        let [b, s] = batch.input_ids.dims();
        match self {
            Backbone::Bert(bert) => {
                let hidden = bert.forward(batch.input_ids.clone(), &batch.lengths);
                let h = hidden.dims()[2];
                let mask = batch.attention_mask.clone().reshape([b, s, 1]);
                let summed = (hidden * mask.clone()).sum_dim(1).reshape([b, h]);
                let counts = mask.sum_dim(1).reshape([b, 1]).clamp_min(1.0);
                summed / counts
            }
            Backbone::Llama(llama) => {
                let layout = Layout::padded(&batch.lengths, s);
                let hidden = llama.hidden(batch.input_ids.clone(), &layout);
                let h = hidden.dims()[2];
                let last: Vec<i64> = batch
                    .lengths
                    .iter()
                    .enumerate()
                    .map(|(row, &n)| (row * s + n.max(1) - 1) as i64)
                    .collect();
                let device = hidden.device();
                hidden.reshape([b * s, h]).select(
                    0,
                    Tensor::<1, Int>::from_data(TensorData::new(last, [b]), &device),
                )
            }
        }
    }

    /// The LoRA-wrapped projections with their PEFT module paths.
    fn adapted(&self) -> Vec<(String, &LoraLinear)> {
        match self {
            Backbone::Bert(bert) => {
                let prefix = &bert.module_prefix;
                bert.layers
                    .iter()
                    .enumerate()
                    .flat_map(|(i, layer)| {
                        layer
                            .projections()
                            .into_iter()
                            .map(move |(name, p)| (bert_module_path(prefix, i, name), p))
                    })
                    .collect()
            }
            Backbone::Llama(llama) => crate::llama::layers_of(llama).collect(),
        }
    }

    fn adapted_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        match self {
            Backbone::Bert(bert) => {
                let prefix = bert.module_prefix.clone();
                bert.layers
                    .iter_mut()
                    .enumerate()
                    .flat_map(|(i, layer)| {
                        let prefix = prefix.clone();
                        layer
                            .projections_mut()
                            .into_iter()
                            .map(move |(name, p)| (bert_module_path(&prefix, i, name), p))
                    })
                    .collect()
            }
            Backbone::Llama(llama) => llama
                .layers
                .iter_mut()
                .enumerate()
                .flat_map(|(i, layer)| {
                    layer
                        .projections_mut()
                        .into_iter()
                        .map(move |(name, p)| (format!("model.layers.{i}.{name}"), p))
                })
                .collect(),
        }
    }

    /// How the head pools, as the head's config names it.
    fn pooling(&self) -> &'static str {
        match self {
            Backbone::Bert(_) => "mean",
            Backbone::Llama(_) => "last_token",
        }
    }
}

#[derive(Module, Debug)]
struct Classifier {
    encoder: Backbone,
    head: Linear,
}

impl Classifier {
    /// # Shapes
    /// - batch: `[batch, seq]` ids and mask
    /// - output: logits `[batch, labels]`
    fn forward(&self, batch: &Batch) -> Tensor<2> {
        self.head.forward(self.encoder.pooled(batch))
    }
}

/// A backbone's config: what the classifier needs of either family.
enum BackboneConfig {
    Bert(BertConfig),
    Llama(LlamaConfig),
}

impl BackboneConfig {
    fn read(dir: &Path) -> Result<Self> {
        let raw = crate::checkpoint::read_config(dir)?;
        Ok(match raw["model_type"].as_str().unwrap_or_default() {
            "bert" => BackboneConfig::Bert(BertConfig::from_json(&raw)?),
            _ => BackboneConfig::Llama(LlamaConfig::from_json(&raw)?),
        })
    }

    fn hidden_size(&self) -> usize {
        match self {
            BackboneConfig::Bert(c) => c.hidden_size,
            BackboneConfig::Llama(c) => c.hidden_size,
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            BackboneConfig::Bert(c) => c.vocab_size,
            BackboneConfig::Llama(c) => c.vocab_size,
        }
    }

    fn max_position_embeddings(&self) -> usize {
        match self {
            BackboneConfig::Bert(c) => c.max_position_embeddings,
            BackboneConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    fn load(
        &self,
        ckpt: &mut Checkpoint,
        lora: Option<&LoraSpec>,
        device: &Device,
    ) -> Result<Backbone> {
        Ok(match self {
            BackboneConfig::Bert(c) => Backbone::Bert(c.load(ckpt, lora, device)?),
            BackboneConfig::Llama(c) => Backbone::Llama(c.load(ckpt, lora, device)?),
        })
    }
}

/// What a classifier on `model_dir` knows of its inputs before training: each text's tokens,
/// special tokens included and nothing truncated, and the longest sequence it can read.
pub fn measure_texts(model_dir: &Path, texts: &[&str]) -> Result<(Vec<usize>, usize)> {
    let config = BackboneConfig::read(model_dir)?;
    let encoder = TextEncoder::load(model_dir, usize::MAX)?;
    Ok((encoder.lengths(texts)?, config.max_position_embeddings()))
}

/// Trains a LoRA adapter and a classification head; `on_step` sees every step and may stop the
/// run by returning `false`.
pub fn train_classifier(
    spec: &TrainSpec,
    rows: &[Example],
    on_step: &mut dyn FnMut(&TrainStep) -> bool,
) -> Result<TrainReport> {
    validate(spec, rows)?;
    let _turn = crate::fit::exclusive();
    let device = crate::device::device().autodiff();
    device.seed(spec.seed);
    let config = BackboneConfig::read(&spec.base_model_dir)?;
    let encoder_text = TextEncoder::load(
        &spec.base_model_dir,
        spec.max_seq_len.min(config.max_position_embeddings()),
    )?;
    let mut ckpt = Checkpoint::open(&spec.base_model_dir)?;
    let mut encoder = config.load(&mut ckpt, Some(&spec.lora), &device)?;
    crate::lora::set_compute(
        spec.compute,
        encoder.adapted_mut().into_iter().map(|(_, p)| p),
    )?;
    let head = LinearConfig::new(config.hidden_size(), spec.labels.len()).init(&device);
    let model = Classifier { encoder, head };
    let total_parameters = model.num_params();
    let trainable_parameters = trainable(&model);

    let loss_fn = CrossEntropyLossConfig::new()
        .with_smoothing((spec.label_smoothing > 0.0).then_some(spec.label_smoothing as f32))
        .init(&device);
    let lengths = if spec.group_by_length {
        let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
        encoder_text.lengths(&texts)?
    } else {
        Vec::new()
    };
    let (model, progress) = crate::fit::fit(
        spec,
        rows.len(),
        &lengths,
        |h| {
            for r in rows {
                h.write(r.text.as_bytes());
                h.write_usize(r.label);
                h.write_u32(r.weight.to_bits());
            }
        },
        model,
        on_step,
        |model: &Classifier, chunk| {
            let texts: Vec<&str> = chunk.iter().map(|&i| rows[i].text.as_str()).collect();
            let labels: Vec<i64> = chunk.iter().map(|&i| rows[i].label as i64).collect();
            let batch = encoder_text.encode(&texts, &device)?;
            let targets =
                Tensor::<1, Int>::from_data(TensorData::new(labels, [chunk.len()]), &device);
            let logits = model.forward(&batch);
            let weights: Vec<f32> = chunk.iter().map(|&i| rows[i].weight).collect();
            let weight = weights.iter().sum();
            let loss = if weights.iter().all(|&w| w == 1.0) {
                loss_fn.forward(logits, targets)
            } else {
                weighted_cross_entropy(logits, targets, weights, spec.label_smoothing as f32)
            };
            Ok(ShardLoss {
                loss,
                weight,
                tokens: batch.tokens,
            })
        },
    )?;
    let files = export(&model, spec, &config)?;
    Ok(progress.report(rows.len(), trainable_parameters, total_parameters, files))
}

/// Times full classifier training steps (forward, backward, AdamW on LoRA and head) on random
/// `[batch, seq]` id batches with random labels, all but the first `warmup` of them.
#[allow(clippy::too_many_arguments)]
pub fn bench_classifier_steps(
    model_dir: &Path,
    lora: &LoraSpec,
    num_labels: usize,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    compute: Compute,
) -> Result<crate::spec::StepBench> {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    let _turn = crate::fit::exclusive();
    let device = crate::device::device().autodiff();
    device.seed(seed);
    let config = BackboneConfig::read(model_dir)?;
    let vocab = config.vocab_size();
    let mut encoder = config.load(&mut Checkpoint::open(model_dir)?, Some(lora), &device)?;
    crate::lora::set_compute(compute, encoder.adapted_mut().into_iter().map(|(_, p)| p))?;
    let head = LinearConfig::new(config.hidden_size(), num_labels).init(&device);
    let model = Classifier { encoder, head };
    let params = (trainable(&model), model.num_params());
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut rng = StdRng::seed_from_u64(seed);
    // Rows of `seq` random ids, each with a random label.
    let batches: Vec<Vec<(Vec<i64>, i64)>> = (0..warmup + steps)
        .map(|_| {
            (0..batch)
                .map(|_| {
                    let ids = (0..seq)
                        .map(|_| rng.random_range(0..vocab as i64))
                        .collect();
                    (ids, rng.random_range(0..num_labels as i64))
                })
                .collect()
        })
        .collect();
    crate::fit::timed_steps(model, warmup, &batches, params, |model, rows| {
        let n = rows.len();
        let ids: Vec<i64> = rows
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        let labels: Vec<i64> = rows.iter().map(|&(_, label)| label).collect();
        let input = Batch {
            input_ids: Tensor::from_data(TensorData::new(ids, [n, seq]), &device),
            attention_mask: Tensor::ones([n, seq], &device),
            tokens: n * seq,
            lengths: vec![seq; n],
        };
        let targets = Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), &device);
        Ok(ShardLoss {
            loss: loss_fn.forward(model.forward(&input), targets),
            weight: n as f32,
            tokens: n * seq,
        })
    })
}

/// Cross-entropy with label smoothing `eps`, each row weighted: `Σ wᵢ·CEᵢ / Σ wᵢ`, where
/// `CEᵢ = (1-eps)·(-log p[yᵢ]) + eps·mean_k(-log p[k])`, burn's smoothed target
/// `(1-eps)·onehot + eps/K` written out.
///
/// # Shapes
/// - logits: `[batch, classes]`, targets: `[batch]`, weights: `batch` values
/// - output: `[1]`
fn weighted_cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Vec<f32>,
    eps: f32,
) -> Tensor<1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let logp = burn::tensor::activation::log_softmax(logits, 1);
    let nll = logp.clone().gather(1, targets.reshape([n, 1])).neg();
    let uniform = logp.mean_dim(1).neg();
    let per_row = nll.mul_scalar(1.0 - eps) + uniform.mul_scalar(eps);
    let total: f32 = weights.iter().sum();
    let w = Tensor::<2>::from_data(TensorData::new(weights, [n, 1]), &device);
    (per_row * w).sum().div_scalar(total)
}

fn trainable(model: &Classifier) -> usize {
    let lora: usize = model
        .encoder
        .adapted()
        .iter()
        .map(|(_, p)| p.trainable_parameters())
        .sum();
    lora + model.head.num_params()
}

/// PEFT's module path of BERT projection `name` in layer `i`.
fn bert_module_path(prefix: &str, i: usize, name: &str) -> String {
    format!("{prefix}encoder.layer.{i}.{name}")
}

fn export(model: &Classifier, spec: &TrainSpec, config: &BackboneConfig) -> Result<Vec<String>> {
    let dir = &spec.output_dir;
    // PEFT's task type of the base model the adapter goes on: a bare encoder, or a causal
    // LM (whose sequence-classification head lives beside the adapter, not in it).
    let task_type = match model.encoder {
        Backbone::Bert(_) => "FEATURE_EXTRACTION",
        Backbone::Llama(_) => "CAUSAL_LM",
    };
    write_peft_adapter(
        dir,
        &spec.base_model_dir,
        &spec.lora,
        task_type,
        model.encoder.adapted().into_iter(),
    )?;
    let w = to_host(model.head.weight.val().transpose());
    let b = to_host(model.head.bias.as_ref().expect("head has bias").val());
    write_safetensors(
        &dir.join(HEAD_WEIGHTS),
        &[
            ("classifier.weight".into(), w.0, w.1),
            ("classifier.bias".into(), b.0, b.1),
        ],
    )?;
    let head_config = serde_json::json!({
        "pooling": model.encoder.pooling(),
        "labels": spec.labels,
        "hidden_size": config.hidden_size(),
        "max_seq_len": spec.max_seq_len,
    });
    write_json(&dir.join(HEAD_CONFIG), &head_config)?;
    Ok([ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_WEIGHTS, HEAD_CONFIG]
        .map(String::from)
        .to_vec())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let raw = serde_json::to_string_pretty(value).expect("json");
    std::fs::write(path, raw).map_err(io_err(path))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let raw = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&raw).map_err(|e| TrainerError::BadFile {
        file: path.to_owned(),
        message: e.to_string(),
    })
}

/// A predicted label with the model's confidence in it (its softmax probability).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub label: usize,
    pub confidence: f32,
}

impl Prediction {
    /// The label with the highest probability in `row`.
    pub fn most_likely(row: &[f32]) -> Self {
        let (label, &confidence) = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least two labels");
        Prediction { label, confidence }
    }
}

/// A base model plus (optionally) an adapter, ready to classify.
pub struct ClassifierPredictor {
    model: Classifier,
    text: TextEncoder,
    device: Device,
    labels: Vec<String>,
}

impl ClassifierPredictor {
    /// Loads `base_model_dir` with the adapter in `adapter_dir`. Without an adapter the head
    /// is freshly initialised from `seed`: the untrained baseline a new domain starts from.
    pub fn load(
        base_model_dir: &Path,
        adapter_dir: Option<&Path>,
        labels: &[String],
        seed: u64,
    ) -> Result<Self> {
        let device = crate::device::device();
        let config = BackboneConfig::read(base_model_dir)?;
        // Loaded weights go into zero-initialised shells: nothing here draws from burn's
        // process-wide generator, so a serving process loads adapters while a run trains.
        let mut ckpt = Checkpoint::open(base_model_dir)?;
        let mut encoder = config.load(&mut ckpt, None, &device)?;
        let (head, max_seq_len) = match adapter_dir {
            Some(dir) => {
                let head_config = read_json(&dir.join(HEAD_CONFIG))?;
                let trained: Vec<String> = serde_json::from_value(head_config["labels"].clone())
                    .map_err(|e| TrainerError::BadFile {
                        file: dir.join(HEAD_CONFIG),
                        message: e.to_string(),
                    })?;
                // A domain's labels only ever grow at the end, so an adapter trained before new
                // ones were added still means the same labels by the same indices; it never
                // predicts the new ones.
                if !labels.starts_with(&trained) {
                    return Err(TrainerError::InvalidSpec(format!(
                        "adapter in {} was trained on labels {trained:?}, not {labels:?}",
                        dir.display()
                    )));
                }
                load_peft_adapter(dir, encoder.adapted_mut().into_iter(), &device)?;
                let mut head_ckpt = Checkpoint::open_file(&dir.join(HEAD_WEIGHTS))?;
                let head =
                    head_ckpt.linear("classifier", config.hidden_size(), trained.len(), &device)?;
                let max_seq_len = head_config["max_seq_len"].as_u64().unwrap_or(128) as usize;
                (head, max_seq_len)
            }
            None => {
                // The untrained head draws from burn's process-wide generator: not while a run
                // does.
                let _turn = crate::fit::exclusive();
                device.seed(seed);
                let head = LinearConfig::new(config.hidden_size(), labels.len()).init(&device);
                (head, 128)
            }
        };
        let text = TextEncoder::load(
            base_model_dir,
            max_seq_len.min(config.max_position_embeddings()),
        )?;
        Ok(Self {
            model: Classifier { encoder, head },
            text,
            device,
            labels: labels.to_vec(),
        })
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Computes the frozen projections as `compute` says from now on: `Bfloat16` multiplies
    /// on the CPU's AMX tiles (answers within bf16 rounding of f32's); refused where the CPU
    /// has none.
    pub fn with_compute(mut self, compute: Compute) -> Result<Self> {
        crate::lora::set_compute(
            compute,
            self.model.encoder.adapted_mut().into_iter().map(|(_, p)| p),
        )?;
        Ok(self)
    }

    /// The most likely label of each text and its probability, in batches of `batch_size`
    /// (several at once on the CPU's cores).
    pub fn predict(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Prediction>> {
        Ok(self
            .probabilities(texts, batch_size)?
            .iter()
            .map(|row| Prediction::most_likely(row))
            .collect())
    }

    /// Each text's probability for every label the adapter was trained on (in order).
    pub fn probabilities(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        let chunks: Vec<&[&str]> = texts.chunks(batch_size.max(1)).collect();
        let batches = crate::device::map_on_pool(&chunks, |chunk| {
            let batch = self.text.encode(chunk, &self.device)?;
            let (shape, data) = to_host(softmax(self.model.forward(&batch), 1));
            Ok(data
                .chunks(shape[1])
                .map(<[f32]>::to_vec)
                .collect::<Vec<_>>())
        })?;
        Ok(batches.into_iter().flatten().collect())
    }
}

/// The largest change the adapter in `adapter_dir` makes to the encoder's hidden states on
/// `texts` (the head is left out: this asks whether the LoRA weights do anything).
pub(crate) fn bert_adapter_delta(base: &Path, adapter_dir: &Path, texts: &[&str]) -> Result<f32> {
    let device = crate::device::device();
    let config = BackboneConfig::read(base)?;
    let mut encoder = config.load(&mut Checkpoint::open(base)?, None, &device)?;
    let text = TextEncoder::load(base, 128.min(config.max_position_embeddings()))?;
    let batch = text.encode(texts, &device)?;
    let Backbone::Bert(bert) = &encoder else {
        return Err(TrainerError::InvalidSpec(format!(
            "{} is not BERT-family",
            base.display()
        )));
    };
    let before = bert.forward(batch.input_ids.clone(), &batch.lengths);
    load_peft_adapter(adapter_dir, encoder.adapted_mut().into_iter(), &device)?;
    let Backbone::Bert(bert) = &encoder else {
        unreachable!("still the same backbone")
    };
    let after = bert.forward(batch.input_ids, &batch.lengths);
    Ok(to_host((after - before).abs().max()).1[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits_and_targets(device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
        let logits = Tensor::<2>::from_data(
            TensorData::new(
                vec![2.0f32, -1.0, 0.5, 0.1, 0.3, -0.7, -2.0, 1.5, 0.0],
                [3, 3],
            ),
            device,
        );
        let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2, 1], [3]), device);
        (logits, targets)
    }

    #[test]
    fn unit_weights_reproduce_burns_smoothed_cross_entropy() {
        let device = crate::device::device();
        for eps in [0.0f32, 0.1] {
            let (logits, targets) = logits_and_targets(&device);
            let burn_loss = CrossEntropyLossConfig::new()
                .with_smoothing((eps > 0.0).then_some(eps))
                .init(&device)
                .forward(logits.clone(), targets.clone())
                .into_scalar::<f32>();
            let ours =
                weighted_cross_entropy(logits, targets, vec![1.0; 3], eps).into_scalar::<f32>();
            assert!(
                (burn_loss - ours).abs() < 1e-6,
                "eps {eps}: {burn_loss} vs {ours}"
            );
        }
    }

    #[test]
    fn a_weight_counts_like_repeating_the_row() {
        let device = crate::device::device();
        let (logits, targets) = logits_and_targets(&device);
        let weighted =
            weighted_cross_entropy(logits.clone(), targets.clone(), vec![1.0, 2.0, 1.0], 0.0)
                .into_scalar::<f32>();
        // Row 1 twice, unweighted.
        let idx = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 1, 2], [4]), &device);
        let repeated = weighted_cross_entropy(
            logits.select(0, idx.clone()),
            targets.select(0, idx),
            vec![1.0; 4],
            0.0,
        )
        .into_scalar::<f32>();
        assert!(
            (weighted - repeated).abs() < 1e-6,
            "{weighted} vs {repeated}"
        );
    }
}
