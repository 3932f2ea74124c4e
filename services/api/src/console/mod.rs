//! The steward console: server-rendered pages on the API's port, for the people who review,
//! decide and roll back. Sign-in turns an API token into a session cookie (`session.rs`);
//! the token's role and scope then decide every page through the same permission check as
//! the API (`auth.rs` reads [`PAGES`] beside `routes::ROUTES`). Pages read what the API
//! reads and every decision goes through the API's own handlers' code (`routes::versions`),
//! so a click is audited exactly as a request.
//!
//! Templates and assets are compiled into the binary; nothing is fetched from elsewhere. The
//! pages work without JavaScript; `console.js` only refreshes job progress in place.

mod actions;
mod charts;
mod pages;
mod session;

use std::sync::LazyLock;

use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use minijinja::Environment;
use serde::Serialize;

use crate::route::{ANY_ROLE, ANY_ROLE_OF_DOMAIN, PUBLIC, Route, STEWARD_OF_DOMAIN, routes};
use crate::{ApiError, AppState};

pub(crate) use session::{principal_of, to_sign_in};

/// Where the console lives; every path under it is a page, not an API route.
pub const PREFIX: &str = "/console";

/// Every console page, with who may open it: read by the router and the permission check.
pub static PAGES: &[Route] = routes![
    Get "/" => self::home, PUBLIC, 303,
        "The console.", "";
    Get "/console/sign-in" => session::sign_in_page, PUBLIC, 200,
        "Sign in with an API token.", "";
    Post "/console/sign-in" => session::sign_in, PUBLIC, 303,
        "Open a session.", "form: token (or name without auth), csrf";
    Post "/console/sign-out" => session::sign_out, ANY_ROLE, 303,
        "End the session.", "form: csrf";
    Get "/console/assets/{file}" => self::asset, PUBLIC, 200,
        "Stylesheet and script.", "";
    Get "/console" => pages::inbox, ANY_ROLE, 200,
        "Inbox: what waits for a decision across the caller's domains.", "";
    Get "/console/domains/{domain}" => pages::domain, ANY_ROLE_OF_DOMAIN, 200,
        "A domain: production, accuracy over versions, corrections, jobs, aliases, audit.", "";
    Get "/console/domains/{domain}/jobs" => pages::jobs, ANY_ROLE_OF_DOMAIN, 200,
        "The domain's last jobs, as rows of the domain page (refreshed in place).", "";
    Get "/console/domains/{domain}/versions/{version}" => pages::version, ANY_ROLE_OF_DOMAIN, 200,
        "A version: status and decision trail, then the evaluation.", "";
    Get "/console/domains/{domain}/versions/{version}/flips" => pages::flips, ANY_ROLE_OF_DOMAIN, 200,
        "Every flipped answer the version's evaluation kept.", "";
    Get "/console/domains/{domain}/versions/{version}/report" => pages::report, ANY_ROLE_OF_DOMAIN, 200,
        "The evaluation report as published, with the status now and the decision trail.", "";
    Post "/console/domains/{domain}/versions/{version}/decide" => actions::decide, STEWARD_OF_DOMAIN, 303,
        "Approve, reject or override, with a reason.", "form: step, reason, csrf";
    Post "/console/domains/{domain}/rollback" => actions::rollback, STEWARD_OF_DOMAIN, 303,
        "Point production back at a version that was live.", "form: to, reason, csrf";
    Post "/console/domains/{domain}/aliases" => actions::move_alias, STEWARD_OF_DOMAIN, 303,
        "Point staging or canary at a version.", "form: alias, to, reason, csrf";
];

/// Whether `route` (a matched route's path) is a console page.
pub fn is_page(route: &str) -> bool {
    route == "/" || route.starts_with(PREFIX)
}

/// The console's pages, mounted beside the API's routes.
pub fn router() -> axum::Router<AppState> {
    PAGES.iter().fold(axum::Router::new(), |router, r| {
        router.route(r.path, (r.handler)(r.verb.filter()))
    })
}

async fn home() -> Redirect {
    Redirect::to(PREFIX)
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "console.css" => (include_str!("console.css"), "text/css; charset=utf-8"),
        "console.js" => (include_str!("console.js"), "text/javascript; charset=utf-8"),
        _ => return page_error(StatusCode::NOT_FOUND, "No such file."),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // Numbers as a steward reads them: shares as percentages, changes in points.
    env.add_filter("pct", |v: f64, digits: Option<usize>| {
        format!("{:.*}%", digits.unwrap_or(1), v * 100.0)
    });
    env.add_filter("pts", |v: f64| format!("{:+.1} pts", v * 100.0));
    env.add_filter("fixed", |v: f64, digits: usize| format!("{v:.digits$}"));
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("error.html", include_str!("templates/error.html")),
        ("sign_in.html", include_str!("templates/sign_in.html")),
        ("inbox.html", include_str!("templates/inbox.html")),
        ("domain.html", include_str!("templates/domain.html")),
        ("jobs.html", include_str!("templates/jobs.html")),
        ("version.html", include_str!("templates/version.html")),
        ("flips.html", include_str!("templates/flips.html")),
        ("flip_table.html", include_str!("templates/flip_table.html")),
    ] {
        env.add_template(name, source)
            .unwrap_or_else(|e| panic!("console template {name}: {e}"));
    }
    env
});

/// Renders a page. Templates are compiled in and checked by the tests, so a failure here is
/// a bug: it is logged and answered as a 500 page.
fn render(template: &str, ctx: impl Serialize) -> Response {
    let rendered = TEMPLATES.get_template(template).and_then(|t| t.render(ctx));
    match rendered {
        Ok(html) => no_store(Html(html).into_response()),
        Err(e) => {
            tracing::error!(template, error = %e, "console template failed");
            page_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "This page could not be drawn; see the server log.",
            )
        }
    }
}

/// Pages carry a steward's data: no cache keeps them after sign-out.
fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// A refusal as a page: the status, what went wrong, and a way back.
pub(crate) fn page_error(status: StatusCode, message: &str) -> Response {
    let html = TEMPLATES
        .get_template("error.html")
        .and_then(|t| {
            t.render(minijinja::context! {
                title => match status.as_u16() {
                    400 | 422 => "Please check what you sent",
                    401 => "Please sign in",
                    403 => "Not allowed",
                    404 => "Not found",
                    409 => "Changed meanwhile",
                    _ => status.canonical_reason().unwrap_or("Something went wrong"),
                },
                status => status.as_u16(),
                message => message,
            })
        })
        .unwrap_or_else(|_| message.to_owned());
    let mut response = no_store(Html(html).into_response());
    *response.status_mut() = status;
    response
}

/// An API error met while drawing a page or carrying out a form: the same code and message,
/// as a page.
pub(crate) struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl From<flywheel_db::DbError> for PageError {
    fn from(e: flywheel_db::DbError) -> Self {
        PageError(e.into())
    }
}

impl From<flywheel_registry::RegistryError> for PageError {
    fn from(e: flywheel_registry::RegistryError) -> Self {
        PageError(e.into())
    }
}

impl From<flywheel_promotion::PromotionError> for PageError {
    fn from(e: flywheel_promotion::PromotionError) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let message = format!("{} ({})", self.0.message, self.0.code.as_str());
        page_error(self.0.code.status(), &message)
    }
}

pub(crate) type PageResult<T = Response> = Result<T, PageError>;
