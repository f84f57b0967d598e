//! What `meterd-traffic` says on the wire and in its logs, shared by the tool
//! and the harness that reads its output.
//!
//! Owns: the request line of the TCP protocol, the UDP `GET` datagram, the
//! server's per-connection log line, the client's summary and the payload
//! pattern. Does not own: the sockets (the `meterd-traffic` binary) or the
//! comparison with meterd's records (`records`).

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Which side of a TCP connection sends its FIN first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseBy {
    /// The server shuts down its write side first and drains until EOF
    /// (the server's socket ends in FIN_WAIT2 -> TIME_WAIT).
    Server,
    /// The client shuts down first; the server reads EOF, then closes
    /// (the server's socket ends in CLOSE_WAIT -> LAST_ACK).
    Client,
}

impl fmt::Display for CloseBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseBy::Server => "server",
            CloseBy::Client => "client",
        })
    }
}

impl FromStr for CloseBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "server" => Ok(CloseBy::Server),
            "client" => Ok(CloseBy::Client),
            other => Err(format!("close must be `server` or `client`, not `{other}`")),
        }
    }
}

/// The one line a TCP client sends first: `GET <down> <up> <close>\n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Bytes the server sends to the client.
    pub down: u64,
    /// Bytes the client sends after it has received all of `down`.
    pub up: u64,
    /// Who closes first.
    pub close: CloseBy,
}

impl Request {
    /// The request line, newline included.
    pub fn line(&self) -> String {
        format!("GET {} {} {}\n", self.down, self.up, self.close)
    }

    /// Parses a request line (without or with its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut words = line.split_ascii_whitespace();
        let bad = || format!("bad request line {line:?}: want `GET <down> <up> <server|client>`");
        if words.next() != Some("GET") {
            return Err(bad());
        }
        let down = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let up = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let close = words.next().ok_or_else(bad)?.parse()?;
        if words.next().is_some() {
            return Err(bad());
        }
        Ok(Request { down, up, close })
    }
}

/// A UDP datagram asking the server for `bytes` in datagrams of `size`
/// payload bytes: `GET <bytes> <size>`. The request datagram itself is
/// payload the server received like any other.
pub fn udp_get(bytes: u64, size: usize) -> String {
    format!("GET {bytes} {size}")
}

/// Parses a UDP `GET` datagram; `None` for any other datagram.
pub fn parse_udp_get(payload: &[u8]) -> Option<(u64, usize)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut words = text.split_ascii_whitespace();
    if words.next()? != "GET" {
        return None;
    }
    let bytes = words.next()?.parse().ok()?;
    let size: usize = words.next()?.parse().ok()?;
    (words.next().is_none() && size > 0).then_some((bytes, size))
}

/// Transport of a logged connection or flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A TCP connection.
    Tcp,
    /// A UDP flow (one client address and port).
    Udp,
}

/// One line of a `meterd-traffic` server log: what the server application's
/// own socket calls returned for one connection (TCP) or one client (UDP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnLog {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Peer address as the server's socket reported it.
    pub client_addr: IpAddr,
    /// Peer port.
    pub client_port: u16,
    /// Local address the connection arrived on.
    pub server_addr: IpAddr,
    /// Local port the connection arrived on.
    pub server_port: u16,
    /// Sum of what `write`/`send_to` returned.
    pub bytes_sent: u64,
    /// Sum of what `read`/`recv_from` returned; for TCP this includes the
    /// request line.
    pub bytes_received: u64,
    /// Who closed first, as requested (TCP only).
    pub close: Option<CloseBy>,
    /// Set when the connection did not follow the protocol or failed; the
    /// byte counts are still what the socket calls returned.
    pub error: Option<String>,
    /// TCP: wall-clock time (µs since the Unix epoch) when `accept` returned
    /// the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_unix_us: Option<u64>,
    /// TCP: wall-clock time (µs since the Unix epoch) right after the
    /// server's `close`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_unix_us: Option<u64>,
    /// TCP: the connection's life as the server measured it on the monotonic
    /// clock, from `accept` returning to `close` returning, in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// Wall-clock µs since the Unix epoch of the first payload: when the
    /// first `read`/`recv_from` returned bytes (TCP: the request line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_payload_unix_us: Option<u64>,
    /// Wall-clock µs since the Unix epoch of the last payload: the later of
    /// the last `read`/`recv_from` that returned bytes and, after the last
    /// `write`/`send_to`, the moment the client had acknowledged all of it
    /// (TCP: the send queue, `SIOCOUTQ`, emptied). What a kernel counter
    /// of acknowledged and received bytes last moved at; a `write`
    /// returning only means the bytes are in the socket's buffer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_payload_unix_us: Option<u64>,
    /// TCP: wall-clock µs since the Unix epoch when the kernel received the
    /// request line, if it had already waited at least a jiffy when the
    /// server began to serve the connection (a busy server's accept
    /// backlog); from `TCP_INFO`, at jiffy resolution. The kernel counted
    /// the bytes then, not when the server got round to reading them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_arrived_unix_us: Option<u64>,
}

impl ConnLog {
    /// When the first payload reached the server's kernel: the request
    /// line's arrival if it waited for the server, else the first `read`.
    pub fn kernel_first_payload_unix_us(&self) -> Option<u64> {
        match (self.request_arrived_unix_us, self.first_payload_unix_us) {
            (Some(arrived), Some(read)) => Some(arrived.min(read)),
            (arrived, read) => read.or(arrived),
        }
    }

    /// Milliseconds from the first to the last payload (see the fields), as
    /// the server's clock measured them; `None` without both timestamps.
    pub fn payload_span_ms(&self) -> Option<i64> {
        let (first, last) = (self.first_payload_unix_us?, self.last_payload_unix_us?);
        Some(i64::try_from(last.saturating_sub(first) / 1000).unwrap_or(i64::MAX))
    }
}

/// What a TCP client saw of one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConn {
    /// Local address of the client's socket (its `--source`, or what the
    /// kernel picked).
    pub client_addr: IpAddr,
    /// Local port the kernel picked for the client.
    pub client_port: u16,
    /// Server port connected to.
    pub server_port: u16,
    /// Payload bytes read, including any unexpected extra before EOF.
    pub bytes_received: u64,
    /// Payload bytes written, request line included.
    pub bytes_sent: u64,
    /// Who closed first.
    pub close: CloseBy,
}

/// Printed by `meterd-traffic tcp-client` on stdout when all its
/// connections finished exactly as requested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSummary {
    /// One entry per connection, in the order they finished.
    pub connections: Vec<ClientConn>,
}

/// Printed by `meterd-traffic udp-client` on stdout: datagram payload totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpClientSummary {
    /// Local address of the client's socket.
    pub client_addr: IpAddr,
    /// Local port of the client's socket.
    pub client_port: u16,
    /// Server port.
    pub server_port: u16,
    /// Payload bytes sent, `GET` datagrams included.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
}

/// Byte `offset` of every payload stream: a 251-cycle (prime, so it does not
/// line up with buffer sizes) that lets either side check what it received.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A buffer of the pattern from which any `len <= PATTERN_WINDOW` bytes at
/// any stream offset can be sliced without copying: see [`pattern_slice`].
pub fn pattern_buffer() -> Vec<u8> {
    (0..(PATTERN_WINDOW + 251) as u64)
        .map(pattern_byte)
        .collect()
}

/// Largest slice [`pattern_slice`] hands out.
pub const PATTERN_WINDOW: usize = 251 * 256;

/// `len` pattern bytes starting at stream offset `offset`, from a
/// [`pattern_buffer`].
pub fn pattern_slice(buffer: &[u8], offset: u64, len: usize) -> &[u8] {
    let start = (offset % 251) as usize;
    &buffer[start..start + len.min(PATTERN_WINDOW)]
}

/// Index of the first byte of `data` (at stream offset `offset`) that is not
/// the pattern.
pub fn pattern_mismatch(data: &[u8], offset: u64) -> Option<usize> {
    data.iter()
        .enumerate()
        .position(|(i, &b)| b != pattern_byte(offset + i as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_round_trips() {
        let r = Request {
            down: 10,
            up: 3,
            close: CloseBy::Client,
        };
        assert_eq!(r.line(), "GET 10 3 client\n");
        assert_eq!(Request::parse(&r.line()), Ok(r));
        assert!(Request::parse("GET 10 3").is_err());
        assert!(Request::parse("GET 10 3 both\n").is_err());
        assert!(Request::parse("PUT 1 2 server").is_err());
    }

    #[test]
    fn udp_get_round_trips() {
        assert_eq!(
            parse_udp_get(udp_get(5000, 1200).as_bytes()),
            Some((5000, 1200))
        );
        assert_eq!(parse_udp_get(b"GET 1 0"), None);
        assert_eq!(parse_udp_get(&[7; 100]), None);
    }

    #[test]
    fn pattern_slices_continue_the_stream() {
        let buf = pattern_buffer();
        let a = pattern_slice(&buf, 1000, 300);
        assert_eq!(pattern_mismatch(a, 1000), None);
        assert_eq!(pattern_mismatch(a, 1001), Some(0));
        assert_eq!(pattern_slice(&buf, 7, usize::MAX).len(), PATTERN_WINDOW);
    }
}
