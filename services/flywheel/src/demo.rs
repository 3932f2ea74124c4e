//! `flywheel demo`: the whole loop on embedded defaults, driven over real HTTP the way a
//! department's app would drive it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{BANKING77_MINI, Config};

const DOMAIN: &str = "banking";

/// A clean `dir`, and the bundled slice: its rows, their texts, and the labels in order of
/// appearance.
pub(crate) fn fresh_start(dir: &Path) -> anyhow::Result<(Vec<Value>, Vec<String>, Vec<String>)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let rows = crate::csv_corrections(BANKING77_MINI)?;
    let texts: Vec<String> = rows
        .iter()
        .filter_map(|r| r["input"].as_str().map(str::to_owned))
        .collect();
    let mut labels: Vec<String> = Vec::new();
    for r in &rows {
        let l = r["expected"].as_str().unwrap_or_default().to_owned();
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    Ok((rows, texts, labels))
}

/// A config for a demo's instance under `dir`: no tokens (it lives on a loopback port for a
/// minute), and a scheduler that looks often.
pub(crate) fn demo_config(dir: &Path) -> Config {
    let mut config = Config::new(dir.to_owned());
    config.auth = flywheel_api::AuthMode::Off;
    config.worker.scheduler_interval = Duration::from_millis(300);
    config.worker.poll_interval = Duration::from_millis(200);
    config.worker.heartbeat_interval = Duration::from_millis(500);
    config
}

pub async fn run(dir: &Path) -> anyhow::Result<()> {
    let (rows, texts, labels) = fresh_start(dir)?;

    println!("1/5  creating a tiny base model (tokenizer trained on the domain's text)…");
    let model_dir = dir.join("models/tiny-bert");
    let model = crate::init_tiny_model(&model_dir, &texts)?;
    println!(
        "     {} parameters, vocabulary of {}",
        model.parameters, model.vocab_size
    );

    let config = demo_config(dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = crate::start(config, listener).await?;
    let base = format!("http://{}", running.addr);
    println!(
        "2/5  flywheel is serving on {base} (SQLite and registry under {})",
        dir.display()
    );

    let client = reqwest::Client::new();
    let domain = json!({
        "name": DOMAIN,
        "task": "classification",
        "base_model": model_dir.canonicalize()?.display().to_string(),
        "labels": labels,
        "policy": { "min_new_corrections": rows.len(), "holdout_fraction": 0.2, "min_accuracy": 0.5, "min_improvement": 0.05 }
    });
    expect(
        client
            .post(format!("{base}/v1/domains"))
            .json(&domain)
            .send()
            .await?,
        201,
    )
    .await?;
    println!(
        "3/5  registered domain `{DOMAIN}` with {} intents; sending {} corrections…",
        labels.len(),
        rows.len()
    );
    post_corrections(&client, &base, DOMAIN, &rows).await?;

    println!("4/5  the scheduler starts a LoRA fine-tune; the evaluator gates it…");
    let job = wait_for_job(&client, &base).await?;
    if job["status"] != "succeeded" {
        bail!(
            "job {} ended {}: {}",
            job["id"],
            job["status"],
            job["error"]
        );
    }

    let versions: Value = client
        .get(format!("{base}/v1/domains/{DOMAIN}/versions"))
        .send()
        .await?
        .json()
        .await?;
    let v = &versions["data"][0];
    let version = v["version"].as_str().context("no version was published")?;
    let name = flywheel_domain::DomainName::parse(DOMAIN)?;
    let vid = flywheel_domain::VersionId(version.to_owned());
    let m = &v["metrics"];
    println!("5/5  done.");
    println!();
    println!(
        "  decision:   {}",
        m["decision"]["reason"].as_str().unwrap_or("?")
    );
    println!(
        "  held-out accuracy: {:.1}% before (base model) → {:.1}% after ({} held-out corrections)",
        100.0 * m["champion_accuracy"].as_f64().unwrap_or(0.0),
        100.0 * m["candidate_accuracy"].as_f64().unwrap_or(0.0),
        m["holdout_size"]
    );
    println!(
        "  production: {}",
        versions["production"].as_str().unwrap_or("(unchanged)")
    );
    println!(
        "  adapter:    {}",
        running
            .registry
            .locate(&name, &vid, "adapter_model.safetensors")
    );
    println!(
        "  report:     {}",
        running.registry.locate(&name, &vid, "report.md")
    );
    running.shutdown().await
}

/// The JSON answer of `resp`, or an error saying what the server answered instead of `status`.
pub(crate) async fn expect(resp: reqwest::Response, status: u16) -> anyhow::Result<Value> {
    let got = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if got != status {
        bail!("server answered {got}: {body}");
    }
    Ok(body)
}

/// Sends `rows` as one NDJSON upload, so the scheduler treats them as one unit (no job trains
/// on part of them); returns how many were stored. Rows the server refused end it with one
/// line naming the first of them (numbered as sent, from 1): the rest are stored, and sending
/// the file again after fixing them stores nothing twice.
pub async fn post_corrections(
    client: &reqwest::Client,
    base: &str,
    domain: &str,
    rows: &[Value],
) -> anyhow::Result<usize> {
    let mut body = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut body, row).context("encoding a correction")?;
        body.push(b'\n');
    }
    let resp = client
        .post(format!("{base}/v1/domains/{domain}/corrections"))
        .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .send()
        .await
        .with_context(|| {
            format!("could not reach flywheel at {base} (is `flywheel serve` running there?)")
        })?;
    let status = resp.status().as_u16();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    if status == 401 {
        bail!(
            "the server wants an API token that may send corrections to `{domain}`: pass --token \
             or set FLYWHEEL_TOKEN ({})",
            answer["message"].as_str().unwrap_or("unauthenticated")
        );
    }
    if status != 202 {
        bail!(
            "the server refused the upload ({status} {}): {}",
            answer["code"].as_str().unwrap_or("?"),
            answer["message"].as_str().unwrap_or("no message")
        );
    }
    let stored = answer["accepted"].as_u64().unwrap_or(0) as usize;
    let refused = answer["rejected_total"].as_u64().unwrap_or(0);
    if refused > 0 {
        let first = &answer["rejected"][0];
        bail!(
            "{refused} of {} rows refused, the first row {} ({}: {}); the other rows were \
             stored — fix those rows and send the file again",
            rows.len(),
            first["line"],
            first["code"].as_str().unwrap_or("?"),
            first["message"].as_str().unwrap_or("")
        );
    }
    Ok(stored)
}

/// Starts a run of `domain` by hand and returns the job once it has ended, looking every two
/// seconds (the examples' way; the demo shows progress instead).
pub async fn run_job(client: &reqwest::Client, base: &str, domain: &str) -> anyhow::Result<Value> {
    let job: Value = client
        .post(format!("{base}/v1/domains/{domain}/jobs"))
        .json(&json!({}))
        .send()
        .await?
        .json()
        .await?;
    let id = job["id"]
        .as_str()
        .with_context(|| format!("no job was started: {job}"))?
        .to_owned();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let job: Value = client
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if has_ended(&job) {
            return Ok(job);
        }
    }
}

/// Whether a job has finished, one way or another.
pub(crate) fn has_ended(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

async fn wait_for_job(client: &reqwest::Client, base: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut progress = crate::commands::jobs::Progress::new();
    let mut after = 0;
    loop {
        if Instant::now() > deadline {
            bail!("no job finished within 30 minutes");
        }
        let jobs: Value = client
            .get(format!("{base}/v1/domains/{DOMAIN}/jobs"))
            .send()
            .await?
            .json()
            .await?;
        if let Some(id) = jobs["data"][0]["id"].as_str() {
            let events: Value = client
                .get(format!("{base}/v1/jobs/{id}/events?after={after}"))
                .send()
                .await?
                .json()
                .await?;
            for e in events["data"].as_array().into_iter().flatten() {
                after = e["id"].as_i64().unwrap_or(after);
                progress.show(e);
            }
            let job: Value = client
                .get(format!("{base}/v1/jobs/{id}"))
                .send()
                .await?
                .json()
                .await?;
            progress.stage(&job);
            if has_ended(&job) {
                progress.finish();
                return Ok(job);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
