//! Connections as the billing core sees them: one TCP connection or UDP
//! flow, its latest kernel counts, and the *segment* of its bytes that
//! currently feeds a viewing session.
//!
//! A connection's bytes are cut into segments where the kernel saw a gap of
//! the service's `session_idle` (a `CONN_GAP` record) and where the
//! streaming server attributed it to another account mid-way. Each segment
//! belongs to exactly one viewing session; the first bytes of a segment
//! decide which one. Owns identities and ids; does not own money.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use meterd_common::{AF_INET6, ConnInfo, Counts, IPPROTO_UDP, UdpFlowKey};

use super::ServiceDef;
use crate::attribution::Attribution;

/// Transport of a connection.
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

/// A connection's identity within a boot: the socket cookie (never reused
/// within a boot), or a UDP flow's 4-tuple with the time of its first
/// datagram (a flow removed after idling and started again is another one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnKey {
    Tcp(u64),
    Udp { key: UdpFlowKey, first_ns: u64 },
}

/// Who is at both ends, in the kernel's layout (network-order words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub client_addr: [u32; 4],
    pub server_addr: [u32; 4],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u16,
    pub protocol: Protocol,
}

impl Peer {
    /// From a kernel `ConnInfo` (TCP records and UDP gap records alike).
    pub fn of(info: &ConnInfo) -> Self {
        Self {
            client_addr: info.remote_addr,
            server_addr: info.local_addr,
            client_port: info.remote_port,
            server_port: info.local_port,
            family: info.family,
            protocol: if info.protocol == IPPROTO_UDP {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
        }
    }

    /// From a UDP flow key.
    pub fn of_flow(key: &UdpFlowKey) -> Self {
        Self {
            client_addr: key.remote_addr,
            server_addr: key.local_addr,
            client_port: key.remote_port,
            server_port: key.local_port,
            family: key.family,
            protocol: Protocol::Udp,
        }
    }

    /// The client's address and port (IPv4-mapped IPv6 as IPv4).
    pub fn client(&self) -> SocketAddr {
        addr(self.family, self.client_addr, self.client_port)
    }

    /// The server's address and port.
    pub fn server(&self) -> SocketAddr {
        addr(self.family, self.server_addr, self.server_port)
    }

    /// The UDP flow key this peer is, for UDP connections.
    pub fn flow_key(&self) -> UdpFlowKey {
        UdpFlowKey {
            local_addr: self.server_addr,
            remote_addr: self.client_addr,
            local_port: self.server_port,
            remote_port: self.client_port,
            family: self.family,
            pad: 0,
        }
    }
}

/// The part of a connection's bytes that feeds one viewing session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// 0 for the connection's first segment, then 1, 2, ...
    pub n: u32,
    /// The connection's counts where this segment starts.
    pub base: Counts,
    /// Boot ns of the segment's start: establishment (or first datagram),
    /// the end of a gap, or the attribution.
    pub start_ns: u64,
    /// The viewing session it feeds, once it has moved a payload byte.
    pub viewer: Option<super::SessionRef>,
    /// What the ledger lacks of it, and the kernel time its row was last
    /// written while it fed no session (see [`super::save`]).
    pub save: super::Save,
    pub saved_ns: u64,
}

impl Segment {
    /// Payload bytes of this segment at `counts`.
    pub fn bytes(&self, counts: &Counts) -> (u64, u64) {
        (
            counts.bytes_out.saturating_sub(self.base.bytes_out),
            counts.bytes_in.saturating_sub(self.base.bytes_in),
        )
    }

    /// Whether this segment has moved a payload byte at `counts`.
    pub fn has_payload(&self, counts: &Counts) -> bool {
        let (o, i) = self.bytes(counts);
        o > 0 || i > 0
    }
}

/// A live connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub key: ConnKey,
    /// Its service, as configured when the connection was first seen.
    pub service: Arc<ServiceDef>,
    pub peer: Peer,
    /// Boot ns of establishment (TCP) or first datagram (UDP); 0 unknown.
    pub start_ns: u64,
    /// Latest cumulative counts (they only rise).
    pub counts: Counts,
    /// `CONN_*` flags seen so far.
    pub flags: u32,
    /// What the streaming server said it is; `None`: billed to the client address.
    pub attribution: Option<Arc<Attribution>>,
    /// The segment its bytes go to now.
    pub seg: Segment,
}

impl Conn {
    /// A connection first seen now.
    pub fn new(key: ConnKey, service: Arc<ServiceDef>, peer: Peer, start_ns: u64) -> Self {
        Self {
            key,
            service,
            peer,
            start_ns,
            counts: Counts::default(),
            flags: 0,
            attribution: None,
            seg: Segment {
                n: 0,
                base: Counts::default(),
                start_ns,
                viewer: None,
                save: super::Save::Now,
                saved_ns: 0,
            },
        }
    }

    /// Whether the server ever sent on it. A UDP flow only the client sent
    /// on (e.g. from a spoofed source address) is nobody's viewing.
    pub fn answered(&self) -> bool {
        self.peer.protocol == Protocol::Tcp || self.counts.bytes_out > 0
    }

    /// Raises the counts to a (possibly older) read: counts never go down.
    pub fn raise(&mut self, read: &Counts) -> bool {
        let before = self.counts;
        self.counts.bytes_out = self.counts.bytes_out.max(read.bytes_out);
        self.counts.bytes_in = self.counts.bytes_in.max(read.bytes_in);
        self.counts.last_ns = self.counts.last_ns.max(read.last_ns);
        before != self.counts
    }

    /// The connection's id, unique across boots: `<boot>-<cookie>` for TCP,
    /// `<boot>-u<first_ns>-<client port>` for UDP.
    pub fn id(&self, boot: &str) -> String {
        conn_id(boot, &self.key, self.peer.client_port)
    }

    /// The current segment's id: the connection's id, then `/<n>` after the
    /// first segment.
    pub fn segment_id(&self, boot: &str) -> String {
        segment_id(&self.id(boot), self.seg.n)
    }
}

/// See [`Conn::id`].
pub fn conn_id(boot: &str, key: &ConnKey, client_port: u16) -> String {
    match key {
        ConnKey::Tcp(cookie) => format!("{boot}-{cookie}"),
        ConnKey::Udp { first_ns, .. } => format!("{boot}-u{first_ns}-{client_port}"),
    }
}

/// See [`Conn::segment_id`].
pub fn segment_id(conn_id: &str, n: u32) -> String {
    if n == 0 {
        conn_id.to_owned()
    } else {
        format!("{conn_id}/{n}")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn segment_ids() {
        assert_eq!(segment_id("b-7", 0), "b-7");
        assert_eq!(segment_id("b-7", 2), "b-7/2");
    }
}
