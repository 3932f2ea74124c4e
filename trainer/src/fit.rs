//! The training loop both objectives share: the seeded data order, gradient accumulation, the
//! learning-rate schedule, progress, and checkpoints a crashed run resumes from on the same
//! loss trajectory.
//!
//! A checkpoint is a directory `step-<n>/` holding the trainable parameters (burnpack, with
//! their parameter ids, so the optimizer state keyed by those ids applies to them again), the
//! optimizer state, with early stopping the weights of the best validation so far, and
//! `state.json` (step, loss and validation curves, tokens, early stopping's best step and spent
//! patience, and a fingerprint of the spec and the data: a checkpoint of a different run is
//! never resumed). It is written under a temporary name and renamed into place, so a crash
//! mid-write leaves the previous one.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::Tensor;
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::dropout::{mix, with_dropout_seed};
use crate::error::{Result, TrainerError, io_err};
use crate::spec::{Checkpointing, TrainReport, TrainSpec, TrainStep};

/// The parameters a run trains: LoRA matrices and, for classifiers, the head. Everything else
/// is the frozen base model, which the checkpoint does not repeat.
const TRAINABLE: &str = r"(^|\.)lora_[ab](\.|$)|^head\.";

const STATE: &str = "state.json";
const TRAINABLE_FILE: &str = "trainable.bpk";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// With early stopping: the trainable parameters at the best validation loss so far.
const BEST_FILE: &str = "best.bpk";

#[derive(Debug, Serialize, Deserialize)]
struct State {
    fingerprint: String,
    step: usize,
    tokens: usize,
    elapsed_seconds: f64,
    loss_curve: Vec<(usize, f64)>,
    /// Early stopping's bookkeeping, so a resumed run stops where the uninterrupted one would.
    #[serde(default)]
    validation_curve: Vec<(usize, f64)>,
    /// The best validation loss and its step (its weights are in `best.bpk`).
    #[serde(default)]
    best: Option<(f64, usize)>,
    /// Validations since the best that brought nothing.
    #[serde(default)]
    stale: usize,
}

/// What identifies a run for resuming: every spec field that shapes the trajectory, and the
/// rows (through `data`, which the caller hashes its rows into).
fn fingerprint(spec: &TrainSpec, data: impl FnOnce(&mut dyn Hasher)) -> String {
    // SipHash with fixed keys: stable for a given build, which is all a resume needs (a new
    // build restarting an old run trains it from the start).
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    format!(
        "{:?}|{:?}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{:?}",
        spec.base_model_dir,
        spec.lora,
        spec.labels.join("\u{1f}"),
        spec.epochs,
        spec.batch_size,
        spec.grad_accumulation,
        spec.learning_rate,
        spec.weight_decay,
        spec.warmup_ratio,
        spec.max_seq_len,
        spec.seed,
        spec.max_grad_norm,
    )
    .hash(&mut h);
    format!("{:?}", spec.early_stopping).hash(&mut h);
    spec.label_smoothing.to_bits().hash(&mut h);
    // Hashed only when on, so fingerprints of runs without it stay what they were.
    if spec.group_by_length {
        "group_by_length".hash(&mut h);
    }
    data(&mut h);
    format!("{:016x}", h.finish())
}

/// Holds the process's random-number generator for one run. burn's CPU backend seeds a single
/// process-wide generator (LoRA initialisation and dropout draw from it), so two runs
/// interleaving their draws would each stop being reproducible, and a resumed run would leave
/// its uninterrupted trajectory. Runs in one process take turns; training saturates the
/// cores anyway.
pub(crate) fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A run that panicked left nothing behind that the next one relies on.
    RUN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Optimizer steps in a run over `rows` training rows.
pub(crate) fn total_steps(spec: &TrainSpec, rows: usize) -> usize {
    rows.div_ceil(spec.batch_size)
        .div_ceil(spec.grad_accumulation.max(1))
        * spec.epochs
}

/// Splits `0..rows` into training and validation indices: all training without early
/// stopping, else a seeded `validation_fraction` (at least one row, never all) held back.
fn split_rows(spec: &TrainSpec, rows: usize) -> (Vec<usize>, Vec<usize>) {
    let all: Vec<usize> = (0..rows).collect();
    let Some(stopping) = &spec.early_stopping else {
        return (all, Vec::new());
    };
    let n = ((rows as f64 * stopping.validation_fraction).ceil() as usize).clamp(1, rows - 1);
    let mut shuffled = all;
    shuffled.shuffle(&mut StdRng::seed_from_u64(spec.seed ^ 0x76a1_1da7));
    let mut validation = shuffled.split_off(rows - n);
    shuffled.sort_unstable();
    validation.sort_unstable();
    (shuffled, validation)
}

/// Trains `model` on `rows` rows. `shard_loss` computes the loss of a shard of a micro-batch
/// (row indices; see [`batch_gradients`]); every `grad_accumulation` micro-batches make one
/// optimizer step. Returns the trained model and the bookkeeping for the report.
pub(crate) fn fit<M: Module + Clone + Sync>(
    spec: &TrainSpec,
    rows: usize,
    lengths: &[usize],
    data: impl FnOnce(&mut dyn Hasher),
    mut model: M,
    on_step: &mut dyn FnMut(&TrainStep) -> bool,
    shard_loss: impl Fn(&M, &[usize]) -> Result<ShardLoss> + Sync,
) -> Result<(M, Progress)> {
    let accumulate = spec.grad_accumulation.max(1);
    if spec.early_stopping.is_some() && rows < 2 {
        return Err(TrainerError::InvalidSpec(
            "early stopping needs at least two rows".into(),
        ));
    }
    let fingerprint = &fingerprint(spec, data);
    let (train, validation) = split_rows(spec, rows);
    let mut optim = optimizer(spec);
    let mut progress = Progress::new(spec, total_steps(spec, train.len()));
    // With early stopping: the best validation loss, its step and weights, and how many
    // validations since brought nothing.
    let mut best: Option<(f64, usize, M)> = None;
    let mut stale = 0;
    if let Some(checkpoints) = &spec.checkpointing
        && let Some((dir, state)) = latest(&checkpoints.dir, fingerprint)?
    {
        let trainable = |file: &str, into: M| -> Result<M> {
            let record = ModuleRecord::load(dir.join(file))
                .map_err(|e| bad_checkpoint(&dir, e))?
                .allow_partial(true);
            into.try_load_record(record)
                .map_err(|e| bad_checkpoint(&dir, e))
        };
        model = trainable(TRAINABLE_FILE, model)?;
        optim = optim
            .load(dir.join(OPTIMIZER_FILE))
            .map_err(|e| bad_checkpoint(&dir, e))?;
        if let Some((loss, step)) = state.best {
            best = Some((loss, step, trainable(BEST_FILE, model.clone())?));
        }
        stale = state.stale;
        progress.resume(&state);
        tracing::info!(step = state.step, dir = %dir.display(), "resuming from a checkpoint");
    }

    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut order = train;
    let mut step = 0;
    let eval_every = match &spec.early_stopping {
        Some(stopping) if stopping.eval_every_steps > 0 => stopping.eval_every_steps,
        _ => (progress.total_steps / spec.epochs.max(1)).max(1),
    };
    'epochs: for epoch in 0..spec.epochs {
        // Shuffled every epoch, resumed or not, so the order after a resume is the order the
        // uninterrupted run would have seen.
        order.shuffle(&mut rng);
        if spec.group_by_length && lengths.len() == rows {
            group_by_length(&mut order, lengths, spec.batch_size * accumulate);
        }
        let batches: Vec<&[usize]> = order.chunks(spec.batch_size).collect();
        for group in batches.chunks(accumulate) {
            step += 1;
            if step <= progress.step {
                continue;
            }
            let mut accumulator = GradientsAccumulator::<M>::new();
            let (mut loss_sum, mut tokens) = (0.0, 0);
            for (i, batch) in group.iter().enumerate() {
                let seed = mix(spec.seed, (step * accumulate + i) as u64);
                let (mut grads, loss, n) =
                    batch_gradients(&model, batch, shards(), seed, &shard_loss)?;
                if group.len() > 1 {
                    scale_gradients(&model, &mut grads, 1.0 / group.len() as f32);
                }
                loss_sum += loss / group.len() as f64;
                tokens += n;
                accumulator.accumulate(&model, grads);
            }
            let lr = progress.lr();
            let mut grads = accumulator.grads();
            if let Some(max_norm) = spec.max_grad_norm {
                clip_global_norm(&model, &mut grads, max_norm as f32);
            }
            model = optim.step(lr, model, grads);
            progress.push(loss_sum, tokens);
            // Validate before checkpointing: a run resumed from this step's checkpoint must
            // not validate it again, nor miss it.
            if let Some(stopping) = &spec.early_stopping
                && (step.is_multiple_of(eval_every) || step == progress.total_steps)
            {
                let loss = validation_loss(spec, &validation, &model, &shard_loss)?;
                progress.validation_curve.push((step, loss));
                match &best {
                    Some((best_loss, ..)) if loss >= best_loss - stopping.min_delta => {
                        stale += 1;
                        progress.stopped_early = stale >= stopping.patience.max(1);
                    }
                    _ => {
                        best = Some((loss, step, model.clone()));
                        stale = 0;
                    }
                }
            }
            let checkpoint = match &spec.checkpointing {
                Some(checkpoints)
                    if checkpoints.every_steps > 0
                        && step % checkpoints.every_steps == 0
                        && step < progress.total_steps
                        && !progress.stopped_early =>
                {
                    let best = best.as_ref().map(|(loss, step, m)| (*loss, *step, m));
                    let early = (best, stale);
                    Some(save(
                        checkpoints,
                        fingerprint,
                        &model,
                        &optim,
                        &progress,
                        early,
                    )?)
                }
                _ => None,
            };
            progress.notify(epoch, loss_sum, lr, checkpoint, on_step)?;
            if progress.stopped_early {
                break 'epochs;
            }
        }
    }
    if let Some((_, best_step, weights)) = best {
        progress.best_step = Some(best_step);
        model = weights;
    }
    Ok((model, progress))
}

/// Mean loss over the validation rows, in batches, without updating anything.
fn validation_loss<M>(
    spec: &TrainSpec,
    validation: &[usize],
    model: &M,
    shard_loss: &impl Fn(&M, &[usize]) -> Result<ShardLoss>,
) -> Result<f64> {
    let mut total = 0.0;
    for chunk in validation.chunks(spec.batch_size) {
        // The graph autodiff recorded is dropped with the tensor, never walked.
        let loss = shard_loss(model, chunk)?.loss.into_scalar::<f32>() as f64;
        total += loss * chunk.len() as f64;
    }
    Ok(total / validation.len() as f64)
}

/// Times plain AdamW steps (lr 1e-4, no schedule or clipping) on `batches`, all but the first
/// `warmup`, for the benches; gradients come from [`batch_gradients`] as in training.
pub(crate) fn timed_steps<M: Module + Clone + Sync, T: Sync>(
    mut model: M,
    warmup: usize,
    batches: &[Vec<T>],
    params: (usize, usize),
    shard_loss: impl Fn(&M, &[T]) -> Result<ShardLoss> + Sync,
) -> Result<crate::spec::StepBench> {
    if batches.len() <= warmup {
        return Err(TrainerError::InvalidSpec(
            "no steps left to time after warmup".into(),
        ));
    }
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let (mut times, mut losses, mut tokens) = (Vec::new(), Vec::new(), 0);
    for (step, batch) in batches.iter().enumerate() {
        let started = Instant::now();
        let (grads, loss, n) = batch_gradients(&model, batch, shards(), step as u64, &shard_loss)?;
        model = optim.step(1e-4, model, grads);
        if step >= warmup {
            times.push(started.elapsed().as_secs_f64());
            losses.push(loss);
            tokens += n;
        }
    }
    Ok(crate::spec::StepBench::new(&times, tokens, losses, params))
}

/// A shard's part of a batch's loss: the mean over what it holds, how much that mean weighs
/// in the batch's (its targets or rows, times their weights), and the tokens it processed.
pub(crate) struct ShardLoss {
    pub loss: Tensor<1>,
    pub weight: f32,
    pub tokens: usize,
}

/// How many shards a batch is split into: on the CPU, one per thread of the pool burn's flex
/// backend computes on. flex runs elementwise ops on the calling thread and only matmuls on
/// the pool, so one batch at a time leaves cores idle for much of a step; shards running side
/// by side keep them busy. On 2 cores, 2 shards took SmolLM2-shaped steps from 147 to 232
/// tokens/s; 4 were slower (smaller matmuls) but lighter on memory. A GPU gets the batch whole.
fn shards() -> usize {
    match crate::device::accelerator() {
        crate::device::Accelerator::Cpu => rayon::current_num_threads(),
        crate::device::Accelerator::Wgpu => 1,
    }
}

/// The gradient of a batch's loss, its value and the tokens it covered, computed in up to
/// `shards` parts at once on burn's thread pool. The parts combine as `Σ (wᵢ/W)·∇ᵢ`: the
/// gradient of the batch's weighted mean, whatever the split, in a fixed order (a seeded run
/// repeats itself). A shard with nothing to learn from (weight 0) adds nothing rather than
/// a NaN mean. Shard `i` draws its dropout masks from a generator seeded by `(seed, i)`.
pub(crate) fn batch_gradients<M: Module + Sync, T: Sync>(
    model: &M,
    rows: &[T],
    shards: usize,
    seed: u64,
    shard_loss: &(impl Fn(&M, &[T]) -> Result<ShardLoss> + Sync),
) -> Result<(GradientsParams, f64, usize)> {
    let per_shard = rows.len().div_ceil(shards.max(1)).max(1);
    let parts: Vec<&[T]> = rows.chunks(per_shard).collect();
    let run = |model: &M, i: usize| -> Result<(GradientsParams, f32, f64, usize)> {
        let shard = with_dropout_seed(mix(seed, i as u64), || shard_loss(model, parts[i]))?;
        let value = shard.loss.clone().into_scalar::<f32>() as f64;
        if shard.weight == 0.0 {
            // Nothing to learn from, so nothing to backpropagate; and burn-cubecl's backward
            // of a gather over zero rows underflows (`is_nonoverlapping` takes `shape - 1`).
            return Ok((GradientsParams::new(), 0.0, value, shard.tokens));
        }
        let grads = GradientsParams::from_grads(shard.loss.backward(), model);
        Ok((grads, shard.weight, value, shard.tokens))
    };
    if parts.len() == 1 {
        let (grads, _, value, tokens) = run(model, 0)?;
        return Ok((grads, value, tokens));
    }
    // Each shard backpropagates through its own copy of the trainable tensors: burn-autodiff
    // merges the graphs of computations that share a tracked tensor and walks a graph under one
    // lock, which would run the shards one after another.
    let shards: Vec<usize> = (0..parts.len()).collect();
    let results = crate::device::map_on_pool(&shards, |&i| run(&detached_trainables(model), i))?;
    let total: f32 = results.iter().map(|(_, w, ..)| w).sum();
    let mut accumulator = GradientsAccumulator::<M>::new();
    let (mut loss, mut tokens) = (0.0, 0);
    for (mut grads, weight, value, n) in results {
        tokens += n;
        if weight > 0.0 {
            scale_gradients(model, &mut grads, weight / total);
            accumulator.accumulate(model, grads);
            loss += value * (weight / total) as f64;
        }
    }
    Ok((accumulator.grads(), loss, tokens))
}

/// `model` with each trainable tensor replaced by a new leaf over the same data, under the same
/// parameter id: the gradients it yields are keyed as the model's own.
fn detached_trainables<M: Module>(model: &M) -> M {
    struct Detach;
    impl burn::module::ModuleMapper for Detach {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| {
                if t.is_require_grad() {
                    t.detach().require_grad()
                } else {
                    t
                }
            })
        }
    }
    model.clone().map(&mut Detach)
}

/// Multiplies every gradient in `grads` by `factor`.
pub(crate) fn scale_gradients<M: Module>(model: &M, grads: &mut GradientsParams, factor: f32) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f32,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale { grads, factor });
}

/// AdamW with the spec's weight decay. Clipping is [`clip_global_norm`]'s, not the
/// optimizer's: burn clips tensor by tensor.
pub(crate) fn optimizer(spec: &TrainSpec) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(spec.weight_decay as f32)
        .init()
}

/// Scales all gradients by one factor so that their joint L2 norm is at most `max_norm`, as
/// PyTorch's `clip_grad_norm_` (and so HF's Trainer) does: clipping each tensor on its own
/// would change the update's direction, not just its length. Returns the norm before clipping.
pub(crate) fn clip_global_norm<M: Module>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f32,
) -> f32 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let sq = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + sq,
                    None => sq,
                });
            }
        }
    }
    let mut sum = SumSquares { grads, total: None };
    model.visit(&mut sum);
    let Some(total) = sum.total else { return 0.0 };
    let norm = total.into_scalar::<f32>().sqrt();
    // PyTorch's epsilon, so a norm just at the limit scales the same way.
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        scale_gradients(model, grads, factor);
    }
    norm
}

/// Linear warmup, then cosine decay to zero.
pub(crate) fn schedule(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

fn bad_checkpoint(dir: &Path, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::BadFile {
        file: dir.to_owned(),
        message: format!("unreadable checkpoint: {e}"),
    }
}

/// The newest complete checkpoint of this run in `dir`, if any.
fn latest(dir: &Path, fingerprint: &str) -> Result<Option<(PathBuf, State)>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    while let Some((_, path)) = found.pop() {
        let Ok(raw) = std::fs::read_to_string(path.join(STATE)) else {
            continue;
        };
        match serde_json::from_str::<State>(&raw) {
            Ok(state) if state.fingerprint == fingerprint => return Ok(Some((path, state))),
            Ok(_) => {
                tracing::warn!(dir = %path.display(), "checkpoint of another run; starting afresh");
                return Ok(None);
            }
            Err(_) => continue,
        }
    }
    Ok(None)
}

/// Early stopping's best (validation loss, step, weights) and its count of stale validations.
type EarlyStoppingState<'a, M> = (Option<(f64, usize, &'a M)>, usize);

fn save<M: Module + Clone>(
    checkpoints: &Checkpointing,
    fingerprint: &str,
    model: &M,
    optim: &ModuleOptimizer,
    progress: &Progress,
    (best, stale): EarlyStoppingState<'_, M>,
) -> Result<PathBuf> {
    let dir = &checkpoints.dir;
    let final_dir = dir.join(format!("step-{}", progress.step));
    let tmp = dir.join(format!(".step-{}.partial", progress.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let save_trainable = |model: &M, file: &str| {
        let group = ParamGroup::from_regex(TRAINABLE)
            .expect("the trainable-parameter patterns are valid regexes");
        model
            .clone()
            .into_record_group(group)
            .save(tmp.join(file))
            .map_err(|e| bad_checkpoint(&tmp, e))
    };
    save_trainable(model, TRAINABLE_FILE)?;
    if let Some((.., weights)) = best {
        save_trainable(weights, BEST_FILE)?;
    }
    optim
        .save(tmp.join(OPTIMIZER_FILE))
        .map_err(|e| bad_checkpoint(&tmp, e))?;
    let state = State {
        fingerprint: fingerprint.to_owned(),
        step: progress.step,
        tokens: progress.tokens,
        elapsed_seconds: progress.elapsed(),
        loss_curve: progress.loss_curve.clone(),
        validation_curve: progress.validation_curve.clone(),
        best: best.map(|(loss, step, _)| (loss, step)),
        stale,
    };
    let path = tmp.join(STATE);
    std::fs::write(&path, serde_json::to_vec(&state).expect("json")).map_err(io_err(&path))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
    // Older checkpoints are superseded once the new one is in place.
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("step-") && entry.path() != final_dir {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(final_dir)
}

/// Sorts each stretch of 50 optimizer steps' rows of the shuffled `order` by length, longest
/// first: batches then hold rows of similar length and pad little, while which rows share a
/// stretch stays random. Draws nothing from the generator, so the epochs' shuffles are those of
/// the ungrouped run.
fn group_by_length(order: &mut [usize], lengths: &[usize], rows_per_step: usize) {
    for stretch in order.chunks_mut(rows_per_step.max(1) * 50) {
        stretch.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
}

/// Step bookkeeping: the learning-rate schedule, the loss curve, throughput, and the caller's
/// progress callback (which may cancel the run).
pub(crate) struct Progress {
    started: Instant,
    /// Wall time of the run before this process resumed it.
    earlier_seconds: f64,
    /// Tokens processed by this process (for its throughput) and by the whole run.
    tokens_here: usize,
    pub(crate) tokens: usize,
    pub(crate) step: usize,
    steps_here: usize,
    pub(crate) total_steps: usize,
    warmup: usize,
    peak_lr: f64,
    pub(crate) loss_curve: Vec<(usize, f64)>,
    validation_curve: Vec<(usize, f64)>,
    best_step: Option<usize>,
    stopped_early: bool,
}

impl Progress {
    pub(crate) fn new(spec: &TrainSpec, total_steps: usize) -> Self {
        Self {
            started: Instant::now(),
            earlier_seconds: 0.0,
            tokens_here: 0,
            tokens: 0,
            step: 0,
            steps_here: 0,
            total_steps,
            warmup: ((total_steps as f64) * spec.warmup_ratio).ceil() as usize,
            peak_lr: spec.learning_rate,
            loss_curve: Vec::with_capacity(total_steps),
            validation_curve: Vec::new(),
            best_step: None,
            stopped_early: false,
        }
    }

    fn resume(&mut self, state: &State) {
        self.step = state.step;
        self.tokens = state.tokens;
        self.earlier_seconds = state.elapsed_seconds;
        self.loss_curve = state.loss_curve.clone();
        self.validation_curve = state.validation_curve.clone();
    }

    fn elapsed(&self) -> f64 {
        self.earlier_seconds + self.started.elapsed().as_secs_f64()
    }

    /// The learning rate for the next step.
    pub(crate) fn lr(&self) -> f64 {
        schedule(self.peak_lr, self.step, self.warmup, self.total_steps)
    }

    /// Records a finished step.
    fn push(&mut self, loss: f64, tokens: usize) {
        self.step += 1;
        self.steps_here += 1;
        self.tokens += tokens;
        self.tokens_here += tokens;
        self.loss_curve.push((self.step, loss));
    }

    /// Tells the caller about the step just pushed; `Err(Cancelled)` if it asked to stop.
    fn notify(
        &mut self,
        epoch: usize,
        loss: f64,
        lr: f64,
        checkpoint: Option<PathBuf>,
        on_step: &mut dyn FnMut(&TrainStep) -> bool,
    ) -> Result<()> {
        let here = self.started.elapsed().as_secs_f64().max(1e-9);
        let per_step = here / self.steps_here as f64;
        let progress = TrainStep {
            step: self.step,
            total_steps: self.total_steps,
            epoch,
            loss,
            learning_rate: lr,
            tokens_per_second: self.tokens_here as f64 / here,
            elapsed_seconds: self.elapsed(),
            eta_seconds: per_step * self.total_steps.saturating_sub(self.step) as f64,
            checkpoint,
        };
        if on_step(&progress) {
            Ok(())
        } else {
            Err(TrainerError::Cancelled)
        }
    }

    pub(crate) fn report(
        self,
        examples: usize,
        trainable_parameters: usize,
        total_parameters: usize,
        files: Vec<String>,
    ) -> TrainReport {
        let wall_seconds = self.elapsed();
        TrainReport {
            steps: self.step,
            examples,
            tokens: self.tokens,
            wall_seconds,
            tokens_per_second: self.tokens_here as f64
                / self.started.elapsed().as_secs_f64().max(1e-9),
            loss_curve: self.loss_curve,
            trainable_parameters,
            total_parameters,
            files,
            validation_curve: self.validation_curve,
            best_step: self.best_step,
            stopped_early: self.stopped_early,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn grouping_by_length_sorts_each_stretch_and_keeps_its_rows() {
        let lengths: Vec<usize> = (0..300).map(|i| (i * 37) % 61).collect();
        let mut order: Vec<usize> = (0..300).rev().collect();
        let before = order.clone();
        // 2 rows a step: stretches of 100 rows.
        super::group_by_length(&mut order, &lengths, 2);
        for (grouped, shuffled) in order.chunks(100).zip(before.chunks(100)) {
            assert!(grouped.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
            let (mut a, mut b) = (grouped.to_vec(), shuffled.to_vec());
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "a stretch keeps exactly its rows");
        }
    }

    use super::*;
    use burn::nn::{Linear, LinearConfig};

    /// Two tensors with gradient norms 3 and 4: globally the norm is 5, and clipping to 1
    /// scales both by 1/5 (per-tensor clipping would give both norm 1).
    #[test]
    fn clipping_scales_all_gradients_by_one_factor() {
        #[derive(Module, Debug)]
        struct Two {
            a: Linear,
            b: Linear,
        }
        let device = crate::device::device().autodiff();
        let two = Two {
            a: LinearConfig::new(1, 1).with_bias(false).init(&device),
            b: LinearConfig::new(1, 1).with_bias(false).init(&device),
        };
        let x = Tensor::<2>::ones([1, 1], &device);
        // d/dw (3·w_a·x + 4·w_b·x) = 3 and 4.
        let loss =
            (two.a.forward(x.clone()).mul_scalar(3.0) + two.b.forward(x).mul_scalar(4.0)).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &two);
        let norm = clip_global_norm(&two, &mut grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-5, "{norm}");
        let get = |grads: &GradientsParams, p: &Param<Tensor<2>>| {
            grads.get::<2>(p.id).unwrap().into_scalar::<f32>()
        };
        assert!((get(&grads, &two.a.weight) - 0.6).abs() < 1e-5);
        assert!((get(&grads, &two.b.weight) - 0.8).abs() < 1e-5);

        // Under the limit nothing changes.
        let norm = clip_global_norm(&two, &mut grads, 10.0);
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert!((get(&grads, &two.a.weight) - 0.6).abs() < 1e-5);
    }

    #[test]
    fn warmup_then_cosine() {
        assert!((schedule(1.0, 0, 4, 20) - 0.25).abs() < 1e-12);
        assert!((schedule(1.0, 3, 4, 20) - 1.0).abs() < 1e-12);
        assert!((schedule(1.0, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert!(schedule(1.0, 20, 4, 20).abs() < 1e-12);
    }
}
