//! The skip policy: a privileged test runs, or says loudly why it cannot.
//!
//! meterd's machines have root, BPF and cgroup v2, so a missing one is a
//! failure (a panic naming what is missing and the kernel version), as
//! cilium/ebpf fails a test whose feature the kernel must have. Only with
//! `METERD_ALLOW_SKIP=1` does a test print `SKIPPED: <test>: <why>` and
//! return, for machines that are known not to qualify.
//!
//! Does not own: creating the test's cgroup or namespace (`cgroup`, `netns`).

use std::{
    fs,
    io::Write as _,
    path::Path,
    process::Command,
    sync::{Mutex, PoisonError},
};

use crate::cgroup;

/// Environment variable that turns a failed precondition into a skip.
pub const ALLOW_SKIP_ENV: &str = "METERD_ALLOW_SKIP";

/// Where meterd pins its objects; a bpffs must be mounted here.
pub const BPFFS: &str = "/sys/fs/bpf";

/// What a test needs beyond root, BPF and cgroup v2.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// `ip` (iproute2), to create a network namespace.
    pub netns: bool,
    /// `nft`, to drop packets.
    pub nft: bool,
}

/// Checks that `test` can run here. Returns `false` after printing
/// `SKIPPED: ...` when it cannot and skipping is allowed; panics when it
/// cannot and skipping is not allowed.
pub fn check(test: &str, needs: Needs) -> bool {
    let Err(why) = probe(needs) else {
        return true;
    };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned());
    let why = format!("{why} (kernel {kernel})");
    if std::env::var(ALLOW_SKIP_ENV).as_deref() == Ok("1") {
        // Straight to the process's stderr: libtest captures `eprintln!`,
        // and a skip must be visible in a passing run.
        let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
        false
    } else {
        panic!(
            "{test} cannot run: {why}. meterd's end-to-end tests need root, BPF and a \
             cgroup v2 mount; run them with `cargo xtask test`, or set {ALLOW_SKIP_ENV}=1 \
             to skip them on a machine that cannot."
        )
    }
}

fn probe(needs: Needs) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("not root (euid {euid})"));
    }
    if cgroup::v2_root().is_none() {
        return Err("no cgroup v2 mount (fstype cgroup2) in /proc/mounts".to_owned());
    }
    probe_bpf_syscall()?;
    ensure_bpffs()?;
    if needs.netns {
        probe_tool("ip", &["-V"])?;
    }
    if needs.nft {
        probe_tool("nft", &["--version"])?;
    }
    Ok(())
}

/// Creates (and closes) a one-slot array map: proves the `bpf()` syscall
/// exists and this process may use it.
fn probe_bpf_syscall() -> Result<(), String> {
    // Leading fields of `union bpf_attr` for BPF_MAP_CREATE; the kernel
    // accepts a larger, zero-filled attribute.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4; // key_size
    attr[2] = 8; // value_size
    attr[3] = 1; // max_entries
    // SAFETY: BPF_MAP_CREATE (0) reads `size` bytes from a valid buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            size_of_val(&attr) as libc::c_uint,
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!("bpf(BPF_MAP_CREATE) failed: {err}"));
    }
    // SAFETY: `fd` is a descriptor the syscall just returned to us.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Mounts bpffs on [`BPFFS`] unless one is there. Tests run in parallel
/// threads, so the check-then-mount is serialised.
fn ensure_bpffs() -> Result<(), String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if bpffs_mounted() {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() || !bpffs_mounted() {
        return Err(format!(
            "no bpffs on {BPFFS} and `mount -t bpf bpf {BPFFS}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let (_, Some(dir), Some(fstype)) = (fields.next(), fields.next(), fields.next()) else {
                return false;
            };
            fstype == "bpf" && Path::new(dir) == Path::new(BPFFS)
        })
    })
}

fn probe_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(tool).args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            out.status
        )),
        Err(e) => Err(format!("`{tool}` is not usable: {e}")),
    }
}
