//! meterd's closed-connection log, and its comparison with the truth.
//!
//! The truth is what the server application's own socket calls returned
//! ([`ConnLog`], written by `meterd-traffic`). Each connection must have
//! exactly one record in meterd's closed log, matched by protocol, client
//! address, client port and server port (tests give connections client
//! addresses of their own, so a port alone no longer names one), with
//! `bytes_out == bytes_sent` and `bytes_in == bytes_received` exact to the
//! byte, the same server address, times in order
//! (`start_ns <= last_ns <= end_ns`), and the log may hold nothing else.
//! The closed log stays per connection under viewer-session billing: a
//! payload gap is not a close and writes no line.
//!
//! Does not own: producing either log.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::IpAddr,
};

use serde::Deserialize;

use crate::wire::{ConnLog, Protocol};

/// The service name the harness's agent config gives its one service.
pub const SERVICE: &str = "web";

/// One line of meterd's closed log (CONTRACT.md). Fields the tests do not
/// judge are optional so a missing one reads as "not checked", not as a
/// malformed log.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ClosedRecord {
    /// Unique per connection or flow, also across agent restarts.
    pub id: String,
    /// Socket cookie (TCP).
    pub cookie: Option<u64>,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Service name from the config.
    pub service: String,
    /// The peer.
    pub client_addr: IpAddr,
    /// The peer's port.
    pub client_port: u16,
    /// The metered side.
    pub server_addr: IpAddr,
    /// The metered port.
    pub server_port: u16,
    /// Payload bytes delivered to the client.
    pub bytes_out: u64,
    /// Payload bytes received from the client.
    pub bytes_in: u64,
    /// Start, boot-time ns.
    pub start_ns: Option<u64>,
    /// End, boot-time ns.
    pub end_ns: Option<u64>,
    /// Last payload change, boot-time ns (0 or absent: none).
    pub last_ns: Option<u64>,
    /// meterd's `CONN_*` flags.
    pub flags: Option<u64>,
}

/// Parses a closed log. A last line without its newline is still being
/// written and is left out; any other line that is not a record is an error.
pub fn parse_closed_log(text: &str) -> Result<Vec<ClosedRecord>, String> {
    complete_lines(text)
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("line {n}: {e}: {line}")))
        .collect()
}

/// Parses a `meterd-traffic` server log, same rules as [`parse_closed_log`].
pub fn parse_conn_log(text: &str) -> Result<Vec<ConnLog>, String> {
    complete_lines(text)
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("line {n}: {e}: {line}")))
        .collect()
}

fn complete_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
}

/// What identifies a connection in both logs. The client address is
/// canonical: an IPv4-mapped IPv6 client is its IPv4 address, as meterd
/// bills it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Client address.
    pub client_addr: IpAddr,
    /// Client port.
    pub client_port: u16,
    /// Server port.
    pub server_port: u16,
}

impl Key {
    /// The key of a connection of the truth.
    pub fn of_truth(c: &ConnLog) -> Key {
        Key {
            protocol: c.protocol,
            client_addr: c.client_addr.to_canonical(),
            client_port: c.client_port,
            server_port: c.server_port,
        }
    }

    /// The key of a record of meterd's.
    pub fn of_record(r: &ClosedRecord) -> Key {
        Key {
            protocol: r.protocol,
            client_addr: r.client_addr.to_canonical(),
            client_port: r.client_port,
            server_port: r.server_port,
        }
    }
}

/// The comparison of meterd's records with the truth.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Connections of the truth.
    pub expected: usize,
    /// Records in meterd's log.
    pub records: usize,
    /// Connections with exactly one, exact record.
    pub exact: usize,
    /// Connections with no record (yet).
    pub missing: Vec<String>,
    /// Connections whose records have other numbers or addresses, or more
    /// than one record; records whose times are out of order.
    pub wrong: Vec<String>,
    /// Records of no connection of the truth.
    pub unexpected: Vec<String>,
    /// Record ids seen more than once.
    pub duplicate_ids: Vec<String>,
}

impl Comparison {
    /// Every connection has exactly its one exact record, and there is
    /// nothing else.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty()
            && self.wrong.is_empty()
            && self.unexpected.is_empty()
            && self.duplicate_ids.is_empty()
    }

    /// Nothing is missing, so waiting longer cannot make it exact.
    pub fn is_final(&self) -> bool {
        self.missing.is_empty()
    }

    /// A readable account of every difference (the first 40 of each kind).
    pub fn diff(&self) -> String {
        let mut out = format!(
            "truth: {} connections; meterd: {} records; exact: {}, missing: {}, wrong: {}, \
             unexpected: {}, duplicate ids: {}\n",
            self.expected,
            self.records,
            self.exact,
            self.missing.len(),
            self.wrong.len(),
            self.unexpected.len(),
            self.duplicate_ids.len()
        );
        for (title, lines) in [
            ("wrong", &self.wrong),
            ("missing", &self.missing),
            ("unexpected", &self.unexpected),
            ("duplicate ids", &self.duplicate_ids),
        ] {
            if lines.is_empty() {
                continue;
            }
            let _ = writeln!(out, "{title}:");
            for line in lines.iter().take(40) {
                let _ = writeln!(out, "  {line}");
            }
            if lines.len() > 40 {
                let _ = writeln!(out, "  ... and {} more", lines.len() - 40);
            }
        }
        out
    }
}

/// Compares meterd's `records` with the `truth`. A key that occurs more
/// than once in the truth (a client port reused) must have as many records,
/// with the same multiset of byte counts. Every record must name the
/// harness's one service, [`SERVICE`].
pub fn compare(truth: &[ConnLog], records: &[ClosedRecord]) -> Comparison {
    compare_services(truth, records, &|_| SERVICE.to_owned())
}

/// [`compare`] for a config with several services: `service_of` names the
/// service each connection of the truth belongs to (by its server port).
pub fn compare_services(
    truth: &[ConnLog],
    records: &[ClosedRecord],
    service_of: &dyn Fn(&ConnLog) -> String,
) -> Comparison {
    let mut want: BTreeMap<Key, Vec<&ConnLog>> = BTreeMap::new();
    for c in truth {
        want.entry(Key::of_truth(c)).or_default().push(c);
    }
    let mut got: BTreeMap<Key, Vec<&ClosedRecord>> = BTreeMap::new();
    for r in records {
        got.entry(Key::of_record(r)).or_default().push(r);
    }
    let mut cmp = Comparison {
        expected: truth.len(),
        records: records.len(),
        ..Comparison::default()
    };

    let mut ids: HashMap<&str, usize> = HashMap::new();
    for r in records {
        *ids.entry(r.id.as_str()).or_default() += 1;
    }
    cmp.duplicate_ids = ids
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .map(|(id, n)| format!("id {id:?} appears {n} times"))
        .collect();
    cmp.duplicate_ids.sort();

    for (key, conns) in &want {
        let recs = got.get(key).map_or(&[][..], Vec::as_slice);
        if recs.len() < conns.len() && recs.iter().all(|r| matches_one(r, conns, service_of)) {
            for c in &conns[recs.len()..] {
                cmp.missing.push(describe_truth(c));
            }
            cmp.exact += recs.len();
            continue;
        }
        let mut want_counts: Vec<_> = conns.iter().map(|c| truth_numbers(c, service_of)).collect();
        let mut got_counts: Vec<_> = recs.iter().map(|r| record_numbers(r)).collect();
        want_counts.sort_unstable();
        got_counts.sort_unstable();
        if want_counts == got_counts {
            cmp.exact += conns.len();
        } else {
            cmp.wrong.push(format!(
                "{} expected {} record(s) {}, meterd has {}",
                describe_key(*key),
                conns.len(),
                conns
                    .iter()
                    .map(|c| describe_truth(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                if recs.is_empty() {
                    "none".to_owned()
                } else {
                    recs.iter()
                        .map(|r| describe_record(r))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
    }
    for (key, recs) in &got {
        if !want.contains_key(key) {
            for r in recs {
                cmp.unexpected
                    .push(format!("{}: {}", describe_key(*key), describe_record(r)));
            }
        }
    }
    for r in records {
        if let Some(problem) = times_out_of_order(r) {
            cmp.wrong.push(format!("{problem}: {}", describe_record(r)));
        }
    }
    cmp
}

/// `start_ns <= last_ns <= end_ns` for a record with payload, where the
/// record has all three (ledger records converted to this shape have none).
fn times_out_of_order(r: &ClosedRecord) -> Option<String> {
    let (start, last, end) = (r.start_ns?, r.last_ns?, r.end_ns?);
    if r.bytes_out + r.bytes_in == 0 {
        return None;
    }
    (last == 0 || last < start || last > end)
        .then(|| format!("last_ns {last} not within start_ns {start} ..= end_ns {end}"))
}

/// What must agree between a connection and its record: bytes out, bytes
/// in, client address, server address, service.
type Numbers = (u64, u64, IpAddr, IpAddr, String);

fn truth_numbers(c: &ConnLog, service_of: &dyn Fn(&ConnLog) -> String) -> Numbers {
    (
        c.bytes_sent,
        c.bytes_received,
        c.client_addr.to_canonical(),
        c.server_addr.to_canonical(),
        service_of(c),
    )
}

fn record_numbers(r: &ClosedRecord) -> Numbers {
    (
        r.bytes_out,
        r.bytes_in,
        r.client_addr.to_canonical(),
        r.server_addr.to_canonical(),
        r.service.clone(),
    )
}

fn matches_one(
    r: &ClosedRecord,
    conns: &[&ConnLog],
    service_of: &dyn Fn(&ConnLog) -> String,
) -> bool {
    conns
        .iter()
        .any(|c| truth_numbers(c, service_of) == record_numbers(r))
}

fn describe_key(k: Key) -> String {
    format!(
        "{:?} client {} port {} -> server port {}",
        k.protocol, k.client_addr, k.client_port, k.server_port
    )
}

fn describe_truth(c: &ConnLog) -> String {
    format!(
        "[server log: {}:{} -> {}:{} sent {} received {}{}]",
        c.client_addr,
        c.client_port,
        c.server_addr,
        c.server_port,
        c.bytes_sent,
        c.bytes_received,
        c.close
            .map_or(String::new(), |by| format!(", {by} closed first"))
    )
}

fn describe_record(r: &ClosedRecord) -> String {
    format!(
        "[meterd id {}: {}:{} -> {}:{} service {} bytes_out {} bytes_in {} flags {:?} ns {:?}..{:?} \
         last {:?}]",
        r.id,
        r.client_addr,
        r.client_port,
        r.server_addr,
        r.server_port,
        r.service,
        r.bytes_out,
        r.bytes_in,
        r.flags,
        r.start_ns,
        r.end_ns,
        r.last_ns
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::CloseBy;

    fn conn(port: u16, sent: u64, received: u64) -> ConnLog {
        ConnLog {
            protocol: Protocol::Tcp,
            client_addr: "127.0.0.1".parse().unwrap(),
            client_port: port,
            server_addr: "127.0.0.1".parse().unwrap(),
            server_port: 8080,
            bytes_sent: sent,
            bytes_received: received,
            close: Some(CloseBy::Server),
            error: None,
            accepted_unix_us: None,
            closed_unix_us: None,
            duration_us: None,
            first_payload_unix_us: None,
            last_payload_unix_us: None,
            request_arrived_unix_us: None,
        }
    }

    fn record(id: &str, port: u16, out: u64, inb: u64) -> ClosedRecord {
        let line = format!(
            r#"{{"id":"{id}","cookie":1,"protocol":"tcp","service":"web","client_addr":"127.0.0.1","client_port":{port},"server_addr":"127.0.0.1","server_port":8080,"bytes_out":{out},"bytes_in":{inb},"start_ns":1,"end_ns":3,"last_ns":2,"flags":0}}"#
        );
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn exact_records_compare_equal() {
        let truth = [conn(1000, 5, 7), conn(1001, 0, 20)];
        let recs = [record("a", 1001, 0, 20), record("b", 1000, 5, 7)];
        let cmp = compare(&truth, &recs);
        assert!(cmp.is_exact(), "{}", cmp.diff());
        assert_eq!(cmp.exact, 2);
    }

    #[test]
    fn one_byte_off_is_wrong() {
        let cmp = compare(&[conn(1000, 5, 7)], &[record("a", 1000, 5, 8)]);
        assert!(!cmp.is_exact());
        assert!(cmp.is_final());
        assert_eq!(cmp.wrong.len(), 1, "{}", cmp.diff());
        let cmp = compare(&[conn(1000, 5, 7)], &[record("a", 1000, 6, 7)]);
        assert_eq!(cmp.wrong.len(), 1, "{}", cmp.diff());
    }

    #[test]
    fn duplicates_missing_and_strays_are_reported() {
        let truth = [conn(1000, 5, 7), conn(1001, 1, 1)];
        let recs = [
            record("a", 1000, 5, 7),
            record("b", 1000, 5, 7),
            record("a", 4242, 1, 1),
        ];
        let cmp = compare(&truth, &recs);
        assert_eq!(cmp.wrong.len(), 1, "{}", cmp.diff());
        assert_eq!(cmp.missing.len(), 1, "{}", cmp.diff());
        assert_eq!(cmp.unexpected.len(), 1, "{}", cmp.diff());
        assert_eq!(cmp.duplicate_ids.len(), 1, "{}", cmp.diff());
        assert!(!cmp.is_final());
    }

    #[test]
    fn reused_client_port_needs_both_records() {
        let truth = [conn(1000, 5, 7), conn(1000, 9, 9)];
        let cmp = compare(&truth, &[record("a", 1000, 9, 9)]);
        assert_eq!(cmp.missing.len(), 1, "{}", cmp.diff());
        let cmp = compare(&truth, &[record("a", 1000, 9, 9), record("b", 1000, 5, 7)]);
        assert!(cmp.is_exact(), "{}", cmp.diff());
    }

    #[test]
    fn the_client_address_is_part_of_the_key() {
        let mut other = conn(1000, 5, 7);
        other.client_addr = "127.1.0.9".parse().unwrap();
        let cmp = compare(&[other], &[record("a", 1000, 5, 7)]);
        assert_eq!(
            (cmp.missing.len(), cmp.unexpected.len()),
            (1, 1),
            "{}",
            cmp.diff()
        );
    }

    #[test]
    fn last_payload_after_the_end_is_wrong() {
        let mut late = record("a", 1000, 5, 7);
        late.last_ns = Some(4);
        let cmp = compare(&[conn(1000, 5, 7)], &[late]);
        assert_eq!(cmp.wrong.len(), 1, "{}", cmp.diff());
    }

    #[test]
    fn a_partly_written_last_line_is_not_read_yet() {
        let text = "{\"id\":\"x\"";
        assert_eq!(parse_closed_log(text), Ok(vec![]));
        assert!(parse_closed_log("garbage\n").is_err());
    }
}
