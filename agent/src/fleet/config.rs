//! `[fleet]`: how this host reaches the fleet's NATS JetStream, under which
//! name, and the names of what it writes there. Validation names the field
//! and the fix; nothing here touches the network.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::duration_str;

/// `[fleet]`: absent on a single host, which then needs no NATS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// NATS servers, e.g. `["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]`;
    /// `tls://` for TLS. A single string is taken as a list of one.
    #[serde(deserialize_with = "one_or_many")]
    pub nats_url: Vec<String>,
    /// Token authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// User and password authentication (both or neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A file holding an nkey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// A CA certificate (PEM) to verify the servers by, for `tls://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// This host's name in subjects, keys and records. Default: the
    /// machine's hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// The JetStream stream of records.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subjects are `<subject_prefix>.<host_id>.<kind>`.
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// The key-value bucket of per-host cumulative spend.
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// Replicas of the stream and the bucket when meterd creates them.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// An interim record of each open viewing session this often.
    #[serde(with = "duration_str", default = "default_interim")]
    pub interim_interval: Duration,
    /// Publishes awaiting their acknowledgement at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Records shipped per second at most, so draining a backlog does not
    /// take the billing cycle's CPU.
    #[serde(default = "default_rate")]
    pub max_publish_rate: u32,
}

fn default_stream() -> String {
    "METERD".to_owned()
}
fn default_prefix() -> String {
    "meterd".to_owned()
}
fn default_bucket() -> String {
    "meterd_spend".to_owned()
}
fn default_replicas() -> usize {
    3
}
fn default_interim() -> Duration {
    Duration::from_secs(300)
}
fn default_in_flight() -> usize {
    256
}
fn default_rate() -> u32 {
    5_000
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(s)) => Ok(vec![s]),
        Ok(OneOrMany::Many(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom(
            "fleet.nats_url must be a URL or a list of URLs, e.g. [\"nats://127.0.0.1:4222\"]",
        )),
    }
}

/// A name usable as one NATS subject token and key token.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FleetConfig {
    /// What is wrong, naming the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.nats_url.is_empty() {
            return Err(
                "fleet.nats_url is empty: list at least one server, e.g. [\"nats://127.0.0.1:4222\"]"
                    .into(),
            );
        }
        for url in &self.nats_url {
            let scheme_ok = ["nats://", "tls://"].iter().any(|s| url.starts_with(s));
            if !scheme_ok || url.len() <= "nats://".len() {
                return Err(format!(
                    "fleet.nats_url {url:?} must start with nats:// or tls://, e.g. \"nats://10.0.0.1:4222\""
                ));
            }
        }
        let creds = [
            self.token.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.nkey_seed_file.is_some(),
        ];
        if creds.iter().filter(|c| **c).count() > 1 {
            return Err(
                "fleet: set one of token, user and password, or nkey_seed_file, not several".into(),
            );
        }
        if self.user.is_some() != self.password.is_some() {
            return Err("fleet.user and fleet.password go together: set both or neither".into());
        }
        if let Some(host) = &self.host_id
            && !is_token(host)
        {
            return Err(format!(
                "fleet.host_id {host:?} must be 1 to 64 letters, digits, '-' or '_' (it is a subject token)"
            ));
        }
        for (field, value) in [
            ("stream", &self.stream),
            ("bucket", &self.bucket),
            ("subject_prefix", &self.subject_prefix),
        ] {
            if !is_token(value) {
                return Err(format!(
                    "fleet.{field} {value:?} must be 1 to 64 letters, digits, '-' or '_'"
                ));
            }
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!(
                "fleet.replicas must be between 1 and 5 (JetStream's limit), not {}",
                self.replicas
            ));
        }
        if self.interim_interval < Duration::from_secs(1)
            || self.interim_interval > Duration::from_hours(24)
        {
            return Err(format!(
                "fleet.interim_interval {:?} must be between 1s and 24h (e.g. \"5m\")",
                self.interim_interval
            ));
        }
        if !(1..=65_536).contains(&self.max_in_flight) {
            return Err(format!(
                "fleet.max_in_flight must be between 1 and 65536, not {}",
                self.max_in_flight
            ));
        }
        if self.max_publish_rate == 0 {
            return Err("fleet.max_publish_rate must be at least 1 record per second".into());
        }
        Ok(())
    }

    /// This host's id: `host_id`, else the hostname made a subject token.
    pub fn host(&self) -> String {
        if let Some(h) = &self.host_id {
            return h.clone();
        }
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let token: String = name
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        if token.is_empty() {
            "host".to_owned()
        } else {
            token
        }
    }

    /// The subject of one kind of record from `host`.
    pub fn subject(&self, host: &str, kind: &str) -> String {
        format!("{}.{host}.{kind}", self.subject_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FleetConfig, String> {
        let c: FleetConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn defaults_and_one_url() {
        let c = parse("nats_url = \"nats://127.0.0.1:4222\"").unwrap();
        assert_eq!(c.nats_url, ["nats://127.0.0.1:4222"]);
        assert_eq!((c.stream.as_str(), c.replicas), ("METERD", 3));
        assert_eq!(c.interim_interval, Duration::from_secs(300));
        assert_eq!(c.subject("h1", "session"), "meterd.h1.session");
    }

    #[test]
    fn bad_fields_are_named() {
        for (text, field) in [
            ("nats_url = []", "fleet.nats_url"),
            ("nats_url = \"http://x\"", "nats:// or tls://"),
            ("nats_url = 5", "fleet.nats_url"),
            (
                "nats_url = \"nats://a:1\"\nhost_id = \"a.b\"",
                "fleet.host_id",
            ),
            ("nats_url = \"nats://a:1\"\nreplicas = 7", "fleet.replicas"),
            ("nats_url = \"nats://a:1\"\nuser = \"u\"", "fleet.password"),
            (
                "nats_url = \"nats://a:1\"\ntoken = \"t\"\nnkey_seed_file = \"/x\"",
                "not several",
            ),
            (
                "nats_url = \"nats://a:1\"\nstream = \"a b\"",
                "fleet.stream",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
