//! cgroup_skb/ingress: counts incoming UDP datagrams of metered flows, and
//! drops those of flows the agent cut off.
//!
//! TCP needs nothing here (the egress snapshot and sock_ops cover both
//! directions), so the agent attaches this program only when a UDP port is
//! metered: on a download-heavy TCP server it would run once per ACK.
//!
//! Minimum kernel version: 5.12 (the UDP gap claim's `BPF_CMPXCHG`, see
//! [`crate::udp`]).

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, helpers::generated::bpf_sk_fullsock, macros::cgroup_skb,
    programs::SkBuffContext,
};
use meterd_common::IPPROTO_UDP;

use crate::{
    PASS,
    udp::{Direction, count_udp},
};

#[cgroup_skb(ingress)]
pub fn meterd_ingress(ctx: SkBuffContext) -> i32 {
    // SAFETY: reads of the context's socket pointer, NULL-checked below.
    let sk = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // `protocol` is readable on full sockets only.
    // SAFETY: helper on a non-NULL socket pointer from the context.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    // SAFETY: non-NULL full socket.
    if !sk.is_null() && unsafe { (*sk).protocol } as u16 == IPPROTO_UDP {
        // A cut flow's datagrams are dropped here too: the server never
        // sees them, and they are not counted.
        return count_udp(&ctx, sk, Direction::In);
    }
    PASS
}
