//! meterd as the benchmarks run it: a release `meterd run` with a config of
//! its own (cgroup, ports, pin dir, ledger), its /metrics scraped over plain
//! HTTP, its programs' kernel stats read through bpftool, and `meterd
//! unload` when it is done, so nothing stays attached after the bench.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::host::{self, Proc};

/// The bench's pin dir; fixed, so a leftover of an interrupted run is found
/// and unloaded by the next one.
pub const PIN_DIR: &str = "/sys/fs/bpf/meterd-bench";

/// What the bench's agent meters and how often.
pub struct AgentSpec<'a> {
    /// Name of the run, for its files under the work dir.
    pub name: &'a str,
    pub cgroup: &'a Path,
    pub tcp_ports: &'a [u16],
    /// Base interval, as the config writes it ("1s").
    pub interval: &'a str,
    /// Appended to the config as is (e.g. a `[fleet]` table).
    pub extra_toml: &'a str,
    /// More keys of the `[billing]` table, `key = value` lines each ending
    /// in a newline (e.g. `open_write_interval = "0s"\n`); empty: the
    /// agent's defaults.
    pub billing_toml: &'a str,
    /// The bench service's settings after its name and ports, with its
    /// `[service.tariff]` table; `None`: [`DEFAULT_SERVICE`].
    pub service_toml: Option<&'a str>,
}

/// The bench service unless a bench says otherwise: 1 minor unit per
/// started MB of egress, so idle connections are charged nothing.
pub const DEFAULT_SERVICE: &str = r#"
[service.tariff]
kind = "volume"
price_minor = 1
unit_bytes = "1MB"
direction = "egress"
rounding = "per_started_unit"
"#;

/// A running `meterd run`.
pub struct Agent {
    proc: Option<Proc>,
    meterd: PathBuf,
    config: PathBuf,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

impl Agent {
    /// Writes the config, starts the agent and waits until it meters.
    pub fn start(meterd: &Path, work: &Path, spec: &AgentSpec<'_>) -> Result<Agent> {
        let dir = work.join(spec.name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        unload_leftover(meterd, work)?;
        let config = dir.join("meterd.toml");
        write_config(&config, &dir, spec)?;
        let ready = dir.join("ready");
        let log = dir.join("agent.log");
        let log_file = fs::File::create(&log).context("creating the agent log")?;
        let proc = Proc::spawn(
            "meterd run",
            Command::new(meterd)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .arg("--ready-file")
                .arg(&ready)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().context("agent log")?)
                .stderr(log_file),
        )?;
        let mut agent = Agent {
            proc: Some(proc),
            meterd: meterd.to_owned(),
            config,
            log,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = fs::read_to_string(&ready)
                && let Some(addr) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("metrics="))
                    .and_then(|a| a.trim().parse().ok())
            {
                agent.metrics = addr;
                return Ok(agent);
            }
            if let Some(status) = agent.proc.as_mut().and_then(Proc::exited) {
                bail!(
                    "meterd exited ({status}) before it was ready; its log {}:\n{}",
                    agent.log.display(),
                    tail(&agent.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "meterd was not ready within 60 s; its log {}:\n{}",
                    agent.log.display(),
                    tail(&agent.log, 20)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// GET /metrics.
    pub fn scrape(&self) -> Result<Scrape> {
        let body = http_get(self.metrics, "/metrics")?;
        Ok(Scrape::parse(&body))
    }

    /// Waits until `done` holds for a scrape, or fails after `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Scrape) -> bool,
    ) -> Result<Scrape> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.scrape()?;
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("meterd: {what} did not happen within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for `n` more billing cycles; returns the scrapes before and after.
    pub fn cycles(&self, n: f64, timeout: Duration) -> Result<(Scrape, Scrape)> {
        let before = self.scrape()?;
        let start = before.cycles();
        let after = self.wait_for(timeout, "billing cycles", |s| s.cycles() >= start + n)?;
        Ok((before, after))
    }

    /// Kernel ids of the programs the bench agent's pinned links run.
    pub fn program_ids() -> Result<Vec<(String, u32)>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(PIN_DIR).context("reading the bench pin dir")? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !name.starts_with("link_") {
                continue;
            }
            let out = host::output(
                Command::new("bpftool")
                    .args(["-j", "link", "show", "pinned"])
                    .arg(&path),
            )?;
            let v: serde_json::Value = serde_json::from_str(&out).context("bpftool link json")?;
            let id = v["prog_id"].as_u64().context("bpftool: no prog_id")?;
            ids.push((name, u32::try_from(id)?));
        }
        Ok(ids)
    }

    /// Stops the agent (SIGTERM: it bills once more and keeps its pins),
    /// then unloads, so nothing stays attached.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.stop(Duration::from_secs(60));
        }
        unload(&self.meterd, &self.config)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.proc.is_some()
            && let Err(e) = self.shutdown()
        {
            eprintln!("bench: cleaning up meterd: {e:#}");
        }
    }
}

/// The bench config: one service on `spec.tcp_ports` (a volume tariff unless
/// `spec.service_toml` says otherwise), its own
/// ledger and API socket in `dir`, metrics on an ephemeral loopback port.
fn write_config(path: &Path, dir: &Path, spec: &AgentSpec<'_>) -> Result<()> {
    let ports = spec
        .tcp_ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    fs::write(
        path,
        format!(
            r#"# Written by `cargo xtask bench` for the {name} run.
[agent]
cgroup = "{cgroup}"
pin_dir = "{PIN_DIR}"
interval = "{interval}"

[billing]
currency = "EUR"
ledger = "{ledger}"
{billing}
[metrics]
listen = "127.0.0.1:0"

[api]
socket = "{socket}"

[[service]]
name = "bench"
tcp_ports = [{ports}]
{service}
{extra}"#,
            service = spec.service_toml.unwrap_or(DEFAULT_SERVICE),
            extra = spec.extra_toml,
            billing = spec.billing_toml,
            name = spec.name,
            cgroup = spec.cgroup.display(),
            interval = spec.interval,
            ledger = dir.join("ledger.sqlite").display(),
            socket = dir.join("api.sock").display(),
        ),
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// `meterd unload --config`: detaches the programs and removes the pins.
fn unload(meterd: &Path, config: &Path) -> Result<()> {
    host::output(
        Command::new(meterd)
            .arg("unload")
            .arg("--config")
            .arg(config),
    )
    .map(drop)
}

/// Unloads what an interrupted earlier run left pinned in [`PIN_DIR`].
pub fn unload_leftover(meterd: &Path, work: &Path) -> Result<()> {
    if !Path::new(PIN_DIR).exists() {
        return Ok(());
    }
    let dir = work.join("leftover");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("meterd.toml");
    // Unloading reads only the pin dir; the rest just has to be valid.
    let cgroup = host::cgroup2_root()?;
    write_config(
        &config,
        &dir,
        &AgentSpec {
            name: "leftover",
            cgroup: &cgroup,
            tcp_ports: &[1],
            interval: "1s",
            extra_toml: "",
            billing_toml: "",
            service_toml: None,
        },
    )?;
    unload(meterd, &config).context("unloading a leftover bench pin dir")
}

/// Kernel stats of one BPF program (`kernel.bpf_stats_enabled=1`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Reads run time and count of the programs `ids`.
pub fn prog_stats(ids: &[(String, u32)]) -> Result<BTreeMap<String, ProgStats>> {
    let mut out = BTreeMap::new();
    for (name, id) in ids {
        let text = host::output(Command::new("bpftool").args([
            "-j",
            "prog",
            "show",
            "id",
            &id.to_string(),
        ]))?;
        let v: serde_json::Value = serde_json::from_str(&text).context("bpftool prog json")?;
        out.insert(
            name.clone(),
            ProgStats {
                run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
            },
        );
    }
    Ok(out)
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// `name{labels}` -> value, exactly as exposed.
    pub samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn parse(body: &str) -> Scrape {
        let samples = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_owned(), value.trim().parse().ok()?))
            })
            .collect();
        Scrape { samples }
    }

    /// Sum over every sample of metric `name` (any labels).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(name)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Sum over the samples of `name` whose labels contain `label`.
    pub fn with_label(&self, name: &str, label: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(name) && k.contains(label))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.samples.get(name).copied()
    }

    /// Billing cycles so far.
    pub fn cycles(&self) -> f64 {
        self.sum("meterd_cycle_duration_seconds_count")
    }

    /// Seconds spent in billing cycles so far.
    pub fn cycle_seconds(&self) -> f64 {
        self.sum("meterd_cycle_duration_seconds_sum")
    }

    pub fn overruns(&self) -> f64 {
        self.sum("meterd_cycle_overruns_total")
    }

    /// Open TCP connections and UDP flows the agent meters.
    pub fn live(&self) -> f64 {
        self.sum("meterd_connections_live")
    }

    /// Open viewing sessions (connections that moved payload, by viewer).
    pub fn viewer_sessions(&self) -> f64 {
        self.sum("meterd_viewer_sessions_live")
    }

    pub fn interval(&self) -> f64 {
        self.sum("meterd_read_interval_seconds")
    }

    pub fn pressure(&self) -> Option<f64> {
        self.get("meterd_cpu_pressure_ratio")
    }
}

/// Mean cycle time between two scrapes, in seconds.
pub fn mean_cycle(before: &Scrape, after: &Scrape) -> Option<f64> {
    let n = after.cycles() - before.cycles();
    (n > 0.0).then(|| (after.cycle_seconds() - before.cycle_seconds()) / n)
}

/// A minimal HTTP/1.1 GET on loopback (the agent's exporter).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to meterd's metrics at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading {path} from {addr}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_sums_labelled_samples_and_skips_comments() {
        let s = Scrape::parse(
            "# HELP meterd_connections_live x\n\
             meterd_connections_live{service=\"a\"} 3\n\
             meterd_connections_live{service=\"b\"} 4\n\
             meterd_connections_live_other 100\n\
             meterd_viewer_sessions_live{service=\"a\"} 2\n\
             meterd_payload_bytes_total{service=\"a\",direction=\"egress\"} 10\n\
             meterd_payload_bytes_total{service=\"a\",direction=\"ingress\"} 1\n\
             meterd_cycle_duration_seconds_count 7\n",
        );
        assert_eq!(s.live(), 7.0);
        assert_eq!(s.viewer_sessions(), 2.0);
        assert_eq!(s.cycles(), 7.0);
        assert_eq!(s.with_label("meterd_payload_bytes_total", "egress"), 10.0);
        assert_eq!(s.pressure(), None);
    }

    #[test]
    fn mean_cycle_needs_a_finished_cycle() {
        let a = Scrape::parse(
            "meterd_cycle_duration_seconds_count 2\nmeterd_cycle_duration_seconds_sum 0.5\n",
        );
        let b = Scrape::parse(
            "meterd_cycle_duration_seconds_count 4\nmeterd_cycle_duration_seconds_sum 0.7\n",
        );
        assert!((mean_cycle(&a, &b).unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(mean_cycle(&a, &a), None);
    }

    #[test]
    fn dechunks_http_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
