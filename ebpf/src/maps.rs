//! The maps shared with the agent. All are pinned by name under meterd's
//! bpffs directory, so counting goes on while the agent is stopped and a
//! restarted agent picks up the same state.
//!
//! Sizes here are defaults; the agent may override `max_entries` at load time.

use core::{
    intrinsics::{AtomicOrdering, atomic_xchg},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, Queue, RingBuf},
};
use meterd_common::{
    CUT_SLOTS, CUT_STAT_SLOTS, ConnInfo, Counts, CutStat, LiveSlot, NO_SLOT, PORT_SLOTS,
    SERVICE_SLOTS, STAT_SLOTS, Stat, UDP_STAT_SLOTS, UdpFlow, UdpFlowKey, UdpStat,
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

/// Slot -> the cookie of the connection holding it and its live payload
/// counts. Memory-mapped (`BPF_F_MMAPABLE`, kernel 5.5): the agent reads
/// the whole array from memory every cycle, without a syscall. A
/// connection takes a slot from [`FREE_SLOTS`] at establishment and keeps
/// its index in its [`SkMeter`] and `INFO` entry; only the agent returns it
/// (after the close is committed). See [`take_slot`] and [`live_slot`].
#[map]
pub static LIVE: Array<LiveSlot> = Array::pinned(262_144, BPF_F_MMAPABLE);

/// The free slots of [`LIVE`], filled by the agent when the maps are
/// created. Empty: a new connection is untracked ([`METER_UNTRACKED`]),
/// billed exactly at its close, as with a full map before.
#[map]
pub static FREE_SLOTS: Queue<u32> = Queue::pinned(262_144, 0);

/// Socket cookie -> who the connection is, and its [`LIVE`] slot. Read
/// once per connection.
#[map]
pub static INFO: HashMap<u64, ConnInfo> = HashMap::pinned(262_144, 0);

/// UDP 4-tuple -> flow counts, for flows the server has sent to. The agent
/// removes flows that stayed idle.
#[map]
pub static UDP_FLOWS: HashMap<UdpFlowKey, UdpFlow> = HashMap::pinned(65_536, 0);

/// UDP 4-tuple -> counts of a flow only the client has spoken in so far
/// (its ingress bytes, first and last datagram). An LRU map: a flood of
/// spoofed sources, which the server never answers, evicts its own entries
/// and never a flow of `UDP_FLOWS`. See [`crate::udp`].
#[map]
pub static UDP_PROBATION: LruHashMap<UdpFlowKey, UdpFlow> = LruHashMap::pinned(16_384, 0);

/// Per-CPU counters of UDP probation, indexed by `meterd_common::UdpStat`.
#[map]
pub static UDP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(UDP_STAT_SLOTS, 0);

/// Adds one to a `UDP_STATS` slot.
#[inline(always)]
pub fn bump_udp(stat: UdpStat) {
    if let Some(slot) = UDP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, as in `bump`.
        unsafe { *slot += 1 };
    }
}

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
    /// `METER_*` bits. Was explicit padding (always 0) before the cut-off,
    /// so storage made by an older build reads as "no flags".
    pub flags: u32,
    /// The connection's slot in [`LIVE`], [`NO_SLOT`] if it has none
    /// (untracked). Looked up only on the slow path, and checked against
    /// the slot's cookie ([`live_slot`]).
    pub slot: u32,
    /// Explicit padding, always zero.
    pub pad: u32,
}

/// [`SkMeter::flags`]: the connection is in [`CUT`]; the egress hook drops
/// its packets (but its RSTs). Copied from `CUT` by every egress slow path
/// and sock_ops state change, so it follows the agent's writes within one
/// refresh period ([`crate::activity::REFRESH_JIFFIES`]) of a busy socket,
/// and at the first packet of a quiet one.
pub const METER_CUT: u32 = 1 << 0;

/// [`SkMeter::flags`]: the connection is metered but has no `LIVE` slot
/// (`INFO` was full or [`FREE_SLOTS`] empty when it opened). Its storage then keeps what the
/// close record needs to date it: `synced_ns` is its establishment, never
/// refreshed, and `service` the milliseconds from then to the last packet
/// the egress hook saw it send while established (at most one refresh
/// period early, as for any connection). `synced_jiffies` still paces the
/// fast path.
pub const METER_UNTRACKED: u32 = 1 << 1;

impl SkMeter {
    /// Records a fold at `now`.
    #[inline(always)]
    pub fn sync(&mut self, now_jiffies: u64, now_ns: u64) {
        self.synced_jiffies = now_jiffies;
        self.synced_ns = now_ns;
    }

    /// Copies the connection's `CUT` entry (present or not) into
    /// [`METER_CUT`]: the only `CUT` lookup, made where the per-socket
    /// state is refreshed anyway, never per packet.
    #[inline(always)]
    pub fn refresh_cut(&mut self, cookie: u64) {
        if CUT.get_ptr(&cookie).is_some() {
            self.flags |= METER_CUT;
        } else {
            self.flags &= !METER_CUT;
        }
    }

    /// Whether the connection's packets are dropped.
    #[inline(always)]
    pub fn is_cut(&self) -> bool {
        self.flags & METER_CUT != 0
    }

    /// Whether the connection has no `LIVE` slot (see [`METER_UNTRACKED`]).
    #[inline(always)]
    pub fn is_untracked(&self) -> bool {
        self.flags & METER_UNTRACKED != 0
    }

    /// An untracked connection sent a packet at `now_ns` (established):
    /// its last payload is dated there.
    #[inline(always)]
    pub fn untracked_sent(&mut self, now_ns: u64) {
        let ms = now_ns.saturating_sub(self.synced_ns) / 1_000_000;
        self.service = if ms > u64::from(u32::MAX) {
            u32::MAX
        } else {
            ms as u32
        };
    }

    /// An untracked connection's establishment and last payload, boot ns.
    #[inline(always)]
    pub fn untracked_times(&self) -> (u64, u64) {
        (
            self.synced_ns,
            self.synced_ns + u64::from(self.service) * 1_000_000,
        )
    }
}

/// See [`SkMeter`]. Pinned like the other maps, so connections opened under
/// an older build of the programs keep their live refresh after an
/// upgrade. A pinned map is reused only if its value size matches, so a
/// change of [`SkMeter`]'s layout needs a full `meterd unload` (as a change
/// of `LIVE`'s does); the agent's load error says so.
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
    // SAFETY: helper on a non-NULL socket pointer from the context (callers
    // check it; a sock_common is allowed, and the helper returns NULL for
    // one that is not a full socket); the map pointer is the BTF map
    // definition's own address.
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

/// Takes a free slot of [`LIVE`] for `cookie`: zeroes its counts, then
/// publishes the cookie with an atomic exchange (a full barrier), so a
/// reader that sees the cookie sees zeroed or newer counts. `NO_SLOT` if
/// the queue is empty (or its lock was contended). The caller writes the
/// slot into `INFO` before the agent can need it: `publish` is separate.
#[inline(always)]
pub fn take_slot() -> u32 {
    match FREE_SLOTS.pop() {
        Ok(Some(slot)) if LIVE.get_ptr_mut(slot).is_some() => slot,
        // A slot out of range cannot come from the agent's fill; dropped
        // rather than returned, as it could never be used.
        _ => NO_SLOT,
    }
}

/// Zeroes a taken slot's counts and publishes `cookie` in it (after the
/// connection's `INFO` entry exists, so the agent finds it).
#[inline(always)]
pub fn publish_slot(slot: u32, cookie: u64) {
    if let Some(entry) = LIVE.get_ptr_mut(slot) {
        // SAFETY: valid map value pointer; a free slot has no other writer
        // (the agent writes only the cookie of a slot it is returning).
        unsafe {
            write_volatile(&raw mut (*entry).counts.bytes_out, 0);
            write_volatile(&raw mut (*entry).counts.bytes_in, 0);
            write_volatile(&raw mut (*entry).counts.last_ns, 0);
            atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*entry).cookie, cookie);
        }
    }
}

/// Gives back a slot taken for a connection that could not be registered
/// (its `INFO` insert failed); its cookie was never published.
#[inline(always)]
pub fn untake_slot(slot: u32) {
    if slot != NO_SLOT {
        let _ = FREE_SLOTS.push(&slot, 0);
    }
}

/// The counts in `slot`, if it holds `cookie`'s connection: NULL for
/// [`NO_SLOT`], an index out of range or a slot held by another cookie.
#[inline(always)]
pub fn live_slot(slot: u32, cookie: u64) -> Option<*mut Counts> {
    let entry = LIVE.get_ptr_mut(slot)?;
    // SAFETY: valid map value pointer.
    if unsafe { read_volatile(&raw const (*entry).cookie) } != cookie {
        return None;
    }
    // SAFETY: as above.
    Some(unsafe { &raw mut (*entry).counts })
}

/// Socket cookie -> [`meterd_common::CUT_MARK`]: TCP connections of
/// accounts that ran out. The agent inserts; sock_ops deletes a
/// connection's entry at its close (cookies are never reused, so a stale
/// entry would only take room). Looked up only where [`SkMeter`] is
/// refreshed ([`SkMeter::refresh_cut`]).
#[map]
pub static CUT: HashMap<u64, u32> = HashMap::pinned(CUT_SLOTS, 0);

/// UDP 4-tuple -> [`meterd_common::CUT_MARK`]: UDP flows of accounts that
/// ran out, written and deleted by the agent. Looked up when a flow is
/// created and at most once per [`meterd_common::FLOW_CUT_CHECK_SHIFT`]
/// period per flow (see [`crate::udp`]).
#[map]
pub static CUT_FLOWS: HashMap<UdpFlowKey, u32> = HashMap::pinned(CUT_SLOTS, 0);

/// Per-CPU counters of the cut-off, indexed by `meterd_common::CutStat`.
#[map]
pub static CUT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(CUT_STAT_SLOTS, 0);

/// Adds one to a `CUT_STATS` slot (only cut traffic pays it).
#[inline(always)]
pub fn bump_cut(stat: CutStat) {
    if let Some(slot) = CUT_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, as in `bump`.
        unsafe { *slot += 1 };
    }
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
