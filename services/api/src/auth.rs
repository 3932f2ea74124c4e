//! Authentication (bearer tokens) and authorization (one table: which roles may call which
//! route, and whether the route's domain must be in the token's scope).
//!
//! The check runs as a route layer, after routing and before any handler, so a handler never
//! runs for a caller it should not; handlers that record who acted read the [`Principal`]
//! from the request.

use axum::RequestExt;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flywheel_domain::{JobId, Role};

use crate::{ApiError, AppState, ErrorCode};

/// Whether requests must carry a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every route but `/healthz` and `/metrics` needs a valid token.
    Required,
    /// No tokens: every caller acts as an anonymous admin and names itself in `by` fields.
    /// For a laptop and the demo, never for a shared deployment.
    Off,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's name; recorded as the actor of what this caller does.
    pub name: String,
    pub role: Role,
    pub domains: Vec<String>,
    /// False with [`AuthMode::Off`].
    pub authenticated: bool,
}

impl Principal {
    fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
            domains: Vec::new(),
            authenticated: false,
        }
    }

    /// Whether this caller may see `domain` at all.
    pub fn sees(&self, domain: &str) -> bool {
        self.role == Role::Admin || self.domains.iter().any(|d| d == domain)
    }

    /// The actor to record: the token's name; without auth, the `by` the caller gave.
    pub fn actor(&self, by: Option<String>) -> Result<String, ApiError> {
        match (self.authenticated, by) {
            (true, Some(by)) if by != self.name => Err(ApiError::new(
                ErrorCode::InvalidField,
                format!(
                    "by: you are authenticated as `{}`; leave `by` out or make it match",
                    self.name
                ),
            )),
            (true, _) => Ok(self.name.clone()),
            (false, Some(by)) if !by.trim().is_empty() => Ok(by),
            (false, _) => Err(ApiError::new(
                ErrorCode::InvalidField,
                "by: must name who decides (or authenticate with a token)",
            )),
        }
    }
}

/// Where a route's domain comes from, for the scope check.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Not domain-specific (or filtered by the handler, like the domain list).
    None,
    /// The `{domain}` path parameter.
    Domain,
    /// The domain of the job in the `{id}` path parameter.
    Job,
}

const ALL: &[Role] = &[Role::Admin, Role::Department, Role::Steward];
const ADMIN: &[Role] = &[Role::Admin];
const DEPARTMENT: &[Role] = &[Role::Admin, Role::Department];
const STEWARD: &[Role] = &[Role::Admin, Role::Steward];

/// The table. `None`: public. A route missing here is admin-only, so a new endpoint is never
/// open by accident.
fn rule(method: &Method, route: &str) -> Option<(&'static [Role], Scope)> {
    let m = method.as_str();
    Some(match (m, route) {
        ("GET", "/healthz" | "/metrics" | "/openapi.json") => return None,
        ("POST", "/v1/domains") => (ADMIN, Scope::None),
        ("GET", "/v1/domains") => (ALL, Scope::None),
        ("GET", "/v1/domains/{domain}") => (ALL, Scope::Domain),
        ("POST", "/v1/domains/{domain}/corrections") => (DEPARTMENT, Scope::Domain),
        ("GET" | "POST", "/v1/domains/{domain}/jobs") => (DEPARTMENT, Scope::Domain),
        ("GET", "/v1/jobs") => (DEPARTMENT, Scope::None),
        ("POST", "/v1/jobs/{id}/cancel") => (DEPARTMENT, Scope::Job),
        ("GET", "/v1/jobs/{id}" | "/v1/jobs/{id}/events" | "/v1/jobs/{id}/checkpoints") => {
            (DEPARTMENT, Scope::Job)
        }
        (
            "GET",
            "/v1/domains/{domain}/versions" | "/v1/domains/{domain}/versions/{version}/report",
        ) => (ALL, Scope::Domain),
        (
            "POST",
            "/v1/domains/{domain}/versions/{version}/approve"
            | "/v1/domains/{domain}/versions/{version}/reject"
            | "/v1/domains/{domain}/rollback",
        ) => (STEWARD, Scope::Domain),
        ("PUT", "/v1/domains/{domain}/aliases/{alias}") => (STEWARD, Scope::Domain),
        ("GET", "/v1/domains/{domain}/audit") => (STEWARD, Scope::Domain),
        (
            "GET",
            "/v1/domains/{domain}/aliases/{alias}" | "/v1/domains/{domain}/aliases/{alias}/history",
        ) => (ALL, Scope::Domain),
        _ => (ADMIN, Scope::None),
    })
}

/// The roles that may call a route; `None` for public routes.
pub fn roles_for(method: &str, route: &str) -> Option<&'static [Role]> {
    let method: Method = method.parse().ok()?;
    rule(&method, route).map(|(roles, _)| roles)
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
            let found = match state
                .db
                .token_by_hash(&flywheel_domain::auth::hash_token(token.trim()))
                .await
            {
                Ok(found) => found,
                Err(e) => return ApiError::from(e).into_response(),
            };
            match found {
                Some(t) if t.revoked_at.is_none() => Principal {
                    name: t.name,
                    role: t.role,
                    domains: t.domains,
                    authenticated: true,
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
        Scope::Domain | Scope::Job => {
            let params = match req.extract_parts::<RawPathParams>().await {
                Ok(p) => p,
                Err(e) => return e.into_response(),
            };
            let param = |key: &str| {
                params
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            };
            match scope {
                Scope::Domain => param("domain"),
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
