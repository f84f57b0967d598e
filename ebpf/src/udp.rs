//! UDP flow counting, shared by the two cgroup_skb hooks (not a hook itself).
//!
//! A UDP server socket is usually unconnected, so the flow is the 4-tuple of
//! the datagram, not the socket. The billed quantity is UDP payload: the
//! datagram minus IP and UDP headers (for a GSO/GRO skb that is still one
//! header set over the whole payload).
//!
//! A flow's counts are cumulative for as long as it exists, and
//! `counts.last_ns` is its latest datagram. A datagram after at least the
//! service's `session_idle` of silence ends a gap: exactly one CPU claims
//! the boundary (a compare-exchange of `last_ns`) and queues a gap record
//! with the counts before the datagram. Counts are never reset: the agent
//! splits the flow at the record's counts.
//!
//! # Probation
//!
//! A source address is only what the datagram says, so a flow the client
//! opens does not get a `UDP_FLOWS` entry: its datagrams are counted in
//! `UDP_PROBATION`, an LRU map, until the server first sends to the
//! 4-tuple. That datagram creates the flow with the probation entry's
//! ingress bytes and first datagram (if the client spoke within a
//! `session_idle`; before that it was never answered) and deletes the
//! entry. Spoofed sources the server never answers stay on probation and
//! evict each other, never a real flow, and are never billed (the agent
//! bills no flow without egress anyway). A real client whose probation
//! entry was evicted before the answer loses only its bytes before the
//! answer ([`UdpStat::PromotedUnseen`]). A flow the server opens goes
//! straight into `UDP_FLOWS`.
//!
//! # Cut-off
//!
//! The agent cuts a flow by putting its key in `CUT_FLOWS`; it never
//! writes the flow's value, whose counts the kernel adds to atomically
//! (a whole-value write from userspace would lose the bytes added
//! meanwhile). The kernel keeps the cut state in the flow's own `pad`,
//! which only it writes: [`FLOW_CUT`] and the 134 ms period
//! ([`FLOW_CUT_CHECK_SHIFT`]) of its last `CUT_FLOWS` lookup. A datagram
//! compares that period with the clock it reads anyway, and looks the flow
//! up again only in a new period: at most ~8 lookups per second per flow,
//! none per datagram, and a flow is cut within ~134 ms of its entry. A new
//! flow is looked up before it is created, on probation or in `UDP_FLOWS`
//! (a blocked 4-tuple creates no flow). A cut flow's datagrams are dropped
//! both ways and not counted, and they neither date the flow nor end a
//! gap: it goes idle, and the agent collects it as usual.
//!
//! Minimum kernel version: 5.12 (`BPF_CMPXCHG`); ring buffers and
//! `bpf_ktime_get_boot_ns`: 5.8.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock},
    helpers::bpf_ktime_get_boot_ns,
    programs::SkBuffContext,
};
use meterd_common::{
    AF_INET, AF_INET6, ConnInfo, Counts, CutStat, FLOW_CUT, FLOW_CUT_CHECK_SHIFT, IPPROTO_UDP,
    NO_SLOT, Stat, UdpFlow, UdpFlowKey, UdpStat,
};

use crate::{
    DROP, PASS,
    activity::queue_gap,
    maps::{
        CUT_FLOWS, UDP_FLOWS, UDP_PORTS, UDP_PROBATION, bump, bump_cut, bump_udp, service_of,
        session_idle,
    },
};

const UDP_HEADER: u32 = 8;
const IPV6_HEADER: u32 = 40;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Out,
    In,
}

/// Family, addresses and header length of the packet's IP header, or
/// `None` if it is not a plain UDP datagram (e.g. IPv6 extension headers:
/// not counted). The family comes from the packet, not the socket: a
/// dual-stack IPv6 socket sends and receives IPv4 packets.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<(u16, [u32; 4], [u32; 4], u32)> {
    let vihl: u8 = ctx.load(0).ok()?;
    let version = vihl >> 4;
    if version == 4 {
        let proto: u8 = ctx.load(9).ok()?;
        if proto as u16 != IPPROTO_UDP {
            return None;
        }
        let src: u32 = ctx.load(12).ok()?;
        let dst: u32 = ctx.load(16).ok()?;
        Some((
            AF_INET,
            [src, 0, 0, 0],
            [dst, 0, 0, 0],
            u32::from(vihl & 0x0f) * 4,
        ))
    } else if version == 6 {
        let next: u8 = ctx.load(6).ok()?;
        if next as u16 != IPPROTO_UDP {
            return None;
        }
        let src: [u32; 4] = ctx.load(8).ok()?;
        let dst: [u32; 4] = ctx.load(24).ok()?;
        Some((AF_INET6, src, dst, IPV6_HEADER))
    } else {
        None
    }
}

/// The check period of `now` as kept in [`UdpFlow::pad`] (see the module
/// docs): never has [`FLOW_CUT`] set.
#[inline(always)]
fn check_period(now: u64) -> u32 {
    (now >> FLOW_CUT_CHECK_SHIFT) as u32 & !FLOW_CUT
}

/// Adds the datagram in `ctx` to its flow, if its local port is metered,
/// and returns the verdict: [`DROP`] for a datagram of a cut flow (not
/// counted), [`PASS`] for every other.
#[inline(always)]
pub fn count_udp(ctx: &SkBuffContext, sk: *mut bpf_sock, dir: Direction) -> i32 {
    // SAFETY: non-NULL socket pointer from the context (checked by callers).
    let local_port = unsafe { (*sk).src_port };
    let service = service_of(&UDP_PORTS, local_port);
    if service == 0 {
        return PASS;
    }
    let Some((family, src, dst, ip_len)) = parse(ctx) else {
        return PASS;
    };
    let ports_at = ip_len as usize;
    let Ok(sport) = ctx.load::<u16>(ports_at) else {
        return PASS;
    };
    let Ok(dport) = ctx.load::<u16>(ports_at + 2) else {
        return PASS;
    };
    let (local_addr, remote_addr, remote_port) = match dir {
        Direction::Out => (src, dst, u16::from_be(dport)),
        Direction::In => (dst, src, u16::from_be(sport)),
    };
    let key = UdpFlowKey {
        local_addr,
        remote_addr,
        local_port: local_port as u16,
        remote_port,
        family,
        pad: 0,
    };
    let payload = u64::from(ctx.len().saturating_sub(ip_len + UDP_HEADER));
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let flow = match UDP_FLOWS.get_ptr_mut(&key) {
        Some(flow) => flow,
        None if dir == Direction::In => return probation(&key, service - 1, payload, now),
        None => match promote(&key, service - 1, payload, now) {
            Promotion::Done(verdict) => return verdict,
            Promotion::Raced(flow) => flow,
        },
    };
    if is_cut(&key, flow, now) {
        bump_cut(CutStat::UdpDropped);
        return DROP;
    }
    add(&key, flow, dir, payload, now);
    PASS
}

/// A client's datagram of a flow the server has not sent to yet: counted
/// in `UDP_PROBATION` (created there unless its 4-tuple is cut).
#[inline(always)]
fn probation(key: &UdpFlowKey, service: u32, payload: u64, now: u64) -> i32 {
    if let Some(entry) = UDP_PROBATION.get_ptr_mut(key) {
        add_probation(entry, payload, now);
        return PASS;
    }
    if CUT_FLOWS.get_ptr(key).is_some() {
        bump_cut(CutStat::UdpDropped);
        return DROP;
    }
    let entry = UdpFlow {
        counts: Counts {
            bytes_out: 0,
            bytes_in: payload,
            last_ns: now,
        },
        first_ns: now,
        service,
        pad: 0,
    };
    // An LRU map makes room by evicting its least recently used entries:
    // on probation, an insert fails only if every CPU's share is busy.
    if UDP_PROBATION
        .insert(key, &entry, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        bump_udp(UdpStat::ProbationNew);
    } else if let Some(entry) = UDP_PROBATION.get_ptr_mut(key) {
        // Another CPU created it meanwhile.
        add_probation(entry, payload, now);
    } else {
        bump_udp(UdpStat::ProbationFailed);
    }
    PASS
}

/// Adds a client's datagram to its probation entry. After a
/// `session_idle` of silence the entry starts over: what the client sent
/// before was never answered, and would bill nobody.
#[inline(always)]
fn add_probation(entry: *mut UdpFlow, payload: u64, now: u64) {
    // SAFETY: valid map value pointer. Racing CPUs can lose one another's
    // bytes at a restart only, and only bytes that were never answered.
    unsafe {
        let last_ns = &raw mut (*entry).counts.last_ns;
        let idle = session_idle((*entry).service);
        if idle != 0 && now >= read_volatile(last_ns).saturating_add(idle) {
            write_volatile(&raw mut (*entry).first_ns, now);
            write_volatile(&raw mut (*entry).counts.bytes_in, 0);
        }
        write_volatile(last_ns, now);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*entry).counts.bytes_in,
            payload,
        );
    }
}

/// What [`promote`] did.
enum Promotion {
    /// The datagram is dealt with: this verdict.
    Done(i32),
    /// Another CPU created the flow meanwhile: add the datagram to it.
    Raced(*mut UdpFlow),
}

/// The server's first datagram to a 4-tuple: creates its `UDP_FLOWS`
/// entry with the probation entry's ingress bytes and first datagram (if
/// the client spoke within a `session_idle`), then deletes that entry.
#[inline(always)]
fn promote(key: &UdpFlowKey, service: u32, payload: u64, now: u64) -> Promotion {
    if CUT_FLOWS.get_ptr(key).is_some() {
        bump_cut(CutStat::UdpDropped);
        return Promotion::Done(DROP);
    }
    let mut flow = UdpFlow {
        counts: Counts {
            bytes_out: payload,
            bytes_in: 0,
            last_ns: now,
        },
        first_ns: now,
        service,
        // Not cut: looked up just above.
        pad: check_period(now),
    };
    let entry = UDP_PROBATION.get_ptr(key);
    let mut carried = false;
    if let Some(entry) = entry {
        // SAFETY: valid map value pointer; fields another CPU may be
        // adding to are read volatile.
        unsafe {
            let last = read_volatile(&raw const (*entry).counts.last_ns);
            let idle = session_idle(service);
            if idle == 0 || now < last.saturating_add(idle) {
                flow.counts.bytes_in = read_volatile(&raw const (*entry).counts.bytes_in);
                flow.first_ns = read_volatile(&raw const (*entry).first_ns);
                carried = true;
            }
        }
    }
    if UDP_FLOWS
        .insert(key, &flow, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU promoted the flow meanwhile, or the map is full (the
        // probation entry stays for the server's next datagram).
        return match UDP_FLOWS.get_ptr_mut(key) {
            Some(flow) => Promotion::Raced(flow),
            None => {
                bump(Stat::UdpFull);
                Promotion::Done(PASS)
            }
        };
    }
    let Some(entry) = entry else {
        bump_udp(UdpStat::PromotedUnseen);
        return Promotion::Done(PASS);
    };
    // The client's datagrams that missed the new flow (they found no
    // `UDP_FLOWS` entry before the insert) went to probation: carry what
    // arrived since the copy. Only one racing in the few instructions up
    // to the delete is lost (see the README's known limits).
    // SAFETY: valid map value pointer, read before the delete.
    let late = unsafe { read_volatile(&raw const (*entry).counts.bytes_in) }
        .saturating_sub(flow.counts.bytes_in);
    let _ = UDP_PROBATION.remove(key);
    if !carried {
        bump_udp(UdpStat::PromotedUnseen);
        return Promotion::Done(PASS);
    }
    if late != 0
        && let Some(created) = UDP_FLOWS.get_ptr_mut(key)
    {
        // SAFETY: valid map value pointer; atomic add as in `add`.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*created).counts.bytes_in,
                late,
            );
        }
    }
    bump_udp(UdpStat::Promoted);
    Promotion::Done(PASS)
}

/// Whether the flow is cut: [`FLOW_CUT`] in its `pad`, refreshed from
/// `CUT_FLOWS` when `pad`'s check period is not `now`'s.
#[inline(always)]
fn is_cut(key: &UdpFlowKey, flow: *mut UdpFlow, now: u64) -> bool {
    let period = check_period(now);
    // SAFETY: valid map value pointer; `pad` is written by the kernel only,
    // a 4-byte store apart from the counters. CPUs racing here all store
    // what they found in `CUT_FLOWS`; the last store wins, and any is
    // right within one period.
    unsafe {
        let pad = &raw mut (*flow).pad;
        let seen = read_volatile(pad);
        if seen & !FLOW_CUT == period {
            return seen & FLOW_CUT != 0;
        }
        let cut = CUT_FLOWS.get_ptr(key).is_some();
        write_volatile(pad, if cut { period | FLOW_CUT } else { period });
        cut
    }
}

/// Adds a datagram to an existing flow, after ending a gap if it ends one.
#[inline(always)]
fn add(key: &UdpFlowKey, flow: *mut UdpFlow, dir: Direction, payload: u64, now: u64) {
    // SAFETY: valid map value pointer. Datagrams of one flow can run on
    // several CPUs at once, so fields that change are read volatile, the
    // boundary is claimed and the counters added atomically.
    unsafe {
        let last_ns = &raw mut (*flow).counts.last_ns;
        let last = read_volatile(last_ns);
        let idle = session_idle((*flow).service);
        if idle != 0 && now >= last.saturating_add(idle) {
            // Only the CPU that moves last_ns from the value it read ends
            // the gap; the others add their datagram after its boundary.
            // Lowers to BPF_CMPXCHG. Success is tested on the old value:
            // this nightly's rustc branches on the tuple's `bool` with an
            // `i8` (`br i8`, invalid IR), which bpf-linker's LLVM rejects
            // as "Invalid record".
            let (old, _) =
                atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                    last_ns, last, now,
                );
            if old == last {
                // A datagram another CPU adds between the claim and these
                // reads lands before the boundary: the counts are "as
                // read", which the agent splits by.
                let counts = Counts {
                    bytes_out: read_volatile(&raw const (*flow).counts.bytes_out),
                    bytes_in: read_volatile(&raw const (*flow).counts.bytes_in),
                    last_ns: last,
                };
                let info = ConnInfo {
                    start_ns: (*flow).first_ns,
                    end_ns: 0,
                    local_addr: key.local_addr,
                    remote_addr: key.remote_addr,
                    local_port: key.local_port,
                    remote_port: key.remote_port,
                    family: key.family,
                    protocol: IPPROTO_UDP,
                    service: (*flow).service,
                    flags: 0,
                    slot: NO_SLOT,
                    pad: 0,
                };
                // A full ring loses this gap (counted): the flow's session
                // then spans it.
                queue_gap(0, counts, info, now);
            }
        }
        // The date before the bytes: a reader that sees the datagram then
        // sees its date (on x86).
        write_volatile(last_ns, now);
        let counter = match dir {
            Direction::Out => &raw mut (*flow).counts.bytes_out,
            Direction::In => &raw mut (*flow).counts.bytes_in,
        };
        // The bpf target has no `AtomicU64::fetch_add`; the intrinsic
        // with an unused result lowers to BPF_XADD.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, payload);
    }
}
