//! Serving the API and the metrics endpoint without letting clients hold
//! the agent's resources: every connection must send its request head
//! within [`HEADER_TIMEOUT`] and is closed after [`CONNECTION_TIMEOUT`],
//! and each listener accepts at most a bounded number of connections at
//! once (the rest wait in the kernel's accept queue, holding none of the
//! agent's file descriptors). Half-open or slow clients cannot starve
//! `/metrics`, admission or the billing loop's own files.

use std::{sync::Arc, time::Duration};

use axum::{Router, serve::Listener};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::sync::Semaphore;

/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection (requests to meterd take milliseconds).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until the listener fails, with at most
/// `max_connections` at once.
pub async fn serve<L>(mut listener: L, app: Router, max_connections: usize, what: &'static str)
where
    L: Listener,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (io, _) = listener.accept().await;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(io), service);
            if tokio::time::timeout(CONNECTION_TIMEOUT, connection)
                .await
                .is_err()
            {
                tracing::debug!(
                    listener = what,
                    "connection closed after {CONNECTION_TIMEOUT:?}"
                );
            }
        });
    }
}

/// Raises the soft limit on open files to the hard one: the agent keeps
/// per-listener caps well below it, so its own work (ledger, maps, procfs)
/// always has descriptors left.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: valid pointer; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

/// Connections each listener may hold at once, for a descriptor limit of
/// `nofile`: a quarter of it each, at most 4096, keeping at least half
/// of the limit for the agent's own files.
pub fn per_listener(nofile: u64) -> usize {
    usize::try_from((nofile / 4).clamp(16, 4096)).unwrap_or(4096)
}
