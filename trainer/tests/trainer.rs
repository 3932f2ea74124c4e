//! Trains real LoRA adapters on a tiny BERT built from the demo's Banking77 slice.

use std::path::Path;

use flywheel_trainer::tiny::{TinyBertSpec, init_tiny_bert};
use flywheel_trainer::{ClassifierPredictor, Example, TrainSpec, train_classifier};

/// Trains where `FLYWHEEL_TEST_DEVICE` says: `wgpu` in a `--features wgpu` build runs these
/// tests on the GPU.
fn on_test_device() {
    if let Ok(name) = std::env::var("FLYWHEEL_TEST_DEVICE") {
        let chosen = name.parse().and_then(flywheel_trainer::use_accelerator);
        chosen.expect("FLYWHEEL_TEST_DEVICE");
    }
}

fn banking() -> (Vec<String>, Vec<Example>) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/flywheel/data/banking77-mini.csv");
    let mut reader = csv::Reader::from_path(path).unwrap();
    let mut labels: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for rec in reader.records() {
        let rec = rec.unwrap();
        let label = rec[1].to_string();
        let idx = labels.iter().position(|l| *l == label).unwrap_or_else(|| {
            labels.push(label);
            labels.len() - 1
        });
        rows.push(Example {
            text: rec[0].to_string(),
            label: idx,
            weight: 1.0,
        });
    }
    (labels, rows)
}

/// Every fifth row held out, the rest to train on: `(holdout, train)`.
fn hold_out_every_fifth<T>(rows: Vec<T>) -> (Vec<T>, Vec<T>) {
    let (holdout, train): (Vec<_>, Vec<_>) =
        rows.into_iter().enumerate().partition(|(i, _)| i % 5 == 0);
    let strip = |v: Vec<(usize, T)>| v.into_iter().map(|(_, r)| r).collect();
    (strip(holdout), strip(train))
}

/// Mean loss of the first and of the last five steps.
fn loss_ends(report: &flywheel_trainer::TrainReport) -> (f64, f64) {
    let mean = |steps: &[(usize, f64)]| steps.iter().map(|l| l.1).sum::<f64>() / 5.0;
    (
        mean(&report.loss_curve[..5]),
        mean(&report.loss_curve[report.steps - 5..]),
    )
}

/// A generation task on the Banking77 rows: answer each query with its intent name, as text.
/// Writes a tiny Llama whose tokenizer covers prompts and answers to `base`.
fn answer_with_intent(
    labels: &[String],
    rows: &[Example],
    base: &Path,
) -> Vec<flywheel_trainer::SftExample> {
    use flywheel_trainer::tiny::{TinyLlamaSpec, init_tiny_llama};
    let examples: Vec<flywheel_trainer::SftExample> = rows
        .iter()
        .map(|r| flywheel_trainer::SftExample {
            prompt: r.text.clone(),
            completion: labels[r.label].replace('_', " "),
            weight: 1.0,
        })
        .collect();
    let corpus = examples
        .iter()
        .flat_map(|e| [e.prompt.clone(), e.completion.clone()]);
    init_tiny_llama(base, corpus, &TinyLlamaSpec::default()).unwrap();
    examples
}

fn accuracy(p: &ClassifierPredictor, rows: &[Example]) -> f64 {
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let preds = p.predict(&texts, 32).unwrap();
    preds
        .iter()
        .zip(rows)
        .filter(|(p, r)| p.label == r.label)
        .count() as f64
        / rows.len() as f64
}

#[test]
fn lora_training_beats_the_untrained_baseline_and_round_trips_through_peft_files() {
    on_test_device();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let (labels, rows) = banking();
    let model = init_tiny_bert(
        &base,
        rows.iter().map(|r| r.text.as_str()),
        &TinyBertSpec::default(),
    )
    .unwrap();
    assert!(model.vocab_size > 100, "vocab {}", model.vocab_size);

    let (holdout, train) = hold_out_every_fifth(rows);

    let out = dir.path().join("adapter");
    let spec = TrainSpec::new(base.clone(), out.clone(), labels.clone());
    let mut steps = 0;
    let report = train_classifier(&spec, &train, &mut |_| {
        steps += 1;
        true
    })
    .unwrap();
    assert_eq!(report.steps, steps);
    let (first, last) = loss_ends(&report);
    assert!(last < first * 0.7, "loss did not fall: {first} -> {last}");
    assert!(report.trainable_parameters < report.total_parameters / 2);

    let baseline = ClassifierPredictor::load(&base, None, &labels, 1).unwrap();
    let tuned = ClassifierPredictor::load(&base, Some(&out), &labels, 1).unwrap();
    let (before, after) = (accuracy(&baseline, &holdout), accuracy(&tuned, &holdout));
    eprintln!(
        "holdout accuracy {before:.3} -> {after:.3}, {:.0} tokens/s",
        report.tokens_per_second
    );
    assert!(after > before + 0.2, "accuracy {before} -> {after}");

    // PEFT layout: A is [r, in], B is [out, r], under base_model.model.<module>.
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st
        .tensor("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight")
        .unwrap();
    let b = st
        .tensor("base_model.model.encoder.layer.0.intermediate.dense.lora_B.weight")
        .unwrap();
    assert_eq!(a.shape(), &[8, 128]);
    assert_eq!(b.shape(), &[256, 8]);
}

/// A department may pick a causal LM for classification: the head reads the last real
/// token's state, LoRA goes on the Llama projections, and the files load back as they trained.
#[test]
fn a_causal_lm_learns_to_classify_with_last_token_pooling() {
    use flywheel_trainer::tiny::{TinyLlamaSpec, init_tiny_llama};
    on_test_device();

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("llama");
    let (labels, rows) = banking();
    init_tiny_llama(
        &base,
        rows.iter().map(|r| r.text.clone()),
        &TinyLlamaSpec::default(),
    )
    .unwrap();
    let (holdout, train) = hold_out_every_fifth(rows);

    let out = dir.path().join("adapter");
    let mut spec = TrainSpec::new(base.clone(), out.clone(), labels.clone());
    spec.lora.target_modules = flywheel_trainer::classifier_target_modules(&base).unwrap();
    assert!(spec.lora.target_modules.contains(&"gate_proj".to_string()));
    let report = train_classifier(&spec, &train, &mut |_| true).unwrap();
    let (first, last) = loss_ends(&report);
    assert!(last < first * 0.7, "loss did not fall: {first} -> {last}");

    let baseline = ClassifierPredictor::load(&base, None, &labels, 1).unwrap();
    let tuned = ClassifierPredictor::load(&base, Some(&out), &labels, 1).unwrap();
    let (before, after) = (accuracy(&baseline, &holdout), accuracy(&tuned, &holdout));
    eprintln!("tiny Llama classifier, held-out accuracy {before:.3} -> {after:.3}");
    assert!(after > before + 0.2, "{before} -> {after}");
    // The predictor reproduces the accuracy training saw on its own rows.
    let head: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("classifier_config.json")).unwrap())
            .unwrap();
    assert_eq!(head["pooling"], "last_token");
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        st.names()
            .iter()
            .any(|n| n.starts_with("base_model.model.model.layers.0.mlp.gate_proj.lora_A"))
    );
}

#[test]
fn a_model_directory_without_weights_is_refused_by_name() {
    on_test_device();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type":"bert","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":8}"#).unwrap();
    let err = ClassifierPredictor::load(dir.path(), None, &["a".into(), "b".into()], 0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type":"t5"}"#).unwrap();
    let err = ClassifierPredictor::load(dir.path(), None, &["a".into(), "b".into()], 0)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("unsupported architecture `t5`"),
        "{err}"
    );
}

#[test]
fn causal_lm_sft_learns_to_generate_the_corrected_completion() {
    use flywheel_trainer::{Generator, train_causal_lm};
    on_test_device();

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("llama");
    let (labels, rows) = banking();
    let examples = answer_with_intent(&labels, &rows, &base);
    let (holdout, train) = hold_out_every_fifth(examples);

    let out = dir.path().join("adapter");
    let mut spec = TrainSpec::new(base.clone(), out.clone(), vec![]);
    spec.lora.target_modules = flywheel_trainer::LLAMA_PROJECTIONS
        .map(String::from)
        .to_vec();
    spec.epochs = 20;
    spec.learning_rate = 3e-3;
    let report = train_causal_lm(&spec, &train, &mut |_| true).unwrap();
    let first = report.loss_curve[0].1;
    let last = report.loss_curve.last().unwrap().1;
    assert!(last < first * 0.5, "loss {first} -> {last}");

    let exact = |g: &Generator| {
        holdout
            .iter()
            .take(40)
            .filter(|r| g.generate(&r.prompt, 8).unwrap().text == r.completion)
            .count()
    };
    let before = exact(&Generator::load(&base, None).unwrap());
    let after = exact(&Generator::load(&base, Some(&out)).unwrap());
    eprintln!("exact match on 40 held-out prompts: {before} -> {after}");
    assert!(after >= before + 15, "{before} -> {after}");

    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // GQA: k_proj is [kv_heads * head_dim, hidden] = [64, 128], so lora_B is [64, r].
    let b = st
        .tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape(), &[64, 8]);
}

/// A run killed after its last checkpoint and started again resumes there and follows the
/// loss curve of a run that was never interrupted, step for step (dropout and gradient
/// accumulation included), and writes the same adapter.
///
/// Bit-for-bit only holds with the machine to itself: flex sums in parallel, and under
/// contention rayon splits (and so rounds) differently; Adam's first step turns those
/// last-bit differences into whole `±lr` updates. So the comparison runs in a process of its
/// own (this test binary again, running only the body below).
#[test]
fn a_run_resumed_from_its_checkpoint_follows_the_uninterrupted_loss_curve() {
    run_alone("resumed_run_body");
}

/// Runs the test `body` in a process of its own (this test binary again), one such process
/// at a time; a no-op inside that process.
fn run_alone(body: &str) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if std::env::var_os("FLYWHEEL_TRAINER_CHILD").is_some() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", body, "--test-threads=1", "--nocapture"])
        .env("FLYWHEEL_TRAINER_CHILD", "1")
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("1 passed"), "{log}");
}

/// The body of the test above; passes trivially unless that test runs it in a child process.
#[test]
fn resumed_run_body() {
    on_test_device();
    if std::env::var_os("FLYWHEEL_TRAINER_CHILD").is_none() {
        return;
    }
    use flywheel_trainer::{Checkpointing, TrainerError, train_causal_lm};

    let dir = tempfile::tempdir().unwrap();
    let (labels, rows) = banking();
    let rows: Vec<Example> = rows.into_iter().take(96).collect();
    let bert = dir.path().join("bert");
    init_tiny_bert(
        &bert,
        rows.iter().map(|r| r.text.as_str()),
        &TinyBertSpec::default(),
    )
    .unwrap();
    let llama = dir.path().join("llama");
    let sft = answer_with_intent(&labels, &rows, &llama);

    let spec_for = |base: &Path, name: &str| {
        let mut spec = TrainSpec::new(base.to_owned(), dir.path().join(name), labels.clone());
        if base == llama {
            spec.labels.clear();
            spec.lora.target_modules = flywheel_trainer::LLAMA_PROJECTIONS
                .map(String::from)
                .to_vec();
        }
        spec.epochs = 3;
        spec.batch_size = 8;
        spec.grad_accumulation = 2;
        spec.lora.dropout = 0.1;
        spec.checkpointing = Some(Checkpointing {
            dir: dir.path().join(format!("{name}-checkpoints")),
            every_steps: 4,
        });
        spec
    };
    // A spec without labels is the causal LM's SFT run.
    let train = |spec: &TrainSpec,
                 on_step: &mut dyn FnMut(&flywheel_trainer::TrainStep) -> bool| {
        if spec.labels.is_empty() {
            train_causal_lm(spec, &sft, on_step)
        } else {
            train_classifier(spec, &rows, on_step)
        }
    };

    for base in [&bert, &llama] {
        let whole = train(&spec_for(base, "whole"), &mut |_| true).unwrap();
        // 96 rows / 8 = 12 micro-batches = 6 steps an epoch.
        assert_eq!(whole.steps, 18);

        let spec = spec_for(base, "crashed");
        // Stopped during step 10: the checkpoint of step 8 is the newest.
        assert!(matches!(
            train(&spec, &mut |s| s.step != 10),
            Err(TrainerError::Cancelled)
        ));
        let mut resumed_steps = Vec::new();
        let resumed = train(&spec, &mut |s| {
            resumed_steps.push(s.step);
            true
        })
        .unwrap();
        assert_eq!(resumed_steps.first(), Some(&9), "{}", base.display());
        assert_eq!(resumed.loss_curve.len(), whole.loss_curve.len());
        for ((step, a), (_, b)) in whole.loss_curve.iter().zip(&resumed.loss_curve) {
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                "{}: step {step}: {a} uninterrupted, {b} resumed",
                base.display()
            );
        }
        let weights = |name: &str| {
            std::fs::read(dir.path().join(name).join("adapter_model.safetensors")).unwrap()
        };
        assert_eq!(weights("whole"), weights("crashed"), "{}", base.display());

        // A checkpoint holds what trains, not the frozen base model again.
        let ckpt_dir = spec.checkpointing.as_ref().unwrap().dir.clone();
        let newest = std::fs::read_dir(&ckpt_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let saved = std::fs::metadata(newest.join("trainable.bpk"))
            .unwrap()
            .len();
        let base_size = std::fs::metadata(base.join("model.safetensors"))
            .unwrap()
            .len();
        eprintln!(
            "{}: checkpoint {saved} B, base {base_size} B",
            base.display()
        );
        assert!(saved * 3 < base_size, "{saved} vs {base_size}");

        // The checkpoint dir now holds a finished run's last checkpoint; another run (another
        // seed) pointed at it starts from step 1 instead of resuming someone else's state.
        let mut other = spec.clone();
        other.seed += 1;
        let mut first_step = None;
        let mut note = |s: &flywheel_trainer::TrainStep| {
            first_step.get_or_insert(s.step);
            false
        };
        let _ = train(&other, &mut note);
        assert_eq!(first_step, Some(1), "{}", base.display());
    }
}

/// With early stopping a run that starts to overfit stops, and keeps the weights of its best
/// validation loss rather than its last.
#[test]
fn early_stopping_ends_an_overfitting_run_at_its_best_validation_loss() {
    on_test_device();
    let dir = tempfile::tempdir().unwrap();
    let (rows, per_epoch, spec_for) = overfitting_run(dir.path());
    let spec = spec_for("adapter");
    let report = train_classifier(&spec, &rows, &mut |_| true).unwrap();
    let planned = per_epoch * 40;
    eprintln!(
        "stopped at step {} of {planned}; validation {:?}",
        report.steps, report.validation_curve
    );
    assert!(report.stopped_early && report.steps < planned, "{report:?}");
    let (best_step, best_loss) = report
        .validation_curve
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(report.best_step, Some(best_step));
    // Three validations without improvement after the best, then the stop.
    let after: Vec<_> = report
        .validation_curve
        .iter()
        .filter(|(s, _)| *s > best_step)
        .collect();
    assert_eq!(after.len(), 3, "{:?}", report.validation_curve);
    assert!(after.iter().all(|(_, l)| *l >= best_loss));
    // Validation rows were held back: an epoch is 80% of the rows.
    assert_eq!(report.validation_curve[0].0, per_epoch);
}

/// Banking rows on a tiny BERT, its optimizer steps per epoch, and a spec per output name for
/// a run that overfits them (a high learning rate, 40 epochs) unless early stopping (20% of the
/// rows, a validation per epoch, patience 3) ends it.
fn overfitting_run(dir: &Path) -> (Vec<Example>, usize, impl Fn(&str) -> TrainSpec + '_) {
    use flywheel_trainer::EarlyStopping;

    let base = dir.join("base");
    let (labels, rows) = banking();
    init_tiny_bert(
        &base,
        rows.iter().map(|r| r.text.as_str()),
        &TinyBertSpec::default(),
    )
    .unwrap();
    let per_epoch = (rows.len() - rows.len() / 5).div_ceil(32);
    let spec_for = move |name: &str| {
        let mut spec = TrainSpec::new(base.clone(), dir.join(name), labels.clone());
        spec.learning_rate = 1e-2;
        spec.epochs = 40;
        spec.batch_size = 32;
        spec.early_stopping = Some(EarlyStopping {
            validation_fraction: 0.2,
            eval_every_steps: per_epoch,
            patience: 3,
            min_delta: 0.0,
        });
        spec
    };
    (rows, per_epoch, spec_for)
}

/// A run with early stopping that crashes and resumes from its checkpoint keeps its best
/// weights and its patience: it stops at the step, and with the adapter, of the run that never
/// crashed. Bit for bit, so alone, as the resume test above.
#[test]
fn an_early_stopping_run_resumed_after_a_crash_stops_where_the_uninterrupted_one_did() {
    run_alone("early_stopping_resume_body");
}

/// The body of the test above; passes trivially unless that test runs it in a child process.
#[test]
fn early_stopping_resume_body() {
    use flywheel_trainer::{Checkpointing, TrainerError};
    on_test_device();

    if std::env::var_os("FLYWHEEL_TRAINER_CHILD").is_none() {
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let (rows, per_epoch, overfitting) = overfitting_run(dir.path());
    let spec_for = |name: &str| {
        let mut spec = overfitting(name);
        // Checkpoints on the steps that validate: the case where the order of the two matters.
        spec.checkpointing = Some(Checkpointing {
            dir: dir.path().join(format!("{name}-checkpoints")),
            every_steps: per_epoch,
        });
        spec
    };
    let whole = train_classifier(&spec_for("whole"), &rows, &mut |_| true).unwrap();
    assert!(whole.stopped_early, "{whole:?}");
    let best = whole.best_step.unwrap();
    assert!(whole.steps - best >= 2 * per_epoch, "{whole:?}");

    // Crashed one step before the stop: the newest checkpoint is one validation earlier, after
    // the best, with patience partly spent.
    let spec = spec_for("crashed");
    assert!(matches!(
        train_classifier(&spec, &rows, &mut |s| s.step != whole.steps - 1),
        Err(TrainerError::Cancelled)
    ));
    let mut first = None;
    let resumed = train_classifier(&spec, &rows, &mut |s| {
        first.get_or_insert(s.step);
        true
    })
    .unwrap();
    assert_eq!(first, Some(whole.steps - per_epoch + 1));
    assert!(resumed.stopped_early);
    assert_eq!(resumed.steps, whole.steps);
    assert_eq!(resumed.best_step, whole.best_step);
    assert_eq!(resumed.validation_curve.len(), whole.validation_curve.len());
    for ((s, a), (t, b)) in whole.validation_curve.iter().zip(&resumed.validation_curve) {
        assert_eq!(s, t);
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "step {s}: {a} vs {b}"
        );
    }
    let weights = |name: &str| {
        std::fs::read(dir.path().join(name).join("adapter_model.safetensors")).unwrap()
    };
    assert_eq!(
        weights("whole"),
        weights("crashed"),
        "the best step's adapter"
    );
}

/// A causal LM (projections and the tied output head) and a BERT classifier trained in
/// `compute`: `[causal LM, classifier]`.
fn train_both_in(
    compute: flywheel_trainer::Compute,
) -> [flywheel_trainer::Result<flywheel_trainer::TrainReport>; 2] {
    train_both_with(&[compute]).pop().unwrap()
}

/// [`train_both_in`] for each precision, on the same two models: a tokenizer trained twice
/// on one corpus may order tied pieces differently when threads race, so runs meant to be
/// compared share one.
fn train_both_with(
    computes: &[flywheel_trainer::Compute],
) -> Vec<[flywheel_trainer::Result<flywheel_trainer::TrainReport>; 2]> {
    use flywheel_trainer::{Compute, train_causal_lm};
    let dir = tempfile::tempdir().unwrap();
    let (labels, rows) = banking();
    let rows = &rows[..96];
    let llama = dir.path().join("llama");
    let sft = answer_with_intent(&labels, rows, &llama);
    let bert = dir.path().join("bert");
    init_tiny_bert(
        &bert,
        rows.iter().map(|r| r.text.clone()),
        &TinyBertSpec::default(),
    )
    .unwrap();

    let spec = |base: &Path, labels: Vec<String>, compute: Compute| {
        let mut spec = TrainSpec::new(base.to_owned(), dir.path().join("out"), labels);
        spec.epochs = 3;
        spec.compute = compute;
        spec
    };
    let causal = |compute: Compute| {
        let mut spec = spec(&llama, vec![], compute);
        spec.lora.target_modules = flywheel_trainer::LLAMA_PROJECTIONS
            .map(String::from)
            .to_vec();
        train_causal_lm(&spec, &sft, &mut |_| true)
    };
    let classifier = |compute: Compute| {
        train_classifier(&spec(&bert, labels.clone(), compute), rows, &mut |_| true)
    };

    computes
        .iter()
        .map(|&compute| [causal(compute), classifier(compute)])
        .collect()
}

/// Where the CPU has no AMX, or training runs on a GPU, a bf16 spec is refused, saying why
/// and what to use instead.
fn assert_bf16_refused() {
    for refused in train_both_in(flywheel_trainer::Compute::Bfloat16) {
        let message = refused.unwrap_err().to_string();
        assert!(
            message.contains("bfloat16") && message.contains("use float32"),
            "{message}"
        );
    }
}

#[test]
#[cfg_attr(
    cpu_amx,
    ignore = "this CPU runs bf16: the refusal is checked where it cannot"
)]
fn bf16_compute_is_refused_without_amx() {
    on_test_device();
    assert_bf16_refused();
}

/// bf16 products of the frozen weights (AMX) follow the f32 run's loss curve.
#[test]
#[cfg_attr(not(cpu_amx), ignore = "needs a CPU with AMX-BF16")]
fn bf16_compute_follows_the_f32_loss_curve() {
    use flywheel_trainer::Compute;
    on_test_device();
    if std::env::var("FLYWHEEL_TEST_DEVICE").as_deref() == Ok("wgpu") {
        // bf16 is the CPU's AMX path: on a GPU the spec must be refused instead.
        return assert_bf16_refused();
    }
    assert!(
        Compute::Bfloat16.is_available(),
        "this CPU lists AMX-BF16, yet bf16 compute is refused"
    );
    let mut runs = train_both_with(&[Compute::Float32, Compute::Bfloat16]).into_iter();
    let [causal_f32, classifier_f32] = runs.next().unwrap();
    let [causal_bf16, classifier_bf16] = runs.next().unwrap();
    for (what, f32, bf16) in [
        ("causal LM", causal_f32, causal_bf16),
        ("classifier", classifier_f32, classifier_bf16),
    ] {
        let (f32, bf16) = (f32.unwrap().loss_curve, bf16.unwrap().loss_curve);
        assert_eq!(f32.len(), bf16.len());
        let worst = f32
            .iter()
            .zip(&bf16)
            .map(|(a, b)| (a.1 - b.1).abs() / a.1)
            .fold(0.0, f64::max);
        eprintln!(
            "{what}: bf16 loss within {:.3}% of f32 at every step",
            worst * 100.0
        );
        assert!(worst < 0.02, "{what}: {f32:?} vs {bf16:?}");
        // Identical curves would mean the products never left f32.
        assert!(worst > 0.0, "{what}: bf16 changed nothing");
        assert!(bf16.last().unwrap().1 < bf16[0].1 * 0.8, "{what}: {bf16:?}");
    }
}

/// A tiny Llama with the shapes of `tests/fixtures/tiny-llama` (so its adapters fit), but
/// written by `tiny` with a tokenizer, as `Generator::load` needs.
fn tiny_llama_like_the_fixture(dir: &Path) {
    let texts = [
        "where is my card",
        "my card was declined",
        "what is the exchange rate",
    ];
    flywheel_trainer::tiny::init_tiny_llama(
        dir,
        texts.iter(),
        &flywheel_trainer::tiny::TinyLlamaSpec {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            vocab_size: 300,
            tie_word_embeddings: true,
            seed: 3,
        },
    )
    .unwrap();
}

/// A safetensors file of f32 tensors, zero-filled, shapes as given (any rank).
fn zero_safetensors(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let head = serde_json::to_vec(&header).unwrap();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.resize(out.len() + offset, 0);
    out
}

fn adapter_with(dir: &Path, tensors: &[(&str, &[usize])]) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-ours");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        fixture.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        zero_safetensors(tensors),
    )
    .unwrap();
}

const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// Found by `flywheel-fuzz` (adapter_merge): LoRA weights that are not matrices panicked
/// indexing their shapes; they are refused.
#[test]
fn merging_an_adapter_whose_weights_are_not_matrices_is_refused() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    for (a, b) in [
        (&[4usize][..], &[32usize, 4][..]),
        (&[4, 32][..], &[][..]),
        (&[4, 32, 0][..], &[32, 4][..]),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        adapter_with(&tmp.path().join("adapter"), &[(Q_A, a), (Q_B, b)]);
        let err = flywheel_trainer::export_merged(
            &base,
            &tmp.path().join("adapter"),
            &tmp.path().join("out"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("matrices"), "{a:?} {b:?}: {err}");
    }
}

/// Found by `flywheel-fuzz` (adapter_load): LoRA matrices of the wrong size for their layer
/// loaded, then panicked in the forward pass; loading refuses them.
#[test]
fn an_adapter_that_does_not_fit_its_layer_is_refused_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_llama_like_the_fixture(&base);
    let adapter = tmp.path().join("adapter");
    // A's input width is q_proj's (32) halved; B's rank differs from A's.
    for (a, b) in [
        (&[4usize, 16][..], &[32usize, 4][..]),
        (&[4, 32][..], &[32, 2][..]),
    ] {
        adapter_with(&adapter, &[(Q_A, a), (Q_B, b)]);
        let err = flywheel_trainer::adapter_output_delta(&base, &adapter, &["where is my card"])
            .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{a:?} {b:?}: {err}");
    }
}

/// Found by `flywheel-fuzz` (base_model): a config.json with a non-positive `rms_norm_eps`
/// panicked in burn's RmsNorm, a huge `num_hidden_layers` overflowed a pre-sized Vec, and a
/// huge `vocab_size` allocated its embedding before the checkpoint's shape was checked. Each
/// is an error now.
#[test]
fn a_base_model_config_json_out_of_range_is_refused_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    tiny_llama_like_the_fixture(&dir);
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for (field, value) in [
        ("rms_norm_eps", serde_json::json!(0.0)),
        ("rms_norm_eps", serde_json::json!(-1e-5)),
        ("num_hidden_layers", serde_json::json!(u64::MAX)),
        ("vocab_size", serde_json::json!(1u64 << 40)),
        ("hidden_size", serde_json::json!(1u64 << 40)),
    ] {
        let mut config = good.clone();
        config[field] = value.clone();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        assert!(
            flywheel_trainer::Generator::load(&dir, None).is_err(),
            "{field} = {value} was accepted"
        );
    }
}
