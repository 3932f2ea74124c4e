//! LoRA training throughput, ours against PyTorch + PEFT on the same shapes in one run.
//!
//! cargo bench -p flywheel-trainer --bench lora_bench -- [--preset tiny|smollm2-135m|minilm|realistic|all]
//!     [--python python3] [--peft-script ../shared/bench/peft_lora_bench.py] [--steps N]
//!     [--device cpu|wgpu]
//!
//! Each measurement runs in a child process so its peak RSS is its own. Both sides run in
//! float32 and in bfloat16 (ours: bf16 products of the frozen weights, where the CPU has AMX);
//! ratios compare like with like, and our best with PEFT's best. `--device wgpu` (a
//! `--features wgpu` build) runs our side on the GPU, f32 only; PEFT's scripts stay on the CPU.
//! Not a test: numbers go to stdout for people to read.

use std::path::{Path, PathBuf};
use std::process::Command;

use flywheel_trainer::tiny::{TinyBertSpec, TinyLlamaSpec, write_random_bert, write_random_llama};
use flywheel_trainer::{
    Compute, Encoded, LoraSpec, StepBench, bench_classifier_steps, bench_sft_steps,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[path = "support/peer.rs"]
mod peer;
use peer::python_json;

enum Arch {
    Llama(TinyLlamaSpec),
    Bert(TinyBertSpec),
}

enum Workload {
    /// Every row `seq` tokens, loss on every next token (or the label, for BERT).
    Fixed { batch: usize, seq: usize },
    /// Corrections of varied length, loss on the completion only: `batch` rows a step.
    Realistic { batch: usize },
}

struct Preset {
    name: &'static str,
    arch: Arch,
    vocab: usize,
    workload: Workload,
}

const WARMUP: usize = 2;

fn smollm2_135m() -> TinyLlamaSpec {
    TinyLlamaSpec {
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        max_position_embeddings: 2048,
        vocab_size: 49152,
        tie_word_embeddings: true,
        seed: 0,
    }
}

fn presets() -> Vec<Preset> {
    vec![
        Preset {
            name: "tiny",
            arch: Arch::Llama(TinyLlamaSpec {
                hidden_size: 64,
                intermediate_size: 172,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                max_position_embeddings: 256,
                vocab_size: 512,
                tie_word_embeddings: true,
                seed: 0,
            }),
            vocab: 512,
            workload: Workload::Fixed { batch: 8, seq: 64 },
        },
        Preset {
            name: "smollm2-135m",
            arch: Arch::Llama(smollm2_135m()),
            vocab: 49152,
            workload: Workload::Fixed { batch: 4, seq: 128 },
        },
        Preset {
            name: "minilm",
            arch: Arch::Bert(TinyBertSpec {
                hidden_size: 384,
                num_hidden_layers: 6,
                num_attention_heads: 12,
                intermediate_size: 1536,
                max_position_embeddings: 512,
                vocab_size: 30522,
                seed: 0,
            }),
            vocab: 30522,
            workload: Workload::Fixed { batch: 32, seq: 32 },
        },
        Preset {
            name: "realistic",
            arch: Arch::Llama(smollm2_135m()),
            vocab: 49152,
            workload: Workload::Realistic { batch: 8 },
        },
    ]
}

/// Banking77's label count: the MiniLM preset's head.
const LABELS: usize = 77;

fn model_dir(p: &Preset) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flywheel-bench-{}", p.name));
    if !dir.join("model.safetensors").exists() {
        match &p.arch {
            Arch::Llama(spec) => write_random_llama(&dir, p.vocab, spec).map(drop),
            Arch::Bert(spec) => write_random_bert(&dir, p.vocab, spec).map(drop),
        }
        .expect("writing the bench model");
    }
    dir
}

/// The realistic preset's batches: prompts log-uniform in 16..320 tokens, completions in
/// 8..96, the spread of corrections where a short answer fixes a long request. Seeded, so both
/// sides see the same rows.
fn realistic_batches(batch: usize, count: usize, vocab: usize) -> Vec<Vec<Encoded>> {
    let mut rng = StdRng::seed_from_u64(77);
    let mut log_uniform =
        |lo: f64, hi: f64| (lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp() as usize;
    let lengths: Vec<(usize, usize)> = (0..batch * count)
        .map(|_| (log_uniform(16.0, 320.0), log_uniform(8.0, 96.0)))
        .collect();
    let mut rng = StdRng::seed_from_u64(78);
    lengths
        .chunks(batch)
        .map(|rows| {
            rows.iter()
                .map(|&(prompt, completion)| Encoded {
                    ids: (0..prompt + completion)
                        .map(|_| rng.random_range(1..vocab as u32))
                        .collect(),
                    completion_start: prompt,
                })
                .collect()
        })
        .collect()
}

fn fixed_batches(batch: usize, seq: usize, count: usize, vocab: usize) -> Vec<Vec<Encoded>> {
    let mut rng = StdRng::seed_from_u64(0);
    (0..count)
        .map(|_| {
            (0..batch)
                .map(|_| Encoded {
                    ids: (0..seq)
                        .map(|_| rng.random_range(0..vocab as u32))
                        .collect(),
                    completion_start: 0,
                })
                .collect()
        })
        .collect()
}

fn batches(p: &Preset, steps: usize) -> Vec<Vec<Encoded>> {
    match p.workload {
        Workload::Fixed { batch, seq } => fixed_batches(batch, seq, WARMUP + steps, p.vocab),
        Workload::Realistic { batch } => realistic_batches(batch, WARMUP + steps, p.vocab),
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Model FLOPs per token of a LoRA step at sequence length `seq`: forward 2·N plus the
/// activation gradients 2·N through the frozen matmuls (no weight gradients), attention scores
/// and values 4·s·h per layer each way, and the LM head. LoRA's own matmuls are negligible at
/// these ranks.
fn flops_per_token(p: &Preset, seq: usize) -> f64 {
    let (h, per_layer, layers, head) = match &p.arch {
        Arch::Llama(s) => {
            let h = s.hidden_size as f64;
            let kv = (s.num_key_value_heads * (s.hidden_size / s.num_attention_heads)) as f64;
            let per_layer = h * h * 2.0 + h * kv * 2.0 + 3.0 * h * s.intermediate_size as f64;
            (h, per_layer, s.num_hidden_layers as f64, h * p.vocab as f64)
        }
        Arch::Bert(s) => {
            let h = s.hidden_size as f64;
            let per_layer = 4.0 * h * h + 2.0 * h * s.intermediate_size as f64;
            (h, per_layer, s.num_hidden_layers as f64, 0.0)
        }
    };
    4.0 * (per_layer * layers + head) + 2.0 * 4.0 * seq as f64 * h * layers
}

fn lora_for(p: &Preset) -> LoraSpec {
    let targets: Vec<String> = match p.arch {
        Arch::Llama(_) => flywheel_trainer::LLAMA_PROJECTIONS
            .map(String::from)
            .to_vec(),
        Arch::Bert(_) => flywheel_trainer::BERT_PROJECTIONS
            .map(String::from)
            .to_vec(),
    };
    LoraSpec {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: targets,
        use_rslora: false,
    }
}

fn ours(p: &Preset, steps: usize, compute: Compute) -> serde_json::Value {
    let dir = model_dir(p);
    let lora = lora_for(p);
    let r: StepBench = match (&p.arch, &p.workload) {
        (Arch::Bert(_), Workload::Fixed { batch, seq }) => {
            bench_classifier_steps(&dir, &lora, LABELS, *batch, *seq, WARMUP, steps, 0, compute)
        }
        (Arch::Bert(_), Workload::Realistic { .. }) => unreachable!("no realistic BERT preset"),
        (Arch::Llama(_), _) => bench_sft_steps(&dir, &lora, &batches(p, steps), WARMUP, 0, compute),
    }
    .expect("bench");
    serde_json::json!({
        "tokens_per_s": r.tokens_per_second,
        "median_step_s": r.median_step_seconds,
        "peak_rss_mb": peak_rss_mib(),
        "trainable": r.trainable_parameters,
        "final_loss": r.losses.last(),
    })
}

/// GFLOP/s of a large f32 matmul on this machine, through the backend our side runs on.
fn matmul_limit(device: &str) -> f64 {
    use burn::tensor::{Device, Distribution, Tensor};
    let device = match device {
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(Default::default()),
        _ => Device::flex(),
    };
    let n = 1024;
    let a = Tensor::<2>::random([n, n], Distribution::Default, &device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, &device);
    // Reading the values, not just `into_data`: on a GPU that only queues the read-back.
    let product = || {
        a.clone()
            .matmul(b.clone())
            .into_data()
            .try_into_vec::<f32>()
    };
    product().expect("f32 product");
    let reps = 8;
    let started = std::time::Instant::now();
    for _ in 0..reps {
        product().expect("f32 product");
    }
    2.0 * (n as f64).powi(3) * reps as f64 / started.elapsed().as_secs_f64() / 1e9
}

struct Scripts {
    python: String,
    /// `shared/bench/peft_lora_bench.py`: the fixed Llama shapes.
    shared: PathBuf,
    /// `peft_bench.py` beside this file: MiniLM and the realistic run.
    ours: PathBuf,
}

fn peft(scripts: &Scripts, p: &Preset, dtype: &str, steps: usize) -> Option<serde_json::Value> {
    let common = [
        "--steps".to_string(),
        steps.to_string(),
        "--warmup".into(),
        WARMUP.to_string(),
        "--dtype".into(),
        dtype.into(),
    ];
    let mut args: Vec<String> = match (&p.arch, &p.workload) {
        (Arch::Llama(_), Workload::Fixed { batch, seq }) => vec![
            scripts.shared.display().to_string(),
            "--preset".into(),
            p.name.into(),
            "--batch".into(),
            batch.to_string(),
            "--seq".into(),
            seq.to_string(),
        ],
        (Arch::Bert(_), Workload::Fixed { batch, seq }) => vec![
            scripts.ours.display().to_string(),
            "--task".into(),
            "classify".into(),
            "--model-dir".into(),
            model_dir(p).display().to_string(),
            "--labels".into(),
            LABELS.to_string(),
            "--batch".into(),
            batch.to_string(),
            "--seq".into(),
            seq.to_string(),
        ],
        (_, Workload::Realistic { .. }) => {
            let rows = std::env::temp_dir().join(format!("flywheel-bench-{}.json", p.name));
            let batches: Vec<serde_json::Value> = batches(p, steps)
                .iter()
                .map(|rows| {
                    rows.iter()
                        .map(|e| serde_json::json!({"ids": e.ids, "completion_start": e.completion_start}))
                        .collect()
                })
                .collect();
            let json = serde_json::json!({"warmup": WARMUP, "batches": batches});
            std::fs::write(&rows, json.to_string()).expect("writing the rows");
            vec![
                scripts.ours.display().to_string(),
                "--task".into(),
                "sft".into(),
                "--model-dir".into(),
                model_dir(p).display().to_string(),
                "--rows".into(),
                rows.display().to_string(),
            ]
        }
    };
    args.extend(common);
    python_json(&scripts.python, &args, &format!("peft ({dtype})"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = arg(&args, "--steps").map_or(6, |s| s.parse().expect("--steps N"));
    let device = arg(&args, "--device").unwrap_or_else(|| "cpu".into());
    flywheel_trainer::use_accelerator(device.parse().expect("--device cpu|wgpu"))
        .expect("--device");
    // Child mode: one measurement, one JSON line.
    if let Some(name) = arg(&args, "--child") {
        let p = presets()
            .into_iter()
            .find(|p| p.name == name)
            .expect("known preset");
        let compute = arg(&args, "--compute").map_or(Compute::Float32, |c| {
            c.parse().expect("--compute float32|bfloat16")
        });
        println!("{}", ours(&p, steps, compute));
        return;
    }
    let which = arg(&args, "--preset").unwrap_or_else(|| "all".into());
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scripts = Scripts {
        python: arg(&args, "--python").unwrap_or_else(|| "python3".into()),
        shared: arg(&args, "--peft-script")
            .map(PathBuf::from)
            .unwrap_or_else(|| here.join("../../shared/bench/peft_lora_bench.py")),
        ours: here.join("benches/peft_bench.py"),
    };
    let torch = python_json(
        &scripts.python,
        &[
            scripts.ours.display().to_string(),
            "--task".into(),
            "matmul".into(),
        ],
        "torch matmul",
    );
    let limit = |key: &str| {
        torch
            .as_ref()
            .and_then(|t| t[key].as_f64())
            .map_or("-".into(), |v| format!("{v:.0}"))
    };
    println!(
        "machine: {} threads; matmul 1024³ GFLOP/s: {} f32 {:.0}, torch f32 {}, torch bf16 {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if device == "wgpu" { "wgpu" } else { "flex" },
        matmul_limit(&device),
        limit("f32_gflops"),
        limit("bf16_gflops"),
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11} {:>11} {:>9}",
        "preset",
        "ours f32",
        "ours bf16",
        "peft f32",
        "peft bf16",
        "f32/f32",
        "best/best",
        "ours MiB",
        "peft MiB",
        "GFLOP/s"
    );
    let bf16 = Compute::Bfloat16.is_available();
    if !bf16 {
        println!("(bf16 is the CPU's AMX path, absent here or on a GPU: our bf16 column is empty)");
    }
    for p in presets()
        .into_iter()
        .filter(|p| which == "all" || which == p.name)
    {
        // Written here, before either side runs, so neither times the writing.
        model_dir(&p);
        let ours_f32 = Some(our_child(&p, steps, "float32", &device));
        let ours_bf16 = bf16.then(|| our_child(&p, steps, "bfloat16", &device));
        let peft_f32 = peft(&scripts, &p, "float32", steps);
        let peft_bf16 = peft(&scripts, &p, "bfloat16", steps);
        let tps =
            |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v["tokens_per_s"].as_f64());
        let best = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let ours_best = best(tps(&ours_f32), tps(&ours_bf16));
        let rss = |v: &Option<serde_json::Value>, key: &str| {
            v.as_ref()
                .and_then(|v| v[key].as_f64())
                .map_or("-".into(), |m| format!("{m:.0}"))
        };
        // Achieved rate on the fixed shapes; a realistic batch's FLOPs depend on its packing.
        let gflops = match (&p.workload, ours_best) {
            (Workload::Fixed { seq, .. }, Some(t)) => {
                format!("{:.1}", flops_per_token(&p, *seq) * t / 1e9)
            }
            _ => "-".into(),
        };
        let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        println!(
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11} {:>11} {:>9}",
            p.name,
            show(tps(&ours_f32)),
            show(tps(&ours_bf16)),
            show(tps(&peft_f32)),
            show(tps(&peft_bf16)),
            ratio(tps(&ours_f32), tps(&peft_f32)),
            ratio(ours_best, best(tps(&peft_f32), tps(&peft_bf16))),
            format!(
                "{}/{}",
                rss(&ours_f32, "peak_rss_mb"),
                rss(&ours_bf16, "peak_rss_mb")
            ),
            format!(
                "{}/{}",
                rss(&peft_f32, "peak_rss_mib"),
                rss(&peft_bf16, "peak_rss_mib")
            ),
            gflops,
        );
    }
}

/// One measurement of ours in a child process, so its peak RSS is its own.
fn our_child(p: &Preset, steps: usize, compute: &str, device: &str) -> serde_json::Value {
    let exe = std::env::current_exe().expect("own path");
    let child = Command::new(exe)
        .args(["--child", p.name, "--steps", &steps.to_string()])
        .args(["--compute", compute, "--device", device])
        .output()
        .expect("child");
    String::from_utf8_lossy(&child.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("our run failed: {}", String::from_utf8_lossy(&child.stderr)))
}
