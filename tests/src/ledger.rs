//! meterd's ledger as its operators see it: `meterd ledger export` in JSON
//! lines and CSV, at both of its levels, and the SQLite file itself (through
//! the `sqlite3` CLI).
//!
//! meterd bills viewing sessions: a session is keyed by (service, client
//! address) for unattributed traffic, spans any number of connections, and
//! ends after the service's `session_idle` without payload. The default
//! export has one [`SessionRecord`] per settled session; `--connections`
//! has one [`ConnectionRecord`] per connection, or per part of a connection
//! that a payload gap or an attribution split between two sessions, each
//! naming its session.
//!
//! Judging a ledger takes three steps, each against the truth the servers
//! logged ([`ConnLog`]), never against meterd's own arithmetic:
//! - [`Ledger::compare`]: the connection records, summed per connection
//!   (protocol, client address, client port, server port), have the
//!   connection's exact bytes and service, and there is nothing else; and
//!   the two levels agree: each session's bytes and connection count are
//!   those of the connection records that name it.
//! - [`expected_sessions`]: how the truth's connections must group into
//!   sessions, worked out on the test side from the client addresses and
//!   the servers' payload timestamps.
//! - [`Ledger::match_sessions`]: the ledger has exactly those sessions.
//!
//! [`checked_sessions`] does the last two and judges each session's charge
//! and times ([`check_session`]).
//!
//! Does not own: running the export (`agent`), the charging rules
//! (`tariff`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    process::Command,
    time::Duration,
};

use serde::{Deserialize, de::DeserializeOwned};

use crate::{
    records::{Comparison, Key},
    tariff::{Service, service_of_port},
    wire::{ConnLog, Protocol},
};

/// The session export's columns, in the CSV's order.
pub const SESSION_COLUMNS: [&str; 13] = [
    "session_id",
    "service",
    "account",
    "content",
    "client_addr",
    "started_at",
    "ended_at",
    "duration_ms",
    "bytes_out",
    "bytes_in",
    "connections",
    "charge_minor",
    "currency",
];

/// The connection export's columns, in the CSV's order.
pub const CONNECTION_COLUMNS: [&str; 15] = [
    "connection_id",
    "session_id",
    "service",
    "account",
    "content",
    "protocol",
    "client_addr",
    "client_port",
    "server_addr",
    "server_port",
    "started_at",
    "ended_at",
    "bytes_out",
    "bytes_in",
    "duration_ms",
];

/// One line of `meterd ledger export --format jsonl`: a settled viewing
/// session. Every field is required.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct SessionRecord {
    /// Unique per session.
    pub session_id: String,
    /// Service name.
    pub service: String,
    /// Attributed account, or the client address.
    pub account: String,
    /// Attributed content, or empty.
    pub content: String,
    /// The client address (of its first connection, for an attributed
    /// session whose connections came from several).
    pub client_addr: IpAddr,
    /// RFC 3339 UTC, milliseconds.
    pub started_at: String,
    /// RFC 3339 UTC, milliseconds.
    pub ended_at: String,
    /// Billed watching time, whole ms: first payload to last payload.
    pub duration_ms: u64,
    /// Payload bytes to the client, all connections.
    pub bytes_out: u64,
    /// Payload bytes from the client, all connections.
    pub bytes_in: u64,
    /// How many connections (or parts of connections) it spans.
    pub connections: u64,
    /// The session's charge, minor units: the tariff applied once.
    pub charge_minor: u64,
    /// ISO 4217.
    pub currency: String,
}

/// The default export's record: a viewing session.
pub type LedgerRecord = SessionRecord;

/// One line of `meterd ledger export --connections --format jsonl`: a
/// connection, or the part of one that belongs to one session. Every field
/// is required.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ConnectionRecord {
    /// The connection's id.
    pub connection_id: String,
    /// The session this connection (part) is billed in.
    pub session_id: String,
    /// Service name.
    pub service: String,
    /// The session's account.
    pub account: String,
    /// The session's content.
    pub content: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Client address.
    pub client_addr: IpAddr,
    /// Client port.
    pub client_port: u16,
    /// Server address.
    pub server_addr: IpAddr,
    /// Server port.
    pub server_port: u16,
    /// RFC 3339 UTC, milliseconds.
    pub started_at: String,
    /// RFC 3339 UTC, milliseconds.
    pub ended_at: String,
    /// Payload bytes to the client in this part.
    pub bytes_out: u64,
    /// Payload bytes from the client in this part.
    pub bytes_in: u64,
    /// Whole ms.
    pub duration_ms: u64,
}

impl SessionRecord {
    /// Unattributed: billed to its client address, without content.
    pub fn is_unattributed(&self) -> bool {
        self.content.is_empty() && self.account == self.client_addr.to_canonical().to_string()
    }

    /// The same record as the CSV export writes it, column by column.
    pub fn csv_fields(&self) -> BTreeMap<String, String> {
        fields([
            ("session_id", self.session_id.clone()),
            ("service", self.service.clone()),
            ("account", self.account.clone()),
            ("content", self.content.clone()),
            ("client_addr", self.client_addr.to_string()),
            ("started_at", self.started_at.clone()),
            ("ended_at", self.ended_at.clone()),
            ("duration_ms", self.duration_ms.to_string()),
            ("bytes_out", self.bytes_out.to_string()),
            ("bytes_in", self.bytes_in.to_string()),
            ("connections", self.connections.to_string()),
            ("charge_minor", self.charge_minor.to_string()),
            ("currency", self.currency.clone()),
        ])
    }
}

impl ConnectionRecord {
    /// The connection it is (a part of), as the truth names it.
    pub fn key(&self) -> Key {
        Key {
            protocol: self.protocol,
            client_addr: self.client_addr.to_canonical(),
            client_port: self.client_port,
            server_port: self.server_port,
        }
    }

    /// The same record as the CSV export writes it, column by column.
    pub fn csv_fields(&self) -> BTreeMap<String, String> {
        fields([
            ("connection_id", self.connection_id.clone()),
            ("session_id", self.session_id.clone()),
            ("service", self.service.clone()),
            ("account", self.account.clone()),
            ("content", self.content.clone()),
            (
                "protocol",
                match self.protocol {
                    Protocol::Tcp => "tcp".to_owned(),
                    Protocol::Udp => "udp".to_owned(),
                },
            ),
            ("client_addr", self.client_addr.to_string()),
            ("client_port", self.client_port.to_string()),
            ("server_addr", self.server_addr.to_string()),
            ("server_port", self.server_port.to_string()),
            ("started_at", self.started_at.clone()),
            ("ended_at", self.ended_at.clone()),
            ("bytes_out", self.bytes_out.to_string()),
            ("bytes_in", self.bytes_in.to_string()),
            ("duration_ms", self.duration_ms.to_string()),
        ])
    }
}

fn fields<const N: usize>(pairs: [(&str, String); N]) -> BTreeMap<String, String> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Both levels of the ledger, as exported.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Settled viewing sessions.
    pub sessions: Vec<SessionRecord>,
    /// Connection records (parts), each naming its session.
    pub connections: Vec<ConnectionRecord>,
}

/// [`Ledger::compare`]'s verdict.
#[derive(Debug, Default)]
pub struct LedgerComparison {
    /// The connection records, summed per connection, against the truth.
    pub connections: Comparison,
    /// Where the two levels disagree: a connection record naming no
    /// exported session, a session whose bytes or connection count are not
    /// those of its connection records, a session id twice.
    pub links: Vec<String>,
}

impl LedgerComparison {
    /// Every connection exact, nothing else, and the levels agree.
    pub fn is_exact(&self) -> bool {
        self.connections.is_exact() && self.links.is_empty()
    }

    /// Nothing is missing, so waiting longer cannot make it exact. A link
    /// problem may be a session that settles a moment after its connection
    /// records appear, so it is never final.
    pub fn is_final(&self) -> bool {
        self.connections.is_final() && self.links.is_empty()
    }

    /// A readable account of every difference.
    pub fn diff(&self) -> String {
        let mut out = self.connections.diff();
        if !self.links.is_empty() {
            let _ = writeln!(out, "sessions against their connection records:");
            for line in self.links.iter().take(40) {
                let _ = writeln!(out, "  {line}");
            }
            if self.links.len() > 40 {
                let _ = writeln!(out, "  ... and {} more", self.links.len() - 40);
            }
        }
        out
    }
}

impl Ledger {
    /// Compares the ledger with the truth (see the module docs):
    /// `service_of` names each connection's service.
    pub fn compare(
        &self,
        truth: &[ConnLog],
        service_of: &dyn Fn(&ConnLog) -> String,
    ) -> LedgerComparison {
        LedgerComparison {
            connections: compare_connections(truth, &self.connections, service_of),
            links: self.link_problems(),
        }
    }

    /// The session with this id.
    pub fn session(&self, id: &str) -> Option<&SessionRecord> {
        self.sessions.iter().find(|s| s.session_id == id)
    }

    /// The connection records of one session.
    pub fn parts_in(&self, session_id: &str) -> Vec<&ConnectionRecord> {
        self.connections
            .iter()
            .filter(|c| c.session_id == session_id)
            .collect()
    }

    /// The connection records of a connection of the truth (several if it
    /// was split, or if its client address and port were reused).
    pub fn parts_of(&self, conn: &ConnLog) -> Vec<&ConnectionRecord> {
        let key = Key::of_truth(conn);
        self.connections.iter().filter(|c| c.key() == key).collect()
    }

    /// The sessions a connection of the truth is billed in, in the order of
    /// its parts' start.
    pub fn sessions_of(&self, conn: &ConnLog) -> Vec<&SessionRecord> {
        let mut parts = self.parts_of(conn);
        parts.sort_by_key(|p| rfc3339_utc_ms(&p.started_at).unwrap_or(i64::MAX));
        let mut seen = HashSet::new();
        parts
            .into_iter()
            .filter(|p| seen.insert(p.session_id.as_str()))
            .map(|p| {
                self.session(&p.session_id).unwrap_or_else(|| {
                    panic!("connection record {p:?} names a session that was not exported")
                })
            })
            .collect()
    }

    /// The one session a connection of the truth is billed in; panics if it
    /// has none or several.
    pub fn session_of(&self, conn: &ConnLog) -> &SessionRecord {
        let sessions = self.sessions_of(conn);
        assert_eq!(
            sessions.len(),
            1,
            "want the connection {} in one session, it is in {sessions:#?}",
            describe_conn(conn)
        );
        sessions[0]
    }

    /// Splits the ledger in two: the sessions that hold a part of one of
    /// `conns` with all of their connection records, and the rest.
    pub fn split_off(&self, conns: &[&ConnLog]) -> (Ledger, Ledger) {
        let keys: HashSet<Key> = conns.iter().map(|c| Key::of_truth(c)).collect();
        let ids: HashSet<&str> = self
            .connections
            .iter()
            .filter(|p| keys.contains(&p.key()))
            .map(|p| p.session_id.as_str())
            .collect();
        let (mut taken, mut rest) = (Ledger::default(), Ledger::default());
        for s in &self.sessions {
            let side = if ids.contains(s.session_id.as_str()) {
                &mut taken
            } else {
                &mut rest
            };
            side.sessions.push(s.clone());
        }
        for p in &self.connections {
            let side = if ids.contains(p.session_id.as_str()) {
                &mut taken
            } else {
                &mut rest
            };
            side.connections.push(p.clone());
        }
        (taken, rest)
    }

    /// The session of each of `expected`, in order, if the ledger has
    /// exactly those sessions: each expected session's connections are all
    /// in one session and it holds no other, with the expected service,
    /// client address (as its account, without content), bytes and
    /// connection count, and there is no other session. Otherwise every
    /// difference, readable.
    pub fn match_sessions(
        &self,
        expected: &[ExpectedSession<'_>],
    ) -> Result<Vec<&SessionRecord>, String> {
        let mut problems = Vec::new();
        let mut matched = Vec::new();
        let mut owner: HashMap<&str, usize> = HashMap::new();
        for (i, want) in expected.iter().enumerate() {
            let keys: HashSet<Key> = want.conns.iter().map(|c| Key::of_truth(c)).collect();
            let ids: BTreeSet<&str> = self
                .connections
                .iter()
                .filter(|p| keys.contains(&p.key()))
                .map(|p| p.session_id.as_str())
                .collect();
            let Some(session) = ids
                .iter()
                .next()
                .filter(|_| ids.len() == 1)
                .and_then(|id| self.session(id))
            else {
                problems.push(format!(
                    "{}: want one session, its connections are in {ids:?}",
                    want.describe()
                ));
                continue;
            };
            if let Some(other) = owner.insert(&session.session_id, i) {
                problems.push(format!(
                    "{} and {} are both in session {}, want two sessions",
                    expected[other].describe(),
                    want.describe(),
                    session.session_id
                ));
            }
            let strays: Vec<String> = self
                .parts_in(&session.session_id)
                .iter()
                .filter(|p| !keys.contains(&p.key()))
                .map(|p| format!("{}:{}", p.client_addr, p.client_port))
                .collect();
            let conns = want.conns.len() as u64;
            let got = (
                session.service.as_str(),
                session.client_addr.to_canonical(),
                session.is_unattributed(),
                session.bytes_out,
                session.bytes_in,
                session.connections,
            );
            let wanted = (
                want.service.as_str(),
                want.client_addr,
                true,
                want.bytes_out,
                want.bytes_in,
                conns,
            );
            if got != wanted || !strays.is_empty() {
                problems.push(format!(
                    "{}: session {} has (service, client, unattributed, bytes out, bytes in, \
                     connections) {got:?}, want {wanted:?}{}",
                    want.describe(),
                    session.session_id,
                    if strays.is_empty() {
                        String::new()
                    } else {
                        format!(", and also holds connections {strays:?}")
                    }
                ));
            }
            matched.push(session);
        }
        for s in &self.sessions {
            if !owner.contains_key(s.session_id.as_str()) {
                problems.push(format!("session of none of the expected: {s:?}"));
            }
        }
        if problems.is_empty() {
            Ok(matched)
        } else {
            Err(format!(
                "{} expected sessions, {} in the ledger:\n  {}",
                expected.len(),
                self.sessions.len(),
                problems.join("\n  ")
            ))
        }
    }

    fn link_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for s in &self.sessions {
            *ids.entry(&s.session_id).or_default() += 1;
        }
        for (id, n) in &ids {
            if *n > 1 {
                problems.push(format!("session id {id:?} exported {n} times"));
            }
        }
        let mut parts: HashMap<&str, Vec<&ConnectionRecord>> = HashMap::new();
        let mut seen = HashSet::new();
        for p in &self.connections {
            if !seen.insert((&p.connection_id, &p.session_id)) {
                problems.push(format!(
                    "connection record {} of session {} exported twice",
                    p.connection_id, p.session_id
                ));
            }
            if ids.contains_key(p.session_id.as_str()) {
                parts.entry(&p.session_id).or_default().push(p);
            } else {
                problems.push(format!(
                    "connection record of no exported session: {}",
                    describe_part(p)
                ));
            }
        }
        for s in &self.sessions {
            let mine = parts
                .get(s.session_id.as_str())
                .map_or(&[][..], Vec::as_slice);
            let sums = (
                mine.iter().map(|p| p.bytes_out).sum::<u64>(),
                mine.iter().map(|p| p.bytes_in).sum::<u64>(),
                mine.len() as u64,
            );
            if sums != (s.bytes_out, s.bytes_in, s.connections) {
                problems.push(format!(
                    "session {} says {} bytes out, {} in, {} connections; its connection \
                     records add up to {sums:?}: {}",
                    s.session_id,
                    s.bytes_out,
                    s.bytes_in,
                    s.connections,
                    mine.iter()
                        .map(|p| describe_part(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            for p in mine {
                let same = p.service == s.service
                    && p.account == s.account
                    && p.content == s.content
                    && (!s.is_unattributed()
                        || p.client_addr.to_canonical() == s.client_addr.to_canonical());
                if !same {
                    problems.push(format!(
                        "session {} ({}, account {:?}, content {:?}, client {}) holds a \
                         connection record of another: {}",
                        s.session_id,
                        s.service,
                        s.account,
                        s.content,
                        s.client_addr,
                        describe_part(p)
                    ));
                }
            }
        }
        problems.sort();
        problems
    }
}

/// The connection records, summed per connection key, against the truth,
/// also summed per key (a reused client address and port then counts as
/// one connection with the sum of both: rare, since tests give connections
/// addresses of their own). A key whose parts so far add up to less than
/// the truth in both directions is still missing (a part still to come),
/// not wrong.
fn compare_connections(
    truth: &[ConnLog],
    parts: &[ConnectionRecord],
    service_of: &dyn Fn(&ConnLog) -> String,
) -> Comparison {
    // (bytes out, bytes in, server address, service, connections)
    let mut want: BTreeMap<Key, (u64, u64, IpAddr, String, usize)> = BTreeMap::new();
    for c in truth {
        let e = want.entry(Key::of_truth(c)).or_insert((
            0,
            0,
            c.server_addr.to_canonical(),
            service_of(c),
            0,
        ));
        e.0 += c.bytes_sent;
        e.1 += c.bytes_received;
        e.4 += 1;
    }
    let mut got: BTreeMap<Key, Vec<&ConnectionRecord>> = BTreeMap::new();
    for p in parts {
        got.entry(p.key()).or_default().push(p);
    }
    let mut cmp = Comparison {
        expected: truth.len(),
        records: parts.len(),
        ..Comparison::default()
    };
    for (key, (out, inb, server, service, n)) in &want {
        let mine = got.get(key).map_or(&[][..], Vec::as_slice);
        let (sum_out, sum_in) = (
            mine.iter().map(|p| p.bytes_out).sum::<u64>(),
            mine.iter().map(|p| p.bytes_in).sum::<u64>(),
        );
        let same_place = mine
            .iter()
            .all(|p| &p.service == service && p.server_addr.to_canonical() == *server);
        let describe = || {
            format!(
                "{:?} {}:{} -> port {} ({service}, {n} connection(s)): the server sent {out} \
                 and received {inb}; meterd's records: {}",
                key.protocol,
                key.client_addr,
                key.client_port,
                key.server_port,
                if mine.is_empty() {
                    "none".to_owned()
                } else {
                    mine.iter()
                        .map(|p| describe_part(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )
        };
        if same_place && (sum_out, sum_in) == (*out, *inb) {
            cmp.exact += n;
        } else if same_place && sum_out <= *out && sum_in <= *inb {
            cmp.missing.push(describe());
        } else {
            cmp.wrong.push(describe());
        }
    }
    for (key, mine) in &got {
        if !want.contains_key(key) {
            for p in mine {
                cmp.unexpected.push(describe_part(p));
            }
        }
    }
    cmp
}

fn describe_part(p: &ConnectionRecord) -> String {
    format!(
        "[{} {} of session {} ({}, account {:?}, content {:?}): {:?} {}:{} -> {}:{}, {} .. {}, \
         out {} in {}]",
        p.connection_id,
        if p.protocol == Protocol::Tcp {
            "connection"
        } else {
            "flow"
        },
        p.session_id,
        p.service,
        p.account,
        p.content,
        p.protocol,
        p.client_addr,
        p.client_port,
        p.server_addr,
        p.server_port,
        p.started_at,
        p.ended_at,
        p.bytes_out,
        p.bytes_in
    )
}

fn describe_conn(c: &ConnLog) -> String {
    format!(
        "[server log: {:?} {}:{} -> {}:{} sent {} received {}]",
        c.protocol,
        c.client_addr,
        c.client_port,
        c.server_addr,
        c.server_port,
        c.bytes_sent,
        c.bytes_received
    )
}

/// How close to `session_idle` a gap between two connections of one client
/// may be before the test cannot say whether meterd must split there:
/// meterd dates a connection's last payload up to its 100 ms live refresh
/// early, and the servers' timestamps are late by their scheduling. A test
/// whose traffic has such a gap is ambiguous and fails as such.
pub const GAP_MARGIN: Duration = Duration::from_millis(400);

/// A viewing session the truth says meterd must have.
#[derive(Clone, Debug)]
pub struct ExpectedSession<'a> {
    /// Its service.
    pub service: String,
    /// Its client address (canonical).
    pub client_addr: IpAddr,
    /// Its connections, in the order of their first payload.
    pub conns: Vec<&'a ConnLog>,
    /// Σ bytes the server sent.
    pub bytes_out: u64,
    /// Σ bytes the server received.
    pub bytes_in: u64,
    /// Earliest first payload, wall-clock µs.
    pub first_payload_us: u64,
    /// Latest last payload, wall-clock µs.
    pub last_payload_us: u64,
}

impl ExpectedSession<'_> {
    /// Watching time as the servers' clocks measured it: first payload to
    /// last payload, ms.
    pub fn watching_ms(&self) -> i64 {
        i64::try_from((self.last_payload_us - self.first_payload_us) / 1000).unwrap_or(i64::MAX)
    }

    /// First payload, ms since the Unix epoch.
    pub fn first_payload_ms(&self) -> i64 {
        i64::try_from(self.first_payload_us / 1000).unwrap_or(i64::MAX)
    }

    /// Last payload, ms since the Unix epoch.
    pub fn last_payload_ms(&self) -> i64 {
        i64::try_from(self.last_payload_us / 1000).unwrap_or(i64::MAX)
    }

    /// For messages.
    pub fn describe(&self) -> String {
        format!(
            "expected session ({}, {}) of {} connection(s), {} bytes out, {} in, {} ms watched",
            self.service,
            self.client_addr,
            self.conns.len(),
            self.bytes_out,
            self.bytes_in,
            self.watching_ms()
        )
    }
}

/// The viewing sessions `truth` makes, unattributed: its connections grouped
/// by service (`service_of`) and client address, split where no connection
/// of the group moved payload for `session_idle` (from one connection's last
/// payload to the next one's first, as the server logged them). In the
/// order of (service, client, first payload).
///
/// A gap inside one connection is not visible in the server's log: the
/// tests that use this keep every pause within a connection well below
/// `session_idle`. Panics on a connection without payload timestamps, or a
/// gap within [`GAP_MARGIN`] of `session_idle`.
pub fn expected_sessions<'a>(
    truth: &'a [ConnLog],
    service_of: &dyn Fn(&ConnLog) -> String,
    session_idle: Duration,
) -> Vec<ExpectedSession<'a>> {
    expected_sessions_by(truth, service_of, &|_| session_idle)
}

/// [`expected_sessions`] with a `session_idle` per service name.
pub fn expected_sessions_by<'a>(
    truth: &'a [ConnLog],
    service_of: &dyn Fn(&ConnLog) -> String,
    session_idle_of: &dyn Fn(&str) -> Duration,
) -> Vec<ExpectedSession<'a>> {
    let margin = i128::try_from(GAP_MARGIN.as_micros()).unwrap_or(i128::MAX);
    let times = |c: &ConnLog| match (c.kernel_first_payload_unix_us(), c.last_payload_unix_us) {
        (Some(first), Some(last)) => (first, last),
        _ => panic!(
            "the server logged no payload times for {}: cannot group it into sessions",
            describe_conn(c)
        ),
    };
    let mut groups: BTreeMap<(String, IpAddr), Vec<&ConnLog>> = BTreeMap::new();
    for c in truth {
        groups
            .entry((service_of(c), c.client_addr.to_canonical()))
            .or_default()
            .push(c);
    }
    let mut out = Vec::new();
    for ((service, client_addr), mut conns) in groups {
        let session_idle = session_idle_of(&service);
        let idle = i128::try_from(session_idle.as_micros()).unwrap_or(i128::MAX);
        conns.sort_by_key(|c| times(c));
        let mut current: Option<ExpectedSession<'a>> = None;
        for c in conns {
            let (first, last) = times(c);
            if let Some(session) = &mut current {
                let gap = i128::from(first) - i128::from(session.last_payload_us);
                assert!(
                    (gap - idle).abs() > margin,
                    "{} starts {} ms after the last payload of {}: within {GAP_MARGIN:?} of \
                     session_idle {session_idle:?}, so the test cannot tell whether meterd must \
                     start a new session; change the test's timing",
                    describe_conn(c),
                    gap / 1000,
                    session.describe()
                );
                if gap < idle {
                    session.conns.push(c);
                    session.bytes_out += c.bytes_sent;
                    session.bytes_in += c.bytes_received;
                    session.last_payload_us = session.last_payload_us.max(last);
                    continue;
                }
                out.extend(current.take());
            }
            current = Some(ExpectedSession {
                service: service.clone(),
                client_addr,
                conns: vec![c],
                bytes_out: c.bytes_sent,
                bytes_in: c.bytes_received,
                first_payload_us: first,
                last_payload_us: last,
            });
        }
        out.extend(current);
    }
    out
}

/// How late the servers' own timestamps may be against the kernel events
/// meterd dates: the server thread is scheduled some time after the kernel
/// event (its `accept` returning after the handshake, its `read` after the
/// segment arrived, its `SIOCOUTQ` poll after the last ACK). Microseconds
/// on an idle host, tens of milliseconds while this 2-core machine runs
/// four tests at once. Still a tenth of the time tariffs' one-second unit.
pub const SCHED_TOLERANCE_MS: i64 = 100;

/// How much earlier than the truth meterd may date a session's last
/// payload: the kernel refreshes a live connection's time of last payload
/// at most every 100 ms, and dates a rise it sees late to the start of the
/// quiet period before it, never later than the truth.
pub const LAST_PAYLOAD_LAG_MS: i64 = 100;

/// Checks one session's ledger record against the session the truth says it
/// is: the charge is the tariff applied once to the session's bytes (the
/// server's) or to its exported watching time; that watching time is the
/// servers' first-to-last payload span of its connections; its start is
/// the first payload; its end lies between the last payload and the later
/// of the last close and the last payload + `session_idle`.
pub fn check_session(
    rec: &SessionRecord,
    want: &ExpectedSession,
    services: &[Service],
    idle: Duration,
) {
    let service = services
        .iter()
        .find(|s| s.name == want.service)
        .unwrap_or_else(|| panic!("no service {}", want.service));
    let (low, high) =
        service
            .tariff
            .expected_charge(want.bytes_out, want.bytes_in, rec.duration_ms);
    assert!(
        (low..=high).contains(&rec.charge_minor),
        "{} session {} ({} bytes out, {} in, {} ms): meterd charged {}, the tariff says {}{}",
        service.name,
        rec.session_id,
        want.bytes_out,
        want.bytes_in,
        rec.duration_ms,
        rec.charge_minor,
        low,
        if high == low {
            String::new()
        } else {
            format!(" to {high}")
        }
    );
    assert_eq!(rec.currency, "EUR", "{rec:?}");

    let started = rfc3339_utc_ms(&rec.started_at).unwrap_or_else(|e| panic!("{e}: {rec:?}"));
    let ended = rfc3339_utc_ms(&rec.ended_at).unwrap_or_else(|e| panic!("{e}: {rec:?}"));
    let duration = i64::try_from(rec.duration_ms).unwrap();
    let watched = want.watching_ms();
    assert!(
        (watched - LAST_PAYLOAD_LAG_MS - SCHED_TOLERANCE_MS..=watched + SCHED_TOLERANCE_MS)
            .contains(&duration),
        "session {}: meterd billed {duration} ms of watching time, the servers' payload spans \
         {watched} ms ({})",
        rec.session_id,
        want.describe()
    );
    let first = want.first_payload_ms();
    assert!(
        (started - first).abs() <= SCHED_TOLERANCE_MS,
        "session {}: meterd says it started at {}, the first payload was at {first} (unix ms)",
        rec.session_id,
        rec.started_at
    );
    let last_close = want
        .conns
        .iter()
        .filter_map(|c| c.closed_unix_us)
        .max()
        .map_or(0, |us| i64::try_from(us / 1000).unwrap());
    let latest = last_close.max(want.last_payload_ms() + i64::try_from(idle.as_millis()).unwrap());
    assert!(
        ended >= started + duration - 2 && ended <= latest + SCHED_TOLERANCE_MS,
        "session {}: meterd says {} .. {} ({duration} ms watched); the last payload was at {}, \
         the last close at {last_close} (unix ms)",
        rec.session_id,
        rec.started_at,
        rec.ended_at,
        want.last_payload_ms()
    );
}

/// The ledger's sessions of `truth` (unattributed, of the `services` by
/// server port, each with its own `session_idle`, else `idle`), which must
/// be exactly the sessions the truth makes; each checked with
/// [`check_session`]. In the order of [`expected_sessions`].
pub fn checked_sessions<'a>(
    ledger: &'a Ledger,
    truth: &'a [ConnLog],
    services: &[Service],
    idle: Duration,
) -> Vec<(ExpectedSession<'a>, &'a SessionRecord)> {
    let service_of = |c: &ConnLog| service_of_port(services, c.server_port).name.clone();
    let idle_of = |name: &str| {
        services
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.session_idle)
            .unwrap_or(idle)
    };
    let expected = expected_sessions_by(truth, &service_of, &idle_of);
    let matched = ledger
        .match_sessions(&expected)
        .unwrap_or_else(|e| panic!("the ledger's sessions are not the ones the truth makes: {e}"));
    let pairs: Vec<_> = expected.into_iter().zip(matched).collect();
    for (want, rec) in &pairs {
        check_session(rec, want, services, idle_of(&want.service));
    }
    pairs
}

/// Parses a JSON lines export; any line that is not a full record is an
/// error.
pub fn parse_jsonl<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}: {l}", n + 1)))
        .collect()
}

/// Parses the CSV export (RFC 4180: a header line, fields quoted where they
/// contain a comma, quote or newline) into one column -> value map per row.
pub fn parse_csv(text: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    let mut rows = csv_rows(text)?.into_iter();
    let header = rows.next().ok_or("no header line")?;
    rows.enumerate()
        .map(|(n, row)| {
            if row.len() == header.len() {
                Ok(header.iter().cloned().zip(row).collect())
            } else {
                Err(format!(
                    "row {}: {} fields, the header has {}: {row:?}",
                    n + 1,
                    row.len(),
                    header.len()
                ))
            }
        })
        .collect()
}

fn csv_rows(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                any = false;
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if any {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp with
/// milliseconds, the contract's `YYYY-MM-DDTHH:MM:SS.mmmZ`; an error for
/// any other shape (another offset, another precision, a bad date).
pub fn rfc3339_utc_ms(text: &str) -> Result<i64, String> {
    let bad =
        || format!("{text:?} is not RFC 3339 UTC with milliseconds (YYYY-MM-DDTHH:MM:SS.mmmZ)");
    let b = text.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let s = &text[range];
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second, milli) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    Ok(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Runs `sql` on the ledger file with the `sqlite3` CLI, read-only; returns
/// the rows, fields split on tabs.
pub fn sqlite(ledger: &Path, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("sqlite3")
        .args(["-readonly", "-batch", "-noheader", "-separator", "\t"])
        .arg(ledger)
        .arg(sql)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sqlite3 (Debian package sqlite3): {e}"));
    assert!(
        out.status.success(),
        "sqlite3 {} {sql:?} failed ({}): {}",
        ledger.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_milliseconds_utc() {
        assert_eq!(rfc3339_utc_ms("1970-01-01T00:00:00.000Z"), Ok(0));
        assert_eq!(
            rfc3339_utc_ms("2026-11-22T10:01:00.250Z"),
            Ok(1_795_341_660_250)
        );
        assert_eq!(
            rfc3339_utc_ms("2000-03-01T00:00:00.001Z"),
            Ok(951_868_800_001)
        );
        for bad in [
            "2026-11-22T10:01:00Z",
            "2026-11-22T10:01:00.250+01:00",
            "2026-11-22 10:01:00.250Z",
            "2026-02-30T10:01:00.250Z",
            "2026-11-22T10:01:00.25xZ",
        ] {
            assert!(rfc3339_utc_ms(bad).is_err(), "{bad}");
        }
    }

    fn conn(addr: &str, port: u16, sent: u64, first_ms: u64, last_ms: u64) -> ConnLog {
        ConnLog {
            protocol: Protocol::Tcp,
            client_addr: addr.parse().unwrap(),
            client_port: port,
            server_addr: "127.0.0.1".parse().unwrap(),
            server_port: 8080,
            bytes_sent: sent,
            bytes_received: 16,
            close: None,
            error: None,
            accepted_unix_us: None,
            closed_unix_us: None,
            duration_us: None,
            first_payload_unix_us: Some(first_ms * 1000),
            last_payload_unix_us: Some(last_ms * 1000),
            request_arrived_unix_us: None,
        }
    }

    fn part(session: &str, c: &ConnLog, out: u64, inb: u64) -> ConnectionRecord {
        ConnectionRecord {
            connection_id: format!("b-{}", c.client_port),
            session_id: session.to_owned(),
            service: "web".to_owned(),
            account: c.client_addr.to_string(),
            content: String::new(),
            protocol: Protocol::Tcp,
            client_addr: c.client_addr,
            client_port: c.client_port,
            server_addr: c.server_addr,
            server_port: c.server_port,
            started_at: "2026-01-01T00:00:00.000Z".to_owned(),
            ended_at: "2026-01-01T00:00:01.000Z".to_owned(),
            bytes_out: out,
            bytes_in: inb,
            duration_ms: 1000,
        }
    }

    fn session(id: &str, parts: &[&ConnectionRecord]) -> SessionRecord {
        SessionRecord {
            session_id: id.to_owned(),
            service: "web".to_owned(),
            account: parts[0].account.clone(),
            content: String::new(),
            client_addr: parts[0].client_addr,
            started_at: "2026-01-01T00:00:00.000Z".to_owned(),
            ended_at: "2026-01-01T00:00:01.000Z".to_owned(),
            duration_ms: 1000,
            bytes_out: parts.iter().map(|p| p.bytes_out).sum(),
            bytes_in: parts.iter().map(|p| p.bytes_in).sum(),
            connections: parts.len() as u64,
            charge_minor: 0,
            currency: "EUR".to_owned(),
        }
    }

    fn web(_: &ConnLog) -> String {
        "web".to_owned()
    }

    #[test]
    fn connection_parts_add_up_to_the_truth() {
        let a = conn("127.1.0.1", 1000, 500, 0, 10);
        let b = conn("127.1.0.2", 1000, 70, 0, 10);
        let (a1, a2, b1) = (
            part("s1", &a, 200, 16),
            part("s2", &a, 300, 0),
            part("s3", &b, 70, 16),
        );
        let ledger = Ledger {
            sessions: vec![
                session("s1", &[&a1]),
                session("s2", &[&a2]),
                session("s3", &[&b1]),
            ],
            connections: vec![a1.clone(), a2.clone(), b1.clone()],
        };
        let cmp = ledger.compare(&[a.clone(), b.clone()], &web);
        assert!(cmp.is_exact(), "{}", cmp.diff());
        assert_eq!(ledger.sessions_of(&a).len(), 2);
        assert_eq!(ledger.session_of(&b).session_id, "s3");

        // A part still to come is missing, one too many is wrong.
        let early = Ledger {
            sessions: vec![session("s1", &[&a1]), session("s3", &[&b1])],
            connections: vec![a1.clone(), b1.clone()],
        };
        let cmp = early.compare(&[a.clone(), b.clone()], &web);
        assert_eq!(cmp.connections.missing.len(), 1, "{}", cmp.diff());
        assert!(!cmp.is_final());
        let mut twice = ledger.clone();
        twice.connections.push(part("s3", &b, 1, 0));
        let cmp = twice.compare(&[a, b], &web);
        assert_eq!(cmp.connections.wrong.len(), 1, "{}", cmp.diff());
        assert!(!cmp.links.is_empty(), "{}", cmp.diff());
    }

    #[test]
    fn a_session_must_be_the_sum_of_its_connections() {
        let a = conn("127.1.0.1", 1000, 500, 0, 10);
        let p = part("s1", &a, 500, 16);
        let mut s = session("s1", &[&p]);
        s.bytes_out += 1;
        let ledger = Ledger {
            sessions: vec![s],
            connections: vec![p.clone()],
        };
        let cmp = ledger.compare(std::slice::from_ref(&a), &web);
        assert!(cmp.connections.is_exact());
        assert_eq!(cmp.links.len(), 1, "{}", cmp.diff());
        let orphan = Ledger {
            sessions: vec![],
            connections: vec![p],
        };
        assert_eq!(orphan.compare(&[a], &web).links.len(), 1);
    }

    #[test]
    fn sessions_group_by_client_and_split_at_idle_gaps() {
        let idle = Duration::from_secs(2);
        let truth = [
            conn("127.0.0.1", 1, 10, 0, 1000),
            // Overlaps the first: same session.
            conn("127.0.0.1", 2, 20, 500, 1500),
            // 1 s after the last payload: same session.
            conn("127.0.0.1", 3, 30, 2500, 2600),
            // 3 s of silence: a new session.
            conn("127.0.0.1", 4, 40, 5600, 5700),
            // Another client: its own session.
            conn("127.1.0.1", 5, 50, 0, 100),
        ];
        let sessions = expected_sessions(&truth, &web, idle);
        let shape: Vec<(String, usize, u64, i64)> = sessions
            .iter()
            .map(|s| {
                (
                    s.client_addr.to_string(),
                    s.conns.len(),
                    s.bytes_out,
                    s.watching_ms(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("127.0.0.1".to_owned(), 3, 60, 2600),
                ("127.0.0.1".to_owned(), 1, 40, 100),
                ("127.1.0.1".to_owned(), 1, 50, 100),
            ]
        );
    }

    #[test]
    #[should_panic(expected = "cannot tell whether")]
    fn a_gap_near_session_idle_is_ambiguous() {
        let truth = [
            conn("127.0.0.1", 1, 10, 0, 1000),
            conn("127.0.0.1", 2, 10, 3100, 3200),
        ];
        expected_sessions(&truth, &web, Duration::from_secs(2));
    }

    #[test]
    fn match_sessions_finds_merges_and_splits() {
        let idle = Duration::from_secs(2);
        let truth = [
            conn("127.1.0.1", 1, 10, 0, 100),
            conn("127.1.0.2", 2, 20, 0, 100),
        ];
        let want = expected_sessions(&truth, &web, idle);
        let (p1, p2) = (part("s1", &truth[0], 10, 16), part("s2", &truth[1], 20, 16));
        let right = Ledger {
            sessions: vec![session("s1", &[&p1]), session("s2", &[&p2])],
            connections: vec![p1.clone(), p2.clone()],
        };
        let matched = right.match_sessions(&want).unwrap();
        assert_eq!(matched[1].session_id, "s2");
        // One session for both clients is wrong (however its numbers add up).
        let mut merged_p2 = p2.clone();
        merged_p2.session_id = "s1".to_owned();
        let merged = Ledger {
            sessions: vec![session("s1", &[&p1, &merged_p2])],
            connections: vec![p1, merged_p2],
        };
        let err = merged.match_sessions(&want).unwrap_err();
        assert!(err.contains("both in session s1"), "{err}");
    }

    #[test]
    fn csv_with_quotes() {
        let rows = parse_csv("a,b,c\n1,\"x,\"\"y\"\"\",\n2,z,w\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["b"], "x,\"y\"");
        assert_eq!(rows[0]["c"], "");
        assert_eq!(rows[1]["c"], "w");
        assert!(parse_csv("a,b\n1\n").is_err());
    }
}
