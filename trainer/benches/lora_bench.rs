//! LoRA training throughput, ours against PyTorch + PEFT on the same shapes in one run.
//!
//! cargo bench -p flywheel-trainer --bench lora_bench -- [--preset tiny|smollm2-135m|all]
//!     [--python python3] [--peft-script ../shared/bench/peft_lora_bench.py] [--steps N]
//!
//! Each measurement runs in a child process so its peak RSS is its own. PEFT runs in float32
//! and bfloat16 and the faster counts. Not a test: numbers go to stdout for people to read.

use std::path::{Path, PathBuf};
use std::process::Command;

use flywheel_trainer::tiny::{TinyLlamaSpec, write_random_llama};
use flywheel_trainer::{LoraSpec, bench_lora_steps};

struct Preset {
    name: &'static str,
    spec: TinyLlamaSpec,
    vocab: usize,
    batch: usize,
    seq: usize,
}

fn presets() -> Vec<Preset> {
    vec![
        Preset {
            name: "tiny",
            spec: TinyLlamaSpec {
                hidden_size: 64,
                intermediate_size: 172,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                max_position_embeddings: 256,
                vocab_size: 512,
                tie_word_embeddings: true,
                seed: 0,
            },
            vocab: 512,
            batch: 8,
            seq: 64,
        },
        Preset {
            name: "smollm2-135m",
            spec: TinyLlamaSpec {
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                max_position_embeddings: 2048,
                vocab_size: 49152,
                tie_word_embeddings: true,
                seed: 0,
            },
            vocab: 49152,
            batch: 4,
            seq: 128,
        },
    ]
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

/// Model FLOPs of one LoRA step: forward 2·N·T plus the activation gradients 2·N·T through the
/// frozen matmuls (no weight gradients), attention scores and values 4·s·h per token per
/// layer each way, and the head. LoRA's own matmuls are negligible at these ranks.
fn step_flops(p: &Preset) -> f64 {
    let s = &p.spec;
    let (h, f, l) = (
        s.hidden_size as f64,
        s.intermediate_size as f64,
        s.num_hidden_layers as f64,
    );
    let kv = (s.num_key_value_heads * (s.hidden_size / s.num_attention_heads)) as f64;
    let per_layer = h * h * 2.0 + h * kv * 2.0 + 3.0 * h * f;
    let tokens = (p.batch * p.seq) as f64;
    let matmul = 4.0 * (per_layer * l + h * p.vocab as f64) * tokens;
    let attention = 2.0 * 4.0 * p.seq as f64 * h * l * tokens;
    matmul + attention
}

fn ours(p: &Preset, steps: usize) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("flywheel-bench-{}", p.name));
    if !dir.join("model.safetensors").exists() {
        write_random_llama(&dir, p.vocab, &p.spec).expect("writing the bench model");
    }
    let lora = LoraSpec {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: flywheel_trainer::LLAMA_PROJECTIONS
            .map(String::from)
            .to_vec(),
        use_rslora: false,
    };
    let r = bench_lora_steps(&dir, &lora, p.batch, p.seq, 2, steps, 0).expect("bench");
    serde_json::json!({
        "tokens_per_s": r.tokens_per_second,
        "median_step_s": r.median_step_seconds,
        "peak_rss_mb": peak_rss_mib(),
        "trainable": r.trainable_parameters,
        "final_loss": r.losses.last(),
    })
}

/// GFLOP/s of a large f32 matmul on this machine, through the same backend.
fn matmul_limit() -> f64 {
    use burn::tensor::{Device, Distribution, Tensor};
    let device = Device::flex();
    let n = 1024;
    let a = Tensor::<2>::random([n, n], Distribution::Default, &device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, &device);
    let _ = a.clone().matmul(b.clone()).into_data();
    let reps = 8;
    let started = std::time::Instant::now();
    for _ in 0..reps {
        let _ = a.clone().matmul(b.clone()).into_data();
    }
    2.0 * (n as f64).powi(3) * reps as f64 / started.elapsed().as_secs_f64() / 1e9
}

fn peft(
    python: &str,
    script: &Path,
    p: &Preset,
    dtype: &str,
    steps: usize,
) -> Option<serde_json::Value> {
    let out = Command::new(python)
        .arg(script)
        .args([
            "--preset",
            p.name,
            "--batch",
            &p.batch.to_string(),
            "--seq",
            &p.seq.to_string(),
        ])
        .args([
            "--steps",
            &steps.to_string(),
            "--warmup",
            "2",
            "--dtype",
            dtype,
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "peft ({dtype}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = arg(&args, "--steps").map_or(6, |s| s.parse().expect("--steps N"));
    // Child mode: one measurement, one JSON line.
    if let Some(name) = arg(&args, "--child") {
        let p = presets()
            .into_iter()
            .find(|p| p.name == name)
            .expect("known preset");
        println!("{}", ours(&p, steps));
        return;
    }
    let which = arg(&args, "--preset").unwrap_or_else(|| "all".into());
    let python = arg(&args, "--python").unwrap_or_else(|| "python3".into());
    let script = arg(&args, "--peft-script")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/peft_lora_bench.py")
        });
    let limit = matmul_limit();
    println!(
        "machine: {} threads; f32 matmul (1024³, flex) {limit:.1} GFLOP/s",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<14} {:>12} {:>12} {:>12} {:>8} {:>10} {:>10} {:>9}",
        "preset", "ours tok/s", "peft f32", "peft bf16", "ratio", "ours MiB", "peft MiB", "GFLOP/s"
    );
    for p in presets()
        .into_iter()
        .filter(|p| which == "all" || which == p.name)
    {
        let exe = std::env::current_exe().expect("own path");
        let child = Command::new(exe)
            .args(["--child", p.name, "--steps", &steps.to_string()])
            .output()
            .expect("child");
        let ours: serde_json::Value = String::from_utf8_lossy(&child.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| {
                panic!("our run failed: {}", String::from_utf8_lossy(&child.stderr))
            });
        let f32 = peft(&python, &script, &p, "float32", steps);
        let bf16 = peft(&python, &script, &p, "bfloat16", steps);
        let tps =
            |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v["tokens_per_s"].as_f64());
        let best = [tps(&f32), tps(&bf16)]
            .into_iter()
            .flatten()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let ours_tps = ours["tokens_per_s"].as_f64().unwrap_or(0.0);
        let peft_rss = [&f32, &bf16]
            .into_iter()
            .flatten()
            .filter_map(|v| v["peak_rss_mib"].as_f64())
            .fold(f64::NAN, f64::min);
        let gflops = step_flops(&p) / ours["median_step_s"].as_f64().unwrap_or(f64::INFINITY) / 1e9;
        println!(
            "{:<14} {:>12.0} {:>12} {:>12} {:>8} {:>10.0} {:>10.0} {:>9.1}",
            p.name,
            ours_tps,
            tps(&f32).map_or("-".into(), |v| format!("{v:.0}")),
            tps(&bf16).map_or("-".into(), |v| format!("{v:.0}")),
            best.map_or("-".into(), |b| format!("{:.2}x", ours_tps / b)),
            ours["peak_rss_mb"].as_f64().unwrap_or(0.0),
            peft_rss,
            gflops,
        );
    }
}
