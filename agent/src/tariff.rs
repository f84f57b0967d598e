//! Tariffs: what a service charges per unit of data or of time.
//!
//! Owns the tariff schema and its validation. Prices are exact: a price is an
//! integer number of millionths of the currency's minor unit, so "0.002 cent
//! per MB" is representable and no float ever touches money.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Millionths of a minor unit per minor unit.
pub const MICRO: u64 = 1_000_000;

/// The active ISO 4217 alphabetic currency codes.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB \
BOV BRL BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP \
DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK \
JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP \
MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD \
RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD \
TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR \
XOF XPD XPF XPT XSU XTS XUA YER ZAR ZMW ZWG ZWL";

/// Whether `code` is an ISO 4217 currency code.
pub fn is_iso_4217(code: &str) -> bool {
    code.len() == 3 && ISO_4217.split_ascii_whitespace().any(|c| c == code)
}

/// A service's tariff.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Tariff {
    /// Per unit of bytes.
    Volume(VolumeTariff),
    /// Per unit of connection time.
    Time(TimeTariff),
}

/// `kind = "volume"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeTariff {
    /// Price of one unit, in minor units (a decimal string allows fractions).
    pub price_minor: Price,
    /// Bytes per unit: an integer, or a string such as "1MB" or "1GiB".
    pub unit_bytes: ByteSize,
    /// Which direction(s) count.
    #[serde(default)]
    pub direction: Direction,
    /// How the last partial unit is charged at settlement.
    #[serde(default)]
    pub rounding: Rounding,
    /// Smallest charge of a settled session, in minor units.
    #[serde(default)]
    pub minimum_charge_minor: u64,
}

/// `kind = "time"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeTariff {
    /// Price of one unit, in minor units (a decimal string allows fractions).
    pub price_minor: Price,
    /// Seconds per unit.
    pub unit_seconds: u64,
    /// How the last partial unit is charged at settlement.
    #[serde(default)]
    pub rounding: Rounding,
    /// Smallest charge of a settled session, in minor units.
    #[serde(default)]
    pub minimum_charge_minor: u64,
}

/// Which bytes a volume tariff counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Bytes delivered to the client.
    #[default]
    Egress,
    /// Bytes received from the client.
    Ingress,
    /// Both.
    Both,
}

/// Settlement rule for the last, partial unit (patent step S18).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// A started unit is a whole one.
    #[default]
    PerStartedUnit,
    /// The exact fraction, rounded half-up to the minor unit.
    ProRata,
    /// Only whole units are charged.
    Floor,
}

/// Unit price in millionths of a minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Price {
    /// Millionths of a minor unit.
    pub micro: u64,
}

/// Bytes per volume unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// What can be wrong with a tariff.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TariffError {
    #[error("unit_bytes must be at least 1")]
    ZeroBytes,
    #[error("unit_seconds must be at least 1")]
    ZeroSeconds,
    #[error("unit_seconds {0} is more than a year")]
    AbsurdSeconds(u64),
    #[error("price_minor {0} is absurd (more than 10^9 minor units per unit)")]
    AbsurdPrice(Price),
    #[error("minimum_charge_minor {0} is absurd (more than 10^9)")]
    AbsurdMinimum(u64),
}

const MAX_PRICE_MINOR: u64 = 1_000_000_000;

impl Tariff {
    /// Rejects zero units and absurd amounts.
    pub fn validate(&self) -> Result<(), TariffError> {
        let (price, minimum) = match self {
            Self::Volume(v) => {
                if v.unit_bytes.0 == 0 {
                    return Err(TariffError::ZeroBytes);
                }
                (v.price_minor, v.minimum_charge_minor)
            }
            Self::Time(t) => {
                if t.unit_seconds == 0 {
                    return Err(TariffError::ZeroSeconds);
                }
                if t.unit_seconds > 366 * 86_400 {
                    return Err(TariffError::AbsurdSeconds(t.unit_seconds));
                }
                (t.price_minor, t.minimum_charge_minor)
            }
        };
        if price.micro > MAX_PRICE_MINOR * MICRO {
            return Err(TariffError::AbsurdPrice(price));
        }
        if minimum > MAX_PRICE_MINOR {
            return Err(TariffError::AbsurdMinimum(minimum));
        }
        Ok(())
    }

    /// `"volume"` or `"time"`: the tariff-kind metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Volume(_) => "volume",
            Self::Time(_) => "time",
        }
    }
}

/// Nanoseconds per second, for time tariffs (durations are kernel ns).
const NS_PER_S: u64 = 1_000_000_000;

impl Tariff {
    /// The quantity this tariff charges for: bytes in the counted
    /// direction(s), or nanoseconds of connection time.
    pub fn quantity(&self, bytes_out: u64, bytes_in: u64, elapsed_ns: u64) -> u64 {
        match self {
            Self::Volume(v) => match v.direction {
                Direction::Egress => bytes_out,
                Direction::Ingress => bytes_in,
                Direction::Both => bytes_out.saturating_add(bytes_in),
            },
            Self::Time(_) => elapsed_ns,
        }
    }

    /// Quantity per unit (bytes, or ns).
    pub fn unit(&self) -> u64 {
        match self {
            Self::Volume(v) => v.unit_bytes.0,
            Self::Time(t) => t.unit_seconds.saturating_mul(NS_PER_S),
        }
    }

    fn price(&self) -> Price {
        match self {
            Self::Volume(v) => v.price_minor,
            Self::Time(t) => t.price_minor,
        }
    }

    fn rounding(&self) -> Rounding {
        match self {
            Self::Volume(v) => v.rounding,
            Self::Time(t) => t.rounding,
        }
    }

    fn minimum_minor(&self) -> u64 {
        match self {
            Self::Volume(v) => v.minimum_charge_minor,
            Self::Time(t) => t.minimum_charge_minor,
        }
    }

    /// Whole units in `quantity`: what a billing cycle may charge for.
    pub fn whole_units(&self, quantity: u64) -> u64 {
        quantity / self.unit()
    }

    /// Price of `units` whole units, in millionths of a minor unit.
    pub fn price_micro(&self, units: u64) -> u128 {
        u128::from(units) * u128::from(self.price().micro)
    }

    /// The session's whole charge for a total `quantity`, in minor units:
    /// the tariff applied once, with its rounding rule for the last partial
    /// unit and its minimum charge. Amounts below a minor unit are rounded
    /// half-up.
    pub fn total_minor(&self, quantity: u64) -> u64 {
        let unit = u128::from(self.unit());
        let q = u128::from(quantity);
        let price = u128::from(self.price().micro);
        let micro = u128::from(MICRO);
        // The charge as the exact fraction numerator / denominator minor units.
        let (numerator, denominator) = match self.rounding() {
            Rounding::PerStartedUnit => (q.div_ceil(unit) * price, micro),
            Rounding::Floor => (q / unit * price, micro),
            Rounding::ProRata => (q * price, unit * micro),
        };
        let minor = (2 * numerator + denominator) / (2 * denominator);
        u64::try_from(minor)
            .unwrap_or(u64::MAX)
            .max(self.minimum_minor())
    }
}

impl Price {
    /// Parses `"12"`, `"0.25"` or `"0.000001"` minor units. No sign, at most
    /// six fraction digits: anything else is an error, never a rounding.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(int) || !(frac.is_empty() || digits(frac)) {
            return Err(format!(
                "price {text:?} is not a non-negative decimal number of minor units (e.g. \"5\" or \"0.25\")"
            ));
        }
        if frac.len() > 6 {
            return Err(format!(
                "price {text:?} has more than 6 fraction digits of a minor unit"
            ));
        }
        let too_big = || format!("price {text:?} is too large");
        let int: u64 = int.parse().map_err(|_| too_big())?;
        let frac_micro: u64 = format!("{frac:0<6}").parse().map_err(|_| too_big())?;
        let micro = int
            .checked_mul(MICRO)
            .and_then(|m| m.checked_add(frac_micro))
            .ok_or_else(too_big)?;
        Ok(Self { micro })
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (int, frac) = (self.micro / MICRO, self.micro % MICRO);
        if frac == 0 {
            write!(f, "{int}")
        } else {
            let frac = format!("{frac:06}");
            write!(f, "{int}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PriceVisitor)
    }
}

struct PriceVisitor;

impl serde::de::Visitor<'_> for PriceVisitor {
    type Value = Price;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("price_minor as an integer (5) or a decimal string (\"0.25\")")
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Price, E> {
        Price::parse(&v.to_string()).map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Price, E> {
        Price::parse(&v.to_string()).map_err(E::custom)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Price, E> {
        Err(E::custom(format!(
            "price_minor = {v} is a float, and meterd never keeps money in floats: \
             write a fraction of a minor unit as a string, e.g. price_minor = \"{v}\""
        )))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Price, E> {
        Price::parse(v).map_err(E::custom)
    }
}

impl Serialize for Price {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.micro.is_multiple_of(MICRO) {
            s.serialize_u64(self.micro / MICRO)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

impl ByteSize {
    /// Parses `"1500"`, `"1MB"` (10^6), `"1MiB"` (2^20), `"2 GB"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("size {text:?} does not start with a whole number"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" => 1000,
            "MB" => 1000_u64.pow(2),
            "GB" => 1000_u64.pow(3),
            "TB" => 1000_u64.pow(4),
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {text:?}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
                ));
            }
        };
        n.checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl serde::de::Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unit_bytes as an integer (1000000) or a size string (\"1MB\", \"1GiB\")")
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("unit_bytes {v} is negative")))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ByteSize, E> {
        Err(E::custom(format!(
            "unit_bytes = {v} is not a whole number of bytes: write e.g. \"1500kB\" or 1500000"
        )))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
        ByteSize::parse(v).map_err(E::custom)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_float_price_names_the_fix() {
        let e = toml::from_str::<VolumeTariff>("price_minor = 0.5\nunit_bytes = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("price_minor = \"0.5\""), "{e}");
        let t: VolumeTariff =
            toml::from_str("price_minor = \"0.5\"\nunit_bytes = \"1kB\"").unwrap();
        assert_eq!((t.price_minor.micro, t.unit_bytes.0), (500_000, 1000));
        let e = toml::from_str::<VolumeTariff>("price_minor = 1\nunit_bytes = 1.5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number of bytes"), "{e}");
    }

    #[test]
    fn prices_are_exact() {
        assert_eq!(Price::parse("5").unwrap().micro, 5_000_000);
        assert_eq!(Price::parse("0.25").unwrap().micro, 250_000);
        assert_eq!(Price::parse("0.000001").unwrap().micro, 1);
        assert_eq!(Price::parse("0.25").unwrap().to_string(), "0.25");
        assert!(Price::parse("-1").is_err());
        assert!(Price::parse("0.0000001").is_err());
        assert!(Price::parse("1e3").is_err());
        assert!(Price::parse("").is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("1MB").unwrap().0, 1_000_000);
        assert_eq!(ByteSize::parse("1 GiB").unwrap().0, 1 << 30);
        assert_eq!(ByteSize::parse("1500").unwrap().0, 1500);
        assert!(ByteSize::parse("1 parsec").is_err());
    }

    fn volume(price: &str, unit: u64, rounding: Rounding) -> Tariff {
        Tariff::Volume(VolumeTariff {
            price_minor: Price::parse(price).unwrap(),
            unit_bytes: ByteSize(unit),
            direction: Direction::Both,
            rounding,
            minimum_charge_minor: 0,
        })
    }

    #[test]
    fn rounding_modes_by_hand() {
        // 5 cents per MB, 2.5 MB used.
        let q = 2_500_000;
        assert_eq!(
            volume("5", 1_000_000, Rounding::PerStartedUnit).total_minor(q),
            15
        );
        assert_eq!(volume("5", 1_000_000, Rounding::Floor).total_minor(q), 10);
        assert_eq!(volume("5", 1_000_000, Rounding::ProRata).total_minor(q), 13); // 12.5 -> 13
        assert_eq!(
            volume("5", 1_000_000, Rounding::ProRata).total_minor(2_499_999),
            12
        ); // 12.499995
        // Nothing used: nothing charged, whatever the rounding.
        assert_eq!(
            volume("5", 1_000_000, Rounding::PerStartedUnit).total_minor(0),
            0
        );
        // Exact units: all three agree.
        for r in [Rounding::PerStartedUnit, Rounding::Floor, Rounding::ProRata] {
            assert_eq!(volume("5", 1_000_000, r).total_minor(3_000_000), 15);
        }
    }

    #[test]
    fn fractional_prices_and_minimum() {
        // 0.2 cent per MB, 1 GB: 200 cents exactly.
        assert_eq!(
            volume("0.2", 1_000_000, Rounding::Floor).total_minor(1_000_000_000),
            200
        );
        // 0.2 cent per MB, 3 MB: 0.6 -> rounds half-up to 1.
        assert_eq!(
            volume("0.2", 1_000_000, Rounding::Floor).total_minor(3_000_000),
            1
        );
        let t = Tariff::Time(TimeTariff {
            price_minor: Price::parse("10").unwrap(),
            unit_seconds: 60,
            rounding: Rounding::PerStartedUnit,
            minimum_charge_minor: 25,
        });
        // 61 s: two started minutes = 20, raised to the minimum 25.
        assert_eq!(t.total_minor(61 * NS_PER_S), 25);
        // 150 s: three started minutes = 30.
        assert_eq!(t.total_minor(150 * NS_PER_S), 30);
        assert_eq!(t.quantity(5, 5, 7), 7);
    }

    #[test]
    fn direction_selects_bytes() {
        let mut t = volume("1", 1, Rounding::Floor);
        assert_eq!(t.quantity(10, 3, 99), 13);
        if let Tariff::Volume(v) = &mut t {
            v.direction = Direction::Egress;
        }
        assert_eq!(t.quantity(10, 3, 99), 10);
    }

    #[test]
    fn validation_names_the_problem() {
        let t: Tariff =
            toml::from_str("kind = \"volume\"\nprice_minor = 1\nunit_bytes = 0").unwrap();
        assert_eq!(t.validate(), Err(TariffError::ZeroBytes));
        let t: Tariff =
            toml::from_str("kind = \"time\"\nprice_minor = \"2000000000\"\nunit_seconds = 60")
                .unwrap();
        assert!(matches!(t.validate(), Err(TariffError::AbsurdPrice(_))));
        let e = toml::from_str::<Tariff>("kind = \"volume\"\nprice_minor = -3\nunit_bytes = 1")
            .unwrap_err();
        assert!(e.to_string().contains("price"), "{e}");
    }
}
