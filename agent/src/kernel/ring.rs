//! The ring buffer's fill level, read from its consumer and producer
//! positions (the first two pages of a `BPF_MAP_TYPE_RINGBUF` mapping).
//!
//! aya keeps its own mapping to consume records; this second, read-only one
//! only looks. Minimum kernel version: 5.8 (ring buffers).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use meterd_common::map_names;

/// Read-only mappings of the two position pages.
pub struct Positions {
    consumer: NonNull<libc::c_void>,
    producer: NonNull<libc::c_void>,
    page: usize,
    size: u64,
}

// SAFETY: the mappings are read-only and read with atomic loads only.
unsafe impl Send for Positions {}

fn map(fd: BorrowedFd<'_>, offset: usize, len: usize) -> io::Result<NonNull<libc::c_void>> {
    // SAFETY: a fresh read-only shared mapping of a map fd; the kernel checks
    // the offset and length against the ring buffer.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            libc::off_t::try_from(offset).map_err(io::Error::other)?,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

impl Positions {
    /// Maps the position pages of the ring buffer behind `fd`.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(io::Error::other)?;
        let info = super::sys::map_info(fd)?;
        let consumer = map(fd, 0, page)?;
        let producer = match map(fd, page, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: unmapping what was mapped just above.
                unsafe { libc::munmap(consumer.as_ptr(), page) };
                return Err(e);
            }
        };
        tracing::debug!(
            map = map_names::CLOSED,
            size = info.max_entries,
            "ring positions mapped"
        );
        Ok(Self {
            consumer,
            producer,
            page,
            size: u64::from(info.max_entries),
        })
    }

    /// Unread bytes and the buffer's size.
    pub fn fill(&self) -> (u64, u64) {
        // SAFETY: the pages stay mapped while `self` lives; positions are
        // u64s the kernel and aya update atomically.
        let (c, p) = unsafe {
            (
                (*self.consumer.as_ptr().cast::<AtomicU64>()).load(Ordering::Acquire),
                (*self.producer.as_ptr().cast::<AtomicU64>()).load(Ordering::Acquire),
            )
        };
        (p.saturating_sub(c).min(self.size), self.size)
    }
}

impl Drop for Positions {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mappings once.
        unsafe {
            libc::munmap(self.consumer.as_ptr(), self.page);
            libc::munmap(self.producer.as_ptr(), self.page);
        }
    }
}
