//! When the ledger has to see a change: the one rule for which open
//! sessions and segments a batch carries.
//!
//! A change is either structural ([`Save::Now`]: a segment joined or left
//! a session, a session's ended bytes moved, a new segment) and goes into
//! the next batch, or only a newer cumulative value ([`Save::Lazy`]: a
//! cycle's accrual, a live connection's counts) and may wait up to
//! `billing.open_write_interval`. Waiting is safe because every such value
//! is cumulative and recomputed from the kernel's counts, which outlive
//! the agent: after a restart the first cycle charges what the ledger's
//! older accrual lacks, nothing twice and nothing lost. A session's row is
//! always written with its live segments' rows, so the ledger never holds
//! a session newer than the segments that fed it.

/// What the ledger lacks of a session or segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Save {
    /// The ledger has it as it is.
    #[default]
    Clean,
    /// Newer cumulative values, due at the write interval.
    Lazy,
    /// A structural change, due in the next batch.
    Now,
}

impl Save {
    /// Raises what is owed to at least `to`; true if it became `Now` by it.
    pub fn raise(&mut self, to: Save) -> bool {
        let was = *self;
        *self = was.max(to);
        was != Save::Now && *self == Save::Now
    }
}

/// How often lazily changed rows are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// `billing.open_write_interval`, ns; 0 writes every change at the
    /// next batch.
    pub every_ns: u64,
}

impl Policy {
    /// Whether a row owing `save`, last written at `saved_ns`, goes into a
    /// batch staged at `now_ns`.
    pub fn due(self, save: Save, saved_ns: u64, now_ns: u64) -> bool {
        match save {
            Save::Clean => false,
            Save::Now => true,
            Save::Lazy => now_ns >= saved_ns.saturating_add(self.every_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_waits_for_the_interval_now_does_not() {
        let p = Policy {
            every_ns: 10_000_000_000,
        };
        assert!(!p.due(Save::Clean, 0, u64::MAX));
        assert!(p.due(Save::Now, 5, 5));
        assert!(!p.due(Save::Lazy, 1_000, 1_000 + 9_999_999_999));
        assert!(p.due(Save::Lazy, 1_000, 1_000 + 10_000_000_000));
        assert!(Policy::default().due(Save::Lazy, 7, 7));
        let mut s = Save::Lazy;
        assert!(s.raise(Save::Now));
        assert!(!s.raise(Save::Lazy));
        assert_eq!(s, Save::Now);
        assert!(!s.raise(Save::Now));
    }
}
