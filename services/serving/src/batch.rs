//! Dynamic batching: concurrent requests to one resident model run as one forward pass.
//!
//! One task per model takes the first waiting request, then every other one already queued (up
//! to `max_batch` texts), and runs them together on a blocking thread. A lone request never
//! waits for company; under load, requests queue while a batch runs and go together in the
//! next, so throughput grows with concurrency instead of latency.
//!
//! Inference runs on a thread pool of its own at normal priority. The process-wide pool that
//! training computes on is lowered to the least priority (so training never slows the API);
//! a prediction on it would wait behind every training step.

use std::sync::{Arc, OnceLock};

use flywheel_trainer::ClassifierPredictor;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, ServingError};

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, String>>;

struct Request {
    texts: Vec<String>,
    reply: Reply,
}

/// A handle on a model's batching task; the task ends when the last handle is dropped.
pub(crate) struct Batcher {
    tx: mpsc::Sender<Request>,
}

impl Batcher {
    pub(crate) fn start(model: Arc<ClassifierPredictor>, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(model, rx, max_batch.max(1)));
        Self { tx }
    }

    /// Each text's probability for every label the model knows, in the order given.
    pub(crate) async fn probabilities(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { texts, reply })
            .await
            .map_err(|_| ServingError::Model("the model's batching task stopped".into()))?;
        answer
            .await
            .map_err(|_| ServingError::Model("the model's batching task stopped".into()))?
            .map_err(ServingError::Model)
    }
}

/// The pool inference computes on (classification and generation): burn's kernels and the
/// trainer's shards use whichever rayon pool they are called from.
pub(crate) fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("flywheel-serve-{i}"))
            .build()
            .expect("starting the inference threads")
    })
}

async fn run(model: Arc<ClassifierPredictor>, mut rx: mpsc::Receiver<Request>, max_batch: usize) {
    // Shards of a batch run side by side on the CPU's cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut texts = batch[0].texts.len();
        while texts < max_batch {
            match rx.try_recv() {
                Ok(next) => {
                    texts += next.texts.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let all: Vec<String> = batch.iter().flat_map(|r| r.texts.iter().cloned()).collect();
        let shard = all.len().div_ceil(threads).max(1);
        let model = model.clone();
        let result = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            pool().install(|| model.probabilities(&refs, shard).map_err(|e| e.to_string()))
        })
        .await
        .unwrap_or_else(|e| Err(format!("inference panicked: {e}")));
        match result {
            Ok(rows) => {
                let mut rows = rows.into_iter();
                for request in batch {
                    let mine: Vec<Vec<f32>> = rows.by_ref().take(request.texts.len()).collect();
                    let _ = request.reply.send(Ok(mine));
                }
            }
            Err(message) => {
                for request in batch {
                    let _ = request.reply.send(Err(message.clone()));
                }
            }
        }
    }
}
