//! The local API where the streaming server attributes a connection to an
//! account and a content id when it starts serving it (patent step S6):
//! `POST /v1/attribute`.
//!
//! Listens on a unix socket (mode 0660, so a group such as the streaming
//! server's can write) or on a loopback TCP address with a bearer token;
//! config validation refuses anything else. Requests become [`Command`]s for
//! the agent loop, which owns the sessions.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    routing::post,
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

pub use crate::core::Outcome;
use crate::{
    attribution::{Attribution, ConnectionRef},
    config::Config,
};

/// A request for the agent loop.
#[derive(Debug)]
pub enum Command {
    /// Attribute a connection.
    Attribute {
        conn: ConnectionRef,
        attribution: Attribution,
        reply: oneshot::Sender<Outcome>,
    },
    /// Report the live sessions and the governor's state.
    Status {
        reply: oneshot::Sender<crate::status::StatusReport>,
    },
}

/// Body of `POST /v1/attribute`: a cookie, or the client address and port
/// with the server port, plus the account and optional content.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeRequest {
    pub cookie: Option<u64>,
    pub client_addr: Option<IpAddr>,
    pub client_port: Option<u16>,
    pub server_port: Option<u16>,
    pub account: String,
    pub content: Option<String>,
}

impl AttributeRequest {
    fn connection(&self) -> Result<ConnectionRef, &'static str> {
        match (
            self.cookie,
            self.client_addr,
            self.client_port,
            self.server_port,
        ) {
            (Some(0), ..) => Err("cookie 0 is no socket's cookie"),
            (Some(c), None, None, None) => Ok(ConnectionRef::Cookie(c)),
            (None, Some(ip), Some(port), Some(server_port)) => Ok(ConnectionRef::Tuple {
                client: SocketAddr::new(ip, port),
                server_port,
            }),
            _ => Err(
                "name the connection by `cookie`, or by `client_addr`, `client_port` and `server_port`",
            ),
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "API socket {0} is in use by another running meterd: give this one its own api.socket (or agent.pin_dir)"
    )]
    InUse(PathBuf),
    #[error("API address {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct ApiState {
    commands: mpsc::Sender<Command>,
    token: Option<Arc<str>>,
}

/// Binds the API and serves it in the background; returns where it listens.
pub async fn spawn(config: &Config, commands: mpsc::Sender<Command>) -> Result<String, ApiError> {
    let state = ApiState {
        commands,
        token: config.api.token.as_deref().map(Arc::from),
    };
    let app = Router::new()
        .route("/v1/attribute", post(attribute))
        .with_state(state);
    if let Some(path) = config.api.socket_path(&config.agent) {
        let listener = bind_unix(&path).await?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "API server stopped");
            }
        });
        Ok(path.display().to_string())
    } else {
        let addr = config.api.listen.expect("validated: socket or listen");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Listen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ApiError::Listen { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "API server stopped");
            }
        });
        Ok(local.to_string())
    }
}

async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ApiError> {
    let err = |source| ApiError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        // A socket file left by a stopped agent is removed; a live one is not.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

async fn attribute(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(request): Json<AttributeRequest>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    if let Some(token) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token) {
            return Err((
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token\n".into(),
            ));
        }
    }
    let conn = request
        .connection()
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    let printable = |s: &str| !s.chars().any(char::is_control);
    if request.account.trim().is_empty()
        || request.account.len() > 256
        || !printable(&request.account)
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "account must be 1 to 256 bytes, without control characters\n".into(),
        ));
    }
    if request
        .content
        .as_deref()
        .is_some_and(|c| c.len() > 256 || !printable(c))
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "content must be at most 256 bytes, without control characters\n".into(),
        ));
    }
    let (reply, outcome) = oneshot::channel();
    let command = Command::Attribute {
        conn,
        attribution: Attribution {
            account: request.account,
            content: request.content,
        },
        reply,
    };
    let unavailable = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "meterd is stopping\n".to_owned(),
        )
    };
    state
        .commands
        .send(command)
        .await
        .map_err(|_| unavailable())?;
    let outcome = outcome.await.map_err(|_| unavailable())?;
    if outcome == Outcome::Refused {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "too many attributions are waiting for their connection; try again\n".into(),
        ));
    }
    Ok(Json(serde_json::json!({ "status": outcome })))
}
