//! What the host must offer before anything is loaded: privileges, a cgroup
//! v2 hierarchy, and bpffs. Each check fails with the fix in its message.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// `BPF_FS_MAGIC`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Capability bits meterd needs when not running as root.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A host prerequisite that is missing.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(
        "meterd needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
         (missing: {missing}); run it as root or grant them \
         (systemd: AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN)"
    )]
    Privileges { missing: String },
    #[error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/mounts); mount one: mount -t cgroup2 none /sys/fs/cgroup/unified"
    )]
    NoCgroup2,
    #[error(
        "cgroup path {path} does not exist: create it, or point agent.cgroup at the cgroup v2 directory the streaming server runs in"
    )]
    CgroupMissing { path: PathBuf },
    #[error(
        "cgroup path {path} is not a directory: agent.cgroup must be the cgroup v2 directory the streaming server runs in (e.g. .../system.slice/nginx.service)"
    )]
    CgroupNotDir { path: PathBuf },
    #[error(
        "agent.pin_dir {path} is not inside a bpffs mount: use a directory under /sys/fs/bpf (e.g. /sys/fs/bpf/meterd); meterd never pins or deletes anywhere else"
    )]
    NotOnBpffs { path: PathBuf },
    #[error(
        "cgroup path {path} is not on a cgroup v2 filesystem (agent.cgroup must be inside the cgroup2 mount {mount})"
    )]
    NotCgroup2 { path: PathBuf, mount: String },
    #[error(
        "agent.pin_dir {path} is not on bpffs and /sys/fs/bpf could not be mounted ({reason}); mount it: mount -t bpf bpf /sys/fs/bpf"
    )]
    NoBpffs { path: PathBuf, reason: String },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {what}: {source}")]
    Read {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Checks that this process may load and attach BPF programs.
pub fn check_privileges() -> Result<(), SystemError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = fs::read_to_string("/proc/self/status").map_err(|source| SystemError::Read {
        what: "/proc/self/status",
        source,
    })?;
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| caps & (1 << bit) != 0;
    if has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| !has(*bit))
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SystemError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, SystemError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| SystemError::Read {
        what: "/proc/mounts",
        source,
    })?;
    cgroup2_mount_in(&mounts).ok_or(SystemError::NoCgroup2)
}

/// Finds the first `cgroup2` mount in `/proc/mounts` text.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
    })
}

/// `/proc/mounts` escapes spaces and friends as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&code, 8) {
                out.push(char::from(b));
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0).then_some(st.f_type)
}

/// Resolves the cgroup to attach to: the configured one or the v2 root.
pub fn resolve_cgroup(configured: Option<&Path>) -> Result<PathBuf, SystemError> {
    let mount = cgroup2_mount()?;
    let path = configured.map_or_else(|| mount.clone(), Path::to_path_buf);
    if path.exists() && !path.is_dir() {
        return Err(SystemError::CgroupNotDir { path });
    }
    if !path.is_dir() {
        return Err(SystemError::CgroupMissing { path });
    }
    if fs_magic(&path) != Some(CGROUP2_MAGIC) {
        return Err(SystemError::NotCgroup2 {
            path,
            mount: mount.display().to_string(),
        });
    }
    Ok(path)
}

/// Whether `path` is on a bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` exists on bpffs, mounting /sys/fs/bpf if nothing
/// is mounted there (and only there: never over another mount, never
/// twice). Config validation has refused `..` in the path.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), SystemError> {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if fs_magic(parent) != Some(BPF_FS_MAGIC) {
        let default = Path::new("/sys/fs/bpf");
        if !parent.starts_with(default) || on_bpffs(default) {
            return Err(SystemError::NotOnBpffs {
                path: pin_dir.to_owned(),
            });
        }
        tracing::info!("bpffs is not mounted at /sys/fs/bpf: mounting it");
        mount_bpffs(default).map_err(|e| SystemError::NoBpffs {
            path: pin_dir.to_owned(),
            reason: e.to_string(),
        })?;
        if fs_magic(parent) != Some(BPF_FS_MAGIC) {
            return Err(SystemError::NoBpffs {
                path: pin_dir.to_owned(),
                reason: "its parent is still not on bpffs after mounting /sys/fs/bpf".into(),
            });
        }
    }
    fs::create_dir_all(pin_dir).map_err(|source| SystemError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; mount(2) with no data.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_in("cgroup /x cgroup rw 0 0\n"), None);
        assert_eq!(
            cgroup2_mount_in("none /a\\040b cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/a b"))
        );
    }
}
