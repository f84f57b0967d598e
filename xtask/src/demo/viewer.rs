//! One viewer of the demo as it plays: its ffmpeg player, in its own
//! cgroup (so the namespace's nft rules give it its address), and the cues
//! of its [`Plan`]: pause and resume, leave early, stop at the end. A cue
//! waits for the player's next segment request, so that what nginx logged
//! is what the player received when it is stopped.
//!
//! Does not own: the rules that give it its address (`nft_script` in
//! `demo`), watching the access log (`play`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::sandbox::{NetNs, Proc, in_cgroup};
use super::{AFTER_SEGMENT, CUE_PATIENCE, Cue, Plan, STAGGER, agent};

/// What a viewer is doing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum State {
    /// Not started yet.
    Waiting,
    Playing,
    /// Stopped until `resume` s.
    Paused {
        resume: f64,
    },
    /// Exited or killed.
    Done,
}

/// What the demo does to a viewer at its cue.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    Pause {
        resume: f64,
    },
    Leave,
    /// The end of the demo.
    Stop,
}

/// A viewer as it plays.
#[derive(Debug)]
pub(super) struct Viewer {
    pub(super) plan: &'static Plan,
    pub(super) source: Ipv4Addr,
    /// Its nft mark.
    pub(super) mark: u32,
    cgroup: PathBuf,
    log: PathBuf,
    pub(super) start_at: f64,
    proc: Option<Proc>,
    pub(super) state: State,
    /// Whether its cue has been taken.
    cued: bool,
    /// An action waiting for its next segment request: what, since when.
    armed: Option<(Action, f64)>,
    /// An action to take at a time.
    due: Option<(Action, f64)>,
    /// When it was paused, and resumed.
    pub(super) paused: Option<(f64, f64)>,
    /// When it left early or its player ended by itself.
    pub(super) ended: Option<f64>,
}

impl Viewer {
    pub(super) fn new(plan: &'static Plan, index: usize, cgroup: PathBuf, logs: &Path) -> Viewer {
        let n = u8::try_from(index).expect("eight viewers");
        Viewer {
            plan,
            source: Ipv4Addr::new(127, 0, 0, 11 + n),
            mark: 0x6d00_0000 | (u32::from(n) + 1),
            cgroup,
            log: logs.join(format!("{}.log", plan.name)),
            start_at: f64::from(n) * STAGGER,
            proc: None,
            state: State::Waiting,
            cued: false,
            armed: None,
            due: None,
            paused: None,
            ended: None,
        }
    }

    pub(super) fn url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/{}/{}/index.m3u8",
            self.plan.service.port(),
            self.plan.account,
            self.plan.channel
        )
    }

    /// Starts its player: ffmpeg, a real HLS client at real-time pace.
    pub(super) fn start(&mut self, netns: &NetNs) -> Result<()> {
        let mut ffmpeg = netns.exec("ffmpeg");
        ffmpeg.args([
            "-hide_banner",
            "-nostdin",
            "-nostats",
            "-loglevel",
            "warning",
        ]);
        if !self.plan.keep_alive {
            ffmpeg.args(["-http_persistent", "0"]);
        }
        ffmpeg.args(["-re", "-i", &self.url(), "-c", "copy", "-f", "null", "-"]);
        self.proc = Some(Proc::spawn(
            self.plan.name,
            &mut in_cgroup(&self.cgroup, &ffmpeg),
            &self.log,
        )?);
        self.state = State::Playing;
        Ok(())
    }

    /// One of its segment requests ended at `t`.
    pub(super) fn on_segment(&mut self, t: f64) {
        if let Some((action, _)) = self.armed.take() {
            self.due = Some((action, t + AFTER_SEGMENT));
        }
    }

    /// Arms `action` for its next segment, unless an action is pending.
    fn arm(&mut self, action: Action, t: f64) {
        if self.armed.is_none() && self.due.is_none() {
            self.armed = Some((action, t));
        }
    }

    /// Takes its cues at `t`; what happened, for the event list.
    pub(super) fn step(&mut self, t: f64) -> Option<String> {
        if matches!(self.state, State::Waiting | State::Done) {
            return None;
        }
        if let Some(status) = self.proc.as_mut().and_then(Proc::try_wait) {
            self.state = State::Done;
            self.ended = Some(t);
            let why = if self.plan.account == agent::CUT_ACCOUNT {
                "meterd cut its connection and nginx now refuses the account"
            } else {
                "unexpectedly: see its log"
            };
            return Some(format!(
                "{}'s player ended ({status}): {why}",
                self.plan.name
            ));
        }
        if !self.cued {
            match self.plan.cue {
                Cue::Leave { at } if t >= at => {
                    self.cued = true;
                    self.arm(Action::Leave, t);
                }
                Cue::Pause { at, resume } if t >= at => {
                    self.cued = true;
                    self.arm(Action::Pause { resume }, t);
                }
                _ => {}
            }
        }
        if let Some((action, since)) = self.armed
            && t - since >= CUE_PATIENCE
        {
            self.armed = None;
            self.due = Some((action, t));
        }
        if let State::Paused { resume } = self.state
            && t >= resume
        {
            self.signal(libc::SIGCONT);
            self.state = State::Playing;
            self.paused = self.paused.map(|(from, _)| (from, t));
            return Some(format!(
                "{} resumes (SIGCONT) on its open connection: a new viewing session",
                self.plan.name
            ));
        }
        let (action, at) = self.due?;
        if t < at {
            return None;
        }
        self.due = None;
        match action {
            Action::Pause { resume } => {
                self.signal(libc::SIGSTOP);
                self.state = State::Paused { resume };
                self.paused = Some((t, resume));
                Some(format!(
                    "{} pauses (SIGSTOP), its connection open: its session goes idle, and \
                     settles {} s after its last byte",
                    self.plan.name,
                    agent::SESSION_IDLE.as_secs()
                ))
            }
            Action::Leave => {
                self.kill();
                self.ended = Some(t);
                Some(format!("{} leaves early (player killed)", self.plan.name))
            }
            Action::Stop => {
                self.kill();
                None
            }
        }
    }

    /// The end of the demo: it stops after its next segment (at once if
    /// paused).
    pub(super) fn stop(&mut self, t: f64) {
        match self.state {
            State::Waiting => self.state = State::Done,
            State::Paused { .. } => self.due = Some((Action::Stop, t)),
            State::Playing if !matches!(self.due, Some((Action::Stop | Action::Leave, _))) => {
                self.armed = Some((Action::Stop, t));
                self.due = None;
            }
            State::Playing | State::Done => {}
        }
    }

    fn signal(&mut self, signal: libc::c_int) {
        if let Some(proc) = self.proc.as_mut() {
            proc.signal(signal);
        }
    }

    pub(super) fn kill(&mut self) {
        if let Some(proc) = self.proc.as_mut() {
            proc.kill();
        }
        self.state = State::Done;
    }
}
