//! The flywheel process: wires the database, registry, API, workers and scheduler together,
//! and the command-line tasks (demo, import, model set-up) that drive them.
//!
//! This crate owns composition and the CLI's user-facing behaviour; the work itself lives in
//! the libraries. `start` takes its listener and shutdown signal so tests can bind port 0.

pub mod backup;
pub mod client;
pub mod commands;
pub mod demo;
pub mod demo_loop;
pub mod export;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flywheel_api::{AppState, AuthMode, Limits};
use flywheel_db::{DatabaseUrl, Db};
use flywheel_registry::Registry;
use flywheel_telemetry::Metrics;
use flywheel_worker::WorkerConfig;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// The embedded Banking77 slice the demo and tests train on (see data/NOTICE.md).
pub const BANKING77_MINI: &str = include_str!("../data/banking77-mini.csv");

/// Where a flywheel instance keeps its state, and which parts of flywheel it runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub worker: WorkerConfig,
    pub limits: Limits,
    /// The registry: a path or an `s3://`, `gs://`, `az://` URL; `None` is
    /// `<data_dir>/registry`.
    pub registry: Option<String>,
    /// Extra registry options (object_store keys such as `aws_endpoint`, and
    /// `conditional_writes`); credentials usually come from the environment instead.
    pub registry_options: Vec<(String, String)>,
    /// Whether this process serves the public API; without it, only `/healthz` and
    /// `/metrics` (for probes and scraping) are served.
    pub api: bool,
    /// The database: a SQLite file or a PostgreSQL URL; `None` is `<data_dir>/flywheel.db`.
    pub database: Option<DatabaseUrl>,
    /// Whether API calls need a token. Required unless a caller turns it off (the demo does).
    pub auth: AuthMode,
    /// An admin token to accept from the first start on (stored hashed), so a fresh install
    /// has a way in.
    pub bootstrap_admin_token: Option<String>,
    /// A bearer token `/metrics` asks for; `None` leaves it open, as Prometheus expects by
    /// default.
    pub metrics_token: Option<String>,
    /// Resident serving models past this many MiB of weights evict the least recently used.
    pub serving_memory_mib: u64,
    /// How often serving looks up a resident model's alias again (a moved alias takes effect
    /// within about this long).
    pub serving_refresh: std::time::Duration,
    /// How serving multiplies; `None` is bfloat16 where the CPU has AMX tiles, else float32.
    pub serving_compute: Option<flywheel_trainer::Compute>,
    /// Webhooks, run where the scheduler runs. An empty `public_url` becomes
    /// `http://<listen address>`.
    pub notify: flywheel_notify::NotifyConfig,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            worker: WorkerConfig::new(data_dir.clone()),
            data_dir,
            limits: Limits::default(),
            registry: None,
            registry_options: Vec::new(),
            api: true,
            database: None,
            auth: AuthMode::Required,
            bootstrap_admin_token: None,
            metrics_token: None,
            serving_memory_mib: 4096,
            serving_refresh: std::time::Duration::from_secs(1),
            serving_compute: None,
            notify: flywheel_notify::NotifyConfig::new(String::new()),
        }
    }

    pub fn open_registry(&self) -> anyhow::Result<Registry> {
        let location = self
            .registry
            .clone()
            .unwrap_or_else(|| self.registry_dir().display().to_string());
        Registry::open(&location, &self.registry_options)
            .with_context(|| format!("opening the registry at {location}"))
    }
    pub fn database(&self) -> DatabaseUrl {
        self.database
            .clone()
            .unwrap_or_else(|| DatabaseUrl::Sqlite(self.data_dir.join("flywheel.db")))
    }
    pub fn registry_dir(&self) -> PathBuf {
        self.data_dir.join("registry")
    }
}

/// A running instance: API, workers and scheduler.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub registry: Registry,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// SQLite: held shared while the instance runs (see [`backup::instance_lock`]).
    _instance_lock: Option<std::fs::File>,
}

impl Running {
    /// Stops accepting requests, lets in-flight work finish, and waits for everything.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.context("task panicked")??;
        }
        Ok(())
    }
}

pub async fn open_db(config: &Config) -> anyhow::Result<Db> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let url = config.database();
    Db::open(&url)
        .await
        .with_context(|| format!("opening database {}", url.redacted()))
}

/// The job queue's own connections, to the same database.
async fn open_queue(url: &DatabaseUrl) -> anyhow::Result<flywheel_worker::QueueDb> {
    let queue = match url {
        // A pool of its own: apalis turns `synchronous` off on its connections.
        DatabaseUrl::Sqlite(path) => flywheel_worker::QueueDb::Sqlite(
            SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(
                    SqliteConnectOptions::new()
                        .filename(path)
                        .busy_timeout(Duration::from_secs(30)),
                )
                .await?,
        ),
        DatabaseUrl::Postgres(url) => flywheel_worker::QueueDb::Postgres(
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(30))
                .connect(url)
                .await?,
        ),
    };
    Ok(queue)
}

/// Starts everything on `listener`; the instance runs until [`Running::shutdown`].
pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<Running> {
    let instance_lock = match config.database() {
        DatabaseUrl::Sqlite(path) => Some(backup::hold_shared(&path)?),
        DatabaseUrl::Postgres(_) => None,
    };
    let db = open_db(&config).await?;
    let registry = config.open_registry()?;
    let metrics = Metrics::new();
    let queue = open_queue(&config.database())
        .await
        .context("opening the queue database")?;
    let mut worker = config.worker.clone();
    worker.max_text_chars = config.limits.max_text_chars;
    let ctx =
        flywheel_worker::Context::new(db.clone(), registry.clone(), metrics.clone(), worker, queue)
            .await
            .context("setting up the job queue")?;
    let nudge = Arc::new(Notify::new());
    let (stop, stopped) = watch::channel(false);
    let addr = listener.local_addr()?;
    if let Some(token) = &config.bootstrap_admin_token {
        // A secret pasted with a trailing newline or spaces could never be sent back as is.
        let token = token.trim();
        anyhow::ensure!(
            token.len() >= 16,
            "FLYWHEEL_BOOTSTRAP_ADMIN_TOKEN must be at least 16 characters (without surrounding \
             spaces): generate one with `openssl rand -hex 32`"
        );
        let hash = flywheel_domain::auth::hash_token(token);
        // Retired first: the new token takes the old one's name, unique among live tokens.
        let retired = db
            .retire_bootstrap_tokens(&hash)
            .await
            .context("retiring earlier bootstrap admin tokens")?;
        db.create_token(
            "bootstrap-admin",
            flywheel_domain::Role::Admin,
            &[],
            &hash,
            "bootstrap",
        )
        .await
        .context("storing the bootstrap admin token")?;
        if retired > 0 {
            tracing::info!(
                retired,
                "a new bootstrap admin token retired the earlier one"
            );
        }
    }
    if config.api && config.auth == AuthMode::Required {
        let tokens = db.tokens().await.context("reading tokens")?;
        if !tokens
            .iter()
            .any(|t| t.role == flywheel_domain::Role::Admin && t.revoked_at.is_none())
        {
            tracing::warn!(
                "auth is required and no admin token exists: set FLYWHEEL_BOOTSTRAP_ADMIN_TOKEN \
                 to let the platform team in (or --auth off on a laptop)"
            );
        }
    }
    let serving = flywheel_serving::Serving::start(
        db.clone(),
        registry.clone(),
        metrics.clone(),
        nudge.clone(),
        flywheel_serving::ServingConfig {
            cache_dir: config.data_dir.join("cache"),
            memory_budget_bytes: config.serving_memory_mib.saturating_mul(1 << 20),
            refresh: config.serving_refresh,
            max_batch: 64,
            max_text_chars: config.limits.max_text_chars,
            compute: config.serving_compute.unwrap_or_else(|| {
                let bf16 = flywheel_trainer::Compute::Bfloat16;
                if bf16.is_available() {
                    bf16
                } else {
                    flywheel_trainer::Compute::Float32
                }
            }),
        },
    );
    let state = AppState {
        serving,
        db,
        registry: registry.clone(),
        metrics,
        nudge: nudge.clone(),
        limits: config.limits.clone(),
        auth: config.auth,
        deployment_gauges: config.worker.scheduler,
        metrics_token_hash: config
            .metrics_token
            .as_deref()
            .map(|t| flywheel_domain::auth::hash_token(t.trim())),
    };
    let mut tasks = Vec::new();
    if config.worker.scheduler {
        let mut notify = config.notify.clone();
        for url in &notify.webhooks {
            flywheel_domain::check_webhook_url(url)
                .map_err(|why| anyhow::anyhow!("--webhook {url}: {why}"))?;
        }
        if notify.public_url.is_empty() {
            if !notify.webhooks.is_empty() {
                tracing::warn!(
                    %addr,
                    "webhook events link to this process's own address: set FLYWHEEL_PUBLIC_URL \
                     to where people reach the console"
                );
            }
            notify.public_url = format!("http://{addr}");
        }
        if notify.secret.is_none() && !notify.webhooks.is_empty() {
            tracing::warn!(
                "webhooks go unsigned: set FLYWHEEL_WEBHOOK_SECRET so receivers can check them"
            );
        }
        let notifier =
            flywheel_notify::Notifier::new(state.db.clone(), state.metrics.clone(), notify);
        let stop = stopped.clone();
        tasks.push(tokio::spawn(async move {
            notifier.run(stop).await;
            Ok(())
        }));
    }
    let mut api_stop = stopped.clone();
    let surface = if config.api {
        flywheel_api::Surface::Full
    } else {
        flywheel_api::Surface::Ops
    };
    let api = tokio::spawn(async move {
        flywheel_api::serve(listener, state, surface, async move {
            let _ = api_stop.wait_for(|s| *s).await;
        })
        .await
        .context("serving the API")
    });
    let workers = tokio::spawn(async move {
        flywheel_worker::run(ctx, nudge, stopped)
            .await
            .context("running the workers")
    });
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "flywheel is up");
    Ok(Running {
        addr,
        registry,
        stop,
        tasks: [api, workers].into_iter().chain(tasks).collect(),
        _instance_lock: instance_lock,
    })
}

/// Writes a tiny random-init BERT, with a tokenizer trained on `texts`, into `dir`.
pub fn init_tiny_model(
    dir: &Path,
    texts: &[String],
) -> anyhow::Result<flywheel_trainer::tiny::TinyModel> {
    flywheel_trainer::tiny::init_tiny_bert(
        dir,
        texts.iter().map(String::as_str),
        &flywheel_trainer::tiny::TinyBertSpec::default(),
    )
    .with_context(|| format!("writing a tiny model to {}", dir.display()))
}

/// Writes a tiny random-init Llama, with a byte-level BPE tokenizer trained on `texts`, into `dir`.
pub fn init_tiny_llama(
    dir: &Path,
    texts: &[String],
) -> anyhow::Result<flywheel_trainer::tiny::TinyModel> {
    flywheel_trainer::tiny::init_tiny_llama(
        dir,
        texts.iter().map(String::as_str),
        &flywheel_trainer::tiny::TinyLlamaSpec::default(),
    )
    .with_context(|| format!("writing a tiny model to {}", dir.display()))
}

/// Rows of a `text,category`-style CSV or a JSONL file of correction objects, as JSON values
/// ready to POST.
pub fn read_corrections(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "csv") {
        csv_corrections(&raw).with_context(|| format!("parsing {}", path.display()))
    } else {
        raw.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))
            })
            .collect()
    }
}

/// CSV with a header: `input`/`text` and `expected`/`label`/`category` columns.
pub fn csv_corrections(raw: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut reader = csv::Reader::from_reader(raw.as_bytes());
    let (input, expected) = CsvHeader(reader.headers()?.clone()).required()?;
    reader
        .records()
        .map(|r| {
            let r = r?;
            Ok(serde_json::json!({ "input": &r[input], "expected": &r[expected] }))
        })
        .collect()
}

/// A corrections CSV's header: where its columns are, for every reader of corrections CSVs.
pub(crate) struct CsvHeader(pub(crate) csv::StringRecord);

impl CsvHeader {
    /// The first column named one of `names` (surrounding spaces ignored).
    pub(crate) fn column(&self, names: &[&str]) -> Option<usize> {
        self.0.iter().position(|h| names.contains(&h.trim()))
    }

    /// The `input` (or `text`) and `expected` (or `label`, `category`) columns, or an error
    /// naming the missing one and the header as read.
    pub(crate) fn required(&self) -> anyhow::Result<(usize, usize)> {
        let found = || self.0.iter().collect::<Vec<_>>().join(",");
        let input = self.column(&["input", "text"]).with_context(|| {
            format!(
                "the header needs an `input` (or `text`) column, comma-separated; it reads `{}`",
                found()
            )
        })?;
        let expected = self
            .column(&["expected", "label", "category"])
            .with_context(|| {
                format!(
                    "the header needs an `expected` (or `label`, `category`) column; it reads `{}`",
                    found()
                )
            })?;
        Ok((input, expected))
    }
}
