//! meterd's kernel side: counts payload bytes of the metered services'
//! connections and hands every closed connection's final count to the agent.
//!
//! One hook per file:
//! - [`sockops`]: registers accepted TCP connections on metered ports and, at
//!   close, emits their exact totals to the `CLOSED` ring buffer.
//! - [`egress`]: refreshes live TCP counts from the kernel's own per-socket
//!   counters, and counts outgoing UDP datagrams of metered flows.
//! - [`ingress`]: counts incoming UDP datagrams (attached only when UDP ports
//!   are metered: for TCP it would cost a run per received ACK for nothing).
//!
//! Not hooks: [`activity`] dates each rise of a TCP connection's counts and
//! queues a gap record (into the same ring) when a connection or UDP flow
//! moves payload again after its service's `session_idle`; [`udp`] counts
//! UDP flows for both cgroup_skb hooks. The maps are in [`maps`]; their
//! layouts live in `meterd-common`.
//!
//! Cut-off: the agent puts the connections and flows of an account that ran
//! out into `CUT`/`CUT_FLOWS`; [`egress`] drops their packets (and
//! [`ingress`] a cut UDP flow's datagrams) with no map lookup per packet,
//! see [`egress`] and [`udp`]. The agent destroys the TCP sockets too
//! (sock_diag `SOCK_DESTROY`); sock_ops deletes a closed connection's `CUT`
//! entry.
//!
//! Minimum kernel version: 5.12 (`BPF_CMPXCHG` in [`udp`]); Debian 12's
//! 6.1 is the oldest kernel meterd is tested on.
#![no_std]
#![no_main]
// `atomic_xadd`, `atomic_cxchg`: the bpf target has no atomic
// read-modify-write methods.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd and atomic_cxchg, see udp.rs")]

/// cgroup_skb verdict: let the packet through. meterd observes; it filters
/// only what the agent cut off.
const PASS: i32 = 1;
/// cgroup_skb verdict: drop the packet (a cut connection or flow). The
/// sender sees `EPERM`; TCP keeps the segment queued and retries it.
const DROP: i32 = 0;

mod activity;
mod egress;
mod ingress;
mod maps;
mod sockops;
mod udp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
