//! The demo as it plays: the clock, the viewers' cues, nginx's access log,
//! meterd's status once a second (the timeline's samples and the cut-off),
//! and the terminal: the live table of `meterd status --watch` with the
//! demo's events under it.
//!
//! Does not own: the viewers' state machine (`viewer`), the report
//! (`report`).

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};

use super::agent::{self, Agent};
use super::origin::AccessLog;
use super::sandbox::{self, NetNs};
use super::viewer::{State, Viewer};
use super::{PLAIN_FRAME_EVERY, PLANS, SETTLE_TIMEOUT, WATCH, timeline, u64_f64};
use crate::util;

/// The demo's own output: on a terminal, the live table redrawn in place
/// with the latest events under it; otherwise the events as lines and a
/// table now and then.
pub(super) struct Screen {
    tty: bool,
    events: Vec<String>,
    /// On a terminal: how many events a table has shown.
    shown: usize,
    /// Without a terminal: when (seconds) the next table is printed.
    next_plain: f64,
}

impl Screen {
    fn event(&mut self, t: f64, text: &str) {
        let line = format!("{t:5.1} s  {text}");
        if !self.tty {
            util::note(format!("demo: {line}"));
        }
        self.events.push(line);
    }

    fn frame(&mut self, t: f64, header: &str, table: &str) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            let recent = &self.events[self.events.len().saturating_sub(8)..];
            let _ = write!(
                out,
                "\x1b[H\x1b[2J{header}\n\n{table}\nevents:\n{}\n",
                recent.join("\n")
            );
            self.shown = self.events.len();
        } else if t >= self.next_plain {
            self.next_plain = t + PLAIN_FRAME_EVERY;
            let _ = write!(out, "{header}\n{table}");
        }
        let _ = out.flush();
    }

    /// After the last table: on a terminal, the events it did not show.
    pub(super) fn finish(&mut self) {
        if self.tty {
            for line in &self.events[self.shown..] {
                util::note(format!("demo: {line}"));
            }
            self.shown = self.events.len();
        }
    }
}

/// One status poll: the open sessions' bytes and accrued cents.
#[derive(Clone, Debug)]
pub(super) struct Sample {
    pub(super) t: f64,
    open: HashMap<String, (u64, f64)>,
    /// meterd's billing interval, and its configured base, in seconds.
    pub(super) interval: (f64, f64),
}

/// The demo as it plays: the clock, the access log, the status polls.
pub(super) struct Play {
    t0: Instant,
    /// `t0` in Unix ms, to place the ledger's events on the timeline.
    pub(super) t0_unix_ms: i64,
    pub(super) screen: Screen,
    access: AccessLog,
    frames: Receiver<String>,
    /// Every session seen, and its viewer.
    owner: HashMap<String, usize>,
    pub(super) samples: Vec<Sample>,
    /// Each account's standing at the last poll.
    standing: HashMap<String, String>,
    pub(super) cut_at: Option<f64>,
    last_poll: Option<Instant>,
    /// Interrupts handled so far.
    interrupts: u32,
    /// When the viewers were told to stop.
    pub(super) stopped_at: Option<f64>,
    pub(super) interrupted: bool,
}

impl Play {
    pub(super) fn new(access_log: &Path, frames: Receiver<String>) -> Play {
        Play {
            t0: Instant::now(),
            t0_unix_ms: unix_ms(),
            screen: Screen {
                tty: std::io::stdout().is_terminal(),
                events: Vec::new(),
                shown: 0,
                next_plain: 10.0,
            },
            access: AccessLog::new(access_log),
            frames,
            owner: HashMap::new(),
            samples: Vec::new(),
            standing: HashMap::new(),
            cut_at: None,
            last_poll: None,
            interrupts: 0,
            stopped_at: None,
            interrupted: false,
        }
    }

    /// Seconds since the first viewer started.
    pub(super) fn t(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn event(&mut self, text: &str) {
        let t = self.t();
        self.screen.event(t, text);
    }

    /// Plays [`PLANS`] out: starts the viewers, gives them their cues and
    /// stops them after [`WATCH`] or at Ctrl-C.
    pub(super) fn run(
        &mut self,
        viewers: &mut [Viewer],
        netns: &NetNs,
        agent: &mut Agent,
    ) -> Result<()> {
        loop {
            let t = self.t();
            for v in viewers.iter_mut() {
                if v.state == State::Waiting && self.stopped_at.is_none() && t >= v.start_at {
                    v.start(netns)?;
                    if v.plan.name == PLANS[PLANS.len() - 1].name {
                        self.event("8 viewers are playing");
                    }
                }
            }
            for r in self.access.poll() {
                if r.is_segment()
                    // ffmpeg asks for ranges: nginx answers 206.
                    && (200..300).contains(&r.status)
                    && let Some(v) = viewers.iter_mut().find(|v| v.source == r.addr)
                {
                    v.on_segment(t);
                }
            }
            for v in viewers.iter_mut() {
                if let Some(text) = v.step(t) {
                    self.event(&text);
                }
            }
            self.tick(viewers, agent)?;
            let interrupts = sandbox::interrupts();
            if interrupts > self.interrupts {
                self.interrupts = interrupts;
                if interrupts == 1 {
                    self.interrupted = true;
                    self.event(
                        "Ctrl-C: the viewers stop now; the report follows (Ctrl-C again: at once)",
                    );
                } else {
                    for v in viewers.iter_mut() {
                        v.kill();
                    }
                }
            }
            if self.stopped_at.is_none() && (self.interrupted || t >= WATCH.as_secs_f64()) {
                self.stopped_at = Some(t);
                if !self.interrupted {
                    self.event(&format!("{} s are up: the viewers stop", WATCH.as_secs()));
                }
                for v in viewers.iter_mut() {
                    v.stop(t);
                }
            }
            if self.stopped_at.is_some() && viewers.iter().all(|v| v.state == State::Done) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until meterd has settled every viewing session.
    pub(super) fn settle(&mut self, viewers: &[Viewer], agent: &mut Agent) -> Result<()> {
        self.event(&format!(
            "waiting for the last sessions to settle ({} s after their last byte)",
            agent::SESSION_IDLE.as_secs()
        ));
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            self.tick(viewers, agent)?;
            let open = agent.status()?.sessions.len();
            if open == 0 {
                self.event("every viewing session is settled");
                return Ok(());
            }
            // A second Ctrl-C: no more waiting.
            if Instant::now() >= deadline || sandbox::interrupts() >= 2 {
                self.event(&format!(
                    "{open} sessions still open; the report shows what was settled"
                ));
                return Ok(());
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Once a second: polls the status for the timeline and the cut-off;
    /// always: shows the latest table.
    fn tick(&mut self, viewers: &[Viewer], agent: &mut Agent) -> Result<()> {
        let t = self.t();
        if self
            .last_poll
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.last_poll = Some(Instant::now());
            match agent.status() {
                Ok(status) => self.sample(t, viewers, &status),
                Err(e) if !agent.running() => bail!(
                    "meterd exited during the demo ({e:#}); see {}",
                    "target/demo/logs/meterd.log"
                ),
                // A slow answer on a loaded machine: the next poll will do.
                Err(_) => {}
            }
        }
        let mut latest = None;
        while let Ok(frame) = self.frames.try_recv() {
            latest = Some(frame);
        }
        if let Some(table) = latest {
            let playing = viewers
                .iter()
                .filter(|v| matches!(v.state, State::Playing))
                .count();
            let header = format!(
                "cargo xtask demo: {t:.0} s of {}, {playing} viewers playing. Ctrl-C ends it early. \
                 Below: meterd status --watch",
                WATCH.as_secs()
            );
            self.screen.frame(t, &header, &table);
        }
        Ok(())
    }

    /// Viewer `i`'s bytes and cents at each poll: its open sessions as
    /// the status showed them, and its settled ones (gone from the
    /// status) with the ledger's final totals, rounding included.
    pub(super) fn series(
        &self,
        i: usize,
        ledger: &[agent::SessionRecord],
    ) -> (timeline::Points, timeline::Points) {
        let settled: HashMap<&str, (u64, f64)> = ledger
            .iter()
            .map(|s| {
                (
                    s.session_id.as_str(),
                    (s.bytes_out, u64_f64(s.charge_minor)),
                )
            })
            .collect();
        let mut known: HashMap<&str, (u64, f64)> = HashMap::new();
        let (mut bytes, mut cents) = (Vec::new(), Vec::new());
        for sample in &self.samples {
            for (id, _) in self.owner.iter().filter(|(_, owner)| **owner == i) {
                if let Some(&now) = sample.open.get(id) {
                    known.insert(id, now);
                } else if known.contains_key(id.as_str())
                    && let Some(&last) = settled.get(id.as_str())
                {
                    known.insert(id, last);
                }
            }
            let total = known
                .values()
                .fold((0, 0.0), |(b, c), &(sb, sc)| (b + sb, c + sc));
            bytes.push((sample.t, u64_f64(total.0)));
            cents.push((sample.t, total.1));
        }
        (bytes, cents)
    }

    fn sample(&mut self, t: f64, viewers: &[Viewer], status: &agent::Status) {
        let mut open = HashMap::new();
        for s in &status.sessions {
            let Some(i) = viewers
                .iter()
                .position(|v| v.source.to_string() == s.client_addr)
            else {
                continue;
            };
            let cents = s.accrued_minor.parse::<f64>().unwrap_or(0.0);
            self.owner.insert(s.session_id.clone(), i);
            open.insert(s.session_id.clone(), (s.bytes_out, cents));
        }
        let interval = (
            u64_f64(status.interval_ms) / 1000.0,
            u64_f64(status.base_interval_ms) / 1000.0,
        );
        self.samples.push(Sample { t, open, interval });
        for a in &status.accounts {
            let before = self.standing.insert(a.account.clone(), a.standing.clone());
            if a.standing != "ok" && before.as_deref() == Some("ok") {
                if a.account == agent::CUT_ACCOUNT {
                    self.cut_at = Some(t);
                }
                let text = format!(
                    "{}'s balance ran out ({} of {} cents spent): meterd refuses her requests \
                     and cuts her connections in the kernel",
                    a.account, a.spent_minor, a.limit_minor
                );
                self.event(&text);
            }
        }
    }
}

fn unix_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
