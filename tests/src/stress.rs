//! Saturating the host's CPUs with `stress-ng`, for the load governor.
//!
//! The workers run in a cgroup of their own (`<test unique name>-stress`),
//! so that all of them, forks included, are killed when the [`Stress`] is
//! dropped, also when the test panics: a leftover CPU hog would skew every
//! later test on the machine.
//!
//! Does not own: judging what the agent does under load (the test).

use std::{
    path::Path,
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use crate::{
    cgroup::Cgroup,
    process::{Proc, wait_until},
};

/// Online CPUs of this host.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// A running `stress-ng --cpu N`.
#[derive(Debug)]
pub struct Stress {
    // Field order is drop order: the process handle first, then the cgroup,
    // whose drop kills what is left and removes it.
    proc: Proc,
    cgroup: Cgroup,
    workers: usize,
}

impl Stress {
    /// Starts `workers` CPU hogs for `duration`, in cgroup `name`; output
    /// in `log`. Returns once every worker runs, with the time it did.
    pub fn cpu(name: &str, log: &Path, workers: usize, duration: Duration) -> (Stress, Instant) {
        let cgroup = Cgroup::create(name);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(cgroup.procs_file())
            .arg("stress-ng")
            .arg(format!("--cpu={workers}"))
            .arg(format!("--timeout={}s", duration.as_secs().max(1)))
            .arg("--metrics-brief");
        let proc = Proc::spawn("stress-ng", &mut cmd, log);
        let stress = Stress {
            proc,
            cgroup,
            workers,
        };
        // stress-ng itself plus its workers.
        let running = wait_until(Duration::from_secs(10), || {
            stress.cgroup.pids().len() > stress.workers
        });
        assert!(
            running,
            "stress-ng did not start {workers} workers within 10 s; its output:\n{}",
            stress.proc.output_tail(20)
        );
        (stress, Instant::now())
    }

    /// Whether stress-ng is still running.
    pub fn running(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// Waits for stress-ng to end by itself (its `--timeout`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_timeout(timeout).unwrap_or_else(|| {
            panic!(
                "stress-ng still running after {timeout:?}; its output:\n{}",
                self.proc.output_tail(20)
            )
        })
    }

    /// Waits until no process of it is left in its cgroup.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.cgroup.pids().is_empty())
    }
}
