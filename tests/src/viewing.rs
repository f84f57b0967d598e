//! Viewing sessions (issue 9): the truth, built from nginx's access log,
//! what meterd exports, and the comparison of the two.
//!
//! The truth: a request belongs to the viewing session of its key, the
//! service of nginx's port and who watches: the account and content the
//! test attributed its connection to, else the client address. A key's
//! requests, in order of start, form one session until the next request
//! starts `session_idle` or more after every earlier one has ended; that
//! request opens the next session. The test's timing keeps every gap far
//! from `session_idle` ([`AMBIGUOUS_MS`]); a gap closer than that makes
//! the truth itself uncertain and panics as an invalid test, not as
//! meterd's failure. Per session the truth has: its bytes out (sum of
//! `$bytes_sent`) and in (`$request_length`), its watching time (first
//! request start to last request end) and the connections that carried
//! it.
//!
//! The comparison, per key, pairs the truth's sessions and meterd's in
//! order of start, and wants: as many sessions; bytes out exact per
//! session and bytes in exact per key (the agent may count a resuming
//! request in the session before the gap, a known limit); start, end and
//! watching time within [`TIME_TOLERANCE_MS`] of the first request's start
//! and the last one's end (meterd may start a session when its first
//! connection was established: where a scripted client opened one and
//! waited for its attribution before its first request, the start may be
//! as early as that); the charge of the session's tariff applied once to
//! the session's totals (`tariff`); and, in the per-connection export,
//! every connection's bytes exact, each part linked to one exported
//! session of its key whose totals are its parts', nothing twice.
//!
//! Does not own: the server or players (`nginx`, `hls`), the tariff rules
//! (`tariff`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    Agent, http,
    ledger::{ConnectionRecord, Ledger, SessionRecord, rfc3339_utc_ms},
    nginx::AccessEntry,
    tariff::Service,
};

/// How far meterd's session times may be from the access log's: the
/// kernel's payload timestamps are refreshed at most every 25 jiffies
/// (100 ms at HZ=250), and nginx logs in whole ms after its last write.
pub const TIME_TOLERANCE_MS: i64 = 500;

/// A gap this close to `session_idle` (either side) makes the truth
/// uncertain: the test is invalid (the machine too loaded for its timing).
pub const AMBIGUOUS_MS: i64 = 1500;

/// Who a viewing session is billed to, and for which service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey {
    /// Service name.
    pub service: String,
    /// The attributed account, or the client address.
    pub account: String,
    /// The attributed content, or empty.
    pub content: String,
}

impl std::fmt::Display for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "({}, {}, {:?})",
            self.service, self.account, self.content
        )
    }
}

/// An attribution the test made through the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribution {
    /// `account`.
    pub account: String,
    /// `content`.
    pub content: String,
}

/// A connection, as both sides name it: client address and port, server
/// port.
pub type ConnKey = (SocketAddr, u16);

/// One viewing session of the truth.
#[derive(Clone, Debug)]
pub struct TruthSession {
    /// Its key.
    pub key: SessionKey,
    /// The client address of its first request.
    pub client_addr: IpAddr,
    /// Its requests, in order of start.
    pub requests: Vec<AccessEntry>,
    /// When its first connection was established, if the client said so
    /// and it was before the first request (Unix ms); else the first
    /// request's start. meterd may start the session at either.
    pub opened_ms: i64,
}

impl TruthSession {
    /// First request start (Unix ms).
    pub fn start_ms(&self) -> i64 {
        self.requests
            .iter()
            .map(AccessEntry::start_ms)
            .min()
            .unwrap_or(0)
    }

    /// Last request end (Unix ms).
    pub fn end_ms(&self) -> i64 {
        self.requests.iter().map(|r| r.end_ms).max().unwrap_or(0)
    }

    /// Watching time: first request start to last request end.
    pub fn watching_ms(&self) -> i64 {
        self.end_ms() - self.start_ms()
    }

    /// Sum of `$bytes_sent`.
    pub fn bytes_out(&self) -> u64 {
        self.requests.iter().map(|r| r.bytes_sent).sum()
    }

    /// Sum of `$request_length`.
    pub fn bytes_in(&self) -> u64 {
        self.requests.iter().map(|r| r.request_length).sum()
    }

    /// Bytes out per connection that carried it.
    pub fn bytes_out_by_conn(&self) -> BTreeMap<ConnKey, u64> {
        let mut out = BTreeMap::new();
        for r in &self.requests {
            *out.entry((r.client(), r.server_port)).or_default() += r.bytes_sent;
        }
        out
    }

    /// nginx's connection numbers of the connections that carried it.
    pub fn nginx_connections(&self) -> BTreeSet<u64> {
        self.requests.iter().map(|r| r.connection).collect()
    }
}

/// What the access log says was watched.
#[derive(Clone, Debug)]
pub struct Truth {
    /// The services' `session_idle`.
    pub session_idle: Duration,
    /// Every session, by key, then start.
    pub sessions: Vec<TruthSession>,
}

impl Truth {
    /// Builds the truth from the requests on the `services`' ports (see
    /// the module docs). `attributed` names the connections the test
    /// attributed, `opened` when the client established them. Panics if a
    /// request failed or a gap is ambiguous.
    pub fn build(
        log: &[AccessEntry],
        services: &[Service],
        attributed: &HashMap<SocketAddr, Attribution>,
        opened: &HashMap<SocketAddr, i64>,
        session_idle: Duration,
    ) -> Truth {
        let idle_ms = i64::try_from(session_idle.as_millis()).expect("idle fits");
        let mut by_key: BTreeMap<SessionKey, Vec<AccessEntry>> = BTreeMap::new();
        for entry in log {
            let Some(service) = services
                .iter()
                .find(|s| s.tcp_ports.contains(&entry.server_port))
            else {
                continue;
            };
            assert!(
                (200..300).contains(&entry.status),
                "nginx answered {} to {entry:?}: the players' traffic is not what the test \
                 means it to be",
                entry.status
            );
            let (account, content) = match attributed.get(&entry.client()) {
                Some(a) => (a.account.clone(), a.content.clone()),
                None => (entry.remote_addr.to_string(), String::new()),
            };
            by_key
                .entry(SessionKey {
                    service: service.name.clone(),
                    account,
                    content,
                })
                .or_default()
                .push(entry.clone());
        }
        let mut sessions = Vec::new();
        for (key, mut entries) in by_key {
            entries.sort_by_key(|e| (e.start_ms(), e.end_ms));
            let mut current: Vec<AccessEntry> = Vec::new();
            let mut end = i64::MIN;
            for entry in entries {
                if !current.is_empty() {
                    let gap = entry.start_ms() - end;
                    assert!(
                        (gap - idle_ms).abs() >= AMBIGUOUS_MS,
                        "{key}: a gap of {gap} ms before {entry:?} is within {AMBIGUOUS_MS} ms \
                         of session_idle ({idle_ms} ms): whether it ends a session is uncertain, \
                         so the test is invalid (is the machine too loaded for its timing?)"
                    );
                    if gap >= idle_ms {
                        sessions.push(truth_session(&key, std::mem::take(&mut current), opened));
                    }
                }
                end = if current.is_empty() {
                    entry.end_ms
                } else {
                    end.max(entry.end_ms)
                };
                current.push(entry);
            }
            if !current.is_empty() {
                sessions.push(truth_session(&key, current, opened));
            }
        }
        Truth {
            session_idle,
            sessions,
        }
    }

    /// The sessions billed to `account` (a client address or an account),
    /// of any service.
    pub fn of_account(&self, account: &str) -> Vec<&TruthSession> {
        self.sessions
            .iter()
            .filter(|s| s.key.account == account)
            .collect()
    }

    /// Every request, per connection: (bytes out, bytes in).
    fn by_conn(&self) -> BTreeMap<ConnKey, (u64, u64)> {
        let mut out: BTreeMap<ConnKey, (u64, u64)> = BTreeMap::new();
        for r in self.sessions.iter().flat_map(|s| &s.requests) {
            let e = out.entry((r.client(), r.server_port)).or_default();
            e.0 += r.bytes_sent;
            e.1 += r.request_length;
        }
        out
    }
}

fn truth_session(
    key: &SessionKey,
    requests: Vec<AccessEntry>,
    opened: &HashMap<SocketAddr, i64>,
) -> TruthSession {
    let first = &requests[0];
    let opened_ms = match opened.get(&first.client()) {
        Some(&at) if first.connection_requests == 1 => at.min(first.start_ms()),
        _ => first.start_ms(),
    };
    TruthSession {
        key: key.clone(),
        client_addr: first.remote_addr,
        opened_ms,
        requests,
    }
}

fn ms(text: &str) -> i64 {
    rfc3339_utc_ms(text).unwrap_or_else(|e| panic!("meterd's export: {e}"))
}

fn key_of(r: &SessionRecord) -> SessionKey {
    SessionKey {
        service: r.service.clone(),
        account: r.account.clone(),
        content: r.content.clone(),
    }
}

fn conn_of(c: &ConnectionRecord) -> ConnKey {
    (SocketAddr::new(c.client_addr, c.client_port), c.server_port)
}

/// A session of the truth and meterd's record of it.
#[derive(Clone, Debug)]
pub struct Matched {
    /// The truth.
    pub truth: TruthSession,
    /// meterd's record.
    pub record: SessionRecord,
}

/// Attributes a connection through the agent's API and retries until the
/// agent answers `applied` (it knows the connection: the bytes it moves
/// from now on are the account's), also across an agent restart (the API
/// socket is gone meanwhile). Panics with the last answer after `timeout`.
pub fn attribute(
    api: &Path,
    client: SocketAddr,
    server_port: u16,
    attribution: &Attribution,
    timeout: Duration,
) {
    let body = serde_json::json!({
        "client_addr": client.ip().to_string(),
        "client_port": client.port(),
        "server_port": server_port,
        "account": attribution.account,
        "content": attribution.content,
    })
    .to_string();
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < timeout {
        match http::post_json_unix(api, "/v1/attribute", &body) {
            Ok(r) if r.status == 200 => {
                let reply: serde_json::Value = serde_json::from_str(&r.body)
                    .unwrap_or_else(|e| panic!("attribution reply is not JSON ({e}): {}", r.body));
                match reply["status"].as_str() {
                    Some("applied") => return,
                    Some("pending") => last = r.body,
                    _ => panic!("attribution reply: {}", r.body),
                }
            }
            Ok(r) => panic!("POST /v1/attribute {body}: {}\n{}", r.head, r.body),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "POST /v1/attribute {body} on {}: not applied within {timeout:?}: {last}",
        api.display()
    );
}

/// Waits until meterd's export holds exactly the truth's viewing sessions
/// (as many per key, bytes out exact), then waits two more intervals and
/// checks everything (module docs); returns the pairs. Panics with the
/// differences, a table of both sides and the agent's log otherwise.
pub fn wait_for_sessions(
    name: &str,
    agent: &Agent,
    truth: &Truth,
    services: &[Service],
) -> Vec<Matched> {
    let interval = agent.config().interval;
    let started = Instant::now();
    let mut deadline = started + Duration::from_secs(40) + truth.session_idle + interval * 3;
    let mut wrong_seen = false;
    loop {
        let exported = agent.ledger_records();
        let (settling, wrong) = settle_problems(truth, &exported);
        if settling.is_empty() {
            thread::sleep(interval * 2 + Duration::from_secs(1));
            let Ledger {
                sessions: exported,
                connections,
            } = agent.ledger();
            let (matched, problems) = full_check(truth, &exported, &connections, services);
            assert!(
                problems.is_empty(),
                "{name}: meterd's viewing sessions differ from nginx's access log:\n- {}\n{}\n\
                 agent log:\n{}",
                problems.join("\n- "),
                table(truth, &exported),
                agent.log_tail(40)
            );
            return matched;
        }
        // Exported sessions are settled and never change: once one is
        // wrong, waiting cannot fix it. Wait a little more only so the
        // report shows whatever else settles meanwhile.
        if wrong && !wrong_seen {
            wrong_seen = true;
            deadline = deadline.min(Instant::now() + truth.session_idle + interval * 2);
        }
        if Instant::now() >= deadline {
            let Ledger {
                sessions: exported,
                connections,
            } = agent.ledger();
            let (_, problems) = full_check(truth, &exported, &connections, services);
            panic!(
                "{name}: after {:.1?}, meterd's viewing sessions differ from nginx's access \
                 log:\n- {}\n{}\nagent log:\n{}",
                started.elapsed(),
                problems.join("\n- "),
                table(truth, &exported),
                agent.log_tail(40)
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// Pairs, per key, the truth's sessions and the export's in order of
/// start.
fn pair<'a>(
    truth: &'a Truth,
    exported: &'a [SessionRecord],
) -> BTreeMap<SessionKey, (Vec<&'a TruthSession>, Vec<&'a SessionRecord>)> {
    let mut keys: BTreeMap<SessionKey, (Vec<&TruthSession>, Vec<&SessionRecord>)> = BTreeMap::new();
    for s in &truth.sessions {
        keys.entry(s.key.clone()).or_default().0.push(s);
    }
    for r in exported {
        keys.entry(key_of(r)).or_default().1.push(r);
    }
    for (t, e) in keys.values_mut() {
        t.sort_by_key(|s| s.start_ms());
        e.sort_by_key(|r| (ms(&r.started_at), r.session_id.clone()));
    }
    keys
}

/// What differs in the numbers that settle: sessions per key, bytes out.
/// Also whether any of it is wrong for good: a key with more sessions than
/// the truth, or with as many and one whose bytes differ.
fn settle_problems(truth: &Truth, exported: &[SessionRecord]) -> (Vec<String>, bool) {
    let mut problems = Vec::new();
    let mut wrong = false;
    for (key, (t, e)) in pair(truth, exported) {
        if t.len() != e.len() {
            wrong |= e.len() > t.len();
            problems.push(format!(
                "{key}: the access log has {} session(s), meterd exported {}",
                t.len(),
                e.len()
            ));
            continue;
        }
        for (i, (t, e)) in t.iter().zip(&e).enumerate() {
            if t.bytes_out() != e.bytes_out {
                wrong = true;
                problems.push(format!(
                    "{key} session {}: nginx sent {} bytes, meterd says bytes_out {} ({})",
                    i + 1,
                    t.bytes_out(),
                    e.bytes_out,
                    e.session_id
                ));
            }
        }
    }
    (problems, wrong)
}

/// Every check of the module docs; the pairs and the problems found.
#[expect(
    clippy::too_many_lines,
    reason = "one list of checks, read top to bottom"
)]
fn full_check(
    truth: &Truth,
    exported: &[SessionRecord],
    connections: &[ConnectionRecord],
    services: &[Service],
) -> (Vec<Matched>, Vec<String>) {
    let (mut problems, _) = settle_problems(truth, exported);
    let mut matched = Vec::new();

    let mut ids = BTreeSet::new();
    for r in exported {
        if !ids.insert(r.session_id.as_str()) {
            problems.push(format!("session_id {} is exported twice", r.session_id));
        }
    }
    let mut parts_of: HashMap<&str, Vec<&ConnectionRecord>> = HashMap::new();
    let mut part_ids = BTreeSet::new();
    for c in connections {
        if !part_ids.insert(c.connection_id.as_str()) {
            problems.push(format!(
                "connection_id {} is exported twice",
                c.connection_id
            ));
        }
        parts_of.entry(c.session_id.as_str()).or_default().push(c);
        if !ids.contains(c.session_id.as_str()) {
            problems.push(format!(
                "connection {} links to session {}, which is not exported: {c:?}",
                c.connection_id, c.session_id
            ));
        }
    }

    for (key, (t, e)) in pair(truth, exported) {
        if t.len() != e.len() {
            continue;
        }
        let service = service_of_name(services, &key.service);
        let (t_in, e_in): (u64, u64) = (
            t.iter().map(|s| s.bytes_in()).sum(),
            e.iter().map(|r| r.bytes_in).sum(),
        );
        if t_in != e_in {
            problems.push(format!(
                "{key}: nginx read {t_in} request bytes in all, meterd's sessions say bytes_in {e_in}"
            ));
        }
        for (i, (t, e)) in t.iter().zip(&e).enumerate() {
            let n = i + 1;
            let (started, ended) = (ms(&e.started_at), ms(&e.ended_at));
            let duration = i64::try_from(e.duration_ms).expect("duration fits");
            let (watch, opened) = (t.watching_ms(), t.start_ms() - t.opened_ms);
            if duration < watch - TIME_TOLERANCE_MS || duration > watch + opened + TIME_TOLERANCE_MS
            {
                problems.push(format!(
                    "{key} session {n}: watching time per the access log {watch} ms (first \
                     request start to last request end{}), meterd's duration_ms {duration}",
                    if opened > 0 {
                        format!("; its connection opened {opened} ms before")
                    } else {
                        String::new()
                    }
                ));
            }
            if started < t.opened_ms - TIME_TOLERANCE_MS
                || started > t.start_ms() + TIME_TOLERANCE_MS
            {
                problems.push(format!(
                    "{key} session {n}: started_at {} is {} ms from the first request's start",
                    e.started_at,
                    started - t.start_ms()
                ));
            }
            if (ended - t.end_ms()).abs() > TIME_TOLERANCE_MS {
                problems.push(format!(
                    "{key} session {n}: ended_at {} is {} ms from the last request's end",
                    e.ended_at,
                    ended - t.end_ms()
                ));
            }
            if (ended - started - duration).abs() > 2 {
                problems.push(format!(
                    "{key} session {n}: ended_at - started_at = {} ms, duration_ms {duration}",
                    ended - started
                ));
            }
            let (low, high) =
                service
                    .tariff
                    .expected_charge(e.bytes_out, e.bytes_in, e.duration_ms);
            if !(low..=high).contains(&e.charge_minor) {
                problems.push(format!(
                    "{key} session {n}: charge_minor {}, the {} tariff applied once to its \
                     {} bytes out, {} in, {} ms is {low}{}",
                    e.charge_minor,
                    service.tariff.kind(),
                    e.bytes_out,
                    e.bytes_in,
                    e.duration_ms,
                    if high > low {
                        format!("..={high}")
                    } else {
                        String::new()
                    }
                ));
            }
            if e.currency != "EUR" {
                problems.push(format!("{key} session {n}: currency {:?}", e.currency));
            }
            if e.client_addr != t.client_addr {
                problems.push(format!(
                    "{key} session {n}: client_addr {}, its first request came from {}",
                    e.client_addr, t.client_addr
                ));
            }

            // Its connection parts: linked, consistent, and carrying the
            // session's bytes per connection.
            let parts = parts_of
                .get(e.session_id.as_str())
                .cloned()
                .unwrap_or_default();
            if u64::try_from(parts.len()).expect("fits") != e.connections {
                problems.push(format!(
                    "{key} session {n}: connections = {}, the connection export links {} to it",
                    e.connections,
                    parts.len()
                ));
            }
            let sums = parts
                .iter()
                .fold((0, 0), |(o, i), p| (o + p.bytes_out, i + p.bytes_in));
            if sums != (e.bytes_out, e.bytes_in) {
                let list: Vec<String> = parts
                    .iter()
                    .map(|p| {
                        format!(
                            "{}:{} {} out {} in from {}",
                            p.client_addr, p.client_port, p.bytes_out, p.bytes_in, p.started_at
                        )
                    })
                    .collect();
                problems.push(format!(
                    "{key} session {n}: its connection records add up to {} out, {} in; the \
                     session says {} out, {} in. Its records: {list:?}",
                    sums.0, sums.1, e.bytes_out, e.bytes_in
                ));
            }
            let mut part_out: BTreeMap<ConnKey, u64> = BTreeMap::new();
            for p in &parts {
                *part_out.entry(conn_of(p)).or_default() += p.bytes_out;
                if (p.service.as_str(), p.account.as_str(), p.content.as_str())
                    != (e.service.as_str(), e.account.as_str(), e.content.as_str())
                {
                    problems.push(format!(
                        "connection {} of session {} has another service, account or content: \
                         {p:?}",
                        p.connection_id, e.session_id
                    ));
                }
            }
            part_out.retain(|_, b| *b > 0);
            let want = t.bytes_out_by_conn();
            if part_out != want {
                problems.push(format!(
                    "{key} session {n}: bytes out per connection (client, server port) per the \
                     access log {want:?}, in meterd's connection records of {} {part_out:?}",
                    e.session_id
                ));
            }
            matched.push(Matched {
                truth: (*t).clone(),
                record: (*e).clone(),
            });
        }
    }

    // Every connection's parts together: exact both ways, so no part was
    // counted twice or lost. Connections of other ports are not the test's.
    let mut by_conn: BTreeMap<ConnKey, (u64, u64)> = BTreeMap::new();
    for c in connections {
        if services
            .iter()
            .any(|s| s.tcp_ports.contains(&c.server_port))
        {
            let e = by_conn.entry(conn_of(c)).or_default();
            e.0 += c.bytes_out;
            e.1 += c.bytes_in;
        }
    }
    by_conn.retain(|_, (o, i)| *o > 0 || *i > 0);
    let want = truth.by_conn();
    if by_conn != want {
        let mut diff = String::new();
        for k in want.keys().chain(by_conn.keys()).collect::<BTreeSet<_>>() {
            let (w, h) = (want.get(k), by_conn.get(k));
            if w != h {
                let _ = write!(
                    diff,
                    "\n    {}:{} -> port {}: access log (out, in) {w:?}, meterd {h:?}",
                    k.0.ip(),
                    k.0.port(),
                    k.1
                );
            }
        }
        problems.push(format!(
            "per connection, meterd's connection records differ from the access log:{diff}"
        ));
    }
    (matched, problems)
}

fn service_of_name<'a>(services: &'a [Service], name: &str) -> &'a Service {
    services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// Both sides, per key, with times relative to the earliest request.
fn table(truth: &Truth, exported: &[SessionRecord]) -> String {
    let zero = truth
        .sessions
        .iter()
        .map(TruthSession::start_ms)
        .min()
        .unwrap_or(0);
    let rel = |ms: i64| {
        let d = ms - zero;
        let sign = if d < 0 { "-" } else { "+" };
        format!("{sign}{}.{:03}s", d.abs() / 1000, d.abs() % 1000)
    };
    let mut out = String::from("sessions (times from the first request):");
    for (key, (t, e)) in pair(truth, exported) {
        let _ = write!(out, "\n  {key}:");
        for s in t {
            let _ = write!(
                out,
                "\n    access log: {} .. {} watching {} ms, out {}, in {}, {} request(s) on nginx \
                 connection(s) {:?}",
                rel(s.start_ms()),
                rel(s.end_ms()),
                s.watching_ms(),
                s.bytes_out(),
                s.bytes_in(),
                s.requests.len(),
                s.nginx_connections()
            );
        }
        for r in e {
            let _ = write!(
                out,
                "\n    meterd:     {} .. {} duration {} ms, out {}, in {}, {} connection(s), \
                 charge {} {} [{}]",
                rel(ms(&r.started_at)),
                rel(ms(&r.ended_at)),
                r.duration_ms,
                r.bytes_out,
                r.bytes_in,
                r.connections,
                r.charge_minor,
                r.currency,
                r.session_id
            );
        }
    }
    out
}
