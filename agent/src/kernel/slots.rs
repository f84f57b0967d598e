//! The live TCP counters, read from memory: the `LIVE` array
//! (`BPF_F_MMAPABLE`, one [`LiveSlot`] per slot) mapped into the agent, and
//! the return of a closed connection's slot to `FREE_SLOTS`.
//!
//! Owns: the mapping, the full read (no syscall: a pass over the mapped
//! array), the read of one slot, the fill of the free-slot queue when the
//! maps are new, and giving a slot back ([`Slots::release`], reachable only
//! with a ledger [`Committed`] proof, from [`super::Record::release`] and
//! [`super::Kernel::forget`]). Does not own: who a connection is (`INFO`,
//! looked up once per new cookie by the caller) or what counts mean.
//!
//! # Reading a slot that may be reused
//!
//! A slot changes hands only through the free-slot queue: the agent clears
//! the cookie of a closed connection's slot (a compare-and-swap from that
//! cookie to 0) and then pushes the slot; sock_ops pops it, zeroes its
//! counts and only then publishes the new cookie (an atomic exchange, a
//! full barrier). A read takes the cookie (acquire), the counts, and the
//! cookie again after an acquire fence, and keeps the counts only if both
//! cookies are the same non-zero value. Cookies are never reused within a
//! boot, so the slot held that connection for the whole read: the counts
//! are its own, old or new, never another connection's. Each count is an
//! aligned u64 written whole, and counts only rise, so a read torn between
//! two folds is low, never high.
//!
//! # Returning a slot, exactly once
//!
//! [`Slots::release`] swaps the record's cookie out of its slot and pushes
//! the slot only if the swap succeeded. A record delivered again (the
//! agent stopped after the push and before the ring's consumer moved on,
//! or both programs of an upgrade reported the same close) finds another
//! cookie or 0 there and pushes nothing. The one window that loses a slot:
//! a crash between the swap and the push leaks that slot until `meterd
//! unload` (the queue cannot be listed, so it cannot be found again).
//!
//! Minimum kernel version: 5.5 (`BPF_F_MMAPABLE` arrays); queue maps: 4.20.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use aya::maps::MapData;
use meterd_common::{Counts, LiveSlot, NO_SLOT};

use super::sys;
use crate::ledger::Committed;

/// `BPF_F_MMAPABLE` (`include/uapi/linux/bpf.h`).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// One [`LiveSlot`] as the agent sees it in the mapping: the same layout,
/// read and written with atomics because the kernel writes it concurrently.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Cell {
    cookie: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    last_ns: AtomicU64,
}

const _: () = assert!(size_of::<Cell>() == size_of::<LiveSlot>());

impl Cell {
    /// A cell holding `slot` as the kernel would write it (tests, benches).
    pub fn new(slot: LiveSlot) -> Self {
        let cell = Self::default();
        cell.store(slot);
        cell
    }

    /// Writes a whole slot the way sock_ops takes one: counts first, the
    /// cookie last (tests and benches play the kernel with it).
    pub fn store(&self, slot: LiveSlot) {
        self.bytes_out
            .store(slot.counts.bytes_out, Ordering::Relaxed);
        self.bytes_in.store(slot.counts.bytes_in, Ordering::Relaxed);
        self.last_ns.store(slot.counts.last_ns, Ordering::Relaxed);
        self.cookie.swap(slot.cookie, Ordering::SeqCst);
    }

    /// Raises the counts the way a fold does: the date first (tests).
    pub fn raise(&self, counts: Counts) {
        // Release: in store order, as x86 makes the kernel's plain stores.
        self.last_ns.fetch_max(counts.last_ns, Ordering::Release);
        self.bytes_out
            .fetch_max(counts.bytes_out, Ordering::Release);
        self.bytes_in.fetch_max(counts.bytes_in, Ordering::Release);
    }

    /// Clears the cookie if it is `cookie` (the first half of a release).
    pub fn clear(&self, cookie: u64) -> bool {
        cookie != 0
            && self
                .cookie
                .compare_exchange(cookie, 0, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
    }

    /// The cookie and counts, if one connection held the cell for the
    /// whole read (see the module docs).
    #[inline]
    pub fn read(&self) -> Option<(u64, Counts)> {
        let cookie = self.cookie.load(Ordering::Acquire);
        if cookie == 0 {
            return None;
        }
        // Field order, `last_ns` last: the kernel writes the date first, so
        // new counts come with their date.
        // Acquire loads are plain loads on x86.
        let counts = Counts {
            bytes_out: self.bytes_out.load(Ordering::Acquire),
            bytes_in: self.bytes_in.load(Ordering::Acquire),
            last_ns: self.last_ns.load(Ordering::Acquire),
        };
        // The counts' loads happen before the second cookie load.
        fence(Ordering::Acquire);
        (self.cookie.load(Ordering::Relaxed) == cookie).then_some((cookie, counts))
    }

    /// The counts, if the cell holds `cookie`'s connection.
    pub fn counts_of(&self, cookie: u64) -> Option<Counts> {
        self.read().filter(|&(c, _)| c == cookie).map(|(_, n)| n)
    }
}

/// Replaces `out` with every held cell's cookie and counts, in slot order.
/// No syscall: a pass over memory.
pub fn read_cells(cells: &[Cell], out: &mut Vec<(u64, Counts)>) {
    out.clear();
    out.extend(cells.iter().filter_map(Cell::read));
    // The ring is drained after this read (its positions are read with
    // acquire loads): a gap record the kernel submitted before counts seen
    // here is found then (see `ebpf/src/activity.rs`).
    fence(Ordering::Acquire);
}

/// A shared read-write mapping of a `BPF_F_MMAPABLE` array of
/// [`LiveSlot`]s. Written by the agent only to clear a cookie.
pub struct LiveMap {
    cells: NonNull<Cell>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is only accessed through atomics (`Cell`).
unsafe impl Send for LiveMap {}
// SAFETY: as above.
unsafe impl Sync for LiveMap {}

impl LiveMap {
    /// Maps the array behind `map`; fails if it is not a memory-mappable
    /// array of [`LiveSlot`]s.
    pub fn new(map: &MapData) -> io::Result<Self> {
        let fd = map.fd().as_fd();
        let info = sys::map_info(fd)?;
        if info.value_size as usize != size_of::<LiveSlot>() || info.map_flags & BPF_F_MMAPABLE == 0
        {
            return Err(io::Error::other(format!(
                "not a memory-mappable array of {}-byte slots (value size {}, flags {:#x})",
                size_of::<LiveSlot>(),
                info.value_size,
                info.map_flags
            )));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(io::Error::other)?;
        let len = info.max_entries as usize;
        let bytes = (len * size_of::<LiveSlot>()).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map fd; the kernel checks
        // the length against the array (kernel/bpf/arraymap.c).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let cells = NonNull::new(ptr.cast::<Cell>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { cells, len, bytes })
    }

    /// The slots.
    pub fn cells(&self) -> &[Cell] {
        // SAFETY: `len` cells of the array are mapped while `self` lives,
        // page-aligned, and only ever accessed through atomics.
        unsafe { std::slice::from_raw_parts(self.cells.as_ptr(), self.len) }
    }

    /// See [`read_cells`].
    pub fn read(&self, out: &mut Vec<(u64, Counts)>) {
        read_cells(self.cells(), out);
    }

    /// Slots held by a connection now.
    pub fn in_use(&self) -> usize {
        self.cells()
            .iter()
            .filter(|c| c.cookie.load(Ordering::Relaxed) != 0)
            .count()
    }
}

impl Drop for LiveMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.cells.as_ptr().cast(), self.bytes) };
    }
}

/// `LIVE`, mapped, and `FREE_SLOTS`.
pub struct Slots {
    live: LiveMap,
    /// Kept for the array's fd (the mapping does not need it, but it
    /// names the map in errors and keeps it alive).
    _live_map: MapData,
    free: MapData,
    /// Slots this agent could not push back (a failed push, logged).
    leaks: AtomicU64,
}

impl Slots {
    pub fn new(live: MapData, free: MapData) -> io::Result<Self> {
        Ok(Self {
            live: LiveMap::new(&live)?,
            _live_map: live,
            free,
            leaks: AtomicU64::new(0),
        })
    }

    /// Counts a slot that could not be pushed back.
    pub(super) fn leaked(&self) {
        self.leaks.fetch_add(1, Ordering::Relaxed);
    }

    /// Slots this agent failed to push back since it started.
    pub fn leaks(&self) -> u64 {
        self.leaks.load(Ordering::Relaxed)
    }

    /// Number of slots (`agent.max_connections`).
    pub fn capacity(&self) -> usize {
        self.live.len
    }

    /// See [`read_cells`].
    pub fn read(&self, out: &mut Vec<(u64, Counts)>) {
        self.live.read(out);
    }

    /// The counts in `slot` if it holds `cookie`'s connection.
    pub fn counts(&self, slot: u32, cookie: u64) -> Option<Counts> {
        self.live
            .cells()
            .get(slot as usize)
            .and_then(|c| c.counts_of(cookie))
    }

    /// Slots held by a connection now (a pass over the mapping).
    pub fn in_use(&self) -> usize {
        self.live.in_use()
    }

    /// Fills `FREE_SLOTS` with every slot, after emptying it of what an
    /// interrupted fill left. Only for maps that no program uses yet (the
    /// caller checks that nothing is attached): the queue then holds only
    /// what a fill pushed.
    pub fn fill(&self) -> io::Result<usize> {
        let fd = self.free.fd().as_fd();
        while sys::pop::<u32>(fd)?.is_some() {}
        for slot in 0..self.capacity() as u32 {
            sys::push(fd, &slot)?;
        }
        Ok(self.capacity())
    }

    /// Returns `cookie`'s slot to the queue, if it still holds it: once
    /// per slot and connection, whatever delivers the close again (see the
    /// module docs). True if the slot was pushed.
    pub(super) fn release(
        &self,
        slot: u32,
        cookie: u64,
        _committed: &Committed,
    ) -> io::Result<bool> {
        if slot == NO_SLOT {
            return Ok(false);
        }
        let Some(cell) = self.live.cells().get(slot as usize) else {
            return Ok(false);
        };
        if !cell.clear(cookie) {
            return Ok(false);
        }
        // A crash here leaks the slot (module docs).
        sys::push(self.free.fd().as_fd(), &slot)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };

    use meterd_common::{Counts, LiveSlot};

    use super::{Cell, read_cells};

    fn slot(cookie: u64, bytes_out: u64, bytes_in: u64, last_ns: u64) -> LiveSlot {
        LiveSlot {
            cookie,
            counts: Counts {
                bytes_out,
                bytes_in,
                last_ns,
            },
        }
    }

    #[test]
    fn a_read_skips_free_slots_and_keeps_slot_order() {
        let cells = vec![
            Cell::new(slot(7, 100, 1, 5)),
            Cell::default(),
            Cell::new(slot(3, 200, 2, 6)),
        ];
        let mut out = vec![(99, Counts::default())];
        read_cells(&cells, &mut out);
        assert_eq!(
            out,
            vec![
                (7, slot(7, 100, 1, 5).counts),
                (3, slot(3, 200, 2, 6).counts)
            ]
        );
        assert_eq!(cells[2].counts_of(3), Some(slot(3, 200, 2, 6).counts));
        assert_eq!(cells[2].counts_of(7), None, "another cookie's slot");
        assert_eq!(cells[1].counts_of(0), None, "a free slot holds nobody");
    }

    #[test]
    fn a_slot_is_cleared_once_and_only_for_its_own_cookie() {
        let cell = Cell::new(slot(7, 100, 1, 5));
        assert!(!cell.clear(8), "another cookie");
        assert!(!cell.clear(0), "0 is never a cookie");
        assert!(cell.clear(7));
        assert!(!cell.clear(7), "a record delivered again pushes nothing");
        assert_eq!(cell.read(), None);
    }

    /// A writer plays the kernel and the agent on a few slots: connections
    /// raise their counts, close, have their slot cleared and taken by a
    /// new cookie, over and over. A reader concurrently reads the cells
    /// and must never see a cookie with counts that are not its own: each
    /// connection's values lie in ranges of its own (`base`), so any mix-up
    /// of connections, or a count with an older date, shows.
    #[test]
    fn concurrent_reuse_never_mixes_connections() {
        const STEPS: u64 = 100;
        let base = |cookie: u64| cookie * 1_000_000;
        let cells: Arc<Vec<Cell>> = Arc::new((0..4).map(|_| Cell::default()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let cells = Arc::clone(&cells);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut cookie = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    for cell in cells.iter() {
                        cell.store(slot(cookie, 0, 0, 0));
                        for k in 0..STEPS {
                            cell.raise(Counts {
                                bytes_out: base(cookie) + k,
                                bytes_in: base(cookie) + 500 + k,
                                last_ns: base(cookie) + k,
                            });
                        }
                        assert!(cell.clear(cookie));
                        cookie += 1;
                    }
                }
                cookie
            })
        };
        let own = |value: u64, cookie: u64, offset: u64| {
            value == 0 || (base(cookie) + offset..base(cookie) + offset + STEPS).contains(&value)
        };
        let mut out = Vec::new();
        let mut seen = 0usize;
        let mut last: HashMap<u64, Counts> = HashMap::new();
        // Long enough for many reuses of each slot under the reads.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        while std::time::Instant::now() < until {
            read_cells(&cells, &mut out);
            for &(cookie, counts) in &out {
                seen += 1;
                assert!(
                    own(counts.bytes_out, cookie, 0)
                        && own(counts.bytes_in, cookie, 500)
                        && own(counts.last_ns, cookie, 0),
                    "cookie {cookie} read with counts not its own: {counts:?}"
                );
                // The date is written first, so it is never behind.
                assert!(
                    counts.bytes_out == 0 || counts.last_ns >= counts.bytes_out,
                    "cookie {cookie}: counts {counts:?} without their date"
                );
                let before = last.insert(cookie, counts).unwrap_or_default();
                assert!(
                    counts.bytes_out >= before.bytes_out
                        && counts.bytes_in >= before.bytes_in
                        && counts.last_ns >= before.last_ns,
                    "cookie {cookie} went down: {before:?} -> {counts:?}"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        let cookies = writer.join().unwrap();
        assert!(
            seen > 1000 && cookies > 1000,
            "the reader saw {seen} slots held, the writer made {cookies} connections"
        );
    }
}
