//! What runs when an account reaches its limit: an executable, a webhook on
//! loopback, or both. Both run in the background: a slow hook never delays
//! a billing cycle. Their outcome is logged.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A `limit_reached` event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimitReached {
    pub event: &'static str,
    pub account: String,
    pub spent_minor: i64,
    pub limit_minor: u64,
    pub currency: String,
}

/// Parses `http://<loopback>:<port>/<path>` into address and path; `None`
/// for anything else (https, a name, a non-loopback address).
pub fn loopback_url(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let addr: SocketAddr = authority.parse().ok()?;
    addr.ip().is_loopback().then(|| (addr, format!("/{path}")))
}

/// Runs the configured hooks for `event` in the background.
pub fn fire(event: &LimitReached, hook: Option<PathBuf>, webhook: Option<&str>) {
    if let Some(program) = hook {
        let event = event.clone();
        tokio::spawn(async move {
            let status = tokio::process::Command::new(&program)
                .env("METERD_EVENT", event.event)
                .env("METERD_ACCOUNT", &event.account)
                .env("METERD_SPENT_MINOR", event.spent_minor.to_string())
                .env("METERD_LIMIT_MINOR", event.limit_minor.to_string())
                .env("METERD_CURRENCY", &event.currency)
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(Duration::from_secs(30), status).await {
                Ok(Ok(s)) if s.success() => {
                    tracing::info!(account = %event.account, "limit hook ran");
                }
                Ok(Ok(s)) => {
                    tracing::warn!(account = %event.account, status = %s, hook = %program.display(), "limit hook failed");
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, hook = %program.display(), "limit hook could not start");
                }
                Err(_) => {
                    tracing::warn!(hook = %program.display(), "limit hook timed out after 30 s");
                }
            }
        });
    }
    if let Some((addr, path)) = webhook.and_then(loopback_url) {
        let event = event.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), post(addr, &path, &event)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    tracing::info!(account = %event.account, status, "limit webhook delivered");
                }
                Ok(Ok(status)) => tracing::warn!(status, %addr, "limit webhook refused"),
                Ok(Err(e)) => tracing::warn!(error = %e, %addr, "limit webhook failed"),
                Err(_) => tracing::warn!(%addr, "limit webhook timed out"),
            }
        });
    }
}

/// A minimal HTTP/1.1 POST; returns the status code.
async fn post(addr: SocketAddr, path: &str, event: &LimitReached) -> std::io::Result<u16> {
    let body = serde_json::to_vec(event)?;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let line = String::from_utf8_lossy(&response);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line in the response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_http() {
        assert_eq!(
            loopback_url("http://127.0.0.1:8081/limit"),
            Some(("127.0.0.1:8081".parse().unwrap(), "/limit".into()))
        );
        assert!(loopback_url("http://[::1]:80").is_some());
        assert!(loopback_url("http://192.168.1.2:80/x").is_none());
        assert!(loopback_url("https://127.0.0.1:80/x").is_none());
        assert!(loopback_url("http://localhost:80/x").is_none());
    }
}
