//! meterd with many open connections: cycle cost against a userspace peer,
//! the real `LIVE` map's read, agent CPU and agent memory, at growing sizes
//! (1k, 10k, 50k, 100k; 1k and 10k with `--quick`).
//!
//! The connections are idle and stay open while the sizes grow; the agent
//! meters them from the start (see [`Population`]). The userspace peer is
//! `ss -tin 'sport = :PORT'`: it reads the same connections' TCP counters
//! through sock_diag, as a poller without eBPF would.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::json;

use super::agent::{self, Agent, AgentSpec, mean_cycle};
use super::fleet::Fleet;
use super::host::{self, Cgroup};
use super::mapread;
use super::report::{Measure, num};
use super::{Ctx, plot, progress};

/// Open connections to a metered server, and the agent metering them.
pub struct Population {
    // Dropped in this order: the agent (stops and unloads), then the
    // connections, then their cgroup.
    pub agent: Agent,
    pub fleet: Fleet,
    cgroup: Cgroup,
    /// VmHWM / VmRSS of the agent before any connection was opened.
    pub idle_hwm: u64,
    pub idle_rss: u64,
}

impl Population {
    /// Starts the servers, the agent and the clients, with no connection
    /// open; room for `capacity` connections.
    pub fn start(ctx: &Ctx, capacity: usize) -> Result<Population> {
        Self::start_with(ctx, capacity, "connections", None, "", "")
    }

    /// [`Population::start`] with a run name of its own (its cgroup and
    /// work dir), the bench service's settings and tariff
    /// ([`AgentSpec::service_toml`]) and more `[billing]` settings
    /// ([`AgentSpec::billing_toml`]) and other tables
    /// ([`AgentSpec::extra_toml`]).
    pub fn start_with(
        ctx: &Ctx,
        capacity: usize,
        name: &str,
        service_toml: Option<&str>,
        billing_toml: &str,
        extra_toml: &str,
    ) -> Result<Population> {
        let cgroup = Cgroup::create(&ctx.cgroups, name)?;
        let fleet = Fleet::start(&cgroup, capacity)?;
        let ports = fleet.ports();
        let agent = Agent::start(
            &ctx.meterd,
            &ctx.work,
            &AgentSpec {
                name,
                cgroup: cgroup.path(),
                tcp_ports: &ports,
                interval: "1s",
                extra_toml,
                billing_toml,
                service_toml,
            },
        )?;
        // A few cycles with nothing to meter: the idle footprint.
        agent.cycles(2.0, Duration::from_secs(30))?;
        let idle_hwm = host::status_kb(agent.pid(), "VmHWM")?;
        let idle_rss = host::status_kb(agent.pid(), "VmRSS")?;
        progress(format!(
            "agent pid {} meters ports {ports:?} in {} ({} servers and clients, up to {} \
             connections each); idle RSS {:.1} MiB",
            agent.pid(),
            cgroup.path().display(),
            ports.len(),
            fleet.per_process,
            mib(idle_rss)
        ));
        Ok(Population {
            agent,
            fleet,
            cgroup,
            idle_hwm,
            idle_rss,
        })
    }

    /// Has at least `n` connections open (or as many as the machine
    /// allows), all seen by the agent; returns the count and why it fell
    /// short, if it did.
    pub fn grow(&mut self, n: usize) -> Result<(usize, Option<String>)> {
        grow(&mut self.fleet, &self.agent, n)
    }

    pub fn stop(self) -> Result<()> {
        let Population {
            agent,
            fleet,
            cgroup,
            ..
        } = self;
        agent.stop()?;
        drop(fleet);
        drop(cgroup);
        Ok(())
    }
}

/// [`Population::grow`] on the population's two halves, for a bench that
/// polls the agent from another thread meanwhile.
pub(super) fn grow(fleet: &mut Fleet, agent: &Agent, n: usize) -> Result<(usize, Option<String>)> {
    let (open, error) = fleet.open(n)?;
    #[expect(
        clippy::cast_precision_loss,
        reason = "connection counts are far below 2^52"
    )]
    let want = open as f64;
    let timeout = Duration::from_secs(30);
    agent.wait_for(timeout, "seeing every connection", |s| s.live() >= want)?;
    Ok((open, error))
}

/// The population, started on first use.
pub fn population(ctx: &mut Ctx) -> Result<&mut Population> {
    if ctx.population.is_none() {
        ctx.population = Some(Population::start(ctx, MAX_CONNECTIONS)?);
    }
    Ok(ctx.population.as_mut().expect("set just above"))
}

/// The bench agent's base interval, in seconds (its config says "1s").
const BASE_INTERVAL_S: f64 = 1.0;

/// The most connections any bench asks for.
const MAX_CONNECTIONS: usize = 100_000;

/// What was measured at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub connections: usize,
    /// Mean of meterd's read + billing cycles (histogram sum / count), ms.
    pub cycle_ms: f64,
    pub cycles: f64,
    /// `ss -tin 'sport = :PORT'`: median wall time, ms; CPU per run, ms.
    pub ss_ms: f64,
    pub ss_cpu_ms: f64,
    pub ss_rows: usize,
    /// The real LIVE map: median batch and per-key full reads, ms.
    pub live_batch_ms: Option<f64>,
    pub live_iter_ms: Option<f64>,
    pub vm_hwm: u64,
    pub vm_rss: u64,
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let sizes: &[usize] = if ctx.quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 50_000, 100_000]
    };
    let (cycles, ss_reps, cpu_secs) = if ctx.quick {
        (3.0, 3, 10)
    } else {
        (5.0, 7, 60)
    };
    let mapread_bin = ctx.mapread.clone();
    let live_reps = if ctx.quick { 3 } else { 7 };
    let pop = population(ctx)?;
    let filter = pop.fleet.ss_filter();
    let mut points = Vec::new();
    let mut cpu = None;
    let mut shortfall = None;
    for &size in sizes {
        let (open, error) = pop.grow(size)?;
        if open < size {
            shortfall = Some(format!(
                "only {open} of {size} connections could be opened ({}); measured at {open}",
                error.as_deref().unwrap_or("no error reported")
            ));
            progress(shortfall.as_deref().unwrap_or_default());
        }
        // Skip the cycle that first saw the new connections (one INFO
        // lookup each): the steady state is what repeats every interval.
        pop.agent.cycles(1.0, Duration::from_secs(60))?;
        let (before, after) = pop
            .agent
            .cycles(cycles, Duration::from_secs(120))
            .context("timing billing cycles")?;
        let cycle_ms = mean_cycle(&before, &after).unwrap_or(f64::NAN) * 1e3;
        let (ss_ms, ss_cpu_ms, ss_rows) = time_ss(&filter, ss_reps)?;
        let (live_batch_ms, live_iter_ms) = match &mapread_bin {
            Some(bin) => read_live(bin, live_reps)?,
            None => (None, None),
        };
        let point = Point {
            connections: open,
            cycle_ms,
            cycles: after.cycles() - before.cycles(),
            ss_ms,
            ss_cpu_ms,
            ss_rows,
            live_batch_ms,
            live_iter_ms,
            vm_hwm: host::status_kb(pop.agent.pid(), "VmHWM")?,
            vm_rss: host::status_kb(pop.agent.pid(), "VmRSS")?,
        };
        progress(format!(
            "{open} connections: meterd cycle {} ms, ss -tin {} ms ({ss_rows} rows, {:.0}x), \
             LIVE batch read {} ms, agent RSS {:.1} MiB (peak {:.1})",
            num(cycle_ms),
            num(ss_ms),
            ss_ms / cycle_ms,
            live_batch_ms.map_or_else(|| "-".into(), num),
            mib(point.vm_rss),
            mib(point.vm_hwm)
        ));
        points.push(point);
        if open == 10_000 {
            progress(format!(
                "agent CPU at {open} connections: measuring for {cpu_secs} s"
            ));
            cpu = Some(agent_cpu(&pop.agent, Duration::from_secs(cpu_secs))?);
        }
        if open < size {
            break;
        }
    }
    let idle = (pop.idle_hwm, pop.idle_rss);
    report(ctx, &points, cpu, shortfall.as_deref(), idle)
}

/// Times `ss -tin FILTER` (output discarded after one counted run): median
/// wall ms, mean CPU ms per run, and its connection rows.
pub(super) fn time_ss(filter: &str, reps: usize) -> Result<(f64, f64, usize)> {
    let listing = host::output(Command::new("ss").args(["-tin", filter]))?;
    let rows = listing.lines().filter(|l| l.starts_with("ESTAB")).count();
    let mut wall = Vec::new();
    let cpu0 = host::children_cpu();
    for _ in 0..reps {
        let t = Instant::now();
        let status = Command::new("ss")
            .args(["-tin", filter])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running ss")?;
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status.success(), "ss -tin failed ({status})");
    }
    let cpu = host::children_cpu().saturating_sub(cpu0).as_secs_f64() * 1e3 / reps as f64;
    Ok((host::median(&wall), cpu, rows))
}

/// The real LIVE map, read by the mapread bench binary both ways: the
/// agent's mapped read and a batch lookup of the same array (`pinned` on
/// an array), or, for a hash `LIVE` of an older build, batch and per-key.
fn read_live(bin: &Path, reps: usize) -> Result<(Option<f64>, Option<f64>)> {
    let live = Path::new(agent::PIN_DIR).join("LIVE");
    let samples = mapread::exec(
        bin,
        &[
            "--pinned".into(),
            live.display().to_string(),
            "--reps".into(),
            reps.to_string(),
        ],
    )?;
    Ok(samples.first().map_or((None, None), |s| {
        if s.mmap_ms.is_empty() {
            (Some(s.batch_median()), Some(s.iter_median()))
        } else {
            (Some(s.mmap_median()), Some(s.batch_median()))
        }
    }))
}

/// Agent CPU seconds per wall second over `span`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct CpuUse {
    pub connections: usize,
    pub wall_s: f64,
    pub busy_s: f64,
    pub cycles: f64,
}

pub(super) fn agent_cpu(agent: &Agent, span: Duration) -> Result<CpuUse> {
    let s0 = agent.scrape()?;
    let c0 = host::process_cpu(agent.pid())?;
    let t0 = Instant::now();
    std::thread::sleep(span);
    let c1 = host::process_cpu(agent.pid())?;
    let wall = t0.elapsed().as_secs_f64();
    let s1 = agent.scrape()?;
    Ok(CpuUse {
        connections: s1.live() as usize,
        wall_s: wall,
        busy_s: c1.saturating_sub(c0).as_secs_f64(),
        cycles: s1.cycles() - s0.cycles(),
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// The connections bench's rows, details and plot.
fn report(
    ctx: &mut Ctx,
    points: &[Point],
    cpu: Option<CpuUse>,
    shortfall: Option<&str>,
    idle: (u64, u64),
) -> Result<()> {
    if let Some(p) = points.iter().find(|p| p.connections == 10_000) {
        let m = cycle_row(p, points, ctx.quick);
        ctx.results.measures.push(m);
    }
    if let Some(c) = cpu {
        ctx.results.measures.push(cpu_row(c, points));
    }
    if let Some(p) = points.last() {
        ctx.results.measures.push(memory_row(p, idle, shortfall));
        if let Some(m) = live_read_row(p, points) {
            ctx.results.measures.push(m);
        }
    }
    ctx.results.details.insert(
        "connections".into(),
        json!({
            "points": points,
            "agent_cpu": cpu,
            "idle_vm_hwm": idle.0,
            "idle_vm_rss": idle.1,
            "shortfall": shortfall,
        }),
    );
    ctx.results.plots.push(plot::connections(&ctx.out, points)?);
    Ok(())
}

fn cycle_row(p: &Point, points: &[Point], quick: bool) -> Measure {
    let curve = points
        .iter()
        .map(|p| {
            format!(
                "{}: cycle {} ms / ss {} ms",
                p.connections,
                num(p.cycle_ms),
                num(p.ss_ms)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let ratio = p.ss_ms / p.cycle_ms;
    Measure {
        bench: "connections",
        name: "cycle cost vs userspace peer (10k connections)".into(),
        value: p.cycle_ms,
        unit: "ms".into(),
        baseline_name: "`ss -tin` for the same ports".into(),
        baseline: Some(p.ss_ms),
        ratio: Some(ratio),
        ratio_meaning: "ss / meterd cycle (x cheaper)".into(),
        target: ">= 10x cheaper".into(),
        met: Some(ratio >= 10.0),
        note: format!(
            "meterd: mean of {} read + billing cycles (meterd_cycle_duration_seconds \
             sum/count; idle connections, volume tariff, so no new charge rows); ss: median \
             wall time of {} runs listing {} connections, output discarded ({} ms CPU per \
             run). Curve: {curve}.{}",
            p.cycles,
            if quick { 3 } else { 7 },
            p.ss_rows,
            num(p.ss_cpu_ms),
            if ratio < 10.0 {
                format!(" Missed: {ratio:.1}x instead of 10x.")
            } else {
                String::new()
            }
        ),
    }
}

fn cpu_row(c: CpuUse, points: &[Point]) -> Measure {
    let share = c.busy_s / c.wall_s;
    // The governor widens the interval when the host is busy (other work on
    // this machine), so fewer cycles may run than the wall time allows: the
    // CPU per cycle at one cycle per second is judged too.
    let per_cycle = c.busy_s / c.cycles.max(1.0);
    let at_base = per_cycle / BASE_INTERVAL_S;
    let judged = share.max(at_base);
    // The peer: ss polling the same connections once per second.
    let peer = points
        .iter()
        .find(|p| p.connections == c.connections)
        .map(|p| p.ss_cpu_ms / 1e3);
    Measure {
        bench: "connections",
        name: format!(
            "agent CPU ({}k connections, 1 s interval)",
            c.connections / 1000
        ),
        value: share * 100.0,
        unit: "% of one core".into(),
        baseline_name: "`ss -tin` polled once per second".into(),
        baseline: peer.map(|p| p * 100.0),
        ratio: peer.map(|p| share / p),
        ratio_meaning: "agent / ss peer".into(),
        target: "<= 0.5% of one core".into(),
        met: Some(judged <= 0.005),
        note: format!(
            "utime+stime from /proc/PID/stat over {:.0} s: {:.3} CPU s (clock ticks of 10 ms), \
             idle connections. {} cycles ran, {:.1} ms CPU each, i.e. {:.3}% of one core at a \
             steady 1 s interval{}; judged on the larger of the two.{}",
            c.wall_s,
            c.busy_s,
            c.cycles,
            per_cycle * 1e3,
            at_base * 100.0,
            if c.cycles < c.wall_s / BASE_INTERVAL_S * 0.9 {
                " (fewer cycles than seconds: the governor widened the interval because the \
                 host was busy)"
            } else {
                ""
            },
            if judged > 0.005 {
                format!(
                    " Missed by {:.2} points ({:.1}x the target).",
                    judged * 100.0 - 0.5,
                    judged / 0.005
                )
            } else {
                String::new()
            }
        ),
    }
}

fn memory_row(p: &Point, (idle_hwm, idle_rss): (u64, u64), shortfall: Option<&str>) -> Measure {
    let mem = mib(p.vm_hwm);
    let at_target = p.connections >= 100_000;
    Measure {
        bench: "connections",
        name: format!("agent memory ({}k live connections)", p.connections / 1000),
        value: mem,
        unit: "MiB peak RSS".into(),
        baseline_name: "agent with no connection".into(),
        baseline: Some(mib(idle_hwm)),
        ratio: Some(p.vm_hwm as f64 / idle_hwm as f64),
        ratio_meaning: "peak / idle".into(),
        target: "<= 64 MiB at 100k".into(),
        met: at_target.then_some(mem <= 64.0),
        note: format!(
            "VmHWM from /proc/PID/status after {} cycles with all connections live. Steady \
             VmRSS {:.1} MiB ({:.0} bytes per connection over the idle {:.1} MiB); the peak is \
             {:.1} MiB above the steady RSS (transient allocations while the connections were \
             added).{}{}",
            p.cycles + 1.0,
            mib(p.vm_rss),
            p.vm_rss.saturating_sub(idle_rss) as f64 / p.connections as f64,
            mib(idle_rss),
            mib(p.vm_hwm.saturating_sub(p.vm_rss)),
            if !at_target {
                " Not judged: fewer than 100k connections were measured.".to_owned()
            } else if mem > 64.0 {
                format!(
                    " Missed by {:.1} MiB ({:.0}%); the steady RSS alone is {}.",
                    mem - 64.0,
                    (mem / 64.0 - 1.0) * 100.0,
                    if mib(p.vm_rss) <= 64.0 {
                        "within the target"
                    } else {
                        "over it too"
                    }
                )
            } else {
                String::new()
            },
            shortfall.map(|s| format!(" {s}.")).unwrap_or_default()
        ),
    }
}

fn live_read_row(p: &Point, points: &[Point]) -> Option<Measure> {
    let (batch, iter) = (p.live_batch_ms?, p.live_iter_ms?);
    let at_target = p.connections >= 100_000;
    Some(Measure {
        bench: "connections",
        name: format!(
            "full read of the real LIVE map ({}k connections)",
            p.connections / 1000
        ),
        value: batch,
        unit: "ms".into(),
        baseline_name: "batch lookup of the same array".into(),
        baseline: Some(iter),
        ratio: Some(iter / batch),
        ratio_meaning: "batch / mapped (speed-up)".into(),
        target: if at_target {
            "<= 2 ms at 100k".into()
        } else {
            "-".into()
        },
        met: at_target.then_some(batch <= 2.0),
        note: format!(
            "the running agent's pinned LIVE array with real connections, read by the \
             mapread bench binary (the agent's mapped read vs BPF_MAP_LOOKUP_BATCH of the \
             array) while the agent also reads it every second; {:.1} ns per live entry \
             mapped. Per size (mapped / batch): {}.{}",
            batch * 1e6 / p.connections as f64,
            points
                .iter()
                .map(|p| format!(
                    "{}: {} / {} ms",
                    p.connections,
                    p.live_batch_ms.map_or_else(|| "-".into(), num),
                    p.live_iter_ms.map_or_else(|| "-".into(), num)
                ))
                .collect::<Vec<_>>()
                .join(", "),
            if at_target && batch > 2.0 {
                format!(
                    " Missed by {} ms ({:.0}%): the mapped read passes over every slot of \
                     the array (agent.max_connections), held or not.",
                    num(batch - 2.0),
                    (batch / 2.0 - 1.0) * 100.0
                )
            } else {
                String::new()
            }
        ),
    })
}
