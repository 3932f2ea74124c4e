//! The `flywheel.ingest` queue's stage: one poll of one source, which the scheduler claimed.
//! The reading itself is `flywheel-ingest`'s.

use std::sync::Arc;

use apalis::prelude::*;
use flywheel_domain::IngestTask;

use crate::Context;

/// Polls the task's source. A failed poll is recorded on the source (`last_error`, and the
/// next poll after the interval) rather than failing the queue task: the scheduler, not the
/// queue, decides when a source is tried again.
pub async fn poll(task: IngestTask, ctx: Data<Arc<Context>>) -> Result<(), BoxDynError> {
    let ctx: &Context = &ctx;
    let Some(domain) = ctx.db.domain(&task.domain).await? else {
        return Ok(());
    };
    let Some(source) = domain
        .spec
        .sources
        .iter()
        .find(|s| s.name == task.source)
        .cloned()
    else {
        // Removed from the spec since it was claimed: let the claim go.
        ctx.db
            .finish_poll(
                domain.id,
                &task.source,
                &task.claim,
                std::time::Duration::ZERO,
                false,
                None,
            )
            .await?;
        return Ok(());
    };
    match ctx.ingestor.poll(&domain, &source, &task.claim).await {
        // Another poll holds the source now (this one waited past its lease): nothing to do.
        Ok(None) => {}
        Ok(Some(report)) if report.units > 0 => tracing::info!(
            domain = %domain.spec.name,
            source = %source.name,
            units = report.units,
            caught_up = report.caught_up,
            "ingested from a source"
        ),
        Ok(Some(_)) => {}
        Err(e) => tracing::warn!(
            domain = %domain.spec.name,
            source = %source.name,
            error = %e,
            "polling a source failed; it is tried again after its interval"
        ),
    }
    Ok(())
}
