//! A record taken from the `CLOSED` ring buffer, held until what it says is
//! committed to the ledger.
//!
//! The kernel removes a connection's `INFO` entry when it queues the close
//! record, so the record is the only copy of who it was and of its final
//! counts. Releasing it (advancing the ring's consumer position) before the
//! ledger has them would lose money on a crash or a failed write. So a
//! [`Record`] can only be released with the ledger's [`Committed`] proof;
//! dropped any other way (an error, a `?`, a panic) it stays in the ring,
//! and the next read, or the next agent after a restart, gets it again.
//!
//! Releasing a close record also returns the connection's `LIVE` slot to
//! the free-slot queue (before the consumer moves on, so a crash between
//! the two finds the record again, and [`Slots::release`] pushes a slot
//! once however often its record comes): no caller can free the record and
//! forget the slot, or free the slot of an uncommitted close.

use std::os::fd::{AsRawFd, RawFd};

use aya::maps::{MapData, RingBuf, ring_buf::RingBufItem};
use meterd_common::{CONN_GAP, Closed};

use super::slots::Slots;
use crate::ledger::Committed;

/// The ring of close and gap records, with the slots its close records
/// give back. Taken from the kernel once, by the drain
/// ([`super::Kernel::take_closed`]).
pub struct Closes {
    ring: RingBuf<MapData>,
    slots: std::sync::Arc<Slots>,
}

impl Closes {
    pub(super) fn new(ring: RingBuf<MapData>, slots: std::sync::Arc<Slots>) -> Self {
        Self { ring, slots }
    }
}

impl AsRawFd for Closes {
    /// The ring's fd: readable when records are queued.
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// The oldest unreleased record of the ring.
pub struct Record<'a> {
    /// `Some` until released. aya advances the consumer position when the
    /// item drops, so an unreleased item is forgotten instead.
    item: Option<RingBufItem<'a>>,
    slots: &'a Slots,
    /// The decoded record; `None` if it was too short (an object/agent
    /// mismatch, logged by the caller).
    pub closed: Option<Closed>,
    /// Its length in bytes.
    pub len: usize,
}

impl<'a> Record<'a> {
    /// The next record, if any.
    pub fn next(source: &'a mut Closes) -> Option<Self> {
        let Closes { ring, slots } = source;
        let item = ring.next()?;
        let closed = super::decode_closed(&item);
        let len = item.len();
        Some(Self {
            item: Some(item),
            slots,
            closed,
            len,
        })
    }

    /// Releases the record: the ledger has what it carried. A close
    /// record's slot goes back to the free-slot queue first.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the proof is spent: one commit releases one record"
    )]
    pub fn release(mut self, committed: Committed) {
        if let Some(c) = &self.closed
            && c.info.flags & CONN_GAP == 0
            && let Err(e) = self.slots.release(c.info.slot, c.cookie, &committed)
        {
            // The slot is lost until `meterd unload`; the record is
            // committed and goes all the same.
            tracing::error!(
                cookie = c.cookie,
                slot = c.info.slot,
                error = %e,
                "cannot return a closed connection's slot to FREE_SLOTS: one live slot fewer"
            );
            self.slots.leaked();
        }
        drop(self.item.take());
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            // Not committed: leave it in the ring (see the module doc).
            std::mem::forget(item);
        }
    }
}
