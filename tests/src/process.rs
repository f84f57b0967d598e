//! Child processes that die with the test that started them.
//!
//! Each [`Proc`] writes stdout and stderr to a file in the test's directory
//! (so a failure can show what the process said) and is killed and reaped
//! on drop.
//!
//! Does not own: where a process runs (cgroup, namespace: `env`).

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A running child process, killed on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    /// Where stdout and stderr go.
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        Proc::spawn_split(name, cmd, None, log)
    }

    /// Starts `cmd` with stdout in `stdout` (when given, else in `log`) and
    /// stderr appended to `log`.
    pub fn spawn_split(name: &str, cmd: &mut Command, stdout: Option<&Path>, log: &Path) -> Proc {
        let mut err = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let _ = writeln!(err, "=== {cmd:?}");
        let out = match stdout {
            Some(path) => File::create(path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display())),
            None => err.try_clone().expect("clone log file handle"),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote so far.
    pub fn output(&self) -> String {
        read_lossy(&self.log)
    }

    /// The last `lines` lines of [`Proc::output`].
    pub fn output_tail(&self, lines: usize) -> String {
        tail(&self.output(), lines)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot
        // have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.name))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal(libc::SIGKILL);
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("cannot reap {}: {e}", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `done` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A file's contents, or an empty string if it does not exist yet.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates an empty file (e.g. a log a process appends to).
pub fn touch(path: &Path) {
    File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}
