//! A record taken from the `CLOSED` ring buffer, held until what it says is
//! committed to the ledger.
//!
//! The kernel removes a connection's live entry when it queues the close
//! record, so the record is the only copy of its final counts. Releasing it
//! (advancing the ring's consumer position) before the ledger has them
//! would lose money on a crash or a failed write. So a [`Record`] can only
//! be released with the ledger's [`Committed`] proof; dropped any other
//! way (an error, a `?`, a panic) it stays in the ring, and the next read,
//! or the next agent after a restart, gets it again.

use aya::maps::{MapData, RingBuf, ring_buf::RingBufItem};
use meterd_common::Closed;

use crate::ledger::Committed;

/// The oldest unreleased record of the ring.
pub struct Record<'a> {
    /// `Some` until released. aya advances the consumer position when the
    /// item drops, so an unreleased item is forgotten instead.
    item: Option<RingBufItem<'a>>,
    /// The decoded record; `None` if it was too short (an object/agent
    /// mismatch, logged by the caller).
    pub closed: Option<Closed>,
    /// Its length in bytes.
    pub len: usize,
}

impl<'a> Record<'a> {
    /// The next record, if any.
    pub fn next(ring: &'a mut RingBuf<MapData>) -> Option<Self> {
        let item = ring.next()?;
        let closed = super::decode_closed(&item);
        let len = item.len();
        Some(Self {
            item: Some(item),
            closed,
            len,
        })
    }

    /// Releases the record: the ledger has what it carried.
    pub fn release(mut self, _committed: Committed) {
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
