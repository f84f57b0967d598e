//! Billing-made overload (`billing-overload`): the patent's figure 4 with no
//! load but billing's own, and no stress-ng.
//!
//! Sessions stream as in the `active` bench ([`active::RATE`] each, 1 minor
//! unit per started KB) while the bench raises their number in steps, up to
//! a top or until the interval has widened (the cycles no longer fitting
//! 1 s, or the CPU pressure they and the streaming make) and held. /metrics is polled every 250 ms from a thread of its
//! own, so the timeline has no gap while connections open. Then the traffic
//! stops, every session settles, and the total billed is compared with what
//! the bench makes of the bytes the helpers wrote.
//!
//! The agent runs with `billing.open_write_interval = "0s"`: every cycle
//! rewrites every streaming session's ledger row and segment, the behaviour
//! before that setting existed. That setting is what makes the billing work
//! heavy: with the 10 s default a cycle writes about a tenth of the
//! streaming sessions.
//!
//! Owns the scenario, its analysis and its rows. The population and the
//! settlement come from [`super::scale`] and [`super::active`], the samples
//! from [`super::governor`], the figure from [`plot::billing_overload`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use serde::Serialize;
use serde_json::json;

use super::active::{self, RATE};
use super::agent::{Agent, Scrape};
use super::fleet::Fleet;
use super::governor::{self, BASE_S, Sample};
use super::report::{Measure, num};
use super::scale::{self, Population};
use super::{Ctx, plot, progress};

/// The `[billing]` keys of this bench's agent (see the module docs).
const BILLING_TOML: &str = "open_write_interval = \"0s\"\n";
/// `session_idle`, s: short, so that sessions settle soon after the traffic
/// stops.
const SESSION_IDLE_S: u64 = 3;

/// Sizes and times of the scenario.
#[derive(Debug, Clone, Copy, Serialize)]
struct Plan {
    /// Sessions streaming from the start, where cycles fit the interval.
    start: usize,
    /// Sessions added per raise.
    step: usize,
    /// The most sessions the bench raises to.
    top: usize,
    /// Seconds at `start` before the first raise: the baseline.
    calm_s: f64,
    /// Seconds per raise.
    step_s: f64,
    /// Seconds at the last size before the traffic stops.
    hold_s: f64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                start: 5_000,
                step: 10_000,
                top: 35_000,
                calm_s: 6.0,
                step_s: 8.0,
                hold_s: 8.0,
            }
        } else {
            Plan {
                start: 10_000,
                step: 10_000,
                top: 60_000,
                calm_s: 15.0,
                step_s: 15.0,
                hold_s: 30.0,
            }
        }
    }
}

/// A size the bench raised the sessions to, and when.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Step {
    /// Seconds on the timeline at which the connections began to open.
    t: f64,
    /// Sessions streaming from then on.
    sessions: usize,
}

/// The overruns seen while one step's sessions streamed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Episode {
    sessions: usize,
    /// Cycles that overran.
    overruns: f64,
    /// Cycles from the first overrun to the last, both counted (1: one
    /// overrun, then none); 0 without an overrun.
    span_cycles: f64,
}

/// The ledger's viewing sessions once the agent stopped.
#[derive(Debug, Default, Serialize)]
struct Ledger {
    settled: u64,
    open: u64,
    /// `SUM(charge_minor)` and `SUM(bytes_out)` of the settled sessions.
    charge_minor: u64,
    bytes_out: u64,
}

/// `meterd_interval_changes_total` growth over a stretch, by reason.
#[derive(Debug, Default, Serialize)]
struct Changes {
    widened_overrun: f64,
    widened_pressure: f64,
    narrowed_calm: f64,
}

impl Changes {
    fn between(a: &Scrape, b: &Scrape) -> Changes {
        let grew = |reason| interval_changes(b, reason) - interval_changes(a, reason);
        Changes {
            widened_overrun: grew("overrun"),
            widened_pressure: grew("pressure"),
            narrowed_calm: grew("calm"),
        }
    }

    fn text(&self) -> String {
        format!(
            "widened {} time(s) for an overrun and {} for CPU pressure, narrowed {} time(s)",
            self.widened_overrun, self.widened_pressure, self.narrowed_calm
        )
    }
}

/// What the bench did and saw.
#[derive(Debug, Serialize)]
struct Run {
    plan: Plan,
    steps: Vec<Step>,
    /// Why fewer connections opened than asked, if they did.
    shortfall: Option<String>,
    /// Seconds on the timeline: the first raise, the traffic stopping, and
    /// the interval back at the base after that (None: not within 40 s).
    raise_s: f64,
    stop_s: f64,
    back_s: Option<f64>,
    /// Interval changes from the first raise to the traffic stop, and from
    /// then to the end.
    loaded: Changes,
    after: Changes,
    /// Bytes the helpers wrote; `meterd_charged_minor_total` once every
    /// session settled.
    written_bytes: u64,
    charged_minor: f64,
    ledger: Ledger,
    samples: Vec<Sample>,
}

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let plan = Plan::new(ctx.quick);
    // The connections of other benches would count in this one's cycles.
    if let Some(old) = ctx.population.take() {
        progress("stopping the other benches' connections: this bench opens its own");
        old.stop()?;
    }
    let service = active::service_toml(&format!("{SESSION_IDLE_S}s"));
    let mut pop = Population::start_with(
        ctx,
        plan.top,
        "billing-overload",
        Some(&service),
        BILLING_TOML,
        "",
    )?;
    let ledger = active::ledger_path(&pop.agent);
    let result = timeline(&mut pop, plan);
    pop.stop()?;
    let mut run = result?;
    run.ledger = read_ledger(&ledger)?;

    let cycles = governor::cycles_of(&run.samples);
    // The settlement after the traffic stopped is an episode of its own.
    let mut phases = run.steps.clone();
    phases.push(Step {
        t: run.stop_s,
        sessions: 0,
    });
    let episodes = episodes(&run.samples, &phases);
    let rows = vec![
        cycle_row(&run),
        overrun_row(&run, &episodes),
        interval_row(&run),
        billed_row(&run),
    ];
    for r in &rows {
        progress(format!("{}: {} {}", r.name, num(r.value), r.unit));
    }
    ctx.results.measures.extend(rows);
    let sessions: Vec<(f64, usize)> = run.steps.iter().map(|s| (s.t, s.sessions)).collect();
    ctx.results.plots.push(plot::billing_overload(
        &ctx.out,
        &run.samples,
        &cycles,
        &sessions,
        (run.raise_s, run.stop_s),
    )?);
    ctx.results.details.insert(
        "billing-overload".into(),
        json!({ "rate_bytes_per_s": RATE, "billing_toml": BILLING_TOML,
                "session_idle_s": SESSION_IDLE_S, "run": run, "cycles": cycles,
                "episodes": episodes }),
    );
    Ok(())
}

/// Streams `plan.start` sessions, then polls /metrics from a thread of its
/// own while [`drive`] raises, holds, stops and settles.
fn timeline(pop: &mut Population, plan: Plan) -> Result<Run> {
    let (open, error) = pop.grow(plan.start)?;
    if let Some(e) = &error {
        progress(format!(
            "only {open} of {} connections opened: {e}",
            plan.start
        ));
    }
    active::stream(pop, open, 2.0)?;
    progress(format!(
        "billing-overload: {open} sessions streaming {RATE} B/s each, billing.{}; raising by \
         {} every {:.0} s up to {}",
        BILLING_TOML.trim(),
        plan.step,
        plan.step_s,
        plan.top
    ));
    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let agent = &pop.agent;
    let fleet = &mut pop.fleet;
    thread::scope(|s| {
        let polling = s.spawn(|| {
            let mut samples = Vec::new();
            let polled = governor::poll_while(agent, start, 0, &mut samples, |_| {
                !stop.load(Ordering::Relaxed)
            });
            (samples, polled)
        });
        let driven = drive(fleet, agent, plan, start);
        stop.store(true, Ordering::Relaxed);
        let (samples, polled) = polling
            .join()
            .map_err(|_| anyhow!("the /metrics poller panicked"))?;
        let mut run = driven?;
        polled.context("polling /metrics")?;
        run.samples = samples;
        Ok(run)
    })
}

fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

fn sleep_until(start: Instant, t: f64) {
    let ahead = t - secs(start);
    if ahead > 0.0 {
        thread::sleep(Duration::from_secs_f64(ahead));
    }
}

/// Whether the interval was wider than the base at `mid` and still is at
/// `end`, with no overrun in between.
fn held(mid: &Scrape, end: &Scrape) -> bool {
    mid.interval() > BASE_S && end.interval() > BASE_S && end.overruns() <= mid.overruns()
}

fn interval_changes(s: &Scrape, reason: &str) -> f64 {
    s.with_label(
        "meterd_interval_changes_total",
        &format!("reason=\"{reason}\""),
    )
}

/// The scenario, on the timeline that started at `start`: the baseline,
/// the raises, the hold at the top, then the traffic stopped and settled.
fn drive(fleet: &mut Fleet, agent: &Agent, plan: Plan, start: Instant) -> Result<Run> {
    let mut steps = vec![Step {
        t: 0.0,
        sessions: fleet.open,
    }];
    let mut shortfall = None;
    sleep_until(start, plan.calm_s);
    let before = agent.scrape()?;
    let raise_s = secs(start);
    let mut n = fleet.open;
    while n < plan.top && shortfall.is_none() {
        n = (n + plan.step).min(plan.top);
        let t = secs(start);
        let (open, error) = scale::grow(fleet, agent, n)?;
        steps.push(Step { t, sessions: open });
        if open < n {
            shortfall = Some(format!(
                "only {open} of {n} connections opened ({})",
                error.as_deref().unwrap_or("no error reported")
            ));
        }
        sleep_until(start, t + plan.step_s / 2.0);
        let mid = agent.scrape()?;
        sleep_until(start, t + plan.step_s);
        let end = agent.scrape()?;
        progress(format!(
            "billing-overload: {open} sessions streaming: interval {} s, {} overruns so far",
            num(end.interval()),
            end.overruns()
        ));
        if held(&mid, &end) {
            progress("billing-overload: the interval widened and held; no further raise");
            break;
        }
    }
    thread::sleep(Duration::from_secs_f64(plan.hold_s));
    let at_stop = agent.scrape()?;
    let stop_s = secs(start);
    let (written_bytes, settled) =
        active::settle(fleet, agent, SESSION_IDLE_S, Duration::from_secs(180))?;
    // For the figure: the interval narrowing back (not judged).
    let back_s = agent
        .wait_for(
            Duration::from_secs(40),
            "the interval back at the base",
            |s| s.interval() <= BASE_S,
        )
        .ok()
        .map(|_| secs(start) - stop_s);
    thread::sleep(Duration::from_secs(2));
    let end = agent.scrape()?;
    Ok(Run {
        plan,
        steps,
        shortfall,
        raise_s,
        stop_s,
        back_s,
        loaded: Changes::between(&before, &at_stop),
        after: Changes::between(&at_stop, &end),
        written_bytes,
        charged_minor: active::charged(&settled),
        ledger: Ledger::default(),
        samples: Vec::new(),
    })
}

/// The settled sessions' charges and bytes, once the agent stopped.
fn read_ledger(ledger: &Path) -> Result<Ledger> {
    active::fold_wal(ledger)?;
    let out = active::sqlite(
        ledger,
        "SELECT COALESCE(SUM(state = 'settled'), 0), COALESCE(SUM(state = 'open'), 0), \
         COALESCE(SUM(charge_minor), 0), COALESCE(SUM(bytes_out), 0) FROM viewer_sessions",
    )?;
    let v: Vec<u64> = out
        .trim()
        .split('|')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the ledger's session sums: {out:?}"))?;
    let [settled, open, charge_minor, bytes_out] = v[..] else {
        anyhow::bail!("the ledger's session sums: {out:?}");
    };
    Ok(Ledger {
        settled,
        open,
        charge_minor,
        bytes_out,
    })
}

/// The (cumulative) numbers of the cycles that overran, in order, with the
/// time of the poll that saw them; a poll that saw k more overruns counts
/// the last k cycles before it.
fn overrun_cycles(samples: &[Sample]) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .flat_map(|w| {
            let k = (w[1].overruns - w[0].overruns).max(0.0) as usize;
            (0..k).rev().map(move |j| (w[1].t, w[1].cycles - j as f64))
        })
        .collect()
}

/// The overruns of each step, from its raise to the next (the last step:
/// to the end of the samples).
fn episodes(samples: &[Sample], steps: &[Step]) -> Vec<Episode> {
    let overruns = overrun_cycles(samples);
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let end = steps.get(i + 1).map_or(f64::INFINITY, |s| s.t);
            let cycles: Vec<f64> = overruns
                .iter()
                .filter(|(t, _)| (step.t..end).contains(t))
                .map(|&(_, c)| c)
                .collect();
            let span_cycles = match (cycles.first(), cycles.last()) {
                (Some(first), Some(last)) => last - first + 1.0,
                _ => 0.0,
            };
            Episode {
                sessions: step.sessions,
                overruns: cycles.len() as f64,
                span_cycles,
            }
        })
        .collect()
}

/// Mean cycle, ms, of the cycles that ended between the polls at `from`
/// and `to` seconds.
fn mean_cycle_ms(samples: &[Sample], from: f64, to: f64) -> Option<f64> {
    let a = samples.iter().find(|s| s.t >= from)?;
    let b = samples.iter().rev().find(|s| s.t <= to)?;
    let n = b.cycles - a.cycles;
    (n > 0.0).then(|| (b.cycle_seconds - a.cycle_seconds) / n * 1e3)
}

/// "10k" for 10000 sessions; an uneven count (a shortfall) as it is.
fn k(sessions: usize) -> String {
    if sessions.is_multiple_of(1000) {
        format!("{}k", sessions / 1000)
    } else {
        sessions.to_string()
    }
}

/// The sizes and when they began, for the notes.
fn steps_text(run: &Run) -> String {
    run.steps
        .iter()
        .map(|s| format!("{} at {:.0} s", k(s.sessions), s.t))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The top size's cycle against the same agent's at the start size.
fn cycle_row(run: &Run) -> Measure {
    let first = run.steps[0];
    let top = run.steps.last().copied().unwrap_or(first);
    let base = mean_cycle_ms(&run.samples, 0.0, run.raise_s).unwrap_or(f64::NAN);
    // The top size's second half: past the cycles that first saw its new
    // connections and past the widening.
    let from = f64::midpoint(top.t, run.stop_s);
    let at_top = mean_cycle_ms(&run.samples, from, run.stop_s).unwrap_or(f64::NAN);
    let added = top.sessions.saturating_sub(first.sessions) as f64;
    Measure {
        bench: "billing-overload",
        name: format!(
            "billing-overload: billing cycle, {} sessions streaming (no stress-ng)",
            k(top.sessions)
        ),
        value: at_top,
        unit: "ms".into(),
        baseline_name: format!("same agent, {} sessions streaming", k(first.sessions)),
        baseline: Some(base),
        ratio: Some(at_top / base),
        ratio_meaning: "top / start".into(),
        target: "-".into(),
        met: None,
        note: format!(
            "Every session streams {RATE} B/s at 1 minor unit per started KB, and the agent \
             runs with billing.open_write_interval = \"0s\": every cycle rewrites every \
             streaming session's ledger row and segment (the behaviour before that setting). \
             That setting is what makes the billing work heavy: with the 10 s default a cycle \
             writes about a tenth of the streaming sessions. No stress-ng. Mean cycle \
             (meterd_cycle_duration_seconds sum/count, /metrics polled every 250 ms) over \
             {:.0}-{:.0} s (the top size's second half) against the {:.0} s at {} before the \
             first raise: the cycle grew {} µs per added session. Sizes: {}.{}",
            from,
            run.stop_s,
            run.raise_s,
            k(first.sessions),
            num((at_top - base) * 1e3 / added.max(1.0)),
            steps_text(run),
            run.shortfall
                .as_ref()
                .map(|s| format!(" {s}."))
                .unwrap_or_default(),
        ),
    }
}

/// The worst stretch (a size, or the settlement): cycles from its first
/// overrun to its last.
fn overrun_row(run: &Run, episodes: &[Episode]) -> Measure {
    let worst = episodes.iter().map(|e| e.span_cycles).fold(0.0, f64::max);
    let calm = episodes.first().map_or(0.0, |e| e.overruns);
    let widened = run.samples.iter().any(|s| s.interval_s > BASE_S);
    let overloaded = widened || episodes.iter().any(|e| e.overruns > 0.0);
    let per_step = episodes
        .iter()
        .map(|e| {
            format!(
                "{}: {} overrun(s), first to last {} cycle(s)",
                if e.sessions == 0 {
                    "after the traffic stopped (settlement)".to_owned()
                } else {
                    k(e.sessions)
                },
                e.overruns,
                e.span_cycles
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Measure {
        bench: "billing-overload",
        name: "billing-overload: cycles from the first overrun until overruns stop (worst stretch)"
            .into(),
        value: worst,
        unit: "cycles".into(),
        baseline_name: format!(
            "overruns at {} before the first raise: {calm}",
            k(run.plan.start)
        ),
        baseline: None,
        ratio: None,
        ratio_meaning: "-".into(),
        target: "<= 2".into(),
        met: overloaded.then_some(worst <= 2.0),
        note: format!(
            "Overruns (meterd_cycle_overruns_total, polled every 250 ms) counted per raise, \
             from the raise to the next, and from the traffic stop to the end (the \
             settlement); cycles from the first overrun to the last, both counted (1: one \
             overrun, then none). Per size: {per_step}. While the sessions streamed (first \
             raise to traffic stop) the governor {}; after the traffic stopped it {} (a \
             narrowing while billing still needs the wider interval shows as a later overrun \
             in the same stretch).{}",
            run.loaded.text(),
            run.after.text(),
            if overloaded {
                String::new()
            } else {
                " Not judged: billing never overran and the interval never widened (raise the \
                 top size)."
                    .into()
            },
        ),
    }
}

/// The widest interval under billing's load against the base.
fn interval_row(run: &Run) -> Measure {
    let loaded = || {
        run.samples
            .iter()
            .filter(|s| (run.raise_s..=run.stop_s).contains(&s.t))
    };
    let widest = loaded().map(|s| s.interval_s).fold(BASE_S, f64::max);
    let sessions_at = |t: f64| {
        run.steps
            .iter()
            .rev()
            .find(|s| s.t <= t)
            .map_or(0, |s| s.sessions)
    };
    let first = loaded().find(|s| s.interval_s > BASE_S);
    let at_stop = loaded().next_back().map_or(BASE_S, |s| s.interval_s);
    Measure {
        bench: "billing-overload",
        name: "billing-overload: widest interval, billing the only load".into(),
        value: widest,
        unit: "s".into(),
        baseline_name: "base interval".into(),
        baseline: Some(BASE_S),
        ratio: Some(widest / BASE_S),
        ratio_meaning: "widest / base".into(),
        target: "- (figure: billing-overload.svg)".into(),
        met: None,
        note: format!(
            "First widening {}; {} s when the traffic stopped; back at the base {} after it \
             stopped. Sizes: {}.",
            first.map_or_else(
                || "never".into(),
                |s| format!(
                    "at {:.1} s with {} sessions streaming (CPU pressure {})",
                    s.t,
                    k(sessions_at(s.t)),
                    s.cpu_pressure.map_or_else(|| "-".into(), num)
                )
            ),
            num(at_stop),
            run.back_s
                .map_or_else(|| "not within 40 s".into(), |t| format!("{t:.1} s")),
            steps_text(run),
        ),
    }
}

/// The total billed against the bench's own computation from the bytes
/// the helpers wrote.
fn billed_row(run: &Run) -> Measure {
    let l = &run.ledger;
    let (least, most) = active::billed_bounds(run.written_bytes, l.settled);
    let billed = l.charge_minor;
    // The metric counts whole minor units here (1 per started KB).
    let agree = (run.charged_minor - billed as f64).abs() < 0.5 && l.open == 0;
    let within = (least..=most).contains(&billed);
    let verdict = if !within {
        let off = if billed < least {
            least - billed
        } else {
            billed - most
        };
        format!(" Outside the bound by {off} units.")
    } else if !agree {
        " The metric and the ledger disagree, or sessions are still open.".to_owned()
    } else {
        String::new()
    };
    Measure {
        bench: "billing-overload",
        name: "billing-overload: total billed vs the bench's own computation".into(),
        value: billed as f64,
        unit: "minor units".into(),
        baseline_name: "1 per started KB of the bytes the helpers wrote".into(),
        baseline: Some(least as f64),
        ratio: Some(billed as f64 / least as f64),
        ratio_meaning: "billed / computed".into(),
        target: "1, plus at most 1 unit per session (per-session rounding)".into(),
        met: Some(within && agree),
        note: format!(
            "Traffic stopped, sessions idle past session_idle = {SESSION_IDLE_S}s, connections \
             reset, every session settled, agent stopped: the ledger's {} settled sessions \
             ({} open) charge {billed} minor units (SUM(charge_minor)); \
             meterd_charged_minor_total said {}. The helpers wrote {} bytes: {least} minor \
             units at 1 per started KB of the total; each session's own last started KB can \
             add a unit, so at most {most}. Billed {} over the computation ({} per settled \
             session). The sessions' bytes_out sum to {} ({} against the helpers' count).{}",
            l.settled,
            l.open,
            run.charged_minor,
            run.written_bytes,
            billed.saturating_sub(least),
            num(billed.saturating_sub(least) as f64 / l.settled.max(1) as f64),
            l.bytes_out,
            l.bytes_out.cast_signed() - run.written_bytes.cast_signed(),
            verdict,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, cycles: f64, overruns: f64) -> Sample {
        Sample {
            t,
            workers: 0,
            cpu_pressure: None,
            interval_s: 1.0,
            cycles,
            cycle_seconds: cycles * 0.5,
            overruns,
            psi_some_us: None,
        }
    }

    #[test]
    fn overruns_count_per_raise_from_first_to_last() {
        // Cycles 1..=20, one every second. Overruns: none at 10k; at 20k
        // (from 5 s) cycles 6 and 7; at 30k (from 12 s) cycles 13 and 18.
        let overran = [6.0, 7.0, 13.0, 18.0];
        let samples: Vec<Sample> = (0..=20)
            .map(|i| {
                let c = f64::from(i);
                let o = overran.iter().filter(|&&x| x <= c).count() as f64;
                sample(c + 0.1, c, o)
            })
            .collect();
        let steps = [
            Step {
                t: 0.0,
                sessions: 10_000,
            },
            Step {
                t: 5.0,
                sessions: 20_000,
            },
            Step {
                t: 12.0,
                sessions: 30_000,
            },
        ];
        let e = episodes(&samples, &steps);
        let spans: Vec<(f64, f64)> = e.iter().map(|e| (e.overruns, e.span_cycles)).collect();
        assert_eq!(spans, vec![(0.0, 0.0), (2.0, 2.0), (2.0, 6.0)]);
    }

    #[test]
    fn a_poll_that_saw_two_overruns_counts_the_last_two_cycles() {
        let samples = [sample(0.0, 4.0, 0.0), sample(3.0, 7.0, 2.0)];
        assert_eq!(overrun_cycles(&samples), vec![(3.0, 6.0), (3.0, 7.0)]);
    }

    #[test]
    fn mean_cycle_between_polls() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| sample(f64::from(i), f64::from(i), 0.0))
            .collect();
        assert_eq!(mean_cycle_ms(&samples, 2.0, 6.0), Some(500.0));
        assert_eq!(mean_cycle_ms(&samples, 3.5, 3.9), None);
    }
}
