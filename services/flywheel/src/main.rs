use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flywheel::client::{Remote, RemoteArgs};

/// flywheel: keeps small language models learning from their corrections.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where an instance keeps its files.
#[derive(Args)]
struct DataDir {
    /// Where the database, registry and work files live.
    #[arg(long, env = "FLYWHEEL_DATA_DIR", default_value = ".flywheel")]
    data_dir: PathBuf,
}

/// The instance's database.
#[derive(Args)]
struct Database {
    /// The database: a SQLite file (path or `sqlite://` URL) or a `postgres://` URL.
    /// Default: `<data-dir>/flywheel.db`.
    #[arg(long, env = "FLYWHEEL_DATABASE", value_parser = parse_database)]
    database: Option<flywheel_db::DatabaseUrl>,
}

/// The instance's model registry.
#[derive(Args)]
struct RegistryArgs {
    /// The model registry: a path, or an `s3://bucket/prefix`, `gs://…` or `az://…` URL
    /// (credentials from the store's usual environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT, …).
    /// Default: `<data-dir>/registry`.
    #[arg(long, env = "FLYWHEEL_REGISTRY")]
    registry: Option<String>,
    /// Set to false only for a store without conditional writes, and then run a single
    /// writer: alias moves fall back to check-then-put.
    #[arg(
        long,
        env = "FLYWHEEL_REGISTRY_CONDITIONAL_WRITES",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    registry_conditional_writes: bool,
}

/// An instance's configuration from the flags a command takes (the rest at their defaults).
fn config(
    data: DataDir,
    database: Option<Database>,
    registry: Option<RegistryArgs>,
) -> flywheel::Config {
    let mut config = flywheel::Config::new(data.data_dir);
    config.database = database.and_then(|d| d.database);
    if let Some(registry) = registry {
        config.registry = registry.registry;
        config.registry_options.push((
            flywheel_registry::CONDITIONAL_WRITES.into(),
            registry.registry_conditional_writes.to_string(),
        ));
    }
    config
}

/// Where training runs: the flags of the commands that train.
#[derive(Args)]
struct Device {
    /// Where training and evaluation run: `cpu`, or `wgpu` (GPUs; builds with
    /// `--features wgpu`).
    #[arg(long, env = "FLYWHEEL_DEVICE", default_value = "cpu", value_parser = ["cpu", "wgpu"])]
    device: String,
    /// Precision of the base model's frozen products while training: `float32`, or `bfloat16`
    /// (several times faster on CPUs with AMX, Intel Xeon 4th generation and later).
    #[arg(long, env = "FLYWHEEL_COMPUTE", default_value = "float32", value_parser = ["float32", "bfloat16"])]
    compute: String,
}

impl Device {
    /// Selects the device for this process and sets `config`'s precision.
    fn apply(self, config: &mut flywheel::Config) -> anyhow::Result<()> {
        flywheel_trainer::use_accelerator(self.device.parse()?).context("--device")?;
        let compute: flywheel_trainer::Compute = self.compute.parse()?;
        compute.ensure_available().context("--compute")?;
        config.worker.compute = compute;
        Ok(())
    }
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the API, the workers and the scheduler.
    Serve {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        database: Database,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        device: Device,
        /// Log lines as `text` (coloured only on a terminal) or `json` (one object per line).
        #[arg(long, env = "FLYWHEEL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
        /// The address to serve on, host:port (`0.0.0.0:8080` for every interface).
        #[arg(long, env = "FLYWHEEL_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// What this process runs: `api`, `scheduler` (one per deployment), and the queues
        /// it works: `train`, `evaluate`, `publish`, `ingest` (polls of the domains'
        /// sources). Without `api` it serves only /healthz and /metrics.
        #[arg(
            long,
            env = "FLYWHEEL_ROLES",
            value_delimiter = ',',
            default_value = "api,scheduler,train,evaluate,publish,ingest",
            value_parser = ["api", "scheduler", "train", "evaluate", "publish", "ingest"]
        )]
        roles: Vec<String>,
        /// The largest LoRA rank the serving fleet loads (vLLM --max-lora-rank); larger
        /// adapters are not published.
        #[arg(long, env = "FLYWHEEL_MAX_LORA_RANK", default_value_t = 64)]
        max_lora_rank: usize,
        /// `required`: every API call but /healthz and /metrics needs a bearer token.
        /// `off`: anyone on the network is admin — for a laptop only.
        #[arg(long, env = "FLYWHEEL_AUTH", default_value = "required", value_parser = ["required", "off"])]
        auth: String,
        /// Stage tasks each queue worker of this process runs at once.
        #[arg(long, env = "FLYWHEEL_SLOTS", default_value_t = 1)]
        slots: usize,
        /// A running job whose worker is silent this long goes back to the queue.
        #[arg(long, env = "FLYWHEEL_JOB_LEASE_SECONDS", default_value_t = 120)]
        job_lease_seconds: u64,
        /// Training saves a checkpoint (staged in the registry) every this many steps; a job
        /// whose worker died resumes from the newest. 0: no checkpoints.
        #[arg(long, env = "FLYWHEEL_CHECKPOINT_EVERY_STEPS", default_value_t = 50)]
        checkpoint_every_steps: usize,
        /// An admin token accepted from the first start on (stored hashed).
        #[arg(long, env = "FLYWHEEL_BOOTSTRAP_ADMIN_TOKEN", hide_env_values = true)]
        bootstrap_admin_token: Option<String>,
        /// A bearer token that /metrics then asks for (it names every domain); unset, /metrics
        /// is open to whoever reaches the port.
        #[arg(long, env = "FLYWHEEL_METRICS_TOKEN", hide_env_values = true)]
        metrics_token: Option<String>,
        /// MiB of model weights kept resident for /predict; past it, the least recently used
        /// domain's model is dropped (and loaded again when next asked).
        #[arg(long, env = "FLYWHEEL_SERVING_MEMORY_MIB", default_value_t = 4096)]
        serving_memory_mib: u64,
        /// How /predict multiplies: `auto` is bfloat16 on a CPU with AMX tiles (answers
        /// within bf16 rounding of float32's, several times faster), else float32.
        #[arg(long, env = "FLYWHEEL_SERVING_COMPUTE", default_value = "auto",
              value_parser = ["auto", "float32", "bfloat16"])]
        serving_compute: String,
        /// POST every domain's events here (versions awaiting approval, promoted, held back,
        /// rejected, rollbacks, failed jobs): repeat it, or separate URLs with commas.
        #[arg(long = "webhook", env = "FLYWHEEL_WEBHOOKS", value_delimiter = ',')]
        webhooks: Vec<String>,
        /// Signs webhook bodies (HMAC-SHA256, `X-Flywheel-Signature: sha256=<hex>`).
        #[arg(long, env = "FLYWHEEL_WEBHOOK_SECRET", hide_env_values = true)]
        webhook_secret: Option<String>,
        /// The console's address as people reach it (behind your ingress), for the links in
        /// webhook events; by default the listen address.
        #[arg(long, env = "FLYWHEEL_PUBLIC_URL")]
        public_url: Option<String>,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        database: Database,
    },
    /// Run the whole loop on the bundled Banking77 slice and print what it produced.
    Demo {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        device: Device,
        /// Serve instead: rounds of queries to /predict, the uncertain ones escalated to a
        /// stand-in teacher whose answers train the next version; prints the share escalated
        /// per round.
        #[arg(long = "loop")]
        serving_loop: bool,
    },
    /// Copy the embedded (SQLite) database, while it runs, to a file or an object store.
    /// For PostgreSQL use pg_dump (README: Backups).
    Backup {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        database: Database,
        /// A file, or an `s3://bucket/key`, `gs://…` or `az://…` URL; it must not exist yet.
        to: String,
    },
    /// Put a backup in place of the embedded database. Stop every flywheel process of the
    /// instance first.
    Restore {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        database: Database,
        /// The backup: a file, or an `s3://…`, `gs://…` or `az://…` URL.
        from: String,
        /// Replace an existing database (it is kept beside, renamed `….replaced-<time>`).
        #[arg(long)]
        force: bool,
    },
    /// Send corrections from a JSONL or CSV file to a running server, streamed.
    Import {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        args: flywheel::commands::import::ImportArgs,
    },
    /// API tokens: create, list, scope, revoke (admin).
    Tokens {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: flywheel::commands::tokens::TokensCommand,
    },
    /// Domains: create, list, show, edit, policy history.
    Domains {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: flywheel::commands::domains::DomainsCommand,
    },
    /// Fine-tune jobs: list, start, watch, cancel.
    Jobs {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: flywheel::commands::jobs::JobsCommand,
    },
    /// Versions: list, report, approve, reject, override, reevaluate, rollback, audit.
    Versions {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: flywheel::commands::versions::VersionsCommand,
    },
    /// Aliases: show, move, history.
    Aliases {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: flywheel::commands::aliases::AliasesCommand,
    },
    /// Base-model utilities.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Copy a Hugging Face model directory into the registry, content-addressed, and print
    /// the `sha256:…` reference a domain's `base_model` uses.
    Import {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        registry: RegistryArgs,
        /// The model directory (config.json, model.safetensors or shards, tokenizer.json).
        dir: PathBuf,
    },
    /// Write a tiny random-init model (config.json, model.safetensors, tokenizer.json) whose
    /// tokenizer is trained on the given corpus (CSV or JSONL corrections; the bundled
    /// Banking77 slice if omitted).
    InitTiny {
        /// Output directory.
        dir: PathBuf,
        /// Corrections (CSV or JSONL) whose texts train the tokenizer.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// `bert` (an encoder, for classification) or `llama` (a causal LM, for generation).
        #[arg(long, default_value = "bert", value_parser = ["bert", "llama"])]
        arch: String,
    },
    /// Write a Llama-family model as one GGUF file for llama.cpp and Ollama: a published
    /// version (its adapter folded into its base model), or a local model directory.
    Export {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        registry: RegistryArgs,
        /// The domain whose version to export (with VERSION).
        #[arg(required_unless_present = "base", requires = "version")]
        domain: Option<String>,
        /// The published version (`v3`).
        version: Option<String>,
        /// Instead of a published version: a model directory…
        #[arg(long, conflicts_with = "domain")]
        base: Option<PathBuf>,
        /// …and, optionally, a PEFT adapter directory to fold into it.
        #[arg(long, requires = "base")]
        adapter: Option<PathBuf>,
        /// The file to write.
        #[arg(long, short)]
        out: PathBuf,
        /// The file format.
        #[arg(long, default_value = "gguf", value_parser = ["gguf"])]
        format: String,
        /// How the matrices are stored: `f16`, or `q8_0` (8-bit blocks, about half the size).
        #[arg(long, default_value = "f16", value_parser = ["f16", "q8_0"])]
        quant: String,
    },
    /// Fold a LoRA adapter (a published version's directory, or any PEFT adapter) into its
    /// base model and write a full Hugging Face checkpoint, for runtimes that serve no
    /// adapters.
    Merge {
        /// The base model directory the adapter was trained on.
        base: PathBuf,
        /// The adapter directory (adapter_config.json, adapter_model.safetensors).
        adapter: PathBuf,
        /// Output directory.
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // The demo talks to the user on stdout; the server's own log would drown it.
    let (level, format) = match &cli.command {
        Command::Serve { log_format, .. } => ("info", log_format.parse().unwrap_or_default()),
        Command::Migrate { .. } => ("info", Default::default()),
        _ => ("warn", Default::default()),
    };
    flywheel_telemetry::init_logging(level, format);
    if let Err(e) = run(cli).await {
        if e.is::<flywheel::commands::ClosedPipe>() {
            return;
        }
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, each cause once: libraries often repeat their
/// source in their own message, and the chain would say it again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            data,
            database,
            registry,
            device,
            log_format: _,
            listen,
            roles,
            max_lora_rank,
            auth,
            bootstrap_admin_token,
            metrics_token,
            job_lease_seconds,
            checkpoint_every_steps,
            slots,
            serving_memory_mib,
            serving_compute,
            webhooks,
            webhook_secret,
            public_url,
        } => {
            let mut config = config(data, Some(database), Some(registry));
            device.apply(&mut config)?;
            config.notify.webhooks = webhooks;
            config.notify.secret = webhook_secret.filter(|s| !s.trim().is_empty());
            config.notify.public_url = public_url.unwrap_or_default();
            config.serving_memory_mib = serving_memory_mib;
            if serving_compute != "auto" {
                let compute: flywheel_trainer::Compute = serving_compute.parse()?;
                compute.ensure_available().context("--serving-compute")?;
                config.serving_compute = Some(compute);
            }
            config.worker.slots = slots;
            config.worker.checkpoint_every_steps = checkpoint_every_steps;
            config.worker.job_lease = std::time::Duration::from_secs(job_lease_seconds.max(3));
            config.auth = if auth == "off" {
                flywheel_api::AuthMode::Off
            } else {
                flywheel_api::AuthMode::Required
            };
            config.bootstrap_admin_token = bootstrap_admin_token;
            config.metrics_token = metrics_token;
            config.api = roles.iter().any(|r| r == "api");
            config.worker.scheduler = roles.iter().any(|r| r == "scheduler");
            config.worker.queues = roles
                .iter()
                .filter(|r| !matches!(r.as_str(), "api" | "scheduler"))
                .map(|r| format!("flywheel.{r}"))
                .collect();
            config.worker.serving.max_rank = max_lora_rank;
            config.limits.max_lora_rank = max_lora_rank;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| {
                    format!("--listen {listen}: give host:port, such as 127.0.0.1:8080")
                })?;
            let running = flywheel::start(config, listener).await?;
            shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await
        }
        Command::Migrate { data, database } => {
            let config = config(data, Some(database), None);
            flywheel::open_db(&config).await?;
            println!("database {} is up to date", config.database().redacted());
            Ok(())
        }
        Command::Demo {
            data,
            device,
            serving_loop,
        } => {
            let mut config = config(data, None, None);
            device.apply(&mut config)?;
            if serving_loop {
                flywheel::demo_loop::run(&config.data_dir.join("demo-loop")).await
            } else {
                flywheel::demo::run(&config.data_dir.join("demo")).await
            }
        }
        Command::Backup { data, database, to } => {
            let config = config(data, Some(database), None);
            let bytes = flywheel::backup::backup(&config, &to).await?;
            println!(
                "backed up {} to {to} ({:.1} MB)",
                config.database().redacted(),
                bytes as f64 / 1e6
            );
            Ok(())
        }
        Command::Restore {
            data,
            database,
            from,
            force,
        } => {
            let config = config(data, Some(database), None);
            let restored = flywheel::backup::restore(&config, &from, force).await?;
            println!("{restored}");
            Ok(())
        }
        Command::Import { remote, args } => {
            flywheel::commands::import::run(&Remote::new(&remote)?, args).await
        }
        Command::Tokens { remote, command } => {
            flywheel::commands::tokens::run(&Remote::new(&remote)?, command).await
        }
        Command::Domains { remote, command } => {
            flywheel::commands::domains::run(&Remote::new(&remote)?, command).await
        }
        Command::Jobs { remote, command } => {
            flywheel::commands::jobs::run(&Remote::new(&remote)?, command).await
        }
        Command::Versions { remote, command } => {
            flywheel::commands::versions::run(&Remote::new(&remote)?, command).await
        }
        Command::Aliases { remote, command } => {
            flywheel::commands::aliases::run(&Remote::new(&remote)?, command).await
        }
        Command::Models {
            command:
                ModelsCommand::Import {
                    data,
                    registry,
                    dir,
                },
        } => {
            let config = config(data, None, Some(registry));
            let registry = config.open_registry()?;
            let model = registry
                .import_model(&dir)
                .await
                .with_context(|| format!("importing {}", dir.display()))?;
            let bytes: u64 = model.files.iter().map(|f| f.bytes).sum();
            println!(
                "{} ({}, {} files, {:.1} MB) in {}",
                model.reference(),
                model.model_type.as_deref().unwrap_or("unknown model_type"),
                model.files.len(),
                bytes as f64 / 1e6,
                registry.url()
            );
            Ok(())
        }
        Command::Models {
            command:
                ModelsCommand::Export {
                    data,
                    registry,
                    domain,
                    version,
                    base,
                    adapter,
                    out,
                    format: _,
                    quant,
                },
        } => {
            let quant: flywheel_trainer::GgufQuant = quant.parse()?;
            let written = match (base, domain, version) {
                (Some(base), _, _) => {
                    flywheel::export::local(&base, adapter.as_deref(), &out, quant).await?
                }
                (None, Some(domain), Some(version)) => {
                    let config = config(data, None, Some(registry));
                    flywheel::export::published_version(&config, &domain, &version, &out, quant)
                        .await?
                }
                _ => anyhow::bail!("name DOMAIN VERSION, or --base DIR"),
            };
            println!(
                "{} ({} tensors, {:.1} MB)",
                out.display(),
                written.tensors,
                written.bytes as f64 / 1e6
            );
            Ok(())
        }
        Command::Models {
            command: ModelsCommand::Merge { base, adapter, out },
        } => {
            let files =
                flywheel_trainer::export_merged(&base, &adapter, &out).with_context(|| {
                    format!("merging {} into {}", adapter.display(), base.display())
                })?;
            println!("{}: {}", out.display(), files.join(", "));
            Ok(())
        }
        Command::Models {
            command: ModelsCommand::InitTiny { dir, corpus, arch },
        } => {
            let rows = match corpus {
                Some(path) => flywheel::read_corrections(&path)?,
                None => flywheel::csv_corrections(flywheel::BANKING77_MINI)?,
            };
            // The tokenizer should know the answers' words as well as the inputs'.
            let texts: Vec<String> = rows
                .iter()
                .flat_map(|r| [r["input"].as_str(), r["expected"].as_str()])
                .flatten()
                .map(str::to_owned)
                .collect();
            let model = if arch == "llama" {
                flywheel::init_tiny_llama(&dir, &texts)?
            } else {
                flywheel::init_tiny_model(&dir, &texts)?
            };
            println!(
                "wrote {} ({} parameters, vocabulary of {})",
                dir.display(),
                model.parameters,
                model.vocab_size
            );
            Ok(())
        }
    }
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn parse_database(raw: &str) -> Result<flywheel_db::DatabaseUrl, String> {
    flywheel_db::DatabaseUrl::parse(raw).map_err(|e| e.to_string())
}
