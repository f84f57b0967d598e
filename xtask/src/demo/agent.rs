//! The demo's meterd: its config (two services, three accounts), the
//! agent process in the sandbox, and what the demo asks of it: the status
//! API, the ledger export, the ledger's events and, on drop, `meterd
//! unload` and the removal of its files in /run/meterd.
//!
//! Does not own: the sandbox (`sandbox`), what is served (`origin`).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use super::origin::{TIME_PORT, VOLUME_PORT};
use super::sandbox::{self, Proc};

/// `session_idle` of both services: a viewing session ends 5 s after its
/// last byte, so a paused viewer's two sessions show within the demo.
pub const SESSION_IDLE: Duration = Duration::from_secs(5);

/// An account of the demo.
#[derive(Clone, Copy, Debug)]
pub struct Account {
    pub id: &'static str,
    /// Prepaid (runs out) or a postpaid credit limit.
    pub prepaid: bool,
    /// The balance or limit, in cents.
    pub limit_minor: u64,
}

/// alice is postpaid, bob and carol prepaid; carol's 25 cents last about
/// 40 s of her two viewers (0.4 + 0.2 cents a second), then meterd cuts
/// her off.
pub const ACCOUNTS: [Account; 3] = [
    Account {
        id: "alice",
        prepaid: false,
        limit_minor: 1000,
    },
    Account {
        id: "bob",
        prepaid: true,
        limit_minor: 500,
    },
    Account {
        id: "carol",
        prepaid: true,
        limit_minor: 25,
    },
];

/// The account whose balance runs out.
pub const CUT_ACCOUNT: &str = "carol";

/// What the config names and where the agent's files go.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The config file.
    pub config: PathBuf,
    /// nginx's cgroup: what meterd meters.
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub api_socket: PathBuf,
    pub ledger: PathBuf,
    pub ready_file: PathBuf,
    pub log: PathBuf,
}

/// Writes the demo's config to `layout.config`.
pub fn write_config(layout: &Layout) -> Result<()> {
    let mut toml = format!(
        r#"# Written by `cargo xtask demo`: nginx's two ports as two services, a
# volume and a time tariff, and three accounts, one of which runs out.
[agent]
cgroup = "{cgroup}"
pin_dir = "{pin_dir}"
interval = "1s"

[billing]
currency = "EUR"
ledger = "{ledger}"

# Inside the demo's network namespace, like everything else.
[metrics]
listen = "127.0.0.1:0"

# nginx's workers (www-data) ask here.
[api]
socket = "{socket}"
group = "www-data"

# 1 cent per started 100 kB sent to the viewer.
[[service]]
name = "volume"
tcp_ports = [{VOLUME_PORT}]
session_idle = "{idle}s"
[service.tariff]
kind = "volume"
unit_bytes = "100kB"
direction = "egress"
price_minor = 1
rounding = "per_started_unit"

# 2 cents per started 10 s of watching.
[[service]]
name = "time"
tcp_ports = [{TIME_PORT}]
session_idle = "{idle}s"
[service.tariff]
kind = "time"
unit_seconds = 10
price_minor = 2
rounding = "per_started_unit"
"#,
        cgroup = layout.cgroup.display(),
        pin_dir = layout.pin_dir.display(),
        ledger = layout.ledger.display(),
        socket = layout.api_socket.display(),
        idle = SESSION_IDLE.as_secs(),
    );
    for a in ACCOUNTS {
        let limit = if a.prepaid {
            "prepaid_minor"
        } else {
            "credit_limit_minor"
        };
        let _ = write!(
            toml,
            "\n[[account]]\nid = \"{}\"\n{limit} = {}\non_limit = \"cut\"\n",
            a.id, a.limit_minor
        );
    }
    fs::write(&layout.config, toml).with_context(|| format!("writing {}", layout.config.display()))
}

/// The running agent; stopped, unloaded and its run files removed on drop.
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    layout: Layout,
    proc: Option<Proc>,
}

impl Agent {
    /// A guard for the agent of `layout`, not started yet: it already
    /// unloads pins a killed earlier demo left.
    pub fn new(bin: &Path, layout: &Layout) -> Agent {
        let agent = Agent {
            bin: bin.to_owned(),
            layout: layout.clone(),
            proc: None,
        };
        if layout.pin_dir.exists() {
            crate::util::note(format!(
                "unloading pins left by an earlier demo in {}",
                layout.pin_dir.display()
            ));
            agent.unload();
        }
        agent
    }

    /// Starts `meterd run` from `cmd` (the binary wrapped into the
    /// sandbox by the caller) and waits for its ready file.
    pub fn start(&mut self, cmd: &mut Command) -> Result<()> {
        let _ = fs::remove_file(&self.layout.ready_file);
        let mut proc = Proc::spawn("meterd run", cmd, &self.layout.log)?;
        let ready = sandbox::wait_until(Duration::from_secs(30), || {
            proc.try_wait().is_some() || self.layout.ready_file.exists()
        });
        if let Some(status) = proc.try_wait() {
            bail!(
                "meterd run exited ({status}) before it was ready; the end of {}:\n{}",
                self.layout.log.display(),
                tail(&self.layout.log, 15)
            );
        }
        self.proc = Some(proc);
        sandbox::check_interrupted()?;
        if !ready {
            bail!(
                "meterd run was not ready within 30 s; the end of {}:\n{}",
                self.layout.log.display(),
                tail(&self.layout.log, 15)
            );
        }
        Ok(())
    }

    /// Whether the agent still runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// `GET /v1/status` on the API socket.
    pub fn status(&self) -> Result<Status> {
        let mut stream = UnixStream::connect(&self.layout.api_socket)
            .with_context(|| format!("connecting to {}", self.layout.api_socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream
            .write_all(b"GET /v1/status HTTP/1.1\r\nHost: meterd\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response from the status API")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!(
                "the status API answered {}",
                head.lines().next().unwrap_or("")
            );
        }
        serde_json::from_str(body).context("the status API's JSON")
    }

    /// SIGTERM, and checks the agent exits 0 (finishing its cycle and
    /// committing the ledger), as its contract says.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut proc) = self.proc.take() else {
            return Ok(());
        };
        match proc.stop(Duration::from_secs(20)) {
            Some(status) if status.success() => Ok(()),
            status => bail!(
                "meterd run did not exit 0 on SIGTERM ({status:?}); the end of {}:\n{}",
                self.layout.log.display(),
                tail(&self.layout.log, 15)
            ),
        }
    }

    /// `meterd ledger export --config F --format <format>` (with
    /// `--connections`: the connection segments); its stdout.
    pub fn export(&self, format: &str, connections: bool) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["ledger", "export", "--config"])
            .arg(&self.layout.config)
            .args(["--format", format]);
        if connections {
            cmd.arg("--connections");
        }
        sandbox::output(&mut cmd)
    }

    /// The ledger's events (limit_reached, cut_off), oldest first, read
    /// with sqlite3.
    pub fn events(&self) -> Result<Vec<LedgerEvent>> {
        let out = sandbox::output(
            Command::new("sqlite3")
                .arg("-json")
                .arg("-readonly")
                .arg(&self.layout.ledger)
                .arg("SELECT kind, account, at_ms, detail FROM ledger_events ORDER BY at_ms"),
        )?;
        if out.trim().is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(&out).context("sqlite3's JSON of ledger_events")
    }

    /// `meterd unload --config F`; says what it did.
    fn unload(&self) {
        let out = Command::new(&self.bin)
            .arg("unload")
            .arg("--config")
            .arg(&self.layout.config)
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    crate::util::note(line.trim_start_matches("meterd: "));
                }
            }
            Ok(out) => eprintln!(
                "xtask: meterd unload failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("xtask: cannot run meterd unload: {e}"),
        }
        if self.layout.pin_dir.exists() {
            eprintln!(
                "xtask: {} still exists after `meterd unload`; removing it",
                self.layout.pin_dir.display()
            );
            let _ = fs::remove_dir_all(&self.layout.pin_dir);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("xtask: {e:#}");
        }
        if self.layout.pin_dir.exists() {
            self.unload();
        }
        // The agent leaves its instance lock and socket in /run/meterd for
        // a later agent to reuse; no later demo agent needs them.
        let instance = self
            .layout
            .pin_dir
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "-");
        let _ = fs::remove_file(&self.layout.api_socket);
        let _ = fs::remove_file(format!("/run/meterd/{instance}.lock"));
        let _ = fs::remove_file(format!("/run/meterd/agents/{instance}.json"));
    }
}

/// The last `lines` lines of file `path`.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the demo reads of `GET /v1/status`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Status {
    /// The billing interval now, and the configured one.
    #[serde(default)]
    pub interval_ms: u64,
    #[serde(default)]
    pub base_interval_ms: u64,
    #[serde(default)]
    pub sessions: Vec<LiveSession>,
    #[serde(default)]
    pub accounts: Vec<AccountStatus>,
}

/// An open viewing session in the status.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LiveSession {
    pub session_id: String,
    pub client_addr: String,
    pub bytes_out: u64,
    /// Charged by cycles so far, in cents, as an exact decimal.
    pub accrued_minor: String,
}

/// An account with a limit in the status.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AccountStatus {
    pub account: String,
    pub limit_minor: u64,
    pub spent_minor: i64,
    /// `ok`, `limit_reached` or `blocked`.
    pub standing: String,
}

/// A settled viewing session, from `meterd ledger export --format jsonl`.
#[derive(Clone, Debug, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    /// The account, or the client address for unattributed traffic.
    pub account: String,
    pub client_addr: String,
    pub bytes_out: u64,
    pub charge_minor: u64,
}

/// A connection segment, from `meterd ledger export --connections`.
#[derive(Clone, Debug, Deserialize)]
pub struct ConnectionRecord {
    pub client_addr: String,
    pub bytes_out: u64,
}

/// A row of the ledger's `ledger_events`.
#[derive(Clone, Debug, Deserialize)]
pub struct LedgerEvent {
    pub kind: String,
    pub account: String,
    pub at_ms: i64,
    /// JSON.
    pub detail: String,
}

/// Parses JSON lines.
pub fn parse_jsonl<T: for<'de> Deserialize<'de>>(text: &str) -> Result<Vec<T>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("export line {l}")))
        .collect()
}
