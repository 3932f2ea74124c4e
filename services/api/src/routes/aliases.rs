//! Aliases: what a serving fleet reads (the version, its files, the escalation threshold), a
//! hand move of any alias but production, and an alias's history.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use flywheel_db::DomainRow;
use flywheel_domain::VersionId;
use flywheel_promotion::Promotion;
use flywheel_registry::AliasMove;
use serde::{Deserialize, Serialize};

use super::shared::{
    Acting, ApiResult, List, Path, check_reason, domain_row, parse_body, version_row,
};
use crate::{ApiError, AppState, ErrorCode};

pub(super) use flywheel_domain::is_alias_name;

fn not_set(name: &str, alias: &str) -> ApiError {
    ApiError::new(
        ErrorCode::VersionNotFound,
        format!("alias `{alias}` of {name} is not set"),
    )
}

/// The domain of an alias being read; an alias that cannot exist is not set.
async fn readable(state: &AppState, name: &str, alias: &str) -> ApiResult<DomainRow> {
    let domain = domain_row(state, name).await?;
    if !is_alias_name(alias) {
        return Err(not_set(name, alias));
    }
    Ok(domain)
}

#[derive(Serialize)]
pub struct AliasView {
    alias: String,
    version: VersionId,
    generation: u64,
    moved_at: DateTime<Utc>,
    moved_by: String,
    escalation: serde_json::Value,
    /// The out-of-scope threshold, for a domain with an out-of-scope label.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    out_of_scope: serde_json::Value,
    base_model: serde_json::Value,
    files: Vec<FileView>,
}

#[derive(Serialize)]
struct FileView {
    name: String,
    sha256: String,
    bytes: u64,
    url: String,
}

/// What a serving fleet needs: the version an alias points at, where its adapter files are,
/// and the confidence below which to escalate.
pub async fn get(
    State(state): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Json<AliasView>> {
    let domain = readable(&state, &name, &alias).await?;
    let mv = state
        .registry
        .resolve(&domain.spec.name, &alias)
        .await?
        .ok_or_else(|| not_set(&name, &alias))?;
    let version = VersionId(mv.to);
    let manifest = state.registry.manifest(&domain.spec.name, &version).await?;
    let files = manifest
        .files
        .into_iter()
        .map(|f| FileView {
            url: state
                .registry
                .file_url(&domain.spec.name, &version, &f.name),
            name: f.name,
            sha256: f.sha256,
            bytes: f.bytes,
        })
        .collect();
    Ok(Json(AliasView {
        alias,
        version,
        generation: mv.generation,
        moved_at: mv.at,
        moved_by: mv.by,
        escalation: manifest.lineage["escalation"].clone(),
        out_of_scope: manifest.lineage["out_of_scope"].clone(),
        base_model: manifest.lineage["base_model"].clone(),
        files,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    to: String,
    /// The version the caller believes the alias points at (`null`: unset). When given, the
    /// move is a compare-and-swap on it; when absent, on whatever the alias points at now.
    #[serde(default, deserialize_with = "present")]
    expected: Option<Option<String>>,
    #[serde(default)]
    by: Option<String>,
    reason: String,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Moves any alias but `production` (which moves through the gate, approval and rollback) to
/// a published version: `staging`, `canary`, a customer's pin.
pub async fn move_by_hand(
    (State(state), Extension(who), Path((name, alias)), raw): Acting<(String, String)>,
) -> ApiResult<Json<AliasMove>> {
    let req: MoveRequest = parse_body(raw)?;
    let by = who.actor(req.by)?;
    check_reason(&req.reason)?;
    if !is_alias_name(&alias) {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "alias: use 1-64 letters, digits, `-` and `_`",
        ));
    }
    Promotion::movable_by_hand(&alias)?;
    let domain = domain_row(&state, &name).await?;
    let target = version_row(&state, &domain, &req.to).await?;
    let expected = req.expected.map(|e| e.map(VersionId));
    let moved = Promotion::new(&state.db, &state.registry)
        .move_by_hand(&domain, &alias, expected, &target.version, &by, &req.reason)
        .await?;
    Ok(Json(moved))
}

/// Every move of an alias, oldest first: who, when, from, to, why.
pub async fn history(
    State(state): State<AppState>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Json<List<AliasMove>>> {
    let domain = readable(&state, &name, &alias).await?;
    let moves = state
        .registry
        .alias_history(&domain.spec.name, &alias)
        .await?;
    Ok(Json(moves.into()))
}
