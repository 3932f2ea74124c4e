//! API tokens (admin only): create, list without secrets, revoke.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::{Extension, Json};
use flywheel_db::TokenRow;
use flywheel_domain::Role;
use serde::{Deserialize, Serialize};

use super::shared::{ApiResult, List, MAX_NAME_CHARS, Path, domain_row, parse_body, short_text};
use crate::{ApiError, AppState, ErrorCode, Principal};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: Role,
    /// Domains a `department` or `steward` token may act on.
    #[serde(default)]
    domains: Vec<String>,
}

/// A token just created: its row, and the secret, which no other response carries.
#[derive(Serialize)]
pub struct Created {
    #[serde(flatten)]
    row: TokenRow,
    token: String,
}

/// Creates a token; the secret is in this response and nowhere else, ever.
pub async fn create(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    let req: NewToken = parse_body(raw)?;
    short_text("name", &req.name, MAX_NAME_CHARS)?;
    check_scope(req.role, &req.domains)?;
    for d in &req.domains {
        domain_row(&state, d).await?;
    }
    let secret = flywheel_domain::auth::new_token();
    let row = state
        .db
        .create_token(
            &req.name,
            req.role,
            &req.domains,
            &flywheel_domain::auth::hash_token(&secret),
            &who.name,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(Created { row, token: secret })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rescope {
    /// The domains the token may act on from now on.
    domains: Vec<String>,
}

/// Changes the domains a department or steward token may act on; its secret stays valid.
pub async fn rescope(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<TokenRow>> {
    let req: Rescope = parse_body(raw)?;
    let not_found = || {
        ApiError::new(
            ErrorCode::TokenNotFound,
            format!("no live token with id `{id}`"),
        )
    };
    let n: i64 = id.parse().map_err(|_| not_found())?;
    let token = state
        .db
        .tokens()
        .await?
        .into_iter()
        .find(|t| t.id == n && t.revoked_at.is_none())
        .ok_or_else(not_found)?;
    check_scope(token.role, &req.domains)?;
    for d in &req.domains {
        domain_row(&state, d).await?;
    }
    let row = state
        .db
        .rescope_token(n, &req.domains)
        .await?
        .ok_or_else(not_found)?;
    tracing::info!(token = n, domains = ?req.domains, "token scope changed");
    Ok(Json(row))
}

/// Admin tokens are unscoped; the others act on the domains they name.
fn check_scope(role: Role, domains: &[String]) -> ApiResult<()> {
    match (role, domains.is_empty()) {
        (Role::Admin, false) => Err(ApiError::new(
            ErrorCode::InvalidField,
            "domains: admin tokens are not scoped; leave `domains` out",
        )),
        (Role::Department | Role::Steward | Role::Serving, true) => Err(ApiError::new(
            ErrorCode::InvalidField,
            "domains: name the domains this token may act on",
        )),
        _ => Ok(()),
    }
}

pub async fn list(State(state): State<AppState>) -> ApiResult<Json<List<TokenRow>>> {
    Ok(Json(state.db.tokens().await?.into()))
}

pub async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let not_found = || {
        ApiError::new(
            ErrorCode::TokenNotFound,
            format!("no live token with id `{id}`"),
        )
    };
    let n: i64 = id.parse().map_err(|_| not_found())?;
    if state.db.revoke_token(n).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}
