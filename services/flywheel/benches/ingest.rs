//! Ingestion throughput and latency over real HTTP into SQLite and PostgreSQL, and the same
//! rows collected from a JSONL file by the ingest worker (a `files` source), each beside its
//! limit: a raw bulk-insert loop into the same schema of the same database. Not a test: it
//! prints numbers.
//!
//! eval "$(.ci/services)"   # PostgreSQL, for FLYWHEEL_TEST_POSTGRES
//! cargo bench -p flywheel --bench ingest [-- --rows 200000 --batch 1000 --singles 2000
//!     --pii off --database sqlite|postgres|both]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    rows: usize,
    batch: usize,
    singles: usize,
    concurrency: usize,
    /// The domain's PII action (`replace` is the default policy; `off` skips detection).
    pii: String,
    database: String,
}

fn args() -> Args {
    let mut a = Args {
        rows: 200_000,
        batch: 1_000,
        singles: 2_000,
        concurrency: 4,
        pii: "replace".into(),
        database: "both".into(),
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
            "--database" => a.database = pair[1].clone(),
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

/// Registers the bench's domain; anything but 201 is an error.
async fn create_domain(client: &reqwest::Client, base: &str, spec: &Value) -> anyhow::Result<()> {
    let status = client
        .post(format!("{base}/v1/domains"))
        .json(spec)
        .send()
        .await?
        .status();
    anyhow::ensure!(status == 201, "creating the domain: {status}");
    Ok(())
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

struct Figures {
    batched: f64,
    /// Rows per second from a `files` source: domain registered to every row stored.
    file: f64,
    raw: f64,
    p50: Duration,
    p99: Duration,
}

/// The limit: the same rows straight into the same schema with no HTTP, JSON, validation or
/// redaction: multi-row INSERTs of 100 rows in transactions of `batch` rows, committed as
/// durably as the server's own (`synchronous = FULL`; PostgreSQL's default commit).
macro_rules! raw_loop {
    ($pool:expr, $rows:expr, $batch:expr, $metadata:expr, $at:expr) => {{
        let pool = $pool;
        sqlx::query(
            "INSERT INTO domains (name, task, base_model, labels, policy, created_at)
             VALUES ('raw', 'classification', 'm', $1, $2, $3)",
        )
        .bind(sqlx::types::Json(json!([])))
        .bind(sqlx::types::Json(json!({})))
        .bind($at)
        .execute(&pool)
        .await?;
        let started = Instant::now();
        for batch in $rows.chunks($batch) {
            let mut tx = pool.begin().await?;
            for chunk in batch.chunks(100) {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO corrections (domain_id, client_id, content_hash, input, model_output,
                       expected, source, metadata, split, created_at) ",
                );
                q.push_values(chunk, |mut b, r| {
                    b.push_bind(1i64)
                        .push_bind(r["client_id"].as_str())
                        .push_bind(r["content_hash"].as_str())
                        .push_bind(r["input"].as_str())
                        .push_bind(r["model_output"].as_str())
                        .push_bind(r["expected"].as_str())
                        .push_bind("human")
                        .push_bind($metadata)
                        .push_bind("train")
                        .push_bind($at);
                });
                q.push(" ON CONFLICT DO NOTHING");
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        $rows.len() as f64 / started.elapsed().as_secs_f64()
    }};
}

/// The same rows as a JSONL file in a directory that a domain's `files` source reads: an
/// instance running only the scheduler and the ingest queue, timed from the domain's
/// registration (which hands the source its first poll) until the listing says every row is
/// stored. The file is written before the clock starts.
async fn from_a_file(
    args: &Args,
    which: &str,
    dir: &std::path::Path,
    model: &std::path::Path,
) -> anyhow::Result<f64> {
    let logs = dir.join(format!("logs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&logs)?;
    let mut jsonl = String::new();
    for i in 0..args.rows {
        jsonl += &row(i).to_string();
        jsonl.push('\n');
    }
    std::fs::write(logs.join("part-0001.jsonl"), jsonl)?;
    let mut config = flywheel::Config::new(dir.join("data-files"));
    config.database = Some(fresh_database(which, dir).await?);
    config.auth = flywheel_api::AuthMode::Off;
    config.worker.queues = vec![flywheel_worker::INGEST_QUEUE.to_owned()];
    config.worker.scheduler_interval = Duration::from_millis(100);
    config.worker.poll_interval = Duration::from_millis(50);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = flywheel::start(config, listener).await?;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let spec = json!({"name": "bench", "task": "classification",
        "base_model": model.display().to_string(), "labels": LABELS,
        "policy": {"min_new_corrections": 100_000_000, "pii": {"action": args.pii}},
        "sources": [{"name": "logs", "files": logs.display().to_string(),
            "mapping": {"input": "input", "expected": "expected", "client_id": "client_id",
                "model_output": "model_output"}}]});
    let started = Instant::now();
    create_domain(&client, &base, &spec).await?;
    loop {
        let listing: Value = client
            .get(format!("{base}/v1/domains/bench/sources"))
            .send()
            .await?
            .json()
            .await?;
        let totals = &listing["sources"][0]["totals"];
        if totals["done"] == 1 {
            anyhow::ensure!(
                totals["ingested"] == args.rows,
                "the file stored {} of {} rows",
                totals["ingested"],
                args.rows
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = args.rows as f64 / started.elapsed().as_secs_f64();
    running.shutdown().await?;
    Ok(rate)
}

/// A fresh database of the kind `which` names, in `dir` or on the test PostgreSQL server.
async fn fresh_database(
    which: &str,
    dir: &std::path::Path,
) -> anyhow::Result<flywheel_db::DatabaseUrl> {
    Ok(match which {
        "sqlite" => flywheel_db::DatabaseUrl::Sqlite(
            dir.join(format!("{}.db", uuid::Uuid::new_v4().simple())),
        ),
        _ => {
            let server = std::env::var("FLYWHEEL_TEST_POSTGRES").map_err(|_| {
                anyhow::anyhow!("the PostgreSQL half needs FLYWHEEL_TEST_POSTGRES: run eval \"$(.ci/services)\" first, or pass --database sqlite")
            })?;
            let name = format!("flywheel_bench_{}", uuid::Uuid::new_v4().simple());
            flywheel_db::DatabaseUrl::Postgres(
                flywheel_db::Db::create_postgres_database(&server, &name).await?,
            )
        }
    })
}

async fn measure(
    args: &Args,
    which: &str,
    dir: &std::path::Path,
    model: &std::path::Path,
) -> anyhow::Result<Figures> {
    let mut config = flywheel::Config::new(dir.join("data"));
    config.database = Some(fresh_database(which, dir).await?);
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
    create_domain(&client, &base, &spec).await?;

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
    let file = from_a_file(args, which, dir, model).await?;

    let raw_url = fresh_database(which, dir).await?;
    flywheel_db::Db::open(&raw_url).await?.close().await;
    // The rows as the server stores them: keyed by the same content hash (computed before
    // the clock starts: hashing is the server's work, not the database's).
    let rows: Vec<Value> = (0..args.rows)
        .map(|i| {
            let mut r = row(i);
            let hash = flywheel_domain::content_hash(
                r["input"].as_str().unwrap(),
                r["expected"].as_str().unwrap(),
            );
            r["content_hash"] = hash.into();
            r
        })
        .collect();
    let raw = match &raw_url {
        flywheel_db::DatabaseUrl::Sqlite(path) => {
            // Set up as the server's writer is: its page cache, and the WAL copied back by
            // another connection twice a second instead of by the committing one.
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full);
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(
                    options
                        .clone()
                        .pragma(
                            "cache_size",
                            format!("-{}", flywheel_db::SQLITE_WRITER_CACHE_KIB),
                        )
                        .pragma("wal_autocheckpoint", "0"),
                )
                .await?;
            let checkpointer = sqlx::SqlitePool::connect_with(options).await?;
            let background = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                        .execute(&checkpointer)
                        .await;
                }
            });
            let raw = raw_loop!(pool, rows, args.batch, "null", "2026-01-01T00:00:00Z");
            background.abort();
            raw
        }
        flywheel_db::DatabaseUrl::Postgres(url) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await?;
            let at: chrono::DateTime<chrono::Utc> = "2026-01-01T00:00:00Z".parse()?;
            raw_loop!(pool, rows, args.batch, sqlx::types::Json(Value::Null), at)
        }
    };
    Ok(Figures {
        batched,
        file,
        raw,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args();
    let dir = tempfile::tempdir()?;
    let texts: Vec<String> = LABELS.iter().map(|s| s.to_string()).collect();
    let model = dir.path().join("model");
    flywheel::init_tiny_model(&model, &texts)?;
    let databases: &[&str] = match args.database.as_str() {
        "sqlite" => &["sqlite"],
        "postgres" => &["postgres"],
        "both" => &["sqlite", "postgres"],
        other => anyhow::bail!("--database {other}: use sqlite, postgres or both"),
    };
    println!(
        "ingestion, {} rows in batches of {} ({} concurrent clients, PII {}), {} cores",
        args.rows,
        args.batch,
        args.concurrency,
        args.pii,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  {:<10} {:>16} {:>18} {:>14} {:>8} {:>8} {:>12} {:>12}",
        "database",
        "batched (rows/s)",
        "from a file (rows/s)",
        "raw (rows/s)",
        "http/raw",
        "file/raw",
        "single p50",
        "single p99"
    );
    for which in databases {
        let f = measure(&args, which, dir.path(), &model).await?;
        println!(
            "  {:<10} {:>16.0} {:>20.0} {:>14.0} {:>8.2} {:>8.2} {:>9.2} ms {:>9.2} ms",
            which,
            f.batched,
            f.file,
            f.raw,
            f.batched / f.raw,
            f.file / f.raw,
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
