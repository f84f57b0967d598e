//! The HTTP endpoint operators scrape: `/metrics` (Prometheus text format)
//! and `/v1/status` (read-only JSON of the live sessions, the interval and
//! the load). Loopback by default (`metrics.listen`).
//!
//! `/metrics` encodes the snapshot the agent keeps; `/v1/status` asks the
//! agent loop, which owns the sessions.

use std::net::SocketAddr;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    api::Command,
    metrics::{self, SharedMetrics},
    status::StatusReport,
};

#[derive(Clone)]
struct ExporterState {
    metrics: SharedMetrics,
    commands: mpsc::Sender<Command>,
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
pub async fn spawn(
    addr: SocketAddr,
    metrics: SharedMetrics,
    commands: mpsc::Sender<Command>,
) -> Result<SocketAddr, ExporterError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ExporterError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ExporterError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/v1/status", get(status))
        .with_state(ExporterState { metrics, commands });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
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

async fn status(
    State(state): State<ExporterState>,
) -> Result<Json<StatusReport>, (StatusCode, &'static str)> {
    let (reply, report) = oneshot::channel();
    let unavailable = (StatusCode::SERVICE_UNAVAILABLE, "meterd is stopping\n");
    state
        .commands
        .send(Command::Status { reply })
        .await
        .map_err(|_| unavailable)?;
    report.await.map(Json).map_err(|_| unavailable)
}
