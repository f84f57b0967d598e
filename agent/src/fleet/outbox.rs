//! The fleet outbox: records waiting to be shipped to the stream, kept in
//! the ledger itself.
//!
//! A record enters the outbox in the same SQLite transaction that writes
//! it to the ledger ([`stage`]), so a record exists in both or in neither.
//! The publisher reads the outbox in order ([`Outbox::pending`]) and marks
//! a record shipped only after the stream acknowledged it
//! ([`Outbox::shipped`]). A crash between the two re-publishes the record
//! under the same id, which the stream's duplicate window and every
//! consumer (by id) absorb.

use std::{path::Path, time::Duration};

use rusqlite::{Connection, params};

use super::record::{Envelope, Kind, record_id};

/// The outbox table; created with the ledger's schema.
pub const SCHEMA: &str = "
-- Fleet records to ship to NATS JetStream, in order; written with the
-- record, marked shipped after its acknowledgement.
CREATE TABLE IF NOT EXISTS fleet_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    shipped_ms INTEGER
);
CREATE INDEX IF NOT EXISTS fleet_outbox_pending ON fleet_outbox (seq) WHERE shipped_ms IS NULL;
";

/// What a ledger with a fleet writes to the outbox.
#[derive(Debug, Clone)]
pub struct Policy {
    pub host: String,
    /// Interim records of open sessions this often, ms.
    pub interim_ms: i64,
}

/// Stages one record (at most once per id) in the ledger's transaction.
pub fn stage(
    tx: &rusqlite::Transaction<'_>,
    host: &str,
    kind: Kind,
    ledger_id: &str,
    record: serde_json::Value,
    at_ms: i64,
) -> rusqlite::Result<()> {
    let envelope = Envelope {
        id: record_id(host, kind, ledger_id),
        host: host.to_owned(),
        kind,
        record,
    };
    let payload = serde_json::to_string(&envelope).unwrap_or_default();
    tx.prepare_cached(
        "INSERT OR IGNORE INTO fleet_outbox (record_id, kind, payload, at_ms)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![envelope.id, kind.as_str(), payload, at_ms])?;
    Ok(())
}

/// The interim period a session is in at `at_ms`: the first interim comes
/// one interval after its start. `None` before that.
pub fn interim_period(started_ms: i64, at_ms: i64, interim_ms: i64) -> Option<i64> {
    let k = at_ms.saturating_sub(started_ms) / interim_ms.max(1);
    (k >= 1).then_some(k)
}

/// One record to ship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub seq: i64,
    pub record_id: String,
    pub kind: String,
    pub payload: String,
}

/// The publisher's own connection to the ledger's outbox.
pub struct Outbox {
    conn: Connection,
}

/// Backlog figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: u64,
    /// When the oldest unshipped record was written, unix ms.
    pub oldest_ms: Option<i64>,
}

impl Outbox {
    /// Opens the ledger file (the agent has created it) for the outbox.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // The agent's checkpointer thread runs the WAL checkpoints.
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// The oldest unshipped records, in the order they were written.
    pub fn pending(&self, max: usize) -> rusqlite::Result<Vec<Pending>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, record_id, kind, payload FROM fleet_outbox
             WHERE shipped_ms IS NULL ORDER BY seq LIMIT ?1",
        )?;
        let rows = stmt.query_map([i64::try_from(max).unwrap_or(i64::MAX)], |r| {
            Ok(Pending {
                seq: r.get(0)?,
                record_id: r.get(1)?,
                kind: r.get(2)?,
                payload: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// Marks acknowledged records shipped, in one transaction.
    pub fn shipped(&mut self, seqs: &[i64], at_ms: i64) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut mark = tx.prepare_cached(
                "UPDATE fleet_outbox SET shipped_ms = ?2 WHERE seq = ?1 AND shipped_ms IS NULL",
            )?;
            for seq in seqs {
                mark.execute(params![seq, at_ms])?;
            }
        }
        tx.commit()
    }

    /// How many records wait, and since when.
    pub fn backlog(&self) -> rusqlite::Result<Backlog> {
        let (pending, oldest_ms) = self.conn.query_row(
            "SELECT COUNT(*), MIN(at_ms) FROM fleet_outbox WHERE shipped_ms IS NULL",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
        )?;
        Ok(Backlog {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest_ms,
        })
    }

    /// Marks every record unshipped, so the whole outbox is published
    /// again (consumers deduplicate by id), and has the next start stage
    /// every settled session again (those pruned from the outbox come
    /// back); returns how many records wait now.
    pub fn replay_all(&mut self) -> rusqlite::Result<usize> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE fleet_outbox SET shipped_ms = NULL WHERE shipped_ms IS NOT NULL",
            [],
        )?;
        tx.execute("DELETE FROM meta WHERE key LIKE 'fleet_backfilled:%'", [])?;
        let n: i64 = tx.query_row(
            "SELECT COUNT(*) FROM fleet_outbox WHERE shipped_ms IS NULL",
            [],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Deletes records shipped before `before_ms`: the ledger's own tables
    /// keep what they recorded, so the outbox stays small.
    pub fn prune(&mut self, before_ms: i64) -> rusqlite::Result<usize> {
        self.conn.execute(
            "DELETE FROM fleet_outbox WHERE shipped_ms IS NOT NULL AND shipped_ms < ?1",
            [before_ms],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interims_start_one_interval_in() {
        assert_eq!(interim_period(1_000, 1_000 + 299_999, 300_000), None);
        assert_eq!(interim_period(1_000, 1_000 + 300_000, 300_000), Some(1));
        assert_eq!(interim_period(1_000, 1_000 + 900_001, 300_000), Some(3));
        assert_eq!(
            interim_period(5_000, 1_000, 300_000),
            None,
            "clock went back"
        );
    }

    #[test]
    fn staged_once_shipped_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .unwrap();
        let tx = conn.transaction().unwrap();
        for id in ["s1", "s2", "s1"] {
            stage(&tx, "h", Kind::Session, id, serde_json::json!({"x": id}), 7).unwrap();
        }
        tx.commit().unwrap();
        let mut o = Outbox::open(&path).unwrap();
        let p = o.pending(10).unwrap();
        assert_eq!(
            p.iter().map(|p| p.record_id.as_str()).collect::<Vec<_>>(),
            ["h:session:s1", "h:session:s2"]
        );
        assert_eq!(
            o.backlog().unwrap(),
            Backlog {
                pending: 2,
                oldest_ms: Some(7)
            }
        );
        o.shipped(&[p[0].seq], 9).unwrap();
        assert_eq!(o.pending(10).unwrap()[0].record_id, "h:session:s2");
        assert_eq!(o.prune(9).unwrap(), 0, "shipped at 9, not before");
        assert_eq!(o.prune(10).unwrap(), 1);
        assert_eq!(o.backlog().unwrap().pending, 1);
        o.shipped(&[p[1].seq], 11).unwrap();
        assert_eq!(o.replay_all().unwrap(), 1);
        assert_eq!(o.backlog().unwrap().pending, 1);
    }
}
