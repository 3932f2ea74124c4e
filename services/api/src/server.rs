//! The connection loop: hyper with the limits an endpoint that faces clients it does not
//! control needs, which `axum::serve` does not set (it has no timer, so no header deadline at
//! all: thousands of half-sent requests once held every file descriptor).
//!
//! - at most [`Limits::max_connections`] connections at once; past it, new ones wait
//!   in the kernel's backlog instead of failing `accept` with `EMFILE`;
//! - a request's headers must arrive within [`Limits::header_read_timeout`], which
//!   also closes a keep-alive connection idle that long;
//! - a body that pauses longer than [`Limits::body_idle_timeout`] is cut (the router's
//!   layer, `router`), so an upload idle mid-body frees its connection;
//! - an `accept` error (out of descriptors, say) is logged and retried after a pause, and the
//!   loop goes on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Limits;

/// Serves `app` on `listener` until `shutdown` completes, then lets requests in flight finish.
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// A failed `accept`: a connection that died in the backlog is nothing; anything else (the
/// process is out of descriptors, say) is logged, and accepting resumes after a pause in which
/// connections finish and free some.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
