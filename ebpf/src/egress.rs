//! cgroup_skb/egress: keeps live TCP counts fresh and counts outgoing UDP.
//!
//! For TCP this does not count packet lengths: retransmissions would be
//! counted again (up to +15% seen on one lossy connection). It snapshots the
//! kernel's own `bytes_acked`/`bytes_received` through `bpf_tcp_sock()`,
//! which a retransmission does not move. Egress is where a streaming
//! server's packets are few and large (GSO), so this is the cheapest place
//! for the snapshot; the ACKs it receives pass no program at all.
//!
//! Minimum kernel version: 5.1 (`bpf_tcp_sock` with `bytes_acked`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, bpf_sock},
    helpers::generated::{bpf_get_socket_cookie, bpf_sk_fullsock, bpf_tcp_sock},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use meterd_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    tcp::{live_bytes_in, live_bytes_out, state},
};

use crate::{
    maps::{LIVE, TCP_PORTS, service_of},
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

#[inline(always)]
fn tcp(ctx: &SkBuffContext, sk: *mut bpf_sock) {
    // SAFETY: non-NULL full socket.
    let (port, tcp_state) = unsafe { ((*sk).src_port, (*sk).state) };
    // Handshake packets of a listener belong to no connection yet.
    if tcp_state == state::LISTEN || service_of(&TCP_PORTS, port) == 0 {
        return;
    }
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
