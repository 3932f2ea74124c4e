use std::sync::Arc;

use flywheel_domain::Trigger;
use tokio::sync::{Notify, watch};

use crate::{Context, TRAIN_QUEUE, WorkerError};

/// Starts a job for every domain with enough new corrections and none in flight.
/// Returns how many jobs it started.
pub async fn schedule_once(ctx: &Context) -> Result<usize, WorkerError> {
    let mut started = 0;
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
            if let Err(e) = ctx.enqueue(TRAIN_QUEUE, &job).await {
                ctx.db
                    .finish_job(
                        &job,
                        flywheel_domain::JobStatus::Failed,
                        Some(&e.to_string()),
                    )
                    .await?;
                return Err(e);
            }
            started += 1;
        }
    }
    Ok(started)
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
