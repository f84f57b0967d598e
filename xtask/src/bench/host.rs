//! The machine as the benchmarks see it: cgroups to run servers in, child
//! processes that are stopped when dropped, procfs readings, a sysctl that is
//! put back, free ports, a lock that keeps two runs apart, and small
//! statistics.
//!
//! Owns nothing meterd-specific (that is `agent`) and no measurement logic
//! (the bench modules).

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// An exclusive lock on a file, held while the value lives: two bench runs
/// share the `meterd-bench` cgroup, the bench pin dir and the ports, and a
/// second one would tear down the first's (the kernel drops the lock with
/// the process, so a killed run leaves none behind).
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    /// Takes the lock at `path`, or says which run holds it.
    pub fn take(path: &Path) -> Result<RunLock> {
        use std::os::fd::AsRawFd as _;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = fs::read_to_string(path).unwrap_or_default();
            let holder = if holder.trim().is_empty() {
                "unknown"
            } else {
                holder.trim()
            };
            bail!(
                "another `cargo xtask bench` is running (pid {}): runs share the meterd-bench \
                 cgroup, pin dir and ports, so this one would break it; wait for it to finish \
                 (the lock is {})",
                holder,
                path.display()
            );
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(RunLock { _file: file })
    }
}

/// Mount point of the cgroup v2 hierarchy, from /proc/mounts (never
/// assumed: hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context(
            "no cgroup v2 hierarchy is mounted; meterd attaches to one (see `cargo xtask setup`)",
        )
}

/// A cgroup v2 directory that exists for the benchmark; whatever still runs
/// in it is killed and the directory removed on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `parent/name`, replacing a leftover of a crashed run.
    pub fn create(parent: &Path, name: &str) -> Result<Cgroup> {
        let path = parent.join(name);
        if path.exists() {
            remove_cgroup(&path);
        }
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `program args..` started inside this cgroup: a shell joins it, then
    /// execs the program, so every socket the program creates belongs here.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.path)
            .arg(program);
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Kills everything in a cgroup (and below) and removes it, bottom up.
pub fn remove_cgroup(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    // cgroup.kill: kernel >= 5.14, which meterd requires anyway.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() && fs::remove_dir(path).is_err() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is asked to stop (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Starts `cmd`. It gets SIGTERM if the bench dies without dropping it
    /// (killed by pid): an agent, a server or a helper is never left
    /// running after its bench (the next run starts over its cgroups).
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> Result<Proc> {
        use std::os::unix::process::CommandExt as _;
        let name = name.into();
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent. The death signal follows the thread that forks; every
        // bench spawns from its main thread.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} (is it installed?)"))?;
        Ok(Proc { name, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`; returns whether it exited on SIGTERM.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if self.exited().is_some() {
            return true;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: {} (pid {}) did not stop within {grace:?} of SIGTERM: killing it",
            self.name,
            self.pid()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Reads one line from a helper's stdout, failing after `timeout` (the
/// helper prints one line per command it finished).
pub fn read_line(out: &mut BufReader<ChildStdout>, timeout: Duration) -> Result<String> {
    // A blocking read with a deadline: poll(2) on the pipe first.
    let fd = std::os::fd::AsRawFd::as_raw_fd(out.get_ref());
    let deadline = Instant::now() + timeout;
    let mut line = String::new();
    loop {
        if !out.buffer().is_empty() || poll_readable(fd, Duration::from_millis(200)) {
            let n = out
                .read_line(&mut line)
                .context("reading a helper's output")?;
            if n == 0 {
                bail!("the helper exited");
            }
            if line.ends_with('\n') {
                return Ok(line.trim_end().to_owned());
            }
        }
        if Instant::now() > deadline {
            bail!("no answer from the helper within {timeout:?}");
        }
    }
}

fn poll_readable(fd: i32, wait: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&raw mut pfd, 1, ms) > 0 }
}

/// Writes a command line to a helper.
pub fn send_line(input: &mut ChildStdin, line: &str) -> Result<()> {
    writeln!(input, "{line}").context("writing to a helper")?;
    input.flush().context("writing to a helper")
}

/// A TCP port free on every address, in 30000..32700: above the block the
/// end-to-end tests use (20000..29600) and below the kernel's ephemeral range
/// (32768..), so no client socket can take it while the bench runs.
pub fn free_port(avoid: &[u16]) -> Result<u16> {
    let start = 30_000 + (std::process::id() % 2_000) as u16;
    for offset in 0..2_700u16 {
        let port = 30_000 + (start - 30_000 + offset) % 2_700;
        if avoid.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port in 30000..32700")
}

/// Whether something listens on TCP `port` (any address), per
/// /proc/net/tcp and tcp6 (iperf3 listens on a dual-stack IPv6 socket).
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        fs::read_to_string(file).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut f = line.split_whitespace();
                let local = f.nth(1).unwrap_or_default();
                let state = f.nth(1).unwrap_or_default();
                local.ends_with(&want) && state == "0A"
            })
        })
    })
}

/// Waits until `port` listens or `timeout` passes.
pub fn wait_listening(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !listening(port) {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// utime + stime of a process (all its threads), from /proc/PID/stat.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces: fields count from after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the man page, utime 14, stime 15.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .context("short /proc/PID/stat")?
            .parse()
            .context("bad /proc/PID/stat")
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_secs_f64(total as f64 / clock_ticks()))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// A `/proc/PID/status` field in kB (`VmHWM`, `VmRSS`), as bytes.
pub fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Busy and total CPU time of the whole machine (all CPUs), in clock ticks,
/// from the `cpu` line of /proc/stat.
pub fn machine_cpu() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// The cumulative `some` CPU stall time from /proc/pressure/cpu, in µs;
/// `None` without PSI.
pub fn psi_cpu_some_us() -> Option<u64> {
    let text = fs::read_to_string("/proc/pressure/cpu").ok()?;
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total=")?.parse().ok())
}

/// Converts machine ticks to seconds.
pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks()
}

/// CPU time (user + system) of this process's reaped children so far.
pub fn children_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.try_into().unwrap_or(0))
            + Duration::from_micros(t.tv_usec.try_into().unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Online CPUs.
pub fn cpus() -> usize {
    thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The hard open-file limit: what a process may raise its own limit to
/// (root only beyond it with CAP_SYS_RESOURCE, which a sandbox may lack).
pub fn nofile_hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_max
}

/// Raises this process's soft open-file limit to the hard limit.
pub fn raise_nofile() -> Result<()> {
    let max = nofile_hard_limit();
    let lim = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
        bail!(
            "cannot raise the open-file limit to {max}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A sysctl under /proc/sys set for the benchmark and put back on drop.
pub struct Sysctl {
    path: PathBuf,
    before: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> Result<Sysctl> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let before = fs::read_to_string(&path)
            .with_context(|| format!("reading sysctl {name}"))?
            .trim()
            .to_owned();
        fs::write(&path, value).with_context(|| format!("setting sysctl {name}={value}"))?;
        Ok(Sysctl { path, before })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(&self.path, &self.before);
    }
}

/// A cgroup_skb egress program that only returns 1 (let the packet
/// through), attached to a cgroup while this lives: the floor of what any
/// program there costs, and of what `kernel.bpf_stats_enabled` adds to
/// each run it times. Loaded with the raw `bpf()` syscall: two
/// instructions need no object file.
pub struct NoopEgress {
    prog: std::os::fd::OwnedFd,
    cgroup: std::os::fd::OwnedFd,
    /// The program's id, for `bpftool prog show id`.
    pub id: u32,
}

/// `BPF_PROG_LOAD` etc., `BPF_PROG_TYPE_CGROUP_SKB`, `BPF_CGROUP_INET_EGRESS`
/// and `BPF_F_ALLOW_MULTI` from the kernel's uapi `linux/bpf.h`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
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

/// `union bpf_attr` for `BPF_PROG_ATTACH` / `BPF_PROG_DETACH`.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `union bpf_attr` prefix of the
    // size passed; the kernel zero-extends the rest.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a file descriptor the kernel just returned.
fn owned(fd: libc::c_long) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = i32::try_from(fd).context("bpf() returned an fd out of range")?;
    // SAFETY: a new descriptor the kernel returned to this process, owned
    // by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

impl NoopEgress {
    pub fn attach(cgroup: &Path) -> Result<NoopEgress> {
        use std::os::fd::AsRawFd as _;
        // r0 = 1; exit.
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = b"GPL\0";
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"meterd_noop");
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_SKB,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..ProgLoadAttr::default()
        };
        let prog = owned(bpf(BPF_PROG_LOAD, &mut load).context("loading a no-op egress program")?)?;
        let dir =
            fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let cgroup_fd = std::os::fd::OwnedFd::from(dir);
        let mut attach = AttachAttr {
            target_fd: u32::try_from(cgroup_fd.as_raw_fd())?,
            attach_bpf_fd: u32::try_from(prog.as_raw_fd())?,
            attach_type: BPF_CGROUP_INET_EGRESS,
            attach_flags: BPF_F_ALLOW_MULTI,
        };
        bpf(BPF_PROG_ATTACH, &mut attach)
            .with_context(|| format!("attaching a no-op egress program to {}", cgroup.display()))?;
        // `struct bpf_prog_info` starts with type, id.
        let mut info = [0u32; 2];
        let mut get = InfoAttr {
            bpf_fd: u32::try_from(prog.as_raw_fd())?,
            info_len: 8,
            info: info.as_mut_ptr() as u64,
        };
        // Built first, so an error below still detaches it.
        let mut noop = NoopEgress {
            prog,
            cgroup: cgroup_fd,
            id: 0,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get).context("reading the no-op program's id")?;
        noop.id = info[1];
        Ok(noop)
    }
}

impl Drop for NoopEgress {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        let (Ok(target_fd), Ok(attach_bpf_fd)) = (
            u32::try_from(self.cgroup.as_raw_fd()),
            u32::try_from(self.prog.as_raw_fd()),
        ) else {
            return;
        };
        let mut detach = AttachAttr {
            target_fd,
            attach_bpf_fd,
            attach_type: BPF_CGROUP_INET_EGRESS,
            attach_flags: 0,
        };
        // Detached or not, the cgroup's removal releases it.
        let _ = bpf(BPF_PROG_DETACH, &mut detach);
    }
}

/// A PM QoS request of zero wakeup latency, held while this lives: the
/// cpuidle governor then keeps idle CPUs in their polling state instead of
/// halting them. The kernel drops the request when the file closes, so a
/// killed bench leaves nothing behind.
pub struct PollIdle {
    _request: fs::File,
}

impl PollIdle {
    pub const DEVICE: &'static str = "/dev/cpu_dma_latency";

    pub fn hold() -> Result<PollIdle> {
        use std::io::Write as _;
        let mut request = fs::OpenOptions::new()
            .write(true)
            .open(Self::DEVICE)
            .with_context(|| format!("opening {}", Self::DEVICE))?;
        request
            .write_all(&0_i32.to_ne_bytes())
            .with_context(|| format!("writing 0 to {}", Self::DEVICE))?;
        Ok(PollIdle { _request: request })
    }
}

/// How this host's idle CPUs wait, for the notes: the cpuidle driver and
/// its states (e.g. `haltpoll: POLL, haltpoll idle`), and a guest's
/// halt-polling budget when the driver has one.
pub fn idle_description() -> String {
    let base = Path::new("/sys/devices/system/cpu");
    let driver = fs::read_to_string(base.join("cpuidle/current_driver"))
        .map_or_else(|_| "none".to_owned(), |s| s.trim().to_owned());
    let mut states = Vec::new();
    for i in 0.. {
        let Ok(name) = fs::read_to_string(base.join(format!("cpu0/cpuidle/state{i}/name"))) else {
            break;
        };
        states.push(name.trim().to_owned());
    }
    let poll_ns = fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .map(|s| format!(", guest_halt_poll_ns={}", s.trim()))
        .unwrap_or_default();
    format!(
        "cpuidle driver {driver} (states: {}){poll_ns}",
        states.join(", ")
    )
}

/// Median of `xs` (NaN when empty).
pub fn median(xs: &[f64]) -> f64 {
    quantile(xs, 0.5)
}

/// Linear-interpolated quantile `q` of `xs` (NaN when empty).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// A 95% bootstrap confidence interval of the median of `xs` (percentile
/// method, 4000 resamples, fixed seed so a rerun on the same samples agrees).
pub fn median_ci95(xs: &[f64]) -> (f64, f64) {
    if xs.len() < 2 {
        let m = median(xs);
        return (m, m);
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*: plenty for resampling indices.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut medians = Vec::with_capacity(4000);
    let mut sample = vec![0.0; xs.len()];
    for _ in 0..4000 {
        for slot in &mut sample {
            *slot = xs[(next() % xs.len() as u64) as usize];
        }
        medians.push(median(&sample));
    }
    (quantile(&medians, 0.025), quantile(&medians, 0.975))
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Runs a short command to completion and returns its stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_run_lock_is_refused_until_the_first_is_dropped() {
        let path = std::env::temp_dir().join(format!("meterd-bench-lock-{}", std::process::id()));
        let first = RunLock::take(&path).unwrap();
        let err = RunLock::take(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "names the holder: {err}"
        );
        drop(first);
        let again = RunLock::take(&path);
        assert!(again.is_ok(), "free again once dropped: {again:?}");
        drop(again);
        let _ = fs::remove_file(&path);
    }

    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let xs = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(median(&xs), 2.5);
        assert_eq!(quantile(&xs, 0.0), 1.0);
        assert_eq!(quantile(&xs, 1.0), 4.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn median_interval_brackets_the_median() {
        let xs: Vec<f64> = (0..41).map(|i| 0.9 + f64::from(i) * 0.005).collect();
        let (lo, hi) = median_ci95(&xs);
        assert!(lo <= median(&xs) && median(&xs) <= hi);
        assert!(lo >= 0.9 && hi <= 1.1);
    }
}
