//! cgroup_skb/egress: keeps live TCP counts fresh and counts outgoing UDP.
//!
//! For TCP this does not count packet lengths: retransmissions would be
//! counted again (up to +15% seen on one lossy connection). It snapshots the
//! kernel's own `bytes_acked`/`bytes_received` through `bpf_tcp_sock()`,
//! which a retransmission does not move. Egress is where a streaming
//! server's packets are few and large (GSO), so this is the cheapest place
//! for the snapshot; the ACKs it receives pass no program at all.
//!
//! On most packets of an established connection the program does one
//! per-socket storage lookup (on `skb->sk` as it comes, with no
//! `bpf_sk_fullsock` first), a state read and a jiffies compare (the fast
//! path). At most every [`REFRESH_JIFFIES`] per connection, and on every
//! packet in other states, it folds a snapshot into its `LIVE` slot
//! ([`crate::activity::fold`]), which also dates the rise and notes a gap.
//! Only that slow path reads the boot-time clock.
//!
//! # Cut-off
//!
//! A connection the agent put in `CUT` (its account ran out) has its
//! packets dropped here: the slow path copies the `CUT` entry into the
//! socket's [`SkMeter`] flags, and every packet, fast path included, tests
//! that flag on the storage value it already has (one load and a test; no
//! map lookup per packet). A busy socket reaches the slow path within
//! [`REFRESH_JIFFIES`] (100 ms at HZ=250) of the agent's write, a quiet one
//! at its next packet, so that is the longest a cut connection still sends
//! when its socket is not destroyed (drop-only mode). Its RSTs pass, so
//! the client learns of a `SOCK_DESTROY` (or of the server's own abort).
//! Counting stays exact: the counts are what the client acknowledged, and
//! a dropped segment is never acknowledged. The slow path goes on folding
//! a cut socket's counters (ACKs for what was sent before the cut).
//!
//! Minimum kernel version: 5.10 (`bpf_sk_storage_get` on a sock_common;
//! before, it took full sockets only; `bpf_ktime_get_boot_ns` and ring
//! buffers from 5.8).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, bpf_sock},
    helpers::{
        bpf_ktime_get_boot_ns,
        generated::{bpf_get_socket_cookie, bpf_jiffies64, bpf_sk_fullsock, bpf_tcp_sock},
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use meterd_common::{
    AF_INET6, ConnInfo, CutStat, IPPROTO_TCP, IPPROTO_UDP, NO_SLOT,
    tcp::{live_bytes_in, live_bytes_out, state},
};

use crate::{
    DROP, PASS,
    activity::{OnRingFull, REFRESH_JIFFIES, Reading, fold},
    maps::{SkMeter, bump_cut, live_slot, sk_meter},
    udp::{Direction, count_udp},
};

/// The RST bit of the TCP header's flags byte.
const TCP_RST: u8 = 0x04;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_AT: usize = 13;

#[cgroup_skb(egress)]
pub fn meterd_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: reads of the context's socket pointer, NULL-checked below.
    let sk = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // Only TCP sockets sock_ops registered have this storage (listeners and
    // unmetered connections do not). `skb->sk` is only a sock_common (it
    // may be a request or timewait socket): the helper takes one, and
    // returns NULL for a socket that is not full, so a metered packet needs
    // no `bpf_sk_fullsock` call first. The fields `tcp` reads (state,
    // family, addresses, ports) are sock_common's. The other packets (UDP
    // datagrams, SYN-ACKs, timewait ACKs) pay that lookup's miss, a few ns,
    // before `bpf_sk_fullsock`.
    let meter = sk_meter(sk.cast(), None);
    if !meter.is_null() {
        return tcp(&ctx, sk, meter);
    }
    // `protocol` needs the full socket.
    // SAFETY: helper on a non-NULL socket pointer from the context.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: non-NULL full socket.
    if !sk.is_null() && unsafe { (*sk).protocol } as u16 == IPPROTO_UDP {
        return count_udp(&ctx, sk, Direction::Out);
    }
    PASS
}

/// A packet of a metered TCP socket: `meter` is its (non-NULL) storage.
#[inline(always)]
fn tcp(ctx: &SkBuffContext, sk: *mut bpf_sock, meter: *mut SkMeter) -> i32 {
    // SAFETY: the socket has storage, so it is a full socket; `state` is a
    // sock_common field.
    let tcp_state = unsafe { (*sk).state };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: valid storage pointer, written only under the socket's lock.
    let meter = unsafe { &mut *meter };
    if tcp_state != state::ESTABLISHED || now.wrapping_sub(meter.synced_jiffies) >= REFRESH_JIFFIES
    {
        slow_path(ctx, sk, meter, now);
    }
    // The fast path's one addition: a test of the flag in the value at hand.
    if meter.is_cut() {
        cut_verdict(ctx)
    } else {
        PASS
    }
}

/// A packet of a cut connection: dropped, unless it is a RST (the one
/// `SOCK_DESTROY` or the server's abort sends), which tells the client the
/// stream ended. A packet whose TCP header cannot be found (IPv6 extension
/// headers) is dropped.
#[inline(always)]
fn cut_verdict(ctx: &SkBuffContext) -> i32 {
    let tcp_at = match ctx.load::<u8>(0) {
        Ok(vihl) if vihl >> 4 == 4 => usize::from(vihl & 0x0f) * 4,
        Ok(vihl) if vihl >> 4 == 6 && ctx.load::<u8>(6).ok() == Some(IPPROTO_TCP as u8) => 40,
        _ => {
            bump_cut(CutStat::TcpDropped);
            return DROP;
        }
    };
    match ctx.load::<u8>(tcp_at + TCP_FLAGS_AT) {
        Ok(flags) if flags & TCP_RST != 0 => {
            bump_cut(CutStat::ResetPassed);
            PASS
        }
        _ => {
            bump_cut(CutStat::TcpDropped);
            DROP
        }
    }
}

/// Folds a snapshot of the socket's counters into its `LIVE` slot, and refreshes
/// the socket's cut flag from `CUT`.
#[inline(always)]
fn slow_path(ctx: &SkBuffContext, sk: *mut bpf_sock, meter: &mut SkMeter, jiffies: u64) {
    // SAFETY: helper on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    meter.refresh_cut(cookie);
    // SAFETY: helper on the socket (a full one: it has storage; the helper
    // takes a sock_common and returns NULL for anything but TCP).
    let tp = unsafe { bpf_tcp_sock(sk) };
    // An array load and a cookie compare, no hash lookup.
    let live = live_slot(meter.slot, cookie);
    let (Some(live), false) = (live, tp.is_null()) else {
        // Nothing to fold into (the connection is untracked): stay on the
        // fast path.
        // SAFETY: helper without arguments.
        let now_ns = unsafe { bpf_ktime_get_boot_ns() };
        if meter.is_untracked() {
            // Its establishment stays in `synced_ns`; a packet of an
            // established connection dates its last payload (its FIN and
            // what follows it do not).
            meter.synced_jiffies = jiffies;
            // SAFETY: non-NULL full socket.
            if unsafe { (*sk).state } == state::ESTABLISHED {
                meter.untracked_sent(now_ns);
            }
        } else {
            meter.sync(jiffies, now_ns);
        }
        return;
    };
    // SAFETY: non-NULL tcp_sock and full socket, fields read at their
    // declared width.
    let (acked, received, una, nxt, tcp_state) = unsafe {
        (
            (*tp).bytes_acked,
            (*tp).bytes_received,
            (*tp).snd_una,
            (*tp).snd_nxt,
            (*sk).state,
        )
    };
    // SAFETY: valid map value pointer; the socket's packets and sock_ops
    // callbacks run under its lock, so this is the entry's only writer.
    let live = unsafe { &mut *live };
    let bytes_out = live_bytes_out(acked, tcp_state, una, nxt);
    let bytes_in = live_bytes_in(received, tcp_state).unwrap_or(live.bytes_in);
    let service = meter.service;
    fold(
        cookie,
        live,
        meter,
        &Reading::at(jiffies, bytes_out, bytes_in),
        || info_of(sk, service),
        OnRingFull::Retry,
    );
}

/// The connection's identity from its socket, for a gap record when `INFO`
/// has no entry (it always should: sock_ops writes both).
#[inline(always)]
fn info_of(sk: *mut bpf_sock, service: u32) -> ConnInfo {
    // Each field is read on its own at its offset: the verifier checks
    // socket accesses per field and width.
    // SAFETY: non-NULL full socket; plain members of `bpf_sock`.
    let (family, src4, dst4, src_port, dst_port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family) as u16,
            core::ptr::read_volatile(&raw const (*sk).src_ip4),
            core::ptr::read_volatile(&raw const (*sk).dst_ip4),
            core::ptr::read_volatile(&raw const (*sk).src_port),
            core::ptr::read_volatile(&raw const (*sk).dst_port),
        )
    };
    let (local_addr, remote_addr) = if family == AF_INET6 {
        // SAFETY: as above.
        unsafe { (ip6(&raw const (*sk).src_ip6), ip6(&raw const (*sk).dst_ip6)) }
    } else {
        ([src4, 0, 0, 0], [dst4, 0, 0, 0])
    };
    ConnInfo {
        start_ns: 0,
        end_ns: 0,
        local_addr,
        remote_addr,
        // src_port is in host order, dst_port in network order.
        local_port: src_port as u16,
        remote_port: u16::from_be(dst_port),
        family,
        protocol: IPPROTO_TCP,
        service,
        flags: 0,
        slot: NO_SLOT,
        pad: 0,
    }
}

/// Reads an IPv6 address of a `bpf_sock` one word at a time.
///
/// # Safety
/// `words` points into a full socket's `bpf_sock`.
#[inline(always)]
unsafe fn ip6(words: *const [u32; 4]) -> [u32; 4] {
    let w = words.cast::<u32>();
    // SAFETY: four words of the caller's address field.
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}
