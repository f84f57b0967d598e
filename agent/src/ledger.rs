//! The durable ledger: an embedded SQLite database (WAL mode, file mode
//! 0600) holding every viewing session (open ones with their accruals,
//! settled ones with their charge), every connection segment that fed them
//! (open ones for a restart, ended ones for audit and disputes), every
//! charge and every event.
//!
//! Owns persistence and export. Everything the billing core stages for one
//! step is written in one transaction ([`Ledger::commit`]), and only a
//! successful commit yields the [`Committed`] proof that lets the kernel
//! side release a ring record. Idempotency is in the keys: a session id is
//! derived from the kernel identity of the segment that opened it, a cycle
//! charge is `<session id>:<seq>`, a settlement `<session id>:settle`, and
//! rows are only ever moved forward from `open`. After a crash the agent
//! resumes from the last commit: nothing charged twice, nothing lost.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};
use serde::Serialize;

use crate::{
    billing::Accrual,
    clock,
    core::{Batch, Protocol, SegmentRow, ViewerRow},
    fleet::{outbox, record::Kind},
    hooks::{LimitReached, Target},
    tariff::Tariff,
};

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
        "ledger {path} was deleted or replaced while meterd was writing it: nothing more is committed to the old file; restore it (or start meterd again on a new one)"
    )]
    Gone { path: PathBuf },
    #[error(
        "ledger {path} was written in currency {found}, but the config says {configured}: use a new ledger file for a new currency"
    )]
    Currency {
        path: PathBuf,
        found: String,
        configured: String,
    },
}

/// Proof that a batch is in the ledger for good. Only [`Ledger::commit`]
/// makes one, and releasing a kernel record takes one: a record cannot be
/// released before what it carries is committed.
#[derive(Debug)]
pub struct Committed(());

/// What a restarted agent picks up.
#[derive(Debug, Default)]
pub struct Open {
    pub viewers: Vec<ViewerRow>,
    pub segments: Vec<SegmentRow>,
    /// Ended segments the agent had not given a session yet.
    pub orphans: Vec<SegmentRow>,
}

/// A settled viewing session, as `meterd ledger export` writes it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub session_id: String,
    pub service: String,
    pub account: String,
    pub content: String,
    pub client_addr: String,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC: `started_at` plus the billed watching time.
    pub ended_at: String,
    /// Billed watching time: first payload to last.
    pub duration_ms: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Connection segments it had.
    pub connections: u64,
    pub charge_minor: u64,
    pub currency: String,
}

/// One ended connection segment, as `meterd ledger export --connections`
/// writes it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnectionRecord {
    /// The connection's id, `/<n>` after its first segment.
    pub connection_id: String,
    /// The viewing session it fed; empty if it never moved a payload byte.
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
    /// RFC 3339 UTC: the close, or the last payload before a gap.
    pub ended_at: String,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub duration_ms: u64,
}

/// What the ledger holds of one service, for metrics that continue across
/// restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettledTotals {
    /// Settled viewing sessions and their charges.
    pub viewers: u64,
    pub charge_minor: u64,
    /// Closed connections, and the bytes of every ended segment.
    pub connections: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
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
    currency: String,
    /// The file as opened, to notice it being deleted or replaced: SQLite
    /// would go on writing to an unlinked file, and every commit after
    /// that would be lost with it.
    file: Option<fs::File>,
    /// Where limit events are delivered (`hook`, `webhook`).
    targets: Vec<Target>,
    /// With a `[fleet]`: what goes into the fleet outbox, and the interim
    /// period each open session's last interim record was for.
    fleet: Option<(outbox::Policy, HashMap<String, i64>)>,
}

pub use crate::hooks::Delivery;

/// Checkpoints the ledger's WAL into the database from a thread and a
/// connection of its own, every `interval`, so that the run loop never
/// waits for the fsyncs a checkpoint makes. PASSIVE: it copies what no
/// reader still needs and never blocks the writer; SQLite restarts the WAL
/// from its beginning at the first commit after a complete checkpoint, so
/// the WAL stays as large as `interval` of commits. Stops when dropped.
pub struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the ledger at `path` every `interval`.
    pub fn spawn(path: &Path, interval: Duration) -> Result<Self, LedgerError> {
        let err = |source| LedgerError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("meterd-checkpoint".into())
            .spawn(move || {
                let mut failing = false;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        r.get::<_, i64>(0)
                    });
                    match (result, failing) {
                        (Ok(_), true) => {
                            failing = false;
                            tracing::info!(ledger = %shown, "WAL checkpoints work again");
                        }
                        (Err(e), false) => {
                            failing = true;
                            tracing::warn!(ledger = %shown, error = %e, "WAL checkpoint failed; the WAL grows until one succeeds");
                        }
                        (Ok(_), false) | (Err(_), true) => {}
                    }
                }
            })
            .map_err(|source| LedgerError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Viewing sessions: open ones with their accrual (the cycles' charges so
-- far: units, charged_micro and the seq of the last one; a restart resumes
-- them), settled ones with their charge (cycles_micro + adjustment_micro =
-- charge_minor in millionths). Every amount billed is here: ledgers of
-- older versions also have a `charges` table, a row per charge, kept as it
-- was and no longer written. first_ns/last_ns are kernel boot-time ns.
CREATE TABLE IF NOT EXISTS viewer_sessions (
    session_id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'settled')),
    service TEXT NOT NULL,
    tariff TEXT NOT NULL,
    account TEXT NOT NULL,
    content TEXT NOT NULL,
    attributed INTEGER NOT NULL,
    client_addr TEXT NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    bytes_out INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    connections INTEGER NOT NULL,
    units INTEGER NOT NULL,
    charged_micro INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    duration_ms INTEGER,
    charge_minor INTEGER,
    currency TEXT NOT NULL,
    cycles_micro INTEGER,
    adjustment_micro INTEGER
);
CREATE INDEX IF NOT EXISTS viewer_sessions_open ON viewer_sessions (state) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS viewer_sessions_ended ON viewer_sessions (ended_ms);
-- Connection segments: the part of a connection's bytes that fed one
-- session. Open ones are picked up by a restart; ended ones are the audit
-- trail of what each session was made of.
CREATE TABLE IF NOT EXISTS connections (
    connection_id TEXT PRIMARY KEY,
    conn_id TEXT NOT NULL,
    seg INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'ended')),
    closes_conn INTEGER NOT NULL,
    service TEXT NOT NULL,
    account TEXT,
    content TEXT,
    denied INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    client_addr TEXT NOT NULL,
    client_port INTEGER NOT NULL,
    server_addr TEXT NOT NULL,
    server_port INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    base_out INTEGER NOT NULL,
    base_in INTEGER NOT NULL,
    counts_out INTEGER NOT NULL,
    counts_in INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    flags INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS connections_conn ON connections (conn_id);
CREATE INDEX IF NOT EXISTS connections_open ON connections (state) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS connections_ended ON connections (ended_ms);
-- Events (limit_reached, cut_off, credited), each with an idempotent id.
CREATE TABLE IF NOT EXISTS ledger_events (
    event_id TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    detail TEXT NOT NULL
);
-- The outbox of event deliveries to hooks and webhooks: written with the
-- event, retried until acknowledged.
CREATE TABLE IF NOT EXISTS deliveries (
    event_id TEXT NOT NULL,
    target TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    last_error TEXT,
    PRIMARY KEY (event_id, target)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at_ms) WHERE delivered_ms IS NULL;
-- Prepaid top-ups, idempotent by the caller's id.
CREATE TABLE IF NOT EXISTS credits (
    credit_id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
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

fn rfc3339_ms(unix_ms: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0)))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Wall-clock ms of a kernel boot-time timestamp.
fn wall_ms(boot_ns: u64) -> i64 {
    ms(clock::wall_time(boot_ns))
}

impl Ledger {
    /// Opens (creating with mode 0600) the ledger for writing.
    pub fn open(path: &Path, currency: &str) -> Result<Self, LedgerError> {
        let io = |source| LedgerError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            tracing::info!(dir = %dir.display(), "creating the ledger's directory (mode 0700)");
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        // Create the file ourselves so it never exists with a wider mode.
        let file = fs::OpenOptions::new()
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
            currency: currency.to_owned(),
            file: Some(file),
            targets: Vec::new(),
            fleet: None,
        };
        ledger.init(currency)?;
        Ok(ledger)
    }

    /// Opens an existing ledger read-only (export, status), next to a
    /// running agent.
    pub fn open_read_only(path: &Path) -> Result<Self, LedgerError> {
        let err = |source| LedgerError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            conn,
            currency: String::new(),
            file: None,
            targets: Vec::new(),
            fleet: None,
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
        // commits since the last checkpoint, never corrupt the database.
        // No automatic checkpoint on this (the run loop's) connection: a
        // checkpoint fsyncs the WAL and the database, which stalled the
        // loop and every API request behind it for milliseconds every ~90
        // commits. A [`Checkpointer`] does it from its own connection and
        // thread instead; the size limit truncates the WAL file after a
        // burst once it is reset.
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                 PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;",
            )
            .map_err(self.err())?;
        self.conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(self.err())?;
        self.conn.execute_batch(SCHEMA).map_err(self.err())?;
        self.conn
            .execute_batch(outbox::SCHEMA)
            .map_err(self.err())?;
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

    /// The open viewing sessions, the open connection segments, and the
    /// ended segments still waiting for a session, for a restarted agent.
    pub fn load_open(&self) -> Result<Open, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT session_id, service, tariff, account, content, attributed, client_addr,
                 first_ns, last_ns, bytes_out, bytes_in, connections, units, charged_micro, seq,
                 started_ms FROM viewer_sessions WHERE state = 'open'",
            )
            .map_err(self.err())?;
        let viewers = stmt
            .query_map([], |r| {
                let tariff: String = r.get(2)?;
                Ok(ViewerRow {
                    id: r.get(0)?,
                    service: r.get(1)?,
                    tariff: serde_json::from_str::<Tariff>(&tariff).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                    account: r.get(3)?,
                    content: r.get(4)?,
                    attributed: r.get(5)?,
                    client_addr: r.get(6)?,
                    first_ns: to_u64(r.get(7)?),
                    last_ns: to_u64(r.get(8)?),
                    bytes_out: to_u64(r.get(9)?),
                    bytes_in: to_u64(r.get(10)?),
                    connections: r.get(11)?,
                    accrual: Accrual {
                        units: to_u64(r.get(12)?),
                        charged_micro: to_u64(r.get(13)?),
                        seq: to_u64(r.get(14)?),
                    },
                    started_ms: Some(r.get(15)?),
                })
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let segments = self.segments("state = 'open'")?;
        let orphans = self.segments(
            "state = 'ended' AND session_id = '' AND denied = 0
             AND (counts_out > base_out OR counts_in > base_in)",
        )?;
        Ok(Open {
            viewers,
            segments,
            orphans,
        })
    }

    fn segments(&self, filter: &str) -> Result<Vec<SegmentRow>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT connection_id, conn_id, seg, session_id, service, account, content,
                 protocol, client_addr, client_port, server_addr, server_port, start_ns, last_ns,
                 base_out, base_in, counts_out, counts_in, flags, denied, state, end_ns
                 FROM connections WHERE {filter}"
            ))
            .map_err(self.err())?;
        stmt.query_map([], |r| {
            let ip = |i: usize| -> rusqlite::Result<std::net::IpAddr> {
                let text: String = r.get(i)?;
                text.parse().map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        i,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })
            };
            let protocol: String = r.get(7)?;
            Ok(SegmentRow {
                id: r.get(0)?,
                conn_id: r.get(1)?,
                n: r.get(2)?,
                session_id: r.get(3)?,
                open: r.get::<_, String>(20)? == "open",
                service: r.get(4)?,
                account: r.get(5)?,
                content: r.get(6)?,
                protocol: if protocol == "udp" {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                client: SocketAddr::new(ip(8)?, r.get(9)?),
                server: SocketAddr::new(ip(10)?, r.get(11)?),
                start_ns: to_u64(r.get(12)?),
                end_ns: to_u64(r.get(21)?),
                base: meterd_common::Counts {
                    bytes_out: to_u64(r.get(14)?),
                    bytes_in: to_u64(r.get(15)?),
                    last_ns: 0,
                },
                counts: meterd_common::Counts {
                    bytes_out: to_u64(r.get(16)?),
                    bytes_in: to_u64(r.get(17)?),
                    last_ns: to_u64(r.get(13)?),
                },
                flags: r.get(18)?,
                denied: r.get(19)?,
                closes_conn: false,
                restaged: false,
            })
        })
        .map_err(self.err())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(self.err())
    }

    /// Fails if the ledger file was deleted or replaced since it was
    /// opened (its inode is no longer the one at the path, or it has no
    /// links left).
    pub fn check_file(&self) -> Result<(), LedgerError> {
        use std::os::unix::fs::MetadataExt as _;
        let Some(file) = &self.file else {
            return Ok(());
        };
        let gone = || LedgerError::Gone {
            path: self.path.clone(),
        };
        let open = file.metadata().map_err(|_| gone())?;
        let at_path = fs::metadata(&self.path).map_err(|_| gone())?;
        if open.nlink() == 0 || open.ino() != at_path.ino() || open.dev() != at_path.dev() {
            return Err(gone());
        }
        Ok(())
    }

    /// Writes everything in `batch` in one transaction.
    pub fn commit(&mut self, batch: &Batch) -> Result<Committed, LedgerError> {
        self.check_file()?;
        let path = self.path.clone();
        let err = |source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        };
        let at = ms(SystemTime::now());
        let tx = self.conn.transaction().map_err(err)?;
        write_viewers(&tx, batch, &self.currency).map_err(err)?;
        write_settlements(&tx, batch).map_err(err)?;
        write_segments(&tx, batch).map_err(err)?;
        write_events(&tx, batch, at, &self.currency, &self.targets).map_err(err)?;
        if let Some((policy, interims)) = &mut self.fleet {
            write_outbox(&tx, batch, at, &self.currency, policy, interims).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Committed(()))
    }

    /// From now on, every commit also stages the fleet's records in the
    /// outbox. The first time for this host, settled sessions already in
    /// the ledger are staged too, so the fleet can be rebuilt from it.
    pub fn set_fleet(&mut self, policy: outbox::Policy) -> Result<usize, LedgerError> {
        let key = format!("fleet_backfilled:{}", policy.host);
        let mut staged = 0;
        if self.load_meta(&key)?.is_none() {
            let at = ms(SystemTime::now());
            let path = self.path.clone();
            let err = |source| LedgerError::Sqlite {
                path: path.clone(),
                source,
            };
            let tx = self.conn.transaction().map_err(err)?;
            {
                // Row by row: a ledger of millions of sessions is never
                // held in memory.
                let mut settled = tx
                    .prepare(&format!(
                        "SELECT {SESSION_FIELDS} FROM viewer_sessions WHERE state = 'settled'
                         ORDER BY ended_ms, session_id"
                    ))
                    .map_err(err)?;
                let mut rows = settled.query([]).map_err(err)?;
                while let Some(row) = rows.next().map_err(err)? {
                    let s = session_record(row).map_err(err)?;
                    let record = serde_json::to_value(&s).unwrap_or_default();
                    outbox::stage(&tx, &policy.host, Kind::Session, &s.session_id, record, at)
                        .map_err(err)?;
                    staged += 1;
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, '1')",
                [&key],
            )
            .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        self.fleet = Some((policy, HashMap::new()));
        Ok(staged)
    }

    /// Where limit events are delivered from now on.
    pub fn set_delivery_targets(&mut self, targets: Vec<Target>) {
        self.targets = targets;
    }

    /// Records a top-up; `false` if `credit_id` was recorded before (then
    /// nothing changes).
    pub fn record_credit(
        &mut self,
        credit_id: &str,
        account: &str,
        amount_minor: u64,
    ) -> Result<(bool, Committed), LedgerError> {
        self.check_file()?;
        let at = ms(SystemTime::now());
        let path = self.path.clone();
        let err = |source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let inserted = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO credits (credit_id, account, amount_minor, at_ms)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![credit_id, account, to_i64(amount_minor), at]))
            .map_err(err)?
            == 1;
        if inserted {
            let detail = serde_json::json!({
                "event": "credited",
                "credit_id": credit_id,
                "account": account,
                "amount_minor": amount_minor,
            });
            tx.execute(
                "INSERT OR IGNORE INTO ledger_events (event_id, at_ms, kind, account, detail)
                 VALUES (?1, ?2, 'credited', ?3, ?4)",
                params![
                    format!("credit:{credit_id}"),
                    at,
                    account,
                    detail.to_string()
                ],
            )
            .map_err(err)?;
            if let Some((policy, _)) = &self.fleet {
                let mut record = detail;
                record["at"] = rfc3339_ms(at).into();
                outbox::stage(&tx, &policy.host, Kind::Credit, credit_id, record, at)
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok((inserted, Committed(())))
    }

    /// Top-ups per account, minor units.
    pub fn credits_by_account(&self) -> Result<HashMap<String, u64>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT account, SUM(amount_minor) FROM credits GROUP BY account")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, to_u64(r.get(1)?))))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Deliveries due at `now`, oldest first, at most `max`.
    pub fn due_deliveries(
        &self,
        now: SystemTime,
        max: usize,
    ) -> Result<Vec<Delivery>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT event_id, target, payload, attempts FROM deliveries
                 WHERE delivered_ms IS NULL AND next_at_ms <= ?1 ORDER BY next_at_ms LIMIT ?2",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![ms(now), to_i64(max as u64)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                ))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (event_id, target, payload, attempts) = row.map_err(self.err())?;
            let (Some(target), Ok(event)) =
                (Target::parse(&target), serde_json::from_str(&payload))
            else {
                tracing::error!(
                    event_id,
                    target,
                    "unreadable delivery in the outbox: skipped"
                );
                continue;
            };
            out.push(Delivery {
                event_id,
                target,
                event,
                attempts,
            });
        }
        Ok(out)
    }

    /// Records a delivery attempt: acknowledged, or to try again at `next`.
    pub fn delivery_done(
        &self,
        event_id: &str,
        target: Target,
        outcome: &Result<(), String>,
        next: SystemTime,
    ) -> Result<(), LedgerError> {
        let now = ms(SystemTime::now());
        let (sql, error) = match outcome {
            Ok(()) => (
                "UPDATE deliveries SET attempts = attempts + 1, delivered_ms = ?3, last_error = NULL
                 WHERE event_id = ?1 AND target = ?2",
                None,
            ),
            Err(e) => (
                "UPDATE deliveries SET attempts = attempts + 1, next_at_ms = ?4, last_error = ?5
                 WHERE event_id = ?1 AND target = ?2",
                Some(e.as_str()),
            ),
        };
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| {
                if error.is_some() {
                    s.execute(params![event_id, target.as_str(), now, ms(next), error])
                } else {
                    s.execute(params![event_id, target.as_str(), now])
                }
            })
            .map_err(self.err())?;
        Ok(())
    }

    /// Deliveries not acknowledged yet, and failed attempts so far.
    pub fn delivery_stats(&self) -> Result<(u64, u64), LedgerError> {
        self.conn
            .prepare_cached(
                "SELECT COALESCE(SUM(delivered_ms IS NULL), 0),
                 COALESCE(SUM(attempts - (delivered_ms IS NOT NULL)), 0) FROM deliveries",
            )
            .and_then(|mut s| {
                s.query_row([], |r| {
                    Ok((to_u64(r.get::<_, i64>(0)?), to_u64(r.get::<_, i64>(1)?)))
                })
            })
            .map_err(self.err())
    }

    /// Proof that the connection `conn_id`'s close is committed, if it is:
    /// a record for it re-delivered after a crash is billed already.
    pub fn connection_committed(&self, conn_id: &str) -> Result<Option<Committed>, LedgerError> {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM connections WHERE conn_id = ?1 AND closes_conn = 1 LIMIT 1",
            )
            .and_then(|mut s| s.query_row([conn_id], |_| Ok(())).optional())
            .map(|r| r.map(|()| Committed(())))
            .map_err(self.err())
    }

    /// Everything charged to each account so far (open sessions' cycles,
    /// settled sessions' charges), in millionths of a minor unit. A ledger
    /// of an older version may also have charges of sessions it has no
    /// row for (before sessions had rows): those count too.
    pub fn spent_by_account(&self) -> Result<HashMap<String, i64>, LedgerError> {
        let legacy: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'charges')",
                [],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        let sessions = "SELECT account, CASE state WHEN 'open' THEN charged_micro
             ELSE COALESCE(cycles_micro + adjustment_micro, charge_minor * 1000000) END AS micro
             FROM viewer_sessions";
        let sql = if legacy {
            format!(
                "SELECT account, SUM(micro) FROM ({sessions} UNION ALL
                 SELECT account, amount_micro FROM charges
                 WHERE session_id NOT IN (SELECT session_id FROM viewer_sessions))
                 GROUP BY account"
            )
        } else {
            format!("SELECT account, SUM(micro) FROM ({sessions}) GROUP BY account")
        };
        let mut stmt = self.conn.prepare(&sql).map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// The details of every event of `kind`, oldest first.
    pub fn events(&self, kind: &str) -> Result<Vec<serde_json::Value>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare("SELECT detail FROM ledger_events WHERE kind = ?1 ORDER BY at_ms, event_id")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([kind], |r| r.get::<_, String>(0))
            .map_err(self.err())?;
        rows.map(|r| r.map(|d| serde_json::from_str(&d).unwrap_or(serde_json::Value::String(d))))
            .collect::<Result<_, _>>()
            .map_err(self.err())
    }

    /// Settled viewing sessions ended at or after `since`, oldest first.
    pub fn sessions(&self, since: Option<SystemTime>) -> Result<Vec<SessionRecord>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {SESSION_FIELDS} FROM viewer_sessions
                 WHERE state = 'settled' AND ended_ms >= ?1 ORDER BY ended_ms, session_id"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map([since.map_or(0, ms)], session_record)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Ended connection segments ended at or after `since`, oldest first.
    pub fn connections(
        &self,
        since: Option<SystemTime>,
    ) -> Result<Vec<ConnectionRecord>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT c.connection_id, c.session_id, c.service,
                 COALESCE(c.account, v.account, c.client_addr), COALESCE(c.content, v.content, ''),
                 c.protocol, c.client_addr, c.client_port, c.server_addr, c.server_port,
                 c.started_ms, c.ended_ms, c.counts_out - c.base_out, c.counts_in - c.base_in,
                 (c.end_ns - c.start_ns) / 1000000
                 FROM connections c LEFT JOIN viewer_sessions v ON v.session_id = c.session_id
                 WHERE c.state = 'ended' AND c.ended_ms >= ?1 ORDER BY c.ended_ms, c.connection_id",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([since.map_or(0, ms)], |r| {
                Ok(ConnectionRecord {
                    connection_id: r.get(0)?,
                    session_id: r.get(1)?,
                    service: r.get(2)?,
                    account: r.get(3)?,
                    content: r.get(4)?,
                    protocol: r.get(5)?,
                    client_addr: r.get(6)?,
                    client_port: r.get(7)?,
                    server_addr: r.get(8)?,
                    server_port: r.get(9)?,
                    started_at: rfc3339_ms(r.get(10)?),
                    ended_at: rfc3339_ms(r.get(11)?),
                    bytes_out: to_u64(r.get(12)?),
                    bytes_in: to_u64(r.get(13)?),
                    duration_ms: to_u64(r.get(14)?),
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Per service: settled sessions and their charges, closed connections
    /// and the bytes of every ended segment. Metrics start from these
    /// after a restart.
    pub fn service_totals(&self) -> Result<HashMap<String, SettledTotals>, LedgerError> {
        let mut totals: HashMap<String, SettledTotals> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT service, COUNT(*), COALESCE(SUM(charge_minor), 0) FROM viewer_sessions
                 WHERE state = 'settled' GROUP BY service",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(self.err())?;
        for row in rows {
            let (service, n, charge) = row.map_err(self.err())?;
            let t = totals.entry(service).or_default();
            t.viewers = to_u64(n);
            t.charge_minor = to_u64(charge);
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT service, COALESCE(SUM(closes_conn), 0),
                 COALESCE(SUM(counts_out - base_out), 0), COALESCE(SUM(counts_in - base_in), 0)
                 FROM connections WHERE state = 'ended' GROUP BY service",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(self.err())?;
        for row in rows {
            let (service, n, out, inb) = row.map_err(self.err())?;
            let t = totals.entry(service).or_default();
            t.connections = to_u64(n);
            t.bytes_out = to_u64(out);
            t.bytes_in = to_u64(inb);
        }
        Ok(totals)
    }

    /// Number of events of `kind`.
    pub fn event_count(&self, kind: &str) -> Result<u64, LedgerError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM ledger_events WHERE kind = ?1",
                [kind],
                |r| r.get::<_, i64>(0),
            )
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

    /// Writes settled viewing sessions (or, with `connections`, ended
    /// connection segments) as JSON lines or CSV (with a header); returns
    /// how many.
    pub fn export(
        &self,
        since: Option<SystemTime>,
        format: ExportFormat,
        connections: bool,
        out: &mut dyn Write,
    ) -> Result<usize, LedgerError> {
        if connections {
            write_records(&self.connections(since)?, &CONNECTION_COLUMNS, format, out)
        } else {
            write_records(&self.sessions(since)?, &SESSION_COLUMNS, format, out)
        }
        .map_err(|source| LedgerError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// The columns [`session_record`] reads.
const SESSION_FIELDS: &str = "session_id, service, account, content, client_addr, started_ms,
    ended_ms, duration_ms, bytes_out, bytes_in, connections, charge_minor, currency";

/// A settled session's row as the export writes it.
fn session_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        session_id: r.get(0)?,
        service: r.get(1)?,
        account: r.get(2)?,
        content: r.get(3)?,
        client_addr: r.get(4)?,
        started_at: rfc3339_ms(r.get(5)?),
        ended_at: rfc3339_ms(r.get(6)?),
        duration_ms: to_u64(r.get(7)?),
        bytes_out: to_u64(r.get(8)?),
        bytes_in: to_u64(r.get(9)?),
        connections: to_u64(r.get(10)?),
        charge_minor: to_u64(r.get(11)?),
        currency: r.get(12)?,
    })
}

/// The fleet's records of a batch, staged in its transaction: settled
/// sessions exactly as the export writes them (read back from the rows
/// just settled), limit events, and an interim record of each open
/// session once per `interim_interval`.
fn write_outbox(
    tx: &rusqlite::Transaction<'_>,
    batch: &Batch,
    at: i64,
    currency: &str,
    policy: &outbox::Policy,
    interims: &mut HashMap<String, i64>,
) -> rusqlite::Result<()> {
    let host = policy.host.as_str();
    if !batch.settled.is_empty() {
        let mut row = tx.prepare_cached(&format!(
            "SELECT {SESSION_FIELDS} FROM viewer_sessions WHERE session_id = ?1 AND state = 'settled'"
        ))?;
        for s in &batch.settled {
            interims.remove(&s.row.id);
            if let Some(record) = row.query_row([&s.row.id], session_record).optional()? {
                let value = serde_json::to_value(&record).unwrap_or_default();
                outbox::stage(tx, host, Kind::Session, &s.row.id, value, at)?;
            }
        }
    }
    for e in &batch.limits {
        let id = format!("{}:{}", e.account, e.limit_minor);
        let record = serde_json::json!({
            "account": e.account,
            "spent_minor": e.spent_minor,
            "limit_minor": e.limit_minor,
            "currency": currency,
            "policy": format!("{:?}", e.policy).to_lowercase(),
            "at": rfc3339_ms(at),
        });
        outbox::stage(tx, host, Kind::Limit, &id, record, at)?;
    }
    for v in &batch.viewers {
        let started = v.started_ms.unwrap_or_else(|| wall_ms(v.first_ns));
        let Some(k) = outbox::interim_period(started, at, policy.interim_ms) else {
            continue;
        };
        if interims.get(&v.id) == Some(&k) {
            continue;
        }
        interims.insert(v.id.clone(), k);
        let record = serde_json::json!({
            "session_id": v.id,
            "service": v.service,
            "account": v.account,
            "content": v.content,
            "client_addr": v.client_addr,
            "started_at": rfc3339_ms(started),
            "at": rfc3339_ms(at),
            "bytes_out": v.bytes_out,
            "bytes_in": v.bytes_in,
            "connections": v.connections,
            "units": v.accrual.units,
            "charged_micro": v.accrual.charged_micro,
            "seq": v.accrual.seq,
            "currency": currency,
        });
        outbox::stage(
            tx,
            host,
            Kind::Interim,
            &format!("{}:{k}", v.id),
            record,
            at,
        )?;
    }
    Ok(())
}

/// Open sessions (and settled ones seen for the first time) as rows; rows
/// only ever move forward from `open`. A session's cycle charges are its
/// accrual, updated in place (cumulative units and amount, and the seq of
/// the last charge): the ledger grows by session, not by cycle. Writing a
/// cumulative value twice changes nothing, and an older one never replaces
/// a newer, so a replayed commit cannot charge twice.
fn write_viewers(
    tx: &rusqlite::Transaction<'_>,
    batch: &Batch,
    currency: &str,
) -> rusqlite::Result<()> {
    let mut update = tx.prepare_cached(
        "UPDATE viewer_sessions SET first_ns = ?2, last_ns = ?3, bytes_out = ?4, bytes_in = ?5,
         connections = ?6,
         units = CASE WHEN seq <= ?9 THEN ?7 ELSE units END,
         charged_micro = CASE WHEN seq <= ?9 THEN ?8 ELSE charged_micro END,
         seq = MAX(seq, ?9)
         WHERE session_id = ?1 AND state = 'open'",
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO viewer_sessions (session_id, state, service, tariff, account,
         content, attributed, client_addr, first_ns, last_ns, started_ms, bytes_out, bytes_in,
         connections, units, charged_micro, seq, currency)
         VALUES (?1, 'open', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?;
    for v in batch
        .viewers
        .iter()
        .chain(batch.settled.iter().map(|s| &s.row))
    {
        let updated = update.execute(params![
            v.id,
            to_i64(v.first_ns),
            to_i64(v.last_ns),
            to_i64(v.bytes_out),
            to_i64(v.bytes_in),
            v.connections,
            to_i64(v.accrual.units),
            to_i64(v.accrual.charged_micro),
            to_i64(v.accrual.seq),
        ])?;
        if updated == 1 {
            continue;
        }
        let tariff = serde_json::to_string(&v.tariff).unwrap_or_default();
        insert.execute(params![
            v.id,
            v.service,
            tariff,
            v.account,
            v.content,
            v.attributed,
            v.client_addr,
            to_i64(v.first_ns),
            to_i64(v.last_ns),
            v.started_ms.unwrap_or_else(|| wall_ms(v.first_ns)),
            to_i64(v.bytes_out),
            to_i64(v.bytes_in),
            v.connections,
            to_i64(v.accrual.units),
            to_i64(v.accrual.charged_micro),
            to_i64(v.accrual.seq),
            currency,
        ])?;
    }
    Ok(())
}

/// Settlements: a session settles once, when its row moves from `open` to
/// `settled`, with its charge and how it splits into the cycles' accrual
/// and the settlement's adjustment.
fn write_settlements(tx: &rusqlite::Transaction<'_>, batch: &Batch) -> rusqlite::Result<()> {
    let mut settle = tx.prepare_cached(
        "UPDATE viewer_sessions SET state = 'settled', ended_ms = started_ms + ?2,
         duration_ms = ?2, charge_minor = ?3, cycles_micro = ?4, adjustment_micro = ?5
         WHERE session_id = ?1 AND state = 'open'",
    )?;
    for s in &batch.settled {
        settle.execute(params![
            s.row.id,
            to_i64(s.duration_ms),
            to_i64(s.charge_minor),
            to_i64(s.cycles_micro),
            s.adjustment_micro,
        ])?;
    }
    Ok(())
}

/// Connection segments: open ones (for a restart) and ended ones.
fn write_segments(tx: &rusqlite::Transaction<'_>, batch: &Batch) -> rusqlite::Result<()> {
    let mut segment = tx.prepare_cached(
        "INSERT INTO connections (connection_id, conn_id, seg, session_id, state, closes_conn,
         service, account, content, protocol, client_addr, client_port, server_addr,
         server_port, start_ns, end_ns, last_ns, base_out, base_in, counts_out, counts_in,
         started_ms, ended_ms, flags, denied)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
         ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)
         ON CONFLICT (connection_id) DO UPDATE SET session_id = ?4, state = ?5,
         closes_conn = ?6, account = ?8, content = ?9, end_ns = ?16, last_ns = ?17,
         counts_out = ?20, counts_in = ?21,
         ended_ms = CASE WHEN ?5 = 'ended' THEN started_ms + (?16 - start_ns) / 1000000 END,
         flags = ?24 WHERE state = 'open' OR session_id = ''",
    )?;
    for g in &batch.segments {
        let started = wall_ms(g.start_ns);
        let ended =
            (!g.open).then(|| started + to_i64(g.end_ns.saturating_sub(g.start_ns) / 1_000_000));
        segment.execute(params![
            g.id,
            g.conn_id,
            g.n,
            g.session_id,
            if g.open { "open" } else { "ended" },
            g.closes_conn,
            g.service,
            g.account,
            g.content,
            g.protocol.as_str(),
            g.client.ip().to_string(),
            g.client.port(),
            g.server.ip().to_string(),
            g.server.port(),
            to_i64(g.start_ns),
            to_i64(g.end_ns),
            to_i64(g.counts.last_ns),
            to_i64(g.base.bytes_out),
            to_i64(g.base.bytes_in),
            to_i64(g.counts.bytes_out),
            to_i64(g.counts.bytes_in),
            started,
            ended,
            g.flags,
            g.denied,
        ])?;
    }
    // Counts only rise: an older value never replaces a newer one.
    let mut progress = tx.prepare_cached(
        "UPDATE connections SET counts_out = MAX(counts_out, ?2),
         counts_in = MAX(counts_in, ?3), last_ns = MAX(last_ns, ?4)
         WHERE connection_id = ?1 AND state = 'open'",
    )?;
    for p in &batch.progress {
        progress.execute(params![
            p.id,
            to_i64(p.counts.bytes_out),
            to_i64(p.counts.bytes_in),
            to_i64(p.counts.last_ns),
        ])?;
    }
    Ok(())
}

/// Limit and cut-off events, and the limit events' deliveries (the
/// outbox), in the same transaction as the charges that caused them.
fn write_events(
    tx: &rusqlite::Transaction<'_>,
    batch: &Batch,
    at: i64,
    currency: &str,
    targets: &[Target],
) -> rusqlite::Result<()> {
    let mut event = tx.prepare_cached(
        "INSERT OR IGNORE INTO ledger_events (event_id, at_ms, kind, account, detail)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut delivery = tx.prepare_cached(
        "INSERT OR IGNORE INTO deliveries (event_id, target, payload, attempts, next_at_ms)
         VALUES (?1, ?2, ?3, 0, ?4)",
    )?;
    for e in &batch.limits {
        // A crossing happens once per limit (a top-up raises it).
        let event_id = format!("limit_reached:{}:{}", e.account, e.limit_minor);
        let payload = LimitReached {
            event_id: event_id.clone(),
            event: "limit_reached".to_owned(),
            account: e.account.clone(),
            spent_minor: e.spent_minor,
            limit_minor: e.limit_minor,
            currency: currency.to_owned(),
            policy: format!("{:?}", e.policy).to_lowercase(),
        };
        let json = serde_json::to_string(&payload).unwrap_or_default();
        if event.execute(params![event_id, at, "limit_reached", e.account, json])? == 1 {
            for t in targets {
                delivery.execute(params![event_id, t.as_str(), json, at])?;
            }
        }
    }
    for c in &batch.cut_offs {
        let detail = serde_json::json!({
            "event": "cut_off",
            "account": c.account,
            "bytes_after_cut": c.bytes_after_cut,
            "ms_after_cut": c.ms_after_cut,
            "connections": c.connections,
        });
        event.execute(params![
            format!("cut_off:{}:{at}", c.account),
            at,
            "cut_off",
            c.account,
            detail.to_string()
        ])?;
    }
    Ok(())
}

/// CSV columns of the session export, in the JSON field order.
pub const SESSION_COLUMNS: [&str; 13] = [
    "session_id",
    "service",
    "account",
    "content",
    "client_addr",
    "started_at",
    "ended_at",
    "duration_ms",
    "bytes_out",
    "bytes_in",
    "connections",
    "charge_minor",
    "currency",
];

/// CSV columns of the connection export, in the JSON field order.
pub const CONNECTION_COLUMNS: [&str; 15] = [
    "connection_id",
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
];

pub(crate) fn write_records<T: Serialize>(
    records: &[T],
    columns: &[&str],
    format: ExportFormat,
    out: &mut dyn Write,
) -> std::io::Result<usize> {
    if format == ExportFormat::Csv {
        writeln!(out, "{}", columns.join(","))?;
    }
    for r in records {
        match format {
            ExportFormat::Jsonl => {
                serde_json::to_writer(&mut *out, r)?;
                writeln!(out)?;
            }
            ExportFormat::Csv => {
                let value = serde_json::to_value(r)?;
                let row: Vec<String> = columns
                    .iter()
                    .map(|c| match &value[*c] {
                        serde_json::Value::String(s) => csv_field(s),
                        other => other.to_string(),
                    })
                    .collect();
                writeln!(out, "{}", row.join(","))?;
            }
        }
    }
    out.flush()?;
    Ok(records.len())
}

/// RFC 4180 quoting where needed; a text cell that a spreadsheet would
/// read as a formula (`=`, `+`, `-`, `@`) gets a leading `'`.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::SettledRow;

    #[test]
    fn a_deleted_ledger_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let mut l = Ledger::open(&path, "EUR").unwrap();
        assert!(l.commit(&Batch::default()).is_ok());
        fs::remove_file(&path).unwrap();
        let e = l.commit(&Batch::default()).unwrap_err();
        assert!(matches!(e, LedgerError::Gone { .. }), "{e}");
    }

    fn open_row(id: &str, account: &str, charged_micro: u64, seq: u64) -> ViewerRow {
        ViewerRow {
            id: id.into(),
            service: "web".into(),
            tariff: serde_json::from_str(
                r#"{"kind":"volume","price_minor":"1","unit_bytes":"1KB"}"#,
            )
            .unwrap(),
            account: account.into(),
            content: String::new(),
            attributed: true,
            client_addr: "127.0.0.1".into(),
            first_ns: 1,
            last_ns: 2,
            bytes_out: 0,
            bytes_in: 0,
            connections: 1,
            accrual: Accrual {
                units: charged_micro / 1_000_000,
                charged_micro,
                seq,
            },
            started_ms: None,
        }
    }

    #[test]
    fn accruals_move_forward_only_and_are_the_accounts_spend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let mut l = Ledger::open(&path, "EUR").unwrap();
        let commit = |l: &mut Ledger, viewers: Vec<ViewerRow>, settled: Vec<SettledRow>| {
            l.commit(&Batch {
                viewers,
                settled,
                ..Batch::default()
            })
            .unwrap();
        };
        commit(&mut l, vec![open_row("s1", "a", 3_000_000, 3)], vec![]);
        commit(&mut l, vec![open_row("s2", "b", 7, 1)], vec![]);
        // A replayed older accrual changes nothing.
        commit(&mut l, vec![open_row("s1", "a", 1_000_000, 1)], vec![]);
        let spent = l.spent_by_account().unwrap();
        assert_eq!(
            spent,
            HashMap::from([("a".to_owned(), 3_000_000), ("b".to_owned(), 7)])
        );
        // Settled once: 3 units charged by the cycles, 0.5 refunded.
        let settled = SettledRow {
            row: open_row("s1", "a", 3_000_000, 3),
            duration_ms: 1,
            charge_minor: 2,
            cycles_micro: 3_000_000,
            adjustment_micro: -1_000_000,
        };
        commit(&mut l, vec![], vec![settled.clone()]);
        commit(
            &mut l,
            vec![open_row("s1", "a", 9_000_000, 9)],
            vec![settled],
        );
        assert_eq!(
            l.spent_by_account().unwrap(),
            HashMap::from([("a".to_owned(), 2_000_000), ("b".to_owned(), 7)])
        );
        let s1 = l.sessions(None).unwrap();
        assert_eq!(s1.len(), 1);
        assert_eq!((s1[0].session_id.as_str(), s1[0].charge_minor), ("s1", 2)); // A ledger of an older version: its charges table also counts the
        // sessions it has no rows for, and only those.
        l.conn
            .execute_batch(
                "CREATE TABLE charges (id TEXT PRIMARY KEY, session_id TEXT NOT NULL,
                 kind TEXT NOT NULL, service TEXT NOT NULL, account TEXT NOT NULL,
                 at_ms INTEGER NOT NULL, units INTEGER NOT NULL, amount_micro INTEGER NOT NULL);
                 INSERT INTO charges VALUES ('s1:cycles', 's1', 'cycle', 'web', 'a', 1, 3, 3000000);
                 INSERT INTO charges VALUES ('old:1', 'old', 'cycle', 'web', 'c', 1, 5, 5000000);
                 INSERT INTO charges VALUES ('old:settle', 'old', 'settlement', 'web', 'c', 2, 0, -1);",
            )
            .unwrap();
        assert_eq!(
            l.spent_by_account().unwrap(),
            HashMap::from([
                ("a".to_owned(), 2_000_000),
                ("b".to_owned(), 7),
                ("c".to_owned(), 4_999_999)
            ])
        );
    }

    #[test]
    fn first_fleet_start_stages_settled_sessions_as_exported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let policy = || outbox::Policy {
            host: "h1".into(),
            interim_ms: 300_000,
        };
        let mut l = Ledger::open(&path, "EUR").unwrap();
        l.conn
            .execute_batch(
                "INSERT INTO viewer_sessions (session_id, state, service, tariff, account, content,
                 attributed, client_addr, first_ns, last_ns, started_ms, ended_ms, bytes_out,
                 bytes_in, connections, units, charged_micro, seq, duration_ms, charge_minor,
                 currency)
                 VALUES ('v1', 'settled', 'web', '{}', 'alice', 'm', 1, '10.0.0.1', 1, 2,
                 1796000000000, 1796000060123, 5000, 10, 2, 5, 5000000, 5, 60123, 5, 'EUR'),
                 ('v2', 'open', 'web', '{}', 'bob', '', 0, '10.0.0.2', 1, 2, 1796000000000,
                 NULL, 1, 1, 1, 0, 0, 0, NULL, NULL, 'EUR');",
            )
            .unwrap();
        assert_eq!(l.set_fleet(policy()).unwrap(), 1, "the settled one only");
        let (id, payload): (String, String) = l
            .conn
            .query_row("SELECT record_id, payload FROM fleet_outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(id, "h1:session:v1");
        let envelope: crate::fleet::record::Envelope = serde_json::from_str(&payload).unwrap();
        let mut exported = Vec::new();
        l.export(None, ExportFormat::Jsonl, false, &mut exported)
            .unwrap();
        let exported: serde_json::Value = serde_json::from_slice(&exported).unwrap();
        assert_eq!(
            envelope.record, exported,
            "the export's row, field for field"
        );
        drop(l);
        let mut l = Ledger::open(&path, "EUR").unwrap();
        assert_eq!(l.set_fleet(policy()).unwrap(), 0, "staged once per host");
    }

    #[test]
    fn currency_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        drop(Ledger::open(&path, "EUR").unwrap());
        let e = Ledger::open(&path, "USD").err().unwrap().to_string();
        assert!(e.contains("EUR") && e.contains("USD"), "{e}");
    }

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
        assert_eq!(csv_field("=1+1"), "'=1+1");
        assert_eq!(csv_field("-x"), "'-x");
        assert_eq!(csv_field("plain"), "plain");
    }
}
