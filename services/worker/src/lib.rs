//! The background half of flywheel: the scheduler that decides when a domain trains, and the
//! queue workers that run each job's stages (train → evaluate → publish) through apalis.
//!
//! This crate moves data between the database, local work directories and the registry, and
//! hands the heavy lifting to the trainer and evaluator on compute threads that yield the CPU
//! to everything else in the process (`compute`). It knows nothing
//! of HTTP, and moves `production` only through `flywheel-promotion`.

mod compute;
mod hyper;
mod ingest;
mod pipeline;
mod publish;
mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use flywheel_db::Db;
use flywheel_domain::{IngestTask, JobId, StageTask};
use flywheel_registry::Registry;
use flywheel_telemetry::Metrics;
use sqlx::{PgPool, SqlitePool};
use tokio::sync::{Notify, watch};

pub use scheduler::schedule_once;

/// Queue names are explicit: apalis defaults to the Rust type path, and a rename would strand
/// queued jobs.
pub const TRAIN_QUEUE: &str = "flywheel.train";
pub const EVALUATE_QUEUE: &str = "flywheel.evaluate";
pub const PUBLISH_QUEUE: &str = "flywheel.publish";
/// Polls of ingestion sources ([`IngestTask`]).
pub const INGEST_QUEUE: &str = "flywheel.ingest";
pub const ALL_QUEUES: [&str; 4] = [TRAIN_QUEUE, EVALUATE_QUEUE, PUBLISH_QUEUE, INGEST_QUEUE];

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Db(#[from] flywheel_db::DbError),
    #[error(transparent)]
    Registry(#[from] flywheel_registry::RegistryError),
    #[error(transparent)]
    Train(#[from] flywheel_trainer::TrainerError),
    #[error(transparent)]
    Eval(#[from] flywheel_evaluator::EvalError),
    #[error(transparent)]
    Promotion(#[from] flywheel_promotion::PromotionError),
    #[error("queue: {0}")]
    Queue(String),
    #[error("{0}")]
    Job(String),
    // The cause is in the message and deliberately not a `source`: error reporters that walk
    // the chain would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl WorkerError {
    /// Whether a stage that failed this way should be tried again after a pause: the database,
    /// the store or the queue was unreachable or busy. Bad input, a bad model or a failed
    /// check never are.
    pub fn is_transient(&self) -> bool {
        match self {
            WorkerError::Db(e) => e.is_transient(),
            WorkerError::Registry(e) => e.is_transient(),
            WorkerError::Promotion(e) => e.is_transient(),
            WorkerError::Queue(_) => true,
            _ => false,
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `backoff` runs out: after the n-th
/// transient failure it waits `backoff[n]` (calling `on_retry` first) and tries again.
pub async fn retry_transient<T, F, Fut>(
    backoff: &[Duration],
    mut attempt: F,
    mut on_retry: impl FnMut(&WorkerError, Duration),
) -> Result<T, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WorkerError>>,
{
    let mut waits = backoff.iter();
    loop {
        match attempt().await {
            Err(e) if e.is_transient() => match waits.next() {
                Some(&wait) => {
                    on_retry(&e, wait);
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            },
            other => return other,
        }
    }
}

/// Knobs of the background work.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Work directories (`jobs/<id>/`) and the champion cache live here.
    pub data_dir: PathBuf,
    /// How often the scheduler looks for domains to train, besides being nudged.
    pub scheduler_interval: Duration,
    /// How often idle queue workers poll.
    pub poll_interval: Duration,
    /// How often queue workers prove they are alive. apalis-sqlite 1.0 also re-fetches on each
    /// heartbeat, and after a worker finishes a task that is sometimes the only fetch it does
    /// (measured: a stage waited 25 s of the default 30 s), so keep it short.
    pub heartbeat_interval: Duration,
    /// Epochs per training run; `None` keeps the task's default.
    pub epochs: Option<usize>,
    /// What the serving fleet accepts; adapters beyond it are not published.
    pub serving: flywheel_evaluator::ServingLimits,
    /// The queues this process works ([`TRAIN_QUEUE`] …): a GPU pool takes only training.
    pub queues: Vec<String>,
    /// Whether this process runs the scheduler. Exactly one process of a deployment should.
    pub scheduler: bool,
    /// A running job whose worker has not proved itself alive for this long goes back to the
    /// queue (its worker died); workers prove it every third of this.
    pub job_lease: Duration,
    /// How many times a job may be started before a lost worker fails it for good.
    pub max_attempts: i64,
    /// Stage tasks each queue worker runs at once. Training saturates a machine's cores (or
    /// its GPU), so one is the default.
    pub slots: usize,
    /// Pauses before retrying a stage that failed transiently; their number is the retries.
    pub retry_backoff: Vec<Duration>,
    /// Training saves a checkpoint (staged in the registry) every this many optimizer steps,
    /// and a job whose worker died resumes from the newest; 0 turns checkpoints off.
    pub checkpoint_every_steps: usize,
    /// Precision of the base model's frozen products while training.
    pub compute: flywheel_trainer::Compute,
    /// The longest text a correction read from a source may hold (the API's limit).
    pub max_text_chars: usize,
}

impl WorkerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            scheduler_interval: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(2),
            epochs: None,
            serving: Default::default(),
            queues: ALL_QUEUES.map(str::to_owned).to_vec(),
            scheduler: true,
            job_lease: Duration::from_secs(120),
            max_attempts: 3,
            slots: 1,
            retry_backoff: [1, 5, 25].map(Duration::from_secs).to_vec(),
            checkpoint_every_steps: 50,
            compute: flywheel_trainer::Compute::Float32,
            max_text_chars: 16_384,
        }
    }
}

/// Everything a stage needs. Shared by all workers.
pub struct Context {
    pub db: Db,
    pub registry: Registry,
    pub metrics: Metrics,
    pub config: WorkerConfig,
    /// Reads ingestion sources for the `flywheel.ingest` queue.
    pub ingestor: flywheel_ingest::Ingestor,
    queues: Queues,
}

/// Where the job queue lives: beside flywheel's tables, in the same database.
#[derive(Clone, Debug)]
pub enum QueueDb {
    /// A pool of its own: apalis switches its connections to `synchronous = OFF`, which must
    /// never acknowledge client data.
    Sqlite(SqlitePool),
    /// apalis keeps its tables in the `apalis` schema.
    Postgres(PgPool),
}

#[derive(Clone)]
struct Stages<S> {
    train: S,
    evaluate: S,
    publish: S,
}

impl<S: Clone> Stages<S> {
    fn new(storage: impl Fn(&str) -> S) -> Self {
        Self {
            train: storage(TRAIN_QUEUE),
            evaluate: storage(EVALUATE_QUEUE),
            publish: storage(PUBLISH_QUEUE),
        }
    }

    fn of(&self, queue: &str) -> S {
        match queue {
            TRAIN_QUEUE => self.train.clone(),
            EVALUATE_QUEUE => self.evaluate.clone(),
            _ => self.publish.clone(),
        }
    }
}

#[derive(Clone)]
enum Queues {
    Sqlite(Stages<SqliteStorage<StageTask>>, SqliteStorage<IngestTask>),
    Postgres(
        Stages<PostgresStorage<StageTask>>,
        PostgresStorage<IngestTask>,
    ),
}

impl Context {
    /// Sets up the queue's tables (apalis migrates them itself).
    pub async fn new(
        db: Db,
        registry: Registry,
        metrics: Metrics,
        config: WorkerConfig,
        queue: QueueDb,
    ) -> Result<Arc<Self>, WorkerError> {
        let queue_error = |e: &dyn std::fmt::Display| WorkerError::Queue(e.to_string());
        let beat = config.heartbeat_interval;
        // One arm per backend: each storage is its own type.
        macro_rules! stages {
            ($pool:expr, $variant:ident, $storage:ident, $config:ty) => {{
                $storage::setup(&$pool).await.map_err(|e| queue_error(&e))?;
                Queues::$variant(
                    Stages::new(|queue| {
                        $storage::new(&$pool)
                            .with_config(<$config>::default().queue(queue).heartbeat_interval(beat))
                    }),
                    $storage::new(&$pool).with_config(
                        <$config>::default()
                            .queue(INGEST_QUEUE)
                            .heartbeat_interval(beat),
                    ),
                )
            }};
        }
        let queues = match queue {
            QueueDb::Sqlite(pool) => stages!(pool, Sqlite, SqliteStorage, apalis_sqlite::Config),
            QueueDb::Postgres(pool) => {
                stages!(pool, Postgres, PostgresStorage, apalis_postgres::Config)
            }
        };
        let ingestor = flywheel_ingest::Ingestor {
            db: db.clone(),
            metrics: metrics.clone(),
            scratch: config.data_dir.join("scratch").join("ingest"),
            max_text_chars: config.max_text_chars,
            lease: config.job_lease,
        };
        Ok(Arc::new(Self {
            db,
            registry,
            metrics,
            config,
            ingestor,
            queues,
        }))
    }

    pub(crate) async fn enqueue(&self, queue: &str, job: &JobId) -> Result<(), WorkerError> {
        // One attempt: a stage that fails marks its job failed; retrying bad input helps nobody.
        let task = TaskBuilder::new(StageTask {
            job_id: job.clone(),
        })
        .max_attempts(1)
        .build();
        let pushed = match &self.queues {
            Queues::Sqlite(stages, _) => stages
                .of(queue)
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
            Queues::Postgres(stages, _) => stages
                .of(queue)
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
        };
        pushed.map_err(WorkerError::Queue)
    }

    /// Hands a claimed source's poll to the ingest queue.
    pub(crate) async fn enqueue_poll(
        &self,
        domain: &str,
        source: &str,
        claim: String,
    ) -> Result<(), WorkerError> {
        let task = TaskBuilder::new(IngestTask {
            domain: domain.to_owned(),
            source: source.to_owned(),
            claim,
        })
        .max_attempts(1)
        .build();
        let pushed = match &self.queues {
            Queues::Sqlite(_, ingest) => ingest
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
            Queues::Postgres(_, ingest) => ingest
                .clone()
                .push_task(task)
                .await
                .map_err(|e| e.to_string()),
        };
        pushed.map_err(WorkerError::Queue)
    }
}

/// Runs the scheduler (if configured) and one worker per configured queue until `shutdown`
/// flips to true.
pub async fn run(
    ctx: Arc<Context>,
    nudge: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    compute::init_pool();
    let scheduler = ctx
        .config
        .scheduler
        .then(|| tokio::spawn(scheduler::run(ctx.clone(), nudge, shutdown.clone())));
    let poll = ctx.config.poll_interval;
    let slots = ctx.config.slots.max(1);
    let mut monitor = Monitor::new();
    // apalis registers workers by name and refuses a name it still holds: a restarted process
    // (or a second replica) must not reuse one, or its workers die at start.
    let instance = uuid::Uuid::new_v4().simple().to_string();
    // One registration for either backend (each storage is its own type) and each stage
    // (each stage function is its own type).
    macro_rules! register {
        ($backend:expr, $name:expr, $stage:path) => {{
            let backend = $backend.clone();
            let (name, ctx) = ($name, ctx.clone());
            monitor.register(move |_| {
                WorkerBuilder::new(name.clone())
                    .backend(backend.clone().poll_with_interval(poll))
                    .concurrency(slots)
                    .data(ctx.clone())
                    .build($stage)
            })
        }};
    }
    macro_rules! worker {
        ($name:literal, $storage:ident, $stage:path) => {{
            let name = format!("{}-{}", $name, &instance[..12]);
            monitor = match &ctx.queues {
                Queues::Sqlite(stages, _) => register!(stages.$storage, name, $stage),
                Queues::Postgres(stages, _) => register!(stages.$storage, name, $stage),
            };
        }};
    }
    for queue in &ctx.config.queues {
        match queue.as_str() {
            TRAIN_QUEUE => worker!("flywheel-train", train, pipeline::train),
            EVALUATE_QUEUE => worker!("flywheel-evaluate", evaluate, pipeline::evaluate),
            PUBLISH_QUEUE => worker!("flywheel-publish", publish, publish::publish),
            INGEST_QUEUE => {
                let name = format!("flywheel-ingest-{}", &instance[..12]);
                monitor = match &ctx.queues {
                    Queues::Sqlite(_, ingest) => register!(ingest, name, ingest::poll),
                    Queues::Postgres(_, ingest) => register!(ingest, name, ingest::poll),
                };
            }
            other => return Err(WorkerError::Queue(format!("unknown queue `{other}`"))),
        }
    }
    if ctx.config.queues.iter().any(|q| q == INGEST_QUEUE) {
        // Downloads a dead poll left behind: nothing reads them any more.
        let _ = std::fs::remove_dir_all(&ctx.ingestor.scratch);
    }
    let mut stop = shutdown.clone();
    let result = if ctx.config.queues.is_empty() {
        let _ = stop.wait_for(|s| *s).await;
        Ok(())
    } else {
        monitor
            .run_with_signal(async move {
                let _ = stop.wait_for(|s| *s).await;
                Ok(())
            })
            .await
    };
    if let Some(scheduler) = scheduler {
        let _ = scheduler.await;
    }
    result.map_err(|e| WorkerError::Queue(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Runs [`retry_transient`] (three retries) over an attempt that fails with `error` its
    /// first `failures` times; returns the result, the attempts made and the retries announced.
    async fn retried(
        failures: usize,
        error: fn() -> WorkerError,
    ) -> (Result<usize, WorkerError>, usize, usize) {
        let calls = Cell::new(0);
        let retries = Cell::new(0);
        let result = retry_transient(
            &[Duration::ZERO; 3],
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n <= failures { Err(error()) } else { Ok(n) } }
            },
            |_, _| retries.set(retries.get() + 1),
        )
        .await;
        (result, calls.get(), retries.get())
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_permanent_ones_are_not() {
        let refused = || WorkerError::Queue("connection refused".into());
        let (result, calls, retries) = retried(2, refused).await;
        assert_eq!((result.unwrap(), calls, retries), (3, 3, 2));

        let empty = || WorkerError::Job("the holdout is empty".into());
        let (result, calls, _) = retried(usize::MAX, empty).await;
        assert_eq!((result.is_err(), calls), (true, 1));

        // Out of retries: the last error comes back.
        let (result, calls, _) = retried(usize::MAX, refused).await;
        assert_eq!((result.is_err(), calls), (true, 4));
    }
}
