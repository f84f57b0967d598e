//! A sock_ops program of the test's own, standing for another program on
//! the host (an RTT monitor, a TCP header-option program) that shares the
//! metered cgroup with meterd.
//!
//! At `PASSIVE_ESTABLISHED` it ORs `BPF_SOCK_OPS_RTT_CB_FLAG` into the
//! socket's callback flags, and it counts its `PASSIVE_ESTABLISHED` and
//! `RTT` callbacks in an array map. Attached before meterd, it runs first on
//! every connection, so if meterd's program replaced the socket's flags
//! instead of adding its own, the RTT callbacks would stop: the count is the
//! evidence (issue #12, item 9).
//!
//! The program is 22 hand-assembled BPF instructions, loaded with the raw
//! `bpf(2)` syscall, so the test needs no compiler and no second object
//! file. Its link is held by a file descriptor, not pinned: it detaches when
//! the probe is dropped, also when the test panics.
//!
//! Does not own: anything of meterd's; it never touches meterd's maps.
//!
//! Minimum kernel version: 5.12 (atomic add on a map value through
//! `BPF_ATOMIC`; cgroup links: 5.7).

use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

// `include/uapi/linux/bpf.h`.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: i32 = 5;
const BPF_SOCK_OPS_RTT_CB: i32 = 12;
const BPF_SOCK_OPS_RTT_CB_FLAG: i32 = 1 << 3;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_SOCK_OPS_CB_FLAGS_SET: i32 = 59;
/// `offsetof(struct bpf_sock_ops, op)` and `bpf_sock_ops_cb_flags`.
const OP_OFFSET: i16 = 0;
const CB_FLAGS_OFFSET: i16 = 84;

/// Slots of the probe's count map.
const SLOT_ESTABLISHED: u32 = 0;
const SLOT_RTT: u32 = 1;

/// One BPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The probe, in BPF assembly; registers: r6 the context, r7 the slot.
fn program(map_fd: i32) -> Vec<Insn> {
    // Opcodes (class | op | source).
    const MOV64_X: u8 = 0xbf;
    const MOV64_K: u8 = 0xb7;
    const OR64_K: u8 = 0x47;
    const ADD64_K: u8 = 0x07;
    const LDX_W: u8 = 0x61;
    const STX_W: u8 = 0x63;
    const LD_DW: u8 = 0x18;
    const ATOMIC_DW: u8 = 0xdb;
    const JEQ_K: u8 = 0x15;
    const JA: u8 = 0x05;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const PSEUDO_MAP_FD: u8 = 1;
    const ATOMIC_ADD: i32 = 0;
    #[expect(clippy::cast_possible_wrap, reason = "slot numbers are 0 and 1")]
    let (established, rtt) = (SLOT_ESTABLISHED as i32, SLOT_RTT as i32);
    vec![
        /* 0 */ insn(MOV64_X, 6, 1, 0, 0),
        /* 1 */ insn(LDX_W, 2, 6, OP_OFFSET, 0),
        /* 2 */ insn(JEQ_K, 2, 0, 3, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB), // -> 6
        /* 3 */ insn(MOV64_K, 7, 0, 0, rtt),
        /* 4 */ insn(JEQ_K, 2, 0, 6, BPF_SOCK_OPS_RTT_CB), // -> 11
        /* 5 */ insn(JA, 0, 0, 14, 0), // -> 20
        // PASSIVE_ESTABLISHED: add the RTT flag to the socket's flags.
        /* 6 */
        insn(LDX_W, 2, 6, CB_FLAGS_OFFSET, 0),
        /* 7 */ insn(OR64_K, 2, 0, 0, BPF_SOCK_OPS_RTT_CB_FLAG),
        /* 8 */ insn(MOV64_X, 1, 6, 0, 0),
        /* 9 */ insn(CALL, 0, 0, 0, BPF_FUNC_SOCK_OPS_CB_FLAGS_SET),
        /* 10 */ insn(MOV64_K, 7, 0, 0, established),
        // Count in slot r7.
        /* 11 */ insn(STX_W, 10, 7, -4, 0),
        /* 12 */ insn(LD_DW, 1, PSEUDO_MAP_FD, 0, map_fd),
        /* 13 */ insn(0, 0, 0, 0, 0),
        /* 14 */ insn(MOV64_X, 2, 10, 0, 0),
        /* 15 */ insn(ADD64_K, 2, 0, 0, -4),
        /* 16 */ insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        /* 17 */ insn(JEQ_K, 0, 0, 2, 0), // -> 20
        /* 18 */ insn(MOV64_K, 1, 0, 0, 1),
        /* 19 */ insn(ATOMIC_DW, 0, 1, 0, ATOMIC_ADD),
        /* 20 */ insn(MOV64_K, 0, 0, 0, 1),
        /* 21 */ insn(EXIT, 0, 0, 0, 0),
    ]
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf(cmd, attr)`: the syscall's result, or its errno as an error.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd`; the kernel reads `size_of::<T>()` bytes and zero-fills the
    // rest. Pointers in it point at live buffers of the caller.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(fd: i64) -> OwnedFd {
    let fd = i32::try_from(fd).expect("a file descriptor fits an i32");
    // SAFETY: the kernel just returned this descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The probe, attached to a cgroup until dropped.
#[derive(Debug)]
pub struct RttProbe {
    counts: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

/// What the probe counted since it was attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeCounts {
    /// Connections it set its flag on (`PASSIVE_ESTABLISHED` callbacks).
    pub established: u64,
    /// `RTT` callbacks: they come only while the flag is still set.
    pub rtt: u64,
}

impl RttProbe {
    /// Loads the probe and attaches it to `cgroup` (appended to the
    /// cgroup's sock_ops programs: it runs before those attached later).
    /// Panics with the verifier's log if the kernel refuses it.
    pub fn attach(cgroup: &Path) -> RttProbe {
        let map = bpf(
            BPF_MAP_CREATE,
            &MapCreateAttr {
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 8,
                max_entries: 2,
            },
        )
        .map_or_else(|e| panic!("cannot create the probe's map: {e}"), owned_fd);
        let insns = program(map.as_raw_fd());
        let license = c"GPL";
        let mut log = vec![0u8; 65536];
        let mut name = [0u8; 16];
        name[..10].copy_from_slice(b"test_probe");
        let prog = bpf(
            BPF_PROG_LOAD,
            &ProgLoadAttr {
                prog_type: BPF_PROG_TYPE_SOCK_OPS,
                insn_cnt: u32::try_from(insns.len()).expect("a short program"),
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 1,
                log_size: u32::try_from(log.len()).expect("a 64 KiB log"),
                log_buf: log.as_mut_ptr() as u64,
                kern_version: 0,
                prog_flags: 0,
                prog_name: name,
            },
        )
        .map_or_else(
            |e| {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                panic!(
                    "the kernel refused the probe program: {e}; verifier log:\n{}",
                    String::from_utf8_lossy(&log[..end])
                )
            },
            owned_fd,
        );
        let dir = fs::File::open(cgroup)
            .unwrap_or_else(|e| panic!("cannot open cgroup {}: {e}", cgroup.display()));
        let link = bpf(
            BPF_LINK_CREATE,
            &LinkCreateAttr {
                prog_fd: prog.as_raw_fd().cast_unsigned(),
                target_fd: dir.as_raw_fd().cast_unsigned(),
                attach_type: BPF_CGROUP_SOCK_OPS,
                flags: 0,
            },
        )
        .map_or_else(
            |e| panic!("cannot attach the probe to {}: {e}", cgroup.display()),
            owned_fd,
        );
        RttProbe {
            counts: map,
            _prog: prog,
            _link: link,
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> ProbeCounts {
        ProbeCounts {
            established: self.slot(SLOT_ESTABLISHED),
            rtt: self.slot(SLOT_RTT),
        }
    }

    fn slot(&self, key: u32) -> u64 {
        let mut value = 0u64;
        bpf(
            BPF_MAP_LOOKUP_ELEM,
            &MapElemAttr {
                map_fd: self.counts.as_raw_fd().cast_unsigned(),
                pad: 0,
                key: std::ptr::from_ref(&key) as u64,
                value: std::ptr::from_mut(&mut value) as u64,
                flags: 0,
            },
        )
        .unwrap_or_else(|e| panic!("cannot read the probe's slot {key}: {e}"));
        value
    }
}
