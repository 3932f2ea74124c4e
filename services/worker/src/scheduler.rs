use std::sync::Arc;

use flywheel_domain::Trigger;
use tokio::sync::{Notify, watch};

use crate::{Context, TRAIN_QUEUE, WorkerError};

/// Creates a job for every domain with enough new corrections and none in flight, then hands
/// the queue every queued job it has not seen: those just created, manual ones from the API,
/// and any that a crash left between insert and push. Returns how many it handed over.
pub async fn schedule_once(ctx: &Context) -> Result<usize, WorkerError> {
    let (requeued, failed) = ctx
        .db
        .reclaim_stale_jobs(ctx.config.job_lease, ctx.config.max_attempts)
        .await?;
    for job in &requeued {
        tracing::warn!(%job, "requeued: its worker stopped answering");
        ctx.db
            .add_event(
                job,
                "message",
                "requeued: its worker stopped answering",
                None,
            )
            .await?;
    }
    for job in &failed {
        tracing::error!(%job, "failed: its workers kept dying");
        ctx.db
            .add_event(
                job,
                "message",
                "failed: its worker stopped answering too often",
                None,
            )
            .await?;
    }
    let domains = ctx.db.domains().await?;
    // A source that cannot be handed over now is tried at the next pass; training goes on.
    if let Err(e) = claim_due_sources(ctx, &domains).await {
        tracing::warn!(error = %e, "handing sources their polls failed");
    }
    for domain in domains {
        let policy = &domain.spec.policy;
        let mut state = ctx.db.trigger_state(domain.id, domain.created_at).await?;
        let now = chrono::Utc::now();
        if policy.max_escalation_share.is_some() && !state.in_flight && state.new_corrections > 0 {
            let hour = ctx
                .db
                .serving_window(domain.id, now - chrono::Duration::hours(1))
                .await?;
            state.last_hour = Some((hour.predictions, hour.escalated));
        }
        let Some(trigger) = flywheel_domain::due(policy, &state, now) else {
            continue;
        };
        // The insert re-checks "nothing in flight" and "enough new rows" atomically.
        let min_new = match trigger {
            Trigger::NewCorrections => i64::from(policy.min_new_corrections),
            _ => 1,
        };
        if let Some(job) = ctx.db.try_create_job(domain.id, trigger, min_new).await? {
            tracing::info!(domain = %domain.spec.name, %job, trigger = trigger.as_str(), "scheduled fine-tune");
            let why = match trigger {
                Trigger::NewCorrections => "enough new corrections",
                Trigger::Staleness => "the oldest untrained correction waited too long",
                Trigger::Schedule => "the domain's schedule fired",
                Trigger::Drift => "too many of the last hour's predictions escalated",
                Trigger::Manual => "started by hand",
            };
            ctx.db
                .add_event(&job, "message", &format!("queued: {why}"), None)
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

/// Hands the ingest queue a poll of every source that is due and that no live worker holds.
/// The claim is what keeps two polls of one source apart; a poll whose worker died lets its
/// claim lapse after the job lease, and the source is claimed again here.
async fn claim_due_sources(
    ctx: &Context,
    domains: &[flywheel_db::DomainRow],
) -> Result<(), WorkerError> {
    for domain in domains.iter().filter(|d| !d.spec.sources.is_empty()) {
        let names: Vec<&str> = domain
            .spec
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        ctx.db.register_sources(domain.id, &names).await?;
        for name in names {
            let claim = uuid::Uuid::new_v4().simple().to_string();
            if ctx
                .db
                .claim_source(domain.id, name, &claim, ctx.config.job_lease)
                .await?
            {
                ctx.enqueue_poll(domain.spec.name.as_str(), name, claim)
                    .await?;
            }
        }
    }
    Ok(())
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
