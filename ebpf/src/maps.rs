//! The maps shared with the agent. All are pinned by name under meterd's
//! bpffs directory, so counting goes on while the agent is stopped and a
//! restarted agent picks up the same state.
//!
//! Sizes here are defaults; the agent may override `max_entries` at load time.

use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use meterd_common::{ConnInfo, Counts, PORT_SLOTS, STAT_SLOTS, Stat, UdpFlow, UdpFlowKey};

/// Local TCP port -> service index + 1 (0: not metered). Written by the agent.
#[map]
pub static TCP_PORTS: Array<u32> = Array::pinned(PORT_SLOTS, 0);

/// Local UDP port -> service index + 1 (0: not metered). Written by the agent.
#[map]
pub static UDP_PORTS: Array<u32> = Array::pinned(PORT_SLOTS, 0);

/// Socket cookie -> live payload counts. Small values: the agent reads the
/// whole map every cycle.
#[map]
pub static LIVE: HashMap<u64, Counts> = HashMap::pinned(262_144, 0);

/// Socket cookie -> who the connection is. Read once per connection.
#[map]
pub static INFO: HashMap<u64, ConnInfo> = HashMap::pinned(262_144, 0);

/// UDP 4-tuple -> flow counts. Flows end by the agent's idle timeout.
#[map]
pub static UDP_FLOWS: HashMap<UdpFlowKey, UdpFlow> = HashMap::pinned(65_536, 0);

/// Final records of closed TCP connections (`meterd_common::Closed`).
/// 2 MiB holds ~23k records. When it is full (a stopped agent, a close
/// storm) records fall back to staying in `LIVE`, so size is slack, not
/// safety; the agent maps the buffer twice (wrap-around), which counts 2x
/// its size in the agent's RSS.
#[map]
pub static CLOSED: RingBuf = RingBuf::pinned(2 << 20, 0);

/// Per-socket state of a metered TCP connection, created by sock_ops at
/// establishment. Its presence is what tells the egress hook a socket is
/// metered (one per-socket lookup instead of a port check, a cookie and a
/// hash lookup), and it remembers when `LIVE` was last refreshed.
#[repr(C)]
pub struct SkMeter {
    /// `bpf_jiffies64()` of the last refresh of this socket's `LIVE` entry.
    pub synced_jiffies: u64,
}

/// See [`SkMeter`]. Not pinned: after an upgrade, connections opened
/// under the old programs keep exact close records but no live refresh.
#[btf_map]
pub static SK_METER: SkStorage<SkMeter> = SkStorage::new();

/// Per-CPU event counters, indexed by `meterd_common::Stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_SLOTS, 0);

/// Adds one to a `STATS` slot.
#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, a valid pointer from the map; a lost
        // increment under preemption would only skew a diagnostic counter.
        unsafe { *slot += 1 };
    }
}

/// Service index + 1 for a local port, 0 if not metered.
#[inline(always)]
pub fn service_of(ports: &Array<u32>, port: u32) -> u32 {
    ports.get(port).copied().unwrap_or(0)
}
