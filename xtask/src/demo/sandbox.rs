//! The demo's sandbox: a cgroup tree and a network namespace of its own,
//! the processes started in them, and Ctrl-C as a flag.
//!
//! Every piece is a guard that removes what it made on drop, so an error, a
//! panic or Ctrl-C leaves nothing behind: [`Cgroups`] kills what is left in
//! its tree and removes it, [`NetNs`] flushes its nftables ruleset and
//! deletes it, [`Proc`] stops and reaps its process. Children get process
//! groups of their own, so the terminal's Ctrl-C reaches only xtask, which
//! then stops them in order ([`catch_interrupts`]).
//!
//! Does not own: what runs in the sandbox (`origin`, `agent`, the viewers
//! in `demo`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// SIGINT, SIGTERM and SIGHUP received so far.
static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only an atomic add: async-signal-safe.
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

/// From now on SIGINT, SIGTERM and SIGHUP only count (see [`interrupts`]):
/// the demo polls the count and stops itself, cleaning up as it goes.
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only does an
        // atomic add; SA_RESTART so that blocking reads resume.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
        }
    }
}

/// How many interrupts arrived since [`catch_interrupts`].
pub fn interrupts() -> u32 {
    INTERRUPTS.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once an interrupt arrived: for the setup steps,
/// which are not worth finishing after Ctrl-C.
pub fn check_interrupted() -> Result<()> {
    if interrupts() > 0 {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls `done` every 50 ms until it holds, `timeout` passes or an
/// interrupt arrives; whether it held.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline || interrupts() > 0 {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The cgroup v2 mount, from /proc/mounts (it is /sys/fs/cgroup on a
/// unified host, /sys/fs/cgroup/unified on a hybrid one).
fn v2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup v2 hierarchy is mounted (`cargo xtask setup` checks for one)")
}

/// A cgroup directly under the v2 root with one child per process group of
/// the demo (nginx, the agent, the encoder, each viewer); killed and removed
/// on drop.
#[derive(Debug)]
pub struct Cgroups {
    root: PathBuf,
    /// `root` relative to /sys/fs/cgroup, where nft 1.0 resolves
    /// `socket cgroupv2` paths.
    nft_path: String,
    children: Vec<PathBuf>,
}

impl Cgroups {
    /// Creates `<v2 root>/<name>`, after removing a leftover of a demo that
    /// was killed before it could clean up.
    pub fn create(name: &str) -> Result<Cgroups> {
        let v2 = v2_root()?;
        let root = v2.join(name);
        let nft_path = root
            .strip_prefix("/sys/fs/cgroup")
            .with_context(|| {
                format!(
                    "the cgroup v2 mount is at {}: nft 1.0 resolves `socket cgroupv2` paths under \
                     /sys/fs/cgroup only, so viewers cannot get addresses of their own here",
                    v2.display()
                )
            })?
            .display()
            .to_string();
        let mut cgroups = Cgroups {
            root,
            nft_path,
            children: Vec::new(),
        };
        if cgroups.root.exists() {
            crate::util::note(format!(
                "removing {} left by an earlier demo",
                cgroups.root.display()
            ));
            cgroups.children = subdirs(&cgroups.root);
            cgroups.remove();
            cgroups.children.clear();
        }
        fs::create_dir(&cgroups.root)
            .with_context(|| format!("creating cgroup {}", cgroups.root.display()))?;
        Ok(cgroups)
    }

    /// Creates the child cgroup `name`; returns its directory.
    pub fn child(&mut self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        self.children.push(dir.clone());
        Ok(dir)
    }

    /// The nft `socket cgroupv2` match for the sockets of child `name`.
    pub fn nft_match(&self, name: &str) -> String {
        // Level 2: the child of the tree's root, itself under the v2 root.
        format!("socket cgroupv2 level 2 \"{}/{name}\"", self.nft_path)
    }

    /// The tree's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Kills everything in the tree (cgroup.kill takes the descendants
    /// too) and removes the directories, children first.
    fn remove(&self) {
        if !self.root.exists() {
            return;
        }
        if fs::write(self.root.join("cgroup.kill"), "1").is_err() {
            // Before Linux 5.14: kill what cgroup.procs lists.
            for dir in self.children.iter().chain([&self.root]) {
                for pid in pids(dir) {
                    // SAFETY: kill(2) of a pid in the demo's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let empty = || {
            fs::read_to_string(self.root.join("cgroup.events"))
                .is_ok_and(|e| e.lines().any(|l| l == "populated 0"))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        for dir in self.children.iter().rev().chain([&self.root]) {
            remove_cgroup_dir(dir);
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.remove();
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn pids(dir: &Path) -> Vec<libc::pid_t> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The processes in cgroup `dir` now.
pub fn cgroup_pids(dir: &Path) -> usize {
    pids(dir).len()
}

fn remove_cgroup_dir(dir: &Path) {
    // The kernel may take a moment after the last process exited.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("xtask: cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A network namespace with only `lo`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace (replacing a leftover) with `lo` up, at an
    /// Ethernet MTU and one segment per packet, so that packet loss hits
    /// thousands of packets instead of a few 64 kB loopback ones.
    pub fn create(name: &str) -> Result<NetNs> {
        if Path::new("/var/run/netns").join(name).exists() {
            crate::util::note(format!(
                "removing network namespace {name} left by an earlier demo"
            ));
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
        quiet(Command::new("ip").args(["netns", "add", name]))?;
        let ns = NetNs {
            name: name.to_owned(),
        };
        quiet(ns.enter("ip").args(["link", "set", "lo", "up"]))?;
        quiet(
            ns.enter("ip")
                .args(["link", "set", "lo", "mtu", "1500", "gso_max_segs", "1"]),
        )?;
        Ok(ns)
    }

    /// `program` inside the namespace by `ip netns exec`: a mount namespace
    /// of its own with /sys remounted for the namespace (nginx, ffmpeg).
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `program` inside the namespace by `nsenter --net`, which keeps the
    /// host's mounts: the agent pins to /sys/fs/bpf, and nft resolves
    /// cgroup paths under /sys/fs/cgroup.
    pub fn enter(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(program);
        cmd
    }

    /// Loads an nft script (kept at `file`) into the namespace.
    pub fn nft(&self, file: &Path, script: &str) -> Result<()> {
        fs::write(file, script).with_context(|| format!("writing {}", file.display()))?;
        quiet(self.enter("nft").arg("-f").arg(file))
            .with_context(|| format!("loading {} into netns {}", file.display(), self.name))?;
        Ok(())
    }

    /// The stdout of `nft args` in the namespace.
    pub fn nft_output(&self, args: &[&str]) -> Result<String> {
        output(self.enter("nft").args(args))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The ruleset dies with the namespace; flushed first so that it is
        // gone even while a straggler still holds the namespace.
        let _ = self.enter("nft").args(["flush", "ruleset"]).output();
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "xtask: cannot delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("xtask: cannot run ip netns del {}: {e}", self.name),
        }
    }
}

/// Runs `cmd`, capturing its output; fails with its stderr.
pub fn quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// Runs `cmd`; its stdout, or an error with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmd` (a program and its arguments) started in cgroup `dir`: a shell
/// writes its own pid into `cgroup.procs` and execs the command, so the
/// process is in the cgroup before it runs, and its pid is the command's.
pub fn in_cgroup(dir: &Path, cmd: &Command) -> Command {
    let mut wrapped = Command::new("sh");
    wrapped
        .arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(dir.join("cgroup.procs"))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    wrapped
}

/// A child process of the demo, stopped and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    /// What asks it to stop ([`Proc::stop`]): SIGTERM, or SIGQUIT for
    /// nginx's graceful shutdown.
    stop_signal: libc::c_int,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` in a process group of its own, stdin from /dev/null,
    /// stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let err = open_log(log, cmd)?;
        let out = err.try_clone()?;
        Proc::start(name, cmd.stdout(out).stderr(err))
    }

    /// Like [`Proc::spawn`], with stdout to a pipe for the caller.
    pub fn spawn_piped(name: &str, cmd: &mut Command, log: &Path) -> Result<(Proc, ChildStdout)> {
        let err = open_log(log, cmd)?;
        let mut proc = Proc::start(name, cmd.stdout(Stdio::piped()).stderr(err))?;
        let stdout = proc.child.stdout.take().expect("stdout is piped");
        Ok((proc, stdout))
    }

    fn start(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            stop_signal: libc::SIGTERM,
            status: None,
        })
    }

    /// Stops it with `signal` instead of SIGTERM.
    pub fn stop_with(mut self, signal: libc::c_int) -> Proc {
        self.stop_signal = signal;
        self
    }

    /// Sends `signal`, unless it has been reaped.
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.try_wait().is_none() {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit pid_t");
            // SAFETY: kill(2) of our own child, not reaped yet, so its pid
            // cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Its exit status, once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(5))
    }

    /// Its stop signal, up to `grace` to exit, then SIGKILL; its status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        self.signal(self.stop_signal);
        if let Some(status) = self.wait_timeout(grace) {
            return Some(status);
        }
        eprintln!(
            "xtask: {} did not exit within {grace:?}; killing it",
            self.name
        );
        self.kill()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

fn open_log(log: &Path, cmd: &Command) -> Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(file, "=== {cmd:?}")?;
    Ok(file)
}
