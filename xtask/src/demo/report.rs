//! What the demo says at the end: per viewer, the bytes nginx logged
//! against those meterd counted, its sessions and charge; the accounts, the
//! limit events from the ledger, the packet loss and meterd's interval; and
//! the lines of the timeline.
//!
//! Does not own: collecting the data (`demo`, `play`), drawing (`timeline`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::play::Play;
use super::viewer::Viewer;
use super::{Plan, agent, origin, timeline, u64_f64};

/// What the demo read at the end, for [`Outcome::collect`].
pub(super) struct Collected {
    /// The last status (accounts' spending).
    pub(super) status: agent::Status,
    pub(super) sessions: Vec<agent::SessionRecord>,
    pub(super) connections: Vec<agent::ConnectionRecord>,
    pub(super) events: Vec<agent::LedgerEvent>,
    /// nginx's access log.
    pub(super) requests: Vec<origin::Request>,
    /// Packets nft dropped, per lossy viewer.
    pub(super) dropped: HashMap<&'static str, u64>,
    /// When the viewers were told to stop (seconds).
    pub(super) watched: f64,
    /// When the sessions had settled.
    pub(super) end: f64,
}

/// One viewer's row of the report.
#[derive(Debug)]
struct Row {
    plan: &'static Plan,
    /// Σ `$bytes_sent` of its requests.
    nginx_bytes: u64,
    /// Its requests nginx answered 403 (meterd refused them).
    refused: usize,
    /// Σ bytes out of its connection segments in the ledger.
    meterd_bytes: u64,
    /// Σ bytes out of its viewing sessions.
    billed_bytes: u64,
    /// Its viewing sessions billed to its account.
    sessions: usize,
    /// Its sessions billed to its address (bytes it moved before nginx
    /// asked meterd about its connection): how many, their bytes out and
    /// cents.
    address_sessions: (usize, u64, u64),
    charge_minor: u64,
    dropped: Option<u64>,
}

/// What the report says.
pub(super) struct Outcome {
    rows: Vec<Row>,
    pub(super) lines: Vec<timeline::Line>,
    accounts: Vec<agent::AccountStatus>,
    events: Vec<agent::LedgerEvent>,
    t0_unix_ms: i64,
    pub(super) cut_at: Option<f64>,
    watched: f64,
    interrupted: bool,
    open_sessions: usize,
    /// meterd's base interval and the widest it went, in seconds.
    interval: (f64, f64),
}

impl Outcome {
    pub(super) fn collect(viewers: &[Viewer], play: &Play, c: &Collected) -> Outcome {
        let mut rows = Vec::new();
        let mut lines = Vec::new();
        for (i, v) in viewers.iter().enumerate() {
            let addr = v.source.to_string();
            let mine: Vec<&origin::Request> =
                c.requests.iter().filter(|r| r.addr == v.source).collect();
            let sessions: Vec<&agent::SessionRecord> = c
                .sessions
                .iter()
                .filter(|s| s.client_addr == addr)
                .collect();
            let row = Row {
                plan: v.plan,
                nginx_bytes: mine.iter().map(|r| r.bytes_sent).sum(),
                refused: mine.iter().filter(|r| r.status == 403).count(),
                meterd_bytes: c
                    .connections
                    .iter()
                    .filter(|k| k.client_addr == addr)
                    .map(|k| k.bytes_out)
                    .sum(),
                billed_bytes: sessions.iter().map(|s| s.bytes_out).sum(),
                sessions: sessions
                    .iter()
                    .filter(|s| s.account == v.plan.account)
                    .count(),
                address_sessions: sessions
                    .iter()
                    .filter(|s| s.account == addr)
                    .fold((0, 0, 0), |(n, b, c), s| {
                        (n + 1, b + s.bytes_out, c + s.charge_minor)
                    }),
                charge_minor: sessions.iter().map(|s| s.charge_minor).sum(),
                dropped: c.dropped.get(v.plan.name).copied(),
            };
            let (bytes, cents) = play.series(i, &c.sessions);
            let mut line = timeline::Line {
                label: format!(
                    "{} {} {}: {}",
                    v.plan.name,
                    v.plan.account,
                    v.plan.service.name(),
                    v.plan.describe()
                ),
                bytes,
                cents,
                paused: v.paused,
                ended: v.ended,
            };
            // The settled totals, from the ledger, end each line.
            line.bytes.push((c.end, u64_f64(row.billed_bytes)));
            line.cents.push((c.end, u64_f64(row.charge_minor)));
            rows.push(row);
            lines.push(line);
        }
        let open_sessions = c.status.sessions.len();
        let base = play.samples.first().map_or(1.0, |s| s.interval.1);
        let widest = play
            .samples
            .iter()
            .map(|s| s.interval.0)
            .fold(base, f64::max);
        Outcome {
            rows,
            lines,
            accounts: c.status.accounts.clone(),
            events: c.events.clone(),
            t0_unix_ms: play.t0_unix_ms,
            cut_at: play.cut_at,
            watched: c.watched,
            interrupted: play.interrupted,
            open_sessions,
            interval: (base, widest),
        }
    }

    /// The report, as printed and written to report.txt.
    pub(super) fn report(&self, took: Duration) -> String {
        let mut out = self.viewer_table(took);
        self.account_lines(&mut out);
        let _ = writeln!(
            out,
            "\nin target/demo: report.txt, timeline.svg, sessions.csv, connections.csv, \
             access.log, meterd.toml, ledger.sqlite, nginx/, logs/"
        );
        out
    }

    /// The line per viewer: nginx's bytes against meterd's.
    fn viewer_table(&self, took: Duration) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nmeterd demo: {} viewers watched a live HLS stream for {:.0} s{}; the whole demo \
             took {:.0} s.\n",
            self.rows.len(),
            self.watched,
            if self.interrupted {
                " (ended by Ctrl-C)"
            } else {
                ""
            },
            took.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "{:<3} {:<6} {:<7} {:<37} {:>10} {:>10} {:>5} {:>4} {:>6}",
            "", "acct", "service", "player", "nginx B", "meterd B", "diff", "sess", "charge"
        );
        for r in &self.rows {
            let diff = i128::from(r.meterd_bytes) - i128::from(r.nginx_bytes);
            let _ = writeln!(
                out,
                "{:<3} {:<6} {:<7} {:<37} {:>10} {:>10} {:>5} {:>4} {:>6}",
                r.plan.name,
                r.plan.account,
                r.plan.service.name(),
                r.plan.describe(),
                r.nginx_bytes,
                r.meterd_bytes,
                diff,
                r.sessions,
                euros(r.charge_minor),
            );
        }
        let _ = writeln!(
            out,
            "nginx B: sum of $bytes_sent of the viewer's requests in access.log (by its own \
             address, 127.0.0.11-18); meterd B: sum of bytes_out of its connections in the \
             ledger; charge in EUR, settled."
        );
        let refused: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.refused > 0)
            .map(|r| {
                let unbilled = r.meterd_bytes.saturating_sub(r.billed_bytes);
                format!(
                    "{} {} requests ({unbilled} B in no session)",
                    r.plan.name, r.refused
                )
            })
            .collect();
        if !refused.is_empty() {
            let _ = writeln!(
                out,
                "refused with 403 after the cut-off, billed to nobody: {}",
                refused.join(", ")
            );
        }
        let by_address: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.address_sessions.0 > 0)
            .map(|r| {
                let (n, bytes, cents) = r.address_sessions;
                format!("{} {n} ({bytes} B out, {cents} cents)", r.plan.name)
            })
            .collect();
        if !by_address.is_empty() {
            let _ = writeln!(
                out,
                "sessions billed to the viewer's address, not its account (a request that \
                 arrived before nginx asked meterd about its connection): {}",
                by_address.join(", ")
            );
        }
        let lossy: Vec<String> = self
            .rows
            .iter()
            .filter_map(|r| Some(format!("{} {}", r.plan.name, r.dropped?)))
            .collect();
        if !lossy.is_empty() {
            let _ = writeln!(
                out,
                "packets nft dropped (retransmitted by TCP, counted once): {}",
                lossy.join(", ")
            );
        }
        out
    }

    /// The accounts and the ledger's limit events.
    fn account_lines(&self, out: &mut String) {
        let _ = writeln!(out);
        for a in &self.accounts {
            let kind = if agent::ACCOUNTS
                .iter()
                .any(|x| x.id == a.account && x.prepaid)
            {
                "prepaid"
            } else {
                "credit limit"
            };
            let _ = writeln!(
                out,
                "account {:<6} spent {} EUR of {} {kind}: {}",
                a.account,
                euros(u64::try_from(a.spent_minor).unwrap_or(0)),
                euros(a.limit_minor),
                a.standing
            );
        }
        for e in &self.events {
            let at = msf64(e.at_ms - self.t0_unix_ms) / 1000.0;
            let detail: serde_json::Value =
                serde_json::from_str(&e.detail).unwrap_or(serde_json::Value::Null);
            let what = match e.kind.as_str() {
                "limit_reached" => format!(
                    "limit reached ({} of {} cents spent): requests refused, connections cut",
                    detail["spent_minor"], detail["limit_minor"]
                ),
                "cut_off" => format!(
                    "cut off: its {} connections ended {} ms after the cut-off order, {} bytes \
                     after it",
                    detail["connections"], detail["ms_after_cut"], detail["bytes_after_cut"]
                ),
                other => other.to_owned(),
            };
            let _ = writeln!(out, "{at:5.1} s  {}: {what}", e.account);
        }
        let (base, widest) = self.interval;
        if widest > base {
            let _ = writeln!(
                out,
                "meterd's billing interval: {base:.0} s, widened up to {widest:.0} s by its load \
                 governor under CPU pressure; limits are checked once per cycle, so an account \
                 can overrun by what it uses in one interval"
            );
        } else {
            let _ = writeln!(out, "meterd's billing interval: {base:.0} s throughout");
        }
        if self.open_sessions > 0 {
            let _ = writeln!(
                out,
                "{} viewing sessions were still open at the end: their bytes are not in the \
                 ledger export",
                self.open_sessions
            );
        }
    }
}

/// Cents as euros.
fn euros(minor: u64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "milliseconds within a demo, far below 2^52"
)]
fn msf64(ms: i64) -> f64 {
    ms as f64
}
