//! A real Prometheus server of the test's own, scraping the agent.
//!
//! `/usr/bin/prometheus` (Debian package `prometheus`) runs on a free
//! loopback port of its own, with its config and TSDB in the test's
//! directory, never on the well-known 9090/9100 where a system Prometheus
//! or node exporter may listen. Killed on drop.
//!
//! Does not own: what the test asks it (the test's PromQL).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    http,
    process::{Proc, wait_until},
};

/// The binary of the Debian package.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// How long Prometheus may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    proc: Proc,
    /// Its web address (API).
    pub addr: SocketAddr,
    log: PathBuf,
}

/// One element of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct VectorSample {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Unix time of the sample, seconds.
    pub at: f64,
    /// Its value.
    pub value: f64,
}

/// A loopback port nobody listens on right now (and not one of the
/// well-known Prometheus ports).
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        if port != 9090 && port != 9100 {
            return port;
        }
    }
}

impl Prometheus {
    /// Starts Prometheus in `dir/prometheus`, scraping `target`'s `/metrics`
    /// every second (job `meterd`), and waits until it is ready.
    pub fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        Self::start_with_rules(dir, target, &[])
    }

    /// [`Prometheus::start`], also evaluating the rule files `rules` every
    /// second (their alerts go nowhere: no Alertmanager).
    pub fn start_with_rules(dir: &Path, target: SocketAddr, rules: &[&Path]) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS_BIN).is_file(),
            "{PROMETHEUS_BIN} not found: install the Debian package prometheus"
        );
        let home = dir.join("prometheus");
        fs::create_dir_all(&home).unwrap();
        let config = home.join("prometheus.yml");
        let rule_files = rules.iter().fold(String::new(), |mut out, path| {
            let _ = writeln!(out, "  - '{}'", path.display());
            out
        });
        let rule_files = if rule_files.is_empty() {
            String::new()
        } else {
            format!("rule_files:\n{rule_files}")
        };
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 {rule_files}scrape_configs:\n  - job_name: meterd\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = home.join("prometheus.log");
        // The port is free when chosen, but another process could take it
        // before Prometheus binds: try a few.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut cmd = Command::new(PROMETHEUS_BIN);
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    home.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--storage.tsdb.retention.time=1d");
            let mut proc = Proc::spawn("prometheus", &mut cmd, &log);
            let mut exited = None;
            let ready = wait_until(READY_TIMEOUT, || {
                exited = proc.try_wait();
                exited.is_some() || http::get(addr, "/-/ready").is_ok_and(|r| r.status == 200)
            });
            if ready && exited.is_none() {
                return Prometheus { proc, addr, log };
            }
            let output = proc.output_tail(20);
            assert!(
                output.contains("address already in use"),
                "prometheus on {addr} did not become ready ({exited:?}); its log:\n{output}"
            );
        }
        panic!("prometheus found no free port in 5 tries");
    }

    /// Evaluates `expr` now; panics unless Prometheus answers with a
    /// vector.
    pub fn query(&self, expr: &str) -> Vec<VectorSample> {
        let path = format!("/api/v1/query?query={}", http::urlencode(expr));
        let response = http::get(self.addr, &path)
            .unwrap_or_else(|e| panic!("prometheus query {expr:?}: {e}"));
        let json: Value = serde_json::from_str(&response.body).unwrap_or_else(|e| {
            panic!(
                "prometheus query {expr:?}: not JSON ({e}): {}",
                response.body
            )
        });
        assert!(
            response.status == 200 && json["status"] == "success",
            "prometheus query {expr:?} failed: {}",
            response.body
        );
        assert_eq!(
            json["data"]["resultType"], "vector",
            "prometheus query {expr:?}: {}",
            response.body
        );
        json["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| VectorSample {
                labels: r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
                at: r["value"][0].as_f64().unwrap(),
                value: r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("prometheus query {expr:?}: bad value in {r}")),
            })
            .collect()
    }

    /// The value of a query that yields exactly one sample; `None` for an
    /// empty result.
    pub fn scalar(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr);
        assert!(
            result.len() <= 1,
            "prometheus query {expr:?} gave {} samples: {result:?}",
            result.len()
        );
        result.first().map(|s| s.value)
    }

    /// Unix time (s) of the latest successful scrape of the agent, if any.
    pub fn last_scrape(&self) -> Option<f64> {
        self.scalar("max(timestamp(up{job=\"meterd\"} == 1))")
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::tail(&crate::process::read_lossy(&self.log), lines)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
