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
        .chain(crate::console::PAGES)
        .find(|r| r.path == route && r.verb.as_str() == method.as_str())
        .map_or(ADMIN_ONLY, |r| r.access);
    match access {
        Access::Probe | Access::Public => None,
        Access::Roles(roles, scope) => Some((roles, scope)),
    }
}

/// The credentials of an `Authorization: Bearer <token>` header; the scheme's case does not
/// matter (RFC 9110).
pub(crate) fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

fn unauthenticated(message: &str) -> Response {
    ApiError::new(ErrorCode::Unauthenticated, message).into_response()
}

/// A refusal: a console page for a page route, `{code, message}` for the API.
fn refuse(page: bool, code: ErrorCode, message: String) -> Response {
    if page {
        crate::console::page_error(code.status(), &message)
    } else {
        ApiError::new(code, message).into_response()
    }
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
    // A console page acts as its session, an API route as its bearer token; neither is
    // accepted in the other's place, so a cookie never authorizes an API call (no forgery of
    // JSON requests from another site) and a page always goes through sign-in.
    let page = crate::console::is_page(&route);
    let principal = match state.auth {
        _ if page => match crate::console::principal_of(&state, req.headers()).await {
            Ok(Some((principal, session))) => {
                req.extensions_mut().insert(session);
                principal
            }
            Ok(None) => {
                let here = req
                    .uri()
                    .path_and_query()
                    .map_or(route.as_str(), |p| p.as_str());
                return crate::console::to_sign_in(req.method(), req.headers(), here);
            }
            Err(e) => return refuse(true, e.code, e.message),
        },
        AuthMode::Off => Principal::anonymous(),
        AuthMode::Required => {
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let Some(token) = header.and_then(bearer) else {
                // A console session opens pages; the API wants the token itself.
                let has_session = req
                    .headers()
                    .get_all(header::COOKIE)
                    .iter()
                    .any(|v| v.as_bytes().windows(17).any(|w| w == b"flywheel_session="));
                return unauthenticated(if has_session {
                    "send `Authorization: Bearer <token>`; a console session cookie opens console pages only"
                } else {
                    "send `Authorization: Bearer <token>`"
                });
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
        let message = if page {
            format!(
                "A {} token may not open this page.",
                principal.role.as_str()
            )
        } else {
            let takes: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            format!(
                "a {} token may not call {} {route}: it takes a token of role {}",
                principal.role.as_str(),
                req.method(),
                takes.join(" or ")
            )
        };
        return refuse(page, ErrorCode::Forbidden, message);
    }
    let domain = match scope {
        Scope::None => None,
        Scope::Domain | Scope::Job | Scope::Prediction => {
            let params = match req.extract_parts::<RawPathParams>().await {
                Ok(p) => p,
                Err(e) => {
                    return refuse(
                        page,
                        ErrorCode::MalformedRequest,
                        format!("path: {}", e.body_text()),
                    );
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
        let message = if page {
            format!(
                "Your token is not scoped to domain “{domain}”, or there is no such domain. \
                 Your domains are listed in the inbox."
            )
        } else {
            format!("this token is not scoped to domain `{domain}`")
        };
        return refuse(page, ErrorCode::Forbidden, message);
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}
