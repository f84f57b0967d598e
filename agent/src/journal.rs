//! The admission journal: every admission the API answers is appended here
//! (one `write(2)` of one JSON line, mode 0600, next to the ledger) before
//! its answer leaves, so an attribution answered 204 survives a `kill -9`
//! of the agent in the moment after: the run loop applies it
//! asynchronously, and a restarted agent replays the journal.
//!
//! Owns the file format, replay order and rotation; not what an entry
//! means (the billing core applies it, [`crate::admission`] decides it).
//!
//! Files are `<ledger file>-admissions.<generation>`. The loop rotates at
//! its cycle: it takes every entry of the current file that it has not
//! applied, starts the next generation, commits what applying them staged,
//! writes the attributions still waiting for their connection into the new
//! file again (sequence number 0: before every entry appended to that file
//! since), and only then removes the older files. A crash at any point
//! leaves every entry either committed to the ledger or in a file, and
//! replay reads every file in (generation, sequence) order, so a later
//! attribution of the same connection wins. Replaying an entry that was
//! committed before the crash changes nothing: its connection already has
//! that attribution.
//!
//! Durability is a `write(2)` into the page cache, as a WAL commit with
//! `synchronous = NORMAL` is: it survives the agent's death, not a power
//! loss.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::attribution::{Attribution, ConnectionRef};

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("admission journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One answered admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Order within its file; 0 for an attribution written again at a
    /// rotation.
    pub seq: u64,
    /// When it was answered (wall clock, ms since the epoch): a replayed
    /// attribution waits for its connection what is left of its TTL.
    pub at_ms: u64,
    pub conn: ConnectionRef,
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// It was refused: what its connection sends now is billed to nobody.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub denied: bool,
}

impl Entry {
    /// The entry of `attribution` for `conn`, answered `age` ago.
    pub fn new(seq: u64, conn: ConnectionRef, attribution: &Attribution, age: Duration) -> Self {
        let at = SystemTime::now().checked_sub(age).unwrap_or(UNIX_EPOCH);
        Self {
            seq,
            at_ms: u64::try_from(
                at.duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(u64::MAX),
            conn,
            account: attribution.account.clone(),
            content: attribution.content.clone(),
            denied: attribution.denied,
        }
    }

    /// The attribution it records.
    pub fn attribution(&self) -> Attribution {
        Attribution {
            account: self.account.clone(),
            content: self.content.clone(),
            denied: self.denied,
        }
    }

    /// When it was answered, on this process's monotonic clock (now, if
    /// the wall clock says it is in the future).
    pub fn instant(&self) -> Instant {
        let at = UNIX_EPOCH + Duration::from_millis(self.at_ms);
        let age = SystemTime::now().duration_since(at).unwrap_or_default();
        Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
    }
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// `<ledger file name>-admissions.`
    prefix: String,
    generation: u64,
    path: PathBuf,
    file: fs::File,
    /// The last sequence number used in the current file.
    seq: u64,
    /// Older files, removed by [`Journal::remove_retired`].
    retired: Vec<PathBuf>,
}

impl Journal {
    /// Opens the journal of the ledger at `ledger`: returns it, appending
    /// to a new file, and every entry of the files found, in replay order.
    /// Those files are retired: removed at the first
    /// [`Journal::remove_retired`], once what they held is committed or
    /// written again.
    pub fn open(ledger: &Path) -> Result<(Self, Vec<Entry>), JournalError> {
        let dir = ledger
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let prefix = format!(
            "{}-admissions.",
            ledger.file_name().unwrap_or_default().to_string_lossy()
        );
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Io { path, source }
        };
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for item in fs::read_dir(&dir).map_err(err(&dir))? {
            let item = item.map_err(err(&dir))?;
            let name = item.file_name();
            if let Some(generation) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|g| g.parse().ok())
            {
                found.push((generation, item.path()));
            }
        }
        found.sort();
        let mut entries = Vec::new();
        for (generation, path) in &found {
            let text = fs::read_to_string(path).map_err(err(path))?;
            let mut of_file: Vec<Entry> = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match serde_json::from_str::<Entry>(line) {
                    Ok(e) => of_file.push(e),
                    // Only a line cut short by a full disk can be partial.
                    Err(e) => tracing::warn!(
                        journal = %path.display(),
                        error = %e,
                        "skipping an unreadable admission journal line"
                    ),
                }
            }
            of_file.sort_by_key(|e| e.seq);
            tracing::debug!(
                generation,
                entries = of_file.len(),
                "admission journal replayed"
            );
            entries.extend(of_file);
        }
        let generation = found.last().map_or(1, |(g, _)| g + 1);
        let path = dir.join(format!("{prefix}{generation}"));
        let file = create(&path)?;
        Ok((
            Self {
                dir,
                prefix,
                generation,
                path,
                file,
                seq: 0,
                retired: found.into_iter().map(|(_, p)| p).collect(),
            },
            entries,
        ))
    }

    /// Appends one answered admission, in one write.
    pub fn append(
        &mut self,
        conn: &ConnectionRef,
        attribution: &Attribution,
    ) -> Result<(), JournalError> {
        self.seq += 1;
        let entry = Entry::new(self.seq, *conn, attribution, Duration::ZERO);
        self.write_entries(std::slice::from_ref(&entry))
    }

    /// Appends entries as they are, in one write.
    pub fn write_entries(&mut self, entries: &[Entry]) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(160 * entries.len());
        for e in entries {
            serde_json::to_writer(&mut buf, e).expect("an entry serializes");
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Starts the next file; the current one is retired.
    pub fn rotate(&mut self) -> Result<(), JournalError> {
        let generation = self.generation + 1;
        let path = self.dir.join(format!("{}{generation}", self.prefix));
        self.file = create(&path)?;
        self.retired.push(std::mem::replace(&mut self.path, path));
        self.generation = generation;
        self.seq = 0;
        Ok(())
    }

    /// Whether anything was appended to the current file.
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// Whether older files wait to be removed.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Removes the retired files.
    pub fn remove_retired(&mut self) -> Result<(), JournalError> {
        for path in self.retired.drain(..) {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(JournalError::Io { path, source }),
            }
        }
        Ok(())
    }
}

fn create(path: &Path) -> Result<fs::File, JournalError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| JournalError::Io {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribution(account: &str, denied: bool) -> Attribution {
        Attribution {
            account: account.into(),
            content: Some("movie".into()),
            denied,
        }
    }

    fn tuple(port: u16) -> ConnectionRef {
        ConnectionRef::Tuple {
            client: std::net::SocketAddr::new([203, 0, 113, 7].into(), port),
            server_port: 8080,
        }
    }

    #[test]
    fn a_crash_replays_in_order_and_a_rotation_keeps_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.sqlite");
        let (mut j, replayed) = Journal::open(&ledger).unwrap();
        assert_eq!(replayed, []);
        assert!(j.is_empty());
        j.append(&tuple(1), &attribution("alice", false)).unwrap();
        j.append(&tuple(2), &attribution("bob", true)).unwrap();
        j.append(&tuple(1), &attribution("carol", false)).unwrap();
        drop(j); // kill -9: nothing but what was written
        let (mut j, replayed) = Journal::open(&ledger).unwrap();
        let got: Vec<(ConnectionRef, Attribution)> =
            replayed.iter().map(|e| (e.conn, e.attribution())).collect();
        assert_eq!(
            got,
            vec![
                (tuple(1), attribution("alice", false)),
                (tuple(2), attribution("bob", true)),
                (tuple(1), attribution("carol", false)),
            ]
        );
        assert!(replayed[0].instant() <= Instant::now());
        // A rotation: a newer entry lands in the new file, then what is
        // still pending is written again; a crash before the old file is
        // removed replays both, the newer last.
        j.rotate().unwrap();
        j.append(&tuple(2), &attribution("dave", false)).unwrap();
        j.write_entries(&[Entry::new(
            0,
            tuple(2),
            &attribution("bob", true),
            Duration::from_secs(1),
        )])
        .unwrap();
        drop(j);
        let (mut j, replayed) = Journal::open(&ledger).unwrap();
        let last: Vec<&str> = replayed.iter().map(|e| e.account.as_str()).collect();
        assert_eq!(last, ["alice", "bob", "carol", "bob", "dave"]);
        // Removing the retired files leaves only the new, empty one.
        j.remove_retired().unwrap();
        drop(j);
        let (_, replayed) = Journal::open(&ledger).unwrap();
        assert_eq!(replayed, []);
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "the new file and the empty one before it");
    }

    #[test]
    fn a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.sqlite");
        let (mut j, _) = Journal::open(&ledger).unwrap();
        j.append(&tuple(1), &attribution("alice", false)).unwrap();
        j.file.write_all(b"{\"seq\":2,\"at_ms\":1").unwrap();
        drop(j);
        let (_, replayed) = Journal::open(&ledger).unwrap();
        assert_eq!(replayed.len(), 1);
    }
}
