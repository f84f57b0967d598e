//! The interval governor (the patent's billing manager deciding IT, ITn1,
//! ITn2): a pure function from the current interval, the load and the last
//! cycle's timing to the next interval.
//!
//! - Overloaded (CPU pressure at or above the high-water mark, or the last
//!   cycle overran its interval): widen by `factor`, up to `max_interval`.
//!   A cycle that cannot finish in its interval is a load signal by itself
//!   (mechanism invariant 2): the answer is a longer interval, not a queue
//!   of late cycles.
//! - Calm (pressure below the low-water mark) for `hold_cycles` load samples
//!   in a row: narrow one step, down to the base interval. Samples are taken
//!   every base interval whatever the billing interval, so a 16 s interval
//!   returns to 1 s in 4 x `hold_cycles` seconds, not in minutes; each step
//!   needs its own run of calm samples, so the interval cannot flap.
//!
//! Widening looks at the latest one-interval sample too, not at the average
//! over a long interval, which would keep widening after the load is gone.
//!
//! Widening changes how often billing runs, never what it bills: cycles
//! charge from cumulative counts (see `billing`).
//!
//! [`Pacer`] applies the decisions to a tokio interval at cycle boundaries.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::{config::duration_str, load::Load};

/// `[governor]` settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernorConfig {
    /// Widen by this factor at a time (2: double).
    pub factor: u32,
    /// Never widen past this.
    #[serde(with = "duration_str")]
    pub max_interval: Duration,
    /// CPU pressure (share of time some task waited, 0..1) at which the host
    /// counts as overloaded.
    pub high_water: f64,
    /// Pressure below which the host counts as calm.
    pub low_water: f64,
    /// Without PSI: runnable tasks per CPU at which the host is overloaded.
    pub runnable_high: f64,
    /// Without PSI: runnable tasks per CPU below which the host is calm.
    pub runnable_low: f64,
    /// Calm load samples (one per base interval) in a row before each
    /// narrowing step.
    pub hold_cycles: u32,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            factor: 2,
            max_interval: Duration::from_secs(16),
            high_water: 0.5,
            low_water: 0.2,
            runnable_high: 1.5,
            runnable_low: 1.0,
            hold_cycles: 5,
        }
    }
}

impl GovernorConfig {
    /// Rejects settings that would make the governor meaningless.
    pub fn validate(&self, base: Duration) -> Result<(), String> {
        if !(2..=16).contains(&self.factor) {
            return Err(format!(
                "governor.factor must be 2..=16, not {}",
                self.factor
            ));
        }
        if self.max_interval < base {
            return Err("governor.max_interval must be at least agent.interval".into());
        }
        if !(0.0..=1.0).contains(&self.low_water)
            || !(0.0..=1.0).contains(&self.high_water)
            || self.low_water >= self.high_water
        {
            return Err(
                "governor.low_water and high_water must satisfy 0 <= low_water < high_water <= 1"
                    .into(),
            );
        }
        if self.runnable_low >= self.runnable_high || self.runnable_low < 0.0 {
            return Err("governor.runnable_low must be below runnable_high".into());
        }
        if self.hold_cycles == 0 {
            return Err("governor.hold_cycles must be at least 1".into());
        }
        Ok(())
    }
}

/// What the last cycle looked like.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CycleSignals {
    pub load: Load,
    /// How far the cycle ended past the end of its interval (the patent's
    /// overrun time ET); zero if it finished in time.
    pub overrun: Duration,
}

/// Why the interval changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// CPU pressure (or runnable tasks) above the high-water mark.
    Pressure,
    /// The last cycle overran its interval.
    Overrun,
    /// Calm for `hold_cycles` cycles.
    Calm,
}

impl Reason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pressure => "pressure",
            Self::Overrun => "overrun",
            Self::Calm => "calm",
        }
    }
}

/// A change of interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: Duration,
    pub to: Duration,
    pub reason: Reason,
}

impl Change {
    /// "widen" or "narrow": the direction label.
    pub fn direction(&self) -> &'static str {
        if self.to > self.from {
            "widen"
        } else {
            "narrow"
        }
    }
}

/// The governor's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GovernorState {
    pub interval: Duration,
    /// Calm load samples in a row so far.
    pub calm_samples: u32,
}

impl GovernorState {
    /// Starting at the base interval.
    pub fn new(base: Duration) -> Self {
        Self {
            interval: base,
            calm_samples: 0,
        }
    }
}

/// Whether `load` is above the high-water mark, and whether it is below
/// the low-water mark.
fn judge(config: &GovernorConfig, load: &Load) -> (bool, bool) {
    match load.cpu_pressure {
        Some(p) => (p >= config.high_water, p < config.low_water),
        None => (
            load.runnable_per_cpu >= config.runnable_high,
            load.runnable_per_cpu < config.runnable_low,
        ),
    }
}

/// At the end of a billing cycle: widen if the latest load sample is above
/// the high-water mark or the cycle overran. Widening is decided only here,
/// so it happens at most once per cycle.
pub fn after_cycle(
    config: &GovernorConfig,
    state: GovernorState,
    signals: &CycleSignals,
) -> (GovernorState, Option<Change>) {
    let (over, _) = judge(config, &signals.load);
    let overran = !signals.overrun.is_zero();
    if !(over || overran) {
        return (state, None);
    }
    let wider = (state.interval * config.factor).min(config.max_interval);
    let reason = if overran {
        Reason::Overrun
    } else {
        Reason::Pressure
    };
    let change = (wider != state.interval).then_some(Change {
        from: state.interval,
        to: wider,
        reason,
    });
    (
        GovernorState {
            interval: wider,
            calm_samples: 0,
        },
        change,
    )
}

/// After each load sample (taken every base interval, whatever the billing
/// interval): narrow one step once `hold_cycles` samples in a row were
/// calm. Samples between the marks reset the count, so the interval does
/// not flap.
pub fn after_sample(
    config: &GovernorConfig,
    base: Duration,
    state: GovernorState,
    load: &Load,
) -> (GovernorState, Option<Change>) {
    let (over, calm) = judge(config, load);
    if over || !calm || state.interval <= base {
        let calm_samples = if calm {
            state.calm_samples.saturating_add(1)
        } else {
            0
        };
        return (
            GovernorState {
                interval: state.interval,
                calm_samples,
            },
            None,
        );
    }
    let calm_samples = state.calm_samples + 1;
    if calm_samples < config.hold_cycles {
        return (
            GovernorState {
                interval: state.interval,
                calm_samples,
            },
            None,
        );
    }
    let narrower = (state.interval / config.factor).max(base);
    (
        GovernorState {
            interval: narrower,
            calm_samples: 0,
        },
        Some(Change {
            from: state.interval,
            to: narrower,
            reason: Reason::Calm,
        }),
    )
}

/// Paces billing cycles: a tokio interval whose period the governor sets.
/// A new period counts from the start of the cycle in progress, so a
/// narrowed interval shortens the current wait and a widened one lengthens
/// it; either way the next cycle bills everything since the last one.
#[derive(Debug)]
pub struct Pacer {
    config: GovernorConfig,
    base: Duration,
    state: GovernorState,
    ticker: Interval,
    /// Scheduled start of the cycle in progress (or of the last one).
    deadline: Instant,
}

impl Pacer {
    /// Cycles every `base`, the first one now.
    pub fn new(config: GovernorConfig, base: Duration) -> Self {
        let mut ticker = tokio::time::interval(base);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            config,
            base,
            state: GovernorState::new(base),
            ticker,
            deadline: Instant::now(),
        }
    }

    /// Waits for the next cycle; returns its scheduled start.
    pub async fn tick(&mut self) -> Instant {
        self.deadline = self.ticker.tick().await;
        self.deadline
    }

    /// The current interval.
    pub fn interval(&self) -> Duration {
        self.state.interval
    }

    /// How far a cycle that started at the last tick and ends `now`
    /// overran its interval.
    pub fn overrun(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.deadline + self.state.interval)
    }

    /// Feeds a finished cycle's signals to the governor.
    pub fn cycle_finished(&mut self, signals: &CycleSignals) -> Option<Change> {
        let (state, change) = after_cycle(&self.config, self.state, signals);
        self.apply(state, change)
    }

    /// Feeds a load sample to the governor.
    pub fn sampled(&mut self, load: &Load) -> Option<Change> {
        let (state, change) = after_sample(&self.config, self.base, self.state, load);
        self.apply(state, change)
    }

    fn apply(&mut self, state: GovernorState, change: Option<Change>) -> Option<Change> {
        self.state = state;
        if change.is_some() {
            let next = (self.deadline + state.interval).max(Instant::now());
            let mut ticker = tokio::time::interval_at(next, state.interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            self.ticker = ticker;
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);

    fn load(p: f64) -> Load {
        Load {
            cpu_pressure: Some(p),
            ..Load::default()
        }
    }

    fn cycle(p: f64) -> CycleSignals {
        CycleSignals {
            load: load(p),
            overrun: Duration::ZERO,
        }
    }

    #[test]
    fn widens_once_per_overloaded_cycle_up_to_the_ceiling() {
        let config = GovernorConfig::default();
        let mut state = GovernorState::new(BASE);
        let mut seen = vec![];
        for _ in 0..6 {
            let (next, change) = after_cycle(&config, state, &cycle(0.9));
            state = next;
            seen.push((state.interval.as_secs(), change.map(|c| c.reason)));
        }
        assert_eq!(
            seen,
            vec![
                (2, Some(Reason::Pressure)),
                (4, Some(Reason::Pressure)),
                (8, Some(Reason::Pressure)),
                (16, Some(Reason::Pressure)),
                (16, None),
                (16, None)
            ]
        );
        // A calm or middling cycle changes nothing by itself.
        assert_eq!(after_cycle(&config, state, &cycle(0.3)), (state, None));
    }

    #[test]
    fn overrun_alone_widens() {
        let signals = CycleSignals {
            overrun: Duration::from_millis(300),
            ..cycle(0.0)
        };
        let (state, change) = after_cycle(
            &GovernorConfig::default(),
            GovernorState::new(BASE),
            &signals,
        );
        assert_eq!(state.interval, Duration::from_secs(2));
        assert_eq!(change.unwrap().reason, Reason::Overrun);
    }

    #[test]
    fn narrows_after_holding_calm_samples() {
        let config = GovernorConfig::default(); // hold 5
        let mut state = GovernorState {
            interval: Duration::from_secs(4),
            calm_samples: 0,
        };
        let mut changes = vec![];
        for i in 0..12 {
            let (next, change) = after_sample(&config, BASE, state, &load(0.05));
            state = next;
            if let Some(c) = change {
                changes.push((i, c.to.as_secs(), c.reason));
            }
        }
        assert_eq!(changes, vec![(4, 2, Reason::Calm), (9, 1, Reason::Calm)]);
        assert_eq!(state.interval, BASE, "never below the base");
    }

    #[test]
    fn no_flapping_around_the_marks() {
        let config = GovernorConfig::default();
        let mut state = GovernorState {
            interval: Duration::from_secs(2),
            calm_samples: 0,
        };
        for p in [0.1, 0.1, 0.1, 0.1, 0.3].repeat(10) {
            let (next, change) = after_sample(&config, BASE, state, &load(p));
            assert_eq!(
                change, None,
                "four calm samples then a middling one never narrow"
            );
            state = next;
        }
    }

    #[test]
    fn without_psi_runnable_tasks_decide() {
        let busy = CycleSignals {
            load: Load {
                runnable_per_cpu: 3.0,
                ..Load::default()
            },
            overrun: Duration::ZERO,
        };
        let (_, change) = after_cycle(&GovernorConfig::default(), GovernorState::new(BASE), &busy);
        assert_eq!(change.unwrap().reason, Reason::Pressure);
    }

    /// The pacer under paused tokio time: a widened interval takes effect
    /// from the cycle in progress, and calm samples bring the base back.
    #[tokio::test(start_paused = true)]
    async fn pacer_follows_the_governor() {
        let config = GovernorConfig {
            hold_cycles: 2,
            ..GovernorConfig::default()
        };
        let mut pacer = Pacer::new(config, BASE);
        let start = pacer.tick().await;
        let since = |t: Instant| (t - start).as_secs();
        // Overloaded at the end of cycle 0: next cycle 2 s after its start.
        pacer.cycle_finished(&cycle(0.9));
        let t1 = pacer.tick().await;
        assert_eq!(since(t1), 2);
        // Overloaded again: 4 s.
        pacer.cycle_finished(&cycle(0.9));
        let t2 = pacer.tick().await;
        assert_eq!(since(t2), 6);
        pacer.cycle_finished(&cycle(0.1));
        // Two calm samples one second apart narrow 4 -> 2 during the wait:
        // the next cycle comes 2 s after t2, not 4.
        tokio::time::advance(BASE).await;
        assert_eq!(pacer.sampled(&load(0.1)), None);
        tokio::time::advance(BASE).await;
        assert_eq!(
            pacer.sampled(&load(0.1)).unwrap().to,
            Duration::from_secs(2)
        );
        let t3 = pacer.tick().await;
        assert_eq!(since(t3), 8);
        assert_eq!(pacer.interval(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn overrun_is_measured_from_the_deadline() {
        let mut pacer = Pacer::new(GovernorConfig::default(), BASE);
        let started = pacer.tick().await;
        assert_eq!(
            pacer.overrun(started + Duration::from_millis(900)),
            Duration::ZERO
        );
        assert_eq!(
            pacer.overrun(started + Duration::from_millis(1300)),
            Duration::from_millis(300)
        );
    }
}
