//! flywheel's HTTP API: routes, request and response bodies, the one error table, and the
//! steward console's pages (`console/`), which share the API's permission table.
//!
//! Only this crate knows HTTP and JSON wire shapes. It validates at the edge (into the domain
//! crate's newtypes), stores through the db crate, reads the registry and leaves every alias
//! move and version decision to `flywheel-promotion` and every prediction to
//! `flywheel-serving`; it never trains, evaluates or talks to the queue — it nudges the
//! scheduler and returns.

mod auth;
mod console;
mod error;
mod openapi;
mod principal;
mod route;
mod routes;
mod server;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use flywheel_db::Db;
use flywheel_registry::Registry;
use flywheel_telemetry::Metrics;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower_http::timeout::RequestBodyTimeoutLayer;

pub use error::{ApiError, ErrorCode};
pub use principal::{AuthMode, Principal};

/// What one request, and one client, may take of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch: usize,
    pub max_text_chars: usize,
    /// Connections open at once; past it, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// A request's headers must arrive within this; a keep-alive connection idle this long
    /// closes.
    pub header_read_timeout: Duration,
    /// The longest pause allowed between two pieces of a request body.
    pub body_idle_timeout: Duration,
    /// The largest LoRA rank a domain or job may ask for: what the serving fleet loads.
    pub max_lora_rank: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_batch: 10_000,
            max_text_chars: 16_384,
            // Below a default descriptor limit of 1,024, with room for the database pool, the
            // registry and logs: raise `ulimit -n` and this together.
            max_connections: 768,
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            max_lora_rank: 64,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub registry: Registry,
    pub metrics: Metrics,
    /// Wakes the scheduler when new corrections land.
    pub nudge: Arc<Notify>,
    pub limits: Limits,
    pub auth: AuthMode,
    /// When set, `/metrics` answers only to `Authorization: Bearer <this>` (it names every
    /// domain); stored as its sha256.
    pub metrics_token_hash: Option<String>,
    /// Answers predictions (`/v1/domains/{d}/predict`).
    pub serving: flywheel_serving::Serving,
    /// Whether `/metrics` here carries the gauges read from the database (jobs, pending
    /// approvals, backlog, outbox): true in the scheduler's process only, one per deployment.
    pub deployment_gauges: bool,
}

/// What a process serves over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The whole API.
    Full,
    /// `/healthz` and `/metrics` only: worker and scheduler processes, for probes and scraping.
    Ops,
}

pub fn router(state: AppState, surface: Surface) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let routes = match surface {
        Surface::Full => routes::router(surface)
            .merge(console::router())
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                auth::authorize,
            )),
        Surface::Ops => routes::router(surface),
    };
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_latency,
        ))
        .layer(axum::middleware::map_response(error::contract))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyTimeoutLayer::new(state.limits.body_idle_timeout))
        .with_state(state)
}

/// Nothing here: a page under the console, `404 route_not_found` elsewhere.
async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with(console::PREFIX) {
        return console::page_error(axum::http::StatusCode::NOT_FOUND, "No such page.");
    }
    axum::response::IntoResponse::into_response(routes::no_route())
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    if uri.path().starts_with(console::PREFIX) {
        return console::page_error(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "This page does not take that method; go back and use its links and buttons.",
        );
    }
    axum::response::IntoResponse::into_response(routes::wrong_method(&method))
}

/// Serves the API on `listener` until `shutdown` resolves, finishing in-flight requests,
/// within the connection limits of `state.limits` (`server.rs`).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    surface: Surface,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.limits.clone();
    server::run(listener, router(state, surface), &limits, shutdown).await
}

async fn record_latency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .http_server_request_duration
        .with_label_values(&[method.as_str(), route.as_str(), response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}
