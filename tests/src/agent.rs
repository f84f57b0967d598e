//! Running the meterd agent as a test's child process.
//!
//! An [`Agent`] writes its own config (by default one `web` service, a
//! volume tariff of one minor unit per byte, so billing never hides a byte;
//! or the services, accounts and hooks a test chooses), starts
//! `meterd run --config F --closed-log L --ready-file R` with its output in
//! the test's directory, and can stop it (SIGTERM), kill it (SIGKILL) and
//! start it again over the same pins. It reads what the agent offers: the
//! ready file (API and metrics addresses), `/metrics`, the log, and
//! `meterd ledger export` at both levels (viewing sessions, and
//! `--connections`). On drop it kills the agent and runs
//! `meterd unload --config F`.
//!
//! Every service gets a short `session_idle` ([`AgentConfig::session_idle`],
//! 2 s unless a test says otherwise) instead of meterd's default 30 s, so a
//! test's sessions settle within seconds of their last byte.
//!
//! Does not own: judging the records (`records`, `ledger`).

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    http,
    ledger::{self, ConnectionRecord, Ledger, SessionRecord},
    metrics::Exposition,
    process::{Proc, read_lossy, tail, wait_until},
    records::{self, ClosedRecord},
    tariff::Service,
};

/// How long `meterd run` may take to attach and create its ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable naming the agent binary (`cargo xtask test` sets it).
pub const METERD_BIN_ENV: &str = "METERD_BIN";

/// The agent binary: `$METERD_BIN`, else `<workspace>/target/debug/meterd`.
pub fn meterd_bin() -> PathBuf {
    // Cargo runs tests from the crate's directory: a relative path is the
    // workspace's, as typed at the top of the tree.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var_os(METERD_BIN_ENV).map_or_else(
        || workspace.join("target/debug/meterd"),
        |b| workspace.join(PathBuf::from(b)),
    );
    assert!(
        bin.is_file(),
        "meterd binary not found at {}: build it with `cargo build -p meterd`, or set \
         {METERD_BIN_ENV} (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// The parts of the agent's config a test chooses.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Metered TCP ports of the `web` service.
    pub tcp_ports: Vec<u16>,
    /// Metered UDP ports of the `web` service.
    pub udp_ports: Vec<u16>,
    /// `agent.interval`, the base read interval.
    pub interval: Duration,
    /// `agent.udp_idle_timeout`.
    pub udp_idle_timeout: Duration,
    /// `agent.max_connections` (`None`: the agent's default): a small live
    /// map a test can fill.
    pub max_connections: Option<u32>,
    /// `session_idle` of the `web` service, and of every service of
    /// `services` whose table does not set its own.
    pub session_idle: Duration,
    /// The services; empty: the harness's one `web` service on `tcp_ports`
    /// and `udp_ports` at one minor unit per byte (both directions).
    pub services: Vec<Service>,
    /// `[[account]]`s: id and `prepaid_minor`.
    pub accounts: Vec<(String, u64)>,
    /// `on_limit` of every account (`notify`, `deny`, `cut`); `None`
    /// leaves it out (the agent's default, `cut`).
    pub on_limit: Option<String>,
    /// `billing.limit_hook`.
    pub limit_hook: Option<PathBuf>,
    /// Appended to the config as is (e.g. a `[governor]` table).
    pub extra_toml: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            tcp_ports: Vec::new(),
            udp_ports: Vec::new(),
            interval: Duration::from_secs(1),
            udp_idle_timeout: Duration::from_secs(2),
            max_connections: None,
            session_idle: Duration::from_secs(2),
            services: Vec::new(),
            accounts: Vec::new(),
            on_limit: None,
            limit_hook: None,
            extra_toml: String::new(),
        }
    }
}

impl AgentConfig {
    /// The TOML file meterd reads. Everything another test's agent could
    /// also use is this test's own: cgroup, pin dir, ledger file, and the
    /// metrics endpoint (port 0: any free port).
    pub fn to_toml(&self, cgroup: &Path, pin_dir: &Path, ledger: &Path) -> String {
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut toml = format!(
            r#"[agent]
cgroup = "{cgroup}"
pin_dir = "{pin_dir}"
interval = "{interval}"
udp_idle_timeout = "{idle}"
{max_connections}
[billing]
currency = "EUR"
ledger = "{ledger}"
"#,
            cgroup = cgroup.display(),
            pin_dir = pin_dir.display(),
            ledger = ledger.display(),
            interval = duration(self.interval),
            idle = duration(self.udp_idle_timeout),
            max_connections = self
                .max_connections
                .map_or(String::new(), |n| format!("max_connections = {n}\n")),
        );
        if let Some(hook) = &self.limit_hook {
            let _ = writeln!(toml, "limit_hook = \"{}\"", hook.display());
        }
        toml.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n");
        if self.services.is_empty() {
            let _ = write!(
                toml,
                r#"[[service]]
name = "{name}"
tcp_ports = [{tcp}]
udp_ports = [{udp}]
session_idle = "{session_idle}"
[service.tariff]
kind = "volume"
price_minor = 1
unit_bytes = 1
direction = "both"
rounding = "floor"
"#,
                name = records::SERVICE,
                tcp = list(&self.tcp_ports),
                udp = list(&self.udp_ports),
                session_idle = duration(self.session_idle),
            );
        }
        for service in &self.services {
            toml.push_str(&with_session_idle(&service.toml(), self.session_idle));
            toml.push('\n');
        }
        for (id, prepaid) in &self.accounts {
            let _ = write!(
                toml,
                "\n[[account]]\nid = \"{id}\"\nprepaid_minor = {prepaid}\n"
            );
            if let Some(policy) = &self.on_limit {
                let _ = writeln!(toml, "on_limit = \"{policy}\"");
            }
        }
        if !self.extra_toml.is_empty() {
            toml.push('\n');
            toml.push_str(&self.extra_toml);
            toml.push('\n');
        }
        toml
    }
}

/// A `[[service]]` table with `session_idle = "<idle>"` added before its
/// tariff, unless it sets its own.
fn with_session_idle(table: &str, idle: Duration) -> String {
    if table
        .lines()
        .any(|l| l.trim_start().starts_with("session_idle"))
    {
        return table.to_owned();
    }
    let at = table
        .find("[service.tariff]")
        .unwrap_or_else(|| panic!("a [[service]] table without its tariff: {table}"));
    format!(
        "{}session_idle = \"{}\"\n{}",
        &table[..at],
        duration(idle),
        &table[at..]
    )
}

/// What the agent's ready file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// `api=`: the attribution API's unix socket (or address).
    pub api: String,
    /// `metrics=`: the address `/metrics` is served on.
    pub metrics: SocketAddr,
}

/// A duration as the config writes it: whole seconds as `"5s"`, else `"250ms"`.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A meterd agent owned by one test.
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    config: AgentConfig,
    config_path: PathBuf,
    closed_log: PathBuf,
    ready_file: PathBuf,
    /// stdout and stderr of every run, appended.
    log: PathBuf,
    /// `billing.ledger`.
    ledger: PathBuf,
    pin_dir: PathBuf,
    proc: Option<Proc>,
    /// Runs started so far, to label the log.
    starts: u32,
    /// Extra environment of the next runs.
    env: Vec<(String, String)>,
}

impl Agent {
    /// Writes the config into `dir`; does not start the agent.
    pub fn new(dir: &Path, cgroup: &Path, pin_dir: &Path, config: AgentConfig) -> Agent {
        let config_path = dir.join("meterd.toml");
        let ledger = dir.join("ledger.sqlite");
        fs::write(&config_path, config.to_toml(cgroup, pin_dir, &ledger))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        Agent {
            bin: meterd_bin(),
            config,
            config_path,
            closed_log: dir.join("closed.jsonl"),
            ready_file: dir.join("meterd.ready"),
            log: dir.join("meterd.log"),
            ledger,
            pin_dir: pin_dir.to_owned(),
            proc: None,
            starts: 0,
            env: Vec::new(),
        }
    }

    /// Sets (`Some`) or removes an environment variable of the runs
    /// started from now on.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// The config this agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Starts `meterd run` and waits for its ready file; panics with the
    /// agent's log if it exits or is not ready in time.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "agent already running");
        let _ = fs::remove_file(&self.ready_file);
        self.starts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--closed-log")
            .arg(&self.closed_log)
            .arg("--ready-file")
            .arg(&self.ready_file);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn(&format!("meterd run #{}", self.starts), &mut cmd, &self.log);
        let mut exited = None;
        let ready = wait_until(READY_TIMEOUT, || {
            exited = proc.try_wait();
            exited.is_some() || self.ready_file.exists()
        });
        if let Some(status) = exited.filter(|_| !self.ready_file.exists()) {
            panic!(
                "meterd run #{} exited ({status}) before it was ready; its log:\n{}",
                self.starts,
                self.log_tail(60)
            );
        }
        assert!(
            ready,
            "meterd run #{} did not create its ready file {} within {READY_TIMEOUT:?}; its log:\n{}",
            self.starts,
            self.ready_file.display(),
            self.log_tail(60)
        );
        self.proc = Some(proc);
    }

    /// SIGTERM, then waits for a graceful exit with status 0 (the contract).
    pub fn stop(&mut self) {
        let mut proc = self.proc.take().expect("agent not running");
        proc.signal(libc::SIGTERM);
        let status = proc.wait_timeout(Duration::from_secs(20));
        match status {
            Some(status) if status.success() => {}
            Some(status) => panic!(
                "meterd exited with {status} on SIGTERM (the contract says 0); its log:\n{}",
                self.log_tail(60)
            ),
            None => panic!(
                "meterd did not exit within 20 s of SIGTERM; its log:\n{}",
                self.log_tail(60)
            ),
        }
    }

    /// SIGKILL: the agent gets no chance to clean up or flush anything.
    pub fn kill9(&mut self) {
        let mut proc = self.proc.take().expect("agent not running");
        proc.kill();
    }

    /// Panics with the log unless the agent process is still running.
    pub fn assert_running(&mut self) {
        let proc = self.proc.as_mut().expect("agent not started");
        if let Some(status) = proc.try_wait() {
            panic!(
                "meterd exited unexpectedly ({status}); its log:\n{}",
                self.log_tail(60)
            );
        }
    }

    /// Every record in the closed log so far; panics on a line that is not
    /// a record of the contract's shape.
    pub fn closed_records(&self) -> Vec<ClosedRecord> {
        records::parse_closed_log(&read_lossy(&self.closed_log)).unwrap_or_else(|e| {
            panic!(
                "meterd's closed log {} is malformed: {e}",
                self.closed_log.display()
            )
        })
    }

    /// The closed log's path.
    pub fn closed_log(&self) -> &Path {
        &self.closed_log
    }

    /// The last `lines` lines the agent wrote (all runs).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&read_lossy(&self.log), lines)
    }

    /// Everything the agent wrote (all runs).
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The ledger file (`billing.ledger`).
    pub fn ledger_path(&self) -> &Path {
        &self.ledger
    }

    /// Whether the agent process is running now.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// The ready file of the current run; panics if it is not there or
    /// malformed.
    pub fn ready(&self) -> Ready {
        let text = read_lossy(&self.ready_file);
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} line in the ready file: {text:?}"))
                .trim()
                .to_owned()
        };
        let metrics = field("metrics=");
        Ready {
            api: field("api="),
            metrics: metrics
                .parse()
                .unwrap_or_else(|e| panic!("ready file: metrics={metrics:?}: {e}")),
        }
    }

    /// The text of `GET /metrics` on the current run's metrics address;
    /// panics unless it answers 200.
    pub fn metrics_text(&self) -> String {
        let addr = self.ready().metrics;
        let response = http::get(addr, "/metrics").unwrap_or_else(|e| {
            panic!(
                "GET http://{addr}/metrics: {e}\nagent log:\n{}",
                self.log_tail(30)
            )
        });
        assert_eq!(
            response.status, 200,
            "GET http://{addr}/metrics: {}\n{}",
            response.head, response.body
        );
        response.body
    }

    /// `/metrics`, parsed.
    pub fn scrape(&self) -> Exposition {
        let text = self.metrics_text();
        Exposition::parse(&text).unwrap_or_else(|e| panic!("/metrics is malformed: {e}\n{text}"))
    }

    /// `meterd ledger export --config F --format <format>`: the settled
    /// viewing sessions; its stdout, after checking it succeeded and said on
    /// stderr how many sessions it exported, as many as it wrote.
    pub fn export(&self, format: &str) -> String {
        self.run_export(format, false)
    }

    /// `meterd ledger export --connections --config F --format <format>`:
    /// the connection records, checked the same way.
    pub fn export_connections(&self, format: &str) -> String {
        self.run_export(format, true)
    }

    fn run_export(&self, format: &str, connections: bool) -> String {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["ledger", "export", "--config"])
            .arg(&self.config_path)
            .args(["--format", format]);
        if connections {
            cmd.arg("--connections");
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}): {stderr}",
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let what = if connections {
            "connections"
        } else {
            "sessions"
        };
        let reported = stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("meterd: exported ")?
                    .split_once(&format!(" {what} from "))?
                    .0
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or_else(|| {
                panic!("{cmd:?} did not report on stderr how many {what} it exported: {stderr:?}")
            });
        let written = stdout.lines().filter(|l| !l.trim().is_empty()).count()
            - usize::from(format == "csv" && !stdout.is_empty());
        assert_eq!(
            reported, written,
            "{cmd:?} says it exported {reported} {what} but wrote {written} records:\n{stdout}"
        );
        stdout
    }

    /// The settled viewing sessions, from `meterd ledger export --format
    /// jsonl`.
    pub fn ledger_records(&self) -> Vec<SessionRecord> {
        let text = self.export("jsonl");
        ledger::parse_jsonl(&text)
            .unwrap_or_else(|e| panic!("meterd ledger export --format jsonl is malformed: {e}"))
    }

    /// The connection records, from `meterd ledger export --connections
    /// --format jsonl`.
    pub fn ledger_connections(&self) -> Vec<ConnectionRecord> {
        let text = self.export_connections("jsonl");
        ledger::parse_jsonl(&text).unwrap_or_else(|e| {
            panic!("meterd ledger export --connections --format jsonl is malformed: {e}")
        })
    }

    /// Both levels of the ledger. Sessions are read first: a session that
    /// settles between the two exports then shows as connection records of
    /// a session not exported yet, which the comparison waits out.
    pub fn ledger(&self) -> Ledger {
        Ledger {
            sessions: self.ledger_records(),
            connections: self.ledger_connections(),
        }
    }

    /// `meterd unload --config F`; returns (success, output).
    pub fn unload(&self) -> (bool, String) {
        match Command::new(&self.bin)
            .arg("unload")
            .arg("--config")
            .arg(&self.config_path)
            .output()
        {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Dropping the Proc kills and reaps it without panicking.
        drop(self.proc.take());
        // Named before the unload removes the pin dir, while a symlinked
        // pin dir still resolves as it did for the agent.
        let instance = instance_name(&self.pin_dir);
        // Never attached (or already unloaded): nothing to detach.
        if self.pin_dir.exists() {
            let (ok, output) = self.unload();
            if !ok {
                eprintln!(
                    "meterd unload --config {} failed: {output}",
                    self.config_path.display()
                );
            }
        }
        // Pins outlive processes: a failed unload must not leave programs
        // attached or maps pinned on the machine, so remove what is left
        // (and say so, it is a finding about the agent).
        if self.pin_dir.exists() {
            eprintln!(
                "pin dir {} still exists after `meterd unload`; removing it",
                self.pin_dir.display()
            );
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        // The agent (and `meterd unload`) keep the instance lock and, by
        // default, the API socket in /run/meterd, and leave both there when
        // they exit, for a later agent to reuse; an agent killed with -9
        // also leaves its record in /run/meterd/agents. The names are this
        // test's own, so none will: remove them. (Agents before the
        // instance name named the socket after the pin dir's last part.)
        let _ = fs::remove_file(format!("/run/meterd/{instance}.lock"));
        let _ = fs::remove_file(format!("/run/meterd/{instance}.sock"));
        let _ = fs::remove_file(format!("/run/meterd/agents/{instance}.json"));
        if let Some(name) = self.pin_dir.file_name() {
            let _ = fs::remove_file(format!("/run/meterd/{}.sock", name.to_string_lossy()));
        }
    }
}

/// The name meterd gives its instance on `pin_dir`, for its lock, default
/// API socket and runtime record in /run/meterd: the canonical path with
/// `/` as `-` and no leading `-` (`/sys/fs/bpf/meterd-x` ->
/// `sys-fs-bpf-meterd-x`), `meterd` for the default `/sys/fs/bpf/meterd`.
/// Canonical as the agent makes it: the parent resolved, then the whole
/// path if it exists.
fn instance_name(pin_dir: &Path) -> String {
    let canonical = match (pin_dir.parent(), pin_dir.file_name()) {
        (Some(parent), Some(name)) => {
            fs::canonicalize(parent).map_or_else(|_| pin_dir.to_owned(), |p| p.join(name))
        }
        _ => pin_dir.to_owned(),
    };
    let canonical = fs::canonicalize(&canonical).unwrap_or(canonical);
    if canonical == Path::new("/sys/fs/bpf/meterd") {
        return "meterd".to_owned();
    }
    canonical
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tariff::{Rounding, Tariff};

    #[test]
    fn the_instance_is_named_after_the_canonical_pin_dir() {
        let dir = std::env::temp_dir().join(format!("meterd-lock-name-{}", std::process::id()));
        fs::create_dir_all(dir.join("real")).unwrap();
        let link = dir.join("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("real"), &link).unwrap();
        let expected = |tail: &str| {
            let base = fs::canonicalize(&dir).unwrap();
            let name = base
                .to_string_lossy()
                .trim_start_matches('/')
                .replace('/', "-");
            format!("{name}-{tail}")
        };
        // A pin dir that does not exist (yet, or any more) under a real parent.
        assert_eq!(instance_name(&dir.join("pins")), expected("pins"));
        // `..` and a symlinked pin dir name the same instance as the target.
        assert_eq!(instance_name(&dir.join("real/../pins")), expected("pins"));
        assert_eq!(instance_name(&link), expected("real"));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(instance_name(Path::new("/sys/fs/bpf/meterd")), "meterd");
        assert_eq!(
            instance_name(Path::new("/sys/fs/bpf/meterd-test-x")),
            "sys-fs-bpf-meterd-test-x"
        );
    }

    #[test]
    fn every_service_gets_a_session_idle() {
        let mut own = Service::tcp("own", &[2], Tariff::time(1, 1, Rounding::Floor));
        own.session_idle = Some(Duration::from_millis(1500));
        let config = AgentConfig {
            services: vec![
                Service::tcp("short", &[1], Tariff::time(1, 1, Rounding::Floor)),
                own,
            ],
            ..AgentConfig::default()
        };
        let toml = config.to_toml(Path::new("/cg"), Path::new("/pin"), Path::new("/l"));
        assert!(
            toml.contains("udp_ports = []\nsession_idle = \"2s\"\n[service.tariff]"),
            "{toml}"
        );
        assert!(toml.contains("session_idle = \"1500ms\"\n"), "{toml}");
        assert_eq!(toml.matches("session_idle").count(), 2, "{toml}");
        let web =
            AgentConfig::default().to_toml(Path::new("/cg"), Path::new("/pin"), Path::new("/l"));
        assert!(
            web.contains("session_idle = \"2s\"\n[service.tariff]"),
            "{web}"
        );
    }
}
