//! Our logits for a token sequence, as JSON, for comparing other runtimes of an exported
//! model with ours (`.ci/gguf-check` runs llama.cpp on our GGUF export).
//!
//! cargo run --release -p flywheel-trainer --example logits -- MODEL_DIR [--adapter DIR] ID...
//!
//! Prints `{"vocab": V, "logits": [[...], ...]}`, one row per position.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().ok_or("MODEL_DIR first")?);
    let mut adapter = None;
    let mut ids = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--adapter" {
            adapter = Some(PathBuf::from(args.next().ok_or("--adapter DIR")?));
        } else {
            ids.push(arg.parse::<u32>()?);
        }
    }
    let generator = flywheel_trainer::Generator::load(&model, adapter.as_deref())?;
    let logits = generator.logits(&ids)?;
    let vocab = logits.len() / ids.len().max(1);
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    println!("{}", serde_json::json!({"vocab": vocab, "logits": rows}));
    Ok(())
}
