//! Fleet outbox throughput: how fast one agent ships its ledger's outbox
//! to NATS JetStream, on a 1-node (R1) and a 3-node (R3) cluster of
//! Debian's nats-server on loopback.
//!
//! The agent runs with `[fleet]` (no publish rate limit for the bench),
//! connects, and then N session records of realistic size are put into its
//! ledger's outbox in one transaction, as a backlog after an outage would
//! be. The rate is taken from the ledger itself: the records shipped after
//! the first batch, over the time between the first and the last mark.
//!
//! The baseline is what one host produces at 10k active viewing sessions:
//! an interim record per session every `interim_interval` (5 min) plus a
//! session record per settlement, at a mean session of 10 min. That rate
//! is computed, not measured (it takes minutes of real sessions to
//! observe), and the row says so. The ratio says how many such hosts one
//! agent's outbox could keep up with, or how fast a backlog drains.
//!
//! Owns the cluster it starts and the rows; the agent is `agent`'s.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use super::agent::{Agent, AgentSpec};
use super::host::{self, Cgroup, Proc};
use super::report::{Measure, num};
use super::{Ctx, progress};

/// The sessions of the baseline host.
const SESSIONS: f64 = 10_000.0;
/// Its interim interval (meterd's default) and mean session length, s.
const INTERIM_S: f64 = 300.0;
const MEAN_SESSION_S: f64 = 600.0;

/// A cluster of `nats-server`s on loopback, stopped on drop.
struct Nats {
    procs: Vec<Proc>,
    ports: Vec<u16>,
}

impl Nats {
    fn start(dir: &Path, n: usize) -> Result<Nats> {
        let mut taken = Vec::new();
        for _ in 0..2 * n {
            taken.push(host::free_port(&taken)?);
        }
        let (clients, routes) = taken.split_at(n);
        let route_urls: Vec<String> = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let mut procs = Vec::new();
        for i in 0..n {
            let store = dir.join(format!("nats-{i}"));
            fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    routes[i],
                    route_urls.join(", ")
                )
            } else {
                String::new()
            };
            let conf = dir.join(format!("nats-{i}.conf"));
            fs::write(
                &conf,
                format!(
                    "server_name: b{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n{cluster}",
                    clients[i],
                    store.display()
                ),
            )?;
            let log = fs::File::create(dir.join(format!("nats-{i}.log")))?;
            procs.push(Proc::spawn(
                "nats-server",
                Command::new("nats-server")
                    .arg("-c")
                    .arg(&conf)
                    .stdout(log.try_clone()?)
                    .stderr(log),
            )?);
        }
        for p in clients {
            host::wait_listening(*p, Duration::from_secs(15))?;
        }
        Ok(Nats {
            procs,
            ports: clients.to_vec(),
        })
    }

    fn urls_toml(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect();
        format!("[{}]", urls.join(", "))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stop(Duration::from_secs(5));
        }
    }
}

fn sqlite(ledger: &Path, sql: &str) -> Result<String> {
    let out = Command::new("sqlite3")
        .arg("-batch")
        .arg("-cmd")
        .arg(".timeout 10000")
        .arg(ledger)
        .arg(sql)
        .output()
        .context("running sqlite3")?;
    if !out.status.success() {
        bail!("sqlite3: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `n` session records of the size a real one has, in one transaction.
fn fill(ledger: &Path, n: usize) -> Result<()> {
    sqlite(
        ledger,
        &format!(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n})
             INSERT INTO fleet_outbox (record_id, kind, payload, at_ms)
             SELECT 'bench:session:bench-' || i, 'session',
               json_object('id', 'bench:session:bench-' || i, 'host', 'bench', 'kind', 'session',
                 'record', json_object('session_id', 'boot-0123456789abcdef:' || i,
                   'service', 'vod', 'account', 'acct-' || (i % 100), 'content', 'movie-' || (i % 1000),
                   'client_addr', '10.0.' || (i % 250) || '.' || (i % 200),
                   'started_at', '2026-12-01T10:00:00.000Z', 'ended_at', '2026-12-01T10:10:00.000Z',
                   'duration_ms', 600000, 'bytes_out', 123456789, 'bytes_in', 12345,
                   'connections', 150, 'charge_minor', 42, 'currency', 'EUR')),
               CAST(strftime('%s', 'now') AS INTEGER) * 1000
             FROM c;"
        ),
    )
    .map(|_| ())
}

/// What one drain measured.
struct Drain {
    replicas: usize,
    records: usize,
    rate: f64,
    seconds: f64,
    overruns: f64,
}

fn drain(ctx: &Ctx, replicas: usize, n: usize) -> Result<Drain> {
    let name = format!("outbox-r{replicas}");
    let dir = ctx.work.join(format!("{name}-nats"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let nats = Nats::start(&dir, replicas)?;
    let cgroup = Cgroup::create(&ctx.cgroups, &name)?;
    let port = host::free_port(&[])?;
    let extra = format!(
        "\n[fleet]\nnats_url = {}\nhost_id = \"bench\"\nstream = \"BENCH\"\nbucket = \"bench_spend\"\n\
         replicas = {replicas}\nmax_publish_rate = 1000000\n",
        nats.urls_toml()
    );
    let agent = Agent::start(
        &ctx.meterd,
        &ctx.work,
        &AgentSpec {
            name: &name,
            cgroup: cgroup.path(),
            tcp_ports: &[port],
            interval: "1s",
            extra_toml: &extra,
            billing_toml: "",
            service_toml: None,
        },
    )?;
    agent.wait_for(Duration::from_secs(60), "connecting to NATS", |s| {
        s.get("meterd_fleet_connected") == Some(1.0)
    })?;
    let ledger: PathBuf = ctx.work.join(&name).join("ledger.sqlite");
    let before = agent.scrape()?;
    fill(&ledger, n)?;
    progress(format!("R{replicas}: {n} records in the outbox; draining"));
    let started = Instant::now();
    loop {
        let left: usize = sqlite(
            &ledger,
            "SELECT COUNT(*) FROM fleet_outbox WHERE shipped_ms IS NULL",
        )?
        .parse()
        .unwrap_or(usize::MAX);
        if left == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("R{replicas}: {left} of {n} records still unshipped after 10 min");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let after = agent.scrape()?;
    let marks = sqlite(
        &ledger,
        "SELECT MIN(shipped_ms), MAX(shipped_ms),
                (SELECT COUNT(*) FROM fleet_outbox WHERE shipped_ms =
                    (SELECT MIN(shipped_ms) FROM fleet_outbox WHERE record_id LIKE 'bench:%'))
         FROM fleet_outbox WHERE record_id LIKE 'bench:%'",
    )?;
    let v: Vec<f64> = marks.split('|').map(|x| x.parse().unwrap_or(0.0)).collect();
    let (first, last, first_batch) = (v[0], v[1], v[2]);
    let span_s = ((last - first) / 1000.0).max(0.001);
    let rate = (n as f64 - first_batch) / span_s;
    agent.stop()?;
    drop(nats);
    Ok(Drain {
        replicas,
        records: n,
        rate,
        seconds: started.elapsed().as_secs_f64(),
        overruns: after.overruns() - before.overruns(),
    })
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let n = if ctx.quick { 2_000 } else { 20_000 };
    let produced = SESSIONS / INTERIM_S + SESSIONS / MEAN_SESSION_S;
    let mut details = Vec::new();
    for replicas in [1, 3] {
        let d = drain(ctx, replicas, n)?;
        progress(format!(
            "R{}: {} records/s ({} records in {:.1} s), {} cycle overruns meanwhile",
            d.replicas,
            num(d.rate),
            d.records,
            d.seconds,
            d.overruns
        ));
        let ratio = d.rate / produced;
        ctx.results.measures.push(Measure {
            bench: "outbox",
            name: format!("fleet outbox throughput, R{} stream", d.replicas),
            value: d.rate,
            unit: "records/s".into(),
            baseline_name: "records/s one host makes at 10k active sessions (computed)".into(),
            baseline: Some(produced),
            ratio: Some(ratio),
            ratio_meaning: "shipped / produced".into(),
            target: "> 1: the outbox keeps up and a backlog drains".into(),
            met: Some(ratio > 1.0),
            note: format!(
                "{} session records (~450 B each) put into the outbox of a running agent at \
                 once; rate from the ledger's shipped marks after the first batch; \
                 max_in_flight 256, no rate limit (the default max_publish_rate of 5000/s \
                 caps a drain below this); {} cycle overruns during the drain. Baseline \
                 computed: {SESSIONS} sessions / {INTERIM_S} s interim + / {MEAN_SESSION_S} s \
                 mean session.",
                d.records, d.overruns
            ),
        });
        details.push(json!({
            "replicas": d.replicas, "records": d.records, "rate": d.rate,
            "seconds": d.seconds, "overruns": d.overruns,
        }));
    }
    ctx.results.details.insert(
        "outbox".into(),
        json!({ "produced_per_s": produced, "drains": details }),
    );
    Ok(())
}
