//! The billing core: turns kernel observations into viewing sessions,
//! charges and settlements. It does no I/O.
//!
//! Entry points, in the order the run loop calls them each cycle:
//! - [`Core::on_record`]: a close or gap record from the kernel's ring;
//! - [`Core::on_tcp_read`] / [`Core::on_udp_read`]: a full read of the live
//!   maps, taken *before* the ring was drained (so every gap or close that
//!   the read reflects has already been applied, and older values in the
//!   read only ever raise counts);
//! - [`Core::on_udp_end`]: the final value of a UDP flow the loop removed;
//! - [`Core::attribute`]: the streaming server says whose a connection is;
//! - [`Core::on_cycle`]: charge every open viewing session, settle those
//!   that ended, check account limits.
//!
//! Every change is staged in a [`Batch`], which the loop commits to the
//! ledger in one transaction ([`Core::take_batch`]). If a commit fails the
//! agent stops, and a restart rebuilds the core from the ledger
//! ([`Core::restore`]) and the kernel's maps: nothing in memory has to be
//! undone.
//!
//! Owns: live connections and their segments, viewing sessions,
//! attributions (applied and pending), accruals and spending limits.

pub mod conn;
pub mod save;
pub mod viewer;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use foldhash::{HashMap, HashMapExt as _};
use meterd_common::{
    CONN_GAP, CONN_UNTRACKED, Closed, ConnInfo, Counts, IPPROTO_UDP, UdpFlow, UdpFlowKey,
};

pub use self::{
    conn::{Conn, ConnKey, Peer, Protocol},
    save::Save,
    viewer::{SessionRef, Sessions, Viewer, ViewerKey, Who},
};
use crate::{
    attribution::{Attribution, ConnectionRef, Pending},
    billing::{self, Accrual},
    config::OnLimit,
    limits::{Credited, Limits},
    tariff::{MICRO, Tariff},
};

/// A service as the core bills it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub name: Arc<str>,
    pub tariff: Tariff,
    /// `session_idle`, ns.
    pub idle_ns: u64,
    /// Its ports: a connection's service is found by its server port, not
    /// by the kernel's index, so a reordered config bills it the same.
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// Default `on_limit` of the accounts it serves.
    pub on_limit: Option<OnLimit>,
    /// Whether traffic nobody attributed is billed to its client address.
    pub bill_unattributed: bool,
}

/// What became of an attribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The connection is live; its later bytes go to the attributed session.
    Applied,
    /// Not seen yet: applied when it shows up (within `api.pending_ttl`).
    Pending,
    /// Not seen yet, and too many attributions are already waiting.
    Refused,
}

/// An open viewing session, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerRow {
    pub id: String,
    pub service: String,
    pub tariff: Tariff,
    pub account: String,
    pub content: String,
    pub attributed: bool,
    pub client_addr: String,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Open: bytes of its ended segments. Settled: its totals.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub connections: u32,
    pub accrual: Accrual,
    /// Wall-clock ms of its start, once written (the ledger fills it in).
    pub started_ms: Option<i64>,
}

/// A settled viewing session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledRow {
    /// Totals in `bytes_*`.
    pub row: ViewerRow,
    /// Billed watching time.
    pub duration_ms: u64,
    pub charge_minor: u64,
    pub cycles_micro: u64,
    pub adjustment_micro: i64,
}

/// One segment of a connection, as the ledger keeps it (open ones are
/// what a restart picks up again; ended ones are the audit trail).
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts of a ledger row, each its own column"
)]
pub struct SegmentRow {
    /// The connection's id, `/<n>` after its first segment.
    pub id: String,
    /// The connection's id.
    pub conn_id: String,
    pub n: u32,
    /// The viewing session it feeds; empty if it never moved a byte.
    pub session_id: String,
    pub open: bool,
    pub service: String,
    /// The attribution, if any.
    pub account: Option<String>,
    pub content: Option<String>,
    /// Its request was refused: billed to nobody.
    pub denied: bool,
    pub protocol: Protocol,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub start_ns: u64,
    /// Its end (close, or the last payload before a gap); 0 while open.
    pub end_ns: u64,
    pub base: Counts,
    /// The connection's counts at its end (or latest, while open).
    pub counts: Counts,
    pub flags: u32,
    /// Whether its end is the connection's close (not a gap or an
    /// attribution).
    pub closes_conn: bool,
    /// An ended row written again only to set its session (an orphan that
    /// got one): its bytes were counted when it ended.
    pub restaged: bool,
}

impl SegmentRow {
    /// The segment's own payload bytes (out, in).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.counts.bytes_out.saturating_sub(self.base.bytes_out),
            self.counts.bytes_in.saturating_sub(self.base.bytes_in),
        )
    }
}

/// Newer counts of an open segment whose row the ledger has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentProgress {
    /// The segment's id (its row's `connection_id`).
    pub id: String,
    pub counts: Counts,
}

/// A connection that closed, for the closed-connection log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedConn {
    pub id: String,
    pub cookie: u64,
    pub service: String,
    pub peer: Peer,
    pub counts: Counts,
    pub start_ns: u64,
    pub end_ns: u64,
    pub flags: u32,
}

/// An account that reached its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitEvent {
    pub account: String,
    pub spent_minor: i64,
    pub limit_minor: u64,
    /// What happens now: notify, deny or cut.
    pub policy: OnLimit,
}

/// A connection to end in the kernel (its account ran out, policy `cut`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutOrder {
    pub key: ConnKey,
    pub peer: Peer,
}

/// What a cut account received after its cut-off order, once its last cut
/// connection ended: the overshoot, measured in the kernel's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOffEvent {
    pub account: String,
    /// Payload bytes delivered after the order (all its cut connections).
    pub bytes_after_cut: u64,
    /// From the order to the last payload of its cut connections.
    pub ms_after_cut: u64,
    pub connections: u64,
}

/// The answer to a streaming server's admission question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve it; the connection is attributed (or will be, `Pending`).
    Allow(Outcome),
    /// Refuse it, and why.
    Deny(&'static str),
}

/// Everything the ledger must write at once.
#[derive(Debug, Default)]
pub struct Batch {
    pub viewers: Vec<ViewerRow>,
    pub settled: Vec<SettledRow>,
    pub segments: Vec<SegmentRow>,
    /// Newer counts of open segments the ledger has (only their counts
    /// changed).
    pub progress: Vec<SegmentProgress>,
    pub limits: Vec<LimitEvent>,
    pub cut_offs: Vec<CutOffEvent>,
    /// Not for the ledger: the closed log and the log lines.
    pub closed: Vec<ClosedConn>,
    /// Not for the ledger: connections for the kernel to end, after the
    /// commit (the limit event that orders them is committed first).
    pub cuts: Vec<CutOrder>,
    /// Not for the ledger: connections whose cut is lifted (a top-up).
    pub uncuts: Vec<CutOrder>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.viewers.is_empty()
            && self.settled.is_empty()
            && self.segments.is_empty()
            && self.progress.is_empty()
            && self.limits.is_empty()
            && self.cut_offs.is_empty()
            && self.closed.is_empty()
            && self.cuts.is_empty()
            && self.uncuts.is_empty()
    }
}

/// Per-service sums over what is live, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveTotals {
    /// Live connections' bytes in their current segments.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Whole minor units the open sessions' cycles charged.
    pub charged_minor: u64,
    pub connections: u64,
    pub viewers: u64,
    /// Sessions the cycle charged.
    pub charges: u64,
}

/// Reads to remember a closed connection for: a live read is at most one
/// read older than a close record, so two would do; the margin is cheap.
const CLOSED_MEMORY: u64 = 8;

/// The billing core.
#[derive(Debug)]
pub struct Core {
    /// This boot's id without dashes: ids are unique across boots.
    boot: String,
    /// Services by the kernel's index (the config's order).
    services: Vec<Arc<ServiceDef>>,
    /// Services by name, for segments restored from the ledger.
    by_name: HashMap<Arc<str>, Arc<ServiceDef>>,
    /// Services by (protocol, server port).
    by_port: HashMap<(Protocol, u16), Arc<ServiceDef>>,
    conns: HashMap<ConnKey, Conn>,
    /// (client, server port) -> connection: attribution by tuple is O(1).
    tuples: HashMap<(SocketAddr, u16), ConnKey>,
    viewers: Sessions,
    /// The newest open session of each key: where a new segment may join.
    current: HashMap<ViewerKey, SessionRef>,
    pending: Pending,
    limits: Limits,
    /// Open segments from the ledger whose connection has not shown up
    /// again since the restart, by connection id.
    restored: HashMap<String, SegmentRow>,
    /// Set by `restore`: the first cycle ends what did not show up.
    restoring: bool,
    /// Closed connections, with the read generation they closed in.
    closed: HashMap<ConnKey, u64>,
    generation: u64,
    /// Connections ordered cut, with their account, counts and time then.
    cut: HashMap<ConnKey, (Arc<str>, Counts, u64)>,
    /// Per cut account: what its cut connections got after the order.
    cut_tally: HashMap<Arc<str>, CutOffEvent>,
    /// Attributions refused since start: too many were pending.
    refused: u64,
    /// Sessions owing the ledger a structural change ([`Save::Now`]):
    /// the next batch carries them, so a segment's end and its session's
    /// new totals commit together. Lazy ones wait for the cycle.
    due_now: Vec<Arc<str>>,
    /// When lazily changed rows are written.
    save: save::Policy,
    /// Kernel time of the last cycle: when rows staged since were written.
    now_ns: u64,
    /// Segments that ended before the cycle gave them a session (their
    /// rows are in the ledger with an empty session id until it does).
    orphans: Vec<(Waiting, SegmentRow)>,
    batch: Batch,
}

/// A session's bytes so far (out, in): its ended segments' and its live
/// ones'.
fn totals_of(v: &Viewer) -> (u64, u64) {
    (v.done.0 + v.live.0, v.done.1 + v.live.1)
}

/// What `v.live` must be: its live segments' bytes, summed over its
/// connections (the tests check it after every step).
#[cfg(test)]
fn live_of(conns: &HashMap<ConnKey, Conn>, v: &Viewer) -> (u64, u64) {
    v.open.iter().fold((0, 0), |(o, i), key| {
        conns.get(key).map_or((o, i), |c| {
            let (co, ci) = c.seg.bytes(&c.counts);
            (o + co, i + ci)
        })
    })
}

/// Adds what a live segment's bytes grew by to its session's.
fn grow(live: &mut (u64, u64), before: (u64, u64), after: (u64, u64)) {
    live.0 += after.0.saturating_sub(before.0);
    live.1 += after.1.saturating_sub(before.1);
}

/// Live sums by service, for the few services a host has: found by the
/// service's shared name (a pointer compare), not hashed per session.
#[derive(Default)]
struct PerService(Vec<(Arc<str>, LiveTotals)>);

impl PerService {
    fn of(&mut self, service: &Arc<str>) -> &mut LiveTotals {
        let at = self
            .0
            .iter()
            .position(|(s, _)| Arc::ptr_eq(s, service) || s == service);
        let at = at.unwrap_or_else(|| {
            self.0.push((Arc::clone(service), LiveTotals::default()));
            self.0.len() - 1
        });
        &mut self.0[at].1
    }
}

/// Marks what a session owes the ledger ([`Save::Now`]: the next batch).
fn mark(due_now: &mut Vec<Arc<str>>, v: &mut Viewer, owed: Save) {
    if v.save.raise(owed) {
        due_now.push(Arc::clone(&v.id));
    }
}

/// Stages a session's row, and with it the rows of its live segments that
/// changed: the ledger never has a session newer than its segments.
fn stage_viewer(
    batch: &mut Batch,
    conns: &mut HashMap<ConnKey, Conn>,
    boot: &str,
    v: &mut Viewer,
    at_ns: u64,
) {
    v.save = Save::Clean;
    v.saved_ns = at_ns;
    batch.viewers.push(viewer_row(v, v.done));
    for key in &v.open {
        let Some(conn) = conns.get_mut(key) else {
            continue;
        };
        match std::mem::take(&mut conn.seg.save) {
            Save::Clean => {}
            // Written when it joined the session: only its counts moved.
            Save::Lazy => batch.progress.push(SegmentProgress {
                id: conn.segment_id(boot),
                counts: conn.counts,
            }),
            Save::Now => batch.segments.push(segment_row(boot, conn, true, 0)),
        }
    }
}

impl Core {
    /// An empty core for this boot and config.
    pub fn new(boot_id: &str, services: Vec<ServiceDef>, limits: Limits, pending: Pending) -> Self {
        let services: Vec<Arc<ServiceDef>> = services.into_iter().map(Arc::new).collect();
        let by_name = services
            .iter()
            .map(|s| (Arc::clone(&s.name), Arc::clone(s)))
            .collect();
        let by_port = services
            .iter()
            .flat_map(|s| {
                let tcp = s.tcp_ports.iter().map(|p| (Protocol::Tcp, *p));
                let udp = s.udp_ports.iter().map(|p| (Protocol::Udp, *p));
                tcp.chain(udp).map(|k| (k, Arc::clone(s)))
            })
            .collect();
        Self {
            boot: boot_id.replace('-', ""),
            services,
            by_name,
            by_port,
            conns: HashMap::new(),
            tuples: HashMap::new(),
            viewers: Sessions::default(),
            current: HashMap::new(),
            pending,
            limits,
            restored: HashMap::new(),
            restoring: false,
            closed: HashMap::new(),
            generation: 0,
            cut: HashMap::new(),
            cut_tally: HashMap::new(),
            refused: 0,
            due_now: Vec::new(),
            save: save::Policy::default(),
            now_ns: 0,
            orphans: Vec::new(),
            batch: Batch::default(),
        }
    }

    /// The boot id part of ids.
    pub fn boot(&self) -> &str {
        &self.boot
    }

    /// Writes sessions' and live segments' newer cumulative values at most
    /// every `every` (structural changes still go into the next batch); 0
    /// writes every change at once. See [`save`].
    pub fn set_open_write_interval(&mut self, every: std::time::Duration) {
        self.save.every_ns = u64::try_from(every.as_nanos()).unwrap_or(u64::MAX);
    }

    /// From now on every change goes into the next batch, and everything
    /// the ledger lacks is owed now: the agent is stopping, and its last
    /// read and cycle must reach the ledger (after a reboot the kernel's
    /// counts are gone).
    pub fn save_all(&mut self) {
        self.save.every_ns = 0;
        for v in self.viewers.values_mut() {
            if v.save != Save::Clean {
                mark(&mut self.due_now, v, Save::Now);
            }
        }
    }

    /// Takes what the ledger has to write, with every session owing it a
    /// structural change.
    pub fn take_batch(&mut self) -> Batch {
        self.stage_viewers();
        std::mem::take(&mut self.batch)
    }

    /// Stages the open sessions owing a structural change.
    fn stage_viewers(&mut self) {
        for id in std::mem::take(&mut self.due_now) {
            if let Some(v) = self.viewers.get_mut(&id)
                && v.save == Save::Now
            {
                stage_viewer(&mut self.batch, &mut self.conns, &self.boot, v, self.now_ns);
            }
        }
    }

    /// Open viewing sessions.
    pub fn viewers(&self) -> impl Iterator<Item = &Viewer> {
        self.viewers.values()
    }

    /// Live connections.
    pub fn conns(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    /// A live connection.
    pub fn conn(&self, key: &ConnKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    /// Attributions waiting for their connection.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Attributions refused because `api.max_pending` were waiting.
    pub fn refused_count(&self) -> u64 {
        self.refused
    }

    /// The spending limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A session's totals (out, in) now.
    pub fn totals(&self, v: &Viewer) -> (u64, u64) {
        totals_of(v)
    }

    /// Checks every session's live bytes against its connections'.
    #[cfg(test)]
    pub fn check_live(&self) {
        for v in self.viewers.values() {
            assert_eq!(v.live, live_of(&self.conns, v), "live bytes of {}", v.id);
        }
    }

    /// Picks up open sessions and segments from the ledger after a
    /// restart. Segments come back to their connections as those show up
    /// in the first reads; the first cycle ends what did not.
    pub fn restore(
        &mut self,
        viewers: Vec<ViewerRow>,
        segments: Vec<SegmentRow>,
        orphans: Vec<SegmentRow>,
    ) {
        for row in orphans {
            self.adopt_orphan(row);
        }
        for row in viewers {
            let service = Arc::new(ServiceDef {
                name: Arc::from(row.service.as_str()),
                idle_ns: self
                    .by_name
                    .get(row.service.as_str())
                    .map_or(30_000_000_000, |s| s.idle_ns),
                tariff: row.tariff.clone(),
                tcp_ports: Vec::new(),
                udp_ports: Vec::new(),
                on_limit: None,
                bill_unattributed: true,
            });
            let client_addr = row
                .client_addr
                .parse()
                .unwrap_or(IpAddr::from([0, 0, 0, 0]));
            let who = if row.attributed {
                Who::Account {
                    account: row.account.clone(),
                    content: row.content.clone(),
                }
            } else {
                Who::Client(client_addr)
            };
            let id: Arc<str> = Arc::from(row.id.as_str());
            let key = ViewerKey {
                service: Arc::clone(&service.name),
                who,
            };
            let newer = self
                .current
                .get(&key)
                .and_then(|c| self.viewers.get(c.id()))
                .is_none_or(|c| c.last_ns <= row.last_ns);
            let at = self.viewers.insert(Viewer {
                done: (row.bytes_out, row.bytes_in),
                connections: row.connections,
                accrual: row.accrual,
                started_ms: row.started_ms,
                ..Viewer::new(
                    id,
                    key.clone(),
                    service,
                    client_addr,
                    row.first_ns,
                    row.last_ns,
                )
            });
            if newer {
                self.current.insert(key, at);
            }
        }
        for seg in segments {
            self.restored.insert(seg.conn_id.clone(), seg);
        }
        self.restoring = true;
    }

    /// A segment that ended without a session (from the ledger, or a
    /// restored one whose connection did not come back): the next cycle
    /// gives it one.
    fn adopt_orphan(&mut self, row: SegmentRow) {
        let (o, i) = row.bytes();
        let answered = row.protocol == Protocol::Tcp || row.counts.bytes_out > 0;
        if row.denied || !answered || (o == 0 && i == 0) {
            return;
        }
        let Some(service) = self.by_name.get(row.service.as_str()).cloned() else {
            tracing::error!(
                connection = %row.id,
                service = %row.service,
                "segment of a service the config no longer has: its bytes are in the ledger's \
                 connections, but not billed"
            );
            return;
        };
        let attribution = row.account.clone().map(|account| Attribution {
            account,
            content: row.content.clone(),
            denied: false,
        });
        let w = Waiting {
            key: viewer_key(&service.name, attribution.as_ref(), row.client.ip()),
            service,
            start_ns: row.start_ns,
            last_ns: row.counts.last_ns.max(row.start_ns),
            client: row.client.ip(),
            segment_id: row.id.clone(),
            bytes: (o, i),
        };
        self.orphans.push((w, row));
    }

    /// Open sessions from the ledger still waiting for connections.
    pub fn restored_waiting(&self) -> usize {
        self.restored.len()
    }

    /// The kernel identity a close or gap record is about.
    fn record_key(rec: &Closed) -> ConnKey {
        if rec.info.protocol == IPPROTO_UDP {
            ConnKey::Udp {
                key: flow_key(&rec.info),
                first_ns: rec.info.start_ns,
            }
        } else {
            ConnKey::Tcp(rec.cookie)
        }
    }

    /// The id of the connection a record is about, if the core does not
    /// know it: after a restart, the loop asks the ledger whether such a
    /// record was committed before the crash.
    pub fn unknown_conn_id(&self, rec: &Closed) -> Option<String> {
        let key = Self::record_key(rec);
        (!self.conns.contains_key(&key) && !self.closed.contains_key(&key))
            .then(|| conn::conn_id(&self.boot, &key, rec.info.remote_port))
    }

    /// A close record as the closed log writes it (for one re-delivered
    /// after a crash, which the core does not bill again).
    pub fn closed_conn_of(&self, rec: &Closed) -> Option<ClosedConn> {
        if rec.info.flags & CONN_GAP != 0 {
            return None;
        }
        let rec = &dated(rec);
        let key = Self::record_key(rec);
        Some(ClosedConn {
            id: conn::conn_id(&self.boot, &key, rec.info.remote_port),
            cookie: rec.cookie,
            service: self
                .services
                .get(rec.info.service as usize)
                .map_or_else(String::new, |s| s.name.to_string()),
            peer: Peer::of(&rec.info),
            counts: rec.counts,
            start_ns: rec.info.start_ns,
            end_ns: rec.info.end_ns,
            flags: rec.info.flags,
        })
    }

    /// A close or gap record from the ring.
    pub fn on_record(&mut self, rec: &Closed) {
        let rec = &dated(rec);
        let key = Self::record_key(rec);
        if self.closed.contains_key(&key) {
            return;
        }
        if !self.conns.contains_key(&key)
            && !self.open_conn(
                key,
                Peer::of(&rec.info),
                rec.info.service,
                rec.info.start_ns,
            )
        {
            return;
        }
        if rec.info.flags & CONN_GAP != 0 {
            self.on_gap(key, rec);
        } else {
            self.on_close(key, rec.counts, rec.info.end_ns, rec.info.flags, rec.cookie);
        }
    }

    fn on_gap(&mut self, key: ConnKey, rec: &Closed) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let base = conn.seg.base;
        if conn.seg.n > 0
            && rec.counts.bytes_out <= base.bytes_out
            && rec.counts.bytes_in <= base.bytes_in
        {
            // Applied before (a record re-delivered after a restart).
            return;
        }
        conn.flags |= rec.info.flags & !CONN_GAP;
        self.end_segment(key, rec.counts, rec.counts.last_ns, false);
        self.next_segment(key, rec.counts, rec.info.end_ns, None);
        self.touch(key);
    }

    /// Starts a connection's next segment at `at`, and stages its row now:
    /// the ended one is in the same commit, so a restart knows where the
    /// next one starts.
    fn next_segment(
        &mut self,
        key: ConnKey,
        at: Counts,
        start_ns: u64,
        attribution: Option<Arc<Attribution>>,
    ) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if attribution.is_some() {
            conn.attribution = attribution;
        }
        conn.seg = conn::Segment {
            n: conn.seg.n + 1,
            base: Counts { last_ns: 0, ..at },
            start_ns,
            viewer: None,
            save: Save::Clean,
            saved_ns: self.now_ns,
        };
        self.batch
            .segments
            .push(segment_row(&self.boot, conn, true, 0));
    }

    fn on_close(&mut self, key: ConnKey, counts: Counts, end_ns: u64, flags: u32, cookie: u64) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.flags |= flags;
        }
        self.end_segment(key, counts, end_ns, true);
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.tuples
            .remove(&(conn.peer.client(), conn.peer.server_port));
        self.closed.insert(key, self.generation);
        if let Some((account, at, order_ns)) = self.cut.remove(&key) {
            let t = self
                .cut_tally
                .entry(Arc::clone(&account))
                .or_insert_with(|| CutOffEvent {
                    account: account.to_string(),
                    bytes_after_cut: 0,
                    ms_after_cut: 0,
                    connections: 0,
                });
            t.bytes_after_cut += counts.bytes_out.saturating_sub(at.bytes_out);
            t.ms_after_cut = t
                .ms_after_cut
                .max(counts.last_ns.saturating_sub(order_ns) / 1_000_000);
            t.connections += 1;
            if !self.cut.values().any(|(a, _, _)| *a == account)
                && let Some(t) = self.cut_tally.remove(&account)
            {
                self.batch.cut_offs.push(t);
            }
        }
        self.batch.closed.push(ClosedConn {
            id: conn.id(&self.boot),
            cookie,
            service: conn.service.name.to_string(),
            peer: conn.peer,
            counts: conn.counts,
            start_ns: conn.start_ns,
            end_ns,
            flags: conn.flags,
        });
    }

    /// A full read of the live TCP map. `info` looks up who a connection
    /// is the first time it is seen; `None`: it is gone (its close record
    /// follows).
    pub fn on_tcp_read(
        &mut self,
        read: &[(u64, Counts)],
        info: &mut dyn FnMut(u64) -> Option<ConnInfo>,
    ) {
        self.generation += 1;
        let horizon = self.generation.saturating_sub(CLOSED_MEMORY);
        self.closed.retain(|_, g| *g >= horizon);
        // New connections join sessions in the order they started, so the
        // result does not depend on the order of the map.
        let mut fresh = Vec::new();
        for &(cookie, counts) in read {
            let key = ConnKey::Tcp(cookie);
            if self.closed.contains_key(&key) {
                continue;
            }
            // One lookup of a known connection (the read's common case).
            if !self.raise_touch(key, &counts, false)
                && let Some(i) = info(cookie)
            {
                fresh.push((i.start_ns, cookie, i, counts));
            }
        }
        fresh.sort_unstable_by_key(|f| (f.0, f.1));
        for (_, cookie, i, counts) in fresh {
            let key = ConnKey::Tcp(cookie);
            if self.open_conn(key, Peer::of(&i), i.service, i.start_ns) {
                self.raise_touch(key, &counts, true);
            }
        }
    }

    /// A full read of the UDP flow map.
    pub fn on_udp_read(&mut self, read: &[(UdpFlowKey, UdpFlow)]) {
        let mut fresh = Vec::new();
        for (k, flow) in read {
            let key = ConnKey::Udp {
                key: *k,
                first_ns: flow.first_ns,
            };
            if self.closed.contains_key(&key) {
                continue;
            }
            if let Some(conn) = self.conns.get_mut(&key) {
                // For UDP, another CPU's datagram can show in the map a
                // moment before the gap record it started is in the ring:
                // a jump past session_idle waits for that record.
                let gap_in_flight = conn.counts.last_ns != 0
                    && flow.counts.last_ns
                        >= conn.counts.last_ns.saturating_add(conn.service.idle_ns);
                if !gap_in_flight {
                    self.raise_touch(key, &flow.counts, false);
                }
            } else {
                fresh.push((flow.first_ns, key, *k, *flow));
            }
        }
        fresh.sort_unstable_by_key(|f| f.0);
        for (_, key, k, flow) in fresh {
            if self.open_conn(key, Peer::of_flow(&k), flow.service, flow.first_ns) {
                self.raise_touch(key, &flow.counts, true);
            }
        }
    }

    /// The UDP flows of `read` that have been idle long enough to remove
    /// from the kernel map, as of `now_ns` taken *before* the read: any
    /// datagram after the read then starts a new segment (the kernel marks
    /// the gap), so removing them does not change what is billed.
    pub fn idle_udp(
        &mut self,
        read: &[(UdpFlowKey, UdpFlow)],
        now_ns: u64,
        timeout_ns: u64,
    ) -> Vec<UdpFlowKey> {
        let mut idle = Vec::new();
        for (k, flow) in read {
            let timeout = self
                .services
                .get(flow.service as usize)
                .map_or(0, |s| s.idle_ns)
                .max(timeout_ns);
            if now_ns < flow.counts.last_ns.saturating_add(timeout) {
                continue;
            }
            let key = ConnKey::Udp {
                key: *k,
                first_ns: flow.first_ns,
            };
            // Taken out of the kernel, its counts live only here until the
            // cycle's commit: a crash in between ends it at the ledger's
            // counts, so those must be its last. A segment the ledger lacks
            // is written this cycle and taken at the next.
            if let Some(conn) = self.conns.get_mut(&key)
                && conn.seg.save != Save::Clean
            {
                conn.seg.save = Save::Now;
                continue;
            }
            idle.push(*k);
        }
        idle
    }

    /// A UDP flow the loop took out of the kernel map, with its final value.
    pub fn on_udp_end(&mut self, k: &UdpFlowKey, flow: &UdpFlow) {
        let key = ConnKey::Udp {
            key: *k,
            first_ns: flow.first_ns,
        };
        if self.closed.contains_key(&key) {
            return;
        }
        if !self.conns.contains_key(&key)
            && !self.open_conn(key, Peer::of_flow(k), flow.service, flow.first_ns)
        {
            return;
        }
        self.on_close(key, flow.counts, flow.counts.last_ns, 0, 0);
    }

    /// The streaming server says whose connection `conn` is. `fresh`
    /// reads its counts from the kernel now: bytes up to them stay where
    /// they were, later ones go to the attributed session.
    pub fn attribute(
        &mut self,
        conn: ConnectionRef,
        attribution: Attribution,
        fresh: &mut dyn FnMut(&ConnKey) -> Option<Counts>,
        now_ns: u64,
        now: Instant,
    ) -> Outcome {
        self.attribute_as(conn, attribution, fresh, now_ns, now, false)
    }

    /// Applies an admission the API has already answered (from the
    /// published [`Standings`](crate::admission::Standings)), with its
    /// decision in `attribution.denied`: exactly what [`Self::authorize`]
    /// does after deciding. `at` is when it was answered (the pending
    /// TTL counts from then). The API reserved its pending slot before it
    /// answered, so it is kept even over `api.max_pending`: an attribution
    /// answered 204 is never dropped here.
    pub fn admit(
        &mut self,
        conn: ConnectionRef,
        attribution: Attribution,
        fresh: &mut dyn FnMut(&ConnKey) -> Option<Counts>,
        now_ns: u64,
        at: Instant,
    ) {
        // By address alone (nginx-rtmp), a refusal kept pending would fall
        // on the next connection from there: see `authorize`.
        if attribution.denied && matches!(conn, ConnectionRef::Client(_)) {
            return;
        }
        self.attribute_as(conn, attribution, fresh, now_ns, at, true);
    }

    /// The published standings: what the API decides admissions from.
    pub fn standings(&self) -> crate::admission::Standings {
        crate::admission::Standings::new(
            &self.limits,
            self.services
                .iter()
                .flat_map(|s| s.tcp_ports.iter().map(move |p| (*p, s.on_limit))),
        )
    }

    /// The pending attributions, with when each arrived.
    pub fn pending_entries(&self) -> impl Iterator<Item = (&ConnectionRef, &Attribution, Instant)> {
        self.pending.entries()
    }

    fn attribute_as(
        &mut self,
        conn: ConnectionRef,
        attribution: Attribution,
        fresh: &mut dyn FnMut(&ConnKey) -> Option<Counts>,
        now_ns: u64,
        now: Instant,
        forced: bool,
    ) -> Outcome {
        let key = match conn {
            ConnectionRef::Cookie(c) => {
                Some(ConnKey::Tcp(c)).filter(|k| self.conns.contains_key(k))
            }
            ConnectionRef::Tuple {
                client,
                server_port,
            } => self.tuples.get(&(canonical(client), server_port)).copied(),
            ConnectionRef::Client(ip) => {
                let ip = ip.to_canonical();
                let same =
                    |c: &Conn| c.peer.protocol == Protocol::Tcp && c.peer.client().ip() == ip;
                // A callback repeated for the same player changes nothing;
                // otherwise the newest unattributed connection from there.
                self.conns
                    .values()
                    .find(|c| same(c) && c.attribution.as_deref() == Some(&attribution))
                    .or_else(|| {
                        self.conns
                            .values()
                            .filter(|c| same(c) && c.attribution.is_none())
                            .max_by_key(|c| c.start_ns)
                    })
                    .map(|c| c.key)
            }
        };
        let Some(key) = key else {
            return if self.pending.add(conn, attribution, now, forced) {
                Outcome::Pending
            } else {
                self.refused += 1;
                Outcome::Refused
            };
        };
        let Some(c) = self.conns.get(&key) else {
            return Outcome::Pending;
        };
        if c.attribution.as_deref() == Some(&attribution) {
            return Outcome::Applied;
        }
        if let Some(counts) = fresh(&key) {
            self.raise(key, &counts);
        }
        self.reattribute(key, attribution, now_ns);
        Outcome::Applied
    }

    /// Gives a known connection a new attribution from its current
    /// counts on: bytes up to them stay where they were.
    fn reattribute(&mut self, key: ConnKey, attribution: Attribution, now_ns: u64) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.seg.has_payload(&c.counts) {
            let at = c.counts;
            self.end_segment(key, at, at.last_ns, false);
            self.next_segment(key, at, now_ns, Some(Arc::new(attribution)));
        } else {
            c.attribution = Some(Arc::new(attribution));
            self.batch
                .segments
                .push(segment_row(&self.boot, c, true, 0));
        }
    }

    /// The streaming server asks whether to serve a request on connection
    /// `conn` for `attribution`'s account: refused when the account is
    /// blocked, or over its limit with a `deny` or `cut` policy; otherwise
    /// the connection is attributed (its later bytes go to the account).
    pub fn authorize(
        &mut self,
        conn: ConnectionRef,
        attribution: Attribution,
        fresh: &mut dyn FnMut(&ConnKey) -> Option<Counts>,
        now_ns: u64,
        now: Instant,
    ) -> Decision {
        let server_port = match conn {
            ConnectionRef::Tuple { server_port, .. } => Some(server_port),
            ConnectionRef::Cookie(c) => {
                self.conns.get(&ConnKey::Tcp(c)).map(|c| c.peer.server_port)
            }
            ConnectionRef::Client(_) => None,
        };
        let service_policy = server_port
            .and_then(|p| self.by_port.get(&(Protocol::Tcp, p)))
            .and_then(|s| s.on_limit);
        let refusal = crate::admission::refusal(
            self.limits.standing(&attribution.account),
            self.limits.policy(&attribution.account),
            service_policy,
        );
        if let Some(reason) = refusal {
            // The refusal nginx sends now is billed to nobody (its bytes
            // stay in the connection's audit rows). Only for a connection
            // named exactly: by address alone (nginx-rtmp), a refusal kept
            // pending would fall on the next connection from there.
            if !matches!(conn, ConnectionRef::Client(_)) {
                let denied = Attribution {
                    denied: true,
                    ..attribution
                };
                self.attribute(conn, denied, fresh, now_ns, now);
            }
            return Decision::Deny(reason);
        }
        match self.attribute(conn, attribution, fresh, now_ns, now) {
            Outcome::Refused => Decision::Deny("busy"),
            outcome => Decision::Allow(outcome),
        }
    }

    /// A committed top-up: the account may be served again if it is back
    /// under its limit, and the cuts of its connections are lifted.
    pub fn credit(&mut self, account: &str, minor: u64) -> Option<Credited> {
        let credited = self.limits.credit(account, minor)?;
        if credited.readmitted {
            self.readmit(account);
        }
        Some(credited)
    }

    /// The fleet's view of an account changed: the other hosts' spend
    /// (millionths) and top-ups. Over the limit, the next cycle reports
    /// and cuts as for this host's own spend; back under it (a top-up on
    /// another host), it is served again. `true` if re-admitted.
    pub fn fleet_view(&mut self, account: &str, spent_micro: i64, credit_minor: u64) -> bool {
        let readmitted = self
            .limits
            .set_others(account, spent_micro, credit_minor)
            .unwrap_or(false);
        if readmitted {
            self.readmit(account);
        }
        readmitted
    }

    /// Lifts the cuts of an account that is back under its limit.
    fn readmit(&mut self, account: &str) {
        let lifted: Vec<ConnKey> = self
            .cut
            .iter()
            .filter(|(_, (a, _, _))| &**a == account)
            .map(|(k, _)| *k)
            .collect();
        for key in lifted {
            self.cut.remove(&key);
            if let Some(conn) = self.conns.get(&key) {
                self.batch.uncuts.push(CutOrder {
                    key,
                    peer: conn.peer,
                });
            }
        }
        self.cut_tally.remove(account);
    }

    /// Orders the live connections of accounts over their limit with the
    /// `cut` policy cut (each once), including ones that appeared since.
    fn order_cuts(&mut self, now_ns: u64) {
        if self.limits.reached_count() == 0 {
            return;
        }
        let mut orders = Vec::new();
        for (key, conn) in &self.conns {
            if self.cut.contains_key(key) || conn.attribution.as_ref().is_some_and(|a| a.denied) {
                continue;
            }
            let account = conn.attribution.as_ref().map_or_else(
                || conn.peer.client().ip().to_string(),
                |a| a.account.clone(),
            );
            if self.limits.is_reached(&account)
                && self
                    .limits
                    .policy(&account)
                    .or(conn.service.on_limit)
                    .unwrap_or(OnLimit::Cut)
                    == OnLimit::Cut
            {
                orders.push((*key, Arc::<str>::from(account), conn.counts, conn.peer));
            }
        }
        for (key, account, counts, peer) in orders {
            self.cut.insert(key, (account, counts, now_ns));
            self.batch.cuts.push(CutOrder { key, peer });
        }
    }

    /// Drops pending attributions older than `ttl`.
    pub fn expire_pending(&mut self, now: Instant, ttl: std::time::Duration) -> usize {
        self.pending.expire(now, ttl)
    }

    /// The billing cycle at kernel time `now_ns`: charges every open
    /// session for the whole units it used since the last cycle, settles
    /// the sessions that ended, stages what changed, and checks limits.
    /// Returns the live sums per service.
    pub fn on_cycle(&mut self, now_ns: u64) -> std::collections::HashMap<Arc<str>, LiveTotals> {
        if self.restoring {
            self.restoring = false;
            self.end_unmatched();
        }
        self.assign_waiting();
        let mut live = PerService::default();
        let this_boot = format!("v{}-", self.boot);
        self.now_ns = now_ns;
        let limited = !self.limits.is_empty();
        let mut ended = Vec::new();
        for v in self.viewers.values_mut() {
            let totals = totals_of(v);
            let quantity = v.quantity(totals);
            if let Some(charge) = billing::cycle_charge(&v.service.tariff, quantity, &mut v.accrual)
            {
                mark(&mut self.due_now, v, Save::Lazy);
                live.of(&v.service.name).charges += 1;
                if limited {
                    self.limits.add(
                        &v.account(),
                        i64::try_from(charge.amount_micro).unwrap_or(i64::MAX),
                    );
                }
            }
            let of_old_boot = !v.id.starts_with(&this_boot);
            if v.ended(now_ns) || (of_old_boot && v.open.is_empty()) {
                ended.push((Arc::clone(&v.id), totals));
                continue;
            }
            if self.save.due(v.save, v.saved_ns, now_ns) {
                stage_viewer(&mut self.batch, &mut self.conns, &self.boot, v, now_ns);
            }
            let t = live.of(&v.service.name);
            t.viewers += 1;
            t.charged_minor += v.accrual.charged_micro / MICRO;
        }
        for (id, totals) in ended {
            self.settle(&id, totals);
        }
        for conn in self.conns.values() {
            let t = live.of(&conn.service.name);
            let (o, i) = conn.seg.bytes(&conn.counts);
            t.bytes_out += o;
            t.bytes_in += i;
            t.connections += 1;
        }
        self.stage_dirty();
        for (account, spent_minor, limit_minor) in self.limits.check() {
            let policy = self.limits.policy(&account).unwrap_or_else(|| {
                // The service default of the account's live connections.
                self.conns
                    .values()
                    .find(|c| c.attribution.as_ref().is_some_and(|a| a.account == account))
                    .and_then(|c| c.service.on_limit)
                    .unwrap_or(OnLimit::Cut)
            });
            // The ledger's accruals at the event add up to what it says.
            for v in self.viewers.values_mut() {
                if v.save != Save::Clean && v.account() == account {
                    mark(&mut self.due_now, v, Save::Now);
                }
            }
            self.batch.limits.push(LimitEvent {
                account,
                spent_minor,
                limit_minor,
                policy,
            });
        }
        self.order_cuts(now_ns);
        live.0.into_iter().collect()
    }

    /// Stages the open sessions owing a structural change, and the
    /// segments not staged with their session: new ones, and changed ones
    /// of no session yet.
    fn stage_dirty(&mut self) {
        self.stage_viewers();
        let boot = self.boot.clone();
        let (policy, now_ns) = (self.save, self.now_ns);
        for conn in self.conns.values_mut().filter(|c| {
            // A segment of a session goes with it; one of none (refused,
            // not billable, or not given one yet) by itself.
            c.seg.save == Save::Now
                || (c.seg.viewer.is_none() && policy.due(c.seg.save, c.seg.saved_ns, now_ns))
        }) {
            conn.seg.save = Save::Clean;
            conn.seg.saved_ns = now_ns;
            if conn.seg.viewer.is_none() && conn.attribution.is_none() && conn.seg.n == 0 {
                // Nothing to remember yet: it would come back from the kernel.
                continue;
            }
            self.batch.segments.push(segment_row(&boot, conn, true, 0));
        }
    }

    /// Ends the restored segments whose connection did not come back (it
    /// closed while its record could not be kept, or the host rebooted),
    /// at the counts the ledger last had.
    fn end_unmatched(&mut self) {
        for (_, row) in std::mem::take(&mut self.restored) {
            tracing::warn!(
                connection = %row.id,
                "connection of an open session did not come back after the restart: \
                 ending it at the counts last recorded"
            );
            let (o, i) = row.bytes();
            let ended = SegmentRow {
                open: false,
                end_ns: row.counts.last_ns.max(row.start_ns),
                ..row
            };
            if let Some(v) = self.viewers.get_mut(ended.session_id.as_str()) {
                v.done.0 += o;
                v.done.1 += i;
                v.last_ns = v.last_ns.max(ended.counts.last_ns);
                mark(&mut self.due_now, v, Save::Now);
            } else {
                self.adopt_orphan(ended.clone());
            }
            self.batch.segments.push(ended);
        }
    }

    /// Settles a session: the tariff applied once to its totals, minus what
    /// the cycles charged.
    fn settle(&mut self, id: &Arc<str>, totals: (u64, u64)) {
        let Some(v) = self.viewers.remove(id) else {
            return;
        };
        if self.current.get(&v.key).is_some_and(|c| c.id() == id) {
            self.current.remove(&v.key);
        }
        let quantity = v.quantity(totals);
        let amounts = billing::settle(&v.service.tariff, quantity, &v.accrual);
        self.limits.add(&v.account(), amounts.adjustment_micro);
        self.batch.settled.push(SettledRow {
            row: viewer_row(&v, totals),
            duration_ms: v.duration_ns() / 1_000_000,
            charge_minor: amounts.total_minor,
            cycles_micro: amounts.cycles_micro,
            adjustment_micro: amounts.adjustment_micro,
        });
    }

    /// Adds a connection first seen now; false if its service is unknown.
    fn open_conn(&mut self, key: ConnKey, peer: Peer, index: u32, start_ns: u64) -> bool {
        let id = conn::conn_id(&self.boot, &key, peer.client_port);
        let restored = self.restored.remove(&id);
        let service = restored
            .as_ref()
            .and_then(|r| self.viewers.get(r.session_id.as_str()))
            .map(|v| Arc::clone(&v.service))
            .or_else(|| {
                restored
                    .as_ref()
                    .and_then(|r| self.by_name.get(r.service.as_str()).cloned())
            })
            .or_else(|| {
                self.by_port
                    .get(&(peer.protocol, peer.server_port))
                    .cloned()
            })
            .or_else(|| self.services.get(index as usize).cloned());
        let Some(service) = service else {
            tracing::error!(
                connection = %id,
                service = index,
                "connection of a service the config does not have: not billed"
            );
            return false;
        };
        let mut conn = Conn::new(key, service, peer, start_ns);
        if let Some(r) = restored {
            conn.counts = r.counts;
            conn.attribution = r.account.clone().map(|account| {
                Arc::new(Attribution {
                    account,
                    content: r.content.clone(),
                    denied: r.denied,
                })
            });
            let viewer = self.viewers.find(&r.session_id);
            conn.seg = conn::Segment {
                n: r.n,
                base: r.base,
                start_ns: r.start_ns,
                viewer,
                save: Save::Clean,
                saved_ns: 0,
            };
            if let Some(v) = conn
                .seg
                .viewer
                .as_ref()
                .and_then(|v| self.viewers.at_mut(v))
            {
                v.open.push(key);
                grow(&mut v.live, (0, 0), conn.seg.bytes(&conn.counts));
            }
            if conn.start_ns == 0 {
                conn.start_ns = r.start_ns;
            }
            // An admission answered before a crash and replayed from the
            // journal (see `crate::journal`) for a connection the ledger
            // already had: its bytes since the last commit go to it.
            let cookie = match key {
                ConnKey::Tcp(c) => Some(c),
                ConnKey::Udp { .. } => None,
            };
            if let Some(a) = self
                .pending
                .take(cookie, peer.client(), peer.server_port)
                .filter(|a| conn.attribution.as_deref() != Some(a))
            {
                let from_ns = conn.counts.last_ns.max(conn.seg.start_ns);
                self.tuples.insert((peer.client(), peer.server_port), key);
                self.conns.insert(key, conn);
                self.reattribute(key, a, from_ns);
                return true;
            }
        } else {
            let cookie = match key {
                ConnKey::Tcp(c) => Some(c),
                ConnKey::Udp { .. } => None,
            };
            conn.attribution = self
                .pending
                .take(cookie, peer.client(), peer.server_port)
                .map(Arc::new);
        }
        self.tuples.insert((peer.client(), peer.server_port), key);
        self.conns.insert(key, conn);
        true
    }

    /// Raises a live connection's counts to `read` (counts never go
    /// down), and its session's live bytes with its segment's. Every rise
    /// of a connection's counts goes through here (or
    /// [`Self::raise_touch`]), so the session's totals need no lookup per
    /// connection. True if they rose.
    fn raise(&mut self, key: ConnKey, read: &Counts) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        let before = conn.seg.bytes(&conn.counts);
        if !conn.raise(read) {
            return false;
        }
        if let Some(v) = conn
            .seg
            .viewer
            .as_ref()
            .and_then(|r| self.viewers.at_mut(r))
        {
            grow(&mut v.live, before, conn.seg.bytes(&conn.counts));
        }
        true
    }

    /// [`Self::raise`] and then [`Self::touch`] (also when nothing rose,
    /// with `always`), with one lookup of the connection and of its
    /// session: the read's path for every connection that moved. False if
    /// the connection is not known.
    fn raise_touch(&mut self, key: ConnKey, read: &Counts, always: bool) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        let before = conn.seg.bytes(&conn.counts);
        if !conn.raise(read) && !always {
            return true;
        }
        let Some(at) = conn.seg.viewer.as_ref() else {
            self.touch(key);
            return true;
        };
        let Some(v) = self.viewers.at_mut(at) else {
            return true;
        };
        let after = conn.seg.bytes(&conn.counts);
        grow(&mut v.live, before, after);
        // As `touch` for a segment of a session (it has moved payload).
        if conn.answered() && (after.0 > 0 || after.1 > 0) {
            conn.seg.save.raise(Save::Lazy);
            v.last_ns = v.last_ns.max(conn.counts.last_ns.max(conn.seg.start_ns));
            mark(&mut self.due_now, v, Save::Lazy);
        }
        true
    }

    /// After a connection's counts changed: the session's last payload
    /// moves with it; a segment that has just moved its first payload
    /// byte joins its key's session if that one admits it. New sessions
    /// are opened only by the cycle ([`Self::assign_waiting`]).
    fn touch(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.seg.has_payload(&conn.counts) || !conn.answered() {
            return;
        }
        conn.seg.save.raise(Save::Lazy);
        let last = conn.counts.last_ns.max(conn.seg.start_ns);
        match &conn.seg.viewer {
            Some(at) => {
                if let Some(v) = self.viewers.at_mut(at) {
                    v.last_ns = v.last_ns.max(last);
                    mark(&mut self.due_now, v, Save::Lazy);
                }
            }
            None => {
                if let Some(w) = self.waiting_of(key)
                    && let Some(at) = self.joinable(&w)
                {
                    self.attach(&w, &at, Seat::Live(key));
                }
            }
        }
    }

    /// What a live connection's current segment would need to join a
    /// session; `None` if it bills nobody (refused, a UDP flow never
    /// answered) or has moved no payload yet.
    fn waiting_of(&self, key: ConnKey) -> Option<Waiting> {
        let conn = self.conns.get(&key)?;
        if conn.attribution.as_ref().is_some_and(|a| a.denied)
            || (conn.attribution.is_none() && !conn.service.bill_unattributed)
            || !conn.answered()
            || !conn.seg.has_payload(&conn.counts)
        {
            return None;
        }
        let start = if conn.seg.start_ns != 0 {
            conn.seg.start_ns
        } else {
            conn.counts.last_ns
        };
        Some(Waiting {
            key: viewer_key(
                &conn.service.name,
                conn.attribution.as_deref(),
                conn.peer.client().ip(),
            ),
            service: Arc::clone(&conn.service),
            start_ns: start,
            last_ns: conn.counts.last_ns.max(start),
            client: conn.peer.client().ip(),
            segment_id: conn.segment_id(&self.boot),
            bytes: conn.seg.bytes(&conn.counts),
        })
    }

    /// The open session of its key that admits a segment starting at
    /// `w.start_ns`.
    fn joinable(&self, w: &Waiting) -> Option<SessionRef> {
        self.current
            .get(&w.key)
            .filter(|at| {
                self.viewers
                    .get(at.id())
                    .is_some_and(|v| v.admits(w.start_ns))
            })
            .cloned()
    }

    /// Gives every segment that moved payload but has no session one, in
    /// the order they started: the open session of its key that admits
    /// it, else a new one. Run by the cycle after the read, so that the
    /// sessions do not depend on the order in which records and reads
    /// arrived, nor on how often the agent reads.
    fn assign_waiting(&mut self) {
        let mut waiting: Vec<(Waiting, Seat)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.seg.viewer.is_none())
            .filter_map(|(k, _)| Some((self.waiting_of(*k)?, Seat::Live(*k))))
            .collect();
        waiting.extend(
            std::mem::take(&mut self.orphans)
                .into_iter()
                .map(|(w, row)| (w, Seat::Ended(Box::new(row)))),
        );
        waiting
            .sort_by(|a, b| (a.0.start_ns, &a.0.segment_id).cmp(&(b.0.start_ns, &b.0.segment_id)));
        for (w, seat) in waiting {
            let at = self.joinable(&w).unwrap_or_else(|| self.open_viewer(&w));
            self.attach(&w, &at, seat);
        }
    }

    /// A new viewing session for `w`, named after its segment.
    fn open_viewer(&mut self, w: &Waiting) -> SessionRef {
        let at = self.viewers.insert(Viewer::new(
            Arc::from(format!("v{}", w.segment_id)),
            w.key.clone(),
            Arc::clone(&w.service),
            w.client,
            w.start_ns,
            w.last_ns,
        ));
        self.current.insert(w.key.clone(), at.clone());
        at
    }

    /// Puts a segment into session `at`.
    fn attach(&mut self, w: &Waiting, at: &SessionRef, seat: Seat) {
        let Some(v) = self.viewers.at_mut(at) else {
            return;
        };
        v.connections += 1;
        v.first_ns = v.first_ns.min(w.start_ns);
        v.last_ns = v.last_ns.max(w.last_ns);
        match seat {
            Seat::Live(key) => {
                v.open.push(key);
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.seg.viewer = Some(at.clone());
                    conn.seg.save = Save::Now;
                    grow(&mut v.live, (0, 0), conn.seg.bytes(&conn.counts));
                }
            }
            Seat::Ended(mut row) => {
                v.done.0 += w.bytes.0;
                v.done.1 += w.bytes.1;
                row.session_id = at.id().to_string();
                row.restaged = true;
                self.batch.segments.push(*row);
            }
        }
        mark(&mut self.due_now, v, Save::Now);
    }

    /// Ends a connection's current segment at `at`: its bytes up to there
    /// are its session's for good.
    fn end_segment(&mut self, key: ConnKey, at: Counts, end_ns: u64, closes: bool) {
        self.raise(key, &at);
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let has_payload = conn.seg.has_payload(&at);
        let mut orphan = None;
        if has_payload && conn.seg.viewer.is_none() {
            let bytes = conn.seg.bytes(&at);
            if let Some(mut w) = self.waiting_of(key) {
                w.bytes = bytes;
                w.last_ns = at.last_ns.max(w.start_ns);
                match self.joinable(&w) {
                    Some(at) => self.attach(&w, &at, Seat::Live(key)),
                    // Its session is opened by the next cycle, in order.
                    None => orphan = Some(w),
                }
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let (o, i) = conn.seg.bytes(&at);
        if let Some(v) = conn
            .seg
            .viewer
            .as_ref()
            .and_then(|r| self.viewers.at_mut(r))
        {
            v.done.0 += o;
            v.done.1 += i;
            let (lo, li) = conn.seg.bytes(&conn.counts);
            v.live = (v.live.0.saturating_sub(lo), v.live.1.saturating_sub(li));
            v.open.retain(|k| *k != key);
            if has_payload {
                v.last_ns = v.last_ns.max(at.last_ns.max(conn.seg.start_ns));
            }
            mark(&mut self.due_now, v, Save::Now);
        }
        // Kept for audit: every connection, and every part of one that moved
        // payload; not a UDP flow the server never answered (spoofed
        // sources would grow the ledger by a row each).
        if (has_payload || conn.seg.n == 0) && conn.answered() {
            let mut row = segment_row(&self.boot, conn, false, end_ns.max(conn.seg.start_ns));
            row.counts = at;
            row.closes_conn = closes;
            if let Some(w) = orphan {
                self.orphans.push((w, row.clone()));
            }
            self.batch.segments.push(row);
        }
    }
}

/// A segment that moved payload and waits for its session.
#[derive(Debug, Clone)]
struct Waiting {
    key: ViewerKey,
    service: Arc<ServiceDef>,
    start_ns: u64,
    last_ns: u64,
    client: IpAddr,
    segment_id: String,
    /// Its bytes, if it has ended.
    bytes: (u64, u64),
}

/// Where a waiting segment is.
#[derive(Debug)]
enum Seat {
    /// The current segment of a live connection.
    Live(ConnKey),
    /// A segment that ended before the cycle gave it a session.
    Ended(Box<SegmentRow>),
}

/// The session key of a segment.
fn viewer_key(service: &Arc<str>, attribution: Option<&Attribution>, client: IpAddr) -> ViewerKey {
    ViewerKey {
        service: Arc::clone(service),
        who: match attribution {
            Some(a) => Who::Account {
                account: a.account.clone(),
                content: a.content.clone().unwrap_or_default(),
            },
            None => Who::Client(client),
        },
    }
}

fn viewer_row(v: &Viewer, bytes: (u64, u64)) -> ViewerRow {
    ViewerRow {
        id: v.id.to_string(),
        service: v.service.name.to_string(),
        tariff: v.service.tariff.clone(),
        account: v.account(),
        content: v.content().to_owned(),
        attributed: matches!(v.key.who, Who::Account { .. }),
        client_addr: v.client_addr.to_string(),
        first_ns: v.first_ns,
        last_ns: v.last_ns,
        bytes_out: bytes.0,
        bytes_in: bytes.1,
        connections: v.connections,
        accrual: v.accrual,
        started_ms: v.started_ms,
    }
}

fn segment_row(boot: &str, conn: &Conn, open: bool, end_ns: u64) -> SegmentRow {
    let conn_id = conn.id(boot);
    SegmentRow {
        id: conn::segment_id(&conn_id, conn.seg.n),
        conn_id,
        n: conn.seg.n,
        session_id: conn
            .seg
            .viewer
            .as_ref()
            .map_or_else(String::new, |r| r.id().to_string()),
        open,
        service: conn.service.name.to_string(),
        account: conn.attribution.as_ref().map(|a| a.account.clone()),
        content: conn.attribution.as_ref().and_then(|a| a.content.clone()),
        denied: conn.attribution.as_ref().is_some_and(|a| a.denied),
        protocol: conn.peer.protocol,
        client: conn.peer.client(),
        server: conn.peer.server(),
        start_ns: conn.seg.start_ns,
        end_ns,
        base: conn.seg.base,
        counts: conn.counts,
        flags: conn.flags,
        closes_conn: false,
        restaged: false,
    }
}

/// A close record as the core bills it. One flagged `CONN_UNTRACKED` (the
/// live map had no room when the connection opened) has exact bytes, and
/// its start and last payload from its socket's storage. From an older
/// eBPF object (or a socket whose storage could not be made) both are 0,
/// the boot clock's origin: taken as they are, its payload would join a
/// session at the boot clock's 0 or make one of 0 s. Its close is then the
/// one time known, and its payload moved at the latest then, so what is
/// missing is dated there: the connection joins (and extends to its
/// close) its viewer's session open at that moment, or opens one at its
/// close.
fn dated(rec: &Closed) -> Closed {
    let mut rec = *rec;
    if rec.info.flags & CONN_UNTRACKED != 0 && rec.info.flags & CONN_GAP == 0 {
        if rec.info.start_ns == 0 {
            rec.info.start_ns = rec.info.end_ns;
        }
        if rec.counts.last_ns == 0 {
            rec.counts.last_ns = rec.info.end_ns;
        }
    }
    rec
}

fn flow_key(info: &ConnInfo) -> UdpFlowKey {
    UdpFlowKey {
        local_addr: info.local_addr,
        remote_addr: info.remote_addr,
        local_port: info.local_port,
        remote_port: info.remote_port,
        family: info.family,
        pad: 0,
    }
}

/// IPv4-mapped IPv6 client addresses as IPv4, as the kernel side reports them.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests;
