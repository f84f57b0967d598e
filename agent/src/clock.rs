//! Kernel timestamps to wall-clock time.
//!
//! The eBPF programs stamp events with `bpf_ktime_get_boot_ns()`
//! (CLOCK_BOOTTIME: monotonic, counts suspend). Wall time is derived at the
//! moment of conversion, so a settled session's times follow the wall clock
//! the operator sees.

use std::time::{Duration, SystemTime};

/// Now on CLOCK_BOOTTIME, in ns: the clock of the kernel's timestamps.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// CPU time the calling thread has used: a cycle's CPU, apart from the
/// time it waited for a CPU or the disk.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Wall-clock time of a boot-time timestamp.
pub fn wall_time(boot_ns_at: u64) -> SystemTime {
    let now_boot = boot_ns();
    let now = SystemTime::now();
    if boot_ns_at <= now_boot {
        now - Duration::from_nanos(now_boot - boot_ns_at)
    } else {
        now + Duration::from_nanos(boot_ns_at - now_boot)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): cookies are unique
/// only within a boot, so session ids carry it.
pub fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}
