//! Numerical parity with transformers and PEFT on golden tensors produced once by
//! `tests/fixtures/gen_golden.py` and `gen_training_golden.py` (versions in `versions.json`
//! beside them). Tolerance: 1e-4 absolute on every compared value; 1% of PEFT's loss at
//! every training step.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};

use crate::bert::BertConfig;
use crate::causal::Encoded;
use crate::checkpoint::{Checkpoint, to_host};
use crate::llama::{Layout, LlamaConfig};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

struct Golden {
    ids: Vec<i64>,
    mask: Vec<f32>,
    shape: [usize; 2],
    ckpt: Checkpoint,
}

fn golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = |name: &str| -> (Vec<i64>, Vec<usize>) {
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    };
    let (ids, shape) = ints("input_ids");
    let (mask, _) = ints("attention_mask");
    Golden {
        ids,
        mask: mask.into_iter().map(|m| m as f32).collect(),
        shape: [shape[0], shape[1]],
        ckpt: Checkpoint::open_file(&dir.join("golden.safetensors")).unwrap(),
    }
}

/// Each row's real tokens, from a mask that must hold them first.
fn right_padded_lengths(mask: &[f32], [_, s]: [usize; 2]) -> Vec<usize> {
    mask.chunks(s)
        .map(|row| {
            let n = row.iter().take_while(|&&m| m == 1.0).count();
            assert!(row[n..].iter().all(|&m| m == 0.0), "right-padded fixture");
            n
        })
        .collect()
}

/// Largest absolute difference over the positions the mask keeps.
fn max_diff(ours: &[f32], theirs: &[f32], mask: &[f32], per_position: usize) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(i, _)| mask[i / per_position] == 1.0)
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn bert_hidden_states_match_transformers() {
    let dir = fixture("tiny-bert");
    let device = crate::device::device();
    let config = BertConfig::from_json(&config(&dir)).unwrap();
    let model = config
        .load(&mut Checkpoint::open(&dir).unwrap(), None, &device)
        .unwrap();
    let mut g = golden(&dir);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(g.ids.clone(), g.shape), &device);
    let (_, ours) = to_host(model.forward(ids, &right_padded_lengths(&g.mask, g.shape)));
    let (_, theirs) = g.ckpt.take_any("last_hidden_state").unwrap();
    let diff = max_diff(&ours, &theirs, &g.mask, config.hidden_size);
    assert!(diff < TOLERANCE, "max |ours - transformers| = {diff}");
}

fn causal_logits(model_dir: &Path, adapter: Option<&Path>, golden_dir: &Path) -> (f32, usize) {
    let device = crate::device::device();
    let config = LlamaConfig::from_json(&config(model_dir)).unwrap();
    let mut model = config
        .load(&mut Checkpoint::open(model_dir).unwrap(), None, &device)
        .unwrap();
    if let Some(dir) = adapter {
        let layers = model.layers.iter_mut().enumerate().flat_map(|(i, layer)| {
            layer
                .projections_mut()
                .into_iter()
                .map(move |(name, p)| (format!("model.layers.{i}.{name}"), p))
        });
        crate::lora::load_peft_adapter(dir, layers, &device).unwrap();
    }
    let mut g = golden(golden_dir);
    let [b, s] = g.shape;
    // The fixtures pad on the right: a row's length is its count of ones.
    let lengths: Vec<usize> = g
        .mask
        .chunks(s)
        .map(|m| m.iter().filter(|&&x| x == 1.0).count())
        .collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(g.ids.clone(), g.shape), &device);
    let hidden = model.hidden(ids, &Layout::padded(&lengths, s));
    let h = hidden.dims()[2];
    let (_, ours) = to_host(model.logits(hidden.reshape([b * s, h])));
    let (_, theirs) = g.ckpt.take_any("logits").unwrap();
    (
        max_diff(&ours, &theirs, &g.mask, config.vocab_size),
        ours.len(),
    )
}

#[test]
fn llama_logits_match_transformers_with_gqa_and_untied_head() {
    let dir = fixture("tiny-llama");
    let (diff, n) = causal_logits(&dir, None, &dir);
    assert!(
        n > 0 && diff < TOLERANCE,
        "max |ours - transformers| = {diff}"
    );
}

#[test]
fn qwen2_logits_match_transformers_with_qkv_bias_and_tied_head() {
    let dir = fixture("tiny-qwen2");
    let (diff, _) = causal_logits(&dir, None, &dir);
    assert!(diff < TOLERANCE, "max |ours - transformers| = {diff}");
}

#[test]
fn a_peft_saved_lora_adapter_reproduces_peft_logits() {
    let adapter = fixture("tiny-llama-lora");
    let (diff, _) = causal_logits(&fixture("tiny-llama"), Some(&adapter), &adapter);
    assert!(diff < TOLERANCE, "max |ours - PEFT| = {diff}");
}

/// 20 LoRA steps from PEFT's own initial adapter, on the same batch with the same recipe
/// (AdamW, warmup then cosine, no clipping): our loss stays within 1% of PEFT's at every step.
#[test]
fn twenty_lora_steps_follow_pefts_loss_curve_within_one_percent() {
    use burn::module::{Module, ParamGroup};

    let base = fixture("tiny-llama");
    let dir = fixture("tiny-llama-train");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ints =
        |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(golden[key].clone()).unwrap() };
    let (ids, mask) = (ints("input_ids"), ints("attention_mask"));
    let theirs: Vec<f64> = serde_json::from_value(golden["losses"].clone()).unwrap();
    let steps = golden["steps"].as_u64().unwrap() as usize;

    let device = crate::device::device().autodiff();
    let config = LlamaConfig::from_json(&config(&base)).unwrap();
    let mut model = config
        .load(&mut Checkpoint::open(&base).unwrap(), None, &device)
        .unwrap();
    let layers = model.layers.iter_mut().enumerate().flat_map(|(i, layer)| {
        layer
            .projections_mut()
            .into_iter()
            .map(move |(name, p)| (format!("model.layers.{i}.{name}"), p))
    });
    crate::lora::load_peft_adapter(&dir, layers, &device).unwrap();
    let model = model.no_grad().set_require_grad_group(
        ParamGroup::from_regex(r"(^|\.)lora_[ab](\.|$)").unwrap(),
        true,
    );

    let mut spec = crate::spec::TrainSpec::new(base.clone(), dir.join("unused"), vec![]);
    spec.epochs = steps;
    spec.batch_size = ids.len();
    spec.learning_rate = golden["learning_rate"].as_f64().unwrap();
    spec.weight_decay = golden["weight_decay"].as_f64().unwrap();
    spec.warmup_ratio = golden["warmup_steps"].as_f64().unwrap() / steps as f64;
    spec.max_grad_norm = None;
    let (model, progress) = crate::fit::fit(
        &spec,
        ids.len(),
        &[],
        |_| {},
        model,
        &mut |_| true,
        |model, chunk| {
            // Every non-padding token after the first is a target, as with HF's `labels`.
            let rows: Vec<Encoded> = chunk
                .iter()
                .map(|&r| Encoded {
                    ids: (0..mask[r].len())
                        .filter(|&j| mask[r][j] == 1)
                        .map(|j| ids[r][j] as u32)
                        .collect(),
                    completion_start: 0,
                })
                .collect();
            let batch: Vec<(&Encoded, f32)> = rows.iter().map(|e| (e, 1.0)).collect();
            Ok(crate::causal::sft_loss(model, &batch, 0, &device))
        },
    )
    .unwrap();
    let ours: Vec<f64> = progress.loss_curve.iter().map(|(_, l)| *l).collect();
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs() / b.abs())
        .fold(0.0, f64::max);
    eprintln!("largest step-wise gap to PEFT: {:.4}%", worst * 100.0);
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let rel = (a - b).abs() / b.abs();
        assert!(
            rel < 0.01,
            "step {}: ours {a:.5}, PEFT {b:.5} ({:.3}% apart)\nours {ours:?}\nPEFT {theirs:?}",
            step + 1,
            rel * 100.0
        );
    }
    // The run learned: the comparison is not between two flat lines.
    assert!(theirs[steps - 1] < theirs[0] * 0.6);

    // The adapter these steps trained is the one `gen_ours_golden.py` hands to PEFT (see
    // the test below); FLYWHEEL_WRITE_FIXTURES=1 writes it again.
    if std::env::var_os("FLYWHEEL_WRITE_FIXTURES").is_some() {
        let spec = crate::spec::LoraSpec {
            r: golden["r"].as_u64().unwrap() as usize,
            alpha: golden["lora_alpha"].as_f64().unwrap(),
            dropout: 0.0,
            target_modules: crate::spec::LLAMA_PROJECTIONS.map(String::from).to_vec(),
            use_rslora: false,
        };
        crate::lora::write_peft_adapter(
            &fixture("tiny-llama-ours"),
            Path::new("tiny-llama"),
            &spec,
            "CAUSAL_LM",
            crate::llama::layers_of(&model),
        )
        .unwrap();
    }
}

/// PEFT loaded an adapter this trainer wrote (`tiny-llama-ours`, written by the test above)
/// and computed logits (`gen_ours_golden.py`): our model with the adapter reproduces them,
/// and so does our merged export without any adapter, both to 1e-4.
#[test]
fn peft_loads_our_adapter_and_our_merged_export_reproduces_its_logits() {
    let adapter = fixture("tiny-llama-ours");
    let base = fixture("tiny-llama");
    let (diff, _) = causal_logits(&base, Some(&adapter), &adapter);
    assert!(diff < TOLERANCE, "adapter: max |ours - PEFT| = {diff}");

    let merged = tempfile::tempdir().unwrap();
    let files = crate::export_merged(&base, &adapter, merged.path()).unwrap();
    assert!(
        files.contains(&"model.safetensors".to_string())
            && files.contains(&"config.json".to_string())
    );
    let (diff, n) = causal_logits(merged.path(), None, &adapter);
    assert!(
        n > 0 && diff < TOLERANCE,
        "merged: max |ours - PEFT| = {diff}"
    );
    // Without the adapter the base model is far off: the adapter is not a no-op.
    let (base_diff, _) = causal_logits(&base, None, &adapter);
    assert!(base_diff > 100.0 * TOLERANCE, "{base_diff}");
}
