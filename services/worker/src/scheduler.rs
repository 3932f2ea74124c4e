use std::sync::Arc;

use flywheel_domain::Trigger;
use tokio::sync::{Notify, watch};

use crate::{Context, TRAIN_QUEUE, WorkerError};

/// Creates a job for every domain with enough new corrections and none in flight, then hands
/// the queue every queued job it has not seen: those just created, manual ones from the API,
/// and any that a crash left between insert and push. Returns how many it handed over.
pub async fn schedule_once(ctx: &Context) -> Result<usize, WorkerError> {
    for domain in ctx.db.domains().await? {
        let min_new = i64::from(domain.spec.policy.min_new_corrections);
        if let Some(job) = ctx
            .db
            .try_create_job(domain.id, Trigger::NewCorrections, min_new)
            .await?
        {
            tracing::info!(domain = %domain.spec.name, %job, "scheduled fine-tune");
            ctx.db
                .add_event(&job, "message", "queued: enough new corrections", None)
                .await?;
        }
    }
    let mut pushed = 0;
    for job in ctx.db.unenqueued_jobs().await? {
        // Pushed before it is marked: a crash in between pushes it twice, and the train
        // stage's claim lets only one run (at-least-once beats never).
        ctx.enqueue(TRAIN_QUEUE, &job).await?;
        ctx.db.mark_enqueued(&job).await?;
        pushed += 1;
    }
    Ok(pushed)
}

pub(crate) async fn run(
    ctx: Arc<Context>,
    nudge: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = schedule_once(&ctx).await {
            tracing::error!(error = %e, "scheduler pass failed");
        }
        tokio::select! {
            _ = nudge.notified() => {}
            _ = tokio::time::sleep(ctx.config.scheduler_interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
