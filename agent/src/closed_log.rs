//! A JSON-lines record of every settled session (`--closed-log`): the plain
//! seam the billing ledger builds on, and what the end-to-end tests compare
//! against the applications' own byte counts.
//!
//! Each session is written once. A record is written before the ring-buffer
//! slot it came from is released, so a crash can at worst re-deliver it; the
//! ids found at the end of the file on start are skipped.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::{self, BufRead as _, BufReader, BufWriter, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::sessions::{Protocol, Settled};

/// How far back from the end of the log ids are re-read on start: far more
/// than the records in flight at a crash.
const TAIL_BYTES: u64 = 8 << 20;

/// One line of the log.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub id: &'a str,
    pub cookie: u64,
    pub protocol: Protocol,
    pub service: &'a str,
    pub client_addr: String,
    pub client_port: u16,
    pub server_addr: String,
    pub server_port: u16,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub flags: u32,
}

/// The open log.
pub struct ClosedLog {
    path: PathBuf,
    out: BufWriter<File>,
}

/// Why the log could not be used.
#[derive(Debug, thiserror::Error)]
#[error("closed-connection log {path}: {source}")]
pub struct ClosedLogError {
    path: PathBuf,
    source: io::Error,
}

impl ClosedLog {
    /// Opens (creates) the log for appending and returns the ids already in
    /// its tail.
    pub fn open(path: &Path) -> Result<(Self, HashSet<String>), ClosedLogError> {
        let err = |source| ClosedLogError {
            path: path.to_owned(),
            source,
        };
        let ids = tail_ids(path).map_err(err)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok((
            Self {
                path: path.to_owned(),
                out: BufWriter::new(file),
            },
            ids,
        ))
    }

    /// Appends one settled session and hands it to the kernel (write(2)):
    /// from then on a kill of the agent cannot lose it.
    pub fn write(&mut self, settled: &Settled, service: &str) -> Result<(), ClosedLogError> {
        let s = &settled.session;
        let record = Record {
            id: &settled.id,
            cookie: s.cookie,
            protocol: s.protocol,
            service,
            client_addr: s.client().ip().to_string(),
            client_port: s.client_port,
            server_addr: s.server().ip().to_string(),
            server_port: s.server_port,
            bytes_out: s.counts.bytes_out,
            bytes_in: s.counts.bytes_in,
            start_ns: s.start_ns,
            end_ns: settled.end_ns,
            flags: settled.flags,
        };
        let err = |source| ClosedLogError {
            path: self.path.clone(),
            source,
        };
        serde_json::to_writer(&mut self.out, &record).map_err(|e| err(e.into()))?;
        self.out.write_all(b"\n").map_err(err)?;
        self.out.flush().map_err(err)
    }
}

fn tail_ids(path: &Path) -> io::Result<HashSet<String>> {
    let mut ids = HashSet::new();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut lines = BufReader::new(file).lines();
    if start > 0 {
        lines.next(); // a partial line
    }
    for line in lines {
        let line = line?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && let Some(id) = v.get("id").and_then(|i| i.as_str())
        {
            ids.insert(id.to_owned());
        }
    }
    Ok(ids)
}
