//! The configuration file: parsing, defaults and validation.
//!
//! Owns the TOML schema and every check that can be made without touching
//! the system (the kernel module checks paths and privileges). A bad config
//! is an error naming the field, never a panic.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::tariff::{Tariff, TariffError};

/// Everything `meterd run` needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where and how the agent meters.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Money and the ledger.
    #[serde(default)]
    pub billing: BillingConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The local API where the streaming server attributes connections.
    #[serde(default)]
    pub api: ApiConfig,
    /// How the read interval follows the host's load.
    #[serde(default)]
    pub governor: crate::governor::GovernorConfig,
    /// The metered services; at least one.
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
    /// Accounts with a prepaid balance or a credit limit.
    #[serde(rename = "account", default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<AccountConfig>,
    /// Records and credit shared with other hosts through NATS JetStream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetConfig>,
}

/// `[api]`: where the streaming server tells meterd which account and
/// content a connection belongs to. A unix socket by default; a TCP address
/// must be loopback and needs a bearer token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Unix socket path (created with mode 0660). Default:
    /// `/run/meterd/<name of agent.pin_dir>.sock`, so two agents with their
    /// own pins never share a socket.
    pub socket: Option<PathBuf>,
    /// Loopback TCP address instead of the socket.
    pub listen: Option<SocketAddr>,
    /// Bearer token required on `listen`.
    pub token: Option<String>,
    /// Group that owns the unix socket (mode 0660), e.g. the streaming
    /// server's `www-data`, so it can ask `/v1/authorize`.
    pub group: Option<String>,
    /// How long an attribution for a connection not seen yet is kept.
    #[serde(with = "duration_str")]
    pub pending_ttl: Duration,
    /// At most this many attributions wait for their connection; more are
    /// refused (HTTP 503) and counted.
    pub max_pending: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: None,
            listen: None,
            token: None,
            group: None,
            pending_ttl: Duration::from_secs(60),
            max_pending: crate::attribution::DEFAULT_CAPACITY,
        }
    }
}

impl ApiConfig {
    /// The unix socket to listen on, unless `listen` is set.
    pub fn socket_path(&self, agent: &AgentConfig) -> Option<PathBuf> {
        if self.listen.is_some() {
            return None;
        }
        Some(self.socket.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "/run/meterd/{}.sock",
                instance_name(&agent.pin_dir)
            ))
        }))
    }
}

/// The name of the agent instance on `pin_dir`, for its lock, its default
/// API socket and its record in `/run/meterd`: `meterd` for the default
/// `/sys/fs/bpf/meterd`, else the canonical path with `/` as `-`. Keyed by
/// the canonical path, a symlink or `..` to the same pins is the same
/// instance, and another directory with the same name is not.
pub fn instance_name(pin_dir: &Path) -> String {
    let canonical = match (pin_dir.parent(), pin_dir.file_name()) {
        (Some(parent), Some(name)) => {
            std::fs::canonicalize(parent).map_or_else(|_| pin_dir.to_owned(), |p| p.join(name))
        }
        _ => pin_dir.to_owned(),
    };
    let canonical = std::fs::canonicalize(&canonical).unwrap_or(canonical);
    if canonical == Path::new("/sys/fs/bpf/meterd") {
        return "meterd".to_owned();
    }
    canonical
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "-")
}

/// `[[account]]`: a spending limit checked every cycle.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Account id, as the API attributes it (or a client address).
    pub id: String,
    /// Prepaid balance, minor units: the limit is reached when it is used up.
    pub prepaid_minor: Option<u64>,
    /// Credit limit, minor units.
    pub credit_limit_minor: Option<u64>,
    /// What happens when the limit is reached; default: the service's
    /// `on_limit`, else `cut`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// Refuse the account whatever its balance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
}

/// What meterd does when an account reaches its limit (the patent's check
/// processing, with consequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Record the event and run the hooks; go on serving.
    Notify,
    /// Also refuse new requests (`/v1/authorize` answers 403).
    Deny,
    /// Also end the account's live connections, in the kernel.
    Cut,
}

impl AccountConfig {
    /// The spending limit, whichever way it was given.
    pub fn limit_minor(&self) -> u64 {
        self.prepaid_minor.or(self.credit_limit_minor).unwrap_or(0)
    }
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// cgroup v2 directory whose sockets are metered (it and its
    /// descendants). Default: the root of the cgroup v2 mount.
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for meterd's pinned maps and links. Pins keep the
    /// counting going while the agent is stopped.
    pub pin_dir: PathBuf,
    /// Base read and billing interval.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// A UDP flow without a datagram for this long has ended.
    #[serde(with = "duration_str")]
    pub udp_idle_timeout: Duration,
    /// Capacity of the live-connection map. Connections beyond it are still
    /// billed at close, without a start time; the overflow is reported.
    pub max_connections: u32,
    /// Capacity of the UDP flow map: flows the server has sent to. A
    /// datagram of a new flow beyond it is not counted (reported as
    /// `udp_map_full`); changing it needs `meterd unload`, like
    /// `max_connections`.
    pub max_udp_flows: u32,
    /// Capacity of the UDP probation map (an LRU): flows only the client
    /// has spoken in, until the server's first datagram to them. Spoofed
    /// sources fill it and evict each other; it must hold the real flows
    /// that wait for their first answer while a flood goes on. Changing it
    /// needs `meterd unload`.
    pub max_udp_probation: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            cgroup: None,
            pin_dir: PathBuf::from("/sys/fs/bpf/meterd"),
            interval: Duration::from_secs(1),
            udp_idle_timeout: Duration::from_secs(30),
            max_connections: 262_144,
            max_udp_flows: 65_536,
            max_udp_probation: 16_384,
        }
    }
}

/// `[billing]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// ISO 4217 code of the currency all prices are in.
    pub currency: String,
    /// SQLite ledger file (created with mode 0600).
    pub ledger: PathBuf,
    /// Executable run when an account reaches its limit, with METERD_EVENT,
    /// METERD_ACCOUNT, METERD_SPENT_MINOR, METERD_LIMIT_MINOR set.
    pub limit_hook: Option<PathBuf>,
    /// `http://127.0.0.1:PORT/PATH` (loopback only) that receives a JSON
    /// POST when an account reaches its limit.
    pub limit_webhook: Option<String>,
    /// At most this long between writes of an open session's newer
    /// accrual and counts (structural changes, settlements and limit
    /// events are written at once; 0s: every cycle).
    #[serde(with = "duration_str")]
    pub open_write_interval: Duration,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            currency: "EUR".into(),
            ledger: PathBuf::from("/var/lib/meterd/ledger.sqlite"),
            limit_hook: None,
            limit_webhook: None,
            open_write_interval: Duration::from_secs(10),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `/metrics` (and nothing else). Loopback by default.
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` (metrics carry no accounts or clients).
    pub allow_remote: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9947)),
            allow_remote: false,
        }
    }
}

/// `[[service]]`: one metered service and its tariff.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name used in the ledger and as a metric label.
    pub name: String,
    /// Listening TCP ports of the service.
    #[serde(default)]
    pub tcp_ports: Vec<u16>,
    /// UDP ports of the service (QUIC, RTP, SRT).
    #[serde(default)]
    pub udp_ports: Vec<u16>,
    /// A viewing session ends when none of its connections moved a payload
    /// byte for this long; later bytes start a new session.
    #[serde(with = "duration_str", default = "default_session_idle")]
    pub session_idle: Duration,
    /// Default `on_limit` of the accounts it serves (an account's own
    /// setting wins); default `cut`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// Whether traffic the streaming server did not attribute is billed to
    /// its client address (default true). Set false where every request
    /// is admitted through `/v1/authorize`: the error pages the server
    /// sends on its own (e.g. secure_link's 403) then bill nobody.
    #[serde(default = "default_true")]
    pub bill_unattributed: bool,
    /// How its sessions are charged.
    pub tariff: Tariff,
}

fn default_true() -> bool {
    true
}

fn default_session_idle() -> Duration {
    Duration::from_secs(30)
}

/// What can be wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config: no [[service]] defined: meterd needs at least one service to meter")]
    NoService,
    #[error("config: service #{index} has an empty name")]
    EmptyName { index: usize },
    #[error("config: service name {name:?} is used twice")]
    DuplicateName { name: String },
    #[error("config: service {name:?} has no tcp_ports and no udp_ports")]
    NoPorts { name: String },
    #[error("config: {protocol} port 0 in service {name:?} is not a port")]
    PortZero {
        name: String,
        protocol: &'static str,
    },
    #[error("config: {protocol} port {port} is in service {first:?} and in service {second:?}")]
    PortTwice {
        protocol: &'static str,
        port: u16,
        first: String,
        second: String,
    },
    #[error(
        "config: service {name:?}: session_idle = {value:?} must be between 1s and 24h (e.g. \"30s\")"
    )]
    SessionIdle { name: String, value: Duration },
    #[error(
        "config: metrics.listen {0} is not a loopback address: set metrics.allow_remote = true to serve /metrics beyond this host"
    )]
    MetricsRemote(SocketAddr),
    #[error("config: api.group {0:?} is not a group name (letters, digits, '_', '-', '.')")]
    ApiGroup(String),
    #[error("config: api.max_pending must be between 1 and 10000000, not {0}")]
    MaxPending(usize),
    #[error("config: more than {max} services: at most {max} are supported")]
    TooManyServices { max: u32 },
    #[error("config: service {name:?}: tariff: {source}")]
    Tariff { name: String, source: TariffError },
    #[error("config: {field} = {value:?} must be between {min:?} and {max:?}")]
    DurationRange {
        field: &'static str,
        value: Duration,
        min: Duration,
        max: Duration,
    },
    #[error(
        "config: billing.currency {0:?} is not an ISO 4217 currency code (e.g. \"EUR\", \"USD\", \"JPY\")"
    )]
    Currency(String),
    #[error("config: agent.max_udp_flows must be between 1024 and 16777216, not {0}")]
    MaxUdpFlows(u32),
    #[error("config: agent.max_udp_probation must be between 1024 and 16777216, not {0}")]
    MaxUdpProbation(u32),
    #[error("config: agent.max_connections must be between 1024 and 16777216, not {0}")]
    MaxConnections(u32),
    #[error(
        "config: agent.pin_dir {0:?} must be an absolute path without '.' or '..', inside a bpffs mount such as /sys/fs/bpf (e.g. /sys/fs/bpf/meterd)"
    )]
    PinDir(PathBuf),
    #[error(
        "config: api.listen {0} is not a loopback address: the attribution API must not be reachable from outside (use a unix socket, or 127.0.0.1)"
    )]
    ApiNotLoopback(SocketAddr),
    #[error("config: api.listen needs api.token (a bearer token of at least 16 characters)")]
    ApiToken,
    #[error(
        "config: api.token has {0} characters; it needs at least 16 (e.g. `openssl rand -hex 16`)"
    )]
    ApiTokenShort(usize),
    #[error(
        "config: billing.limit_hook {path}: {why}; give the path of an executable file (chmod +x), or remove the setting"
    )]
    LimitHook { path: PathBuf, why: String },
    #[error(
        "config: service name {start:?}... ({len} characters) must be 1 to 64 characters, without control characters (it is a metric label)"
    )]
    ServiceName { start: String, len: usize },
    #[error("config: set either api.socket or api.listen, not both")]
    ApiBoth,
    #[error(
        "config: billing.limit_webhook {0:?} must be http://127.0.0.1:PORT/... or http://[::1]:PORT/... (loopback only)"
    )]
    Webhook(String),
    #[error("config: account {id:?} needs exactly one of prepaid_minor and credit_limit_minor")]
    AccountLimit { id: String },
    #[error("config: account {0:?} is defined twice")]
    AccountTwice(String),
    #[error("config: {0}")]
    Governor(String),
    #[error("config: {0}")]
    Fleet(String),
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.agent;
        check_range(
            "agent.interval",
            a.interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        check_range(
            "agent.udp_idle_timeout",
            a.udp_idle_timeout,
            Duration::from_secs(1),
            Duration::from_hours(24),
        )?;
        if !(1024..=16_777_216).contains(&a.max_udp_flows) {
            return Err(ConfigError::MaxUdpFlows(a.max_udp_flows));
        }
        if !(1024..=16_777_216).contains(&a.max_udp_probation) {
            return Err(ConfigError::MaxUdpProbation(a.max_udp_probation));
        }
        if !(1024..=16_777_216).contains(&a.max_connections) {
            return Err(ConfigError::MaxConnections(a.max_connections));
        }
        if !a.pin_dir.is_absolute()
            || a.pin_dir.components().any(|c| {
                matches!(
                    c,
                    std::path::Component::ParentDir | std::path::Component::CurDir
                )
            })
        {
            return Err(ConfigError::PinDir(a.pin_dir.clone()));
        }
        check_range(
            "billing.open_write_interval",
            self.billing.open_write_interval,
            Duration::ZERO,
            Duration::from_secs(300),
        )?;
        let c = &self.billing.currency;
        if !crate::tariff::is_iso_4217(c) {
            return Err(ConfigError::Currency(c.clone()));
        }
        if let Some(hook) = &self.billing.limit_hook {
            check_executable(hook)?;
        }
        self.validate_api()?;
        self.governor
            .validate(a.interval)
            .map_err(ConfigError::Governor)?;
        if let Some(url) = &self.billing.limit_webhook
            && crate::hooks::loopback_url(url).is_none()
        {
            return Err(ConfigError::Webhook(url.clone()));
        }
        let mut ids = std::collections::HashSet::new();
        for a in &self.accounts {
            if a.prepaid_minor.is_some() == a.credit_limit_minor.is_some() {
                return Err(ConfigError::AccountLimit { id: a.id.clone() });
            }
            if !ids.insert(a.id.as_str()) {
                return Err(ConfigError::AccountTwice(a.id.clone()));
            }
        }
        if self.services.is_empty() {
            return Err(ConfigError::NoService);
        }
        if self.services.len() > meterd_common::SERVICE_SLOTS as usize {
            return Err(ConfigError::TooManyServices {
                max: meterd_common::SERVICE_SLOTS,
            });
        }
        if !self.metrics.allow_remote && !self.metrics.listen.ip().is_loopback() {
            return Err(ConfigError::MetricsRemote(self.metrics.listen));
        }
        if let Some(g) = &self.api.group
            && (g.is_empty()
                || g.len() > 32
                || !g
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
        {
            return Err(ConfigError::ApiGroup(g.clone()));
        }
        if !(1..=10_000_000).contains(&self.api.max_pending) {
            return Err(ConfigError::MaxPending(self.api.max_pending));
        }
        if let Some(f) = &self.fleet {
            f.validate().map_err(ConfigError::Fleet)?;
        }
        self.validate_services()
    }

    fn validate_services(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        let mut tcp: HashMap<u16, &str> = HashMap::new();
        let mut udp: HashMap<u16, &str> = HashMap::new();
        for (index, s) in self.services.iter().enumerate() {
            if s.name.trim().is_empty() {
                return Err(ConfigError::EmptyName { index });
            }
            if s.name.chars().count() > 64 || s.name.chars().any(char::is_control) {
                return Err(ConfigError::ServiceName {
                    start: s.name.chars().take(32).collect(),
                    len: s.name.chars().count(),
                });
            }
            if !names.insert(s.name.as_str()) {
                return Err(ConfigError::DuplicateName {
                    name: s.name.clone(),
                });
            }
            if s.session_idle < Duration::from_secs(1) || s.session_idle > Duration::from_hours(24)
            {
                return Err(ConfigError::SessionIdle {
                    name: s.name.clone(),
                    value: s.session_idle,
                });
            }
            if s.tcp_ports.is_empty() && s.udp_ports.is_empty() {
                return Err(ConfigError::NoPorts {
                    name: s.name.clone(),
                });
            }
            for (protocol, ports, seen) in [
                ("tcp", &s.tcp_ports, &mut tcp),
                ("udp", &s.udp_ports, &mut udp),
            ] {
                for &port in ports {
                    if port == 0 {
                        return Err(ConfigError::PortZero {
                            name: s.name.clone(),
                            protocol,
                        });
                    }
                    if let Some(first) = seen.insert(port, &s.name) {
                        return Err(ConfigError::PortTwice {
                            protocol,
                            port,
                            first: first.to_owned(),
                            second: s.name.clone(),
                        });
                    }
                }
            }
            s.tariff.validate().map_err(|source| ConfigError::Tariff {
                name: s.name.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        let api = &self.api;
        if let Some(addr) = api.listen {
            if api.socket.is_some() {
                return Err(ConfigError::ApiBoth);
            }
            if !addr.ip().is_loopback() {
                return Err(ConfigError::ApiNotLoopback(addr));
            }
            match &api.token {
                None => return Err(ConfigError::ApiToken),
                Some(t) if t.len() < 16 => return Err(ConfigError::ApiTokenShort(t.len())),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The config as TOML, with every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }

    /// Whether any service meters UDP (the ingress program is needed only then).
    pub fn meters_udp(&self) -> bool {
        self.services.iter().any(|s| !s.udp_ports.is_empty())
    }
}

/// `billing.limit_hook` must be an executable file: a typo would otherwise
/// only show when an account runs out.
fn check_executable(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |why: String| ConfigError::LimitHook {
        path: path.to_owned(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(err("not executable".into()));
    }
    Ok(())
}

fn check_range(
    field: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::DurationRange {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

/// Durations written as `"500ms"`, `"1s"`, `"2m"`, `"1h"`.
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Parses `"<integer><ms|s|m|h>"`.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit: write e.g. \"500ms\", \"1s\", \"2m\""))?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| {
            if number.is_empty() {
                format!("{text:?} does not start with a whole number: write e.g. \"30s\"")
            } else {
                format!("{text:?} is too long: write at most hours, e.g. \"1h\"")
            }
        })?;
        let ms = match unit.trim() {
            "ms" => Some(n),
            "s" => n.checked_mul(1000),
            "m" | "min" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}: use ms, s, m or h"
                ));
            }
        };
        ms.map(Duration::from_millis)
            .ok_or_else(|| format!("{text:?} is too long"))
    }

    /// Renders a duration the way [`parse`] reads it.
    pub fn render(d: Duration) -> String {
        let ms = d.as_millis();
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&render(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(D::Error::custom)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_toml())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARIFF: &str = "[service.tariff]\nkind = \"volume\"\nprice_minor = 1\nunit_bytes = 1\n";

    fn service(extra: &str) -> String {
        format!("[[service]]\nname = \"web\"\ntcp_ports = [8080]\n{extra}{TARIFF}")
    }

    #[test]
    fn defaults_fill_in() {
        let c = Config::parse(&service("")).unwrap();
        assert_eq!(c.agent.interval, Duration::from_secs(1));
        assert_eq!(c.agent.pin_dir, PathBuf::from("/sys/fs/bpf/meterd"));
        assert_eq!(c.billing.currency, "EUR");
        assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9947");
        // The rendered config parses back to the same thing.
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
    }

    #[test]
    fn udp_map_sizes_are_checked() {
        let c = Config::parse(&service("")).unwrap();
        assert_eq!(
            (c.agent.max_udp_flows, c.agent.max_udp_probation),
            (65_536, 16_384)
        );
        let c = Config::parse(&format!(
            "[agent]\nmax_udp_probation = 4096\n{}",
            service("")
        ))
        .unwrap();
        assert_eq!(c.agent.max_udp_probation, 4096);
        for (key, value) in [("max_udp_probation", 100), ("max_udp_flows", 100)] {
            let e = Config::parse(&format!("[agent]\n{key} = {value}\n{}", service("")))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("agent.{key}")) && e.contains("1024"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let e = Config::parse(&service("colour = \"red\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn port_in_two_services_is_rejected() {
        let text = format!(
            "{}{}",
            service(""),
            service("").replace("\"web\"", "\"radio\"")
        );
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains("tcp port 8080") && e.contains("radio"), "{e}");
    }

    #[test]
    fn api_must_stay_local() {
        let e = Config::parse(&format!(
            "[api]\nlisten = \"0.0.0.0:9948\"\ntoken = \"0123456789abcdef\"\n{}",
            service("")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("loopback"), "{e}");
        let e = Config::parse(&format!(
            "[api]\nlisten = \"127.0.0.1:9948\"\n{}",
            service("")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("token"), "{e}");
        let e = Config::parse(&format!(
            "[billing]\nlimit_webhook = \"http://10.0.0.1/x\"\n{}",
            service("")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("loopback"), "{e}");
    }

    #[test]
    fn account_needs_one_limit() {
        let text = format!("{}[[account]]\nid = \"a\"\n", service(""));
        assert!(matches!(
            Config::parse(&text),
            Err(ConfigError::AccountLimit { .. })
        ));
        let text = format!(
            "{}[[account]]\nid = \"a\"\nprepaid_minor = 10\n",
            service("")
        );
        assert_eq!(Config::parse(&text).unwrap().accounts[0].limit_minor(), 10);
    }

    #[test]
    fn bad_values_name_the_field_and_the_fix() {
        let cases = [
            (
                "[agent]\ninterval = \"99999999999999999999s\"\n".to_owned(),
                "too long",
            ),
            (
                "[api]\nlisten = \"127.0.0.1:9948\"\ntoken = \"short\"\n".to_owned(),
                "api.token has 5 characters",
            ),
            ("[billing]\ncurrency = \"XYZ\"\n".to_owned(), "ISO 4217"),
            (
                "[agent]\npin_dir = \"/sys/fs/bpf/../bpf/x\"\n".to_owned(),
                "without '.' or '..'",
            ),
            (
                "[billing]\nlimit_hook = \"/nonexistent/hook\"\n".to_owned(),
                "billing.limit_hook /nonexistent/hook",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("hook");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let cases = cases.into_iter().chain([(
            format!("[billing]\nlimit_hook = \"{}\"\n", plain.display()),
            "not executable",
        )]);
        for (text, want) in cases {
            let e = Config::parse(&format!("{text}{}", service("")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = Config::parse(&service("").replace("\"web\"", "\"w\\u0007b\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("control characters"), "{e}");
        let long = "x".repeat(100);
        let e = Config::parse(&service("").replace("\"web\"", &format!("\"{long}\"")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 to 64 characters"), "{e}");
    }

    #[test]
    fn no_service_is_rejected() {
        assert!(matches!(Config::parse(""), Err(ConfigError::NoService)));
    }

    #[test]
    fn durations_parse_and_render() {
        assert_eq!(
            duration_str::parse("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(duration_str::parse("2m").unwrap(), Duration::from_secs(120));
        assert!(duration_str::parse("5").is_err());
        assert!(duration_str::parse("5 parsecs").is_err());
        assert_eq!(duration_str::render(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_str::render(Duration::from_secs(60)), "1m");
        let e = Config::parse(&format!("[agent]\ninterval = \"10ms\"\n{}", service("")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.interval"), "{e}");
    }
}
