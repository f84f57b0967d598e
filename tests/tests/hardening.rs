//! Issue 12 end to end: what meterd must not damage, lose or bill twice
//! when the host or its users misbehave, and what its errors must say.
//!
//! - Files that are not meterd's: an ordinary `pin_dir` given to `meterd
//!   unload`, a regular file at `api.socket`, foreign pins in the pin dir.
//! - Ledger faults: the ledger deleted while the agent runs, and a full disk
//!   under it. The agent must stop with an error and keep the kernel's
//!   records, and a restart must bill every connection exactly once.
//! - Two agents on one set of pins (through a symlink) are refused; one on
//!   another directory of the same name is not.
//! - Thousands of half-open connections cannot take `/metrics`, the API or
//!   the agent's file descriptors.
//! - UDP flows the server never answered bill nobody.
//! - Config and startup errors name the field and the fix; the status
//!   report is on the API, not on the metrics port.
//! - The metered cgroup recreated (item 1), with the agent running and
//!   stopped: metered again, every connection billed exactly.
//! - Another sock_ops program's callback flags survive meterd's (item 9),
//!   and an untracked close from FIN_WAIT2 is not billed the client's FIN
//!   (item 10).
//! - The close ring full while the agent is stopped: the closes past it
//!   are billed from their live slots, none lost.
//!
//! Every verdict is a real outcome: files still there with their contents,
//! `meterd`'s exit status and stderr, the ledger export and the closed log
//! against the traffic tool's own logs. Where a test needs an agent's exit
//! status it starts that run itself ([`Run`]); the harness's [`Agent`]
//! still owns the config, the restarts, the exports and the cleanup.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd},
        unix::{fs::PermissionsExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use meterd_tests::{
    Agent, AgentConfig, CloseOrder, Setup, Source, TcpClient, TestEnv, UdpClient,
    agent::meterd_bin,
    http,
    ledger::Ledger,
    port,
    privilege::BPFFS,
    process::{Proc, read_lossy, wait_until},
    records,
    sockops_probe::RttProbe,
    traffic_bin,
    wire::ConnLog,
};

/// Keeps the interval at its base: a loaded test machine must not widen it
/// and stretch the time the tests give the agent to notice a fault.
const PINNED_INTERVAL: &str = "[governor]\nmax_interval = \"1s\"\n";

/// A TCP API token of the length meterd asks for.
const TOKEN: &str = "hardening-test-token-0123";

fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The harness's pin dir for `env` (`TestEnv` pins under
/// `/sys/fs/bpf/<unique>`).
fn pin_dir(env: &TestEnv) -> PathBuf {
    Path::new(BPFFS).join(env.unique())
}

fn tcp_config(ports: &[u16]) -> AgentConfig {
    AgentConfig {
        tcp_ports: ports.to_vec(),
        extra_toml: PINNED_INTERVAL.to_owned(),
        ..AgentConfig::default()
    }
}

/// `meterd <args>`, run to completion.
fn meterd(args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new(meterd_bin());
    cmd.args(args);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The instance lock meterd takes for `pin_dir` (its canonical path, `/`
/// as `-`, in /run/meterd); `meterd unload` takes it too, so a test that
/// runs meterd on a pin dir of its own removes it afterwards.
fn instance_lock(pin_dir: &Path) -> PathBuf {
    let canonical = match (pin_dir.parent(), pin_dir.file_name()) {
        (Some(parent), Some(name)) => {
            fs::canonicalize(parent).map_or_else(|_| pin_dir.to_owned(), |p| p.join(name))
        }
        _ => pin_dir.to_owned(),
    };
    let canonical = fs::canonicalize(&canonical).unwrap_or(canonical);
    let name = canonical
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "-");
    PathBuf::from(format!("/run/meterd/{name}.lock"))
}

/// Removes paths on drop (lock files, records, empty directories the
/// test made on bpffs), also when the test panics.
struct RemoveOnDrop(Vec<PathBuf>);

/// What an agent on `pin_dir` leaves in /run/meterd that the harness does
/// not remove: the record client commands find it by, which a killed
/// agent (the harness ends its agents with SIGKILL) never removes, and
/// the instance lock.
fn run_files(pin_dir: &Path) -> RemoveOnDrop {
    let lock = instance_lock(pin_dir);
    let name = lock.file_stem().unwrap().to_string_lossy().into_owned();
    RemoveOnDrop(vec![
        PathBuf::from(format!("/run/meterd/agents/{name}.json")),
        lock,
    ])
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path).or_else(|_| fs::remove_dir(path));
        }
    }
}

/// Removes a directory tree of the test's own on drop.
struct RemoveTree(PathBuf);

impl Drop for RemoveTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The pid of the `meterd run` process started with `config`.
fn agent_pid(config: &Path) -> u32 {
    let wanted = config.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.get(1) == Some(&&b"run"[..]) && args.contains(&wanted) {
            found.push(pid);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "want one `meterd run --config {}` process, found {found:?}",
        config.display()
    );
    found[0]
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The soft `RLIMIT_NOFILE` of a process, from /proc/PID/limits.
fn nofile_limit(pid: u32) -> usize {
    let limits = read_lossy(Path::new(&format!("/proc/{pid}/limits")));
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
        .unwrap_or_else(|| panic!("no open-file limit in /proc/{pid}/limits:\n{limits}"))
}

/// A `meterd run` the test starts itself, to see how it ends: its exit
/// status and output. (The harness's `Agent::start` panics when a run
/// exits before it is ready, and keeps no exit status of a run that ends
/// on its own.)
struct Run {
    proc: Proc,
    ready: PathBuf,
    label: String,
}

impl Run {
    /// `meterd run --config F [--closed-log L] --ready-file R`, output in
    /// `<dir>/<label>.log`.
    fn spawn(config: &Path, closed_log: Option<&Path>, dir: &Path, label: &str) -> Run {
        let ready = dir.join(format!("{label}.ready"));
        let _ = fs::remove_file(&ready);
        let mut cmd = Command::new(meterd_bin());
        cmd.arg("run").arg("--config").arg(config);
        if let Some(log) = closed_log {
            cmd.arg("--closed-log").arg(log);
        }
        cmd.arg("--ready-file").arg(&ready);
        let proc = Proc::spawn(label, &mut cmd, &dir.join(format!("{label}.log")));
        Run {
            proc,
            ready,
            label: label.to_owned(),
        }
    }

    /// The run of the harness agent's config and closed log.
    fn of(agent: &Agent, dir: &Path, label: &str) -> Run {
        Run::spawn(agent.config_path(), Some(agent.closed_log()), dir, label)
    }

    /// Waits for the ready file; panics if the run exits first or is not
    /// ready within 30 s.
    fn wait_ready(&mut self) {
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(30), || {
            exited = self.proc.try_wait();
            exited.is_some() || self.ready.exists()
        });
        assert!(
            ready && exited.is_none(),
            "{} was not ready within 30 s ({exited:?}); its output:\n{}",
            self.label,
            self.proc.output_tail(40)
        );
    }

    /// The exit status, once the run has exited (`None` after `timeout`).
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_timeout(timeout)
    }

    /// Waits for the run to end on its own within `timeout` and returns its
    /// status; panics with its output if it is still running.
    fn expect_exit(&mut self, timeout: Duration, why: &str) -> ExitStatus {
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "{} still runs after {timeout:?}: {why}; its output:\n{}",
                self.label,
                self.proc.output_tail(40)
            )
        })
    }

    fn output(&self) -> String {
        self.proc.output()
    }
}

/// Waits until the ledger export of `agent` is exact for `truth` (every
/// connection once with its bytes, nothing else, sessions consistent with
/// their connections), then checks again two intervals later.
fn wait_for_exact_ledger(agent: &Agent, truth: &[ConnLog]) -> Ledger {
    let service_of = |_: &ConnLog| records::SERVICE.to_owned();
    let config = agent.config();
    let timeout = Duration::from_secs(30) + config.session_idle;
    let started = Instant::now();
    loop {
        let cmp = agent.ledger().compare(truth, &service_of);
        if cmp.is_exact() {
            thread::sleep(config.interval * 2 + Duration::from_secs(1));
            let again = agent.ledger();
            let cmp = again.compare(truth, &service_of);
            assert!(
                cmp.is_exact(),
                "the ledger changed after it matched:\n{}\nagent log:\n{}",
                cmp.diff(),
                agent.log_tail(40)
            );
            return again;
        }
        assert!(
            started.elapsed() < timeout,
            "the ledger does not match the server's log after {:.1?}:\n{}\nagent log:\n{}",
            started.elapsed(),
            cmp.diff(),
            agent.log_tail(40)
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the closed log holds exactly one exact record per
/// connection of `truth`, then checks again two intervals later.
fn wait_for_exact_closed_log(agent: &Agent, truth: &[ConnLog]) {
    let started = Instant::now();
    loop {
        let cmp = records::compare(truth, &agent.closed_records());
        if cmp.is_exact() {
            thread::sleep(agent.config().interval * 2 + Duration::from_secs(1));
            let cmp = records::compare(truth, &agent.closed_records());
            assert!(
                cmp.is_exact(),
                "the closed log changed after it matched:\n{}",
                cmp.diff()
            );
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the closed log {} does not match the server's log:\n{}\nagent log:\n{}",
            agent.closed_log().display(),
            cmp.diff(),
            agent.log_tail(40)
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// `GET path` on the API's unix socket: (status, body).
fn get_unix(socket: &Path, path: &str) -> (u16, String) {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: meterd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", socket.display()));
    split_response(&raw)
}

/// `GET path` on the TCP API with the bearer token: (status, body).
fn get_tcp_api(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(15))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: meterd\r\nAuthorization: Bearer {TOKEN}\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    Ok(split_response(&raw))
}

fn split_response(raw: &str) -> (u16, String) {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {raw:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

// ---------------------------------------------------------------------
// Files that are not meterd's (items 13, 14, 15)
// ---------------------------------------------------------------------

/// Item 13: `meterd unload` with `agent.pin_dir` an ordinary directory
/// refuses, names bpffs, exits non-zero, and deletes nothing, also entries
/// whose names look like meterd's own pins. Item 15's message: a pin_dir
/// with `..` is refused by `check-config`, naming '..'.
#[test]
fn unload_refuses_a_pin_dir_that_is_not_on_bpffs() {
    let Some(env) = TestEnv::new("hard-unload", traffic_bin!(), Setup::default()) else {
        return;
    };
    let dir = env.dir();
    let pins = dir.join("not-bpffs");
    fs::create_dir_all(pins.join("object-0123")).unwrap();
    let files = [
        (pins.join("keep.txt"), "an operator's file\n"),
        (pins.join("LIVE"), "named like meterd's map\n"),
        (pins.join("link_sock_ops"), "named like meterd's link\n"),
        (pins.join("object-0123/inner"), "inside a marker-like dir\n"),
    ];
    for (path, text) in &files {
        fs::write(path, text).unwrap();
    }
    let _lock = RemoveOnDrop(vec![instance_lock(&pins)]);
    let config = dir.join("unload.toml");
    fs::write(
        &config,
        tcp_config(&[port(0, 0)]).to_toml(env.cgroup().path(), &pins, &dir.join("l.sqlite")),
    )
    .unwrap();

    let out = meterd(&["unload".as_ref(), "--config".as_ref(), config.as_os_str()]);
    let stderr = stderr_of(&out);
    assert!(
        !out.status.success(),
        "meterd unload on an ordinary directory succeeded ({}): {stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("bpffs") && stderr.contains(&pins.display().to_string()),
        "the refusal names neither bpffs nor the directory: {stderr}"
    );
    for (path, text) in &files {
        assert_eq!(
            fs::read_to_string(path).ok().as_deref(),
            Some(*text),
            "{} was touched by `meterd unload`",
            path.display()
        );
    }
    eprintln!("hard-unload: refused: {}", stderr.trim());

    // `..` in pin_dir: refused before anything runs, naming it.
    let dotdot = Path::new(BPFFS).join("..").join("bpf").join(env.unique());
    let config = dir.join("dotdot.toml");
    fs::write(
        &config,
        tcp_config(&[port(0, 0)]).to_toml(env.cgroup().path(), &dotdot, &dir.join("l.sqlite")),
    )
    .unwrap();
    let out = meterd(&["check-config".as_ref(), config.as_os_str()]);
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "check-config accepted {dotdot:?}");
    assert!(
        stderr.contains("agent.pin_dir") && stderr.contains("'..'"),
        "the refusal of {dotdot:?} names neither agent.pin_dir nor '..': {stderr}"
    );
}

/// Item 13, the other half: on a real pin dir, `meterd unload` removes
/// meterd's own pins and leaves (and names) a pin it did not make.
#[test]
fn unload_leaves_pins_it_did_not_make() {
    let Some(mut env) = TestEnv::new("hard-foreign", traffic_bin!(), Setup::default()) else {
        return;
    };
    env.start_agent(tcp_config(&[port(1, 0)]));
    let _files = run_files(&pin_dir(&env));
    env.agent().stop();
    let pins = pin_dir(&env);
    let foreign = pins.join("foreign_map");
    let _cleanup = RemoveOnDrop(vec![foreign.clone(), pins.clone()]);
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&foreign)
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "1", "name", "foreign",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map create failed: {}",
        stderr_of(&out)
    );
    let ours: Vec<String> = fs::read_dir(&pins)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "foreign_map")
        .collect();
    assert!(
        ours.iter().any(|n| n.starts_with("link_")),
        "no link pins in {}: {ours:?}",
        pins.display()
    );

    let (ok, output) = env.agent().unload();
    assert!(ok, "meterd unload failed: {output}");
    assert!(
        output.contains("foreign_map"),
        "unload does not name the entry it left: {output}"
    );
    let left: Vec<String> = fs::read_dir(&pins)
        .unwrap_or_else(|e| panic!("{} is gone, with the foreign pin: {e}", pins.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        ["foreign_map"],
        "after unload, {} holds {left:?}; meterd's pins were {ours:?}",
        pins.display()
    );
    eprintln!("hard-foreign: {}", output.trim());
}

/// Item 14: `api.socket` pointing at an existing regular file: `meterd run`
/// refuses to start, says it is not a socket, and the file is intact.
#[test]
fn api_socket_at_a_regular_file_is_refused_and_kept() {
    let Some(env) = TestEnv::new("hard-sockfile", traffic_bin!(), Setup::default()) else {
        return;
    };
    let precious = env.dir().join("precious.txt");
    let text = "not a socket: an operator's file\n";
    fs::write(&precious, text).unwrap();
    let config = AgentConfig {
        extra_toml: format!("[api]\nsocket = \"{}\"\n", precious.display()),
        ..tcp_config(&[port(2, 0)])
    };
    // Never started: it holds the config and unloads whatever the refused
    // run attached before it reached the API.
    let agent = Agent::new(env.dir(), env.cgroup().path(), &pin_dir(&env), config);
    let _files = run_files(&pin_dir(&env));
    let mut run = Run::of(&agent, env.dir(), "meterd-sockfile");
    let status = run.expect_exit(
        Duration::from_secs(30),
        "it started with a regular file at api.socket",
    );
    let output = run.output();
    assert!(!status.success(), "exited {status}:\n{output}");
    assert!(
        output.contains("is not a socket") && output.contains(&precious.display().to_string()),
        "the error does not say that {} is not a socket:\n{output}",
        precious.display()
    );
    let meta = fs::symlink_metadata(&precious)
        .unwrap_or_else(|e| panic!("{} is gone: {e}", precious.display()));
    assert!(meta.is_file(), "{} is no longer a file", precious.display());
    assert_eq!(fs::read_to_string(&precious).unwrap(), text);
}

// ---------------------------------------------------------------------
// Ledger faults (items 2, 3)
// ---------------------------------------------------------------------

/// Item 3: the ledger file deleted while the agent runs. Within a cycle or
/// two (the next commit) the agent logs an error and exits non-zero,
/// releasing no record of the connections that closed since; the kernel
/// keeps counting; restarted on a fresh ledger at the path, the agent bills
/// every connection that closed after the deletion, each with the bytes
/// the server logged, and the closed log has every connection once.
#[test]
fn deleted_ledger_stops_the_agent_and_a_restart_bills_the_backlog() {
    let Some(mut env) = TestEnv::new("hard-deleted", traffic_bin!(), Setup::default()) else {
        return;
    };
    let listen = loopback4(port(3, 0));
    let server = env.tcp_server(&[listen]);
    let mut agent = Agent::new(
        env.dir(),
        env.cgroup().path(),
        &pin_dir(&env),
        tcp_config(&[listen.port()]),
    );
    let _files = run_files(&pin_dir(&env));
    let mut first = Run::of(&agent, env.dir(), "meterd-first");
    first.wait_ready();

    let before = env.run_tcp_client(&TcpClient {
        count: 10,
        parallel: 2,
        source: Source::Distinct,
        ..TcpClient::new(listen, 50_000, 1000)
    });
    let truth_before = env.tcp_truth(&server, &[&before]);
    wait_for_exact_ledger(&agent, &truth_before);

    fs::remove_file(agent.ledger_path()).unwrap();
    let deleted = Instant::now();
    // ~3 s of short connections (each held open 100 ms), each a viewer of
    // its own, closing from now on: while the first run notices, and after
    // it has stopped.
    let mut after = env.spawn_tcp_client(&TcpClient {
        count: 60,
        parallel: 2,
        close: CloseOrder::Alternate,
        hold_ms: 100,
        source: Source::Distinct,
        ..TcpClient::new(listen, 40_000, 500)
    });
    // A cycle or two of 1 s, with room for a loaded machine.
    let status = first.expect_exit(
        Duration::from_secs(5),
        "the ledger was deleted 5 s ago and it goes on as if nothing happened",
    );
    let noticed = deleted.elapsed();
    let output = first.output();
    assert!(
        !status.success(),
        "the agent exited {status} after its ledger was deleted:\n{output}"
    );
    assert!(
        output.contains("was deleted or replaced")
            && output.contains(&agent.ledger_path().display().to_string()),
        "no error naming the deleted ledger:\n{output}"
    );
    assert!(
        !after.finished(),
        "the connections after the deletion were over before the agent stopped: make them longer"
    );
    let after = after.finish(Duration::from_secs(60));
    eprintln!("hard-deleted: the agent exited {status} {noticed:.1?} after the deletion");

    // A fresh ledger at the path (the deleted one is gone for good).
    agent.start();
    let truth_after = env.tcp_truth(&server, &[&after]);
    assert_eq!(truth_after.len(), 60);
    let ledger = wait_for_exact_ledger(&agent, &truth_after);
    assert_eq!(
        ledger.sessions.len(),
        truth_after.len(),
        "a session per viewer"
    );
    let truth_all = env.tcp_truth(&server, &[&before, &after]);
    wait_for_exact_closed_log(&agent, &truth_all);
    agent.stop();
}

/// A tmpfs the test mounts; unmounted on drop (lazily if it is busy).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {}: {}",
            dir.display(),
            stderr_of(&out)
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Item 2: a ledger write error (a full disk) while connections close. The
/// agent exits non-zero with an error naming the ledger and the full disk,
/// and releases no close record it could not commit; once there is space
/// again, a restart bills every connection exactly once, connection by
/// connection against the server's log, and the closed log has each once.
#[test]
fn full_disk_under_the_ledger_loses_no_record() {
    let Some(mut env) = TestEnv::new("hard-full", traffic_bin!(), Setup::default()) else {
        return;
    };
    let listen = loopback4(port(4, 0));
    let server = env.tcp_server(&[listen]);
    let mount = Tmpfs::mount(&env.dir().join("ledger-fs"), "16m");
    let ledger_path = mount.dir.join("ledger.sqlite");
    let config = tcp_config(&[listen.port()]);
    let mut agent = Agent::new(
        env.dir(),
        env.cgroup().path(),
        &pin_dir(&env),
        config.clone(),
    );
    // The same config with the ledger on the small tmpfs: the agent's runs
    // and the exports read this file.
    fs::write(
        agent.config_path(),
        config.to_toml(env.cgroup().path(), &pin_dir(&env), &ledger_path),
    )
    .unwrap();
    let _files = run_files(&pin_dir(&env));
    let mut first = Run::of(&agent, env.dir(), "meterd-first");
    first.wait_ready();

    // ~8 s of short connections (each held open 200 ms), each a viewer of
    // its own.
    let mut client = env.spawn_tcp_client(&TcpClient {
        count: 120,
        parallel: 3,
        close: CloseOrder::Alternate,
        hold_ms: 200,
        source: Source::Distinct,
        ..TcpClient::new(listen, 40_000, 700)
    });
    // The disk fills after the first few are billed, while SQLite's WAL is
    // still growing (before its first checkpoint, ~1000 pages): from then
    // on every commit needs space. Later, a checkpointed WAL is rewritten
    // in place and an agent may go on committing on a full disk for a while.
    let first_billed = || agent.closed_records().len() >= 10;
    assert!(
        wait_until(Duration::from_secs(20), first_billed),
        "the first connections were not billed; agent output:\n{}",
        first.output()
    );
    let fill = mount.dir.join("fill");
    let dd = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", fill.display()))
        .args(["bs=64k", "status=none"])
        .output()
        .expect("run dd");
    assert!(
        stderr_of(&dd).contains("No space left"),
        "dd did not fill the tmpfs: {}",
        stderr_of(&dd)
    );
    let filled = Instant::now();
    let status = first.expect_exit(
        Duration::from_secs(20),
        "its ledger's disk has been full for 20 s while connections closed",
    );
    let output = first.output();
    assert!(
        !status.success(),
        "the agent exited {status} on a full disk:\n{output}"
    );
    assert!(
        output.contains("full") && output.contains(&ledger_path.display().to_string()),
        "no error naming the ledger and the full disk:\n{output}"
    );
    assert!(
        !client.finished(),
        "the connections were over before the agent stopped: make them longer"
    );
    eprintln!(
        "hard-full: the agent exited {status} {:.1?} after the disk filled: {}",
        filled.elapsed(),
        output
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or_default()
    );
    let summary = client.finish(Duration::from_secs(60));

    fs::remove_file(&fill).unwrap();
    agent.start();
    let truth = env.tcp_truth(&server, &[&summary]);
    assert_eq!(truth.len(), 120);
    let ledger = wait_for_exact_ledger(&agent, &truth);
    assert_eq!(ledger.sessions.len(), truth.len(), "a session per viewer");
    wait_for_exact_closed_log(&agent, &truth);
    agent.stop();
}

// ---------------------------------------------------------------------
// One agent per set of pins (item 4)
// ---------------------------------------------------------------------

/// Item 4: a second agent whose `pin_dir` is a symlink to a running
/// agent's pins is refused ("another meterd (pid N) is running", N the
/// running agent's pid, which the lock file still holds), writes no
/// ledger, and the running agent bills the traffic exactly once.
#[test]
fn second_agent_on_symlinked_pins_is_refused() {
    let Some(mut env) = TestEnv::new("hard-symlink", traffic_bin!(), Setup::default()) else {
        return;
    };
    let listen = loopback4(port(5, 0));
    let config = tcp_config(&[listen.port()]);
    env.start_agent(config.clone());
    let _files = run_files(&pin_dir(&env));
    let server = env.tcp_server(&[listen]);
    let first_pid = agent_pid(env.agent().config_path());

    // On bpffs, named unlike its target: the old basename lock did not see
    // it.
    let link_name = format!("{}-link", env.unique());
    let link = Path::new(BPFFS).join(&link_name);
    // What a second agent would leave if it ran (the old, basename-keyed
    // lock let it).
    let _leftovers = RemoveOnDrop(vec![
        link.clone(),
        PathBuf::from(format!("/run/meterd/{link_name}.sock")),
        PathBuf::from(format!("/run/meterd/{link_name}.lock")),
    ]);
    std::os::unix::fs::symlink(pin_dir(&env), &link).unwrap();
    let second = env.dir().join("second");
    fs::create_dir_all(&second).unwrap();
    let second_config = second.join("meterd.toml");
    let second_ledger = second.join("ledger.sqlite");
    fs::write(
        &second_config,
        config.to_toml(env.cgroup().path(), &link, &second_ledger),
    )
    .unwrap();
    let second_log = second.join("closed.jsonl");
    let mut run = Run::spawn(&second_config, Some(&second_log), &second, "meterd-second");
    let status = run.expect_exit(
        Duration::from_secs(30),
        "a second agent runs on the same pins through a symlink",
    );
    let output = run.output();
    assert!(!status.success(), "exited {status}:\n{output}");
    assert!(
        output.contains("another meterd")
            && output.contains("is running")
            && output.contains(&format!("pid {first_pid}")),
        "the refusal does not name the running agent (pid {first_pid}):\n{output}"
    );
    let lock = instance_lock(&pin_dir(&env));
    assert_eq!(
        read_lossy(&lock).trim(),
        first_pid.to_string(),
        "{} after the refused start",
        lock.display()
    );
    assert!(
        !second_ledger.exists(),
        "the refused agent created its ledger"
    );

    let summary = env.run_tcp_client(&TcpClient {
        count: 20,
        parallel: 4,
        close: CloseOrder::Alternate,
        source: Source::Distinct,
        ..TcpClient::new(listen, 30_000, 1000)
    });
    let truth = env.tcp_truth(&server, &[&summary]);
    env.wait_for_exact_ledger(&truth, &|_: &ConnLog| records::SERVICE.to_owned());
    env.wait_for_exact_records(&truth);
    assert!(
        read_lossy(&second_log).trim().is_empty(),
        "the refused agent wrote closed records"
    );
    env.agent().assert_running();
}

/// Item 4, the other half: an agent on another directory whose name is
/// the same as a running agent's pin dir is not refused, and each agent
/// bills its own port exactly. First with an `api.socket` of its own (the
/// instance lock alone decides), and with the default config, whose API
/// socket is named after the pin dir's name too.
#[test]
fn agent_on_another_pin_dir_with_the_same_name_runs() {
    let Some(mut env) = TestEnv::new("hard-samename", traffic_bin!(), Setup::default()) else {
        return;
    };
    let (first_at, other_at) = (loopback4(port(6, 0)), loopback4(port(6, 1)));
    env.start_agent(tcp_config(&[first_at.port()]));
    let _files = run_files(&pin_dir(&env));
    let server = env.tcp_server(&[first_at, other_at]);

    let parent = Path::new(BPFFS).join(format!("{}-elsewhere", env.unique()));
    fs::create_dir_all(&parent).unwrap();
    let _parent = RemoveOnDrop(vec![parent.clone()]);
    let other_pins = parent.join(env.unique());
    let _other_files = run_files(&other_pins);
    let other_dir = env.dir().join("other");
    fs::create_dir_all(&other_dir).unwrap();
    let other_config = |extra: &str| AgentConfig {
        extra_toml: format!("{PINNED_INTERVAL}\n{extra}"),
        ..tcp_config(&[other_at.port()])
    };

    // The default config first: how it ends is judged at the end.
    let default_config = other_dir.join("default.toml");
    fs::write(
        &default_config,
        other_config("").to_toml(
            env.cgroup().path(),
            &other_pins,
            &other_dir.join("default.sqlite"),
        ),
    )
    .unwrap();
    let mut default_run = Run::spawn(&default_config, None, &other_dir, "meterd-default");
    let started = Instant::now();
    let default_refused = loop {
        if default_run.ready.exists() {
            break None;
        }
        if let Some(status) = default_run.wait_exit(Duration::from_millis(100)) {
            break Some((status, default_run.output()));
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "meterd with the default config neither ready nor exited after 30 s:\n{}",
            default_run.output()
        );
    };
    drop(default_run);

    let socket = other_dir.join("api.sock");
    let mut other = Agent::new(
        &other_dir,
        env.cgroup().path(),
        &other_pins,
        other_config(&format!("[api]\nsocket = \"{}\"\n", socket.display())),
    );
    other.start();
    let clients = |at| TcpClient {
        count: 10,
        parallel: 2,
        source: Source::Distinct,
        ..TcpClient::new(at, 20_000, 100)
    };
    let summaries = env.run_tcp_clients(&[clients(first_at), clients(other_at)]);
    let truth = env.tcp_truth(&server, &summaries.iter().collect::<Vec<_>>());
    let (first_truth, other_truth): (Vec<ConnLog>, Vec<ConnLog>) = truth
        .into_iter()
        .partition(|c| c.server_port == first_at.port());
    assert_eq!((first_truth.len(), other_truth.len()), (10, 10));
    env.wait_for_exact_ledger(&first_truth, &|_: &ConnLog| records::SERVICE.to_owned());
    wait_for_exact_ledger(&other, &other_truth);
    env.agent().assert_running();
    other.assert_running();
    other.stop();

    if let Some((status, output)) = default_refused {
        panic!(
            "with the default config, an agent on {} (another directory named like the \
             running agent's {}) was refused ({status}):\n{output}",
            other_pins.display(),
            pin_dir(&env).display()
        );
    }
}

// ---------------------------------------------------------------------
// Exhaustion (item 16)
// ---------------------------------------------------------------------

/// A non-blocking TCP connect to `addr`; the socket, connected or on its
/// way (a full accept queue leaves it in SYN_SENT).
fn connect_nonblocking(addr: SocketAddrV4) -> OwnedFd {
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a descriptor socket(2) just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect(2) reads a sockaddr_in of the size passed.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sa).cast::<libc::sockaddr>(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EINPROGRESS),
            "connect {addr}: {e}"
        );
    }
    fd
}

/// Whether the peer has closed (EOF or reset) a socket we never read from.
fn closed_by_peer(fd: &impl AsRawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv(2) into one byte we own; MSG_PEEK leaves it queued.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ECONNRESET | libc::EPIPE | libc::ETIMEDOUT)
        ),
    }
}

/// Raises this process's soft open-file limit to its hard one; the new
/// soft limit.
fn raise_own_nofile() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer, then a valid in pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Server-side TCP sockets on 127.0.0.1 at `ports` that are still open on
/// the server's side (ESTABLISHED: in the accept queue or accepted; or
/// CLOSE_WAIT), from /proc/net/tcp.
fn server_side_open(ports: &[u16]) -> usize {
    let table = read_lossy(Path::new("/proc/net/tcp"));
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return false;
            };
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            port.is_some_and(|p| ports.contains(&p)) && matches!(state, "01" | "08")
        })
        .count()
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("{addr} is not IPv4"),
    }
}

/// Item 16: thousands of idle TCP connections to the metrics port and to
/// the TCP API, more than each listener takes at once. `/metrics` and
/// `/v1/status` still answer; the agent never holds more than half of its
/// descriptor limit; the agent closes every idle connection (a lone one
/// between 2 s and 7 s after it opened: the 5 s header timeout, also for a
/// request head that never ends), and its descriptors return to what they
/// were.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn half_open_connections_do_not_exhaust_the_agent() {
    let Some(mut env) = TestEnv::new("hard-halfopen", traffic_bin!(), Setup::default()) else {
        return;
    };
    env.start_agent(AgentConfig {
        extra_toml: format!(
            "{PINNED_INTERVAL}\n[api]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ),
        ..tcp_config(&[port(7, 0)])
    });
    let _files = run_files(&pin_dir(&env));
    let ready = env.agent().ready();
    let metrics = ready.metrics;
    let api: SocketAddr = ready
        .api
        .parse()
        .unwrap_or_else(|e| panic!("api={} is no TCP address: {e}", ready.api));
    let pid = agent_pid(env.agent().config_path());
    let limit = nofile_limit(pid);
    let baseline = fd_count(pid);
    let own = raise_own_nofile();
    // Beyond a listener's share of the agent's limit (a quarter, at most
    // 4096), within this process's own limit.
    let per_listener = (limit / 4 + 1000)
        .min(6000)
        .min(own.saturating_sub(2000) / 2);
    assert!(
        per_listener > limit / 4,
        "this process may open {own} files: too few to flood a listener of an agent \
         limited to {limit}"
    );

    // Sample the agent's descriptors throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(fd_count(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let flooded = Instant::now();
    let mut flood = Vec::with_capacity(2 * per_listener);
    for _ in 0..per_listener {
        flood.push(connect_nonblocking(v4(metrics)));
        flood.push(connect_nonblocking(v4(api)));
    }
    eprintln!(
        "hard-halfopen: {} idle connections opened in {:.1?} (agent limit {limit}, {baseline} \
         descriptors before)",
        flood.len(),
        flooded.elapsed()
    );
    thread::sleep(Duration::from_millis(500));

    // Both endpoints answer while the flood holds (the first requests may
    // wait behind it, at most a header timeout or two).
    let asked = Instant::now();
    let (scrape, status) = thread::scope(|s| {
        let scrape = s.spawn(|| {
            let r = http::get(metrics, "/metrics");
            (r, asked.elapsed())
        });
        let status = s.spawn(|| (get_tcp_api(api, "/v1/status"), asked.elapsed()));
        (scrape.join().unwrap(), status.join().unwrap())
    });
    let response = scrape
        .0
        .unwrap_or_else(|e| panic!("GET /metrics during the flood: {e}"));
    assert_eq!(response.status, 200, "{}", response.head);
    assert!(response.body.contains("meterd_"), "{}", response.body);
    let (code, body) = status
        .0
        .unwrap_or_else(|e| panic!("GET /v1/status during the flood: {e}"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"sessions\""), "{body}");
    eprintln!(
        "hard-halfopen: /metrics answered after {:.1?}, /v1/status after {:.1?}",
        scrape.1, status.1
    );
    for (what, took) in [("/metrics", scrape.1), ("/v1/status", status.1)] {
        assert!(
            took < Duration::from_secs(12),
            "{what} took {took:.1?} to answer during the flood"
        );
    }

    // The agent closes every idle connection that reached it. (A flood
    // beyond the listen backlog also leaves client sockets whose handshake
    // the server's kernel dropped: open on the client side only, they
    // never reach the agent, so they are judged on the server side.)
    let ports = [metrics.port(), api.port()];
    let all_closed = wait_until(Duration::from_secs(40), || server_side_open(&ports) == 0);
    assert!(
        all_closed,
        "{} server-side connections of the listeners still open {:.1?} after the flood \
         began",
        server_side_open(&ports),
        flooded.elapsed()
    );
    let closed_after = flooded.elapsed();
    let closed = flood.iter().filter(|fd| closed_by_peer(*fd)).count();
    drop(flood);
    let settled = wait_until(Duration::from_secs(10), || fd_count(pid) <= baseline + 16);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "hard-halfopen: all closed {closed_after:.1?} after the flood began ({closed} seen \
         closed by the clients, the rest never got past the kernel's backlog); agent's \
         descriptors: peak {peak}, now {}",
        fd_count(pid)
    );
    assert!(
        peak <= limit / 2 + baseline,
        "the agent held {peak} descriptors of its {limit}: more than the half its listeners \
         may take (plus its own {baseline})"
    );
    assert!(
        settled,
        "the agent still holds {} descriptors after every idle connection closed ({baseline} \
         before)",
        fd_count(pid)
    );

    // One idle connection and one whose request head never ends, alone:
    // closed by the header timeout (5 s), not at once and not never.
    let idle = connect_nonblocking(v4(metrics));
    let mut slow = TcpStream::connect(metrics).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let opened = Instant::now();
    thread::sleep(Duration::from_secs(2));
    assert!(
        !closed_by_peer(&idle) && !closed_by_peer(&slow),
        "an idle connection was closed within 2 s"
    );
    let closed = wait_until(Duration::from_secs(5), || {
        closed_by_peer(&idle) && closed_by_peer(&slow)
    });
    assert!(
        closed,
        "idle connections still open {:.1?} after they opened (header timeout 5 s)",
        opened.elapsed()
    );
    eprintln!(
        "hard-halfopen: lone idle connections closed {:.1?} after they opened",
        opened.elapsed()
    );
    env.agent().scrape();
    env.agent().assert_running();
}

// ---------------------------------------------------------------------
// Messages an operator can act on (item 12's list)
// ---------------------------------------------------------------------

/// `meterd check-config` on broken configs: each is refused (exit 1) with
/// a message that names the field and the fix. No root needed.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn config_errors_name_the_field_and_the_fix() {
    let dir = std::env::temp_dir().join(format!("meterd-test-hard-config-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveTree(dir.clone());
    let base = tcp_config(&[port(8, 0)]).to_toml(
        Path::new("/sys/fs/cgroup"),
        &Path::new(BPFFS).join("meterd-test-hard-config"),
        &dir.join("ledger.sqlite"),
    );
    let not_exec = dir.join("hook-not-executable.sh");
    fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&not_exec, fs::Permissions::from_mode(0o644)).unwrap();
    let missing = dir.join("no-such-hook.sh");
    let replace = |from: &str, to: &str| {
        assert!(
            base.contains(from),
            "{from:?} not in the base config:\n{base}"
        );
        base.replacen(from, to, 1)
    };
    let ledger_line = format!("ledger = \"{}\"", dir.join("ledger.sqlite").display());
    let hook = |path: &Path| {
        replace(
            &ledger_line,
            &format!("{ledger_line}\nlimit_hook = \"{}\"", path.display()),
        )
    };
    let long_name = "n".repeat(100);
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "a float price",
            replace("price_minor = 1\n", "price_minor = 0.5\n"),
            vec!["price_minor".into(), "string".into(), "\"0.5\"".into()],
        ),
        (
            "an overlong interval",
            replace("interval = \"1s\"", "interval = \"99999999999999999999s\""),
            vec!["interval".into(), "too long".into()],
        ),
        (
            "a short token",
            format!("{base}\n[api]\nlisten = \"127.0.0.1:0\"\ntoken = \"short\"\n"),
            vec!["api.token".into(), "5 characters".into(), "16".into()],
        ),
        (
            "an unknown currency",
            replace("currency = \"EUR\"", "currency = \"XYZ\""),
            vec!["billing.currency".into(), "XYZ".into(), "ISO 4217".into()],
        ),
        (
            "a missing limit_hook",
            hook(&missing),
            vec![
                "billing.limit_hook".into(),
                missing.display().to_string(),
                "executable".into(),
            ],
        ),
        (
            "a limit_hook that is not executable",
            hook(&not_exec),
            vec![
                "billing.limit_hook".into(),
                not_exec.display().to_string(),
                "not executable".into(),
            ],
        ),
        (
            "a service name with a control character",
            replace("name = \"web\"", "name = \"we\\u0001b\""),
            vec!["service name".into(), "control characters".into()],
        ),
        (
            "a 100-character service name",
            replace("name = \"web\"", &format!("name = \"{long_name}\"")),
            vec!["service name".into(), "64 characters".into()],
        ),
    ];

    let ok = dir.join("ok.toml");
    fs::write(&ok, &base).unwrap();
    let out = meterd(&["check-config".as_ref(), ok.as_os_str()]);
    assert!(
        out.status.success(),
        "the base config is refused: {}",
        stderr_of(&out)
    );
    let mut failures = Vec::new();
    for (i, (what, toml, wanted)) in cases.iter().enumerate() {
        let path = dir.join(format!("case-{i}.toml"));
        fs::write(&path, toml).unwrap();
        let out = meterd(&["check-config".as_ref(), path.as_os_str()]);
        let stderr = stderr_of(&out);
        let missing: Vec<&String> = wanted.iter().filter(|w| !stderr.contains(*w)).collect();
        if out.status.code() != Some(1) || !missing.is_empty() {
            failures.push(format!(
                "{what}: exit {}, message lacks {missing:?}:\n{stderr}",
                out.status
            ));
        }
        eprintln!(
            "hard-config: {what}: {}",
            stderr.trim().replace('\n', " | ")
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A non-root `meterd run` fails with the privileges message naming
/// CAP_BPF, not with a permission error on its lock file, and creates
/// nothing (no pins, no ledger).
#[test]
fn non_root_run_names_the_missing_capabilities() {
    let Some(env) = TestEnv::new("hard-nonroot", traffic_bin!(), Setup::default()) else {
        return;
    };
    let dir = env.dir();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.join("meterd.toml");
    let ledger = dir.join("ledger.sqlite");
    fs::write(
        &config,
        tcp_config(&[port(9, 0)]).to_toml(env.cgroup().path(), &pin_dir(&env), &ledger),
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(meterd_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run setpriv");
    let stderr = stderr_of(&out);
    assert!(
        !out.status.success(),
        "meterd run as nobody succeeded: {stderr}"
    );
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("root"),
        "the error does not name the privileges meterd needs: {stderr}"
    );
    assert!(
        !stderr.contains("Permission denied") && !stderr.contains(".lock"),
        "the error is a permission error, not the privileges message: {stderr}"
    );
    assert!(!pin_dir(&env).exists(), "pins made by a refused run");
    assert!(!ledger.exists(), "a ledger made by a refused run");
    eprintln!("hard-nonroot: {}", stderr.trim());
}

// ---------------------------------------------------------------------
// UDP flows nobody answered (item 6, third point) and the status (API)
// ---------------------------------------------------------------------

/// Datagrams from 255 sources (200 addresses, 50 of them from a second
/// port, and 5 ports of the real viewer's own address) to a metered UDP port
/// whose server never answers them (the traffic tool answers only `GET`
/// datagrams), and one real flow with answers: the ledger has one
/// session, the real flow's, with its bytes exactly as the server logged
/// them, and no session holds a byte of the unanswered flows.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn udp_flows_the_server_never_answered_bill_nobody() {
    let Some(mut env) = TestEnv::new("hard-udp", traffic_bin!(), Setup::default()) else {
        return;
    };
    let at = loopback4(port(10, 0));
    env.start_agent(AgentConfig {
        udp_ports: vec![at.port()],
        extra_toml: PINNED_INTERVAL.to_owned(),
        ..AgentConfig::default()
    });
    let _files = run_files(&pin_dir(&env));
    let server = env.udp_server(&[at]);
    let viewer = env.fresh_source();
    let first = env.fresh_sources(200);
    let mut sources: Vec<IpAddr> = (0..200u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(first) + i)))
        .collect();
    let again: Vec<IpAddr> = sources.iter().step_by(4).copied().collect();
    sources.extend(again);
    sources.extend([viewer; 5]);
    let unanswered: Vec<UdpSocket> = sources
        .iter()
        .map(|&ip| UdpSocket::bind((ip, 0)).unwrap())
        .collect();
    let payload = [b'x'; 300];
    for round in 0..3 {
        for socket in &unanswered {
            socket.send_to(&payload[..100 + round * 50], at).unwrap();
        }
    }
    let real = env.run_udp_client(&UdpClient {
        connect: at,
        sizes: vec![100, 1200, 40],
        repeat: 10,
        get: 60_000,
        get_size: 1200,
        get_rounds: 2,
        source: Source::Addr(viewer),
    });
    for socket in &unanswered {
        socket.send_to(&payload[..77], at).unwrap();
    }
    // Let the server read them before it is stopped and logs its clients.
    thread::sleep(Duration::from_millis(500));
    let truth = env.udp_truth(&server, &[&real]);
    let truth = &truth[0];
    let logged = env.server_log(&server);
    assert_eq!(
        logged.len(),
        1 + unanswered.len(),
        "the server logged {} clients: the unanswered datagrams did not all arrive",
        logged.len()
    );
    assert!(
        logged
            .iter()
            .filter(|c| c.client_port != truth.client_port)
            .all(|c| c.bytes_sent == 0 && c.bytes_received > 0),
        "the server answered a flow it should not have: {logged:#?}"
    );

    // Settled: the real flow's session, alone.
    let agent = env.agent_ref();
    let deadline = Duration::from_secs(40);
    let mut sessions = Vec::new();
    let found = wait_until(deadline, || {
        sessions = agent.ledger_records();
        !sessions.is_empty()
    });
    assert!(
        found,
        "no session settled; agent log:\n{}",
        agent.log_tail(40)
    );
    // Late ones would come within the UDP idle timeout and a session_idle.
    thread::sleep(
        agent.config().udp_idle_timeout + agent.config().session_idle + Duration::from_secs(2),
    );
    let ledger = agent.ledger();
    let got: Vec<(IpAddr, u64, u64)> = ledger
        .sessions
        .iter()
        .map(|s| (s.client_addr, s.bytes_out, s.bytes_in))
        .collect();
    assert_eq!(
        got,
        [(viewer, truth.bytes_sent, truth.bytes_received)],
        "sessions against the one real flow (server sent {}, received {})",
        truth.bytes_sent,
        truth.bytes_received
    );
    let stray: Vec<_> = ledger
        .connections
        .iter()
        .filter(|c| c.client_port != truth.client_port || c.client_addr != viewer)
        .filter(|c| ledger.session(&c.session_id).is_some())
        .collect();
    assert!(
        stray.is_empty(),
        "unanswered flows in a billed session: {stray:#?}"
    );
    eprintln!(
        "hard-udp: {} unanswered flows; ledger: {} session(s), {} connection record(s)",
        unanswered.len(),
        ledger.sessions.len(),
        ledger.connections.len()
    );
    env.agent().assert_running();
}

/// Item 12's status: `GET /v1/status` is served on the API's unix socket
/// (with the open session of a running download) and not on the metrics
/// port, which answers 404 and shows no client address. The files that
/// hold clients and money are not world-readable: the socket is 0660, the
/// ledger and the closed log 0600.
#[test]
fn status_is_on_the_api_not_the_metrics_port() {
    let Some(mut env) = TestEnv::new("hard-status", traffic_bin!(), Setup::default()) else {
        return;
    };
    let at = loopback4(port(11, 0));
    env.start_agent(tcp_config(&[at.port()]));
    let _files = run_files(&pin_dir(&env));
    env.tcp_server(&[at]);
    let viewer = env.fresh_source();
    let started = env.dir().join("download.started");
    let download = env.spawn_tcp_client(&TcpClient {
        chunk: 100_000,
        pause_ms: 100,
        started_file: Some(started.clone()),
        source: Source::Addr(viewer),
        ..TcpClient::new(at, 4_000_000, 0)
    });
    assert!(
        wait_until(Duration::from_secs(15), || started.exists()),
        "the download did not start"
    );
    let ready = env.agent().ready();
    let socket = PathBuf::from(&ready.api);
    assert!(
        fs::symlink_metadata(&socket).is_ok(),
        "api={} is not a unix socket path",
        ready.api
    );
    let mut body = String::new();
    let listed = wait_until(Duration::from_secs(10), || {
        let (status, text) = get_unix(&socket, "/v1/status");
        assert_eq!(
            status,
            200,
            "GET /v1/status on {}: {text}",
            socket.display()
        );
        body = text;
        body.contains(&format!("\"{viewer}\""))
    });
    assert!(
        listed,
        "the status does not list the viewer {viewer}: {body}"
    );
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(report["sessions"].is_array(), "{body}");
    let agent = env.agent_ref();
    for (path, mode) in [
        (socket.as_path(), 0o660),
        (agent.ledger_path(), 0o600),
        (agent.closed_log(), 0o600),
    ] {
        let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            meta.permissions().mode() & 0o777,
            mode,
            "mode of {}",
            path.display()
        );
    }

    let response = http::get(ready.metrics, "/v1/status").unwrap();
    assert_eq!(
        response.status, 404,
        "GET /v1/status on the metrics port: {}\n{}",
        response.head, response.body
    );
    assert!(
        !response.body.contains(&viewer.to_string()),
        "{}",
        response.body
    );
    download.finish(Duration::from_secs(60));
    env.agent().assert_running();
}

// ---------------------------------------------------------------------
// Spoofed UDP sources cannot crowd real flows out (item 6)
// ---------------------------------------------------------------------

/// Sends `count` UDP datagrams of 100 bytes to `127.0.0.1:<port>`, each
/// from a spoofed source of its own (`198.18.0.0` + i, RFC 2544's
/// benchmarking range, and a port that cycles), through a raw socket
/// (`IPPROTO_RAW` implies `IP_HDRINCL`: the kernel fills only the IP
/// checksum, length and id). The payload is not a `GET`: the traffic
/// tool's server never answers it. Prints how many it sent.
const SPOOF_FLOOD: &str = r"
import socket, struct, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
base = struct.unpack('!I', socket.inet_aton('198.18.0.0'))[0]
dst = socket.inet_aton('127.0.0.1')
payload = b'spoofed!' * 12 + b'spam'
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 24)
sent = 0
for i in range(count):
    src = struct.pack('!I', base + i)
    udp = struct.pack('!HHHH', 10000 + i % 50000, port, 8 + len(payload), 0)
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0, src, dst)
    while True:
        try:
            s.sendto(ip + udp + payload, ('127.0.0.1', 0))
            break
        except BlockingIOError:
            pass
    sent += 1
print(sent)
";

/// 70,000 datagrams from 70,000 spoofed sources (more than the 65,536
/// flows `agent.max_udp_flows` holds by default), none of which the
/// server answers, then one real flow that it does answer: the real flow
/// is billed exactly as the server counted it, no spoofed source is in a
/// billed session, and the UDP flow map never ran full. Before UDP
/// probation, the spoofed sources filled `UDP_FLOWS` and the real flow was
/// not counted at all.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn spoofed_udp_sources_do_not_block_real_flows() {
    const SPOOFED: u32 = 70_000;
    let Some(mut env) = TestEnv::new(
        "hard-udp-spoof",
        traffic_bin!(),
        Setup {
            netns: true,
            ..Setup::default()
        },
    ) else {
        return;
    };
    let ns = env.netns().expect("the test's namespace");
    // Spoofed sources are not this namespace's: nothing may drop them for
    // arriving on the "wrong" interface.
    for conf in ["all", "default", "lo"] {
        ns.run_ok(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{conf}.rp_filter=0")],
        );
    }
    let at = loopback4(port(12, 0));
    env.start_agent(AgentConfig {
        udp_ports: vec![at.port()],
        // Long enough that no spoofed flow is collected before the real
        // flow has run (so the old code's full map is still full then).
        udp_idle_timeout: Duration::from_secs(10),
        extra_toml: PINNED_INTERVAL.to_owned(),
        ..AgentConfig::default()
    });
    let _files = run_files(&pin_dir(&env));
    let server = env.udp_server(&[at]);

    let started = Instant::now();
    let flood = env
        .command(
            "python3",
            &[
                "-c",
                SPOOF_FLOOD,
                &at.port().to_string(),
                &SPOOFED.to_string(),
            ],
        )
        .output()
        .unwrap();
    assert!(
        flood.status.success(),
        "the spoofing flood failed: {}",
        String::from_utf8_lossy(&flood.stderr)
    );
    let sent: u32 = String::from_utf8_lossy(&flood.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(sent, SPOOFED, "spoofed datagrams sent");
    let flooded_in = started.elapsed();

    let viewer = env.fresh_source();
    let real = env.run_udp_client(&UdpClient {
        connect: at,
        sizes: vec![100, 1200, 40],
        repeat: 10,
        get: 60_000,
        get_size: 1200,
        get_rounds: 2,
        source: Source::Addr(viewer),
    });
    // Let the server read the last datagrams before it is stopped.
    thread::sleep(Duration::from_millis(300));
    let truth = env.udp_truth(&server, &[&real]);
    let truth = &truth[0];
    let logged = env.server_log(&server);
    let spoofed_logged = logged
        .iter()
        .filter(|c| is_spoofed(c.client_addr))
        .inspect(|c| {
            assert_eq!(
                c.bytes_sent, 0,
                "the server answered a spoofed source: {c:?}"
            );
        })
        .count();

    let agent = env.agent_ref();
    let mut sessions = Vec::new();
    let found = wait_until(Duration::from_secs(20), || {
        sessions = agent.ledger_records();
        !sessions.is_empty()
    });
    assert!(
        found,
        "no session settled: the real flow was not billed; agent log:\n{}",
        agent.log_tail(40)
    );
    // A late session would come within a session_idle and a cycle.
    thread::sleep(agent.config().session_idle + Duration::from_secs(2));
    let ledger = agent.ledger();
    let got: Vec<(IpAddr, u64, u64)> = ledger
        .sessions
        .iter()
        .map(|s| (s.client_addr, s.bytes_out, s.bytes_in))
        .collect();
    assert_eq!(
        got,
        [(viewer, truth.bytes_sent, truth.bytes_received)],
        "sessions against the one real flow (server sent {}, received {})",
        truth.bytes_sent,
        truth.bytes_received
    );
    let billed_spoofed: Vec<_> = ledger
        .connections
        .iter()
        .filter(|c| is_spoofed(c.client_addr))
        .filter(|c| ledger.session(&c.session_id).is_some())
        .collect();
    assert!(
        billed_spoofed.is_empty(),
        "spoofed sources in a billed session: {:#?}",
        &billed_spoofed[..billed_spoofed.len().min(5)]
    );
    let metrics = meterd_tests::metrics::Exposition::parse(&agent.metrics_text()).unwrap();
    let event = |name: &str| {
        metrics
            .value("meterd_kernel_events_total", &[("event", name)])
            .unwrap_or_else(|| panic!("no meterd_kernel_events_total{{event={name:?}}}"))
    };
    assert!(
        event("udp_map_full") < 1.0,
        "the UDP flow map ran full: {}",
        event("udp_map_full")
    );
    assert!(
        event("udp_probation_new") >= f64::from(SPOOFED) && event("udp_promoted") >= 1.0,
        "the flood did not go through probation: {} new, {} promoted",
        event("udp_probation_new"),
        event("udp_promoted")
    );
    eprintln!(
        "hard-udp-spoof: {SPOOFED} spoofed datagrams in {flooded_in:?}, {spoofed_logged} \
         logged by the server; probation: {} new, {} promoted, {} promoted unseen; \
         ledger: {} session(s), {} connection record(s); {:?} in all",
        event("udp_probation_new"),
        event("udp_promoted"),
        event("udp_promoted_unseen"),
        ledger.sessions.len(),
        ledger.connections.len(),
        started.elapsed()
    );
    env.agent().assert_running();
}

/// Whether `addr` is one of [`SPOOF_FLOOD`]'s sources (198.18.0.0/15).
fn is_spoofed(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V4(v4) if v4.octets()[0] == 198 && v4.octets()[1] & 0xfe == 18)
}

// ---------------------------------------------------------------------
// The metered cgroup recreated (item 1)
// ---------------------------------------------------------------------

/// What the agent logs when a cycle finds the cgroup recreated, once the
/// programs are attached to the new one (not before: the test's traffic
/// right after it must be metered).
const REATTACH_LOG: &str = "the metered cgroup was recreated: meterd's programs are attached";
/// What a start logs when the pinned links are on a cgroup that is gone.
const RESUME_REATTACH_LOG: &str = "attached to a cgroup that is no longer at this path";

/// `count` downloads from distinct viewers, half of them closed by the
/// server first and half by the client.
fn downloads(listen: SocketAddr, count: usize) -> TcpClient {
    TcpClient {
        count,
        parallel: 4,
        close: CloseOrder::Alternate,
        source: Source::Distinct,
        ..TcpClient::new(listen, 300_000, 2000)
    }
}

/// Item 1, with the agent running: what `systemctl restart nginx` does.
/// Traffic is billed; the server is stopped and its cgroup removed and
/// created again at the configured path (a new cgroup id, nothing
/// attached); once the agent has logged that it attached to the new one,
/// a server in the new cgroup serves 20 downloads, and every connection,
/// before and after, is billed exactly once with the bytes the servers
/// logged (closed log and ledger).
#[test]
fn recreated_cgroup_is_metered_again_while_the_agent_runs() {
    let Some(mut env) = TestEnv::new("hard-recreate", traffic_bin!(), Setup::default()) else {
        return;
    };
    let listen = loopback4(port(13, 0));
    let first = env.tcp_server(&[listen]);
    env.start_agent(tcp_config(&[listen.port()]));
    let _files = run_files(&pin_dir(&env));
    let before = env.run_tcp_client(&downloads(listen, 4));
    let truth_before = env.tcp_truth(&first, &[&before]);
    env.wait_for_exact_records(&truth_before);

    let (old_id, new_id) = env.recreate_cgroup();
    // Connections accepted before the next cycle reattaches are not
    // metered (a known limit): wait for the agent to say it reattached.
    let reattached = wait_until(Duration::from_secs(10), || {
        env.agent_ref().log().contains(REATTACH_LOG)
    });
    assert!(
        reattached,
        "the cgroup was recreated (id {old_id} -> {new_id}) 10 s ago and the agent \
         did not reattach; its log:\n{}",
        env.agent_ref().log_tail(30)
    );
    let second = env.tcp_server(&[listen]);
    let after = env.run_tcp_client(&downloads(listen, 20));
    let truth_after = env.tcp_truth(&second, &[&after]);
    let truth: Vec<ConnLog> = truth_before.into_iter().chain(truth_after).collect();
    env.wait_for_exact_records(&truth);
    env.wait_for_exact_ledger(&truth, &|_| records::SERVICE.to_owned());
    env.agent().assert_running();
    eprintln!(
        "hard-recreate: cgroup {old_id} -> {new_id}, {} connections exact",
        truth.len()
    );
}

/// Item 1, with the agent stopped across the recreation: the pinned links
/// stay on the removed cgroup, so a start that took the pins as they are
/// ("Resumed") would meter nothing. The start must see that the links'
/// cgroup is not the one at the path, say so, and attach to the new one;
/// 20 downloads after it are billed exactly, and so are those before.
#[test]
fn recreated_cgroup_while_the_agent_is_stopped_is_metered_at_start() {
    let Some(mut env) = TestEnv::new("hard-recreate-stopped", traffic_bin!(), Setup::default())
    else {
        return;
    };
    let listen = loopback4(port(13, 1));
    let first = env.tcp_server(&[listen]);
    env.start_agent(tcp_config(&[listen.port()]));
    let _files = run_files(&pin_dir(&env));
    let before = env.run_tcp_client(&downloads(listen, 4));
    let truth_before = env.tcp_truth(&first, &[&before]);
    env.wait_for_exact_records(&truth_before);
    env.agent().stop();

    let (old_id, new_id) = env.recreate_cgroup();
    let second = env.tcp_server(&[listen]);
    env.agent().start();
    let log = env.agent_ref().log();
    assert!(
        log.contains(RESUME_REATTACH_LOG),
        "the agent started on pins attached to the removed cgroup {old_id} (now {new_id}) \
         and did not say so; its log:\n{}",
        env.agent_ref().log_tail(30)
    );
    let after = env.run_tcp_client(&downloads(listen, 20));
    let truth_after = env.tcp_truth(&second, &[&after]);
    let truth: Vec<ConnLog> = truth_before.into_iter().chain(truth_after).collect();
    env.wait_for_exact_records(&truth);
    env.wait_for_exact_ledger(&truth, &|_| records::SERVICE.to_owned());
    env.agent().assert_running();
}

// ---------------------------------------------------------------------
// sock_ops callback flags and the untracked close (items 9, 10)
// ---------------------------------------------------------------------

/// Item 9: another sock_ops program on the metered cgroup, attached before
/// meterd (so it runs first on every connection), asks for RTT callbacks.
/// Its callbacks still come after meterd's program set its own flag (they
/// would stop if meterd replaced the socket's flags), and meterd still
/// bills every connection exactly (its own state callback is set too).
/// Without meterd the probe is checked to work at all.
#[test]
fn another_sock_ops_programs_callbacks_survive_meterd() {
    let Some(mut env) = TestEnv::new("hard-cb-flags", traffic_bin!(), Setup::default()) else {
        return;
    };
    let listen = loopback4(port(14, 0));
    let server = env.tcp_server(&[listen]);
    let probe = RttProbe::attach(env.cgroup().path());
    let alone = env.run_tcp_client(&TcpClient::new(listen, 1_000_000, 0));
    env.tcp_truth(&server, &[&alone]);
    let without = probe.counts();
    assert!(
        without.established == 1 && without.rtt > 0,
        "the probe does not work on its own, the test is invalid: {without:?}"
    );

    env.start_agent(tcp_config(&[listen.port()]));
    let _files = run_files(&pin_dir(&env));
    let metered = env.run_tcp_client(&TcpClient {
        count: 5,
        source: Source::Distinct,
        ..TcpClient::new(listen, 1_000_000, 100)
    });
    let truth = env.tcp_truth(&server, &[&metered]);
    let with = probe.counts();
    assert_eq!(
        with.established - without.established,
        5,
        "the probe did not see the 5 connections: {with:?}"
    );
    // Each 1 MB download is acknowledged many times; one RTT callback per
    // connection is the least that shows the flag survived.
    assert!(
        with.rtt - without.rtt >= 5,
        "the probe's RTT callbacks stopped once meterd ran on the sockets: {} before, \
         {} after 5 connections (meterd replaced the socket's callback flags)",
        without.rtt,
        with.rtt
    );
    env.wait_for_exact_records(&truth);
    eprintln!(
        "hard-cb-flags: {} RTT callbacks without meterd, {} with it over 5 connections",
        without.rtt,
        with.rtt - without.rtt
    );
}

/// Opens `n` idle connections to `filler_at` (metered) and waits until
/// the agent reports the live map's overflow (`n - slots` connections
/// untracked): from then on, a new connection is untracked too. The
/// connections stay open while the returned streams live.
fn fill_live_map(env: &TestEnv, filler_at: SocketAddr, n: usize, slots: u32) -> Vec<TcpStream> {
    let fillers: Vec<TcpStream> = (0..n)
        .map(|i| {
            TcpStream::connect(filler_at)
                .unwrap_or_else(|e| panic!("filler connection {i} to {filler_at}: {e}"))
        })
        .collect();
    let live_map_full = || {
        meterd_tests::metrics::Exposition::parse(&env.agent_ref().metrics_text())
            .unwrap()
            .value("meterd_kernel_events_total", &[("event", "live_map_full")])
            .unwrap_or(0.0)
    };
    let overflow = f64::from(u32::try_from(n).unwrap() - slots);
    assert!(
        wait_until(Duration::from_secs(10), || live_map_full() >= overflow),
        "the live map did not fill: {} live_map_full events for {n} connections into {slots} \
         slots",
        live_map_full()
    );
    fillers
}

/// Item 10: with the live map full (`agent.max_connections` at its minimum,
/// 1024, and more idle connections than that held open), connections open
/// untracked and are billed from their close record alone. Those the server
/// closes first end in FIN_WAIT2 with the client's FIN in `bytes_received`:
/// billed with the bytes the server logged, not one more (the README's
/// "never high"); those the client closes first (LAST_ACK) too.
#[test]
fn untracked_close_from_fin_wait2_is_not_billed_the_fin() {
    const LIVE_SLOTS: u32 = 1024;
    const FILLERS: usize = 1100;
    let Some(mut env) = TestEnv::new("hard-untracked-fin", traffic_bin!(), Setup::default()) else {
        return;
    };
    // The fillers' sockets here and in their server (started after this,
    // so it inherits the limit).
    assert!(
        raise_own_nofile() > FILLERS + 200,
        "the open-file limit is too low for {FILLERS} connections"
    );
    let listen = loopback4(port(14, 1));
    let filler_at = loopback4(port(14, 2));
    let server = env.tcp_server(&[listen]);
    let _filler_server = env.tcp_server(&[filler_at]);
    env.start_agent(AgentConfig {
        max_connections: Some(LIVE_SLOTS),
        ..tcp_config(&[listen.port(), filler_at.port()])
    });
    let _files = run_files(&pin_dir(&env));
    let fillers = fill_live_map(&env, filler_at, FILLERS, LIVE_SLOTS);

    let closes = env.run_tcp_client(&TcpClient {
        count: 8,
        parallel: 2,
        close: CloseOrder::Alternate,
        source: Source::Distinct,
        ..TcpClient::new(listen, 200_000, 3000)
    });
    let truth = env.tcp_truth(&server, &[&closes]);
    // Exactly these 8 records (the fillers are still open), bytes exact.
    env.wait_for_exact_records(&truth);
    // `meterd_common::CONN_UNTRACKED`, as the closed log carries it.
    let untracked = 1u64 << 1;
    let records = env.agent_ref().closed_records();
    assert!(
        records
            .iter()
            .all(|r| r.flags.is_some_and(|f| f & untracked != 0)),
        "not every record is untracked, the live map was not full: {records:#?}"
    );
    drop(fillers);
}

/// Issue #12 item 12: a connection the live map had no room for is timed
/// from what its socket's storage kept (its establishment, and the last
/// packet it sent established), not billed 0 s: under a time tariff, a
/// lone untracked viewer that downloads for ~1.8 s and then holds its
/// connection idle for 2 s is billed the ~1.8 s its server logged, not 0
/// and not the idle tail.
#[test]
fn untracked_connection_is_timed_by_its_payload() {
    use meterd_tests::tariff::{Rounding, Service, Tariff};
    const LIVE_SLOTS: u32 = 1024;
    const FILLERS: usize = 1100;
    let Some(mut env) = TestEnv::new("hard-untracked-time", traffic_bin!(), Setup::default())
    else {
        return;
    };
    assert!(
        raise_own_nofile() > FILLERS + 200,
        "the open-file limit is too low for {FILLERS} connections"
    );
    let listen = loopback4(port(14, 3));
    let filler_at = loopback4(port(14, 4));
    let server = env.tcp_server(&[listen]);
    let _filler_server = env.tcp_server(&[filler_at]);
    // 10 minor units per started second of watching time.
    let live = Service::tcp(
        "live",
        &[listen.port()],
        Tariff::time(10_000_000, 1, Rounding::PerStartedUnit),
    );
    let fill = Service::tcp(
        "fill",
        &[filler_at.port()],
        Tariff::time(1, 1, Rounding::PerStartedUnit),
    );
    env.start_agent(AgentConfig {
        max_connections: Some(LIVE_SLOTS),
        services: vec![live, fill],
        ..AgentConfig::default()
    });
    let _files = run_files(&pin_dir(&env));
    let fillers = fill_live_map(&env, filler_at, FILLERS, LIVE_SLOTS);
    // 1 MB in 100 kB steps 200 ms apart (~1.8 s of payload), then 2 s idle
    // before the client closes.
    let viewer = env.run_tcp_client(&TcpClient {
        chunk: 100_000,
        pause_ms: 200,
        hold_ms: 2_000,
        close: CloseOrder::Client,
        source: Source::Addr(env.fresh_source()),
        ..TcpClient::new(listen, 1_000_000, 0)
    });
    let truth = env.tcp_truth(&server, &[&viewer]);
    assert!(
        wait_until(Duration::from_secs(10), || !env
            .agent_ref()
            .closed_records()
            .is_empty()),
        "no close record of the viewer's connection"
    );
    let untracked = 1u64 << 1;
    let records = env.agent_ref().closed_records();
    assert!(
        records
            .iter()
            .all(|r| r.flags.is_some_and(|f| f & untracked != 0)),
        "the viewer's connection was tracked: the live map was not full: {records:#?}"
    );
    let t = &truth[0];
    let span_ms = (t.last_payload_unix_us.unwrap() - t.first_payload_unix_us.unwrap()) / 1000;
    let settled = wait_until(Duration::from_secs(20), || {
        env.agent_ref()
            .ledger_records()
            .iter()
            .any(|s| s.service == "live")
    });
    assert!(settled, "the viewer's session never settled");
    let s: Vec<_> = env
        .agent_ref()
        .ledger_records()
        .into_iter()
        .filter(|s| s.service == "live")
        .collect();
    assert_eq!(s.len(), 1, "one session: {s:#?}");
    let billed = i64::try_from(s[0].duration_ms).unwrap();
    let span = i64::try_from(span_ms).unwrap();
    assert!(
        (billed - span).abs() <= 300,
        "the untracked viewer is billed {billed} ms of watching time; its server moved \
         payload for {span} ms (before the fix: 0 ms; the 2 s idle tail must not count)"
    );
    assert_eq!(s[0].bytes_out, t.bytes_sent);
    assert_eq!(s[0].charge_minor, 10 * s[0].duration_ms.div_ceil(1000));
    drop(fillers);
}

// ---------------------------------------------------------------------
// The close ring full while the agent stalls
// ---------------------------------------------------------------------

/// Connections closing while the agent is stopped (`SIGSTOP`), this one.
/// The close ring (`CLOSED`, 2 MiB of 112-byte records: about 18,700)
/// fills with the first of them; what closes after that must be kept in
/// the connections' live slots and billed from there at the next read.
const STALLED_CLOSES: usize = 25_000;

/// Stops a process, and lets it go on drop (also when the test panics).
struct Stopped(libc::pid_t);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        let pid = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: a signal to a process of this test's own.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The kernel's event counters, from the agent's `/metrics`.
fn kernel_event(agent: &Agent, name: &str) -> f64 {
    meterd_tests::metrics::Exposition::parse(&agent.metrics_text())
        .unwrap()
        .value("meterd_kernel_events_total", &[("event", name)])
        .unwrap_or_else(|| panic!("no meterd_kernel_events_total{{event={name:?}}}"))
}

/// The agent stalls (stopped, as a host too loaded to schedule it would
/// leave it) while 25,000 connections open and close. The ring fills;
/// the closes past it stay in their live slots (`ring_full` rises, `lost`
/// does not), and once the agent runs again every connection is billed
/// exactly once with the bytes the server logged, in the closed log and
/// the ledger.
#[test]
fn closes_past_a_full_ring_are_billed_from_their_live_slots() {
    let Some(mut env) = TestEnv::new("hard-ringfull", traffic_bin!(), Setup::default()) else {
        return;
    };
    let listen = loopback4(port(13, 2));
    let server = env.tcp_server(&[listen]);
    env.start_agent(tcp_config(&[listen.port()]));
    let _files = run_files(&pin_dir(&env));
    let (full_before, lost_before) = (
        kernel_event(env.agent_ref(), "ring_full"),
        kernel_event(env.agent_ref(), "lost"),
    );
    let pid = agent_pid(env.agent_ref().config_path());
    let started = Instant::now();
    let summary = {
        let _stopped = Stopped::new(pid);
        env.run_tcp_client(&TcpClient {
            count: STALLED_CLOSES,
            parallel: 8,
            close: CloseOrder::Alternate,
            ..TcpClient::new(listen, 1500, 100)
        })
    };
    eprintln!(
        "hard-ringfull: {STALLED_CLOSES} connections with the agent stopped in {:.1?}",
        started.elapsed()
    );
    let truth = env.tcp_truth(&server, &[&summary]);
    assert_eq!(truth.len(), STALLED_CLOSES);
    env.wait_for_exact_records(&truth);
    let agent = env.agent_ref();
    let kept = kernel_event(agent, "ring_full") - full_before;
    assert!(
        kept >= 1.0,
        "no close found the ring full ({STALLED_CLOSES} closes with the agent stopped): the \
         test did not reach the fallback; raise STALLED_CLOSES if the ring grew"
    );
    assert!(
        kernel_event(agent, "lost") - lost_before < 1.0,
        "close records lost: {}",
        kernel_event(agent, "lost") - lost_before
    );
    env.wait_for_exact_ledger(&truth, &|_| records::SERVICE.to_owned());
    env.agent().assert_running();
    eprintln!("hard-ringfull: {kept} closes kept in their live slots, all exact");
}
