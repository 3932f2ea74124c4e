//! Authentication (bearer tokens) and authorization: the route table (`routes::ROUTES`) says
//! which roles may call each route and whether its domain must be in the token's scope.
//!
//! The check runs as a route layer, after routing and before any handler, so a handler never
//! runs for a caller it should not; handlers that record who acted read the [`Principal`]
//! from the request.

use axum::RequestExt;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flywheel_domain::{JobId, PredictionId, Role};

use crate::route::{ADMIN_ONLY, Access, Scope};
use crate::{ApiError, AppState, AuthMode, ErrorCode, Principal};

/// The rule for a route. `None`: public. A route missing from the table is admin-only, so an
/// endpoint is never open by accident.
fn rule(method: &Method, route: &str) -> Option<(&'static [Role], Scope)> {
    // HEAD is answered by the GET route (axum runs it and drops the body), so it is GET's
    // rule that applies.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let access = crate::routes::ROUTES
        .iter()
        .find(|r| r.path == route && r.verb.as_str() == method.as_str())
        .map_or(ADMIN_ONLY, |r| r.access);
    match access {
        Access::Probe | Access::Public => None,
        Access::Roles(roles, scope) => Some((roles, scope)),
    }
}

fn unauthenticated(message: &str) -> Response {
    ApiError::new(ErrorCode::Unauthenticated, message).into_response()
}

fn forbidden(message: String) -> Response {
    ApiError::new(ErrorCode::Forbidden, message).into_response()
}

/// The route layer: authenticates, applies the table, and hands the [`Principal`] on.
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(route) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
    else {
        return next.run(req).await;
    };
    let Some((roles, scope)) = rule(req.method(), &route) else {
        return next.run(req).await;
    };
    let principal = match state.auth {
        AuthMode::Off => Principal::anonymous(),
        AuthMode::Required => {
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
                return unauthenticated("send `Authorization: Bearer <token>`");
            };
            let hash = flywheel_domain::auth::hash_token(token.trim());
            let found = match state.db.token_by_hash(&hash).await {
                Ok(found) => found,
                Err(e) => return ApiError::from(e).into_response(),
            };
            match found {
                Some(t) if t.revoked_at.is_none() => Principal {
                    name: t.name,
                    role: t.role,
                    domains: t.domains,
                    authenticated: true,
                    token_hash: Some(hash),
                },
                Some(_) => return unauthenticated("this token was revoked"),
                None => return unauthenticated("this token is not valid"),
            }
        }
    };
    if !roles.contains(&principal.role) {
        return forbidden(format!(
            "a {} token may not call {} {route}",
            principal.role.as_str(),
            req.method()
        ));
    }
    let domain = match scope {
        Scope::None => None,
        Scope::Domain | Scope::Job | Scope::Prediction => {
            let params = match req.extract_parts::<RawPathParams>().await {
                Ok(p) => p,
                Err(e) => {
                    return ApiError::new(
                        ErrorCode::MalformedRequest,
                        format!("path: {}", e.body_text()),
                    )
                    .into_response();
                }
            };
            let param = |key: &str| {
                params
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            };
            match scope {
                Scope::Domain => param("domain"),
                // An unknown prediction falls through to the handler's 404.
                Scope::Prediction => match param("id").as_deref().and_then(PredictionId::parse) {
                    Some(id) => match state.serving.prediction(&id).await {
                        Ok(p) => p.map(|p| p.domain),
                        Err(e) => return ApiError::from(e).into_response(),
                    },
                    None => None,
                },
                // An unknown job falls through to the handler's 404.
                _ => match param("id").as_deref().and_then(JobId::parse) {
                    Some(id) => match state.db.job(&id).await {
                        Ok(job) => job.map(|j| j.domain),
                        Err(e) => return ApiError::from(e).into_response(),
                    },
                    None => None,
                },
            }
        }
    };
    if let Some(domain) = domain
        && !principal.sees(&domain)
    {
        return forbidden(format!("this token is not scoped to domain `{domain}`"));
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}
