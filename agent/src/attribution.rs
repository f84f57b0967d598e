//! Attribution: which account and content a connection belongs to, as the
//! streaming server tells meterd through the API (patent step S6).
//!
//! Owns the attributions that arrived before the agent saw their
//! connection: kept for `api.pending_ttl` (and at most a bounded number),
//! applied when the connection appears in a read or a record. A connection
//! without one is billed to its client address.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

/// Who a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Attribution {
    pub account: String,
    #[serde(default)]
    pub content: Option<String>,
    /// The streaming server was told to refuse this connection's request:
    /// what it sends now (the refusal) is billed to nobody.
    #[serde(skip)]
    pub denied: bool,
}

/// How an API request names its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionRef {
    /// The socket cookie (`SO_COOKIE` on the server's socket).
    Cookie(u64),
    /// The client's address and the server's port.
    Tuple {
        client: SocketAddr,
        server_port: u16,
    },
    /// Only the client's address (nginx-rtmp's callbacks give no port):
    /// the newest unattributed TCP connection from it.
    Client(IpAddr),
}

/// Attributions waiting for their connection, at most `capacity` of them.
#[derive(Debug)]
pub struct Pending {
    waiting: HashMap<ConnectionRef, (Attribution, Instant)>,
    capacity: usize,
}

impl Default for Pending {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

/// Pending attributions kept at most by default: far more than a busy
/// host has connections being set up at once.
pub const DEFAULT_CAPACITY: usize = 65_536;

impl Pending {
    /// An empty table that keeps at most `capacity` attributions.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            waiting: HashMap::new(),
            capacity,
        }
    }

    /// Keeps an attribution until its connection shows up; false (and
    /// nothing kept) when `capacity` are already waiting.
    /// `forced` keeps it even then: the API reserved its slot before
    /// answering (see `crate::admission`).
    pub fn add(
        &mut self,
        conn: ConnectionRef,
        attribution: Attribution,
        now: Instant,
        forced: bool,
    ) -> bool {
        let conn = canonical(conn);
        if !forced && self.waiting.len() >= self.capacity && !self.waiting.contains_key(&conn) {
            return false;
        }
        self.waiting.insert(conn, (attribution, now));
        true
    }

    /// Takes the attribution waiting for the connection with this cookie
    /// (if TCP), client and server port.
    pub fn take(
        &mut self,
        cookie: Option<u64>,
        client: SocketAddr,
        server_port: u16,
    ) -> Option<Attribution> {
        if self.waiting.is_empty() {
            return None;
        }
        cookie
            .and_then(|c| self.waiting.remove(&ConnectionRef::Cookie(c)))
            .or_else(|| {
                self.waiting.remove(&canonical(ConnectionRef::Tuple {
                    client,
                    server_port,
                }))
            })
            .or_else(|| {
                self.waiting
                    .remove(&ConnectionRef::Client(client.ip().to_canonical()))
            })
            .map(|(a, _)| a)
    }

    /// Drops attributions older than `ttl`; returns how many.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> usize {
        let before = self.waiting.len();
        self.waiting
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
        if self.waiting.capacity() > 4 * self.waiting.len().max(1024) {
            // Give memory back after a burst.
            self.waiting.shrink_to_fit();
        }
        before - self.waiting.len()
    }

    /// The attributions waiting, with when each arrived.
    pub fn entries(&self) -> impl Iterator<Item = (&ConnectionRef, &Attribution, Instant)> {
        self.waiting.iter().map(|(c, (a, at))| (c, a, *at))
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

/// IPv4-mapped client addresses match IPv4 connections.
fn canonical(conn: ConnectionRef) -> ConnectionRef {
    match conn {
        ConnectionRef::Tuple {
            client,
            server_port,
        } => ConnectionRef::Tuple {
            client: SocketAddr::new(client.ip().to_canonical(), client.port()),
            server_port,
        },
        ConnectionRef::Client(ip) => ConnectionRef::Client(ip.to_canonical()),
        c @ ConnectionRef::Cookie(_) => c,
    }
}
