//! Where CPU-heavy stages (training, evaluation, the adapter check) run: on threads of their
//! own at the lowest scheduling priority, and on a rayon pool whose threads are lowered the
//! same way.
//!
//! One process often serves the API, sends job heartbeats and trains. Training wants every
//! core; at equal priority it turns a 1 ms request into tens of milliseconds on a small
//! machine and can starve the heartbeat that keeps its own lease. At niceness 19 it still gets
//! every idle cycle (a dedicated worker trains as fast as before) but gives way the moment a
//! request or heartbeat is runnable. A thread cannot raise its priority back without
//! privileges, so compute never runs on tokio's shared blocking threads.

use std::sync::Once;

use thread_priority::{ThreadPriority, set_current_thread_priority};

use crate::WorkerError;

/// Lowers the calling thread to the lowest priority; logged once if the OS refuses.
fn lower_current_thread() {
    static WARNED: Once = Once::new();
    if let Err(e) = set_current_thread_priority(ThreadPriority::Min) {
        WARNED.call_once(|| {
            tracing::warn!(error = ?e, "could not lower the priority of compute threads");
        });
    }
}

/// Builds rayon's global pool (which burn, gemm and the trainer's kernels compute on) with
/// lowered threads. Call before any training; a pool already built is left as it is.
pub fn init_pool() {
    let built = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("flywheel-compute-{i}"))
        .start_handler(|_| lower_current_thread())
        .build_global();
    if built.is_err() {
        tracing::debug!("rayon's global pool was already built; its priority is unchanged");
    }
}

/// Starts `work` now on a new lowered thread named `name`; the returned future is its result
/// (a panic in it is a job error naming `name`).
pub fn spawn<T: Send + 'static>(
    name: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Result<T, WorkerError>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name(format!("flywheel-{name}"))
        .spawn(move || {
            lower_current_thread();
            let _ = tx.send(work());
        });
    async move {
        started.map_err(|e| WorkerError::Job(format!("starting the {name} thread: {e}")))?;
        rx.await
            .map_err(|_| WorkerError::Job(format!("{name} panicked; see the server log")))
    }
}
