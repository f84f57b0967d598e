//! The durable ledger: an embedded SQLite database (WAL mode, file mode
//! 0600) holding every charge, every settled session, and the accruals of
//! open sessions.
//!
//! Owns persistence and export. Idempotency is in the keys: a cycle charge is
//! `<session id>:<seq>`, a settlement `<session id>:settle`, and a session
//! id carries the boot id and the socket cookie. A cycle's charges and the
//! open sessions' accruals are written in one transaction, so after a crash
//! the agent resumes from the last committed cycle: nothing charged twice,
//! nothing lost. A re-delivered close record finds its settlement already
//! there and is ignored.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};
use serde::Serialize;

use crate::billing::Accrual;

/// Why the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("ledger {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "ledger {path} was written in currency {found}, but the config says {configured}: use a new ledger file for a new currency"
    )]
    Currency {
        path: PathBuf,
        found: String,
        configured: String,
    },
}

/// One cycle charge to record.
#[derive(Debug, Clone)]
pub struct ChargeRow<'a> {
    pub session_id: &'a str,
    pub seq: u64,
    pub service: &'a str,
    pub account: &'a str,
    pub units: u64,
    pub amount_micro: u64,
    /// The session's accrual after this charge.
    pub accrual: Accrual,
}

/// A settled session, as the ledger keeps and exports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub session_id: String,
    pub service: String,
    pub account: String,
    pub content: String,
    pub protocol: String,
    pub client_addr: String,
    pub client_port: u16,
    pub server_addr: String,
    pub server_port: u16,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC.
    pub ended_at: String,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub duration_ms: u64,
    pub charge_minor: u64,
    pub currency: String,
    /// What the cycles charged, in millionths of a minor unit.
    #[serde(skip)]
    pub cycles_micro: u64,
    /// The settlement's own amount (total minus cycles), in millionths.
    #[serde(skip)]
    pub adjustment_micro: i64,
    /// Kernel `CONN_*` flags.
    #[serde(skip)]
    pub flags: u32,
}

/// What the ledger holds of one service's settled sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettledTotals {
    pub sessions: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub charge_minor: u64,
}

/// Export formats of `meterd ledger export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

/// The open ledger.
pub struct Ledger {
    path: PathBuf,
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Every amount billed: cycle charges and settlement adjustments.
CREATE TABLE IF NOT EXISTS charges (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('cycle', 'settlement')),
    service TEXT NOT NULL,
    account TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    units INTEGER NOT NULL,
    amount_micro INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_account ON charges (account);
-- What the cycles charged sessions still open; gone at settlement.
CREATE TABLE IF NOT EXISTS open_sessions (
    session_id TEXT PRIMARY KEY,
    units INTEGER NOT NULL,
    charged_micro INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    account TEXT NOT NULL,
    content TEXT NOT NULL,
    protocol TEXT NOT NULL,
    client_addr TEXT NOT NULL,
    client_port INTEGER NOT NULL,
    server_addr TEXT NOT NULL,
    server_port INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT NOT NULL,
    ended_ms INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    charge_minor INTEGER NOT NULL,
    currency TEXT NOT NULL,
    cycles_micro INTEGER NOT NULL,
    adjustment_micro INTEGER NOT NULL,
    flags INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_ended ON sessions (ended_ms);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Ledger {
    /// Opens (creating with mode 0600) the ledger for writing.
    pub fn open(path: &Path, currency: &str) -> Result<Self, LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io)?;
        }
        // Create the file ourselves so it never exists with a wider mode.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
        let conn = Connection::open(path).map_err(|source| LedgerError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let ledger = Self {
            path: path.to_owned(),
            conn,
        };
        ledger.init(currency)?;
        Ok(ledger)
    }

    /// Opens an existing ledger read-only (export, status), next to a
    /// running agent.
    pub fn open_read_only(path: &Path) -> Result<Self, LedgerError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| LedgerError::Sqlite {
                path: path.to_owned(),
                source,
            },
        )?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|source| LedgerError::Sqlite {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            conn,
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
        |source| LedgerError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn init(&self, currency: &str) -> Result<(), LedgerError> {
        // WAL + synchronous=NORMAL: a commit survives a kill of the agent
        // (it is in the WAL file), and only a power loss can take back the
        // last commits, never corrupt the database.
        self.conn
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .map_err(self.err())?;
        self.conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(self.err())?;
        self.conn.execute_batch(SCHEMA).map_err(self.err())?;
        let found: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'currency'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())?;
        match found {
            Some(found) if found != currency => Err(LedgerError::Currency {
                path: self.path.clone(),
                found,
                configured: currency.to_owned(),
            }),
            Some(_) => Ok(()),
            None => {
                self.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('currency', ?1)",
                        [currency],
                    )
                    .map_err(self.err())?;
                Ok(())
            }
        }
    }

    /// The accruals of sessions still open at the last committed cycle.
    pub fn open_accruals(&self) -> Result<HashMap<String, Accrual>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT session_id, units, charged_micro, seq FROM open_sessions")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Accrual {
                        units: to_u64(r.get(1)?),
                        charged_micro: to_u64(r.get(2)?),
                        seq: to_u64(r.get(3)?),
                    },
                ))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Records one cycle's charges and the accruals behind them, atomically.
    pub fn record_cycle(
        &mut self,
        at: SystemTime,
        charges: &[ChargeRow<'_>],
    ) -> Result<(), LedgerError> {
        if charges.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let err = |source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO charges (id, session_id, kind, service, account, at_ms, units, amount_micro)
                     VALUES (?1, ?2, 'cycle', ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(err)?;
            let mut accrue = tx
                .prepare_cached(
                    "INSERT INTO open_sessions (session_id, units, charged_micro, seq) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (session_id) DO UPDATE SET units = ?2, charged_micro = ?3, seq = ?4",
                )
                .map_err(err)?;
            let at = ms(at);
            for c in charges {
                insert
                    .execute(params![
                        format!("{}:{}", c.session_id, c.seq),
                        c.session_id,
                        c.service,
                        c.account,
                        at,
                        to_i64(c.units),
                        to_i64(c.amount_micro),
                    ])
                    .map_err(err)?;
                accrue
                    .execute(params![
                        c.session_id,
                        to_i64(c.accrual.units),
                        to_i64(c.accrual.charged_micro),
                        to_i64(c.accrual.seq),
                    ])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Records a settled session, its settlement charge, and closes its
    /// accrual, atomically. Returns false if it was settled before (a
    /// re-delivered close record): nothing is written then.
    pub fn record_settlement(
        &mut self,
        s: &SessionRecord,
        at: SystemTime,
    ) -> Result<bool, LedgerError> {
        let path = self.path.clone();
        let err = |source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let inserted = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO sessions (session_id, service, account, content, protocol, client_addr,
                 client_port, server_addr, server_port, started_at, ended_at, ended_ms, bytes_out, bytes_in,
                 duration_ms, charge_minor, currency, cycles_micro, adjustment_micro, flags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
            )
            .map_err(err)?
            .execute(params![
                s.session_id,
                s.service,
                s.account,
                s.content,
                s.protocol,
                s.client_addr,
                s.client_port,
                s.server_addr,
                s.server_port,
                s.started_at,
                s.ended_at,
                ms(at),
                to_i64(s.bytes_out),
                to_i64(s.bytes_in),
                to_i64(s.duration_ms),
                to_i64(s.charge_minor),
                s.currency,
                to_i64(s.cycles_micro),
                s.adjustment_micro,
                s.flags,
            ])
            .map_err(err)?
            == 1;
        if inserted {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO charges (id, session_id, kind, service, account, at_ms, units, amount_micro)
                 VALUES (?1, ?2, 'settlement', ?3, ?4, ?5, 0, ?6)",
            )
            .map_err(err)?
            .execute(params![
                format!("{}:settle", s.session_id),
                s.session_id,
                s.service,
                s.account,
                ms(at),
                s.adjustment_micro,
            ])
            .map_err(err)?;
            tx.prepare_cached("DELETE FROM open_sessions WHERE session_id = ?1")
                .map_err(err)?
                .execute([&s.session_id])
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(inserted)
    }

    /// Whether a session id has been settled.
    pub fn is_settled(&self, session_id: &str) -> Result<bool, LedgerError> {
        self.conn
            .query_row(
                "SELECT 1 FROM sessions WHERE session_id = ?1",
                [session_id],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(self.err())
    }

    /// Everything charged to each account so far (cycles and settlements),
    /// in millionths of a minor unit.
    pub fn spent_by_account(&self) -> Result<HashMap<String, i64>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT account, SUM(amount_micro) FROM charges GROUP BY account")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Appends an event (e.g. `limit_reached`).
    pub fn record_event(
        &self,
        at: SystemTime,
        kind: &str,
        account: &str,
        detail: &str,
    ) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT INTO events (at_ms, kind, account, detail) VALUES (?1, ?2, ?3, ?4)",
                params![ms(at), kind, account, detail],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Accounts with a recorded event of `kind`.
    pub fn accounts_with_event(&self, kind: &str) -> Result<Vec<String>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT account FROM events WHERE kind = ?1")
            .map_err(self.err())?;
        let rows = stmt.query_map([kind], |r| r.get(0)).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Settled sessions ended at or after `since`, oldest first.
    pub fn sessions(&self, since: Option<SystemTime>) -> Result<Vec<SessionRecord>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT session_id, service, account, content, protocol, client_addr, client_port, server_addr,
                 server_port, started_at, ended_at, bytes_out, bytes_in, duration_ms, charge_minor, currency,
                 cycles_micro, adjustment_micro, flags
                 FROM sessions WHERE ended_ms >= ?1 ORDER BY ended_ms, session_id",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([since.map_or(0, ms)], |r| {
                Ok(SessionRecord {
                    session_id: r.get(0)?,
                    service: r.get(1)?,
                    account: r.get(2)?,
                    content: r.get(3)?,
                    protocol: r.get(4)?,
                    client_addr: r.get(5)?,
                    client_port: r.get(6)?,
                    server_addr: r.get(7)?,
                    server_port: r.get(8)?,
                    started_at: r.get(9)?,
                    ended_at: r.get(10)?,
                    bytes_out: to_u64(r.get(11)?),
                    bytes_in: to_u64(r.get(12)?),
                    duration_ms: to_u64(r.get(13)?),
                    charge_minor: to_u64(r.get(14)?),
                    currency: r.get(15)?,
                    cycles_micro: to_u64(r.get(16)?),
                    adjustment_micro: r.get(17)?,
                    flags: r.get(18)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Per service: settled sessions, their bytes out and in, and their
    /// charges in minor units. Metrics start from these after a restart.
    pub fn service_totals(&self) -> Result<HashMap<String, SettledTotals>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT service, COUNT(*), COALESCE(SUM(bytes_out), 0), COALESCE(SUM(bytes_in), 0),
                 COALESCE(SUM(charge_minor), 0) FROM sessions GROUP BY service",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    SettledTotals {
                        sessions: to_u64(r.get(1)?),
                        bytes_out: to_u64(r.get(2)?),
                        bytes_in: to_u64(r.get(3)?),
                        charge_minor: to_u64(r.get(4)?),
                    },
                ))
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Number of events of `kind`.
    pub fn event_count(&self, kind: &str) -> Result<u64, LedgerError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM events WHERE kind = ?1", [kind], |r| {
                r.get::<_, i64>(0)
            })
            .map(to_u64)
            .map_err(self.err())
    }

    /// Reads a value saved with [`Self::save_meta`].
    pub fn load_meta(&self, key: &str) -> Result<Option<String>, LedgerError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }

    /// Saves a small value (the agent's own counters, as JSON).
    pub fn save_meta(&self, key: &str, value: &str) -> Result<(), LedgerError> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = ?2",
            )
            .and_then(|mut s| s.execute([key, value]))
            .map_err(self.err())?;
        Ok(())
    }

    /// Number of charge records and the sum of their amounts (micro).
    pub fn charge_totals(&self) -> Result<(u64, i64), LedgerError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(amount_micro), 0) FROM charges",
                [],
                |r| Ok((to_u64(r.get(0)?), r.get(1)?)),
            )
            .map_err(self.err())
    }

    /// Writes settled sessions as JSON lines or CSV (with a header).
    pub fn export(
        &self,
        since: Option<SystemTime>,
        format: ExportFormat,
        out: &mut dyn Write,
    ) -> Result<usize, LedgerError> {
        let io = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        let sessions = self.sessions(since)?;
        if format == ExportFormat::Csv {
            writeln!(out, "{}", CSV_COLUMNS.join(",")).map_err(io)?;
        }
        for s in &sessions {
            match format {
                ExportFormat::Jsonl => {
                    serde_json::to_writer(&mut *out, s).map_err(|e| io(e.into()))?;
                    writeln!(out).map_err(io)?;
                }
                ExportFormat::Csv => writeln!(out, "{}", csv_row(s)).map_err(io)?,
            }
        }
        out.flush().map_err(io)?;
        Ok(sessions.len())
    }
}

const CSV_COLUMNS: [&str; 16] = [
    "session_id",
    "service",
    "account",
    "content",
    "protocol",
    "client_addr",
    "client_port",
    "server_addr",
    "server_port",
    "started_at",
    "ended_at",
    "bytes_out",
    "bytes_in",
    "duration_ms",
    "charge_minor",
    "currency",
];

/// RFC 4180 quoting where needed.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv_row(s: &SessionRecord) -> String {
    [
        csv_field(&s.session_id),
        csv_field(&s.service),
        csv_field(&s.account),
        csv_field(&s.content),
        csv_field(&s.protocol),
        csv_field(&s.client_addr),
        s.client_port.to_string(),
        csv_field(&s.server_addr),
        s.server_port.to_string(),
        csv_field(&s.started_at),
        csv_field(&s.ended_at),
        s.bytes_out.to_string(),
        s.bytes_in.to_string(),
        s.duration_ms.to_string(),
        s.charge_minor.to_string(),
        csv_field(&s.currency),
    ]
    .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, charge: u64) -> SessionRecord {
        SessionRecord {
            session_id: id.into(),
            service: "web".into(),
            account: "acct,\"x\"".into(),
            content: String::new(),
            protocol: "tcp".into(),
            client_addr: "::1".into(),
            client_port: 40000,
            server_addr: "::1".into(),
            server_port: 8080,
            started_at: "2026-11-22T10:00:00.000Z".into(),
            ended_at: "2026-11-22T10:01:00.000Z".into(),
            bytes_out: 1000,
            bytes_in: 10,
            duration_ms: 60_000,
            charge_minor: charge,
            currency: "EUR".into(),
            cycles_micro: 3_000_000,
            adjustment_micro: i64::try_from(charge * 1_000_000).unwrap() - 3_000_000,
            flags: 0,
        }
    }

    #[test]
    fn cycles_and_settlement_are_idempotent_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let mut l = Ledger::open(&path, "EUR").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let accrual = Accrual {
            units: 3,
            charged_micro: 3_000_000,
            seq: 1,
        };
        let row = ChargeRow {
            session_id: "b-1",
            seq: 1,
            service: "web",
            account: "acct,\"x\"",
            units: 3,
            amount_micro: 3_000_000,
            accrual,
        };
        l.record_cycle(SystemTime::now(), std::slice::from_ref(&row))
            .unwrap();
        // The same cycle again (re-processing after a crash): no new charge.
        l.record_cycle(SystemTime::now(), &[row]).unwrap();
        assert_eq!(l.charge_totals().unwrap(), (1, 3_000_000));
        drop(l);

        let mut l = Ledger::open(&path, "EUR").unwrap();
        assert_eq!(l.open_accruals().unwrap().get("b-1"), Some(&accrual));
        assert!(
            l.record_settlement(&record("b-1", 5), SystemTime::now())
                .unwrap()
        );
        assert!(
            !l.record_settlement(&record("b-1", 5), SystemTime::now())
                .unwrap()
        );
        assert!(l.open_accruals().unwrap().is_empty());
        // Cycle 3.00 + settlement 2.00 = the session's 5 minor units.
        assert_eq!(l.charge_totals().unwrap(), (2, 5_000_000));
        assert_eq!(
            l.spent_by_account().unwrap().get("acct,\"x\""),
            Some(&5_000_000)
        );
        assert!(l.is_settled("b-1").unwrap());

        let mut csv = Vec::new();
        assert_eq!(l.export(None, ExportFormat::Csv, &mut csv).unwrap(), 1);
        let csv = String::from_utf8(csv).unwrap();
        assert!(csv.starts_with("session_id,service,account,"), "{csv}");
        assert!(
            csv.contains("b-1,web,\"acct,\"\"x\"\"\",,tcp,::1,40000,::1,8080,"),
            "{csv}"
        );
        let mut jsonl = Vec::new();
        l.export(None, ExportFormat::Jsonl, &mut jsonl).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&jsonl).unwrap();
        assert_eq!(v["charge_minor"], 5);
        assert_eq!(v["duration_ms"], 60_000);
        let future = SystemTime::now() + Duration::from_secs(3600);
        assert_eq!(
            l.export(Some(future), ExportFormat::Jsonl, &mut Vec::new())
                .unwrap(),
            0
        );
    }

    #[test]
    fn currency_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        drop(Ledger::open(&path, "EUR").unwrap());
        let e = Ledger::open(&path, "USD").err().unwrap().to_string();
        assert!(e.contains("EUR") && e.contains("USD"), "{e}");
    }
}
