//! A JSON-lines record of every closed connection (`--closed-log`), with
//! its exact kernel totals: what the end-to-end tests compare against the
//! applications' own byte counts.
//!
//! Each connection is written once. A record is written after its ledger
//! commit and before the ring-buffer slot it came from is released, so a
//! crash can at worst re-deliver it; the agent then writes it only if the
//! ids found at the end of the file on start do not have it.

use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::{self, BufRead as _, BufReader, BufWriter, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use std::os::unix::fs::OpenOptionsExt as _;

use serde::Serialize;

use crate::core::{ClosedConn, Protocol};

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
    /// Boot ns of the last payload.
    pub last_ns: u64,
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
            .mode(0o600)
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

    /// Appends one closed connection and hands it to the kernel (write(2)):
    /// from then on a kill of the agent cannot lose it.
    pub fn write(&mut self, c: &ClosedConn) -> Result<(), ClosedLogError> {
        let record = Record {
            id: &c.id,
            cookie: c.cookie,
            protocol: c.peer.protocol,
            service: &c.service,
            client_addr: c.peer.client().ip().to_string(),
            client_port: c.peer.client_port,
            server_addr: c.peer.server().ip().to_string(),
            server_port: c.peer.server_port,
            bytes_out: c.counts.bytes_out,
            bytes_in: c.counts.bytes_in,
            start_ns: c.start_ns,
            end_ns: c.end_ns,
            last_ns: c.counts.last_ns,
            flags: c.flags,
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
