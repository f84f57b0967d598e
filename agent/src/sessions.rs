//! The agent's view of every metered session, built from kernel reads.
//!
//! Owns: which sessions are live, their latest counts, what billing has
//! charged each (its [`Accrual`]), and the rule that each session is settled
//! exactly once. Input: full reads of the live maps and close records.
//! Output: [`Settled`] sessions, and the live table the billing cycle
//! charges from. It does no I/O itself, so it is tested without a kernel.
//!
//! Exactly once: a TCP session is identified by its socket cookie, which the
//! kernel never reuses within a boot. A cookie once settled is remembered, so
//! a close record seen twice (an upgrade overlap, a re-delivered record after
//! a crash) or a stale live read cannot bring the session back.
//!
//! Memory: a session is about 100 bytes in its table, and its string id is
//! made only when a ledger row needs it: 100k live sessions stay far below
//! the agent's budget.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use meterd_common::{AF_INET6, CONN_CLOSED, Closed, ConnInfo, Counts, UdpFlow, UdpFlowKey};

use crate::{attribution::Attribution, billing::Accrual};

/// Transport of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `"tcp"` or `"udp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// A live or settled session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Socket cookie (TCP) or 0 (UDP).
    pub cookie: u64,
    /// Boot-time ns of establishment (0: unknown, `CONN_UNTRACKED`).
    pub start_ns: u64,
    /// Latest counts (exact once settled).
    pub counts: Counts,
    /// What the billing cycles have charged it.
    pub accrual: Accrual,
    /// Attributed by the streaming server; `None`: billed to the client address.
    pub attribution: Option<Box<Attribution>>,
    /// Client and server addresses, network-order words (kernel layout).
    client_addr: [u32; 4],
    server_addr: [u32; 4],
    /// Index into `config.services`.
    pub service: u32,
    pub client_port: u16,
    pub server_port: u16,
    family: u16,
    pub protocol: Protocol,
}

impl Session {
    /// The client's address and port.
    pub fn client(&self) -> SocketAddr {
        addr(self.family, self.client_addr, self.client_port)
    }

    /// The server's address and port.
    pub fn server(&self) -> SocketAddr {
        addr(self.family, self.server_addr, self.server_port)
    }

    /// The account billed: the attributed one, or the client address.
    pub fn account(&self) -> String {
        self.attribution
            .as_ref()
            .map_or_else(|| self.client().ip().to_string(), |a| a.account.clone())
    }

    /// The content id, if attributed.
    pub fn content(&self) -> &str {
        self.attribution
            .as_ref()
            .and_then(|a| a.content.as_deref())
            .unwrap_or("")
    }
}

/// A session that has ended, with its exact totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The session's id (see [`Sessions::id`]).
    pub id: String,
    pub session: Session,
    /// Boot-time ns of the close (TCP) or of the last datagram (UDP).
    pub end_ns: u64,
    /// `CONN_*` flags from the kernel.
    pub flags: u32,
}

/// The live table.
#[derive(Debug)]
pub struct Sessions {
    boot_id: String,
    tcp: HashMap<u64, Session>,
    udp: HashMap<UdpFlowKey, Session>,
    /// Accruals read back from the ledger, by session id, handed to their
    /// sessions when these show up again after a restart.
    restored: HashMap<String, Accrual>,
    /// Cookies already settled, with the read generation they were settled in.
    settled: HashMap<u64, u64>,
    /// Incremented by every full read; old settled cookies are forgotten
    /// after [`SETTLED_MEMORY`] reads.
    generation: u64,
}

/// Reads to remember a settled cookie for. A live read can be at most one
/// read older than a close record, so two are enough; the margin is cheap.
const SETTLED_MEMORY: u64 = 8;

impl Sessions {
    /// An empty table; `boot_id` makes session ids unique across boots.
    pub fn new(boot_id: &str) -> Self {
        Self {
            boot_id: boot_id.replace('-', ""),
            tcp: HashMap::new(),
            udp: HashMap::new(),
            restored: HashMap::new(),
            settled: HashMap::new(),
            generation: 0,
        }
    }

    /// A session's id, unique across boots: `<boot id>-<cookie>` for TCP,
    /// `<boot id>-u<first_ns>-<client port>` for UDP. With a sequence number
    /// it makes the ledger's idempotent record ids.
    pub fn id(&self, s: &Session) -> String {
        session_id(&self.boot_id, s)
    }

    /// The boot id part of session ids.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Live sessions.
    pub fn live(&self) -> impl Iterator<Item = &Session> {
        self.tcp.values().chain(self.udp.values())
    }

    /// Live sessions, mutable (billing updates their accruals).
    pub fn live_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.tcp.values_mut().chain(self.udp.values_mut())
    }

    /// Number of live sessions.
    pub fn live_count(&self) -> usize {
        self.tcp.len() + self.udp.len()
    }

    /// Hands over what the ledger says open sessions were charged.
    pub fn restore_accruals(&mut self, accruals: HashMap<String, Accrual>) {
        self.restored = accruals;
    }

    /// Restored accruals whose session has not shown up (yet).
    pub fn restored_waiting(&self) -> usize {
        self.restored.len()
    }

    /// Marks ids settled in an earlier run of the agent (e.g. read back from
    /// a log), so re-delivered close records are not settled again.
    pub fn remember_settled(&mut self, cookies: impl IntoIterator<Item = u64>) {
        for c in cookies {
            self.settled.insert(c, self.generation);
        }
    }

    /// Attributes the live session `conn` names; false if there is none.
    pub fn attribute(
        &mut self,
        conn: crate::attribution::ConnectionRef,
        attribution: &Attribution,
    ) -> bool {
        let target = match conn {
            crate::attribution::ConnectionRef::Cookie(c) => self.tcp.get_mut(&c),
            crate::attribution::ConnectionRef::Tuple { .. } => {
                self.live_mut().find(|s| conn.matches(s))
            }
        };
        match target {
            Some(s) => {
                s.attribution = Some(Box::new(attribution.clone()));
                true
            }
            None => false,
        }
    }

    /// Applies a full read of the live TCP map. `info` looks up who a new
    /// cookie is. With `find_closed` (the kernel's ring-full counter moved,
    /// or the agent just started), every entry's info is looked up, and
    /// entries the kernel left closed are settled here and returned; the
    /// caller then deletes them from the maps.
    pub fn apply_tcp_read(
        &mut self,
        read: &[(u64, Counts)],
        find_closed: bool,
        mut info: impl FnMut(u64) -> Option<ConnInfo>,
    ) -> Vec<Settled> {
        self.generation += 1;
        let horizon = self.generation.saturating_sub(SETTLED_MEMORY);
        self.settled.retain(|_, g| *g >= horizon);
        let mut settled = Vec::new();
        for &(cookie, counts) in read {
            if self.settled.contains_key(&cookie) {
                continue;
            }
            if let Some(s) = self.tcp.get_mut(&cookie) {
                raise(&mut s.counts, counts);
                if !find_closed {
                    continue;
                }
            }
            let Some(conn) = info(cookie) else {
                // Closed between the two reads: its close record follows.
                continue;
            };
            if conn.flags & CONN_CLOSED != 0 {
                let mut session = match self.tcp.remove(&cookie) {
                    Some(s) => s,
                    None => self.tcp_session(cookie, &conn),
                };
                session.counts = counts;
                self.settled.insert(cookie, self.generation);
                settled.push(self.settle(session, conn.end_ns, conn.flags));
                continue;
            }
            if !self.tcp.contains_key(&cookie) {
                let mut s = self.tcp_session(cookie, &conn);
                s.counts = counts;
                self.tcp.insert(cookie, s);
            }
        }
        settled
    }

    /// Settles a TCP session from its close record; `None` if it was
    /// settled already.
    pub fn close_tcp(&mut self, closed: &Closed) -> Option<Settled> {
        if self.settled.contains_key(&closed.cookie) {
            return None;
        }
        self.settled.insert(closed.cookie, self.generation);
        let mut session = match self.tcp.remove(&closed.cookie) {
            Some(mut s) => {
                if s.start_ns == 0 {
                    s.start_ns = closed.info.start_ns;
                }
                s
            }
            None => self.tcp_session(closed.cookie, &closed.info),
        };
        session.counts = closed.counts;
        Some(self.settle(session, closed.info.end_ns, closed.info.flags))
    }

    /// Applies a full read of the UDP flow map at boot-time `now_ns`, and
    /// returns the flows idle for at least `idle_ns`: the caller takes them
    /// out of the kernel map and passes the final values to [`Self::end_udp`].
    pub fn apply_udp_read(
        &mut self,
        read: &[(UdpFlowKey, UdpFlow)],
        now_ns: u64,
        idle_ns: u64,
    ) -> Vec<UdpFlowKey> {
        let mut idle = Vec::new();
        for (key, flow) in read {
            if let Some(s) = self.udp.get_mut(key) {
                raise(&mut s.counts, flow.counts);
            } else {
                let s = self.udp_session(key, flow);
                self.udp.insert(*key, s);
            }
            if now_ns.saturating_sub(flow.last_ns) >= idle_ns {
                idle.push(*key);
            }
        }
        idle
    }

    /// Settles a UDP flow with the final value taken out of the kernel map.
    pub fn end_udp(&mut self, key: &UdpFlowKey, last: &UdpFlow) -> Settled {
        let mut session = match self.udp.remove(key) {
            Some(s) if s.start_ns == last.first_ns => s,
            _ => self.udp_session(key, last),
        };
        session.counts = last.counts;
        self.settle(session, last.last_ns, 0)
    }

    fn settle(&self, session: Session, end_ns: u64, flags: u32) -> Settled {
        Settled {
            id: self.id(&session),
            session,
            end_ns,
            flags,
        }
    }

    fn tcp_session(&mut self, cookie: u64, info: &ConnInfo) -> Session {
        let mut s = Session {
            cookie,
            start_ns: info.start_ns,
            counts: Counts::default(),
            accrual: Accrual::default(),
            attribution: None,
            client_addr: info.remote_addr,
            server_addr: info.local_addr,
            service: info.service,
            client_port: info.remote_port,
            server_port: info.local_port,
            family: info.family,
            protocol: Protocol::Tcp,
        };
        self.take_restored(&mut s);
        s
    }

    fn udp_session(&mut self, key: &UdpFlowKey, flow: &UdpFlow) -> Session {
        let mut s = Session {
            cookie: 0,
            start_ns: flow.first_ns,
            counts: flow.counts,
            accrual: Accrual::default(),
            attribution: None,
            client_addr: key.remote_addr,
            server_addr: key.local_addr,
            service: flow.service,
            client_port: key.remote_port,
            server_port: key.local_port,
            family: key.family,
            protocol: Protocol::Udp,
        };
        self.take_restored(&mut s);
        s
    }

    fn take_restored(&mut self, s: &mut Session) {
        if !self.restored.is_empty()
            && let Some(a) = self.restored.remove(&self.id(s))
        {
            s.accrual = a;
        }
    }
}

/// See [`Sessions::id`].
pub fn session_id(boot_id: &str, s: &Session) -> String {
    match s.protocol {
        Protocol::Tcp => format!("{boot_id}-{}", s.cookie),
        Protocol::Udp => format!("{boot_id}-u{}-{}", s.start_ns, s.client_port),
    }
}

/// Live counts only grow; a read that is older than what we hold is ignored.
fn raise(have: &mut Counts, read: Counts) {
    have.bytes_out = have.bytes_out.max(read.bytes_out);
    have.bytes_in = have.bytes_in.max(read.bytes_in);
}

/// A socket address from the kernel's network-order words; IPv4-mapped
/// IPv6 addresses come out as IPv4.
pub fn addr(family: u16, words: [u32; 4], port: u16) -> SocketAddr {
    let ip = if family == AF_INET6 {
        let mut bytes = [0u8; 16];
        for (chunk, w) in bytes.as_chunks_mut::<4>().0.iter_mut().zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        // A dual-stack socket sees IPv4 clients as ::ffff:a.b.c.d: bill them
        // as the IPv4 address they are.
        Ipv6Addr::from(bytes).to_canonical()
    } else {
        IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
    };
    SocketAddr::new(ip, port)
}

/// Cookies of a settled-id list, for [`Sessions::remember_settled`].
pub fn cookies_of<S: std::hash::BuildHasher>(ids: &HashSet<String, S>, boot_id: &str) -> Vec<u64> {
    let prefix = format!("{}-", boot_id.replace('-', ""));
    ids.iter()
        .filter_map(|id| id.strip_prefix(&prefix)?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use meterd_common::{AF_INET, AF_INET6, CONN_UNTRACKED};

    use super::*;

    fn info(port: u16) -> ConnInfo {
        ConnInfo {
            start_ns: 100,
            local_addr: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
            remote_addr: [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0],
            local_port: 8080,
            remote_port: port,
            family: AF_INET,
            protocol: 6,
            ..ConnInfo::default()
        }
    }

    fn counts(o: u64, i: u64) -> Counts {
        Counts {
            bytes_out: o,
            bytes_in: i,
        }
    }

    #[test]
    fn close_record_settles_once_and_stale_reads_do_not_revive() {
        let mut s = Sessions::new("b00t");
        s.apply_tcp_read(&[(7, counts(10, 1))], false, |_| Some(info(4000)));
        assert_eq!(s.live_count(), 1);
        let mut closed = Closed {
            cookie: 7,
            counts: counts(25, 3),
            info: info(4000),
        };
        closed.info.end_ns = 500;
        let settled = s.close_tcp(&closed).unwrap();
        assert_eq!(settled.session.counts, counts(25, 3));
        assert_eq!(settled.id, "b00t-7");
        assert_eq!(settled.session.client().to_string(), "127.0.0.2:4000");
        assert!(
            s.close_tcp(&closed).is_none(),
            "second record must be dropped"
        );
        // A read taken before the close still lists the cookie.
        s.apply_tcp_read(&[(7, counts(20, 1))], false, |_| Some(info(4000)));
        assert_eq!(s.live_count(), 0);
    }

    #[test]
    fn connection_unseen_by_any_read_is_settled_from_its_record() {
        let mut s = Sessions::new("b");
        let closed = Closed {
            cookie: 9,
            counts: counts(5, 6),
            info: ConnInfo {
                flags: CONN_UNTRACKED,
                ..info(4001)
            },
        };
        let settled = s.close_tcp(&closed).unwrap();
        assert_eq!(settled.session.counts, counts(5, 6));
        assert_eq!(settled.flags, CONN_UNTRACKED);
    }

    #[test]
    fn closed_entry_left_in_live_map_is_settled_by_the_read() {
        let mut s = Sessions::new("b");
        let mut closed_info = info(4002);
        closed_info.flags = CONN_CLOSED;
        closed_info.end_ns = 900;
        let out = s.apply_tcp_read(&[(11, counts(70, 8))], true, |_| Some(closed_info));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].session.counts, counts(70, 8));
        assert_eq!(out[0].end_ns, 900);
        // Then the same connection through a (late) ring record: dropped.
        assert!(
            s.close_tcp(&Closed {
                cookie: 11,
                counts: counts(70, 8),
                info: closed_info
            })
            .is_none()
        );
    }

    #[test]
    fn mapped_ipv4_is_billed_as_ipv4() {
        let mapped = [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes([192, 0, 2, 9]),
        ];
        assert_eq!(addr(AF_INET6, mapped, 80).to_string(), "192.0.2.9:80");
        let v6 = [
            u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]),
            0,
            0,
            1u32.to_be(),
        ];
        assert_eq!(addr(AF_INET6, v6, 80).to_string(), "[2001:db8::1]:80");
    }

    #[test]
    fn restored_accrual_goes_back_to_its_session() {
        let mut s = Sessions::new("b");
        let accrual = Accrual {
            units: 3,
            charged_micro: 3_000_000,
            seq: 2,
        };
        s.restore_accruals(HashMap::from([("b-7".to_owned(), accrual)]));
        s.apply_tcp_read(&[(7, counts(3000, 0))], true, |_| Some(info(4000)));
        assert_eq!(s.live().next().unwrap().accrual, accrual);
        assert_eq!(s.restored_waiting(), 0);
    }

    #[test]
    fn session_stays_small() {
        // 100k sessions must fit the agent's memory budget.
        assert!(size_of::<Session>() <= 112, "{}", size_of::<Session>());
    }

    #[test]
    fn live_counts_never_go_down() {
        let mut s = Sessions::new("b");
        s.apply_tcp_read(&[(1, counts(50, 5))], false, |_| Some(info(1)));
        s.apply_tcp_read(&[(1, counts(40, 9))], false, |_| Some(info(1)));
        let live: Vec<_> = s.live().collect();
        assert_eq!(live[0].counts, counts(50, 9));
    }

    #[test]
    fn udp_flow_ends_after_idle_timeout() {
        let mut s = Sessions::new("b");
        let key = UdpFlowKey {
            remote_port: 5000,
            local_port: 9000,
            family: AF_INET,
            ..UdpFlowKey::default()
        };
        let flow = UdpFlow {
            counts: counts(1200, 300),
            first_ns: 10,
            last_ns: 1_000,
            ..UdpFlow::default()
        };
        assert_eq!(
            s.apply_udp_read(&[(key, flow)], 1_500, 1_000),
            [] as [UdpFlowKey; 0]
        );
        assert_eq!(s.apply_udp_read(&[(key, flow)], 2_000, 1_000), vec![key]);
        let settled = s.end_udp(&key, &flow);
        assert_eq!(settled.id, "b-u10-5000");
        assert_eq!(settled.session.counts, counts(1200, 300));
        assert_eq!(settled.session.protocol, Protocol::Udp);
        assert_eq!(s.live_count(), 0);
    }
}
