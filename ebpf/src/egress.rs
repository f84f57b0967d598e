//! cgroup_skb/egress: keeps live TCP counts fresh and counts outgoing UDP.
//!
//! For TCP this does not count packet lengths: retransmissions would be
//! counted again (up to +15% seen on one lossy connection). It snapshots the
//! kernel's own `bytes_acked`/`bytes_received` through `bpf_tcp_sock()`,
//! which a retransmission does not move. Egress is where a streaming
//! server's packets are few and large (GSO), so this is the cheapest place
//! for the snapshot; the ACKs it receives pass no program at all.
//!
//! Live TCP entries are refreshed at most every [`REFRESH_JIFFIES`] per
//! connection (and at every state change), which keeps the program to a
//! per-socket storage lookup and a compare on most packets.
//!
//! Minimum kernel version: 5.5 (`bpf_jiffies64`; sk_storage from cgroup_skb).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_jiffies64, bpf_sk_fullsock, bpf_sk_storage_get, bpf_tcp_sock,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use meterd_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    tcp::{live_bytes_in, live_bytes_out, state},
};

use crate::{
    maps::{LIVE, SK_METER, SkMeter},
    udp::{Direction, count_udp},
};

/// Never drops a packet: meterd observes, it does not filter.
const PASS: i32 = 1;

#[cgroup_skb(egress)]
pub fn meterd_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: reads of the context's socket pointer, NULL-checked below.
    let sk = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // `skb->sk` is only a sock_common (it may be a request or timewait
    // socket); `protocol` and `tcp_sock` need the full socket.
    // SAFETY: helper on a non-NULL socket pointer from the context.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return PASS;
    }
    // SAFETY: non-NULL full socket.
    match unsafe { (*sk).protocol } as u16 {
        IPPROTO_TCP => tcp(&ctx, sk),
        IPPROTO_UDP => count_udp(&ctx, sk, Direction::Out),
        _ => {}
    }
    PASS
}

/// Jiffies between two refreshes of an established connection's `LIVE`
/// entry: 100 ms at HZ=250. A streaming server sends tens of thousands of
/// GSO packets per second per busy connection; refreshing on each would
/// make the hash lookup the data path's main cost, while the billing cycle
/// reads at most once per interval. State changes refresh at once, and the
/// close record is exact whatever the refresh rate.
const REFRESH_JIFFIES: u64 = 25;

#[inline(always)]
fn tcp(ctx: &SkBuffContext, sk: *mut bpf_sock) {
    // Only sockets sock_ops registered have this storage (listeners and
    // unmetered connections do not).
    // SAFETY: helper on a full socket; the map pointer is the BTF map
    // definition's own address.
    let meter = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SK_METER).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SkMeter>();
    if meter.is_null() {
        return;
    }
    // SAFETY: non-NULL full socket.
    let tcp_state = unsafe { (*sk).state };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: valid storage pointer, written only under the socket's lock.
    let meter = unsafe { &mut *meter };
    if tcp_state == state::ESTABLISHED && now.wrapping_sub(meter.synced_jiffies) < REFRESH_JIFFIES {
        return;
    }
    meter.synced_jiffies = now;
    // SAFETY: helper on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(live) = LIVE.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: helper on a full socket.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return;
    }
    // SAFETY: non-NULL tcp_sock, fields read at their declared width.
    let (acked, received, una, nxt) = unsafe {
        (
            (*tp).bytes_acked,
            (*tp).bytes_received,
            (*tp).snd_una,
            (*tp).snd_nxt,
        )
    };
    // SAFETY: valid map value pointer; writers only ever raise the values,
    // so a racing older snapshot cannot move a count backwards.
    let live = unsafe { &mut *live };
    let out = live_bytes_out(acked, tcp_state, una, nxt);
    if out > live.bytes_out {
        live.bytes_out = out;
    }
    if let Some(inb) = live_bytes_in(received, tcp_state)
        && inb > live.bytes_in
    {
        live.bytes_in = inb;
    }
}
