//! cgroup v2 groups that exist for one test.
//!
//! The v2 hierarchy is found in /proc/mounts (fstype `cgroup2`), never
//! assumed: hosts mount it at /sys/fs/cgroup (unified) or, in the hybrid
//! layout, at /sys/fs/cgroup/unified. A [`Cgroup`] kills what is left in it
//! and removes itself on drop.
//!
//! Does not own: moving processes into the group (the shell wrapper in
//! `env` does that for the child it starts).

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

/// Mount point of the cgroup v2 hierarchy, from /proc/mounts.
pub fn v2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup directory directly under the v2 root, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// The path as it appears in `/proc/<pid>/cgroup` (`0::<relative>`).
    relative: String,
}

impl Cgroup {
    /// Creates `<v2 root>/<name>`; a leftover of that name (from a crashed
    /// run with the same pid) is emptied and replaced.
    pub fn create(name: &str) -> Cgroup {
        let path = Cgroup::path_of(name);
        let cgroup = Cgroup {
            relative: format!("/{name}"),
            path,
        };
        if cgroup.path.exists() {
            cgroup.kill_all();
            cgroup.remove_dir();
        }
        fs::create_dir(&cgroup.path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.path.display()));
        cgroup
    }

    /// Where [`Cgroup::create`] puts the group `name`.
    pub fn path_of(name: &str) -> PathBuf {
        v2_root()
            .expect("no cgroup v2 mount in /proc/mounts")
            .join(name)
    }

    /// The group's directory (what meterd's `agent.cgroup` points at).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The group's id: the inode of its directory, which is what BPF links
    /// name as their cgroup. A group removed and created again at the same
    /// path has a new one (cgroup ids are never reused within a boot).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("cannot stat cgroup {}: {e}", self.path.display()))
            .ino()
    }

    /// `cgroup.procs`: writing a pid there moves that process in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Processes currently in the group.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Whether `pid` is in this group, from the process's own view of its
    /// v2 membership.
    pub fn contains(&self, pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
            text.lines()
                .filter_map(|l| l.strip_prefix("0::"))
                .any(|p| p == self.relative)
        })
    }

    /// Kills every process in the group and waits until it is empty.
    pub fn kill_all(&self) {
        // cgroup.kill (Linux 5.14) kills atomically, forks included.
        let kill_file = self.path.join("cgroup.kill");
        if fs::write(&kill_file, "1").is_err() {
            for pid in self.pids() {
                // SAFETY: kill(2) with a pid read from cgroup.procs; at worst
                // the process is already gone.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn remove_dir(&self) {
        // The kernel may need a moment after the last process exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("cannot remove cgroup {}: {e}", self.path.display());
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        self.remove_dir();
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mount_path;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/a\\\\"), "/a\\\\");
    }
}
