//! meterd's pinned `LIVE` array (a `BPF_F_MMAPABLE` array of slots
//! `{cookie, bytes_out, bytes_in, last_ns}`), mapped read-only by the test
//! process itself: an independent reader of what the kernel writes, to
//! check the agent's claim that a torn read is never high.
//!
//! The read protocol is the agent's (`agent/src/kernel/slots.rs`), written
//! again here on purpose: cookie (acquire), counts, fence, cookie again.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
    sync::atomic::{AtomicU64, Ordering, fence},
};

/// `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Bytes of one slot.
const SLOT: usize = 32;

/// One slot's values as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotRead {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub last_ns: u64,
}

/// A read-only mapping of a pinned `LIVE` array.
pub struct LiveMapping {
    ptr: *mut libc::c_void,
    slots: usize,
    bytes: usize,
    _fd: OwnedFd,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: `attr` is a prefix of `union bpf_attr` for `cmd`.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    }
}

impl LiveMapping {
    /// Maps the array pinned at `pin`; panics if it is not one.
    pub fn open(pin: &Path) -> LiveMapping {
        #[repr(C)]
        struct ObjAttr {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let path = CString::new(pin.as_os_str().as_bytes()).unwrap();
        let mut attr = ObjAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr);
        assert!(
            fd >= 0,
            "cannot open {}: {}",
            pin.display(),
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd from the kernel.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // type, id, key_size, value_size, max_entries, map_flags, ...
        let mut info = [0u32; 32];
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd().cast_unsigned(),
            info_len: size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        assert_eq!(bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr), 0, "map info");
        assert_eq!(info[3] as usize, SLOT, "LIVE's value size");
        assert_ne!(info[5] & (1 << 10), 0, "LIVE is not BPF_F_MMAPABLE");
        let slots = info[4] as usize;
        let bytes = (slots * SLOT).div_ceil(4096) * 4096;
        // SAFETY: a fresh read-only shared mapping of the map's fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap of LIVE: {}",
            std::io::Error::last_os_error()
        );
        LiveMapping {
            ptr,
            slots,
            bytes,
            _fd: fd,
        }
    }

    fn word(&self, slot: usize, i: usize) -> &AtomicU64 {
        assert!(slot < self.slots && i < 4);
        // SAFETY: inside the mapping, 8-byte aligned (page-aligned base).
        unsafe { &*self.ptr.cast::<AtomicU64>().add(slot * 4 + i) }
    }

    /// Every held slot: (slot, cookie, values), read by the protocol above.
    pub fn read(&self, out: &mut Vec<(usize, u64, SlotRead)>) {
        out.clear();
        for slot in 0..self.slots {
            let cookie = self.word(slot, 0).load(Ordering::Acquire);
            if cookie == 0 {
                continue;
            }
            let read = SlotRead {
                bytes_out: self.word(slot, 1).load(Ordering::Acquire),
                bytes_in: self.word(slot, 2).load(Ordering::Acquire),
                last_ns: self.word(slot, 3).load(Ordering::Acquire),
            };
            fence(Ordering::Acquire);
            if self.word(slot, 0).load(Ordering::Relaxed) == cookie {
                out.push((slot, cookie, read));
            }
        }
    }
}

impl Drop for LiveMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr, self.bytes) };
    }
}
