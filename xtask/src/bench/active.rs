//! Active viewers: what billing costs when every session moves bytes every
//! cycle (`active`), and what the ledger keeps per viewer (`ledger`).
//!
//! The connections bench measures idle connections, whose cycles write no
//! charge rows. Here the servers of [`super::fleet`] write [`RATE`] bytes per
//! second to every accepted socket (16 kbit/s, one write per socket per
//! second, spread over the second), from inside the metered cgroup, and
//! each connection has its own source address, so each is a viewing session
//! of its own. The bench service charges 1 minor unit per started KB, so
//! every session is charged every cycle (2 units a second).
//!
//! `active` starts a fresh agent and connections at each size, measures
//! them idle first (the baseline: same agent, same sockets, no writes), then
//! streaming; `ss -tin` over the same sockets is the userspace peer, as in
//! the connections bench. `ledger` streams 10k sessions for a measured
//! window, then closes them and measures the ledger after settlement.
//! Owns no agent code: it reads /metrics, /proc, perf and the ledger file
//! (through the sqlite3 CLI, read-only while the agent runs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::json;

use super::agent::{Agent, Scrape, mean_cycle};
use super::authorize::Fsyncs;
use super::fleet::Fleet;
use super::host;
use super::report::{Measure, num};
use super::scale::{self, CpuUse, Population};
use super::{Ctx, progress};

/// Busy cores (all processes) below which the host counts as calm.
const CALM_CORES: f64 = 1.0;

/// Bytes per second each session streams: 16 kbit/s.
pub const RATE: u64 = 2_000;
/// The tariff's unit, bytes ("1KB").
pub const UNIT_BYTES: u64 = 1_000;
/// Its price, minor units per started unit.
pub const PRICE_MINOR: u64 = 1;

/// The bench service: 1 minor unit per started KB of egress, and a short
/// `session_idle` so that closed sessions settle soon.
pub(super) fn service_toml(session_idle: &str) -> String {
    format!(
        r#"session_idle = "{session_idle}"

[service.tariff]
kind = "volume"
price_minor = {PRICE_MINOR}
unit_bytes = "1KB"
direction = "egress"
rounding = "per_started_unit"
"#
    )
}

/// What one window of the agent at one size and state showed.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub connections: usize,
    pub sessions: f64,
    /// Mean cycle (histogram sum / count), ms.
    pub cycle_ms: f64,
    /// Mean CPU time of a cycle (`meterd_cycle_cpu_seconds_total` / cycles),
    /// ms: the cycle without its waits for a CPU or the disk.
    pub cycle_cpu_ms: f64,
    pub cycles: f64,
    pub overruns: f64,
    /// The interval at the window's end, s.
    pub interval_s: f64,
    pub cpu: CpuUse,
    /// fsync + fdatasync calls in the window (perf stat); None without perf.
    pub fsyncs: Option<u64>,
    /// `meterd_charged_minor_total` growth in the window.
    pub charged_minor: f64,
    /// `meterd_cycle_charges_total` growth: sessions charged, summed over
    /// the window's cycles.
    pub charges: f64,
    /// `meterd_ledger_session_writes_total` growth: session rows written.
    pub session_writes: f64,
    pub vm_rss: u64,
}

impl Window {
    fn cpu_share(&self) -> f64 {
        self.cpu.busy_s / self.cpu.wall_s
    }

    fn charges_per_cycle(&self) -> f64 {
        self.charges / self.cycles.max(1.0)
    }

    fn writes_per_s(&self) -> f64 {
        self.session_writes / self.cpu.wall_s
    }

    fn fsyncs_per_cycle(&self) -> Option<f64> {
        self.fsyncs.map(|f| f as f64 / self.cycles.max(1.0))
    }
}

/// Everything measured at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub connections: usize,
    pub idle: Window,
    pub active: Window,
    /// `ss -tin` over the same (streaming) sockets: median wall ms, CPU ms
    /// per run, rows.
    pub ss_ms: f64,
    pub ss_cpu_ms: f64,
    pub ss_rows: usize,
    /// Top frames of a perf profile of the agent while active.
    pub profile: Vec<String>,
    /// The machine's busy cores over the active window (all processes).
    pub machine_busy_cores: f64,
}

pub fn active(ctx: &mut Ctx) -> Result<()> {
    let sizes = if !ctx.sizes.is_empty() {
        ctx.sizes.clone()
    } else if ctx.quick {
        vec![1_000, 5_000]
    } else {
        vec![1_000, 10_000, 50_000, 100_000]
    };
    let secs = if ctx.quick { 8 } else { 30 };
    // The connections of other benches would count in this one's cycles.
    if let Some(old) = ctx.population.take() {
        progress("stopping the other benches' connections: this bench opens its own");
        old.stop()?;
    }
    let service = service_toml("30s");
    let mut points = Vec::new();
    for &n in &sizes {
        // The interval is held at 1 s, the target's: at 100k the helpers
        // streaming to every socket keep most of both cores busy, and CPU
        // pressure would otherwise widen it (the governor has benches of
        // its own). A cycle measured on that busy host bounds a calm one's.
        let mut pop = Population::start_with(
            ctx,
            n,
            "active",
            Some(&service),
            "",
            "[governor]\nmax_interval = \"1s\"\n",
        )?;
        let point = measure_size(ctx, &mut pop, n, secs);
        pop.stop()?;
        let point = point?;
        progress(format!(
            "{} active: cycle {} ms (idle {} ms), agent CPU {:.2}% (idle {:.2}%), {} \
             sessions charged per cycle, {} session rows written per s, {} fsyncs per cycle; \
             ss -tin {} ms",
            point.connections,
            num(point.active.cycle_ms),
            num(point.idle.cycle_ms),
            point.active.cpu_share() * 100.0,
            point.idle.cpu_share() * 100.0,
            num(point.active.charges_per_cycle()),
            num(point.active.writes_per_s()),
            point
                .active
                .fsyncs_per_cycle()
                .map_or_else(|| "?".into(), num),
            num(point.ss_ms),
        ));
        let short = point.connections < n;
        points.push(point);
        if short {
            break;
        }
    }
    for p in &points {
        ctx.results.measures.extend(rows(p));
    }
    ctx.results.details.insert(
        "active".into(),
        json!({ "rate_bytes_per_s": RATE, "unit_bytes": UNIT_BYTES, "window_s": secs,
                "points": points }),
    );
    Ok(())
}

fn measure_size(ctx: &Ctx, pop: &mut Population, n: usize, secs: u64) -> Result<Point> {
    let (open, error) = pop.grow(n)?;
    if let Some(e) = &error {
        progress(format!("only {open} of {n} connections opened: {e}"));
    }
    // Past the cycle that first saw them (an INFO lookup each).
    pop.agent.cycles(2.0, Duration::from_secs(60))?;
    progress(format!("{open} connections idle: measuring for {secs} s"));
    let idle = window(&pop.agent, open, Duration::from_secs(secs))?;

    stream(pop, open, 2.0)?;
    progress(format!(
        "{open} connections streaming {RATE} B/s each: measuring for {secs} s"
    ));
    let machine0 = host::machine_cpu()?;
    let active = window(&pop.agent, open, Duration::from_secs(secs))?;
    let machine1 = host::machine_cpu()?;
    let machine_busy_cores = host::ticks_to_secs(machine1.0 - machine0.0) / active.cpu.wall_s;
    let (ss_ms, ss_cpu_ms, ss_rows) =
        scale::time_ss(&pop.fleet.ss_filter(), if ctx.quick { 3 } else { 7 })?;
    // A profile where a target is judged (10k: CPU; 100k: cycle time), and
    // at the largest quick size.
    let profile = if open == 10_000 || open >= 100_000 || (ctx.quick && open >= 5_000) {
        profile(
            &pop.agent,
            &ctx.work,
            Duration::from_secs(if ctx.quick { 5 } else { 10 }),
        )
        .unwrap_or_else(|e| vec![format!("perf record failed: {e:#}")])
    } else {
        Vec::new()
    };
    pop.fleet.set_rate(0)?;
    Ok(Point {
        connections: open,
        idle,
        active,
        ss_ms,
        ss_cpu_ms,
        ss_rows,
        profile,
        machine_busy_cores,
    })
}

/// Has the servers stream [`RATE`] to every connection, then waits until
/// the agent has a viewing session for (99% of) the `open` connections and
/// `cycles` more cycles have run.
pub(super) fn stream(pop: &mut Population, open: usize, cycles: f64) -> Result<()> {
    pop.fleet.set_rate(RATE)?;
    let want = (open * 99 / 100) as f64;
    pop.agent.wait_for(
        Duration::from_secs(120),
        "a viewing session per streaming connection",
        |s| s.viewer_sessions() >= want,
    )?;
    pop.agent.cycles(cycles, Duration::from_secs(120))?;
    Ok(())
}

/// The agent over `span`: cycles, CPU, fsyncs and charges.
fn window(agent: &Agent, connections: usize, span: Duration) -> Result<Window> {
    let fsyncs = Fsyncs::start(agent.pid());
    let s0 = agent.scrape()?;
    let cpu = scale::agent_cpu(agent, span)?;
    let s1 = agent.scrape()?;
    let fsyncs = fsyncs.and_then(Fsyncs::finish);
    Ok(Window {
        connections,
        sessions: s1.viewer_sessions(),
        cycle_ms: mean_cycle(&s0, &s1).unwrap_or(f64::NAN) * 1e3,
        cycle_cpu_ms: (s1.sum("meterd_cycle_cpu_seconds_total")
            - s0.sum("meterd_cycle_cpu_seconds_total"))
            / (s1.cycles() - s0.cycles())
            * 1e3,
        cycles: s1.cycles() - s0.cycles(),
        overruns: s1.overruns() - s0.overruns(),
        interval_s: s1.interval(),
        cpu: CpuUse { connections, ..cpu },
        fsyncs,
        charged_minor: charged(&s1) - charged(&s0),
        charges: s1.sum("meterd_cycle_charges_total") - s0.sum("meterd_cycle_charges_total"),
        session_writes: s1.sum("meterd_ledger_session_writes_total")
            - s0.sum("meterd_ledger_session_writes_total"),
        vm_rss: host::status_kb(agent.pid(), "VmRSS")?,
    })
}

pub(super) fn charged(s: &Scrape) -> f64 {
    s.sum("meterd_charged_minor_total")
}

/// The bench agent's ledger (next to its log).
pub(super) fn ledger_path(agent: &Agent) -> PathBuf {
    agent.log.with_file_name("ledger.sqlite")
}

/// `sqlite3 -readonly LEDGER SQL`'s output.
pub(super) fn sqlite(ledger: &Path, sql: &str) -> Result<String> {
    host::output(
        Command::new("sqlite3")
            .arg("-readonly")
            .arg(ledger)
            .arg(sql),
    )
}

/// `perf record` on the agent for `span`; the top symbols of `perf report`.
fn profile(agent: &Agent, work: &Path, span: Duration) -> Result<Vec<String>> {
    let data = work.join(format!("active-{}.perf", agent.pid()));
    host::output(
        Command::new("perf")
            .args(["record", "-q", "-F", "2999", "-p"])
            .arg(agent.pid().to_string())
            .arg("-o")
            .arg(&data)
            .arg("--")
            .arg("sleep")
            .arg(span.as_secs().to_string()),
    )?;
    let report = |args: &[&str]| {
        host::output(
            Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "-g",
                    "none",
                    "-q",
                    "--percent-limit",
                    "2",
                ])
                .args(args)
                .arg("-i")
                .arg(&data),
        )
    };
    // Self time only: the release build has no frame pointers, so the
    // call chains perf unwinds are too short to apportion by caller.
    let flat = report(&["--no-children", "--sort", "dso,sym"])?;
    let _ = fs::remove_file(&data);
    let top = flat
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| l.contains('%'))
        .take(10)
        .collect();
    Ok(top)
}

/// The rows of one size: cycle, CPU, charge upserts, fsyncs.
fn rows(p: &Point) -> Vec<Measure> {
    let profile = if p.profile.is_empty() {
        String::new()
    } else {
        format!(" perf (agent, active): {}.", p.profile.join("; "))
    };
    let load = format!(
        " Machine busy {:.2} of {} cores during the active window (helpers streaming, \
         agent, everything else).",
        p.machine_busy_cores,
        host::cpus()
    );
    let context = format!("{profile}{load}");
    let mut rows = vec![
        cycle_row(p, &context),
        cycle_cpu_row(p),
        cpu_row(p, &context),
    ];
    rows.push(charge_row(p));
    rows.push(write_row(p));
    rows.extend(fsync_row(p));
    rows
}

fn size_label(p: &Point) -> String {
    format!("{}k", p.connections / 1000)
}

fn cycle_row(p: &Point, context: &str) -> Measure {
    let (act, idle) = (&p.active, &p.idle);
    let size = size_label(p);
    // The target is for a calm host: with the helpers keeping most of the
    // cores busy the cycle waits for a CPU, and the CPU row judges it.
    let calm = p.machine_busy_cores < CALM_CORES;
    let judged = p.connections >= 100_000 && calm;
    let met = act.cycle_ms <= 100.0;
    Measure {
        bench: "active",
        name: format!("billing cycle, {size} active viewers (16 kbit/s each)"),
        value: act.cycle_ms,
        unit: "ms".into(),
        baseline_name: format!("same {size} connections idle"),
        baseline: Some(idle.cycle_ms),
        ratio: Some(act.cycle_ms / idle.cycle_ms),
        ratio_meaning: "active / idle".into(),
        target: if judged {
            "<= 100 ms at 100k active".into()
        } else {
            "-".into()
        },
        met: judged.then_some(met),
        note: format!(
            "Mean of {} read + billing cycles (meterd_cycle_duration_seconds sum/count) over \
             {:.0} s with {:.0} viewing sessions streaming {RATE} B/s each, 1 KB units; idle: \
             {} cycles of the same agent and sockets before any write. `ss -tin` over the \
             same {} sockets: {} ms ({} ms CPU), {:.2}x the active cycle. Interval at the end \
             {} s, {} overruns in the window.{}{}{}",
            act.cycles,
            act.cpu.wall_s,
            act.sessions,
            idle.cycles,
            p.ss_rows,
            num(p.ss_ms),
            num(p.ss_cpu_ms),
            p.ss_ms / act.cycle_ms,
            num(act.interval_s),
            act.overruns,
            if judged && !met {
                format!(
                    " Missed by {} ms ({:.1}x the target).",
                    num(act.cycle_ms - 100.0),
                    act.cycle_ms / 100.0
                )
            } else {
                String::new()
            },
            if p.connections >= 100_000 && !calm {
                format!(
                    " Not judged: the host was not calm ({:.2} of {} cores busy), so the cycle \
                     waited for a CPU; its CPU time is judged instead.",
                    p.machine_busy_cores,
                    host::cpus()
                )
            } else {
                String::new()
            },
            if p.connections >= 100_000 {
                context
            } else {
                ""
            },
        ),
    }
}

/// The cycle's own CPU: what its duration would be on a host where it
/// never waits for a CPU (less its disk waits, which the WAL keeps small).
fn cycle_cpu_row(p: &Point) -> Measure {
    let (act, idle) = (&p.active, &p.idle);
    let size = size_label(p);
    let judged = p.connections >= 100_000;
    let met = act.cycle_cpu_ms <= 100.0;
    Measure {
        bench: "active",
        name: format!("billing cycle CPU, {size} active viewers"),
        value: act.cycle_cpu_ms,
        unit: "ms".into(),
        baseline_name: format!("same {size} connections idle"),
        baseline: Some(idle.cycle_cpu_ms),
        ratio: Some(act.cycle_cpu_ms / idle.cycle_cpu_ms),
        ratio_meaning: "active / idle".into(),
        target: if judged {
            "<= 100 ms at 100k active (what a calm host's cycle takes)".into()
        } else {
            "-".into()
        },
        met: judged.then_some(met),
        note: format!(
            "Mean CPU time of the run loop's thread per cycle (meterd_cycle_cpu_seconds_total \
             / cycles), {} cycles; the cycle's duration was {} ms, so it spent {:.0}% of it \
             waiting for a CPU or the disk (machine busy {:.2} of {} cores). On a calm host a \
             cycle takes its CPU time plus its disk waits.",
            act.cycles,
            num(act.cycle_ms),
            (1.0 - act.cycle_cpu_ms / act.cycle_ms).max(0.0) * 100.0,
            p.machine_busy_cores,
            host::cpus(),
        ),
    }
}

fn cpu_row(p: &Point, context: &str) -> Measure {
    let (act, idle) = (&p.active, &p.idle);
    let share = act.cpu_share();
    let per_cycle_s = act.cpu.busy_s / act.cycles.max(1.0);
    // Widened intervals run fewer cycles: judge the CPU a 1 s interval costs.
    let at_base = per_cycle_s.max(share);
    let judged = p.connections == 10_000;
    let ss_share = p.ss_cpu_ms / 1e3;
    Measure {
        bench: "active",
        name: format!("agent CPU, {} active viewers, 1 s interval", size_label(p)),
        value: share * 100.0,
        unit: "% of one core".into(),
        baseline_name: "`ss -tin` polled once per second".into(),
        baseline: Some(ss_share * 100.0),
        ratio: Some(share / ss_share),
        ratio_meaning: "agent / ss peer".into(),
        target: if judged {
            "<= 2% of one core at 10k active".into()
        } else {
            "-".into()
        },
        met: judged.then_some(at_base <= 0.02),
        note: format!(
            "utime+stime from /proc/PID/stat over {:.0} s (10 ms ticks): {:.2} CPU s, {} \
             cycles, {:.1} ms CPU per cycle ({:.2}% of a core at one cycle a second). Same \
             connections idle: {:.3}% ({:.1} ms per cycle), so streaming costs {:.1}x idle.{}{}",
            act.cpu.wall_s,
            act.cpu.busy_s,
            act.cycles,
            per_cycle_s * 1e3,
            per_cycle_s * 100.0,
            idle.cpu_share() * 100.0,
            idle.cpu.busy_s / idle.cycles.max(1.0) * 1e3,
            share / idle.cpu_share().max(1e-9),
            if judged && at_base > 0.02 {
                format!(
                    " Missed by {:.2} points ({:.1}x the target).",
                    at_base * 100.0 - 2.0,
                    at_base / 0.02
                )
            } else {
                String::new()
            },
            if judged { context } else { "" },
        ),
    }
}

fn charge_row(p: &Point) -> Measure {
    let act = &p.active;
    let size = size_label(p);
    let per_cycle = act.charges_per_cycle();
    Measure {
        bench: "active",
        name: format!("sessions charged per cycle, {size} active viewers"),
        value: per_cycle,
        unit: "charges/cycle".into(),
        baseline_name: "open sessions".into(),
        baseline: Some(act.sessions),
        ratio: Some(per_cycle / act.sessions.max(1.0)),
        ratio_meaning: "sessions charged per cycle / open sessions".into(),
        target: "every session charged every cycle".into(),
        met: Some(per_cycle >= act.sessions * 0.95),
        note: format!(
            "meterd_cycle_charges_total grew {:.0} over {} cycles. \
             meterd_charged_minor_total grew {:.0} in the {:.0} s window, {:.2} minor units \
             per session per second (2 KB/s at 1 per KB: 2 expected).",
            act.charges,
            act.cycles,
            act.charged_minor,
            act.cpu.wall_s,
            act.charged_minor / act.cpu.wall_s / act.sessions.max(1.0),
        ),
    }
}

fn write_row(p: &Point) -> Measure {
    let act = &p.active;
    let size = size_label(p);
    let charges_per_s = act.charges / act.cpu.wall_s;
    Measure {
        bench: "active",
        name: format!("ledger session rows written, {size} active viewers"),
        value: act.writes_per_s(),
        unit: "rows/s".into(),
        baseline_name: "charges per second".into(),
        baseline: Some(charges_per_s),
        ratio: Some(act.writes_per_s() / charges_per_s.max(1e-9)),
        ratio_meaning: "rows written / charges made".into(),
        target: "-".into(),
        met: None,
        note: format!(
            "meterd_ledger_session_writes_total grew {:.0} in the {:.0} s window ({:.0} per \
             cycle): an open session's row (its accrual, updated in place, with its live \
             segments' rows) is written when it changes structurally and otherwise at most \
             every billing.open_write_interval (10 s), so with every session charged every \
             cycle about a tenth of them are written per 1 s cycle.",
            act.session_writes,
            act.cpu.wall_s,
            act.session_writes / act.cycles.max(1.0),
        ),
    }
}

fn fsync_row(p: &Point) -> Option<Measure> {
    let (act, idle) = (&p.active, &p.idle);
    let size = size_label(p);
    let (per_cycle, idle_per_cycle) = (act.fsyncs_per_cycle()?, idle.fsyncs_per_cycle()?);
    Some(Measure {
        bench: "active",
        name: format!("ledger fsyncs per cycle, {size} active viewers"),
        value: per_cycle,
        unit: "fsync+fdatasync/cycle".into(),
        baseline_name: format!("same {size} idle"),
        baseline: Some(idle_per_cycle),
        ratio: (idle_per_cycle > 0.0).then(|| per_cycle / idle_per_cycle),
        ratio_meaning: "active / idle".into(),
        target: "-".into(),
        met: None,
        note: format!(
            "`perf stat -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -p PID` \
             over the window: {} calls in {} cycles (idle: {} in {}). WAL mode with \
             synchronous = NORMAL syncs only at checkpoints, which a thread of the \
             agent's runs every second off the billing loop (a PASSIVE checkpoint syncs only \
             when the WAL has new frames).",
            act.fsyncs.unwrap_or(0),
            act.cycles,
            idle.fsyncs.unwrap_or(0),
            idle.cycles
        ),
    })
}

/// Bytes of the ledger and its WAL.
fn ledger_bytes(ledger: &Path) -> (u64, u64) {
    let len = |p: PathBuf| fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = ledger.as_os_str().to_owned();
    wal.push("-wal");
    (len(ledger.to_owned()), len(PathBuf::from(wal)))
}

/// One reading of the ledger while sessions stream.
#[derive(Debug, Clone, Copy, Serialize)]
struct Growth {
    t: f64,
    db: u64,
    wal: u64,
    sessions: f64,
}

pub fn ledger(ctx: &mut Ctx) -> Result<()> {
    let n: usize = if ctx.quick { 1_000 } else { 10_000 };
    let window_s = if ctx.quick { 15.0 } else { 60.0 };
    if let Some(old) = ctx.population.take() {
        progress("stopping the other benches' connections: this bench opens its own");
        old.stop()?;
    }
    let idle_s = 3;
    let service = service_toml(&format!("{idle_s}s"));
    let mut pop = Population::start_with(ctx, n, "ledger", Some(&service), "", "")?;
    let result = ledger_run(ctx, &mut pop, n, window_s, idle_s);
    let ledger = ledger_path(&pop.agent);
    pop.stop()?;
    let mut run = result?;
    // After the agent stopped: fold the WAL in and measure what stays.
    fold_wal(&ledger)?;
    let (db, wal) = ledger_bytes(&ledger);
    let settled: f64 = sqlite(
        &ledger,
        "SELECT COUNT(*) FROM viewer_sessions WHERE state = 'settled'",
    )?
    .trim()
    .parse()
    .context("settled count")?;
    let dbstat = sqlite(
        &ledger,
        "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC",
    )?;
    let tables: Vec<(String, u64)> = dbstat
        .lines()
        .filter_map(|l| {
            let (name, size) = l.rsplit_once('|')?;
            Some((name.to_owned(), size.parse().ok()?))
        })
        .collect();
    let rows = sqlite(
        &ledger,
        "SELECT 'viewer_sessions', COUNT(*) FROM viewer_sessions UNION ALL \
         SELECT 'connections', COUNT(*) FROM connections",
    )?;
    run.settled = settled;
    run.final_db = db;
    run.final_wal = wal;
    run.tables = tables;
    run.row_counts = rows.lines().map(|l| l.replace('|', ": ")).collect();
    ctx.results.measures.extend(ledger_rows(&run));
    ctx.results.details.insert("ledger".into(), json!(run));
    Ok(())
}

#[derive(Debug, Default, Serialize)]
struct LedgerRun {
    sessions: usize,
    window_s: f64,
    session_idle_s: u64,
    growth: Vec<Growth>,
    written_bytes: u64,
    settled: f64,
    settled_minor: f64,
    final_db: u64,
    final_wal: u64,
    tables: Vec<(String, u64)>,
    row_counts: Vec<String>,
}

fn ledger_run(
    ctx: &Ctx,
    pop: &mut Population,
    n: usize,
    window_s: f64,
    idle_s: u64,
) -> Result<LedgerRun> {
    let (open, error) = pop.grow(n)?;
    if let Some(e) = &error {
        progress(format!("only {open} of {n} connections opened: {e}"));
    }
    let ledger = ledger_path(&pop.agent);
    // Past the first `billing.open_write_interval` (10 s) and a few cycles
    // more: every open session's rows have had their first lazy write (an
    // update that grows them to their working size), and the WAL has
    // reached its own.
    stream(pop, open, 14.0)?;
    progress(format!(
        "ledger: {open} sessions streaming {RATE} B/s at a 1 s interval; measuring for \
         {window_s:.0} s"
    ));
    let start = Instant::now();
    let mut growth = Vec::new();
    let step = window_s / 6.0;
    for i in 0..=6 {
        let t = step * f64::from(i);
        let ahead = t - start.elapsed().as_secs_f64();
        if ahead > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(ahead));
        }
        let (db, wal) = ledger_bytes(&ledger);
        growth.push(Growth {
            t: start.elapsed().as_secs_f64(),
            db,
            wal,
            sessions: pop.agent.scrape()?.viewer_sessions(),
        });
    }
    let (written, s) = settle(
        &mut pop.fleet,
        &pop.agent,
        idle_s,
        Duration::from_secs(if ctx.quick { 60 } else { 180 }),
    )?;
    Ok(LedgerRun {
        sessions: open,
        window_s,
        session_idle_s: idle_s,
        growth,
        written_bytes: written,
        settled_minor: charged(&s),
        ..LedgerRun::default()
    })
}

/// Stops the traffic and has every session settle: idle past
/// `session_idle_s`, then the connections closed. Returns the bytes the
/// helpers wrote and the agent's metrics once every session settled (within
/// `timeout`).
pub(super) fn settle(
    fleet: &mut Fleet,
    agent: &Agent,
    session_idle_s: u64,
    timeout: Duration,
) -> Result<(u64, Scrape)> {
    fleet.set_rate(0)?;
    // Idle past session_idle, then closed: every session can settle. The
    // count after the wait: a pacer slot under way when the rate changed
    // still adds its writes.
    std::thread::sleep(Duration::from_secs(session_idle_s + 1));
    let written = fleet.written()?;
    fleet.close()?;
    progress("traffic stopped and connections closed; waiting for settlement");
    let settled = agent.wait_for(timeout, "every session settled", |s| {
        s.viewer_sessions() == 0.0 && s.live() == 0.0
    })?;
    Ok((written, settled))
}

/// The least and the most 1 minor unit per started KB can bill for
/// `written` bytes over `sessions` sessions: the total's started KB, and up
/// to one unit more per session (each session's own last started KB).
pub(super) fn billed_bounds(written: u64, sessions: u64) -> (u64, u64) {
    let least = written.div_ceil(UNIT_BYTES) * PRICE_MINOR;
    (least, least + sessions * PRICE_MINOR)
}

/// Folds the WAL into the ledger file (`PRAGMA wal_checkpoint(TRUNCATE)`),
/// once its agent has stopped.
pub(super) fn fold_wal(ledger: &Path) -> Result<()> {
    host::output(
        Command::new("sqlite3")
            .arg(ledger)
            .arg("PRAGMA wal_checkpoint(TRUNCATE);"),
    )
    .map(drop)
}

fn ledger_rows(run: &LedgerRun) -> Vec<Measure> {
    let mut rows: Vec<Measure> = growth_row(run).into_iter().collect();
    rows.push(settled_row(run));
    rows
}

fn growth_row(run: &LedgerRun) -> Option<Measure> {
    let first = run.growth.first().copied()?;
    let last = run.growth.last().copied()?;
    let total = |g: &Growth| (g.db + g.wal) as f64;
    let span_h = (last.t - first.t) / 3600.0;
    let viewer_hours = run.sessions as f64 * span_h;
    let per_viewer_hour = (total(&last) - total(&first)) / viewer_hours;
    let per_open: Vec<String> = run
        .growth
        .iter()
        .map(|g| {
            format!(
                "{:.0} s: {:.0} B ({} KiB db + {} KiB WAL)",
                g.t - first.t,
                total(g) / g.sessions.max(1.0),
                g.db / 1024,
                g.wal / 1024
            )
        })
        .collect();
    let db_per_open: Vec<f64> = run
        .growth
        .iter()
        .map(|g| g.db as f64 / g.sessions.max(1.0))
        .collect();
    let spread = db_per_open.iter().copied().fold(f64::MIN, f64::max)
        - db_per_open.iter().copied().fold(f64::MAX, f64::min);
    Some(Measure {
        bench: "ledger",
        name: format!(
            "ledger growth per viewer-hour, {}k active viewers, 1 s interval (extrapolated)",
            run.sessions / 1000
        ),
        value: per_viewer_hour,
        unit: "bytes/viewer-hour".into(),
        baseline_name: "ledger + WAL per open session at the window's start".into(),
        baseline: Some(total(&first) / first.sessions.max(1.0)),
        ratio: Some(per_viewer_hour / (total(&first) / first.sessions.max(1.0))),
        ratio_meaning: "growth per hour / size per open session".into(),
        target: "constant per open session while live".into(),
        met: Some(per_viewer_hour * span_h * 10.0 < total(&first) / first.sessions.max(1.0)),
        note: format!(
            "Extrapolated: (ledger + WAL bytes at the end - at the start) / ({} sessions x \
                 {:.0} s) over a {:.0} s window at {RATE} B/s per session, 1 KB units, every \
                 session charged every cycle: {:.0} -> {:.0} bytes. Per open session over the \
                 window (total / open sessions): {}. The ledger file alone per open session \
                 varies by {:.0} B over the window; the WAL holds its size once a checkpoint \
                 has run (SQLite reuses it from the start), so it is a constant, not growth. \
                 Met means the window's growth is under a tenth of the size per session.",
            run.sessions,
            last.t - first.t,
            run.window_s,
            total(&first),
            total(&last),
            per_open.join("; "),
            spread,
        ),
    })
}

fn settled_row(run: &LedgerRun) -> Measure {
    let per_settled = run.final_db as f64 / run.settled.max(1.0);
    let tables = run
        .tables
        .iter()
        .map(|(t, b)| format!("{t} {:.0} B", *b as f64 / run.settled.max(1.0)))
        .collect::<Vec<_>>()
        .join(", ");
    let (least, most) = billed_bounds(run.written_bytes, run.settled as u64);
    Measure {
        bench: "ledger",
        name: "ledger bytes per settled viewing session".into(),
        value: per_settled,
        unit: "bytes/session".into(),
        baseline_name: "1 KB target".into(),
        baseline: Some(1000.0),
        ratio: Some(per_settled / 1000.0),
        ratio_meaning: "measured / target".into(),
        target: "<= 1 KB per settled session".into(),
        met: Some(per_settled <= 1000.0),
        note: format!(
            "Traffic stopped, connections reset, {:.0} sessions settled after session_idle = \
                 {}s, agent stopped, then `PRAGMA wal_checkpoint(TRUNCATE)`: ledger {} bytes \
                 (WAL {} bytes) / {:.0} settled sessions. By table and index (dbstat, bytes per \
                 session): {tables}. Rows: {}. Billed {:.0} minor units; the helpers wrote {} \
                 bytes, {least} minor units at 1 per started KB of the total ({}: at most \
                 {most}).{}",
            run.settled,
            run.session_idle_s,
            run.final_db,
            run.final_wal,
            run.settled,
            run.row_counts.join(", "),
            run.settled_minor,
            run.written_bytes,
            "per-session rounding bills each session's started KB, so up to one unit more \
                 per session",
            if per_settled > 1000.0 {
                format!(
                    " Missed by {:.0} B ({:.2}x the target).",
                    per_settled - 1000.0,
                    per_settled / 1000.0
                )
            } else {
                String::new()
            },
        ),
    }
}
