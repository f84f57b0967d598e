//! What one fleet record looks like on the stream, and the names it goes
//! by: its idempotent id (the `Nats-Msg-Id`), its subject, and the KV keys
//! of per-host spend. Pure: no I/O.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The kinds of record a host ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A settled viewing session, with its settlement.
    Session,
    /// An open session's running totals, every `interim_interval`.
    Interim,
    /// An account reached its limit.
    Limit,
    /// A prepaid top-up.
    Credit,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Session => "session",
            Kind::Interim => "interim",
            Kind::Limit => "limit",
            Kind::Credit => "credit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "session" => Kind::Session,
            "interim" => Kind::Interim,
            "limit" => Kind::Limit,
            "credit" => Kind::Credit,
            _ => return None,
        })
    }
}

/// One record as published: the payload of a stream message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// `<host>:<kind>:<ledger id>`: unique in the fleet, the same every
    /// time this record is published, and the `Nats-Msg-Id`.
    pub id: String,
    pub host: String,
    pub kind: Kind,
    /// The ledger's record: for a session, exactly the row of
    /// `meterd ledger export`.
    pub record: serde_json::Value,
}

/// A record's fleet-wide id.
pub fn record_id(host: &str, kind: Kind, ledger_id: &str) -> String {
    format!("{host}:{}:{ledger_id}", kind.as_str())
}

/// An account name as one KV key token: letters, digits, `-` and `_` stay,
/// every other byte is `=XX` (hex), so any account name has one key and
/// different names never share one.
pub fn key_token(account: &str) -> String {
    let mut out = String::with_capacity(account.len());
    for b in account.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
    if out.is_empty() { "=".to_owned() } else { out }
}

/// The inverse of [`key_token`]; `None` for a token it does not make.
pub fn account_of(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The KV key of one host's cumulative figures for one account.
pub fn spend_key(account: &str, host: &str) -> String {
    format!("spend.{}.{host}", key_token(account))
}

/// `(account, host)` of a spend key.
pub fn parse_spend_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.split('.');
    let (Some("spend"), Some(account), Some(host), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((account_of(account)?, host.to_owned()))
}

/// One host's cumulative figures for one account: idempotent, since a
/// cumulative value written twice changes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    /// Everything charged to the account on that host, in millionths of a
    /// minor unit.
    pub spent_micro: i64,
    /// Top-ups recorded on that host, minor units.
    pub credited_minor: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_round_trip() {
        assert_eq!(spend_key("alice", "h1"), "spend.alice.h1");
        assert_eq!(spend_key("a.b c", "h1"), "spend.a=2Eb=20c.h1");
        assert_eq!(
            parse_spend_key("spend.a=2Eb=20c.h1"),
            Some(("a.b c".to_owned(), "h1".to_owned()))
        );
        assert_eq!(parse_spend_key("spend.a.b.c"), None);
        assert_eq!(parse_spend_key("other.a.b"), None);
        assert_eq!(account_of("=zz"), None);
    }

    proptest! {
        #[test]
        fn any_account_has_one_key_token(a in ".{0,40}", b in ".{0,40}") {
            let (ta, tb) = (key_token(&a), key_token(&b));
            prop_assert!(ta.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_=".contains(&c)));
            prop_assert_eq!(account_of(&ta), Some(a.clone()));
            prop_assert_eq!(ta == tb, a == b);
        }
    }
}
