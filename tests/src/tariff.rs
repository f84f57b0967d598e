//! The charging rules of the contract, written out again on the test side,
//! and the `[[service]]` config they come from.
//!
//! The tests compute what a session must cost from the bytes the server
//! logged (or the duration meterd exported) with these rules, never with
//! meterd's own tariff code, so an agent that gets the arithmetic wrong
//! cannot agree with itself. Rules (CONTRACT.md): quantity = bytes in the
//! counted direction(s), or connection time in ns; per_started_unit:
//! ceil(q/unit) * price; floor: floor(q/unit) * price; pro_rata:
//! q * price / unit; the total is rounded half-up to a whole minor unit,
//! then raised to the minimum charge.
//!
//! Does not own: comparing records (`ledger`, `records`).

use std::{fmt::Write as _, time::Duration};

/// Millionths of a minor unit per minor unit.
pub const MICRO: u128 = 1_000_000;

/// Nanoseconds per second.
const NS_PER_S: u128 = 1_000_000_000;

/// Nanoseconds per millisecond.
const NS_PER_MS: u128 = 1_000_000;

/// How the last partial unit is charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// A started unit costs a whole one.
    PerStartedUnit,
    /// The exact fraction.
    ProRata,
    /// Only whole units.
    Floor,
}

impl Rounding {
    fn toml(self) -> &'static str {
        match self {
            Rounding::PerStartedUnit => "per_started_unit",
            Rounding::ProRata => "pro_rata",
            Rounding::Floor => "floor",
        }
    }
}

/// Which bytes a volume tariff counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Server to client (`bytes_out`).
    Egress,
    /// Client to server (`bytes_in`).
    Ingress,
    /// Both.
    Both,
}

impl Direction {
    fn toml(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
            Direction::Both => "both",
        }
    }
}

/// What a unit of a tariff is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unit {
    /// `unit_bytes`: the config's text (e.g. `"1MB"`) and the bytes the
    /// test takes it to mean (10^6): both are written by the test.
    Bytes {
        /// As the config says it.
        text: String,
        /// What the contract says it means.
        bytes: u64,
        /// Which direction(s) count.
        direction: Direction,
    },
    /// `unit_seconds`.
    Seconds(u64),
}

/// One service's tariff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tariff {
    /// Price of one unit in millionths of a minor unit.
    pub price_micro: u64,
    /// The unit.
    pub unit: Unit,
    /// Rule for the last partial unit.
    pub rounding: Rounding,
    /// `minimum_charge_minor`.
    pub minimum_minor: u64,
}

impl Tariff {
    /// A volume tariff of `price_minor` whole minor units per `unit`
    /// (`("1MB", 1_000_000)`).
    pub fn volume(
        price_minor: u64,
        unit: (&str, u64),
        direction: Direction,
        rounding: Rounding,
    ) -> Tariff {
        Tariff {
            price_micro: price_minor * MICRO as u64,
            unit: Unit::Bytes {
                text: unit.0.to_owned(),
                bytes: unit.1,
                direction,
            },
            rounding,
            minimum_minor: 0,
        }
    }

    /// A time tariff of `price_micro` millionths of a minor unit per
    /// `unit_seconds`.
    pub fn time(price_micro: u64, unit_seconds: u64, rounding: Rounding) -> Tariff {
        Tariff {
            price_micro,
            unit: Unit::Seconds(unit_seconds),
            rounding,
            minimum_minor: 0,
        }
    }

    /// `"volume"` or `"time"` (the `tariff_kind` metric label).
    pub fn kind(&self) -> &'static str {
        match self.unit {
            Unit::Bytes { .. } => "volume",
            Unit::Seconds(_) => "time",
        }
    }

    /// The charge, in minor units, of a session of `quantity` (bytes, or
    /// ns of connection time).
    pub fn charge_for_quantity(&self, quantity: u128) -> u64 {
        let unit = match &self.unit {
            Unit::Bytes { bytes, .. } => u128::from(*bytes),
            Unit::Seconds(s) => u128::from(*s) * NS_PER_S,
        };
        let price = u128::from(self.price_micro);
        // The exact charge in micro-minor units is numerator / denominator.
        let (numerator, denominator) = match self.rounding {
            Rounding::PerStartedUnit => (quantity.div_ceil(unit) * price, 1),
            Rounding::Floor => (quantity / unit * price, 1),
            Rounding::ProRata => (quantity * price, unit),
        };
        // Half-up to whole minor units: floor(x + 1/2) with x = n / (d * 10^6).
        let d = denominator * MICRO;
        let minor = (2 * numerator + d) / (2 * d);
        u64::try_from(minor).unwrap().max(self.minimum_minor)
    }

    /// The charges a session with these exported numbers may have: one
    /// value for a volume tariff; for a time tariff, the charges at both
    /// ends of the nanosecond range that `duration_ms` stands for (the
    /// ledger exports whole milliseconds of a nanosecond duration), which
    /// are the same unless a unit or rounding boundary falls inside that
    /// millisecond. Returns `(lowest, highest)`.
    pub fn expected_charge(&self, bytes_out: u64, bytes_in: u64, duration_ms: u64) -> (u64, u64) {
        match &self.unit {
            Unit::Bytes { direction, .. } => {
                let q = match direction {
                    Direction::Egress => u128::from(bytes_out),
                    Direction::Ingress => u128::from(bytes_in),
                    Direction::Both => u128::from(bytes_out) + u128::from(bytes_in),
                };
                let c = self.charge_for_quantity(q);
                (c, c)
            }
            Unit::Seconds(_) => {
                let low = u128::from(duration_ms) * NS_PER_MS;
                (
                    self.charge_for_quantity(low),
                    self.charge_for_quantity(low + NS_PER_MS - 1),
                )
            }
        }
    }

    fn toml(&self) -> String {
        let mut out = String::from("[service.tariff]\n");
        let price = if u128::from(self.price_micro).is_multiple_of(MICRO) {
            (u128::from(self.price_micro) / MICRO).to_string()
        } else {
            let int = u128::from(self.price_micro) / MICRO;
            let frac = format!("{:06}", u128::from(self.price_micro) % MICRO);
            format!("\"{int}.{}\"", frac.trim_end_matches('0'))
        };
        match &self.unit {
            Unit::Bytes {
                text, direction, ..
            } => {
                let _ = write!(
                    out,
                    "kind = \"volume\"\nprice_minor = {price}\nunit_bytes = \"{text}\"\n\
                     direction = \"{}\"\n",
                    direction.toml()
                );
            }
            Unit::Seconds(s) => {
                let _ = write!(
                    out,
                    "kind = \"time\"\nprice_minor = {price}\nunit_seconds = {s}\n"
                );
            }
        }
        let _ = write!(
            out,
            "rounding = \"{}\"\nminimum_charge_minor = {}\n",
            self.rounding.toml(),
            self.minimum_minor
        );
        out
    }
}

/// A `[[service]]` of the agent's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Its name (ledger `service`, metric label).
    pub name: String,
    /// Metered TCP ports.
    pub tcp_ports: Vec<u16>,
    /// Metered UDP ports.
    pub udp_ports: Vec<u16>,
    /// `session_idle`: silence that ends a viewing session; `None` leaves
    /// it out of the config (the agent's default).
    pub session_idle: Option<Duration>,
    /// `bill_unattributed`; `None` leaves it out (the agent's default, true).
    pub bill_unattributed: Option<bool>,
    /// How it charges.
    pub tariff: Tariff,
}

impl Service {
    /// A TCP service on `ports`.
    pub fn tcp(name: &str, ports: &[u16], tariff: Tariff) -> Service {
        Service {
            name: name.to_owned(),
            tcp_ports: ports.to_vec(),
            udp_ports: Vec::new(),
            session_idle: None,
            bill_unattributed: None,
            tariff,
        }
    }

    /// The `[[service]]` table with its tariff.
    pub fn toml(&self) -> String {
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let idle = self.session_idle.map_or_else(String::new, |d| {
            let ms = d.as_millis();
            if ms.is_multiple_of(1000) {
                format!("session_idle = \"{}s\"\n", ms / 1000)
            } else {
                format!("session_idle = \"{ms}ms\"\n")
            }
        });
        let unattributed = self
            .bill_unattributed
            .map_or_else(String::new, |b| format!("bill_unattributed = {b}\n"));
        format!(
            "[[service]]\nname = \"{}\"\ntcp_ports = [{}]\nudp_ports = [{}]\n{idle}{unattributed}{}",
            self.name,
            list(&self.tcp_ports),
            list(&self.udp_ports),
            self.tariff.toml()
        )
    }
}

/// The service of `services` that meters TCP `port`.
pub fn service_of_port(services: &[Service], port: u16) -> &Service {
    services
        .iter()
        .find(|s| s.tcp_ports.contains(&port) || s.udp_ports.contains(&port))
        .unwrap_or_else(|| panic!("no service meters port {port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: (&str, u64) = ("1MB", 1_000_000);

    #[test]
    fn volume_rules() {
        let started = Tariff::volume(5, MB, Direction::Egress, Rounding::PerStartedUnit);
        assert_eq!(started.expected_charge(2_500_000, 9, 0), (15, 15));
        assert_eq!(started.expected_charge(1_000_000, 0, 0), (5, 5));
        assert_eq!(started.expected_charge(1_000_001, 0, 0), (10, 10));
        assert_eq!(started.expected_charge(0, 5_000_000, 0), (0, 0));
        let floor = Tariff::volume(5, MB, Direction::Both, Rounding::Floor);
        assert_eq!(floor.expected_charge(1_500_000, 600_000, 0), (10, 10));
        let pro = Tariff::volume(5, MB, Direction::Ingress, Rounding::ProRata);
        // 2.3 units * 5 = 11.5 -> 12 (half-up); 2.29 * 5 = 11.45 -> 11.
        assert_eq!(pro.expected_charge(0, 2_300_000, 0), (12, 12));
        assert_eq!(pro.expected_charge(0, 2_290_000, 0), (11, 11));
    }

    #[test]
    fn time_rules_cover_the_exported_millisecond() {
        let started = Tariff::time(10_000_000, 1, Rounding::PerStartedUnit);
        assert_eq!(started.expected_charge(0, 0, 2_503), (30, 30));
        // 2000 ms exported: 2.000000000 s costs 2 units, 2.000000001 s three.
        assert_eq!(started.expected_charge(0, 0, 2_000), (20, 30));
        let pro = Tariff::time(2_500_000, 1, Rounding::ProRata);
        // 1.7 s * 2.5 = 4.25 -> 4; 3.3 s * 2.5 = 8.25 -> 8.
        assert_eq!(pro.expected_charge(0, 0, 1_705), (4, 4));
        assert_eq!(pro.expected_charge(0, 0, 3_304), (8, 8));
    }

    #[test]
    fn minimum_and_toml() {
        let mut t = Tariff::time(2_500_000, 1, Rounding::ProRata);
        t.minimum_minor = 7;
        assert_eq!(t.expected_charge(0, 0, 10), (7, 7));
        let mut service = Service::tcp("live", &[1, 2], t);
        let toml = service.toml();
        assert!(toml.contains("price_minor = \"2.5\"\n"), "{toml}");
        assert!(toml.contains("tcp_ports = [1, 2]\n"), "{toml}");
        assert!(!toml.contains("session_idle"), "{toml}");
        service.session_idle = Some(Duration::from_secs(5));
        let toml = service.toml();
        assert!(
            toml.contains("udp_ports = []\nsession_idle = \"5s\"\n[service.tariff]\n"),
            "{toml}"
        );
    }
}
