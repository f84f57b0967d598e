//! Types shared by meterd's eBPF programs and its agent, and the pure rules
//! both sides need to agree on.
//!
//! Owns: map names, map key/value layouts (`#[repr(C)]`, fixed-width, explicit
//! padding, no `bool`), and the TCP arithmetic that turns the kernel's
//! sequence-space counters into payload bytes. Does not own: how maps are read
//! (the agent's `kernel` module) or how bytes become money (`billing`).
//!
//! The crate is `no_std`; the `user` feature adds the `aya::Pod` impls the
//! agent needs, so the kernel side never links aya.
#![no_std]

pub mod tcp;

/// Names of the maps in the eBPF object, shared so a rename cannot drift.
pub mod map_names {
    /// `Array<u32>`, 65536 slots indexed by local TCP port: `service + 1`, 0 = not metered.
    pub const TCP_PORTS: &str = "TCP_PORTS";
    /// `Array<u32>`, 65536 slots indexed by local UDP port: `service + 1`, 0 = not metered.
    pub const UDP_PORTS: &str = "UDP_PORTS";
    /// `Array<LiveSlot>`, `agent.max_connections` slots, `BPF_F_MMAPABLE`:
    /// live TCP counts, each slot with the cookie of the connection that
    /// holds it. The agent maps it and reads it from memory every cycle.
    pub const LIVE: &str = "LIVE";
    /// `Queue<u32>`, `agent.max_connections` entries: the free slots of
    /// `LIVE`. Filled by the agent when the maps are created; sock_ops pops
    /// one at establishment, and the agent pushes it back once the
    /// connection's close is committed.
    pub const FREE_SLOTS: &str = "FREE_SLOTS";
    /// `HashMap<u64 cookie, ConnInfo>`: who a live TCP connection is (and
    /// its `LIVE` slot), read once per connection.
    pub const INFO: &str = "INFO";
    /// `HashMap<UdpFlowKey, UdpFlow>`: live UDP flows, each one the server
    /// has sent to (see `UDP_PROBATION`).
    pub const UDP_FLOWS: &str = "UDP_FLOWS";
    /// `LruHashMap<UdpFlowKey, UdpFlow>`: flows seen only from the client
    /// so far, with their ingress bytes and first datagram. The kernel
    /// moves a flow into `UDP_FLOWS` at the server's first datagram to it;
    /// flows the server never answers (spoofed sources) evict each other
    /// here and never take room from a real flow. The agent does not read it.
    pub const UDP_PROBATION: &str = "UDP_PROBATION";
    /// `PerCpuArray<u64>` of [`crate::UdpStat`] counters,
    /// [`crate::UDP_STAT_SLOTS`] slots.
    pub const UDP_STATS: &str = "UDP_STATS";
    /// `RingBuf` of [`crate::Closed`] records.
    pub const CLOSED: &str = "CLOSED";
    /// `PerCpuArray<u64>` of [`crate::Stat`] counters.
    pub const STATS: &str = "STATS";
    /// `Array<u64>`, [`crate::SERVICE_SLOTS`] slots indexed by service:
    /// the service's `session_idle` in ns (0: no gap detection).
    pub const SERVICE_IDLE: &str = "SERVICE_IDLE";
    /// `HashMap<u64 cookie, u32>`, [`crate::CUT_SLOTS`] entries: TCP
    /// connections cut off (value [`crate::CUT_MARK`]). Written by the
    /// agent; the egress slow path and sock_ops state changes copy the mark
    /// into the socket's storage, whose flag the egress fast path tests.
    /// sock_ops deletes a connection's entry when it closes.
    pub const CUT: &str = "CUT";
    /// `HashMap<UdpFlowKey, u32>`, [`crate::CUT_SLOTS`] entries: UDP flows
    /// cut off (value [`crate::CUT_MARK`]). Written and deleted by the
    /// agent only (a UDP flow has no close).
    pub const CUT_FLOWS: &str = "CUT_FLOWS";
    /// `PerCpuArray<u64>` of [`crate::CutStat`] counters,
    /// [`crate::CUT_STAT_SLOTS`] slots.
    pub const CUT_STATS: &str = "CUT_STATS";
}

/// Number of slots of the `SERVICE_IDLE` map: the most services a config
/// may have.
pub const SERVICE_SLOTS: u32 = 1024;

/// Number of slots of the port maps: one per possible port.
pub const PORT_SLOTS: u32 = 65536;

/// Entries of each of the `CUT` and `CUT_FLOWS` maps: connections and flows
/// of accounts that ran out, cut off and not yet closed (TCP) or removed by
/// the agent (UDP).
pub const CUT_SLOTS: u32 = 65536;

/// The value the agent writes into `CUT` and `CUT_FLOWS`: the kernel tests
/// only that an entry exists.
pub const CUT_MARK: u32 = 1;

/// Set in a UDP flow's [`UdpFlow::pad`] by the kernel when the flow is in
/// `CUT_FLOWS`: its datagrams are dropped, both ways, and not counted.
pub const FLOW_CUT: u32 = 1 << 31;

/// A UDP flow's [`UdpFlow::pad`] below [`FLOW_CUT`] is the kernel's
/// `bpf_ktime_get_boot_ns() >> FLOW_CUT_CHECK_SHIFT` (units of ~134 ms,
/// truncated to 31 bits) at the flow's last `CUT_FLOWS` lookup: a datagram
/// in a later unit looks the flow up again. So a flow is cut within ~134 ms
/// of its entry, and no datagram pays a second map lookup otherwise.
pub const FLOW_CUT_CHECK_SHIFT: u32 = 27;

/// `BPF_SOCK_OPS_STATE_CB_FLAG` (`include/uapi/linux/bpf.h`): the socket's
/// TCP state changes call the sock_ops programs, which is how meterd sees a
/// connection close.
pub const SOCK_OPS_STATE_CB_FLAG: u32 = 1 << 2;

/// The callback flags sock_ops sets on a metered socket: the ones the
/// socket has (`bpf_sock_ops_cb_flags`, set by another program on the
/// socket, e.g. an RTT or header-option program of the host's) plus the
/// state callback. `bpf_sock_ops_cb_flags_set` replaces the whole set, so
/// setting the state flag alone would silence the other program's
/// callbacks (issue #12, item 9).
#[must_use]
pub const fn sock_ops_cb_flags(current: u32) -> u32 {
    current | SOCK_OPS_STATE_CB_FLAG
}

/// Payload bytes of one connection or flow, and when they last moved. Live
/// values never exceed the truth; the values in a [`Closed`] record are
/// exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bytes delivered to the client (acknowledged by it, for TCP).
    pub bytes_out: u64,
    /// Bytes received from the client.
    pub bytes_in: u64,
    /// `bpf_ktime_get_boot_ns()` when the counts last rose; 0 before the
    /// first payload. For TCP it is within the live refresh period
    /// (100 ms at HZ=250) of the truth: a rise first seen after a quiet
    /// period is dated to the start of that period (the tail of the
    /// activity before it), never to when it was noticed.
    pub last_ns: u64,
}

/// One slot of the `LIVE` array: the connection that holds it and its
/// counts. `cookie` is 0 while the slot is free. sock_ops zeroes the counts
/// of a slot it takes before it publishes the cookie (an atomic exchange, a
/// full barrier), and the agent clears the cookie before it returns the
/// slot, so a reader that reads the cookie, the counts, and the cookie
/// again, and finds the same non-zero cookie twice, has counts of that
/// connection only (see the agent's `kernel::slots`). Counts only rise, so
/// a torn read is low, never high.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveSlot {
    /// Socket cookie of the connection holding the slot, 0: free.
    pub cookie: u64,
    /// Its live counts (see [`Counts`]).
    pub counts: Counts,
}

/// [`ConnInfo::slot`] of a connection without a `LIVE` slot (untracked,
/// or not TCP).
pub const NO_SLOT: u32 = u32::MAX;

/// IPv4 family (`AF_INET`), as the kernel reports it.
pub const AF_INET: u16 = 2;
/// IPv6 family (`AF_INET6`), as the kernel reports it.
pub const AF_INET6: u16 = 10;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u16 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u16 = 17;

/// Who a connection is: written once when the kernel sees it established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// `bpf_ktime_get_boot_ns()` at establishment (CLOCK_BOOTTIME), 0 if unknown.
    pub start_ns: u64,
    /// `bpf_ktime_get_boot_ns()` at close, 0 while open. Set only when the
    /// close record could not go through the ring buffer ([`CONN_CLOSED`]).
    pub end_ns: u64,
    /// Server address, network byte order; IPv4 in word 0, rest zero.
    pub local_addr: [u32; 4],
    /// Client address, same encoding.
    pub remote_addr: [u32; 4],
    /// Server port, host byte order.
    pub local_port: u16,
    /// Client port, host byte order.
    pub remote_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u16,
    /// Index of the service in the agent's config.
    pub service: u32,
    /// `CONN_*` bits.
    pub flags: u32,
    /// The connection's slot in `LIVE`, [`NO_SLOT`] if it has none. A
    /// close record carries it, so the agent can return the slot once the
    /// close is committed.
    pub slot: u32,
    /// Explicit padding, always zero.
    pub pad: u32,
}

/// The connection has closed but its record could not be queued (ring buffer
/// full): the final counts stay in its `LIVE` slot and its `INFO` entry, for
/// the agent to collect, then delete and return the slot.
pub const CONN_CLOSED: u32 = 1 << 0;
/// There was no room in `INFO` or no free `LIVE` slot when the connection opened; the close
/// record carries the exact counts but no start time.
pub const CONN_UNTRACKED: u32 = 1 << 1;
/// A FIN from the client was taken out of `bytes_in`.
pub const CONN_FIN_IN: u32 = 1 << 2;
/// An acknowledged FIN of the server was taken out of `bytes_out`.
pub const CONN_FIN_OUT: u32 = 1 << 3;
/// A gap record, not a close: the connection (or UDP flow) moved payload
/// again after at least its service's `session_idle` of silence. `counts`
/// are its totals at the start of the gap (`counts.last_ns` is the last
/// payload before it), and `info.end_ns` is when payload moved again. The
/// connection stays open; its counts go on from these.
pub const CONN_GAP: u32 = 1 << 4;

/// Final record of a closed TCP connection, or a gap record
/// ([`CONN_GAP`], TCP or UDP), from the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closed {
    /// Socket cookie: unique per boot, shared by sock_ops and cgroup_skb.
    /// 0 for a UDP gap record.
    pub cookie: u64,
    /// Exact payload totals (at the gap's start, for a gap record).
    pub counts: Counts,
    /// Who it was; `end_ns` is the close time (for a gap record, when
    /// payload resumed). For a UDP gap record `start_ns` is the flow's
    /// `first_ns`, which with the 4-tuple names the flow.
    pub info: ConnInfo,
}

/// Key of a UDP flow: the 4-tuple as seen from the server.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    /// Server address, network byte order; IPv4 in word 0.
    pub local_addr: [u32; 4],
    /// Client address, same encoding.
    pub remote_addr: [u32; 4],
    /// Server port, host byte order.
    pub local_port: u16,
    /// Client port, host byte order.
    pub remote_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Explicit padding, always zero (the key is hashed bytewise).
    pub pad: u16,
}

/// Counts of a UDP flow. The kernel marks gaps of its service's
/// `session_idle` with a [`CONN_GAP`] record; the agent removes flows that
/// stayed idle (garbage collection, not billing: their counts are exact).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlow {
    /// Payload bytes (UDP datagram minus its 8-byte header) per direction;
    /// `counts.last_ns` is the boot-time ns of the latest datagram.
    pub counts: Counts,
    /// Boot-time ns of the first datagram: with the key, the flow's identity.
    pub first_ns: u64,
    /// Index of the service in the agent's config.
    pub service: u32,
    /// Written by the kernel only: [`FLOW_CUT`] and the time of the flow's
    /// last `CUT_FLOWS` lookup ([`FLOW_CUT_CHECK_SHIFT`]). The agent never
    /// writes a flow's value (a whole-value write would race with the
    /// kernel's atomic adds and lose bytes); it cuts a flow through
    /// `CUT_FLOWS`.
    pub pad: u32,
}

/// Slots of the `STATS` per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A connection could not be added to `INFO` or had no free `LIVE`
    /// slot (`FREE_SLOTS` empty): untracked, billed at its close.
    LiveFull = 0,
    /// A close record did not fit the ring buffer; it was left in its `LIVE` slot.
    RingFull = 1,
    /// A close record did not fit and there was no `LIVE` slot to leave it in: lost.
    Lost = 2,
    /// A UDP flow could not be added (map full): its datagrams were not counted.
    UdpFull = 3,
    /// Connections registered.
    Opened = 4,
    /// Close records queued.
    Closed = 5,
    /// Gap records queued.
    Gaps = 6,
    /// A gap record did not fit the ring buffer. TCP tries again at the
    /// connection's next packet; a UDP flow's gap is lost (its session
    /// then spans the gap).
    GapRingFull = 7,
}

/// Number of `STATS` slots.
pub const STAT_SLOTS: u32 = 8;

/// Slots of the `CUT_STATS` per-CPU counter array: what the cut-off did in
/// the kernel. Kept apart from [`Stat`], whose pinned array's size an
/// upgrade must not change.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutStat {
    /// Egress TCP packets of cut connections dropped.
    TcpDropped = 0,
    /// UDP datagrams of cut flows dropped (both directions).
    UdpDropped = 1,
    /// RST segments of cut connections let out (the one SOCK_DESTROY
    /// sends, or the server's own abort), so the client sees the end.
    ResetPassed = 2,
}

/// Number of `CUT_STATS` slots (room for more kinds without resizing the
/// pinned map).
pub const CUT_STAT_SLOTS: u32 = 8;

/// Slots of the `UDP_STATS` per-CPU counter array: what UDP probation did.
/// Kept apart from [`Stat`], whose pinned array's size an upgrade must not
/// change. A full `UDP_FLOWS` is [`Stat::UdpFull`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpStat {
    /// Flows put on probation (a client's first datagram): spoofed sources
    /// count here too.
    ProbationNew = 0,
    /// Flows moved from probation into `UDP_FLOWS` at the server's first
    /// datagram to them, with their ingress bytes.
    Promoted = 1,
    /// Flows the server sent to with no probation entry: it spoke first, or
    /// the entry was evicted (or went stale) before the server answered, so
    /// the client's bytes before the answer are not counted. An upper bound
    /// of the flows that lost bytes to probation.
    PromotedUnseen = 2,
    /// A probation entry could not be created (not even by eviction): that
    /// datagram's bytes are not counted.
    ProbationFailed = 3,
}

/// Number of `UDP_STATS` slots (room for more kinds without resizing the
/// pinned map).
pub const UDP_STAT_SLOTS: u32 = 8;

const _: () = {
    // The value sizes the agent's batch reader and the ring buffer rely on.
    assert!(size_of::<Counts>() == 24);
    assert!(size_of::<LiveSlot>() == 32);
    assert!(size_of::<ConnInfo>() == 72);
    assert!(size_of::<Closed>() == 104);
    assert!(size_of::<UdpFlowKey>() == 40);
    assert!(size_of::<UdpFlow>() == 40);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are `#[repr(C)]`, made only of integers, with explicit
    // padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Counts {}
    unsafe impl aya::Pod for super::LiveSlot {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::Closed {}
    unsafe impl aya::Pod for super::UdpFlowKey {}
    unsafe impl aya::Pod for super::UdpFlow {}
}

#[cfg(test)]
mod tests {
    use super::{SOCK_OPS_STATE_CB_FLAG, sock_ops_cb_flags};

    /// The callback flags of `include/uapi/linux/bpf.h` (Linux 6.18).
    const CB_FLAGS: [(u32, &str); 7] = [
        (1 << 0, "RTO_CB"),
        (1 << 1, "RETRANS_CB"),
        (1 << 2, "STATE_CB"),
        (1 << 3, "RTT_CB"),
        (1 << 4, "PARSE_ALL_HDR_OPT_CB"),
        (1 << 5, "PARSE_UNKNOWN_HDR_OPT_CB"),
        (1 << 6, "WRITE_HDR_OPT_CB"),
    ];

    #[test]
    fn sock_ops_keeps_every_flag_another_program_set() {
        assert_eq!(SOCK_OPS_STATE_CB_FLAG, CB_FLAGS[2].0);
        // Every combination another program can have set before meterd's
        // program runs on the socket.
        for current in 0..1u32 << CB_FLAGS.len() {
            let set = sock_ops_cb_flags(current);
            for (flag, name) in CB_FLAGS {
                let want = current & flag != 0 || flag == SOCK_OPS_STATE_CB_FLAG;
                assert_eq!(
                    set & flag != 0,
                    want,
                    "{name} with {current:#09b} set before: meterd set {set:#09b}"
                );
            }
            assert_eq!(
                set & !0x7f,
                0,
                "meterd set a flag nobody asked for: {set:#x}"
            );
        }
    }
}
