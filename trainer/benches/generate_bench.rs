//! Generation speed, ours against transformers + PEFT `generate` on the same model, adapter
//! shape and prompt, in one run: time to the first token and tokens/s after it, with our
//! key/value cache and (for the record) without it.
//!
//! cargo bench -p flywheel-trainer --bench generate_bench -- [--python python3]
//!     [--prompt-len 128] [--new-tokens 64] [--preset smollm2-135m|tiny]
//!
//! A SmolLM2-135M-shaped model with random weights (no model hub here): speed does not depend
//! on the weights. Greedy decoding of exactly `--new-tokens` tokens on both sides (no stop at
//! end of sequence), float32 and, where the CPU has AMX, bfloat16 on both sides, LoRA r 16 on all seven projections, unmerged. Not a test:
//! numbers go to stdout for people to read.

use std::path::PathBuf;

use flywheel_trainer::tiny::{TinyLlamaSpec, write_random_llama};
use flywheel_trainer::{Compute, GenerationBench, LoraSpec, bench_generation};

#[path = "support/peer.rs"]
mod peer;
use peer::python_json;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn spec(preset: &str) -> (TinyLlamaSpec, usize) {
    match preset {
        "tiny" => (
            TinyLlamaSpec {
                hidden_size: 64,
                intermediate_size: 172,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                max_position_embeddings: 512,
                vocab_size: 512,
                tie_word_embeddings: true,
                seed: 0,
            },
            512,
        ),
        _ => (
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
            },
            49152,
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let preset = arg(&args, "--preset").unwrap_or_else(|| "smollm2-135m".into());
    let prompt_len: usize = arg(&args, "--prompt-len").map_or(128, |s| s.parse().expect("N"));
    let new_tokens: usize = arg(&args, "--new-tokens").map_or(64, |s| s.parse().expect("N"));
    let (spec, vocab) = spec(&preset);
    let dir: PathBuf = std::env::temp_dir().join(format!("flywheel-generate-bench-{preset}"));
    if !dir.join("model.safetensors").exists() {
        write_random_llama(&dir, vocab, &spec).expect("writing the bench model");
    }
    let lora = LoraSpec {
        r: 16,
        alpha: 32.0,
        target_modules: flywheel_trainer::LLAMA_PROJECTIONS
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    // Token ids from a fixed LCG, clear of the special ids at the bottom of the vocabulary.
    let mut x: u64 = 77;
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            3 + ((x >> 33) % (vocab as u64 - 3)) as u32
        })
        .collect();
    let ours = |cached: bool, compute: Compute| -> GenerationBench {
        // A short warm-up run first: allocator and thread pool.
        bench_generation(&dir, &lora, &prompt, 2, cached, compute).expect("warm-up");
        bench_generation(&dir, &lora, &prompt, new_tokens, cached, compute).expect("generating")
    };
    println!(
        "generation, {preset}, prompt {prompt_len} tokens, {new_tokens} new tokens, LoRA r16 on 7 projections"
    );
    let bf16 = Compute::Bfloat16.ensure_available().is_ok();
    let cached = ours(true, Compute::Float32);
    let uncached = ours(false, Compute::Float32);
    let cached_bf16 = bf16.then(|| ours(true, Compute::Bfloat16));
    let peer = |dtype: &str| {
        let python = arg(&args, "--python")?;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peft_bench.py");
        let args: Vec<String> = [
            script.display().to_string(),
            "--task".into(),
            "generate".into(),
            "--dtype".into(),
            dtype.into(),
            "--model-dir".into(),
            dir.display().to_string(),
            "--prompt-len".into(),
            prompt_len.to_string(),
            "--new-tokens".into(),
            new_tokens.to_string(),
        ]
        .into();
        python_json(&python, &args, &format!("peer ({dtype})"))
    };
    let peer_f32 = peer("float32");
    let peer_bf16 = bf16.then(|| peer("bfloat16")).flatten();
    println!("| run | first token | tokens/s |");
    println!("|---|---:|---:|");
    let row = |name: &str, first: f64, rate: f64| {
        println!("| {name} | {:.1} ms | {rate:.1} |", first * 1e3)
    };
    let of_peer = |p: &serde_json::Value| {
        (
            p["first_token_seconds"].as_f64().unwrap_or(f64::NAN),
            p["tokens_per_second"].as_f64().unwrap_or(f64::NAN),
        )
    };
    row(
        "ours f32, KV cache",
        cached.first_token_seconds,
        cached.tokens_per_second,
    );
    row(
        "ours f32, no cache",
        uncached.first_token_seconds,
        uncached.tokens_per_second,
    );
    if let Some(b) = &cached_bf16 {
        row(
            "ours bf16 (AMX), KV cache",
            b.first_token_seconds,
            b.tokens_per_second,
        );
    }
    for (name, p) in [("peer f32", &peer_f32), ("peer bf16", &peer_bf16)] {
        if let Some(p) = p {
            let (first, rate) = of_peer(p);
            row(
                &format!("transformers + PEFT generate, {name}"),
                first,
                rate,
            );
        }
    }
    let ratio = |ours: &GenerationBench, p: &Option<serde_json::Value>, what: &str| {
        if let Some(p) = p {
            let (first, rate) = of_peer(p);
            println!(
                "ours/peer {what}: first token {:.2}× as fast, tokens/s {:.2}×",
                first / ours.first_token_seconds,
                ours.tokens_per_second / rate
            );
        }
    };
    ratio(&cached, &peer_f32, "f32");
    if let Some(b) = &cached_bf16 {
        ratio(b, &peer_bf16, "bf16");
        ratio(b, &peer_f32, "(our bf16, its f32)");
    }
    println!(
        "cache/no cache: tokens/s {:.2}×",
        cached.tokens_per_second / uncached.tokens_per_second
    );
}
