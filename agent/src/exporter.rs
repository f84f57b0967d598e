//! The HTTP endpoint operators scrape: `/metrics` (Prometheus text format),
//! and nothing else: metrics carry no account, client or content, so this
//! port may be opened beyond the host (`metrics.allow_remote`), while the
//! status report, which lists them, is on the API. Loopback by default
//! (`metrics.listen`).
//!
//! `/metrics` encodes the snapshot the agent keeps: a scrape never touches
//! the kernel or the ledger.

use std::net::SocketAddr;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use crate::metrics::{self, SharedMetrics};

#[derive(Clone)]
struct ExporterState {
    metrics: SharedMetrics,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "metrics address {addr}: {source} (another process, or another meterd, listens there: set metrics.listen)"
)]
pub struct ExporterError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` and serves in the background; returns the bound address
/// (useful with port 0).
pub async fn spawn(addr: SocketAddr, metrics: SharedMetrics) -> Result<SocketAddr, ExporterError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ExporterError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ExporterError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(ExporterState { metrics });
    let max = crate::serve::per_listener(crate::serve::raise_fd_limit());
    tokio::spawn(crate::serve::serve(listener, app, max, "metrics"));
    Ok(bound)
}

async fn scrape(State(state): State<ExporterState>) -> impl IntoResponse {
    let text = match state.metrics.lock() {
        Ok(m) => metrics::encode(&m),
        Err(_) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics lock poisoned\n".to_owned(),
            )
                .into_response();
        }
    };
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}
