//! What a steward does from the console: decide on a version, roll production back, point
//! staging or canary at a version. Each form carries its session's anti-forgery token and a
//! reason, and is carried out by the same code as its API route, so it is audited the same;
//! then the browser goes to the version's page, where the trail shows it.

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect};
use flywheel_domain::VersionId;
use flywheel_promotion::Promotion;
use serde::Deserialize;

use super::PageResult;
use super::session::{CsrfForm, Signed};
use crate::routes::shared::{Path, check_reason, domain_row, version_row};
use crate::routes::versions::{self, Step};
use crate::{ApiError, AppState, ErrorCode, Principal};

fn version_page(domain: &str, version: &str) -> Redirect {
    Redirect::to(&format!("/console/domains/{domain}/versions/{version}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideForm {
    csrf: String,
    step: Step,
    reason: String,
}

impl Signed for DecideForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

pub async fn decide(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((name, version)): Path<(String, String)>,
    CsrfForm(form): CsrfForm<DecideForm>,
) -> PageResult {
    let by = who.actor(None)?;
    let domain = domain_row(&state, &name).await?;
    versions::decide(&state, &domain, &version, form.step, &by, &form.reason).await?;
    Ok(version_page(&name, &version).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackForm {
    csrf: String,
    to: String,
    reason: String,
}

impl Signed for RollbackForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

pub async fn rollback(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    CsrfForm(form): CsrfForm<RollbackForm>,
) -> PageResult {
    let by = who.actor(None)?;
    let domain = domain_row(&state, &name).await?;
    let moved = versions::roll_back(&state, &domain, &form.to, &by, &form.reason).await?;
    Ok(version_page(&name, &moved.production).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasForm {
    csrf: String,
    alias: String,
    to: String,
    reason: String,
}

impl Signed for AliasForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// The aliases the console moves; production moves only by decision and rollback, and pins
/// are the API's.
const MOVABLE: &[&str] = &["staging", "canary"];

pub async fn move_alias(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    CsrfForm(form): CsrfForm<AliasForm>,
) -> PageResult {
    if !MOVABLE.contains(&form.alias.as_str()) {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!(
                "alias: the console moves staging or canary, not `{}`",
                form.alias
            ),
        )
        .into());
    }
    let by = who.actor(None)?;
    check_reason(&form.reason)?;
    let domain = domain_row(&state, &name).await?;
    let to: VersionId = version_row(&state, &domain, &form.to).await?.version;
    Promotion::new(&state.db, &state.registry)
        .move_by_hand(&domain, &form.alias, None, &to, &by, &form.reason)
        .await?;
    Ok(version_page(&name, to.as_str()).into_response())
}
