//! Fine-tune jobs: a domain's and the caller's, one job, starting one now, cancelling, and the
//! progress events and checkpoints a job records.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use flywheel_db::{JobEvent, JobRow};
use flywheel_domain::{JobStatus, Role, Training, Trigger};
use serde::{Deserialize, Serialize};

use super::shared::{ApiResult, Domain, List, Path, Query, body, domain_row, job_row, parse_json};
use crate::{ApiError, AppState, ErrorCode, Principal};

pub async fn of_domain(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<List<JobRow>>> {
    Ok(Json(state.db.jobs_of(domain.id).await?.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartJob {
    /// Fields of the domain's training block to use instead, for this run only.
    #[serde(default)]
    training: Option<Training>,
}

/// Starts a fine-tune now, on every correction so far (`trigger: manual`).
pub async fn start(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<JobRow>)> {
    let raw = body(raw)?;
    let start: StartJob = if raw.iter().all(u8::is_ascii_whitespace) {
        StartJob { training: None }
    } else {
        parse_json(&raw)?
    };
    if start.training.is_some() && who.role != Role::Admin {
        // Like the domain's own block: a search or a higher rank spends the fleet's compute.
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "training: overriding the domain's training block takes an admin token; start \
             the run without it",
        ));
    }
    if let Some(training) = &start.training {
        super::domains::check_training(&state, training)?;
    }
    let domain = domain_row(&state, &name).await?;
    if let Some(training) = &start.training {
        // What the run will use, judged whole: the targets against the base model too.
        let merged = domain.spec.training.overridden_by(training);
        super::domains::check_training(&state, &merged)?;
        if merged.lora.target_modules != domain.spec.training.lora.target_modules {
            let mut spec = domain.spec.clone();
            spec.training = merged;
            super::domains::check_base_model(&state, &spec).await?;
        }
    }
    if let Some(running) = in_flight(&state, domain.id).await? {
        return Err(job_in_flight(&name, &running));
    }
    let Some(id) = state
        .db
        .try_create_job_with(domain.id, Trigger::Manual, 0, start.training.as_ref())
        .await?
    else {
        // Refused in the database: another request's job won the race, or there is nothing
        // to train on.
        return Err(match in_flight(&state, domain.id).await? {
            Some(running) => job_in_flight(&name, &running),
            None => ApiError::new(
                ErrorCode::InvalidField,
                format!("{name} has no corrections yet; send some first"),
            ),
        });
    };
    state
        .db
        .add_event(
            &id,
            "message",
            &format!("queued: started by {}", who.name),
            None,
        )
        .await?;
    // The scheduler hands queued jobs to the queue.
    state.nudge.notify_one();
    let job = state.db.job(&id).await?.expect("just created");
    Ok((StatusCode::CREATED, Json(job)))
}

/// The domain's queued or running job, if any.
async fn in_flight(state: &AppState, domain_id: i64) -> ApiResult<Option<JobRow>> {
    Ok(state
        .db
        .jobs_of(domain_id)
        .await?
        .into_iter()
        .find(|j| !j.status.is_terminal()))
}

fn job_in_flight(domain: &str, running: &JobRow) -> ApiError {
    ApiError::new(
        ErrorCode::JobInFlight,
        format!(
            "job {} of {domain} is {}; one run at a time",
            running.id,
            running.status.as_str()
        ),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    status: Option<String>,
    limit: Option<i64>,
}

/// Jobs across the caller's domains, newest first.
pub async fn all(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Json<List<JobRow>>> {
    let status = match q.status.as_deref() {
        None => None,
        Some(raw) => Some(JobStatus::parse(raw).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "status: `{raw}` is not one of queued, running, succeeded, failed, cancelled"
                ),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    // The scope is applied before the limit: a department's newest jobs, not its share of
    // everyone's newest.
    if who.role == Role::Admin {
        return Ok(Json(state.db.jobs(status, None, limit).await?.into()));
    }
    let mut jobs = Vec::new();
    for domain in &who.domains {
        jobs.extend(state.db.jobs(status, Some(domain), limit).await?);
    }
    jobs.sort_by(|a, b| (b.created_at, b.id.as_str()).cmp(&(a.created_at, a.id.as_str())));
    jobs.truncate(limit as usize);
    Ok(Json(jobs.into()))
}

/// Stops a queued or training job. Publishing is not interrupted: by then a version is being
/// written, and it is recorded.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobRow>> {
    let job = job_row(&state, &id).await?;
    let id = job.id.clone();
    let reason = format!("cancelled by {}", who.name);
    if !state.db.cancel_job(&id, &reason).await? {
        let job = job_row(&state, id.as_str()).await?;
        return Err(ApiError::new(
            ErrorCode::JobNotCancellable,
            format!(
                "job {id} is {} (stage {}); only queued or training jobs can be cancelled",
                job.status.as_str(),
                job.stage
            ),
        ));
    }
    state.db.add_event(&id, "message", &reason, None).await?;
    state
        .metrics
        .job_duration_seconds
        .with_label_values(&[job.domain.as_str(), "cancelled"])
        .observe(job.age_seconds());
    Ok(Json(job_row(&state, id.as_str()).await?))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<JobRow>> {
    Ok(Json(job_row(&state, &id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    after: i64,
}

pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<List<JobEvent>>> {
    let id = job_row(&state, &id).await?.id;
    Ok(Json(state.db.events(&id, q.after).await?.into()))
}

/// A checkpoint as the worker recorded it (step, loss, where it is staged), and when.
#[derive(Serialize)]
pub struct Checkpoint {
    #[serde(flatten)]
    recorded: serde_json::Map<String, serde_json::Value>,
    created_at: DateTime<Utc>,
}

/// The checkpoints a job's training saved, newest first (OpenAI's
/// `fine_tuning/jobs/{id}/checkpoints`): step, loss, and where it is staged. Only the newest
/// is kept; a job whose worker dies resumes from it.
pub async fn checkpoints(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<List<Checkpoint>>> {
    let id = job_row(&state, &id).await?.id;
    let mut checkpoints: Vec<Checkpoint> = state
        .db
        .events(&id, 0)
        .await?
        .into_iter()
        .filter(|e| e.kind == "checkpoint")
        .map(|e| Checkpoint {
            recorded: match e.data {
                Some(serde_json::Value::Object(data)) => data,
                _ => Default::default(),
            },
            created_at: e.at,
        })
        .collect();
    checkpoints.reverse();
    Ok(Json(checkpoints.into()))
}
