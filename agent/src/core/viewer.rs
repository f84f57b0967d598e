//! Viewing sessions: what meterd bills (the patent's provision of a
//! service to a user, from its billing request to its settlement).
//!
//! A viewing session is keyed by its service and who watches: the
//! attributed account and content, or, unattributed, the client address.
//! It gathers the segments of any number of connections, one after another
//! or at once, and ends when none of them moved a payload byte for the
//! service's `session_idle`. Its tariff is the one in force when it
//! started, kept with it (a changed config prices new sessions only).
//!
//! Owns a session's totals, times and accrual; the arithmetic of money
//! is `billing`'s.

use std::{net::IpAddr, sync::Arc};

use super::{ServiceDef, conn::ConnKey};
use crate::billing::Accrual;

/// Who a viewing session is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Who {
    /// Unattributed traffic: billed to the client address.
    Client(IpAddr),
    /// Attributed by the streaming server.
    Account { account: String, content: String },
}

/// What makes two segments the same viewing session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ViewerKey {
    pub service: Arc<str>,
    pub who: Who,
}

/// An open viewing session.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// `v<id of the segment that opened it>`: deterministic, so the same
    /// traffic gets the same id after a restart.
    pub id: Arc<str>,
    pub key: ViewerKey,
    /// Service and tariff as they were when the session started.
    pub service: Arc<ServiceDef>,
    /// The client address of its first connection.
    pub client_addr: IpAddr,
    /// Boot ns of its first payload.
    pub first_ns: u64,
    /// Boot ns of its latest payload.
    pub last_ns: u64,
    /// Bytes of its segments that have ended (out, in).
    pub done: (u64, u64),
    /// Bytes of its live segments (out, in), kept as their counts rise
    /// (see `Core::raise`): its totals are `done` plus these, without a
    /// lookup per connection.
    pub live: (u64, u64),
    /// Connections whose current segment feeds it.
    pub open: Vec<ConnKey>,
    /// Segments it has had.
    pub connections: u32,
    /// What the billing cycles have charged it.
    pub accrual: Accrual,
    /// The wall-clock ms of its start, once the ledger has it (kept from
    /// the first write, so a settlement after a reboot still has it).
    pub started_ms: Option<i64>,
    /// What the ledger lacks of it (see [`super::save`]).
    pub save: super::Save,
    /// Kernel time its row was last written: a newer accrual waits until
    /// `billing.open_write_interval` after it.
    pub saved_ns: u64,
}

impl Viewer {
    /// A session with nothing done, charged or written yet.
    pub fn new(
        id: Arc<str>,
        key: ViewerKey,
        service: Arc<ServiceDef>,
        client_addr: IpAddr,
        first_ns: u64,
        last_ns: u64,
    ) -> Self {
        Self {
            id,
            key,
            service,
            client_addr,
            first_ns,
            last_ns,
            done: (0, 0),
            live: (0, 0),
            open: Vec::new(),
            connections: 0,
            accrual: Accrual::default(),
            started_ms: None,
            save: super::Save::Clean,
            saved_ns: 0,
        }
    }

    /// The account billed: the attributed one, or the client address.
    pub fn account(&self) -> String {
        match &self.key.who {
            Who::Client(ip) => ip.to_string(),
            Who::Account { account, .. } => account.clone(),
        }
    }

    /// The content, if attributed.
    pub fn content(&self) -> &str {
        match &self.key.who {
            Who::Client(_) => "",
            Who::Account { content, .. } => content,
        }
    }

    /// Watching time so far: first payload to last; gaps shorter than
    /// `session_idle` count, idle tails never do.
    pub fn duration_ns(&self) -> u64 {
        self.last_ns.saturating_sub(self.first_ns)
    }

    /// The tariff's quantity for totals `bytes` (out, in).
    pub fn quantity(&self, bytes: (u64, u64)) -> u64 {
        self.service
            .tariff
            .quantity(bytes.0, bytes.1, self.duration_ns())
    }

    /// Whether a segment starting at `start_ns` still belongs to this
    /// session: it starts before the session has been idle for
    /// `session_idle`.
    pub fn admits(&self, start_ns: u64) -> bool {
        start_ns < self.last_ns.saturating_add(self.service.idle_ns)
    }

    /// Whether the session has ended by `now_ns` and can be settled: idle
    /// for `session_idle`, and no connection of it is still open in a
    /// segment whose final counts the kernel has not given yet.
    pub fn ended(&self, now_ns: u64) -> bool {
        self.open.is_empty() && now_ns >= self.last_ns.saturating_add(self.service.idle_ns)
    }
}

/// Where a segment's session is: its slot in [`Sessions`] and its id.
/// A connection reaches its session through the slot, with no hashing;
/// the id is checked by pointer on every use, so a slot reused by another
/// session is never taken for the old one (the id is looked up instead).
#[derive(Debug, Clone)]
pub struct SessionRef {
    slot: u32,
    id: Arc<str>,
}

impl SessionRef {
    /// The session's id.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }
}

impl PartialEq for SessionRef {
    /// The same session: the slot is only where it was found.
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for SessionRef {}

/// Open viewing sessions: a slab of slots with an index by id. Every
/// streaming connection's counts rise every cycle, and each rise goes to
/// its session: through [`SessionRef`] that is an index, not a hash of the
/// id and a compare of its 40 bytes (the largest share of a cycle at 10k
/// streaming sessions before).
#[derive(Debug, Default)]
pub struct Sessions {
    slots: Vec<Option<Viewer>>,
    free: Vec<u32>,
    by_id: std::collections::HashMap<Arc<str>, u32, IdTail>,
}

impl Sessions {
    /// Adds a session (replacing one with the same id) and says where it is.
    pub fn insert(&mut self, v: Viewer) -> SessionRef {
        let id = Arc::clone(&v.id);
        let slot = if let Some(&slot) = self.by_id.get(&id) {
            slot
        } else {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slots.push(None);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 open sessions")
            });
            self.by_id.insert(Arc::clone(&id), slot);
            slot
        };
        self.slots[slot as usize] = Some(v);
        SessionRef { slot, id }
    }

    /// Where session `id` is, if open.
    pub fn find(&self, id: &str) -> Option<SessionRef> {
        let slot = *self.by_id.get(id)?;
        let v = self.slots[slot as usize].as_ref()?;
        Some(SessionRef {
            slot,
            id: Arc::clone(&v.id),
        })
    }

    /// Session `id`, if open.
    pub fn get(&self, id: &str) -> Option<&Viewer> {
        self.slots[*self.by_id.get(id)? as usize].as_ref()
    }

    /// Session `id`, if open.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Viewer> {
        self.slots[*self.by_id.get(id)? as usize].as_mut()
    }

    /// The session `r` refers to, if still open: by its slot when that
    /// still holds it, else by its id.
    pub fn at_mut(&mut self, r: &SessionRef) -> Option<&mut Viewer> {
        let here = self
            .slots
            .get(r.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|v| Arc::ptr_eq(&v.id, &r.id));
        if here {
            self.slots[r.slot as usize].as_mut()
        } else {
            self.get_mut(&r.id)
        }
    }

    /// Takes session `id` out; its slot is reused.
    pub fn remove(&mut self, id: &str) -> Option<Viewer> {
        let slot = self.by_id.remove(id)?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }

    /// Open sessions.
    pub fn values(&self) -> impl Iterator<Item = &Viewer> {
        self.slots.iter().flatten()
    }

    /// Open sessions.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Viewer> {
        self.slots.iter_mut().flatten()
    }
}

/// Hashes a session id by its last 16 bytes and its length only. Ids are
/// `v<boot id>-<socket cookie>[/<n>]` (or a UDP flow's time and port in
/// place of the cookie): the 33-byte boot prefix is the same for every
/// session of a boot, and the tail is what tells them apart. Hashing only
/// that makes the per-cycle lookups of every streaming session's id about
/// half as costly; equality still compares whole ids, so sessions of an
/// older boot with the same tail only share a bucket. The same for `str`
/// and `Arc<str>` keys (both hash through `str`).
#[derive(Clone, Default)]
pub struct IdTail(foldhash::fast::RandomState);

impl std::hash::BuildHasher for IdTail {
    type Hasher = IdTailHasher;

    fn build_hasher(&self) -> IdTailHasher {
        IdTailHasher(self.0.build_hasher())
    }
}

/// See [`IdTail`].
pub struct IdTailHasher(foldhash::fast::FoldHasher<'static>);

impl std::hash::Hasher for IdTailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(&bytes[bytes.len().saturating_sub(16)..]);
        self.0.write_usize(bytes.len());
    }

    fn write_u8(&mut self, i: u8) {
        self.0.write_u8(i);
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, hash::BuildHasher as _, sync::Arc};

    use super::IdTail;

    #[test]
    fn ids_hash_by_their_tail_and_find_by_str() {
        let s = IdTail::default();
        let a = "v0123456789abcdef0123456789abcdef-18446744073709551";
        let b = "vfedcba9876543210fedcba9876543210-18446744073709551";
        assert_eq!(
            s.hash_one(a),
            s.hash_one(b),
            "the boot prefix is not hashed"
        );
        assert_ne!(s.hash_one(a), s.hash_one(&a[..a.len() - 1]));
        let mut m: HashMap<Arc<str>, u32, IdTail> = HashMap::default();
        m.insert(Arc::from(a), 1);
        m.insert(Arc::from(b), 2);
        assert_eq!(
            (m.get(a), m.get(b), m.get("v1")),
            (Some(&1), Some(&2), None)
        );
        assert_eq!(m.get(&Arc::<str>::from(b)), Some(&2));
    }
}
