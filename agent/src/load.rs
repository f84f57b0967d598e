//! The system load monitor (the patent's part 31): run-queue pressure from
//! procfs, sampled once per billing cycle.
//!
//! Owns reading `/proc/pressure/cpu`, `/proc/stat` and `/proc/loadavg` and
//! turning them into [`Load`]. It decides nothing; the governor does.
//!
//! The main signal is CPU pressure over the last cycle: the growth of PSI's
//! cumulative `some` stall time divided by the wall time between samples.
//! Unlike `avg10` (a 10 s moving average) it reacts within one cycle. The
//! system-wide `full` line means nothing for CPU and is not used. Where PSI
//! is absent (kernel without CONFIG_PSI, or `psi=0`), runnable tasks per
//! online CPU stand in, and the log says so once.

use std::time::{Duration, Instant};

use procfs::{Current as _, CurrentSI as _};

/// One sample of the host's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Share of the last cycle in which some runnable task waited for a CPU
    /// (0..=1); `None` without PSI or before the second sample.
    pub cpu_pressure: Option<f64>,
    /// PSI `some avg10`, percent, as the kernel reports it.
    pub psi_some_avg10: Option<f64>,
    /// Runnable tasks (`procs_running`, minus this agent) per online CPU.
    pub runnable_per_cpu: f64,
    /// 1-minute load average per online CPU.
    pub loadavg1_per_cpu: f64,
}

/// Samples procfs; keeps the previous PSI total to compute the delta.
#[derive(Debug)]
pub struct LoadMonitor {
    cpus: f64,
    /// PSI total and time of the last periodic sample.
    previous: Option<(u64, Instant)>,
    /// The same at the end of the last billing cycle. The cycle measures
    /// its own window: a periodic sample a few ms before it would leave it
    /// a window shorter than PSI's accounting (a jiffy), which reads 0.
    previous_cycle: Option<(u64, Instant)>,
    psi_missing_reported: bool,
}

/// Which window a sample closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Since the last periodic sample (the governor's narrowing).
    Periodic,
    /// Since the end of the last cycle (its widening decision).
    Cycle,
}

impl Default for LoadMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadMonitor {
    /// A monitor for this host's online CPUs.
    pub fn new() -> Self {
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        // Baselines from the start, so that the first cycle already judges
        // on pressure rather than on runnable tasks.
        let baseline = procfs::CpuPressure::current()
            .ok()
            .map(|psi| (psi.some.total, Instant::now()));
        Self {
            cpus: f64::from(u32::try_from(online).unwrap_or(1).max(1)),
            previous: baseline,
            previous_cycle: baseline,
            psi_missing_reported: false,
        }
    }

    /// Reads the current load, with the pressure since the last sample.
    pub fn sample(&mut self) -> Load {
        self.sample_window(Window::Periodic)
    }

    /// Reads the current load, with the pressure over `window`.
    pub fn sample_window(&mut self, window: Window) -> Load {
        let now = Instant::now();
        let mut load = Load::default();
        match procfs::CpuPressure::current() {
            Ok(psi) => {
                load.psi_some_avg10 = Some(f64::from(psi.some.avg10));
                let total_us = psi.some.total;
                let previous = match window {
                    Window::Periodic => &mut self.previous,
                    Window::Cycle => &mut self.previous_cycle,
                };
                if let Some((before, at)) = *previous {
                    load.cpu_pressure = Some(pressure(before, total_us, now.duration_since(at)));
                }
                *previous = Some((total_us, now));
            }
            Err(e) => {
                if !self.psi_missing_reported {
                    tracing::warn!(
                        error = %e,
                        "no CPU pressure (PSI) in /proc/pressure/cpu: using runnable tasks per CPU from /proc/stat"
                    );
                    self.psi_missing_reported = true;
                }
            }
        }
        if let Ok(stat) = procfs::KernelStats::current()
            && let Some(running) = stat.procs_running
        {
            // procs_running counts this agent, which is running right now.
            load.runnable_per_cpu = f64::from(running.saturating_sub(1)) / self.cpus;
        }
        if let Ok(avg) = procfs::LoadAverage::current() {
            load.loadavg1_per_cpu = f64::from(avg.one) / self.cpus;
        }
        load
    }
}

/// Stall share between two PSI totals (µs) taken `elapsed` apart.
pub fn pressure(before_us: u64, after_us: u64, elapsed: Duration) -> f64 {
    let elapsed_us = elapsed.as_secs_f64() * 1e6;
    if elapsed_us <= 0.0 {
        return 0.0;
    }
    #[expect(clippy::cast_precision_loss, reason = "a ratio, not an amount")]
    let stalled = after_us.saturating_sub(before_us) as f64;
    (stalled / elapsed_us).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_is_stall_share() {
        assert!((pressure(1_000, 501_000, Duration::from_secs(1)) - 0.5).abs() < 1e-9);
        assert!((pressure(0, 5_000_000, Duration::from_secs(1)) - 1.0).abs() < 1e-9);
        assert!(pressure(10, 5, Duration::from_secs(1)).abs() < 1e-9);
        assert!(pressure(0, 5, Duration::ZERO).abs() < 1e-9);
    }

    #[test]
    fn samples_this_host() {
        let mut m = LoadMonitor::new();
        let _ = m.sample();
        let load = m.sample();
        assert!(load.runnable_per_cpu >= 0.0);
        if load.psi_some_avg10.is_some() {
            assert!(load.cpu_pressure.is_some());
        }
    }
}
