//! Attribution: which account and content a connection belongs to, as the
//! streaming server tells meterd through the API (patent step S6).
//!
//! Owns the attributions that arrived before the agent saw their
//! connection: kept for `api.pending_ttl`, applied when the session appears
//! in a read or is settled. A session without one is billed to its client
//! address.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::sessions::Session;

/// Who a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Attribution {
    pub account: String,
    #[serde(default)]
    pub content: Option<String>,
}

/// How an API request names its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionRef {
    /// The socket cookie (`SO_COOKIE` on the server's socket).
    Cookie(u64),
    /// The client's address and the server's port.
    Tuple {
        client: SocketAddr,
        server_port: u16,
    },
}

impl ConnectionRef {
    /// Whether `session` is the connection named.
    pub fn matches(&self, session: &Session) -> bool {
        match *self {
            Self::Cookie(c) => session.cookie == c && c != 0,
            Self::Tuple {
                client,
                server_port,
            } => session.client() == client && session.server_port == server_port,
        }
    }
}

/// Attributions waiting for their connection.
#[derive(Debug, Default)]
pub struct Pending {
    waiting: HashMap<ConnectionRef, (Attribution, Instant)>,
}

impl Pending {
    /// Keeps an attribution until its connection shows up.
    pub fn add(&mut self, conn: ConnectionRef, attribution: Attribution, now: Instant) {
        self.waiting.insert(conn, (attribution, now));
    }

    /// Takes the attribution waiting for `session`, if any.
    pub fn take_for(&mut self, session: &Session) -> Option<Attribution> {
        if self.waiting.is_empty() {
            return None;
        }
        let by_cookie = ConnectionRef::Cookie(session.cookie);
        let by_tuple = ConnectionRef::Tuple {
            client: session.client(),
            server_port: session.server_port,
        };
        self.waiting
            .remove(&by_cookie)
            .or_else(|| self.waiting.remove(&by_tuple))
            .map(|(a, _)| a)
    }

    /// Drops attributions older than `ttl`; returns how many.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> usize {
        let before = self.waiting.len();
        self.waiting
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
        before - self.waiting.len()
    }

    /// Number waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}
