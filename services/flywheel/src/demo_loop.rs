//! `flywheel demo --loop`: the flywheel turning. An app asks `/predict` round after round; what
//! the small model is unsure of goes to a teacher (played here by a local OpenAI-compatible
//! endpoint that knows the bundled slice's labels), the teacher's answers become corrections,
//! the scheduler trains, and the share escalated falls.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use crate::demo::expect;

const DOMAIN: &str = "banking";
const ROUNDS: usize = 4;

pub async fn run(dir: &Path) -> anyhow::Result<()> {
    let (rows, texts, labels) = crate::demo::fresh_start(dir)?;
    let model_dir = dir.join("models/tiny-bert");
    crate::init_tiny_model(&model_dir, &texts)?;
    let teacher = start_teacher(&rows).await?;

    let config = crate::demo::demo_config(dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = crate::start(config, listener).await?;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let domain = json!({
        "name": DOMAIN,
        "task": "classification",
        "base_model": model_dir.canonicalize()?.display().to_string(),
        "labels": labels,
        "policy": {"min_new_corrections": 20, "holdout_fraction": 0.2, "min_accuracy": 0.3,
                   "min_improvement": 0.0, "target_accuracy": 0.75},
        "training": {"n_epochs": 16},
        "serving": {"teacher": {"url": teacher, "model": "demo-teacher"}},
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
        "flywheel on {base}; domain `{DOMAIN}` ({} intents) escalates to a teacher at {teacher}",
        labels.len()
    );
    println!("each round, an app asks about queries it has not asked before:\n");
    println!("round  queries  version  escalated  answered by the model (right)");

    let mut jobs_seen = 0;
    for round in 0..ROUNDS {
        // Two rows in five for the first round, one in five for each later one: every round
        // holds every intent, and the first teaches enough for a model worth promoting.
        let window: Vec<&Value> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| (i % 5).saturating_sub(1) == round)
            .map(|(_, r)| r)
            .collect();
        let (mut escalated, mut by_model, mut right) = (0, 0, 0);
        let mut version = String::from("—");
        for row in &window {
            let answer = expect(
                client
                    .post(format!("{base}/v1/domains/{DOMAIN}/predict"))
                    .json(&json!({"input": row["input"]}))
                    .send()
                    .await?,
                200,
            )
            .await?;
            if answer["escalated"] == true {
                escalated += 1;
            }
            if answer["answered_by"] == "model" {
                by_model += 1;
                right += usize::from(answer["output"] == row["expected"]);
            }
            if let Some(v) = answer["version"].as_str() {
                version = v.to_owned();
            }
        }
        println!(
            "{:>5}  {:>7}  {version:>7}  {:>8.0}%  {by_model:>3} ({right})",
            round + 1,
            window.len(),
            100.0 * escalated as f64 / window.len() as f64,
        );
        if round + 1 < ROUNDS {
            jobs_seen = wait_for_training(&client, &base, jobs_seen).await?;
        }
    }
    let stored: Value = client
        .get(format!(
            "{base}/v1/domains/{DOMAIN}/corrections?source=teacher&limit=1000"
        ))
        .send()
        .await?
        .json()
        .await?;
    println!(
        "\n{} of the teacher's answers were stored as corrections (source: teacher), under {}",
        stored["data"].as_array().map_or(0, Vec::len),
        dir.display()
    );
    running.shutdown().await
}

/// Waits for the scheduler's run on the last round's teacher answers, if one starts, and says
/// what the gate decided. Returns how many jobs the domain has had.
async fn wait_for_training(
    client: &reqwest::Client,
    base: &str,
    seen: usize,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(600);
    // The teacher's answers are written just behind the answers; the scheduler looks often.
    let started = Instant::now();
    loop {
        let jobs: Value = client
            .get(format!("{base}/v1/domains/{DOMAIN}/jobs"))
            .send()
            .await?
            .json()
            .await?;
        let jobs = jobs["data"].as_array().cloned().unwrap_or_default();
        if jobs.len() > seen {
            let job = &jobs[0];
            if crate::demo::has_ended(job) {
                println!(
                    "       the scheduler trained on the teacher's answers: {}",
                    job["decision"]["reason"]
                        .as_str()
                        .or(job["error"].as_str())
                        .unwrap_or("?")
                );
                return Ok(jobs.len());
            }
        } else if started.elapsed() > Duration::from_secs(5) {
            println!("       too few new corrections for a run");
            return Ok(seen);
        }
        if Instant::now() > deadline {
            bail!("the run did not finish within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// An OpenAI-compatible chat endpoint on a loopback port that answers each query with its
/// label in the bundled slice; returns its base URL.
async fn start_teacher(rows: &[Value]) -> anyhow::Result<String> {
    let gold: Arc<HashMap<String, String>> = Arc::new(
        rows.iter()
            .filter_map(|r| {
                Some((
                    r["input"].as_str()?.to_owned(),
                    r["expected"].as_str()?.to_owned(),
                ))
            })
            .collect(),
    );
    let chat = move |axum::Json(body): axum::Json<Value>| {
        let gold = gold.clone();
        async move {
            let question = body["messages"][1]["content"].as_str().unwrap_or_default();
            let answer = gold.get(question).cloned().unwrap_or_default();
            axum::Json(json!({
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
            }))
        }
    };
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}
