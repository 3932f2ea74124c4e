//! Domains: registration, the list a caller may see, and one domain with its counts.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::{Extension, Json};
use flywheel_db::DomainRow;
use flywheel_domain::DomainSpec;
use flywheel_promotion::Promotion;
use flywheel_registry::{MODEL_REF_PREFIX, parse_model_ref};
use serde::Serialize;

use super::shared::{ApiResult, Domain, List, parse_body};
use crate::{ApiError, AppState, ErrorCode, Principal};

#[derive(Serialize)]
pub struct DomainView {
    #[serde(flatten)]
    domain: DomainRow,
    corrections: CorrectionCounts,
    production: Option<String>,
}

#[derive(Serialize)]
struct CorrectionCounts {
    train: i64,
    holdout: i64,
}

async fn view(state: &AppState, domain: DomainRow) -> ApiResult<DomainView> {
    let (train, holdout) = state.db.correction_counts(domain.id).await?;
    let production = Promotion::new(&state.db, &state.registry)
        .production(&domain.spec.name)
        .await?
        .map(|v| v.0);
    Ok(DomainView {
        domain,
        corrections: CorrectionCounts { train, holdout },
        production,
    })
}

pub async fn create(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<DomainView>)> {
    let spec: DomainSpec = parse_body(raw)?;
    spec.validate()?;
    if spec.base_model.starts_with(MODEL_REF_PREFIX) {
        let id = parse_model_ref(&spec.base_model).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidField,
                "base_model: `sha256:` must be followed by 64 lowercase hex digits",
            )
        })?;
        state.registry.model_manifest(id).await?;
    }
    let row = state.db.create_domain(&spec).await?;
    Ok((StatusCode::CREATED, Json(view(&state, row).await?)))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> ApiResult<Json<List<DomainRow>>> {
    let mut domains = state.db.domains().await?;
    domains.retain(|d| who.sees(d.spec.name.as_str()));
    Ok(Json(domains.into()))
}

pub async fn get(
    State(state): State<AppState>,
    Domain(domain): Domain,
) -> ApiResult<Json<DomainView>> {
    Ok(Json(view(&state, domain).await?))
}
