//! What one entry of the route table says: method, path, who may call it, what it documents
//! and which handler serves it. The router, the permission check and `/openapi.json` all read
//! the one table (`routes::ROUTES`), so they cannot disagree.

use axum::routing::{MethodFilter, MethodRouter};
use flywheel_domain::Role;

use crate::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Patch => "PATCH",
            Verb::Delete => "DELETE",
        }
    }

    pub fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Patch => MethodFilter::PATCH,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// Where a route's domain comes from, for the scope check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Not domain-specific (or filtered by the handler, like the domain list).
    None,
    /// The `{domain}` path parameter.
    Domain,
    /// The domain of the job in the `{id}` path parameter.
    Job,
    /// The domain of the logged prediction in the `{id}` path parameter.
    Prediction,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token; served by every process, API or not (`/healthz`, `/metrics`).
    Probe,
    /// No token; served with the API.
    Public,
    /// A token of one of these roles, scoped to the route's domain as `Scope` says.
    Roles(&'static [Role], Scope),
}

const ALL: &[Role] = &[Role::Admin, Role::Department, Role::Steward];
const ADMIN: &[Role] = &[Role::Admin];
const DEPARTMENT: &[Role] = &[Role::Admin, Role::Department];
const STEWARD: &[Role] = &[Role::Admin, Role::Steward];
/// Who may ask for predictions: production apps (`serving` tokens) and the domain's owners.
const PREDICTING: &[Role] = &[Role::Admin, Role::Department, Role::Serving];
/// Who may judge an answer: whoever asked, and the stewards who review.
const JUDGING: &[Role] = &[Role::Admin, Role::Department, Role::Serving, Role::Steward];

// Who may call a route, as the route table names it.
pub const PROBE: Access = Access::Probe;
pub const PUBLIC: Access = Access::Public;
pub const ADMIN_ONLY: Access = Access::Roles(ADMIN, Scope::None);
/// Every role; the handler lists only what the token is scoped to.
pub const ANY_ROLE: Access = Access::Roles(ALL, Scope::None);
pub const ANY_ROLE_OF_DOMAIN: Access = Access::Roles(ALL, Scope::Domain);
/// Admins and departments; the handler lists only what the token is scoped to.
pub const DEPARTMENTS: Access = Access::Roles(DEPARTMENT, Scope::None);
pub const DEPARTMENT_OF_DOMAIN: Access = Access::Roles(DEPARTMENT, Scope::Domain);
pub const DEPARTMENT_OF_JOB: Access = Access::Roles(DEPARTMENT, Scope::Job);
pub const STEWARD_OF_DOMAIN: Access = Access::Roles(STEWARD, Scope::Domain);
pub const PREDICTOR_OF_DOMAIN: Access = Access::Roles(PREDICTING, Scope::Domain);
/// The domain is named in the body (`model`): the handler checks the token's scope.
pub const PREDICTORS: Access = Access::Roles(PREDICTING, Scope::None);
pub const JUDGE_OF_PREDICTION: Access = Access::Roles(JUDGING, Scope::Prediction);

pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    /// The JSON request body in words; empty for none.
    pub body: &'static str,
    /// The success status.
    pub status: u16,
    /// The handler, mounted for `verb`.
    pub handler: fn(MethodFilter) -> MethodRouter<AppState>,
}

/// Builds the route table from entries of two lines each,
/// `Verb "path" => handler, ACCESS, success status,` and `"summary", "request body";`
/// (the body in words, `""` for none).
macro_rules! routes {
    ($($verb:ident $path:literal => $handler:path, $access:ident, $status:literal,
        $summary:literal, $body:literal;)*) => {
        &[$(
            $crate::route::Route {
                verb: $crate::route::Verb::$verb,
                path: $path,
                access: $access,
                status: $status,
                body: $body,
                summary: $summary,
                handler: |m| axum::routing::on(m, $handler),
            }
        ),*]
    };
}
pub(crate) use routes;
