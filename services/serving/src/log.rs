//! Writing behind the answer: logged predictions and the corrections teachers' answers become
//! go to the database in batches, off the request path, so a prediction never waits on a
//! commit.
//!
//! A batch is written every 100 ms or 512 records, whichever comes first. If the process dies
//! in between, those records are lost: a prediction log is an audit sample, and a lost teacher
//! answer costs one training row, not an answer. Feedback on a prediction flushes first, so a
//! prediction is always findable once its answer was sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flywheel_db::{Db, NewPrediction, NewShadowScore};
use flywheel_domain::Correction;
use flywheel_telemetry::Metrics;
use tokio::sync::{Notify, mpsc, oneshot};

const BATCH: usize = 512;
const EVERY: Duration = Duration::from_millis(100);
/// How often logged predictions past their domain's retention are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

pub(crate) enum Record {
    Prediction(NewPrediction),
    /// A teacher's answer, as a correction of the domain `domain_id` (named for metrics).
    Correction {
        domain_id: i64,
        domain: String,
        correction: Box<Correction>,
    },
    /// Whether a shadow alias's model agreed with the answer given.
    Shadow(NewShadowScore),
    /// How long the domain keeps its predictions, noted for the purge.
    Retention {
        domain_id: i64,
        days: u32,
    },
    Flush(oneshot::Sender<()>),
}

/// Records waiting for the writer at most; past it they are dropped and counted.
const BACKLOG: usize = 65_536;

#[derive(Clone)]
pub(crate) struct Log {
    tx: mpsc::Sender<Record>,
    metrics: Metrics,
}

impl Log {
    pub(crate) fn start(db: Db, metrics: Metrics, nudge: Arc<Notify>) -> Self {
        let (tx, rx) = mpsc::channel(BACKLOG);
        tokio::spawn(run(db, metrics.clone(), nudge, rx));
        Self { tx, metrics }
    }

    /// Hands `record` to the writer; if the database has fallen that far behind, drops it.
    pub(crate) fn record(&self, record: Record) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(record) {
            self.metrics.serving_shed.with_label_values(&["log"]).inc();
        }
    }

    /// Returns once everything recorded before the call is written.
    pub(crate) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Record::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn run(db: Db, metrics: Metrics, nudge: Arc<Notify>, mut rx: mpsc::Receiver<Record>) {
    let mut retention: HashMap<i64, u32> = HashMap::new();
    let mut last_purge = tokio::time::Instant::now();
    let mut predictions = Vec::new();
    let mut shadows = Vec::new();
    let mut corrections: HashMap<i64, (String, Vec<Correction>)> = HashMap::new();
    let mut flushes = Vec::new();
    loop {
        let first = match tokio::time::timeout(EVERY, rx.recv()).await {
            Ok(Some(r)) => Some(r),
            Ok(None) => break,
            Err(_) => None,
        };
        let mut take = |r: Record| match r {
            Record::Prediction(p) => predictions.push(p),
            Record::Shadow(s) => shadows.push(s),
            Record::Correction {
                domain_id,
                domain,
                correction,
            } => corrections
                .entry(domain_id)
                .or_insert_with(|| (domain, Vec::new()))
                .1
                .push(*correction),
            Record::Retention { domain_id, days } => {
                retention.insert(domain_id, days);
            }
            Record::Flush(done) => flushes.push(done),
        };
        if let Some(r) = first {
            take(r);
            for _ in 1..BATCH {
                match rx.try_recv() {
                    Ok(r) => take(r),
                    Err(_) => break,
                }
            }
        }
        write(
            &db,
            &metrics,
            &nudge,
            &mut predictions,
            &mut shadows,
            &mut corrections,
        )
        .await;
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = tokio::time::Instant::now();
            for (&domain_id, &days) in &retention {
                let before = chrono::Utc::now() - chrono::Duration::days(i64::from(days));
                if let Err(e) = db.purge_predictions(domain_id, before).await {
                    tracing::warn!(domain_id, error = %e, "serving: purging old predictions failed");
                }
            }
        }
    }
    write(
        &db,
        &metrics,
        &nudge,
        &mut predictions,
        &mut shadows,
        &mut corrections,
    )
    .await;
}

async fn write(
    db: &Db,
    metrics: &Metrics,
    nudge: &Notify,
    predictions: &mut Vec<NewPrediction>,
    shadows: &mut Vec<NewShadowScore>,
    corrections: &mut HashMap<i64, (String, Vec<Correction>)>,
) {
    if !shadows.is_empty() {
        if let Err(e) = db.insert_shadow_scores(shadows).await {
            tracing::warn!(count = shadows.len(), error = %e, "serving: shadow scores not stored");
        }
        shadows.clear();
    }
    if !predictions.is_empty() {
        if let Err(e) = db.insert_predictions(predictions).await {
            tracing::warn!(count = predictions.len(), error = %e, "serving: predictions not logged");
        }
        predictions.clear();
    }
    let mut stored_any = false;
    for (domain_id, (domain, rows)) in corrections.drain() {
        match db.insert_corrections(domain_id, &rows).await {
            Ok(outcome) => {
                stored_any |= outcome.accepted > 0;
                metrics
                    .corrections_ingested
                    .with_label_values(&[domain.as_str()])
                    .inc_by(outcome.accepted as u64);
            }
            Err(e) => {
                tracing::warn!(domain, count = rows.len(), error = %e, "serving: teacher answers not stored");
            }
        }
    }
    if stored_any {
        nudge.notify_one();
    }
}
