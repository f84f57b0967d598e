//! The local API of the streaming server and the operator (patent step S6
//! and the check processing):
//!
//! - `GET /v1/authorize`: nginx's `auth_request` target. It attributes the
//!   connection named by `X-Meterd-Client` and `X-Meterd-Server-Port` to
//!   `X-Meterd-Account` (and `X-Meterd-Content`) and answers 204, or 403
//!   with `X-Meterd-Reason` when the account is blocked or over its limit.
//! - `POST /v1/rtmp`: nginx-rtmp's `on_play`/`on_publish`/`on_update`/
//!   `on_done` callbacks (form fields `call`, `addr`, `name`, `args`, and the
//!   play URL's query such as `account`): 2xx or 403; a 403 to `on_update`
//!   makes nginx-rtmp drop the player.
//! - `POST /v1/attribute`: attribution by JSON (cookie or tuple).
//! - `POST /v1/accounts/{id}/credit`: a prepaid top-up, idempotent by the
//!   caller's `credit_id`.
//! - `GET /v1/status`: open viewing sessions, with accounts and clients,
//!   which is why it is here and not on the metrics port.
//!
//! Listens on a unix socket (mode 0660, owned by `api.group` if set) or on
//! a loopback TCP address with a bearer token, checked (in constant time)
//! before any body is read, on a thread and runtime of its own, so that
//! the run loop's cycles and commits never hold a request up. Admissions
//! (`/v1/authorize`, `/v1/rtmp`) are decided there by the [`Gate`] from
//! the standings the loop publishes, journaled, and handed to the loop
//! without waiting for it; the other requests become [`Command`]s for the
//! run loop, which owns the billing core.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Form, Json, Router,
    extract::{Path as UrlPath, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

pub use crate::core::{Decision, Outcome};
use crate::{
    admission::{Gate, GateError},
    attribution::{Attribution, ConnectionRef},
    config::Config,
};

/// A request for the run loop.
#[derive(Debug)]
pub enum Command {
    /// Attribute a connection.
    Attribute {
        conn: ConnectionRef,
        attribution: Attribution,
        reply: oneshot::Sender<Outcome>,
    },
    /// A prepaid top-up.
    Credit {
        account: String,
        credit_id: String,
        amount_minor: u64,
        reply: oneshot::Sender<Result<CreditReply, String>>,
    },
    /// Report the open sessions and the governor's state.
    Status {
        reply: oneshot::Sender<crate::status::StatusReport>,
    },
}

/// The answer to a top-up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CreditReply {
    /// `credited`, or `duplicate` for a `credit_id` seen before.
    pub status: &'static str,
    pub account: String,
    pub limit_minor: u64,
    pub spent_minor: i64,
    /// `ok` or `limit_reached` after the top-up.
    pub standing: &'static str,
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

/// Body of `POST /v1/accounts/{id}/credit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    /// The caller's id of this top-up: the same id twice credits once.
    pub credit_id: String,
    /// Minor units to add to the prepaid balance.
    pub amount_minor: u64,
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
    #[error(
        "api.socket {0} exists and is not a socket: meterd replaces only a socket it left; choose another path"
    )]
    NotASocket(PathBuf),
    #[error(
        "api.group {0:?}: no such group on this host: create it, or name the streaming server's group (e.g. \"www-data\")"
    )]
    NoGroup(String),
    #[error("API address {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the API's thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Clone)]
struct ApiState {
    commands: mpsc::Sender<Command>,
    gate: Arc<Gate>,
    token: Option<Arc<str>>,
}

/// The API, served on its own thread until this is dropped.
pub struct ApiServer {
    /// Where it listens: the socket's path or the TCP address.
    pub at: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The API's routes.
fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/attribute", post(attribute))
        .route("/v1/authorize", get(authorize))
        .route("/v1/rtmp", post(rtmp))
        .route("/v1/accounts/{id}/credit", post(credit))
        .route("/v1/status", get(status))
        .layer(middleware::from_fn_with_state(state.clone(), check_token))
        .with_state(state)
}

/// Binds the API and serves it on a thread of its own (with its own
/// single-threaded runtime), so that nothing the run loop does delays a
/// request that does not need the loop.
pub async fn spawn(
    config: &Config,
    commands: mpsc::Sender<Command>,
    gate: Arc<Gate>,
) -> Result<ApiServer, ApiError> {
    let state = ApiState {
        commands,
        gate,
        token: config.api.token.as_deref().map(Arc::from),
    };
    let app = router(state);
    let socket = config.api.socket_path(&config.agent);
    let group = config.api.group.clone();
    let listen = config.api.listen;
    let (ready, bound) = oneshot::channel::<Result<String, ApiError>>();
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("meterd-api".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready.send(Err(ApiError::Thread(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let max = crate::serve::per_listener(crate::serve::raise_fd_limit());
                let serving = match listen_on(socket, group.as_deref(), listen).await {
                    Ok((Listening::Unix(l), at)) => {
                        let _ = ready.send(Ok(at));
                        tokio::spawn(crate::serve::serve(l, app, max, "api"))
                    }
                    Ok((Listening::Tcp(l), at)) => {
                        let _ = ready.send(Ok(at));
                        tokio::spawn(crate::serve::serve(l, app, max, "api"))
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = stopped.await;
                serving.abort();
            });
        })
        .map_err(ApiError::Thread)?;
    let mut server = ApiServer {
        at: String::new(),
        stop: Some(stop),
        thread: Some(thread),
    };
    server.at = bound.await.map_err(|_| {
        ApiError::Thread(std::io::Error::other("the API's thread ended at start"))
    })??;
    Ok(server)
}

enum Listening {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

async fn listen_on(
    socket: Option<PathBuf>,
    group: Option<&str>,
    listen: Option<SocketAddr>,
) -> Result<(Listening, String), ApiError> {
    if let Some(path) = socket {
        let listener = bind_unix(&path, group).await?;
        Ok((Listening::Unix(listener), path.display().to_string()))
    } else {
        let addr = listen.expect("validated: socket or listen");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Listen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ApiError::Listen { addr, source })?;
        Ok((Listening::Tcp(listener), local.to_string()))
    }
}

async fn bind_unix(path: &Path, group: Option<&str>) -> Result<tokio::net::UnixListener, ApiError> {
    let err = |source| ApiError::Socket {
        path: path.to_owned(),
        source,
    };
    let gid = group.map(|g| gid_of(g).ok_or_else(|| ApiError::NoGroup(g.to_owned())));
    let gid = gid.transpose()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_owned()));
        }
        // A socket left by a stopped agent is removed; a live one is not.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    Ok(listener)
}

/// The id of group `name`.
fn gid_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: valid pointers to our own buffers, sized as passed.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &raw mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(group.gr_gid)
}

/// On a TCP listener, the bearer token, compared in constant time, before
/// any body is read or parsed.
async fn check_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
        }
    }
    next.run(request).await
}

/// Compares two secrets without leaking where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type ApiResult<T> = Result<T, (StatusCode, String)>;

fn bad(message: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, format!("{}\n", message.into()))
}

fn unavailable() -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "meterd is stopping\n".to_owned(),
    )
}

/// Checks an account and a content id: bounded and printable.
fn attribution(account: &str, content: Option<&str>) -> ApiResult<Attribution> {
    let printable = |s: &str| !s.chars().any(char::is_control);
    if account.trim().is_empty() || account.len() > 256 || !printable(account) {
        return Err(bad(
            "account must be 1 to 256 bytes, without control characters",
        ));
    }
    if content.is_some_and(|c| c.len() > 256 || !printable(c)) {
        return Err(bad(
            "content must be at most 256 bytes, without control characters",
        ));
    }
    Ok(Attribution {
        account: account.to_owned(),
        content: content.filter(|c| !c.is_empty()).map(str::to_owned),
        denied: false,
    })
}

async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> ApiResult<T> {
    let (reply, answer) = oneshot::channel();
    state
        .commands
        .send(make(reply))
        .await
        .map_err(|_| unavailable())?;
    answer.await.map_err(|_| unavailable())
}

async fn attribute(
    State(state): State<ApiState>,
    Json(request): Json<AttributeRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let conn = request.connection().map_err(bad)?;
    let attribution = attribution(&request.account, request.content.as_deref())?;
    let outcome = ask(&state, |reply| Command::Attribute {
        conn,
        attribution,
        reply,
    })
    .await?;
    if outcome == Outcome::Refused {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "too many attributions are waiting for their connection; try again\n".into(),
        ));
    }
    Ok(Json(serde_json::json!({ "status": outcome })))
}

/// `X-Meterd-Client: $remote_addr:$remote_port` (IPv6 without brackets,
/// as nginx writes it, or with).
fn client_header(headers: &HeaderMap) -> ApiResult<SocketAddr> {
    let text = header_str(headers, "x-meterd-client")?
        .ok_or_else(|| bad("X-Meterd-Client ($remote_addr:$remote_port) is missing"))?;
    let (ip, port) = text
        .rsplit_once(':')
        .ok_or_else(|| bad(format!("X-Meterd-Client {text:?} is not address:port")))?;
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            bad(format!(
                "X-Meterd-Client {text:?}: {ip:?} is not an IP address"
            ))
        })?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("X-Meterd-Client {text:?}: {port:?} is not a port")))?;
    Ok(SocketAddr::new(ip, port))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> ApiResult<Option<&'a str>> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::trim)
                .map_err(|_| bad(format!("{name} is not text")))
        })
        .transpose()
}

fn decision_response(decision: Decision, allowed: StatusCode) -> Response {
    match decision {
        Decision::Allow(_) => allowed.into_response(),
        Decision::Deny(reason) => {
            let status = if reason == "busy" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::FORBIDDEN
            };
            let mut response = (status, format!("{reason}\n")).into_response();
            response
                .headers_mut()
                .insert("x-meterd-reason", HeaderValue::from_static(reason));
            response
        }
    }
}

async fn authorize(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult<Response> {
    let client = client_header(&headers)?;
    let server_port: u16 = header_str(&headers, "x-meterd-server-port")?
        .ok_or_else(|| bad("X-Meterd-Server-Port ($server_port) is missing"))?
        .parse()
        .map_err(|_| bad("X-Meterd-Server-Port is not a port"))?;
    let account = header_str(&headers, "x-meterd-account")?
        .ok_or_else(|| bad("X-Meterd-Account is missing"))?;
    let attribution = attribution(account, header_str(&headers, "x-meterd-content")?)?;
    let conn = ConnectionRef::Tuple {
        client,
        server_port,
    };
    let decision = admit(&state, conn, attribution, Some(server_port))?;
    Ok(decision_response(decision, StatusCode::NO_CONTENT))
}

/// An admission through the [`Gate`]: decided from the published
/// standings and journaled before it is answered, without the run loop.
fn admit(
    state: &ApiState,
    conn: ConnectionRef,
    attribution: Attribution,
    server_port: Option<u16>,
) -> ApiResult<Decision> {
    match state.gate.admit(conn, attribution, server_port) {
        Ok(decision) => Ok(decision),
        Err(GateError::Busy) => Ok(Decision::Deny("busy")),
        Err(GateError::Stopping) => Err(unavailable()),
        Err(e @ GateError::Journal(_)) => {
            tracing::error!(error = %e, "admission not recorded: answered 503");
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("meterd cannot record the admission: {e}\n"),
            ))
        }
    }
}

/// An nginx-rtmp callback. The play or publish URL's query is appended to
/// the form as is, so the account is the form field `account` (or an
/// `account=` inside `args`); the content is the stream `name`.
#[derive(Debug, Deserialize)]
pub struct RtmpCallback {
    pub call: String,
    pub addr: IpAddr,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub args: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
}

async fn rtmp(
    State(state): State<ApiState>,
    Form(callback): Form<RtmpCallback>,
) -> ApiResult<Response> {
    if callback.call == "done" || callback.call == "update_publish" || callback.call == "publish" {
        return Ok(StatusCode::OK.into_response());
    }
    let account = callback.account.clone().or_else(|| {
        callback.args.as_deref().and_then(|args| {
            args.split('&')
                .find_map(|kv| kv.strip_prefix("account="))
                .map(str::to_owned)
        })
    });
    let Some(account) = account else {
        return Ok(decision_response(
            Decision::Deny("no_account"),
            StatusCode::OK,
        ));
    };
    let attribution = attribution(&account, callback.name.as_deref())?;
    let conn = ConnectionRef::Client(callback.addr);
    let decision = admit(&state, conn, attribution, None)?;
    Ok(decision_response(decision, StatusCode::OK))
}

async fn credit(
    State(state): State<ApiState>,
    UrlPath(account): UrlPath<String>,
    Json(request): Json<CreditRequest>,
) -> ApiResult<Json<CreditReply>> {
    if request.credit_id.is_empty()
        || request.credit_id.len() > 128
        || request.credit_id.chars().any(char::is_control)
    {
        return Err(bad(
            "credit_id must be 1 to 128 bytes, without control characters",
        ));
    }
    if request.amount_minor == 0 || request.amount_minor > 1_000_000_000_000 {
        return Err(bad("amount_minor must be between 1 and 10^12 minor units"));
    }
    let answer = ask(&state, |reply| Command::Credit {
        account,
        credit_id: request.credit_id,
        amount_minor: request.amount_minor,
        reply,
    })
    .await?;
    answer
        .map(Json)
        .map_err(|e| (StatusCode::NOT_FOUND, format!("{e}\n")))
}

async fn status(State(state): State<ApiState>) -> ApiResult<Json<crate::status::StatusReport>> {
    ask(&state, |reply| Command::Status { reply })
        .await
        .map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeg"));
        assert!(!constant_time_eq(b"0123", b"0123456789abcdef"));
    }

    #[test]
    fn client_header_takes_nginx_forms() {
        let mut h = HeaderMap::new();
        for (text, want) in [
            ("203.0.113.7:51234", "203.0.113.7:51234"),
            ("::1:40000", "[::1]:40000"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ] {
            h.insert("x-meterd-client", HeaderValue::from_static(text));
            assert_eq!(client_header(&h).unwrap().to_string(), want);
        }
        h.insert("x-meterd-client", HeaderValue::from_static("nonsense"));
        assert!(client_header(&h).is_err());
    }
}
