//! The maps shared with the agent. All are pinned by name under meterd's
//! bpffs directory, so counting goes on while the agent is stopped and a
//! restarted agent picks up the same state.
//!
//! Sizes here are defaults; the agent may override `max_entries` at load time.

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use meterd_common::{
    ConnInfo, Counts, PORT_SLOTS, SERVICE_SLOTS, STAT_SLOTS, Stat, UdpFlow, UdpFlowKey,
};

/// Local TCP port -> service index + 1 (0: not metered). Written by the agent.
#[map]
pub static TCP_PORTS: Array<u32> = Array::pinned(PORT_SLOTS, 0);

/// Local UDP port -> service index + 1 (0: not metered). Written by the agent.
#[map]
pub static UDP_PORTS: Array<u32> = Array::pinned(PORT_SLOTS, 0);

/// Service index -> the service's `session_idle` in ns (0: no gap
/// detection). Written by the agent at startup; read only when a
/// connection's counts rise (TCP) or per datagram (UDP), see
/// [`crate::activity`].
#[map]
pub static SERVICE_IDLE: Array<u64> = Array::pinned(SERVICE_SLOTS, 0);

/// Socket cookie -> live payload counts and when they last rose. Small
/// values: the agent reads the whole map every cycle.
#[map]
pub static LIVE: HashMap<u64, Counts> = HashMap::pinned(262_144, 0);

/// Socket cookie -> who the connection is. Read once per connection.
#[map]
pub static INFO: HashMap<u64, ConnInfo> = HashMap::pinned(262_144, 0);

/// UDP 4-tuple -> flow counts. The agent removes flows that stayed idle.
#[map]
pub static UDP_FLOWS: HashMap<UdpFlowKey, UdpFlow> = HashMap::pinned(65_536, 0);

/// Close records of TCP connections and gap records of connections and UDP
/// flows (`meterd_common::Closed`, 96 bytes + an 8-byte ring header). 2 MiB
/// holds ~20k records. When it is full (a stopped agent, a close storm)
/// close records fall back to staying in `LIVE`, and TCP gap records are
/// retried at the connection's next packet, so size is slack, not safety;
/// the agent maps the buffer twice (wrap-around), which counts 2x its size
/// in the agent's RSS.
#[map]
pub static CLOSED: RingBuf = RingBuf::pinned(2 << 20, 0);

/// Per-socket state of a metered TCP connection, created by sock_ops at
/// establishment. Its presence is what tells the egress hook a socket is
/// metered (one per-socket lookup instead of a port check, a cookie and a
/// hash lookup), and it remembers when `LIVE` was last brought up to date,
/// which is what dates a rise of the counts (see [`crate::activity`]).
#[repr(C)]
pub struct SkMeter {
    /// `bpf_jiffies64()` of the last fold of the socket's counters into
    /// `LIVE` (egress slow path or sock_ops state change). The egress fast
    /// path compares only this.
    pub synced_jiffies: u64,
    /// `bpf_ktime_get_boot_ns()` of that same fold: a rise first seen after
    /// a quiet period is dated from it.
    pub synced_ns: u64,
    /// Index of the service (port-map value - 1), for `SERVICE_IDLE`.
    pub service: u32,
    /// Explicit padding.
    pub pad: u32,
}

impl SkMeter {
    /// Records a fold at `now`.
    #[inline(always)]
    pub fn sync(&mut self, now_jiffies: u64, now_ns: u64) {
        self.synced_jiffies = now_jiffies;
        self.synced_ns = now_ns;
    }
}

/// See [`SkMeter`]. Pinned like the other maps, so connections opened under
/// an older build of the programs keep their live refresh after an
/// upgrade. A pinned map is reused only if its value size matches, so a
/// change of [`SkMeter`]'s layout needs a full `meterd unload` (as a change
/// of `LIVE`'s does).
#[btf_map(pin_by_name)]
pub static SK_METER: SkStorage<SkMeter> = SkStorage::new();

/// The socket's [`SkMeter`], or NULL. With `init`, creates it from `init`
/// if the socket has none (an existing one is returned unchanged).
#[inline(always)]
pub fn sk_meter(sk: *mut core::ffi::c_void, init: Option<&mut SkMeter>) -> *mut SkMeter {
    let (value, flags) = match init {
        Some(init) => (
            core::ptr::from_mut(init).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: helper on a full socket pointer from the context (callers
    // check it); the map pointer is the BTF map definition's own address.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SK_METER).cast_mut().cast(),
            sk,
            value,
            flags,
        )
    }
    .cast::<SkMeter>()
}

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

/// The `session_idle` of a service in ns, 0 (no gap detection) for an
/// unknown index.
#[inline(always)]
pub fn session_idle(service: u32) -> u64 {
    SERVICE_IDLE.get(service).copied().unwrap_or(0)
}

/// Service index + 1 for a local port, 0 if not metered.
#[inline(always)]
pub fn service_of(ports: &Array<u32>, port: u32) -> u32 {
    ports.get(port).copied().unwrap_or(0)
}
