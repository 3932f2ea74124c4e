//! Telemetry of the flywheel process: every Prometheus metric it exports, and log set-up.
//!
//! All metrics live here, named `flywheel_<noun>_<unit>` — but for HTTP latency, named as
//! OpenTelemetry's HTTP conventions are in Prometheus (`http_server_request_duration_seconds`),
//! and the standard `process_*` collector — so one file answers "what do we measure". This crate records numbers; it does not serve them (the api crate does) nor
//! decide anything from them.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Handles on every metric. Cheap to clone; clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Corrections stored, by domain.
    pub corrections_ingested: IntCounterVec,
    /// Corrections not stored, by domain and reason (`duplicate` or an error code).
    pub corrections_rejected: IntCounterVec,
    pub corrections_redacted: IntCounterVec,
    /// Jobs by domain and state, refreshed on every scrape from the database.
    pub jobs: IntGaugeVec,
    /// Gate decisions, by domain and outcome (`promoted`, `held_back`).
    pub promotion_decisions: IntCounterVec,
    /// Wall time of pipeline stages, by domain, stage and outcome.
    pub stage_seconds: HistogramVec,
    /// HTTP request latency, by method, route and status code (OpenTelemetry's
    /// `http.server.request.duration`, as Prometheus spells it).
    pub http_server_request_duration: HistogramVec,
    /// Wall time of whole jobs, queued to finished, by domain and outcome.
    pub job_duration_seconds: HistogramVec,
    /// The latest training throughput and loss, by domain (updated as steps are reported).
    pub training_tokens_per_second: GaugeVec,
    pub training_loss: GaugeVec,
    /// Predictions answered, by domain and who answered (`model`, `teacher`).
    pub predictions: IntCounterVec,
    /// Predictions the small model was unsure of (or had no model for), by domain.
    pub prediction_escalations: IntCounterVec,
    /// The small model's confidence in its answers, by domain.
    pub prediction_confidence: HistogramVec,
    /// Wall time of a predict call, by domain.
    pub prediction_seconds: HistogramVec,
    /// Calls to a domain's teacher, by outcome (`ok` or why not).
    pub teacher_requests: IntCounterVec,
    pub teacher_request_seconds: HistogramVec,
    /// Model loads for serving, by domain and outcome.
    pub serving_model_loads: IntCounterVec,
    /// Models resident for serving.
    pub serving_models_resident: IntGaugeVec,
    /// Inputs a shadow alias's model also answered, by whether it agreed with the answer given.
    pub shadow_scores: IntCounterVec,
    /// Work serving let go to keep its memory bounded, by kind (`log`: records the database
    /// could not keep up with; `shadow`: requests not shadow-scored while the shadow was busy).
    pub serving_shed: IntCounterVec,
    /// Webhook delivery attempts, by event type and outcome (`delivered`, `failed`).
    pub webhook_deliveries: IntCounterVec,
    /// Database-derived gauges, set only by the process that runs the scheduler (one per
    /// deployment), so summing across pods counts each once.
    pub versions_pending_approval: IntGaugeVec,
    pub corrections_untrained: IntGaugeVec,
    pub webhook_deliveries_pending: IntGaugeVec,
    /// The version number production serves (`v7` is 7), and when production last moved.
    pub production_version: IntGaugeVec,
    pub production_moved_timestamp_seconds: IntGaugeVec,
    /// SQLite's write-ahead log, in bytes.
    pub database_wal_bytes: IntGaugeVec,
    /// Rows read from ingestion sources, by domain, source and outcome (`ingested`,
    /// `duplicate`, `rejected`, `dropped_pii`).
    pub source_rows: IntCounterVec,
    /// Polls of ingestion sources, by domain, source and outcome (`ok`, `failed`).
    pub source_polls: IntCounterVec,
    /// Seconds since a source was last read to its end (scheduler's process only).
    pub source_lag_seconds: IntGaugeVec,
    /// A source's files by state: `reading`, `done`, `quarantined`, `changed` (scheduler's
    /// process only).
    pub source_files: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let corrections_ingested = counter(
            "flywheel_corrections_ingested_total",
            "Corrections durably stored",
            &["domain"],
        );
        let corrections_rejected = counter(
            "flywheel_corrections_rejected_total",
            "Corrections not stored, by reason",
            &["domain", "reason"],
        );
        let corrections_redacted = counter(
            "flywheel_corrections_redacted_total",
            "Personal data found and redacted in stored corrections, by kind",
            &["domain", "kind"],
        );
        let promotion_decisions = counter(
            "flywheel_promotion_decisions_total",
            "Gate decisions on candidate adapters",
            &["domain", "outcome"],
        );
        let int_gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let jobs = int_gauge(
            "flywheel_jobs",
            "Fine-tuning jobs by state (from the database; exported by the scheduler's process only)",
            &["domain", "state"],
        );
        let versions_pending_approval = int_gauge(
            "flywheel_versions_pending_approval",
            "Versions awaiting a steward's approval (exported by the scheduler's process only)",
            &["domain"],
        );
        let corrections_untrained = int_gauge(
            "flywheel_corrections_untrained",
            "Corrections no job has trained on yet (exported by the scheduler's process only)",
            &["domain"],
        );
        let webhook_deliveries_pending = int_gauge(
            "flywheel_webhook_deliveries_pending",
            "Webhook deliveries not yet taken by their receiver (exported by the scheduler's process only)",
            &[],
        );
        let production_version = int_gauge(
            "flywheel_production_version",
            "The version number the production alias names, v7 being 7 (exported by the scheduler's process only)",
            &["domain"],
        );
        let production_moved_timestamp_seconds = int_gauge(
            "flywheel_production_moved_timestamp_seconds",
            "When the production alias last moved, Unix seconds (exported by the scheduler's process only)",
            &["domain"],
        );
        let database_wal_bytes = int_gauge(
            "flywheel_database_wal_bytes",
            "Size of the embedded SQLite database's write-ahead log (exported by the scheduler's process only)",
            &[],
        );
        let source_lag_seconds = int_gauge(
            "flywheel_source_lag_seconds",
            "Seconds since an ingestion source was last read to its end (exported by the scheduler's process only)",
            &["domain", "source"],
        );
        let source_files = int_gauge(
            "flywheel_source_files",
            "Files of an ingestion source by state (exported by the scheduler's process only)",
            &["domain", "source", "state"],
        );
        let source_rows = counter(
            "flywheel_source_rows_total",
            "Rows read from ingestion sources, by outcome",
            &["domain", "source", "outcome"],
        );
        let source_polls = counter(
            "flywheel_source_polls_total",
            "Polls of ingestion sources, by outcome",
            &["domain", "source", "outcome"],
        );
        let build_info = int_gauge(
            "flywheel_build_info",
            "Always 1; the labels say which build runs",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let stage_seconds = histogram(
            "flywheel_stage_seconds",
            "Wall time of a pipeline stage",
            &["domain", "stage", "outcome"],
            // 0.1 s to 3.6 h: long training runs land in a bucket, not +Inf.
            prometheus::exponential_buckets(0.1, 2.0, 18).expect("buckets"),
        );
        let http_server_request_duration = histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP requests served",
            &["method", "route", "code"],
            prometheus::exponential_buckets(0.0005, 2.0, 16).expect("buckets"),
        );
        let job_duration_seconds = histogram(
            "flywheel_job_duration_seconds",
            "Wall time of a fine-tuning job, from queued to finished",
            &["domain", "outcome"],
            prometheus::exponential_buckets(1.0, 2.0, 18).expect("buckets"),
        );
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["domain"]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let training_tokens_per_second = gauge(
            "flywheel_training_tokens_per_second",
            "Training throughput of the domain's latest reported step",
        );
        let training_loss = gauge(
            "flywheel_training_loss",
            "Training loss of the domain's latest reported step",
        );
        let predictions = counter(
            "flywheel_predictions_total",
            "Predictions answered, by who answered",
            &["domain", "answered_by"],
        );
        let prediction_escalations = counter(
            "flywheel_prediction_escalations_total",
            "Predictions below the escalation threshold, or without a model",
            &["domain"],
        );
        let prediction_confidence = histogram(
            "flywheel_prediction_confidence",
            "The small model's confidence in its answer",
            &["domain"],
            (1..=20).map(|i| f64::from(i) * 0.05).collect(),
        );
        let prediction_seconds = histogram(
            "flywheel_prediction_seconds",
            "Wall time of a predict call, teacher included",
            &["domain"],
            prometheus::exponential_buckets(0.0005, 2.0, 16).expect("buckets"),
        );
        let teacher_requests = counter(
            "flywheel_teacher_requests_total",
            "Calls to a domain's teacher model, by outcome",
            &["domain", "outcome"],
        );
        let teacher_request_seconds = histogram(
            "flywheel_teacher_request_seconds",
            "Wall time of a call to a teacher model, retries included",
            &["domain"],
            prometheus::exponential_buckets(0.005, 2.0, 14).expect("buckets"),
        );
        let serving_model_loads = counter(
            "flywheel_serving_model_loads_total",
            "Models loaded for serving, by outcome",
            &["domain", "outcome"],
        );
        let shadow_scores = counter(
            "flywheel_shadow_scores_total",
            "Inputs a shadow alias's model also answered, by agreement with the live answer",
            &["domain", "agrees"],
        );
        let serving_shed = counter(
            "flywheel_serving_shed_total",
            "Serving work let go to keep memory bounded, by kind",
            &["kind"],
        );
        let webhook_deliveries = counter(
            "flywheel_webhook_deliveries_total",
            "Webhook delivery attempts, by event type and outcome",
            &["event", "outcome"],
        );
        let serving_models_resident = IntGaugeVec::new(
            Opts::new(
                "flywheel_serving_models_resident",
                "Models resident for serving",
            ),
            &["domain"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(serving_models_resident.clone()))
            .expect("unique metric");
        Self {
            registry,
            predictions,
            prediction_escalations,
            prediction_confidence,
            prediction_seconds,
            teacher_requests,
            teacher_request_seconds,
            serving_model_loads,
            serving_models_resident,
            shadow_scores,
            serving_shed,
            webhook_deliveries,
            versions_pending_approval,
            corrections_untrained,
            webhook_deliveries_pending,
            production_version,
            production_moved_timestamp_seconds,
            database_wal_bytes,
            source_rows,
            source_polls,
            source_lag_seconds,
            source_files,
            job_duration_seconds,
            training_tokens_per_second,
            training_loss,
            corrections_ingested,
            corrections_rejected,
            corrections_redacted,
            jobs,
            promotion_decisions,
            stage_seconds,
            http_server_request_duration,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: one line per event, coloured only when stderr is a terminal (so files and
    /// log shippers get no escape codes).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format `{other}`: use text or json")),
        }
    }
}

/// Logs to stderr in `format`, filtered by `RUST_LOG`, else by `default` (e.g. `info`). Safe
/// to call twice.
pub fn init_logging(default: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{default},sqlx=warn,apalis=warn,apalis_core=warn"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
