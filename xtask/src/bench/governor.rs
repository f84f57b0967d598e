//! The load governor under load: how many cycles overrun once every core is
//! saturated (`overload`), and a timeline of load, interval and cycle time
//! during a stress-ng ramp from half the cores to twice the cores and back
//! to idle (`governor`, the patent's figure 4).
//!
//! Both use the connections bench's population (its largest size, or 10k
//! connections when run alone; 1k with `--quick`), so cycles have real work,
//! and poll the agent's /metrics every 250 ms.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::json;

use super::agent::{Agent, Scrape, mean_cycle};
use super::host::{self, Proc};
use super::report::{Measure, num};
use super::scale::{self, Population};
use super::{Ctx, plot, progress};

/// How often /metrics is polled.
const POLL: Duration = Duration::from_millis(250);
/// The base interval of the bench agent.
pub(super) const BASE_S: f64 = 1.0;

/// One poll of the agent's metrics.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the timeline started.
    pub t: f64,
    /// stress-ng CPU workers running (0 in benches that run none).
    pub workers: usize,
    pub cpu_pressure: Option<f64>,
    pub interval_s: f64,
    pub cycles: f64,
    pub cycle_seconds: f64,
    pub overruns: f64,
    /// The host's cumulative PSI `some` CPU stall time (µs) at this poll:
    /// the load as it happens, where meterd's pressure metric is the
    /// sample its governor last used.
    pub psi_some_us: Option<u64>,
}

impl Sample {
    fn of(t: f64, workers: usize, s: &Scrape) -> Sample {
        Sample {
            t,
            workers,
            cpu_pressure: s.pressure(),
            interval_s: s.interval(),
            cycles: s.cycles(),
            cycle_seconds: s.cycle_seconds(),
            overruns: s.overruns(),
            psi_some_us: host::psi_cpu_some_us(),
        }
    }
}

/// One finished billing cycle, as seen between two polls.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cycle {
    pub t: f64,
    pub duration_ms: f64,
}

/// Population to run against: what the connections bench left open, or a
/// fresh one.
fn ready_population(ctx: &mut Ctx) -> Result<&mut Population> {
    let default = if ctx.quick { 1_000 } else { 10_000 };
    let pop = scale::population(ctx)?;
    if pop.fleet.open == 0 {
        pop.grow(default)?;
    }
    Ok(pop)
}

fn stress(workers: usize, timeout: Duration) -> Result<Proc> {
    Proc::spawn(
        "stress-ng",
        Command::new("stress-ng")
            .args(["--cpu", &workers.to_string(), "--timeout"])
            .arg(format!("{}s", timeout.as_secs()))
            .arg("--quiet")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Polls every [`POLL`] until `until` after `start`, recording samples.
fn poll(
    pop: &Population,
    start: Instant,
    until: f64,
    workers: usize,
    out: &mut Vec<Sample>,
) -> Result<()> {
    poll_while(&pop.agent, start, workers, out, |t| t < until)
}

/// Polls `agent` every [`POLL`] while `go` holds for the seconds since
/// `start`, recording samples.
pub(super) fn poll_while(
    agent: &Agent,
    start: Instant,
    workers: usize,
    out: &mut Vec<Sample>,
    go: impl Fn(f64) -> bool,
) -> Result<()> {
    loop {
        let t = start.elapsed().as_secs_f64();
        if !go(t) {
            return Ok(());
        }
        let s = agent.scrape()?;
        out.push(Sample::of(t, workers, &s));
        std::thread::sleep(POLL);
    }
}

/// Cycle durations from consecutive samples (sum and count deltas).
pub(super) fn cycles_of(samples: &[Sample]) -> Vec<Cycle> {
    samples
        .windows(2)
        .filter(|w| w[1].cycles > w[0].cycles)
        .map(|w| Cycle {
            t: w[1].t,
            duration_ms: (w[1].cycle_seconds - w[0].cycle_seconds) / (w[1].cycles - w[0].cycles)
                * 1e3,
        })
        .collect()
}

/// What happened around a sudden full load.
#[derive(Debug, Serialize)]
struct Overload {
    connections: usize,
    workers: usize,
    load_s: f64,
    /// Overruns and mean cycle ms in the calm cycles before the load.
    calm_overruns: f64,
    calm_cycle_ms: f64,
    /// Seconds after the start at which the load was stopped.
    load_end_s: f64,
    samples: Vec<Sample>,
}

impl Overload {
    fn first(&self) -> &Sample {
        &self.samples[0]
    }

    fn during(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.t <= self.load_end_s)
    }

    /// Cycles (counted from the load's start) in which an overrun was seen.
    fn overrun_cycles(&self) -> Vec<f64> {
        let c0 = self.first().cycles;
        self.samples
            .windows(2)
            .filter(|w| w[1].t <= self.load_end_s + 1.0 && w[1].overruns > w[0].overruns)
            .map(|w| w[1].cycles - c0)
            .collect()
    }
}

pub fn overload(ctx: &mut Ctx) -> Result<()> {
    let cpus = host::cpus();
    let workers = 2 * cpus;
    let load_s = if ctx.quick { 12.0 } else { 30.0 };
    let pop = ready_population(ctx)?;
    let connections = pop.fleet.open;
    progress(format!(
        "overload: {connections} connections; 3 calm cycles, then stress-ng --cpu {workers} \
         for {load_s:.0} s"
    ));
    let (calm0, calm1) = pop.agent.cycles(3.0, Duration::from_secs(30))?;

    let start = Instant::now();
    let mut samples = vec![Sample::of(0.0, 0, &pop.agent.scrape()?)];
    let mut load = stress(workers, Duration::from_secs_f64(load_s + 5.0))?;
    poll(pop, start, load_s, workers, &mut samples)?;
    load.stop(Duration::from_secs(5));
    let load_end_s = start.elapsed().as_secs_f64();
    // Until the interval is back at the base (the governor narrows after
    // hold_cycles calm samples per step), or 40 s.
    loop {
        let t = start.elapsed().as_secs_f64();
        let s = pop.agent.scrape()?;
        samples.push(Sample::of(t, 0, &s));
        if s.interval() <= BASE_S || t > load_end_s + 40.0 {
            break;
        }
        std::thread::sleep(POLL);
    }
    let run = Overload {
        connections,
        workers,
        load_s,
        calm_overruns: calm1.overruns() - calm0.overruns(),
        calm_cycle_ms: mean_cycle(&calm0, &calm1).unwrap_or(f64::NAN) * 1e3,
        load_end_s,
        samples,
    };
    let row = overload_row(&run, cpus);
    progress(format!("overload: {}", row.note));
    ctx.results.measures.push(row);
    ctx.results.details.insert(
        "overload".into(),
        json!({ "run": run, "overrun_cycles": run.overrun_cycles() }),
    );
    Ok(())
}

fn overload_row(run: &Overload, cpus: usize) -> Measure {
    let (c0, o0) = (run.first().cycles, run.first().overruns);
    let last_overrun = run.overrun_cycles().into_iter().fold(0.0, f64::max);
    let last = run.during().last().unwrap_or(run.first());
    let overruns = last.overruns - o0;
    let first_widen = run
        .during()
        .find(|s| s.interval_s > BASE_S)
        .map(|s| (s.cycles - c0, s.t));
    let max_interval = run.during().map(|s| s.interval_s).fold(BASE_S, f64::max);
    let loaded: Vec<f64> = cycles_of(&run.samples)
        .iter()
        .filter(|c| c.t <= run.load_end_s)
        .map(|c| c.duration_ms)
        .collect();
    let loaded_cycle = host::mean(&loaded);
    let back_to_base = run
        .samples
        .iter()
        .find(|s| s.t > run.load_end_s && s.interval_s <= BASE_S)
        .map(|s| s.t - run.load_end_s);
    Measure {
        bench: "overload",
        name: format!(
            "overload: cycles until overruns stop ({}k connections)",
            run.connections / 1000
        ),
        value: last_overrun,
        unit: "cycles".into(),
        baseline_name: format!("overruns in 3 calm cycles: {}", run.calm_overruns),
        baseline: None,
        ratio: Some(loaded_cycle / run.calm_cycle_ms),
        ratio_meaning: "cycle time loaded / calm".into(),
        target: "<= 2".into(),
        met: Some(last_overrun <= 2.0),
        note: format!(
            "stress-ng --cpu {} ({}x the {cpus} cores) for {:.0} s, /metrics polled every \
             250 ms: {overruns} overrun cycles of {} under load (meterd_cycle_overruns_total), \
             the last in cycle {last_overrun} after the load started (0 = none). The governor \
             first widened {} and reached {max_interval} s; back at the {BASE_S} s base {} \
             after the load ended. Mean cycle {} ms under load vs {} ms calm.",
            run.workers,
            run.workers / cpus,
            run.load_s,
            last.cycles - c0,
            first_widen.map_or_else(
                || "never".into(),
                |(c, t)| format!("after {c} cycle(s) ({t:.1} s)")
            ),
            back_to_base.map_or_else(|| "not within 40 s".into(), |t| format!("{t:.1} s")),
            num(loaded_cycle),
            num(run.calm_cycle_ms)
        ),
    }
}

pub fn timeline(ctx: &mut Ctx) -> Result<()> {
    let cpus = host::cpus();
    let (calm_s, step_s, recover_s) = if ctx.quick {
        (4.0, 5.0, 10.0)
    } else {
        (6.0, 12.0, 30.0)
    };
    let max_workers = 2 * cpus;
    let pop = ready_population(ctx)?;
    let connections = pop.fleet.open;
    progress(format!(
        "governor timeline: {connections} connections; {calm_s:.0} s calm, then stress-ng ramp \
         1..{max_workers} workers ({step_s:.0} s each), then {recover_s:.0} s calm"
    ));
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut t_end = calm_s;
    poll(pop, start, t_end, 0, &mut samples)?;
    let mut workers = Vec::new();
    let total = calm_s + max_workers as f64 * step_s + recover_s;
    for n in 1..=max_workers {
        let left = Duration::from_secs_f64(total - start.elapsed().as_secs_f64() + 5.0);
        workers.push(stress(1, left).context("starting stress-ng")?);
        progress(format!(
            "governor: {n} stress-ng worker(s) ({:.1}x cores)",
            n as f64 / cpus as f64
        ));
        t_end += step_s;
        poll(pop, start, t_end, n, &mut samples)?;
    }
    for mut w in workers {
        w.stop(Duration::from_secs(5));
    }
    let load_end = start.elapsed().as_secs_f64();
    progress("governor: load stopped; watching the interval narrow");
    poll(pop, start, load_end + recover_s, 0, &mut samples)?;

    let cycles = cycles_of(&samples);
    let max_interval = samples.iter().map(|s| s.interval_s).fold(BASE_S, f64::max);
    let first_widen = samples.iter().find(|s| s.interval_s > BASE_S);
    let back = samples
        .iter()
        .find(|s| s.t > load_end && s.interval_s <= BASE_S)
        .map(|s| s.t - load_end);
    let ramp_saturated = calm_s + (cpus as f64 - 1.0) * step_s;
    ctx.results.measures.push(Measure {
        bench: "governor",
        name: "governor: widest interval under a load ramp".into(),
        value: max_interval,
        unit: "s".into(),
        baseline_name: "base interval".into(),
        baseline: Some(BASE_S),
        ratio: Some(max_interval / BASE_S),
        ratio_meaning: "widest / base".into(),
        target: "- (figure: governor.svg)".into(),
        met: None,
        note: format!(
            "{connections} connections; stress-ng ramp 1..{max_workers} CPU workers on {cpus} \
             cores, {step_s:.0} s per step, /metrics every 250 ms. First widening at {} (the \
             cores are all busy from {ramp_saturated:.0} s); back at the base interval {} after \
             the load ended.",
            first_widen.map_or_else(
                || "never".into(),
                |s| format!(
                    "{:.1} s with {} stress-ng worker(s), CPU pressure {}",
                    s.t,
                    s.workers,
                    s.cpu_pressure.map_or_else(|| "-".into(), num)
                )
            ),
            back.map_or_else(
                || format!("not within {recover_s:.0} s"),
                |t| format!("{t:.1} s")
            )
        ),
    });
    ctx.results.details.insert(
        "governor".into(),
        json!({
            "connections": connections,
            "cpus": cpus,
            "load_end_s": load_end,
            "samples": samples,
            "cycles": cycles,
        }),
    );
    ctx.results
        .plots
        .push(plot::governor(&ctx.out, &samples, &cycles, cpus, load_end)?);
    Ok(())
}
