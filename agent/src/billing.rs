//! The billing engine: charges each live session every cycle and settles it
//! when its connection closes (the patent's billing manager and step S18).
//!
//! Owns the arithmetic of cycles and settlement over plain numbers: a
//! session's cumulative quantity (bytes or ns) goes in, charges come out.
//! It does no I/O; each session carries its [`Accrual`], and the ledger
//! persists it with the charges, so a restarted agent continues exactly
//! where the last committed cycle ended.
//!
//! A cycle charges the whole units used since the last cycle. It derives them
//! from the cumulative quantity (`whole_units(q_now) - units_charged`), so
//! the partial unit is carried without any state of its own, and a cycle that
//! ran late or a widened interval charges more units at once, never a
//! different total. At settlement the tariff is applied once to the session's
//! total, and the settlement record is the difference to what the cycles
//! charged: the session's total never depends on how often billing ran
//! (invariant 1 of the mechanism).

use crate::tariff::{MICRO, Tariff};

/// What billing has charged an open session so far. Persisted by the ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accrual {
    /// Whole units charged by cycles.
    pub units: u64,
    /// Sum of the cycle charges, in millionths of a minor unit.
    pub charged_micro: u64,
    /// Number of cycle charges written (the sequence of the last one).
    pub seq: u64,
}

/// One cycle's charge for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CycleCharge {
    /// 1-based sequence within the session: with the session id, the
    /// record's idempotent id.
    pub seq: u64,
    /// Whole units charged now.
    pub units: u64,
    /// Their price, in millionths of a minor unit.
    pub amount_micro: u64,
}

/// The amounts of a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// The session's whole charge: the tariff applied once to its total.
    pub total_minor: u64,
    /// What the cycles charged, in millionths of a minor unit.
    pub cycles_micro: u64,
    /// `total - cycles`, in millionths: the settlement record's amount. It is
    /// negative only when a price with fractions of a minor unit rounds the
    /// total down below what whole units cost (by less than half a minor
    /// unit).
    pub adjustment_micro: i64,
}

/// Charges the whole units in `quantity` not charged yet; `None` if there
/// are none.
pub fn cycle_charge(tariff: &Tariff, quantity: u64, accrual: &mut Accrual) -> Option<CycleCharge> {
    let units = tariff.whole_units(quantity);
    if units <= accrual.units {
        return None;
    }
    let new_units = units - accrual.units;
    let amount = u64::try_from(tariff.price_micro(new_units)).unwrap_or(u64::MAX);
    accrual.units = units;
    accrual.charged_micro = accrual.charged_micro.saturating_add(amount);
    accrual.seq += 1;
    Some(CycleCharge {
        seq: accrual.seq,
        units: new_units,
        amount_micro: amount,
    })
}

/// Settles a session of total `quantity` that the cycles charged `accrual`.
pub fn settle(tariff: &Tariff, quantity: u64, accrual: &Accrual) -> Settlement {
    let total_minor = tariff.total_minor(quantity);
    let total_micro = i128::from(total_minor) * i128::from(MICRO);
    let adjustment = total_micro - i128::from(accrual.charged_micro);
    Settlement {
        total_minor,
        cycles_micro: accrual.charged_micro,
        adjustment_micro: i64::try_from(adjustment).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::tariff::{ByteSize, Direction, Price, Rounding, TimeTariff, VolumeTariff};

    fn volume(price_micro: u64, unit: u64, rounding: Rounding, minimum: u64) -> Tariff {
        Tariff::Volume(VolumeTariff {
            price_minor: Price { micro: price_micro },
            unit_bytes: ByteSize(unit),
            direction: Direction::Both,
            rounding,
            minimum_charge_minor: minimum,
        })
    }

    fn time(price_micro: u64, unit_s: u64, rounding: Rounding) -> Tariff {
        Tariff::Time(TimeTariff {
            price_minor: Price { micro: price_micro },
            unit_seconds: unit_s,
            rounding,
            minimum_charge_minor: 0,
        })
    }

    /// Bills a cumulative usage stream, running a cycle at every index in
    /// `cycles`, then settles; returns (cycle charges, settlement).
    fn bill(tariff: &Tariff, usage: &[u64], cycles: &[usize]) -> (Vec<CycleCharge>, Settlement) {
        let mut accrual = Accrual::default();
        let charges = cycles
            .iter()
            .filter_map(|&i| cycle_charge(tariff, usage[i], &mut accrual))
            .collect();
        let total = *usage.last().unwrap();
        (charges, settle(tariff, total, &accrual))
    }

    #[test]
    fn patent_figure_4_one_minute_or_two() {
        // 10 cents a minute, a 5.5 minute session. Cycles every minute, or
        // every two minutes (a widened interval): same total, 60 cents.
        let t = time(10 * MICRO, 60, Rounding::PerStartedUnit);
        let ns = |s: u64| s * 1_000_000_000;
        let usage: Vec<u64> = (0..=5).map(|m| ns(60 * m)).chain([ns(330)]).collect();
        let (every_minute, s1) = bill(&t, &usage, &[1, 2, 3, 4, 5]);
        let (every_two, s2) = bill(&t, &usage, &[2, 4]);
        assert_eq!(every_minute.len(), 5);
        assert!(
            every_minute
                .iter()
                .all(|c| c.units == 1 && c.amount_micro == 10 * MICRO)
        );
        assert_eq!(every_two.len(), 2);
        assert!(
            every_two
                .iter()
                .all(|c| c.units == 2 && c.amount_micro == 20 * MICRO)
        );
        assert_eq!(s1.total_minor, 60);
        assert_eq!(s2.total_minor, 60);
        // The started sixth minute is the settlement: 10 cents, or 20 after
        // the two-minute schedule (minutes 5 and 6 were never cycled).
        assert_eq!(s1.adjustment_micro, 10 * 1_000_000);
        assert_eq!(s2.adjustment_micro, 20 * 1_000_000);
    }

    #[test]
    fn remainder_is_carried_between_cycles() {
        // 1 cent per 1000 bytes; 1500 then 2600 bytes: 1 unit, then 1 more.
        let t = volume(MICRO, 1000, Rounding::Floor, 0);
        let mut a = Accrual::default();
        assert_eq!(cycle_charge(&t, 1500, &mut a).unwrap().units, 1);
        assert_eq!(cycle_charge(&t, 2600, &mut a).unwrap().units, 1);
        assert_eq!(cycle_charge(&t, 2999, &mut a), None);
        assert_eq!(
            a,
            Accrual {
                units: 2,
                charged_micro: 2 * MICRO,
                seq: 2
            }
        );
        assert_eq!(settle(&t, 2999, &a).adjustment_micro, 0);
    }

    fn rounding() -> impl Strategy<Value = Rounding> {
        prop_oneof![
            Just(Rounding::PerStartedUnit),
            Just(Rounding::ProRata),
            Just(Rounding::Floor)
        ]
    }

    proptest! {
        /// Invariant 1: per session, cycle charges plus settlement equal the
        /// tariff applied once to the total, for any cycle schedule,
        /// including doubled and quadrupled intervals; and a cycle never
        /// charges more than the session will finally cost (integral prices).
        #[test]
        fn total_does_not_depend_on_schedule(
            increments in prop::collection::vec(0u64..5_000_000, 1..60),
            unit in 1u64..3_000_000,
            price_minor in 0u64..1_000,
            rounding in rounding(),
            minimum in 0u64..50,
            cycle_mask in prop::collection::vec(any::<bool>(), 60),
            widen in prop_oneof![Just(1usize), Just(2), Just(4)],
        ) {
            let tariff = volume(price_minor * MICRO, unit, rounding, minimum);
            let usage: Vec<u64> = increments
                .iter()
                .scan(0u64, |q, d| { *q += d; Some(*q) })
                .collect();
            let truth = tariff.total_minor(*usage.last().unwrap());
            let random: Vec<usize> = (0..usage.len()).filter(|&i| cycle_mask[i]).collect();
            let widened: Vec<usize> = (0..usage.len()).step_by(widen).collect();
            for schedule in [random, widened, Vec::new()] {
                let (charges, s) = bill(&tariff, &usage, &schedule);
                let cycles: u64 = charges.iter().map(|c| c.amount_micro).sum();
                prop_assert_eq!(s.cycles_micro, cycles);
                prop_assert_eq!(i128::from(cycles) + i128::from(s.adjustment_micro),
                    i128::from(truth) * i128::from(MICRO));
                prop_assert!(s.adjustment_micro >= 0, "cycles overcharged: {:?}", s);
                prop_assert!(charges.windows(2).all(|w| w[1].seq == w[0].seq + 1));
            }
        }

        /// The same with prices in fractions of a minor unit: totals still
        /// match exactly; an over-charge by the cycles is less than half a
        /// minor unit.
        #[test]
        fn fractional_prices_stay_exact(
            increments in prop::collection::vec(0u64..10_000_000, 1..40),
            unit in 1u64..2_000_000,
            price_micro in 0u64..5_000_000,
            rounding in rounding(),
            cycle_mask in prop::collection::vec(any::<bool>(), 40),
        ) {
            let tariff = volume(price_micro, unit, rounding, 0);
            let usage: Vec<u64> = increments
                .iter()
                .scan(0u64, |q, d| { *q += d; Some(*q) })
                .collect();
            let schedule: Vec<usize> = (0..usage.len()).filter(|&i| cycle_mask[i]).collect();
            let (charges, s) = bill(&tariff, &usage, &schedule);
            let cycles: u64 = charges.iter().map(|c| c.amount_micro).sum();
            prop_assert_eq!(i128::from(cycles) + i128::from(s.adjustment_micro),
                i128::from(tariff.total_minor(*usage.last().unwrap())) * i128::from(MICRO));
            prop_assert!(s.adjustment_micro > -i64::try_from(MICRO / 2).unwrap());
        }
    }
}
