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

/// Most texts in one shard of a batch: shards of texts of like length pad little, and run side
/// by side on the cores.
const SHARD: usize = 16;

/// Each text's probabilities, in the order given. The texts run sorted by length, in shards of
/// at most [`SHARD`], so each shard pads only to its own longest text rather than the batch's.
fn by_length(
    model: &ClassifierPredictor,
    texts: &[String],
    threads: usize,
) -> flywheel_trainer::Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let sorted: Vec<&str> = order.iter().map(|&i| texts[i].as_str()).collect();
    let shard = texts.len().div_ceil(threads).clamp(1, SHARD);
    let rows = model.probabilities(&sorted, shard)?;
    let mut out = vec![Vec::new(); texts.len()];
    for (row, &i) in rows.into_iter().zip(&order) {
        out[i] = row;
    }
    Ok(out)
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
        let model = model.clone();
        let result = tokio::task::spawn_blocking(move || {
            pool().install(|| by_length(&model, &all, threads).map_err(|e| e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_run_sorted_by_length_and_come_back_in_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let texts: Vec<String> = [
            "where is my card",
            "a",
            "my card was stolen yesterday and I need a new one right now please",
            "top up failed twice",
            "what is the exchange rate",
        ]
        .iter()
        .cycle()
        .take(37)
        .enumerate()
        .map(|(i, t)| format!("{t} {}", "x ".repeat(i % 7)))
        .collect();
        flywheel_trainer::tiny::init_tiny_bert(
            dir.path(),
            texts.iter(),
            &flywheel_trainer::tiny::TinyBertSpec::default(),
        )
        .unwrap();
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let model = ClassifierPredictor::load(dir.path(), None, &labels, 7).unwrap();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let one_by_one: Vec<Vec<f32>> = refs
            .iter()
            .map(|t| model.probabilities(&[t], 1).unwrap().remove(0))
            .collect();
        let batched = by_length(&model, &texts, 2).unwrap();
        assert_eq!(batched.len(), texts.len());
        for (i, (a, b)) in batched.iter().zip(&one_by_one).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-4, "text {i}: {a:?} against {b:?}");
            }
        }
    }
}
