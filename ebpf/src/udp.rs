//! UDP flow counting, shared by the two cgroup_skb hooks (not a hook itself).
//!
//! A UDP server socket is usually unconnected, so the flow is the 4-tuple of
//! the datagram, not the socket. The billed quantity is UDP payload: the
//! datagram minus IP and UDP headers (for a GSO/GRO skb that is still one
//! header set over the whole payload).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock},
    helpers::bpf_ktime_get_boot_ns,
    programs::SkBuffContext,
};
use meterd_common::{AF_INET, AF_INET6, Counts, IPPROTO_UDP, Stat, UdpFlow, UdpFlowKey};

use crate::maps::{UDP_FLOWS, UDP_PORTS, bump, service_of};

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

/// Adds the datagram in `ctx` to its flow, if its local port is metered.
#[inline(always)]
pub fn count_udp(ctx: &SkBuffContext, sk: *mut bpf_sock, dir: Direction) {
    // SAFETY: non-NULL socket pointer from the context (checked by callers).
    let local_port = unsafe { (*sk).src_port };
    let service = service_of(&UDP_PORTS, local_port);
    if service == 0 {
        return;
    }
    let Some((family, src, dst, ip_len)) = parse(ctx) else {
        return;
    };
    let ports_at = ip_len as usize;
    let Ok(sport) = ctx.load::<u16>(ports_at) else {
        return;
    };
    let Ok(dport) = ctx.load::<u16>(ports_at + 2) else {
        return;
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
    if add(&key, dir, payload, now) {
        return;
    }
    let mut counts = Counts::default();
    match dir {
        Direction::Out => counts.bytes_out = payload,
        Direction::In => counts.bytes_in = payload,
    }
    let flow = UdpFlow {
        counts,
        first_ns: now,
        last_ns: now,
        service: service - 1,
        pad: 0,
    };
    if UDP_FLOWS
        .insert(&key, &flow, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return;
    }
    // Another CPU created the flow meanwhile, or the map is full.
    if !add(&key, dir, payload, now) {
        bump(Stat::UdpFull);
    }
}

/// Adds to an existing flow; false if there is none.
#[inline(always)]
fn add(key: &UdpFlowKey, dir: Direction, payload: u64, now: u64) -> bool {
    let Some(flow) = UDP_FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: valid map value pointer; concurrent datagrams of one flow can
    // run on several CPUs, so the counters are added atomically.
    unsafe {
        let counter = match dir {
            Direction::Out => &raw mut (*flow).counts.bytes_out,
            Direction::In => &raw mut (*flow).counts.bytes_in,
        };
        // The bpf target has no `AtomicU64::fetch_add`; the intrinsic
        // with an unused result lowers to BPF_XADD.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, payload);
        (*flow).last_ns = now;
    }
    true
}
