//! The agent's view of every metered session, built from kernel reads.
//!
//! Owns: which sessions are live, their latest counts, and the rule that each
//! session is settled exactly once. Input: full reads of the live maps and
//! close records. Output: [`Settled`] sessions, and the live table the
//! billing cycle charges from. It does no I/O itself, so it is tested without
//! a kernel.
//!
//! Exactly once: a TCP session is identified by its socket cookie, which the
//! kernel never reuses within a boot. A cookie once settled is remembered, so
//! a close record seen twice (an upgrade overlap, a re-delivered record after
//! a crash) or a stale live read cannot bring the session back.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use meterd_common::{AF_INET6, CONN_CLOSED, Closed, ConnInfo, Counts, UdpFlow, UdpFlowKey};

/// Transport of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Identity of a session in the kernel's maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionKey {
    /// TCP: the socket cookie.
    Tcp(u64),
    /// UDP: the flow's 4-tuple.
    Udp(UdpFlowKey),
}

/// A live or settled session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Stable id, unique across boots: `<boot id>-<cookie>` for TCP,
    /// `<boot id>-u<first_ns>-<client port>` for UDP.
    pub id: String,
    /// Socket cookie (TCP) or 0 (UDP).
    pub cookie: u64,
    pub protocol: Protocol,
    /// Index into `config.services`.
    pub service: u32,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Boot-time ns of establishment (0: unknown, `CONN_UNTRACKED`).
    pub start_ns: u64,
    /// Latest counts (exact once settled).
    pub counts: Counts,
    /// Attributed by the streaming server; `None`: billed to the client address.
    pub attribution: Option<crate::attribution::Attribution>,
}

impl Session {
    /// The account billed: the attributed one, or the client address.
    pub fn account(&self) -> String {
        self.attribution
            .as_ref()
            .map_or_else(|| self.client.ip().to_string(), |a| a.account.clone())
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
    live: HashMap<SessionKey, Session>,
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
            live: HashMap::new(),
            settled: HashMap::new(),
            generation: 0,
        }
    }

    /// Live sessions.
    pub fn live(&self) -> impl Iterator<Item = &Session> {
        self.live.values()
    }

    /// Live sessions, for attribution.
    pub fn live_mut(&mut self) -> impl Iterator<Item = &mut Session> {
        self.live.values_mut()
    }

    /// Attributes the live session `conn` names; false if there is none.
    pub fn attribute(
        &mut self,
        conn: crate::attribution::ConnectionRef,
        attribution: &crate::attribution::Attribution,
    ) -> bool {
        if let crate::attribution::ConnectionRef::Cookie(c) = conn
            && let Some(s) = self.live.get_mut(&SessionKey::Tcp(c))
        {
            s.attribution = Some(attribution.clone());
            return true;
        }
        match self.live.values_mut().find(|s| conn.matches(s)) {
            Some(s) => {
                s.attribution = Some(attribution.clone());
                true
            }
            None => false,
        }
    }

    /// Number of live sessions.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Marks ids settled in an earlier run of the agent (e.g. read back from
    /// the ledger), so re-delivered close records are not settled again.
    pub fn remember_settled(&mut self, cookies: impl IntoIterator<Item = u64>) {
        for c in cookies {
            self.settled.insert(c, self.generation);
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
            let key = SessionKey::Tcp(cookie);
            if let Some(s) = self.live.get_mut(&key) {
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
                let mut session = self
                    .live
                    .remove(&key)
                    .unwrap_or_else(|| self.tcp_session(cookie, &conn));
                session.counts = counts;
                self.settled.insert(cookie, self.generation);
                settled.push(Settled {
                    session,
                    end_ns: conn.end_ns,
                    flags: conn.flags,
                });
                continue;
            }
            let boot_id = &self.boot_id;
            self.live.entry(key).or_insert_with(|| {
                let mut s = Self::tcp_session_with(boot_id, cookie, &conn);
                s.counts = counts;
                s
            });
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
        let session = if let Some(mut s) = self.live.remove(&SessionKey::Tcp(closed.cookie)) {
            s.counts = closed.counts;
            if s.start_ns == 0 {
                s.start_ns = closed.info.start_ns;
            }
            s
        } else {
            let mut s = self.tcp_session(closed.cookie, &closed.info);
            s.counts = closed.counts;
            s
        };
        Some(Settled {
            session,
            end_ns: closed.info.end_ns,
            flags: closed.info.flags,
        })
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
            match self.live.entry(SessionKey::Udp(*key)) {
                Entry::Occupied(mut e) => raise(&mut e.get_mut().counts, flow.counts),
                Entry::Vacant(e) => {
                    e.insert(udp_session(&self.boot_id, key, flow));
                }
            }
            if now_ns.saturating_sub(flow.last_ns) >= idle_ns {
                idle.push(*key);
            }
        }
        idle
    }

    /// Settles a UDP flow with the final value taken out of the kernel map.
    pub fn end_udp(&mut self, key: &UdpFlowKey, last: &UdpFlow) -> Settled {
        let mut session = self
            .live
            .remove(&SessionKey::Udp(*key))
            .filter(|s| s.start_ns == last.first_ns)
            .unwrap_or_else(|| udp_session(&self.boot_id, key, last));
        session.counts = last.counts;
        Settled {
            session,
            end_ns: last.last_ns,
            flags: 0,
        }
    }

    fn tcp_session(&self, cookie: u64, info: &ConnInfo) -> Session {
        Self::tcp_session_with(&self.boot_id, cookie, info)
    }

    fn tcp_session_with(boot_id: &str, cookie: u64, info: &ConnInfo) -> Session {
        Session {
            id: format!("{boot_id}-{cookie}"),
            cookie,
            protocol: Protocol::Tcp,
            service: info.service,
            client: addr(info.family, info.remote_addr, info.remote_port),
            server: addr(info.family, info.local_addr, info.local_port),
            start_ns: info.start_ns,
            counts: Counts::default(),
            attribution: None,
        }
    }
}

fn udp_session(boot_id: &str, key: &UdpFlowKey, flow: &UdpFlow) -> Session {
    Session {
        id: format!("{boot_id}-u{}-{}", flow.first_ns, key.remote_port),
        cookie: 0,
        protocol: Protocol::Udp,
        service: flow.service,
        client: addr(key.family, key.remote_addr, key.remote_port),
        server: addr(key.family, key.local_addr, key.local_port),
        start_ns: flow.first_ns,
        counts: flow.counts,
        attribution: None,
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
        assert_eq!(settled.session.id, "b00t-7");
        assert_eq!(settled.session.client.to_string(), "127.0.0.2:4000");
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
        assert_eq!(settled.session.counts, counts(1200, 300));
        assert_eq!(settled.session.protocol, Protocol::Udp);
        assert_eq!(s.live_count(), 0);
    }
}
