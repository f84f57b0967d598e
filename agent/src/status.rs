//! The status report: what `GET /v1/status` returns and `meterd status`
//! prints as a table. Read-only.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The agent's state as of the request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub version: String,
    pub currency: String,
    pub interval_ms: u64,
    pub base_interval_ms: u64,
    /// Share of the last cycle with CPU pressure (PSI some), 0..1.
    pub cpu_pressure: Option<f64>,
    pub runnable_per_cpu: f64,
    pub loadavg1_per_cpu: f64,
    pub cycles: u64,
    pub overruns: u64,
    /// TCP connections and UDP flows open now.
    pub connections_live: u64,
    /// Attributions waiting for their connection.
    pub attributions_pending: u64,
    /// Open viewing sessions.
    pub sessions: Vec<LiveSession>,
    /// Accounts with a prepaid balance or credit limit.
    #[serde(default)]
    pub accounts: Vec<AccountStatus>,
    /// The fleet link, on a host with `[fleet]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetStatus>,
}

/// Where an account with a limit stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountStatus {
    pub account: String,
    /// Prepaid balance or credit limit, with top-ups.
    pub limit_minor: u64,
    pub spent_minor: i64,
    /// `ok`, `limit_reached` (denied or cut, by policy) or `blocked`.
    pub standing: String,
}

/// How `meterd status` orders sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Bytes per second since the last refresh (then bytes).
    #[default]
    Rate,
    Bytes,
    /// Watching time.
    Time,
    Account,
}

/// A view of the report: sorted and filtered.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub sort: SortBy,
    pub account: Option<String>,
}

impl View {
    /// A view sorted by `sort`, with only `account`'s sessions if given.
    pub fn new(sort: SortBy, account: Option<String>) -> Self {
        Self { sort, account }
    }

    /// Renders `report`; with the previous report and the time since, the
    /// rate column is bytes per second over that time.
    pub fn render(
        &self,
        report: &StatusReport,
        previous: Option<(std::time::Duration, &StatusReport)>,
    ) -> String {
        let rates: std::collections::HashMap<&str, u64> = previous
            .map(|(elapsed, before)| {
                let secs = elapsed.as_secs_f64().max(0.001);
                before
                    .sessions
                    .iter()
                    .filter_map(|b| {
                        let now = report
                            .sessions
                            .iter()
                            .find(|s| s.session_id == b.session_id)?;
                        let delta = now.bytes_out.saturating_sub(b.bytes_out);
                        #[expect(
                            clippy::cast_precision_loss,
                            clippy::cast_sign_loss,
                            reason = "a display rate, not money"
                        )]
                        let rate = (delta as f64 / secs) as u64;
                        Some((b.session_id.as_str(), rate))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut sessions: Vec<&LiveSession> = report
            .sessions
            .iter()
            .filter(|s| self.account.as_ref().is_none_or(|a| &s.account == a))
            .collect();
        let rate = |s: &LiveSession| rates.get(s.session_id.as_str()).copied().unwrap_or(0);
        match self.sort {
            SortBy::Rate => sessions.sort_by_key(|s| std::cmp::Reverse((rate(s), s.bytes_out))),
            SortBy::Bytes => sessions.sort_by_key(|s| std::cmp::Reverse(s.bytes_out)),
            SortBy::Time => sessions.sort_by_key(|s| std::cmp::Reverse(s.duration_ms)),
            SortBy::Account => sessions.sort_by(|a, b| a.account.cmp(&b.account)),
        }
        render_sessions(report, &sessions, &rate)
    }
}

/// One open viewing session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveSession {
    pub session_id: String,
    pub service: String,
    pub account: String,
    pub content: String,
    /// The client address of its first connection.
    pub client_addr: String,
    /// Its connections open now.
    pub connections_open: u64,
    /// Connection segments it has had.
    pub connections: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Watching time so far: first payload to last.
    pub duration_ms: u64,
    /// Since its last payload.
    pub idle_ms: u64,
    /// `playing`, or `idle` (no payload for half its `session_idle`).
    pub state: String,
    /// Charged by cycles so far, minor units, exact decimal.
    pub accrued_minor: String,
}

/// Millionths of a minor unit as an exact decimal string.
pub fn micro_to_decimal(micro: u64) -> String {
    let (int, frac) = (micro / 1_000_000, micro % 1_000_000);
    if frac == 0 {
        int.to_string()
    } else {
        format!("{int}.{}", format!("{frac:06}").trim_end_matches('0'))
    }
}

/// Renders the report for a terminal, sessions by rate.
pub fn render(report: &StatusReport) -> String {
    View::default().render(report, None)
}

fn balance(report: &StatusReport, account: &str) -> String {
    report
        .accounts
        .iter()
        .find(|a| a.account == account)
        .map_or_else(
            || "-".to_owned(),
            |a| {
                let left = i128::from(a.limit_minor) - i128::from(a.spent_minor);
                format!("{left} {} minor", report.currency)
            },
        )
}

/// The fleet link in one line.
fn fleet_line(f: &crate::fleet::FleetStatus) -> String {
    format!(
        "fleet: {}, outbox {} pending (oldest {:.1} s), view {}",
        if f.connected {
            "connected"
        } else {
            "NOT CONNECTED (limits use the last fleet view)"
        },
        f.outbox_pending,
        f.outbox_oldest_seconds,
        f.view_age_seconds
            .map_or_else(|| "never confirmed".to_owned(), |a| format!("{a:.1} s old")),
    )
}

fn render_sessions(
    report: &StatusReport,
    sessions: &[&LiveSession],
    rate: &dyn Fn(&LiveSession) -> u64,
) -> String {
    let mut out = String::new();
    let pressure = report
        .cpu_pressure
        .map_or_else(|| "n/a".to_owned(), |p| format!("{:.0}%", p * 100.0));
    let _ = writeln!(
        out,
        "meterd {}  interval {} ms (base {} ms)  cpu pressure {}  runnable/cpu {:.2}  load1/cpu {:.2}  cycles {}  overruns {}",
        report.version,
        report.interval_ms,
        report.base_interval_ms,
        pressure,
        report.runnable_per_cpu,
        report.loadavg1_per_cpu,
        report.cycles,
        report.overruns
    );
    let _ = writeln!(
        out,
        "{} viewing sessions, {} connections, {} attributions pending",
        report.sessions.len(),
        report.connections_live,
        report.attributions_pending
    );
    if let Some(f) = &report.fleet {
        let _ = writeln!(out, "{}", fleet_line(f));
    }
    for a in &report.accounts {
        let _ = writeln!(
            out,
            "account {}: spent {} of {} ({} minor units), {}",
            a.account, a.spent_minor, a.limit_minor, report.currency, a.standing
        );
    }
    if sessions.is_empty() {
        return out;
    }
    let header = [
        "SESSION",
        "SERVICE",
        "ACCOUNT",
        "CLIENT",
        "STATE",
        "CONNS",
        "RATE B/S",
        "BYTES OUT",
        "BYTES IN",
        "SECONDS",
        "ACCRUED",
        "BALANCE",
    ];
    let rows: Vec<[String; 12]> = sessions
        .iter()
        .map(|s| {
            [
                s.session_id.clone(),
                s.service.clone(),
                s.account.clone(),
                s.client_addr.clone(),
                s.state.clone(),
                s.connections_open.to_string(),
                rate(s).to_string(),
                s.bytes_out.to_string(),
                s.bytes_in.to_string(),
                format!(
                    "{:.1}",
                    f64::from(u32::try_from(s.duration_ms / 100).unwrap_or(u32::MAX)) / 10.0
                ),
                format!("{} {} minor", s.accrued_minor, report.currency),
                balance(report, &s.account),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i >= 5 {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(out, "{}", line(&header.map(str::to_owned)));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact() {
        assert_eq!(micro_to_decimal(7_500_000), "7.5");
        assert_eq!(micro_to_decimal(3_000_000), "3");
        assert_eq!(micro_to_decimal(1), "0.000001");
    }

    #[test]
    fn table_lists_sessions() {
        let report = StatusReport {
            version: "0.1.0".into(),
            currency: "EUR".into(),
            interval_ms: 2000,
            base_interval_ms: 1000,
            sessions: vec![LiveSession {
                session_id: "b-1".into(),
                service: "web".into(),
                account: "alice".into(),
                client_addr: "127.0.0.1".into(),
                state: "playing".into(),
                bytes_out: 123_456,
                duration_ms: 61_234,
                accrued_minor: "7.5".into(),
                ..LiveSession::default()
            }],
            ..StatusReport::default()
        };
        let text = render(&report);
        assert!(text.contains("interval 2000 ms (base 1000 ms)"), "{text}");
        assert!(text.contains("alice"), "{text}");
        assert!(text.contains("123456"), "{text}");
        assert!(text.contains("61.2"), "{text}");
        assert!(text.contains("7.5 EUR minor"), "{text}");
    }
}
