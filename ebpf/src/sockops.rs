//! sock_ops: the life of a metered TCP connection.
//!
//! - PASSIVE_ESTABLISHED: an accepted connection on a metered port gets a
//!   `LIVE` and an `INFO` entry, and asks for state callbacks.
//! - STATE (any transition but to CLOSE): refreshes the live counts; entering
//!   FIN_WAIT2 records the exact receive count that `final_bytes_in` needs.
//! - STATE to CLOSE: computes the exact totals (sock_ops' `bytes_acked` and
//!   `bytes_received` are final here, minus FINs) and queues a `Closed`
//!   record. If the ring buffer is full, the totals stay in `LIVE` marked
//!   closed, for the agent to collect: counted in `STATS`, never silent.
//!
//! No RTT or per-ACK callbacks: they cost ~150 ns per ACK on a download-heavy
//! server, and the egress hook keeps live counts fresh more cheaply.
//!
//! Minimum kernel version: 5.3 (`bytes_acked` in `bpf_sock_ops`, state callbacks).

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns, generated::bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use meterd_common::{
    AF_INET6, CONN_CLOSED, CONN_FIN_IN, CONN_FIN_OUT, CONN_UNTRACKED, Closed, ConnInfo, Counts,
    IPPROTO_TCP, Stat,
    tcp::{final_bytes_in, final_bytes_out, live_bytes_in, live_bytes_out, state},
};

use crate::maps::{CLOSED, INFO, LIVE, SK_METER, SkMeter, TCP_PORTS, bump, service_of};

#[sock_ops]
pub fn meterd_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the context pointer comes from the kernel.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// Reads a context field with a load at its fixed offset from the context
/// register: the verifier rejects a context pointer that LLVM has moved
/// (e.g. when it merges the IPv4 and IPv6 branches into one computed load).
macro_rules! ctx_field {
    ($ctx:expr, $field:ident) => {
        // SAFETY: the context pointer comes from the kernel; the field is a
        // plain member of `bpf_sock_ops`.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.ops).$field) }
    };
}

/// The connection's identity, as sock_ops sees it.
#[inline(always)]
fn conn_info(ctx: &SockOpsContext, service: u32, start_ns: u64) -> ConnInfo {
    let family = ctx_field!(ctx, family) as u16;
    let local_ip4 = ctx_field!(ctx, local_ip4);
    let remote_ip4 = ctx_field!(ctx, remote_ip4);
    let local_ip6 = ctx_field!(ctx, local_ip6);
    let remote_ip6 = ctx_field!(ctx, remote_ip6);
    let local_port = ctx_field!(ctx, local_port);
    let remote_port = ctx_field!(ctx, remote_port);
    let (local_addr, remote_addr) = if family == AF_INET6 {
        (local_ip6, remote_ip6)
    } else {
        ([local_ip4, 0, 0, 0], [remote_ip4, 0, 0, 0])
    };
    ConnInfo {
        start_ns,
        end_ns: 0,
        local_addr,
        remote_addr,
        // local_port is in host order; remote_port is the network-order port
        // in the upper half of a u32 (little endian), so from_be recovers it.
        local_port: local_port as u16,
        remote_port: u32::from_be(remote_port) as u16,
        family,
        protocol: IPPROTO_TCP,
        service,
        flags: 0,
    }
}

fn on_established(ctx: &SockOpsContext) {
    let service = service_of(&TCP_PORTS, ctx_field!(ctx, local_port));
    if service == 0 {
        return;
    }
    // Ask for the close callback even if the maps are full below: the close
    // record then still carries exact totals (flagged CONN_UNTRACKED).
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
        bump(Stat::LiveFull);
        return;
    }
    let cookie = cookie(ctx);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let info = conn_info(ctx, service - 1, now);
    if INFO.insert(&cookie, &info, u64::from(BPF_NOEXIST)).is_err() {
        bump(Stat::LiveFull);
        return;
    }
    if LIVE
        .insert(&cookie, &Counts::default(), u64::from(BPF_NOEXIST))
        .is_err()
    {
        let _ = INFO.remove(&cookie);
        bump(Stat::LiveFull);
        return;
    }
    // Mark the socket metered for the egress hook (see maps::SkMeter).
    let sk = ctx_field!(ctx, __bindgen_anon_2);
    // SAFETY: reading the union's pointer member; NULL-checked below.
    let sk = unsafe { sk.sk };
    if !sk.is_null() {
        let mut init = SkMeter { synced_jiffies: 0 };
        // SAFETY: helper on a socket pointer from the context; the map
        // pointer is the BTF map definition's own address.
        unsafe {
            bpf_sk_storage_get(
                core::ptr::from_ref(&SK_METER).cast_mut().cast(),
                sk.cast(),
                core::ptr::from_mut(&mut init).cast(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            );
        }
    }
    bump(Stat::Opened);
}

fn on_state(ctx: &SockOpsContext) {
    let new_state = ctx.arg(1);
    let cookie = cookie(ctx);
    let acked = ctx_field!(ctx, bytes_acked);
    let received = ctx_field!(ctx, bytes_received);
    let una = ctx_field!(ctx, snd_una);
    let nxt = ctx_field!(ctx, snd_nxt);
    let live = LIVE.get_ptr_mut(&cookie);
    if new_state == state::CLOSE {
        on_close(ctx, cookie, live, ctx.arg(0), acked, received, una, nxt);
        return;
    }
    let Some(live) = live else { return };
    // SAFETY: valid map value pointer; sock_ops callbacks of one socket run
    // under its lock, and every writer only raises the values.
    let live = unsafe { &mut *live };
    let out = live_bytes_out(acked, new_state, una, nxt);
    if out > live.bytes_out {
        live.bytes_out = out;
    }
    let inb = if new_state == state::FIN_WAIT2 {
        // Entering FIN_WAIT2 happens before the segment's payload or FIN is
        // queued: the count is exact, and final_bytes_in compares against it.
        Some(received)
    } else {
        live_bytes_in(received, new_state)
    };
    if let Some(inb) = inb
        && inb > live.bytes_in
    {
        live.bytes_in = inb;
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "plain values read once from the context"
)]
fn on_close(
    ctx: &SockOpsContext,
    cookie: u64,
    live: Option<*mut Counts>,
    old_state: u32,
    acked: u64,
    received: u64,
    una: u32,
    nxt: u32,
) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Without a LIVE entry there is no FIN_WAIT2 snapshot: assume no client
    // FIN (the orphan case), at worst one byte low.
    // SAFETY: valid map value pointer.
    let in_at_fin_wait2 = live.map_or(received, |l| unsafe { (*l).bytes_in });
    let counts = Counts {
        bytes_out: final_bytes_out(acked, old_state, una, nxt),
        bytes_in: final_bytes_in(received, old_state, in_at_fin_wait2),
    };
    let mut flags = 0;
    if counts.bytes_out != acked {
        flags |= CONN_FIN_OUT;
    }
    if counts.bytes_in != received {
        flags |= CONN_FIN_IN;
    }
    let info = INFO.get_ptr_mut(&cookie);

    if let Some(mut entry) = CLOSED.reserve::<Closed>(0) {
        let mut info_value = match info {
            // SAFETY: valid map value pointer.
            Some(info) => unsafe { *info },
            None => {
                let service = service_of(&TCP_PORTS, ctx_field!(ctx, local_port));
                conn_info(ctx, service.wrapping_sub(1), 0)
            }
        };
        info_value.end_ns = now;
        info_value.flags |= flags | if live.is_none() { CONN_UNTRACKED } else { 0 };
        entry.write(Closed {
            cookie,
            counts,
            info: info_value,
        });
        entry.submit(0);
        let _ = LIVE.remove(&cookie);
        let _ = INFO.remove(&cookie);
        bump(Stat::Closed);
        return;
    }

    // Ring buffer full: leave the final totals where the agent's next full
    // read will find them.
    match (live, info) {
        (Some(live), Some(info)) => {
            // SAFETY: valid map value pointers; the socket is closing, no
            // other writer runs for it.
            unsafe {
                *live = counts;
                (*info).end_ns = now;
                (*info).flags |= CONN_CLOSED | flags;
            }
            bump(Stat::RingFull);
        }
        _ => bump(Stat::Lost),
    }
}
