//! meterd's ledger as its operators see it: `meterd ledger export` in JSON
//! lines and CSV, and the SQLite file itself (through the `sqlite3` CLI).
//!
//! A ledger record is matched with the truth the way closed-log records
//! are (`records`): by protocol, client port and server port, exactly one
//! record per connection, bytes exact, the right service.
//!
//! Does not own: running the export (`agent`), the charging rules
//! (`tariff`).

use std::{collections::BTreeMap, net::IpAddr, path::Path, process::Command};

use serde::Deserialize;

use crate::{
    records::{self, ClosedRecord, Comparison},
    wire::{ConnLog, Protocol},
};

/// One line of `meterd ledger export --format jsonl` (CONTRACT.md): every
/// field is required.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct LedgerRecord {
    /// Unique per session.
    pub session_id: String,
    /// Service name.
    pub service: String,
    /// Attributed account, or the client address.
    pub account: String,
    /// Attributed content, or empty.
    pub content: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Client address.
    pub client_addr: IpAddr,
    /// Client port.
    pub client_port: u16,
    /// Server address.
    pub server_addr: IpAddr,
    /// Server port.
    pub server_port: u16,
    /// RFC 3339 UTC, milliseconds.
    pub started_at: String,
    /// RFC 3339 UTC, milliseconds.
    pub ended_at: String,
    /// Payload bytes to the client.
    pub bytes_out: u64,
    /// Payload bytes from the client.
    pub bytes_in: u64,
    /// Connection time, whole ms.
    pub duration_ms: u64,
    /// The session's charge, minor units.
    pub charge_minor: u64,
    /// ISO 4217.
    pub currency: String,
}

impl LedgerRecord {
    /// The record in the closed log's shape, for [`records::compare_services`].
    pub fn as_closed(&self) -> ClosedRecord {
        ClosedRecord {
            id: self.session_id.clone(),
            cookie: None,
            protocol: self.protocol,
            service: self.service.clone(),
            client_addr: self.client_addr,
            client_port: self.client_port,
            server_addr: self.server_addr,
            server_port: self.server_port,
            bytes_out: self.bytes_out,
            bytes_in: self.bytes_in,
            start_ns: None,
            end_ns: None,
            flags: None,
        }
    }

    /// The same record as the CSV export writes it, column by column.
    pub fn csv_fields(&self) -> BTreeMap<String, String> {
        [
            ("session_id", self.session_id.clone()),
            ("service", self.service.clone()),
            ("account", self.account.clone()),
            ("content", self.content.clone()),
            (
                "protocol",
                match self.protocol {
                    Protocol::Tcp => "tcp".to_owned(),
                    Protocol::Udp => "udp".to_owned(),
                },
            ),
            ("client_addr", self.client_addr.to_string()),
            ("client_port", self.client_port.to_string()),
            ("server_addr", self.server_addr.to_string()),
            ("server_port", self.server_port.to_string()),
            ("started_at", self.started_at.clone()),
            ("ended_at", self.ended_at.clone()),
            ("bytes_out", self.bytes_out.to_string()),
            ("bytes_in", self.bytes_in.to_string()),
            ("duration_ms", self.duration_ms.to_string()),
            ("charge_minor", self.charge_minor.to_string()),
            ("currency", self.currency.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Parses the JSON lines export; any line that is not a full record is an
/// error.
pub fn parse_jsonl(text: &str) -> Result<Vec<LedgerRecord>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}: {l}", n + 1)))
        .collect()
}

/// Parses the CSV export (RFC 4180: a header line, fields quoted where they
/// contain a comma, quote or newline) into one column -> value map per row.
pub fn parse_csv(text: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    let mut rows = csv_rows(text)?.into_iter();
    let header = rows.next().ok_or("no header line")?;
    rows.enumerate()
        .map(|(n, row)| {
            if row.len() == header.len() {
                Ok(header.iter().cloned().zip(row).collect())
            } else {
                Err(format!(
                    "row {}: {} fields, the header has {}: {row:?}",
                    n + 1,
                    row.len(),
                    header.len()
                ))
            }
        })
        .collect()
}

fn csv_rows(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                any = false;
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if any {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// Compares ledger records with the truth; see [`records::compare_services`].
pub fn compare(
    truth: &[ConnLog],
    ledger: &[LedgerRecord],
    service_of: &dyn Fn(&ConnLog) -> String,
) -> Comparison {
    let as_closed: Vec<ClosedRecord> = ledger.iter().map(LedgerRecord::as_closed).collect();
    records::compare_services(truth, &as_closed, service_of)
}

/// The ledger record of a connection of the truth, by protocol, client and
/// server port. A client port can be reused within one test (after a
/// server-closes-first connection the client's port is free at once): then
/// the record with the connection's exact bytes and the nearest start time is
/// the one. Panics unless exactly one record fits.
pub fn record_of<'a>(ledger: &'a [LedgerRecord], conn: &ConnLog) -> &'a LedgerRecord {
    let same_ports: Vec<&LedgerRecord> = ledger
        .iter()
        .filter(|r| {
            r.protocol == conn.protocol
                && r.client_port == conn.client_port
                && r.server_port == conn.server_port
        })
        .collect();
    if same_ports.len() == 1 {
        return same_ports[0];
    }
    let accepted_ms = conn
        .accepted_unix_us
        .map(|us| i64::try_from(us / 1000).unwrap_or(i64::MAX));
    let fitting = same_ports
        .iter()
        .filter(|r| r.bytes_out == conn.bytes_sent && r.bytes_in == conn.bytes_received)
        .min_by_key(|r| match (accepted_ms, rfc3339_utc_ms(&r.started_at)) {
            (Some(a), Ok(s)) => (a - s).abs(),
            _ => i64::MAX,
        });
    match fitting {
        Some(r) => r,
        None => panic!(
            "want one ledger record of {conn:?}, found {} with its ports and none with its bytes: {same_ports:?}",
            same_ports.len()
        ),
    }
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp with
/// milliseconds, the contract's `YYYY-MM-DDTHH:MM:SS.mmmZ`; an error for
/// any other shape (another offset, another precision, a bad date).
pub fn rfc3339_utc_ms(text: &str) -> Result<i64, String> {
    let bad =
        || format!("{text:?} is not RFC 3339 UTC with milliseconds (YYYY-MM-DDTHH:MM:SS.mmmZ)");
    let b = text.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let s = &text[range];
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second, milli) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    Ok(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Runs `sql` on the ledger file with the `sqlite3` CLI, read-only; returns
/// the rows, fields split on tabs.
pub fn sqlite(ledger: &Path, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("sqlite3")
        .args(["-readonly", "-batch", "-noheader", "-separator", "\t"])
        .arg(ledger)
        .arg(sql)
        .output()
        .unwrap_or_else(|e| panic!("cannot run sqlite3 (Debian package sqlite3): {e}"));
    assert!(
        out.status.success(),
        "sqlite3 {} {sql:?} failed ({}): {}",
        ledger.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_milliseconds_utc() {
        assert_eq!(rfc3339_utc_ms("1970-01-01T00:00:00.000Z"), Ok(0));
        assert_eq!(
            rfc3339_utc_ms("2026-11-22T10:01:00.250Z"),
            Ok(1_795_341_660_250)
        );
        assert_eq!(
            rfc3339_utc_ms("2000-03-01T00:00:00.001Z"),
            Ok(951_868_800_001)
        );
        for bad in [
            "2026-11-22T10:01:00Z",
            "2026-11-22T10:01:00.250+01:00",
            "2026-11-22 10:01:00.250Z",
            "2026-02-30T10:01:00.250Z",
            "2026-11-22T10:01:00.25xZ",
        ] {
            assert!(rfc3339_utc_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_with_quotes() {
        let rows = parse_csv("a,b,c\n1,\"x,\"\"y\"\"\",\n2,z,w\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["b"], "x,\"y\"");
        assert_eq!(rows[0]["c"], "");
        assert_eq!(rows[1]["c"], "w");
        assert!(parse_csv("a,b\n1\n").is_err());
    }
}
