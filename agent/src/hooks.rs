//! Delivering a limit event to an executable, a webhook on loopback, or
//! both: one attempt each. Delivery is at-least-once: the event and its
//! pending deliveries are committed with the charges that crossed the limit
//! (the ledger's outbox), the run loop retries with [`backoff`] until the
//! receiver acknowledges (exit 0, or a 2xx), also across restarts, and the
//! receiver gets the event id (`METERD_EVENT_ID`, `X-Meterd-Event-Id` and
//! `event_id` in the JSON) to deduplicate.

use std::{net::SocketAddr, path::Path, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A `limit_reached` event, as hooks and webhooks receive it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LimitReached {
    /// Idempotent id: a receiver that sees it twice has seen it once.
    pub event_id: String,
    pub event: String,
    pub account: String,
    pub spent_minor: i64,
    pub limit_minor: u64,
    pub currency: String,
    /// `notify`, `deny` or `cut`.
    pub policy: String,
}

/// Where an event is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `billing.limit_hook`: acknowledged by exit status 0.
    Hook,
    /// `billing.limit_webhook`: acknowledged by a 2xx answer.
    Webhook,
}

impl Target {
    /// The name stored in the ledger's outbox.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hook => "hook",
            Self::Webhook => "webhook",
        }
    }

    /// The target of a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "hook" => Some(Self::Hook),
            "webhook" => Some(Self::Webhook),
            _ => None,
        }
    }
}

/// A pending delivery from the ledger's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event_id: String,
    pub target: Target,
    pub event: LimitReached,
    pub attempts: u32,
}

/// Delay before delivery attempt `attempts + 1`: 1 s, 2 s, 4 s, ... up to
/// 5 minutes.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(8)).min(Duration::from_secs(300))
}

/// Parses `http://<loopback>:<port>/<path>` into address and path; `None`
/// for anything else (https, a name, a non-loopback address).
pub fn loopback_url(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let addr: SocketAddr = authority.parse().ok()?;
    addr.ip().is_loopback().then(|| (addr, format!("/{path}")))
}

/// Delivers `event` to `target` once; `Ok` only when the receiver
/// acknowledged it. The caller retries (see the ledger's outbox).
pub async fn deliver(
    target: Target,
    event: &LimitReached,
    hook: Option<&Path>,
    webhook: Option<&str>,
) -> Result<(), String> {
    match target {
        Target::Hook => {
            let program = hook.ok_or("billing.limit_hook is not set any more")?;
            let status = tokio::process::Command::new(program)
                .env("METERD_EVENT", &event.event)
                .env("METERD_EVENT_ID", &event.event_id)
                .env("METERD_ACCOUNT", &event.account)
                .env("METERD_SPENT_MINOR", event.spent_minor.to_string())
                .env("METERD_LIMIT_MINOR", event.limit_minor.to_string())
                .env("METERD_CURRENCY", &event.currency)
                .env("METERD_POLICY", &event.policy)
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(Duration::from_secs(30), status).await {
                Ok(Ok(s)) if s.success() => Ok(()),
                Ok(Ok(s)) => Err(format!("{} exited with {s}", program.display())),
                Ok(Err(e)) => Err(format!("{} could not start: {e}", program.display())),
                Err(_) => Err(format!("{} timed out after 30 s", program.display())),
            }
        }
        Target::Webhook => {
            let (addr, path) = webhook
                .and_then(loopback_url)
                .ok_or("billing.limit_webhook is not set any more")?;
            match tokio::time::timeout(Duration::from_secs(10), post(addr, &path, event)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => Ok(()),
                Ok(Ok(status)) => Err(format!("{addr} answered {status}")),
                Ok(Err(e)) => Err(format!("{addr}: {e}")),
                Err(_) => Err(format!("{addr} timed out after 10 s")),
            }
        }
    }
}

/// A minimal HTTP/1.1 POST; returns the status code.
async fn post(addr: SocketAddr, path: &str, event: &LimitReached) -> std::io::Result<u16> {
    let body = serde_json::to_vec(event)?;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-Meterd-Event-Id: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        event.event_id,
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
