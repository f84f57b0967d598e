//! sock_ops: the life of a metered TCP connection.
//!
//! - PASSIVE_ESTABLISHED: an accepted connection on a metered port takes a
//!   `LIVE` slot from `FREE_SLOTS`, gets an `INFO` entry (with the slot)
//!   and its `SK_METER` storage (with the slot, synced now, so the first
//!   packets take the egress fast path), and asks for state callbacks.
//!   With no free slot (or a full `INFO`) it is untracked: billed at its
//!   close, timed from its storage.
//! - STATE (any transition but to CLOSE): folds the counters into `LIVE`
//!   ([`crate::activity::fold`], which dates the rise and notes a gap);
//!   entering FIN_WAIT2 records the exact receive count that
//!   `final_bytes_in` needs.
//! - STATE to CLOSE: computes the exact totals (sock_ops' `bytes_acked` and
//!   `bytes_received` are final here, minus FINs), folds them by the same
//!   rule, so a rise first seen at close after a quiet period is dated as
//!   the tail it is and not at the close (a keep-alive connection's idle
//!   tail is not watching time), and queues a `Closed` record (after the
//!   gap record, if the fold found a gap), with the slot in its `info`. The
//!   slot keeps the cookie and the final totals: only the agent returns it,
//!   once the close is committed. If the ring buffer is full, the totals
//!   stay in the slot and `INFO` is marked closed, for the agent to
//!   collect: counted in `STATS`, never silent.
//!
//! - Cut-off: each state change copies the connection's `CUT` entry into
//!   its `SK_METER` flags (the egress hook drops a cut connection's
//!   packets), and the close deletes the entry.
//!
//! No RTT or per-ACK callbacks: they cost ~150 ns per ACK on a download-heavy
//! server, and the egress hook keeps live counts fresh more cheaply.
//!
//! Minimum kernel version: 5.8 (`bytes_acked` in `bpf_sock_ops` and state
//! callbacks: 5.3; ring buffers and `bpf_ktime_get_boot_ns`: 5.8).

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use meterd_common::{
    AF_INET6, CONN_CLOSED, CONN_FIN_IN, CONN_FIN_OUT, CONN_UNTRACKED, Closed, ConnInfo, Counts,
    IPPROTO_TCP, NO_SLOT, SOCK_OPS_STATE_CB_FLAG, Stat, sock_ops_cb_flags,
    tcp::{final_bytes_in, final_bytes_out, live_bytes_in, live_bytes_out, state},
};

use crate::{
    activity::{OnRingFull, Reading, fold},
    maps::{
        CLOSED, CUT, INFO, METER_UNTRACKED, SkMeter, TCP_PORTS, bump, live_slot, publish_slot,
        service_of, sk_meter, take_slot, untake_slot,
    },
};

// The shared rule's flag is the kernel's.
const _: () = assert!(SOCK_OPS_STATE_CB_FLAG == BPF_SOCK_OPS_STATE_CB_FLAG);

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
        slot: NO_SLOT,
        pad: 0,
    }
}

/// The socket pointer of the callback, NULL if it is not a full socket.
#[inline(always)]
fn socket(ctx: &SockOpsContext) -> *mut core::ffi::c_void {
    let sk = ctx_field!(ctx, __bindgen_anon_2);
    // SAFETY: reading the union's pointer member; callers NULL-check it.
    unsafe { sk.sk }.cast()
}

/// The socket's [`SkMeter`], NULL if it has none (not metered, or its
/// creation failed at establishment).
#[inline(always)]
fn meter_of(ctx: &SockOpsContext) -> *mut SkMeter {
    let sk = socket(ctx);
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    sk_meter(sk, None)
}

/// A meter for a socket that has none: synced now, so nothing is dated
/// from a past it does not know.
#[inline(always)]
fn fresh_meter(ctx: &SockOpsContext, now: &Reading) -> SkMeter {
    SkMeter {
        synced_jiffies: now.jiffies,
        synced_ns: now.ns,
        // An unmetered port now wraps to an index SERVICE_IDLE does not
        // have: no gap detection.
        service: service_of(&TCP_PORTS, ctx_field!(ctx, local_port)).wrapping_sub(1),
        flags: 0,
        slot: NO_SLOT,
        pad: 0,
    }
}

fn on_established(ctx: &SockOpsContext) {
    let service = service_of(&TCP_PORTS, ctx_field!(ctx, local_port));
    if service == 0 {
        return;
    }
    // Ask for the close callback even if the maps are full below: the close
    // record then still carries exact totals (flagged CONN_UNTRACKED).
    // OR'd into what is set: another program on the socket may have asked
    // for callbacks of its own, and replacing its flags would silence it.
    let flags = sock_ops_cb_flags(ctx_field!(ctx, bpf_sock_ops_cb_flags));
    if ctx.set_cb_flags(flags as i32).is_err() {
        bump(Stat::LiveFull);
        return;
    }
    let cookie = cookie(ctx);
    let now = Reading::now(0, 0);
    let mut info = conn_info(ctx, service - 1, now.ns);
    // The slot first: INFO carries it, so the agent, which finds a new
    // cookie in LIVE and then looks up INFO, always has both. Published
    // only after the INFO insert; given back if that fails.
    info.slot = take_slot();
    let tracked = if info.slot == NO_SLOT {
        false
    } else if INFO.insert(&cookie, &info, u64::from(BPF_NOEXIST)).is_err() {
        untake_slot(info.slot);
        false
    } else {
        publish_slot(info.slot, cookie);
        true
    };
    // Mark the socket metered for the egress hook (see maps::SkMeter).
    // Synced at establishment: the handshake moved no payload, and the
    // first packets within the refresh period take the fast path. Without
    // a slot, the storage is what dates the close record (METER_UNTRACKED:
    // its start, and its last packet, 0 ms after it). If the storage
    // cannot be made, a tracked connection's counts stay at 0 until its
    // close record, which still carries INFO's slot back to the agent.
    let sk = socket(ctx);
    if !sk.is_null() {
        let mut init = SkMeter {
            synced_jiffies: now.jiffies,
            synced_ns: now.ns,
            service: if tracked { service - 1 } else { 0 },
            flags: if tracked { 0 } else { METER_UNTRACKED },
            slot: if tracked { info.slot } else { NO_SLOT },
            pad: 0,
        };
        sk_meter(sk, Some(&mut init));
    }
    bump(if tracked {
        Stat::Opened
    } else {
        Stat::LiveFull
    });
}

fn on_state(ctx: &SockOpsContext) {
    let new_state = ctx.arg(1);
    let cookie = cookie(ctx);
    let acked = ctx_field!(ctx, bytes_acked);
    let received = ctx_field!(ctx, bytes_received);
    let una = ctx_field!(ctx, snd_una);
    let nxt = ctx_field!(ctx, snd_nxt);
    let meter = meter_of(ctx);
    let live = if meter.is_null() {
        None
    } else {
        // SAFETY: valid storage pointer, under the socket's lock.
        live_slot(unsafe { (*meter).slot }, cookie)
    };
    if new_state == state::CLOSE {
        // Another program on the socket (another meterd's, on another
        // port) may have asked for these callbacks: a socket on none of
        // our ports, with no entry of ours, is not ours to report.
        if live.is_none() && service_of(&TCP_PORTS, ctx_field!(ctx, local_port)) == 0 {
            return;
        }
        on_close(
            ctx,
            cookie,
            meter,
            live,
            ctx.arg(0),
            acked,
            received,
            una,
            nxt,
        );
        return;
    }
    // A live slot was found through the storage, so `meter` is not NULL.
    let Some(live) = live else { return };
    // SAFETY: valid map value pointer; sock_ops callbacks of one socket run
    // under its lock, like its egress packets, and every writer only raises
    // the values.
    let live = unsafe { &mut *live };
    let bytes_in = if new_state == state::FIN_WAIT2 {
        // Entering FIN_WAIT2 happens before the segment's payload or FIN is
        // queued: the count is exact, and final_bytes_in compares against it.
        received
    } else {
        live_bytes_in(received, new_state).unwrap_or(live.bytes_in)
    };
    let now = Reading::now(live_bytes_out(acked, new_state, una, nxt), bytes_in);
    // SAFETY: non-NULL (see above) storage pointer, under the socket's lock.
    let meter = unsafe { &mut *meter };
    meter.refresh_cut(cookie);
    let service = meter.service;
    fold(
        cookie,
        live,
        meter,
        &now,
        || conn_info(ctx, service, 0),
        OnRingFull::Retry,
    );
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "plain values read once from the context"
)]
fn on_close(
    ctx: &SockOpsContext,
    cookie: u64,
    meter_ptr: *mut SkMeter,
    live: Option<*mut Counts>,
    old_state: u32,
    acked: u64,
    received: u64,
    una: u32,
    nxt: u32,
) {
    // Without a LIVE slot there is no FIN_WAIT2 snapshot: final_bytes_in
    // then assumes the client's FIN arrived, at worst one byte low.
    // SAFETY: valid map value pointer.
    let in_at_fin_wait2 = live.map(|l| unsafe { (*l).bytes_in });
    let now = Reading::now(
        final_bytes_out(acked, old_state, una, nxt),
        final_bytes_in(received, old_state, in_at_fin_wait2),
    );
    let mut counts = Counts {
        bytes_out: now.bytes_out,
        bytes_in: now.bytes_in,
        // Tracked: dated by the fold below; untracked: from the socket's
        // storage, further below.
        last_ns: 0,
    };
    let mut flags = 0;
    if counts.bytes_out != acked {
        flags |= CONN_FIN_OUT;
    }
    if counts.bytes_in != received {
        flags |= CONN_FIN_IN;
    }
    if let Some(live) = live {
        // SAFETY: valid map value pointer; the socket is closing under its
        // lock, no other writer runs for it.
        let live = unsafe { &mut *live };
        let mut init = fresh_meter(ctx, &now);
        let meter = if meter_ptr.is_null() {
            &mut init
        } else {
            // SAFETY: valid storage pointer, under the socket's lock.
            unsafe { &mut *meter_ptr }
        };
        let service = meter.service;
        // Dates the final rise and queues its gap record, if any, before
        // the close record. A gap record that does not fit is merged into
        // the close (counted): there is no next packet to retry at.
        fold(
            cookie,
            live,
            meter,
            &now,
            || conn_info(ctx, service, 0),
            OnRingFull::Merge,
        );
        counts.last_ns = live.last_ns;
    }
    // Untracked: the socket's storage has its start and last packet.
    let mut untracked_start = 0;
    // SAFETY: valid storage pointer, under the socket's lock.
    if live.is_none() && !meter_ptr.is_null() && unsafe { (*meter_ptr).is_untracked() } {
        // SAFETY: as above.
        let (start, last) = unsafe { (*meter_ptr).untracked_times() };
        untracked_start = start;
        counts.last_ns = last;
    }
    let info = INFO.get_ptr_mut(&cookie);

    if let Some(mut entry) = CLOSED.reserve::<Closed>(0) {
        let mut info_value = match info {
            // SAFETY: valid map value pointer.
            Some(info) => unsafe { *info },
            None => {
                let service = service_of(&TCP_PORTS, ctx_field!(ctx, local_port));
                conn_info(ctx, service.wrapping_sub(1), untracked_start)
            }
        };
        info_value.end_ns = now.ns;
        info_value.flags |= flags | if live.is_none() { CONN_UNTRACKED } else { 0 };
        entry.write(Closed {
            cookie,
            counts,
            info: info_value,
        });
        entry.submit(0);
        // The slot keeps the cookie and the final totals: the agent
        // returns it once this record is committed (it may read the final
        // totals as live until then, which they are, exactly).
        let _ = INFO.remove(&cookie);
        forget_cut(cookie);
        bump(Stat::Closed);
        return;
    }

    // Ring buffer full: leave the final totals (and the date the fold gave
    // them) in the slot, where the agent's next full read finds them.
    match (live, info) {
        (Some(live), Some(info)) => {
            // SAFETY: valid map value pointers; the socket is closing, no
            // other writer runs for it.
            unsafe {
                *live = counts;
                (*info).end_ns = now.ns;
                (*info).flags |= CONN_CLOSED | flags;
            }
            bump(Stat::RingFull);
        }
        _ => bump(Stat::Lost),
    }
    forget_cut(cookie);
}

/// Deletes a closing connection's `CUT` entry, if it has one: a closed
/// socket sends nothing more, and its cookie is never reused. Called after
/// `INFO` is updated, so the agent, which checks `INFO` after its own
/// insert, never leaves an entry behind for a connection closing meanwhile
/// (see `Kernel::cut`). Looked up first: a lookup is lock-free, a delete
/// takes the bucket lock even for an absent key.
#[inline(always)]
fn forget_cut(cookie: u64) {
    if CUT.get_ptr(&cookie).is_some() {
        let _ = CUT.remove(&cookie);
    }
}
