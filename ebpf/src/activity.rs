//! When payload last moved, and the gaps in between: the one place that
//! writes an open TCP connection's `LIVE` slot, and the writer of gap
//! records for TCP and UDP.
//!
//! Owns: folding a fresh reading of a TCP socket's payload counters into
//! `LIVE` ([`fold`], called by the egress slow path and by every sock_ops
//! state change, including the close), dating each rise of the counts, and
//! queueing a gap record ([`queue_gap`]) when a connection or UDP flow moves
//! payload again after at least its service's `session_idle`. Does not own:
//! reading the counters and taking FINs out of them (the hooks and
//! `meterd_common::tcp`), or what a gap means for billing (the agent splits
//! viewing sessions at gap records, by the counts in them).
//!
//! # Dating a rise
//!
//! The kernel looks at a socket's counters only at a fold: an egress packet
//! more than [`REFRESH_JIFFIES`] after the last fold (the fast path skips
//! the others), or a state change. A rise is dated at the fold that sees
//! it, except after a *quiet* period, when the last fold is more than
//! [`REFRESH_JIFFIES`] old. Since only packets within that window of a fold
//! are skipped, a quiet period means that no egress packet at all left the
//! socket in it, so:
//! - bytes acknowledged now were sent before the quiet period began: they
//!   are the tail of the previous activity, dated at the last fold plus
//!   [`REFRESH_NS`] (or now, if earlier). Dated now, a keep-alive
//!   connection whose viewer paused would look active until its next
//!   packet or its close, and the pause would be missed;
//! - bytes received now, when nothing acknowledged rose with them, were
//!   sent by the client during the quiet period, and the server's ACK or
//!   response (this packet) is the first sign of them: dated now;
//! - bytes received that rose together with acknowledged ones are part of
//!   the tail too: the client's request came before the response whose
//!   ACKs are only folded now (a response sent within the refresh period
//!   of the previous fold, then an idle keep-alive connection until the
//!   client's FIN).
//!
//! So when the client's next request after a pause comes while the
//! previous response's last ACKs are not folded yet, this fold dates both
//! as the tail, and the gap is found at the next fold (the new response's
//! ACKs, within the refresh period): its start is then up to ~100 ms late,
//! and the new request's `bytes_in` is counted before the gap. Egress
//! bytes are exact on both sides.
//!
//! # Gaps
//!
//! A rise dated `t` with `t >= last_ns + session_idle` (`last_ns` being
//! `LIVE`'s date of the previous rise) queues a gap record first: `LIVE`'s
//! values before the rise, `end_ns = t`, [`CONN_GAP`]. Only then is `LIVE`
//! written, so a reader that sees counts from after a gap finds the gap's
//! record in the ring (`bpf_ringbuf_submit` is a full barrier: the kernel's
//! `xchg` on the record header).
//!
//! If the ring is full (counted in `Stat::GapRingFull`), a fold from a
//! packet or a state change leaves `LIVE` as it was before that rise, so a
//! gap is never merged silently, but it does record the fold's time in the
//! socket's [`SkMeter`]. That throttles the retries to the egress refresh
//! rate, and it is what makes the retry find the gap again: every rise the
//! retry sees is dated at or after the failed fold (a tail from the failed
//! fold's time, anything else now), and the failed rise's date already
//! ended the gap. Left at its old value, the sync time would let the retry
//! date the resumed activity's first ACKs as the tail of the old one,
//! which ends no gap, and the gap would be merged. The retry's gap record
//! has the exact counts at the gap's start; its `end_ns` is the retry's
//! date, late by how long the ring stayed full. At close there is no next
//! packet: the gap is merged into the close record, which must carry the
//! exact totals, and counted.

use core::ptr::write_volatile;

use aya_ebpf::helpers::{bpf_ktime_get_boot_ns, generated::bpf_jiffies64};
use meterd_common::{CONN_GAP, Closed, ConnInfo, Counts, NO_SLOT, Stat};

use crate::maps::{CLOSED, INFO, SkMeter, bump, session_idle};

/// The kernel tick rate [`REFRESH_NS`] assumes: Debian's `CONFIG_HZ`.
const HZ: u64 = 250;

/// Jiffies between two folds of an established connection on the egress
/// path: 100 ms at HZ=250. A streaming server sends tens of thousands of
/// GSO packets per second per busy connection; folding on each would make
/// the hash lookup the data path's main cost, while the billing cycle reads
/// at most once per interval. State changes fold at once, and the close
/// record is exact whatever the refresh rate.
pub const REFRESH_JIFFIES: u64 = 25;

/// [`REFRESH_JIFFIES`] in ns at [`HZ`]: how long after a fold the last
/// skipped egress packet can have been sent, which dates a tail. On a
/// kernel with another HZ a tail is dated off by the difference (HZ=1000:
/// up to 75 ms late; HZ=100: up to 150 ms early), well within the refresh
/// accuracy the agent allows for.
pub const REFRESH_NS: u64 = REFRESH_JIFFIES * (1_000_000_000 / HZ);

/// A fresh reading of a TCP socket's payload counters, FIN already taken
/// out (`meterd_common::tcp`), and when it was taken.
pub struct Reading {
    /// Payload acknowledged by the client.
    pub bytes_out: u64,
    /// Payload received from the client; the current `LIVE` value when the
    /// state cannot tell (it then does not rise).
    pub bytes_in: u64,
    /// `bpf_jiffies64()`: compared with [`SkMeter::synced_jiffies`].
    pub jiffies: u64,
    /// `bpf_ktime_get_boot_ns()`: what rises are dated with.
    pub ns: u64,
}

impl Reading {
    /// A reading at `jiffies` (already read by the caller), now in ns.
    #[inline(always)]
    pub fn at(jiffies: u64, bytes_out: u64, bytes_in: u64) -> Self {
        Self {
            bytes_out,
            bytes_in,
            jiffies,
            // SAFETY: helper without arguments.
            ns: unsafe { bpf_ktime_get_boot_ns() },
        }
    }

    /// Reads the clocks; the counters are the caller's.
    #[inline(always)]
    pub fn now(bytes_out: u64, bytes_in: u64) -> Self {
        // SAFETY: helpers without arguments.
        let (jiffies, ns) = unsafe { (bpf_jiffies64(), bpf_ktime_get_boot_ns()) };
        Self {
            bytes_out,
            bytes_in,
            jiffies,
            ns,
        }
    }
}

/// What a fold does when a gap record does not fit the ring.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnRingFull {
    /// Leave `LIVE` as it was before the rise: a later fold finds the gap
    /// again (see the module docs).
    Retry,
    /// Fold anyway (the close: there is no later fold).
    Merge,
}

/// Folds `reading` into the connection's `LIVE` entry `live`, dating the
/// rise and queueing a gap record first if the rise ends a gap (see the
/// module docs), and records the fold in `meter`. `info` builds the
/// connection's identity when `INFO` has no entry for `cookie`.
#[inline(always)]
pub fn fold(
    cookie: u64,
    live: &mut Counts,
    meter: &mut SkMeter,
    reading: &Reading,
    info: impl Fn() -> ConnInfo,
    on_full: OnRingFull,
) {
    let out_rose = reading.bytes_out > live.bytes_out;
    let in_rose = reading.bytes_in > live.bytes_in;
    if out_rose || in_rose {
        let gaps = Gaps {
            cookie,
            idle: session_idle(meter.service),
            info,
            on_full,
        };
        let quiet = reading.jiffies.wrapping_sub(meter.synced_jiffies) > REFRESH_JIFFIES;
        // After a quiet period, acknowledged bytes are the tail of the
        // activity before it, and so are received bytes that rose with
        // them: the request came before the response being acknowledged.
        // Dating those at now billed an idle tail as watching time and, at
        // a close after more than session_idle, made a session of the
        // request alone.
        let at = if quiet && out_rose {
            meter.synced_ns.saturating_add(REFRESH_NS).min(reading.ns)
        } else {
            reading.ns
        };
        gaps.rise(live, reading.bytes_out, reading.bytes_in, at);
    }
    meter.sync(reading.jiffies, reading.ns);
}

/// What a rise needs to know to end a gap.
struct Gaps<F> {
    cookie: u64,
    /// The service's `session_idle` in ns, 0: no gap detection.
    idle: u64,
    info: F,
    on_full: OnRingFull,
}

impl<F: Fn() -> ConnInfo> Gaps<F> {
    /// Raises `live` to `bytes_out`/`bytes_in` dated `at`, after queueing
    /// a gap record if `at` ends a gap. False, with `live` untouched, if
    /// that record did not fit and the policy is [`OnRingFull::Retry`].
    #[inline(always)]
    fn rise(&self, live: &mut Counts, bytes_out: u64, bytes_in: u64, at: u64) -> bool {
        if self.idle != 0 && live.last_ns != 0 && at >= live.last_ns.saturating_add(self.idle) {
            let info = match INFO.get_ptr(&self.cookie) {
                // SAFETY: valid map value pointer.
                Some(info) => unsafe { *info },
                None => (self.info)(),
            };
            if !queue_gap(self.cookie, *live, info, at) && self.on_full == OnRingFull::Retry {
                return false;
            }
        }
        // The date first: a concurrent reader (the agent reads the mapped
        // slot in field order, `last_ns` last) that sees new counts then
        // also sees their date, on x86. Volatile keeps the compiler to that
        // order. Writers only ever raise the values, so a racing older
        // reading cannot move them backwards.
        // SAFETY: plain stores to a valid map value.
        unsafe {
            if at > live.last_ns {
                write_volatile(&raw mut live.last_ns, at);
            }
            if bytes_out > live.bytes_out {
                write_volatile(&raw mut live.bytes_out, bytes_out);
            }
            if bytes_in > live.bytes_in {
                write_volatile(&raw mut live.bytes_in, bytes_in);
            }
        }
        true
    }
}

/// Queues a gap record: `counts` at the gap's start (`counts.last_ns` is
/// the last payload before it), `info` with `end_ns = resumed_ns` (when
/// payload moved again) and [`CONN_GAP`]. False if the ring is full
/// (counted in `Stat::GapRingFull`).
#[inline(always)]
pub fn queue_gap(cookie: u64, counts: Counts, mut info: ConnInfo, resumed_ns: u64) -> bool {
    let Some(mut entry) = CLOSED.reserve::<Closed>(0) else {
        bump(Stat::GapRingFull);
        return false;
    };
    info.end_ns = resumed_ns;
    info.flags |= CONN_GAP;
    // A gap returns no slot: the connection keeps it.
    info.slot = NO_SLOT;
    entry.write(Closed {
        cookie,
        counts,
        info,
    });
    entry.submit(0);
    bump(Stat::Gaps);
    true
}
