//! One test's world: its directory, cgroup, optional network namespace, pin
//! dir, servers, agent, and the truth its servers logged.
//!
//! Servers run inside the test's cgroup (so meterd meters their sockets:
//! a socket belongs to the cgroup its process was in when it was created)
//! and inside the namespace when there is one. Clients run outside the
//! cgroup, so only server sockets are metered, and inside the same
//! namespace. Everything is torn down on drop, also when the test panics;
//! the directory is kept after a panic, for its logs.
//!
//! meterd bills a viewing session per (service, client address): every
//! connection from 127.0.0.1 to one service is one session while traffic
//! goes on. A test that wants one connection to be one session gives it a
//! client address of its own ([`Source::Distinct`]): each connection binds
//! to a fresh address of 127.1.0.0/16 (all of 127.0.0.0/8 is local on `lo`,
//! also in a namespace, with no configuration), handed out by the
//! [`TestEnv`] so no two clients of a test share one by accident.
//!
//! Does not own: the comparison rules (`records`) or the agent's lifecycle
//! details (`agent`).

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, AgentConfig},
    cgroup::Cgroup,
    ledger::Ledger,
    netns::NetNs,
    privilege::{self, Needs},
    process::{Proc, read_lossy, touch, wait_until},
    records::{self, ClosedRecord, Key, parse_conn_log},
    wire::{ClientSummary, ConnLog, Protocol, UdpClientSummary},
};

/// Set (to anything) to keep every test's directory, not only a failed one's.
pub const KEEP_ENV: &str = "METERD_TEST_KEEP";

/// How long meterd gets to produce the records of finished connections.
pub const RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server gets to log connections its clients have finished.
const SERVER_LOG_TIMEOUT: Duration = Duration::from_secs(30);

/// Port `index` (0..10) of the test in `slot` (0..15; each test of a test
/// binary takes its own). The block moves with the test process's pid, so
/// two runs of the suite at once (another shell, CI and a developer) do not
/// meter each other's ports, which meterd would rightly refuse. Stays in
/// 20000..29600, below the kernel's ephemeral range (32768..), so no client
/// socket can hold one of them.
pub fn port(slot: u16, index: u16) -> u16 {
    assert!(
        slot < 15 && index < 10,
        "port({slot}, {index}) out of range"
    );
    let run = (std::process::id() % 64) as u16;
    20_000 + run * 150 + slot * 10 + index
}

/// What a test's world needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Setup {
    /// A network namespace of its own.
    pub netns: bool,
    /// `nft`, to change what the namespace's network does.
    pub nft: bool,
}

/// The first of the client addresses a [`TestEnv`] hands out; the rest
/// follow it.
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);

/// Client addresses a [`TestEnv`] can hand out.
const SOURCES: u32 = 65_000;

/// Which local address a client's connections come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The kernel picks: 127.0.0.1 (or ::1). All such connections of a test
    /// to one service are one viewer.
    Kernel,
    /// Every connection from this address: one viewer, whatever the client
    /// run (see [`TestEnv::fresh_source`]).
    Addr(IpAddr),
    /// Each connection from a fresh address of its own: one viewer per
    /// connection. IPv4 only (IPv6 loopback is only ::1).
    Distinct,
}

/// Who closes first, per `tcp-client` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseOrder {
    /// The server sends its FIN first.
    Server,
    /// The client sends its FIN first.
    Client,
    /// Even connections server first, odd ones client first.
    Alternate,
}

/// Arguments of one `meterd-traffic tcp-client` run.
#[derive(Clone, Debug)]
pub struct TcpClient {
    /// Server address.
    pub connect: SocketAddr,
    /// Bytes the server sends per connection.
    pub down: u64,
    /// Bytes the client sends per connection (besides the request line).
    pub up: u64,
    /// Connections.
    pub count: usize,
    /// Connections at once.
    pub parallel: usize,
    /// Close order.
    pub close: CloseOrder,
    /// Pause after every `chunk` bytes, to stretch a transfer in time.
    pub pause_ms: u64,
    /// Pacing unit.
    pub chunk: u64,
    /// Keep each connection open this long after its transfers, before it
    /// closes: connections of a known duration, for time tariffs.
    pub hold_ms: u64,
    /// Created once the first bytes have arrived (or the request is sent,
    /// without a download); holds that connection's client address and
    /// port (`127.1.0.5:40312`, see [`read_started`]).
    pub started_file: Option<PathBuf>,
    /// Where its connections come from.
    pub source: Source,
    /// A download that meterd cuts off (reset, early EOF) is not a failure:
    /// its summary says how much arrived.
    pub until_cut: bool,
}

impl TcpClient {
    /// One connection, server closes first, no pacing.
    pub fn new(connect: SocketAddr, down: u64, up: u64) -> TcpClient {
        TcpClient {
            connect,
            down,
            up,
            count: 1,
            parallel: 1,
            close: CloseOrder::Server,
            pause_ms: 0,
            chunk: 65536,
            hold_ms: 0,
            started_file: None,
            source: Source::Kernel,
            until_cut: false,
        }
    }

    /// `distinct`: the first of `count` fresh addresses, for
    /// [`Source::Distinct`].
    fn args(&self, distinct: Option<Ipv4Addr>) -> Vec<String> {
        let mut args = vec![
            "tcp-client".to_owned(),
            format!("--connect={}", self.connect),
            format!("--down={}", self.down),
            format!("--up={}", self.up),
            format!("--count={}", self.count),
            format!("--parallel={}", self.parallel),
            format!(
                "--close={}",
                match self.close {
                    CloseOrder::Server => "server",
                    CloseOrder::Client => "client",
                    CloseOrder::Alternate => "alternate",
                }
            ),
            format!("--pause-ms={}", self.pause_ms),
            format!("--chunk={}", self.chunk),
            format!("--hold-ms={}", self.hold_ms),
        ];
        if let Some(path) = &self.started_file {
            args.push(format!("--started-file={}", path.display()));
        }
        if self.until_cut {
            args.push("--until-cut".to_owned());
        }
        match (self.source, distinct) {
            (Source::Kernel, _) => {}
            (Source::Addr(addr), _) => args.push(format!("--source={addr}")),
            (Source::Distinct, Some(base)) => {
                args.push(format!("--source={base}"));
                args.push("--distinct-sources".to_owned());
            }
            (Source::Distinct, None) => unreachable!("TestEnv hands out distinct sources"),
        }
        args
    }
}

/// The client address and port a `started_file` holds.
pub fn read_started(path: &Path) -> SocketAddr {
    let text = read_lossy(path);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?} is no address and port: {e}", path.display()))
}

/// Arguments of one `meterd-traffic udp-client` run.
#[derive(Clone, Debug)]
pub struct UdpClient {
    /// Server address.
    pub connect: SocketAddr,
    /// Payload sizes of the datagrams sent, in order.
    pub sizes: Vec<usize>,
    /// Times the `sizes` list is sent.
    pub repeat: usize,
    /// Bytes requested back per round.
    pub get: u64,
    /// Payload size of the datagrams sent back.
    pub get_size: usize,
    /// `GET` rounds.
    pub get_rounds: usize,
    /// Where its flow comes from: [`Source::Kernel`] binds the wildcard
    /// address; [`Source::Distinct`] is one fresh address, like
    /// [`Source::Addr`] of [`TestEnv::fresh_source`].
    pub source: Source,
}

impl UdpClient {
    fn args(&self, distinct: Option<Ipv4Addr>) -> Vec<String> {
        let sizes: Vec<String> = self.sizes.iter().map(usize::to_string).collect();
        let source = match (self.source, distinct) {
            (Source::Kernel, _) => None,
            (Source::Addr(addr), _) => Some(addr),
            (Source::Distinct, Some(base)) => Some(IpAddr::V4(base)),
            (Source::Distinct, None) => unreachable!("TestEnv hands out distinct sources"),
        };
        let mut args = vec![
            "udp-client".to_owned(),
            format!("--connect={}", self.connect),
            format!("--sizes={}", sizes.join(",")),
            format!("--repeat={}", self.repeat),
            format!("--get={}", self.get),
            format!("--get-size={}", self.get_size),
            format!("--get-rounds={}", self.get_rounds),
        ];
        args.extend(source.map(|s| format!("--source={s}")));
        args
    }
}

/// A server this test started.
#[derive(Clone, Debug)]
pub struct Server {
    index: usize,
    /// Its connection log.
    pub log: PathBuf,
    /// Its process id.
    pub pid: u32,
}

/// A `tcp-client` running in the background; killed if dropped unfinished.
#[derive(Debug)]
pub struct RunningClient {
    proc: Proc,
    stdout: PathBuf,
}

impl RunningClient {
    /// Whether it has exited.
    pub fn finished(&mut self) -> bool {
        self.proc.try_wait().is_some()
    }

    /// Waits for it to exit successfully and returns its summary.
    pub fn finish(mut self, timeout: Duration) -> ClientSummary {
        let status = self.proc.wait_timeout(timeout).unwrap_or_else(|| {
            panic!(
                "tcp-client still running after {timeout:?}; its stderr:\n{}",
                self.proc.output_tail(30)
            )
        });
        assert!(
            status.success(),
            "tcp-client failed ({status}); its stderr:\n{}",
            self.proc.output_tail(30)
        );
        parse_summary(&read_lossy(&self.stdout))
    }
}

fn parse_summary(stdout: &str) -> ClientSummary {
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("tcp-client printed no summary ({e}): {stdout}"))
}

/// One test's world; see the module docs.
#[derive(Debug)]
pub struct TestEnv {
    name: String,
    /// `meterd-test-<name>-<pid>`: the cgroup's, namespace's, pin dir's and
    /// directory's name, unique per test and test process.
    unique: String,
    dir: PathBuf,
    traffic: PathBuf,
    servers: Vec<Proc>,
    /// Background clients started, to name their output files.
    clients_started: AtomicUsize,
    /// Client addresses handed out so far (from [`FIRST_SOURCE`]).
    sources_used: AtomicU32,
    agent: Option<Agent>,
    cgroup: Option<Cgroup>,
    netns: Option<NetNs>,
    pin_dir: PathBuf,
}

impl TestEnv {
    /// Sets up the world for `name`, or returns `None` when the machine
    /// cannot run it and `METERD_ALLOW_SKIP=1` (see `privilege`).
    /// `traffic` is [`crate::traffic_bin!`].
    pub fn new(name: &str, traffic: &str, setup: Setup) -> Option<TestEnv> {
        let needs = Needs {
            netns: setup.netns,
            nft: setup.nft,
        };
        if !privilege::check(name, needs) {
            return None;
        }
        let unique = format!("meterd-test-{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&unique);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Some(TestEnv {
            name: name.to_owned(),
            cgroup: Some(Cgroup::create(&unique)),
            netns: setup.netns.then(|| NetNs::create(&unique)),
            pin_dir: Path::new(privilege::BPFFS).join(&unique),
            unique,
            dir,
            traffic: PathBuf::from(traffic),
            servers: Vec::new(),
            clients_started: AtomicUsize::new(0),
            sources_used: AtomicU32::new(0),
            agent: None,
        })
    }

    /// The agent's `pin_dir` (bpffs): its pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The test's scratch directory (logs, config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `meterd-test-<name>-<pid>`: unique per test and test process, for
    /// anything else the test creates on the machine (another cgroup).
    pub fn unique(&self) -> &str {
        &self.unique
    }

    /// The first of `n` client addresses no client of this test has used:
    /// 127.1.0.1, 127.1.0.2, ... in the order they are asked for.
    pub fn fresh_sources(&self, n: usize) -> Ipv4Addr {
        let n = u32::try_from(n.max(1)).expect("a sane number of addresses");
        let first = self.sources_used.fetch_add(n, Ordering::Relaxed);
        assert!(
            first + n <= SOURCES,
            "{}: more than {SOURCES} client addresses",
            self.name
        );
        Ipv4Addr::from(u32::from(FIRST_SOURCE) + first)
    }

    /// One client address no client of this test has used, for clients
    /// that are to be one viewer ([`Source::Addr`]).
    pub fn fresh_source(&self) -> IpAddr {
        IpAddr::V4(self.fresh_sources(1))
    }

    fn tcp_args(&self, client: &TcpClient) -> Vec<String> {
        let distinct =
            (client.source == Source::Distinct).then(|| self.fresh_sources(client.count));
        client.args(distinct)
    }

    /// The test's cgroup.
    pub fn cgroup(&self) -> &Cgroup {
        self.cgroup.as_ref().expect("cgroup exists until drop")
    }

    /// Does to the test's cgroup what `systemctl restart` does to a
    /// service's: stops the servers still running in it (SIGTERM, then
    /// whatever is left is killed), removes the directory and creates it
    /// again at the same path. The new cgroup has a new id and nothing
    /// attached to it; servers started from now on run in it. Returns the
    /// old and the new id.
    pub fn recreate_cgroup(&mut self) -> (u64, u64) {
        let old = self.cgroup().id();
        for proc in &mut self.servers {
            if proc.try_wait().is_none() {
                proc.signal(libc::SIGTERM);
                assert!(
                    proc.wait_timeout(Duration::from_secs(10)).is_some(),
                    "a server did not exit on SIGTERM; its output:\n{}",
                    proc.output_tail(30)
                );
            }
        }
        // Drop kills what is left and removes the directory; create would
        // replace a directory that is still there, so check it is gone.
        drop(self.cgroup.take());
        let path = Cgroup::path_of(&self.unique);
        assert!(
            !path.exists(),
            "cgroup {} could not be removed",
            path.display()
        );
        let cgroup = Cgroup::create(&self.unique);
        let new = cgroup.id();
        assert_ne!(old, new, "the recreated cgroup has the old one's id");
        self.cgroup = Some(cgroup);
        (old, new)
    }

    /// The test's namespace, if it has one.
    pub fn netns(&self) -> Option<&NetNs> {
        self.netns.as_ref()
    }

    /// `program args...`, inside the test's namespace if it has one.
    pub fn command<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        if let Some(ns) = &self.netns {
            ns.command(program, args)
        } else {
            let mut cmd = Command::new(program);
            cmd.args(args);
            cmd
        }
    }

    /// Writes the agent's config for this test's cgroup and pin dir and
    /// starts it.
    pub fn start_agent(&mut self, config: AgentConfig) -> &mut Agent {
        self.start_agent_with(config, &[])
    }

    /// [`TestEnv::start_agent`] with extra environment variables (kept for
    /// its restarts until [`Agent::set_env`] changes them).
    pub fn start_agent_with(&mut self, config: AgentConfig, vars: &[(&str, &str)]) -> &mut Agent {
        assert!(self.agent.is_none(), "{}: agent already started", self.name);
        let mut agent = Agent::new(&self.dir, self.cgroup().path(), &self.pin_dir, config);
        for (k, v) in vars {
            agent.set_env(k, Some(v));
        }
        agent.start();
        self.agent.insert(agent)
    }

    /// The agent started by [`TestEnv::start_agent`].
    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent not started")
    }

    /// The agent started by [`TestEnv::start_agent`], to read from.
    pub fn agent_ref(&self) -> &Agent {
        self.agent.as_ref().expect("agent not started")
    }

    /// The config the agent runs with (e.g. its `session_idle`).
    pub fn agent_config(&self) -> &AgentConfig {
        self.agent_ref().config()
    }

    /// Starts `meterd-traffic tcp-server` listening on `listen`, in the
    /// cgroup (and namespace); returns once it is listening.
    pub fn tcp_server(&mut self, listen: &[SocketAddr]) -> Server {
        self.server("tcp-server", listen, &[])
    }

    /// Starts `meterd-traffic udp-server` on `listen`, in the cgroup (and
    /// namespace). It logs its clients when stopped ([`TestEnv::stop_server`]).
    pub fn udp_server(&mut self, listen: &[SocketAddr]) -> Server {
        self.server("udp-server", listen, &["--idle-ms=3600000"])
    }

    fn server(&mut self, kind: &str, listen: &[SocketAddr], extra: &[&str]) -> Server {
        let index = self.servers.len();
        let log = self.dir.join(format!("{kind}-{index}.jsonl"));
        let ready = self.dir.join(format!("{kind}-{index}.ready"));
        touch(&log);
        let mut args: Vec<String> = vec![
            kind.to_owned(),
            format!("--log={}", log.display()),
            format!("--ready-file={}", ready.display()),
        ];
        args.extend(listen.iter().map(|a| format!("--listen={a}")));
        args.extend(extra.iter().map(|&s| s.to_owned()));

        // Join the cgroup first, then enter the namespace: `ip netns exec`
        // remounts /sys, so the cgroup tree is not visible from inside.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(self.cgroup().procs_file());
        if let Some(ns) = &self.netns {
            cmd.args(["ip", "netns", "exec", ns.name()]);
        }
        cmd.arg(&self.traffic).args(&args);
        let output = self.dir.join(format!("{kind}-{index}.out"));
        let mut proc = Proc::spawn(kind, &mut cmd, &output);

        let mut exited = None;
        let up = wait_until(Duration::from_secs(15), || {
            exited = proc.try_wait();
            exited.is_some() || ready.exists()
        });
        assert!(
            up && exited.is_none(),
            "{kind} on {listen:?} did not start ({exited:?}); its output:\n{}",
            proc.output_tail(30)
        );
        let pid = proc.pid();
        assert!(
            self.cgroup().contains(pid),
            "{kind} (pid {pid}) is not in cgroup {}: /proc/{pid}/cgroup says {}",
            self.cgroup().path().display(),
            read_lossy(Path::new(&format!("/proc/{pid}/cgroup")))
        );
        self.servers.push(proc);
        Server { index, log, pid }
    }

    /// SIGTERM to a server, and waits for it to exit (a UDP server logs its
    /// clients then).
    pub fn stop_server(&mut self, server: &Server) {
        let proc = &mut self.servers[server.index];
        proc.signal(libc::SIGTERM);
        assert!(
            proc.wait_timeout(Duration::from_secs(10)).is_some(),
            "server {} did not exit on SIGTERM; its output:\n{}",
            server.pid,
            proc.output_tail(30)
        );
    }

    /// What a server has logged so far.
    pub fn server_log(&self, server: &Server) -> Vec<ConnLog> {
        parse_conn_log(&read_lossy(&server.log))
            .unwrap_or_else(|e| panic!("server log {} is malformed: {e}", server.log.display()))
    }

    /// Runs a `tcp-client` to completion (in the namespace, outside the
    /// cgroup) and returns its summary; panics unless every connection got
    /// exactly what it asked for.
    pub fn run_tcp_client(&self, client: &TcpClient) -> ClientSummary {
        parse_summary(&self.run_traffic(&self.tcp_args(client)))
    }

    /// Runs the traffic tool to completion (in the namespace, outside the
    /// cgroup); its stdout, or a panic with its stderr if it failed.
    fn run_traffic(&self, args: &[String]) -> String {
        let mut cmd = self.command(&self.traffic, args);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a `tcp-client` in the background.
    pub fn spawn_tcp_client(&self, client: &TcpClient) -> RunningClient {
        let n = self.clients_started.fetch_add(1, Ordering::Relaxed);
        let stdout = self.dir.join(format!("tcp-client-{n}.json"));
        let stderr = self.dir.join(format!("tcp-client-{n}.err"));
        let mut cmd = self.command(&self.traffic, &self.tcp_args(client));
        let proc = Proc::spawn_split("tcp-client", &mut cmd, Some(&stdout), &stderr);
        RunningClient { proc, stdout }
    }

    /// Runs clients in parallel to completion; their summaries in order.
    pub fn run_tcp_clients(&self, clients: &[TcpClient]) -> Vec<ClientSummary> {
        thread::scope(|scope| {
            let runs: Vec<_> = clients
                .iter()
                .map(|c| scope.spawn(move || self.run_tcp_client(c)))
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// Runs a `udp-client` from a port chosen beforehand (so the test can
    /// name its flow to meterd first), `pause_ms` between its `GET`
    /// rounds, that ends without failing when meterd cuts its flow off.
    pub fn run_udp_until_cut(
        &self,
        client: &UdpClient,
        port: u16,
        pause_ms: u64,
    ) -> UdpClientSummary {
        let distinct = (client.source == Source::Distinct).then(|| self.fresh_sources(1));
        let mut args = client.args(distinct);
        args.extend([
            format!("--port={port}"),
            format!("--pause-ms={pause_ms}"),
            "--until-cut".to_owned(),
        ]);
        let stdout = self.run_traffic(&args);
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("udp-client printed no summary ({e}): {stdout}"))
    }

    /// Runs a `udp-client` to completion and returns its totals.
    pub fn run_udp_client(&self, client: &UdpClient) -> UdpClientSummary {
        let distinct = (client.source == Source::Distinct).then(|| self.fresh_sources(1));
        let stdout = self.run_traffic(&client.args(distinct));
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("udp-client printed no summary ({e}): {stdout}"))
    }

    /// The server's log entries of the connections in `summaries`, once the
    /// server has logged all of them; panics unless server and clients agree
    /// on every byte (the truth must be consistent before meterd is judged
    /// against it) and the server saw no protocol error.
    pub fn tcp_truth(&self, server: &Server, summaries: &[&ClientSummary]) -> Vec<ConnLog> {
        let mut want: HashMap<Key, Vec<(u64, u64)>> = HashMap::new();
        for conn in summaries.iter().flat_map(|s| &s.connections) {
            let key = Key {
                protocol: Protocol::Tcp,
                client_addr: conn.client_addr.to_canonical(),
                client_port: conn.client_port,
                server_port: conn.server_port,
            };
            want.entry(key)
                .or_default()
                .push((conn.bytes_received, conn.bytes_sent));
        }
        let select = |log: Vec<ConnLog>| -> Vec<ConnLog> {
            log.into_iter()
                .filter(|c| want.contains_key(&Key::of_truth(c)))
                .collect()
        };
        let expected: usize = want.values().map(Vec::len).sum();
        let mut logged = Vec::new();
        let complete = wait_until(SERVER_LOG_TIMEOUT, || {
            logged = select(self.server_log(server));
            logged.len() >= expected
        });
        assert!(
            complete,
            "server logged {} of the {expected} connections its clients finished",
            logged.len()
        );
        let mut have: HashMap<Key, Vec<(u64, u64)>> = HashMap::new();
        for c in &logged {
            assert!(c.error.is_none(), "server-side error: {c:?}");
            have.entry(Key::of_truth(c))
                .or_default()
                .push((c.bytes_sent, c.bytes_received));
        }
        for (key, mut client_view) in want {
            let mut server_view = have.remove(&key).unwrap_or_default();
            client_view.sort_unstable();
            server_view.sort_unstable();
            assert_eq!(
                client_view, server_view,
                "client and server disagree on connection {key:?} (received, sent)"
            );
        }
        logged
    }

    /// Stops the UDP server and returns its per-client totals for the
    /// `clients`, after checking they match what the clients counted (no
    /// datagram was lost between the two applications).
    pub fn udp_truth(&mut self, server: &Server, clients: &[&UdpClientSummary]) -> Vec<ConnLog> {
        self.stop_server(server);
        let log = self.server_log(server);
        clients
            .iter()
            .map(|client| {
                let entries: Vec<&ConnLog> = log
                    .iter()
                    .filter(|c| {
                        c.protocol == Protocol::Udp
                            && c.client_port == client.client_port
                            && c.server_port == client.server_port
                            && (client.client_addr.is_unspecified()
                                || c.client_addr.to_canonical()
                                    == client.client_addr.to_canonical())
                    })
                    .collect();
                assert_eq!(
                    entries.len(),
                    1,
                    "udp server logged {entries:?} for client {client:?}"
                );
                let entry = entries[0].clone();
                assert_eq!(
                    (entry.bytes_received, entry.bytes_sent),
                    (client.bytes_sent, client.bytes_received),
                    "datagrams were lost between udp client and server (server {entry:?}, \
                     client {client:?}): the truth is not exact, the test is invalid"
                );
                entry
            })
            .collect()
    }

    /// Waits until meterd's closed log holds exactly one exact record per
    /// connection of `truth` and nothing else, then waits two more intervals
    /// and checks again (a late duplicate is a failure too). Panics with the
    /// difference and the agent's log otherwise.
    pub fn wait_for_exact_records(&self, truth: &[ConnLog]) -> Vec<ClosedRecord> {
        let agent = self.agent.as_ref().expect("agent not started");
        let interval = agent.config().interval;
        let timeout = RECORD_TIMEOUT.max(interval * 4);
        let started = Instant::now();
        loop {
            let cmp = records::compare(truth, &agent.closed_records());
            if cmp.is_exact() {
                thread::sleep(interval * 2 + Duration::from_secs(1));
                let again = agent.closed_records();
                let cmp = records::compare(truth, &again);
                assert!(
                    cmp.is_exact(),
                    "{}: meterd's records changed after they matched:\n{}\nagent log:\n{}",
                    self.name,
                    cmp.diff(),
                    agent.log_tail(40)
                );
                return again;
            }
            if cmp.is_final() || started.elapsed() >= timeout {
                // Give a record in flight one more chance before judging.
                thread::sleep(Duration::from_millis(500));
                let last = records::compare(truth, &agent.closed_records());
                if last.is_exact() {
                    continue;
                }
                panic!(
                    "{}: meterd's closed log ({}) does not match the servers' logs after \
                     {:.1?}:\n{}\nagent log:\n{}",
                    self.name,
                    agent.closed_log().display(),
                    started.elapsed(),
                    last.diff(),
                    agent.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl TestEnv {
    /// Waits until the ledger is exact for `truth` ([`Ledger::compare`]):
    /// the connection records of each connection, summed, have its bytes
    /// exact and the service `service_of` names, there is no other
    /// connection record, and every connection record is in an exported
    /// session whose bytes and connection count are those of its records.
    /// Then waits two more intervals and checks again (a late duplicate is
    /// a failure too). Panics with the difference and the agent's log
    /// otherwise. Returns both levels; how the connections group into
    /// sessions is for the test to judge ([`crate::ledger::expected_sessions`]).
    pub fn wait_for_exact_ledger(
        &self,
        truth: &[ConnLog],
        service_of: &dyn Fn(&ConnLog) -> String,
    ) -> Ledger {
        let agent = self.agent.as_ref().expect("agent not started");
        let interval = agent.config().interval;
        // Sessions settle `session_idle` after their last byte.
        let timeout = RECORD_TIMEOUT.max(interval * 4) + agent.config().session_idle;
        let started = Instant::now();
        loop {
            let cmp = agent.ledger().compare(truth, service_of);
            if cmp.is_exact() {
                thread::sleep(interval * 2 + Duration::from_secs(1));
                let again = agent.ledger();
                let cmp = again.compare(truth, service_of);
                assert!(
                    cmp.is_exact(),
                    "{}: the ledger changed after it matched:\n{}\nagent log:\n{}",
                    self.name,
                    cmp.diff(),
                    agent.log_tail(40)
                );
                return again;
            }
            if cmp.is_final() || started.elapsed() >= timeout {
                thread::sleep(Duration::from_millis(500));
                let last = agent.ledger().compare(truth, service_of);
                if last.is_exact() {
                    continue;
                }
                panic!(
                    "{}: the ledger ({}) does not match the servers' logs after {:.1?}:\n{}\n\
                     agent log:\n{}",
                    self.name,
                    agent.ledger_path().display(),
                    started.elapsed(),
                    last.diff(),
                    agent.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Servers first (their sockets close while meterd still runs), then
        // the agent (killed, `meterd unload`), then the cgroup (kills
        // leftovers, rmdir), then the namespace.
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
        self.servers.clear();
        drop(self.agent.take());
        drop(self.cgroup.take());
        drop(self.netns.take());
        if thread::panicking() || std::env::var_os(KEEP_ENV).is_some() {
            eprintln!(
                "{}: kept {} for inspection",
                self.unique,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A directory of a test's own outside any [`TestEnv`] (e.g. for a NATS
/// cluster that several hosts share); removed on drop unless the test
/// failed, so its logs stay for the post-mortem.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A fresh [`Scratch`] for test `name`; `None` when privileged tests are
/// skipped (the skip is reported as for a [`TestEnv`]).
pub fn scratch_dir(name: &str) -> Option<Scratch> {
    if !privilege::check(name, Needs::default()) {
        return None;
    }
    let path = std::env::temp_dir().join(format!("meterd-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&path);
    fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    Some(Scratch { path })
}
