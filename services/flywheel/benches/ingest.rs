//! Ingestion throughput and latency over real HTTP into SQLite, beside the limit: a raw
//! bulk-insert loop into the same schema. Not a test: it prints numbers.
//!
//! cargo bench -p flywheel --bench ingest [-- --rows 200000 --batch 1000 --singles 2000 --pii off]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    rows: usize,
    batch: usize,
    singles: usize,
    concurrency: usize,
    /// The domain's PII action (`replace` is the default policy; `off` skips detection).
    pii: String,
}

fn args() -> Args {
    let mut a = Args {
        rows: 200_000,
        batch: 1_000,
        singles: 2_000,
        concurrency: 4,
        pii: "replace".into(),
    };
    let argv: Vec<String> = std::env::args().collect();
    for pair in argv.windows(2) {
        let value = || pair[1].parse().expect("a number");
        match pair[0].as_str() {
            "--rows" => a.rows = value(),
            "--batch" => a.batch = value(),
            "--singles" => a.singles = value(),
            "--concurrency" => a.concurrency = value(),
            "--pii" => a.pii = pair[1].clone(),
            _ => {}
        }
    }
    a
}

const LABELS: [&str; 4] = [
    "card_arrival",
    "pin_blocked",
    "exchange_rate",
    "refund_not_showing_up",
];

fn row(i: usize) -> Value {
    json!({
        "client_id": format!("c{i}"),
        "input": format!("customer {i} asks: my card has not arrived yet, what should I do about order {i}?"),
        "model_output": LABELS[(i + 1) % 4],
        "expected": LABELS[i % 4],
    })
}

/// POSTs one JSON body of corrections; anything but 202 is an error.
async fn send(client: &reqwest::Client, url: &str, body: String) -> anyhow::Result<()> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 202, "POST corrections: {}", resp.status());
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args();
    let dir = tempfile::tempdir()?;
    let texts: Vec<String> = LABELS.iter().map(|s| s.to_string()).collect();
    let model = dir.path().join("model");
    flywheel::init_tiny_model(&model, &texts)?;

    let mut config = flywheel::Config::new(dir.path().join("data"));
    config.auth = flywheel_api::AuthMode::Off;
    config.worker.queues.clear();
    config.worker.scheduler = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = flywheel::start(config, listener).await?;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let spec = json!({"name": "bench", "task": "classification",
        "base_model": model.display().to_string(), "labels": LABELS,
        "policy": {"min_new_corrections": 100_000_000, "pii": {"action": args.pii}}});
    let status = client
        .post(format!("{base}/v1/domains"))
        .json(&spec)
        .send()
        .await?
        .status();
    anyhow::ensure!(status == 201, "creating the domain: {status}");

    // Bodies are built before the clock starts: this measures the server.
    let bodies: Vec<String> = (0..args.rows)
        .collect::<Vec<_>>()
        .chunks(args.batch)
        .map(|c| serde_json::to_string(&c.iter().map(|&i| row(i)).collect::<Vec<_>>()).unwrap())
        .collect();
    let url = format!("{base}/v1/domains/bench/corrections");
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per_task = bodies.len().div_ceil(args.concurrency);
    for chunk in bodies.chunks(per_task) {
        let (client, url, chunk) = (client.clone(), url.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for body in chunk {
                send(&client, &url, body).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let batched = args.rows as f64 / started.elapsed().as_secs_f64();

    let mut latencies = Vec::with_capacity(args.singles);
    for i in 0..args.singles {
        let body = serde_json::to_string(&row(args.rows + i))?;
        let t = Instant::now();
        send(&client, &url, body).await?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    running.shutdown().await?;

    // The limit: the same rows straight into the same schema with no HTTP, JSON, validation or
    // redaction: multi-row INSERTs of 100 rows in transactions of `batch` rows,
    // synchronous = FULL like the server's own connections.
    let raw_db = flywheel_db::Db::open_sqlite(&dir.path().join("raw.db")).await?;
    drop(raw_db);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.path().join("raw.db"))
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full),
        )
        .await?;
    sqlx::query(
        "INSERT INTO domains (name, task, base_model, labels, policy, created_at)
         VALUES ('raw', 'classification', 'm', '[]', '{}', '2026-01-01T00:00:00Z')",
    )
    .execute(&pool)
    .await?;
    let rows: Vec<Value> = (0..args.rows).map(row).collect();
    let started = Instant::now();
    for batch in rows.chunks(args.batch) {
        let mut tx = pool.begin().await?;
        for chunk in batch.chunks(100) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO corrections (domain_id, client_id, content_hash, input, model_output,
                   expected, source, metadata, split, created_at) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(1i64)
                    .push_bind(r["client_id"].as_str())
                    .push_bind(r["client_id"].as_str())
                    .push_bind(r["input"].as_str())
                    .push_bind(r["model_output"].as_str())
                    .push_bind(r["expected"].as_str())
                    .push_bind("human")
                    .push_bind("null")
                    .push_bind("train")
                    .push_bind("2026-01-01T00:00:00Z");
            });
            q.push(" ON CONFLICT DO NOTHING");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    let raw = args.rows as f64 / started.elapsed().as_secs_f64();

    println!(
        "ingestion, SQLite, {} rows in batches of {} ({} concurrent clients, PII {}), {} cores",
        args.rows,
        args.batch,
        args.concurrency,
        args.pii,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  batched over HTTP:      {batched:>10.0} corrections/s");
    println!("  raw bulk-insert loop:   {raw:>10.0} rows/s");
    println!("  ratio batched / raw:    {:>10.2}", batched / raw);
    println!(
        "  single POST ({}):      p50 {:.2} ms, p99 {:.2} ms",
        args.singles,
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    Ok(())
}
