//! A tenant's balance in one unit, computed exactly from its grants and the burns its usage log
//! holds. Time is cut at every grant's start and end into segments in which the same grants
//! are usable; the usage of each segment burns them in Stripe's order. Filling grants in a
//! fixed order is additive, so a segment's burns may be summed before they are applied: the
//! figures are the same as applying each event alone, in time order.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;

use super::CreditFeature;
use super::grants::CreditGrant;

/// A balance: granted by the usable grants, burned from them, and what is left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Balance {
    /// A lowercase currency (amounts in minor units), a custom pricing unit, or `credits`.
    pub unit: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub granted: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub burned: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub available: Decimal,
}

/// Usage of one meter in one segment: `segment` is how many breakpoints are at or before the
/// events (as PostgreSQL's `width_bucket`), so the segment starts at `breakpoints[segment - 1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentUsage {
    pub segment: usize,
    pub meter: String,
    pub quantity: Decimal,
}

/// One grant and what was burned from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantUse {
    pub grant: CreditGrant,
    pub burned: Decimal,
}

/// The outcome of burning a unit's usage against its grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub balance: Balance,
    /// Every grant of the unit, in consumption order.
    pub grants: Vec<GrantUse>,
    /// Burns no grant covered (usage beyond the credits, billed by Stripe as usage).
    pub uncovered: Decimal,
}

/// The grants' starts and ends, sorted and distinct: the segments' bounds.
pub fn breakpoints(grants: &[CreditGrant]) -> Vec<i64> {
    let mut points: Vec<i64> = grants
        .iter()
        .flat_map(|g| std::iter::once(g.effective_ms).chain(g.ends_ms()))
        .collect();
    points.sort_unstable();
    points.dedup();
    points
}

/// Burns `usage` (per segment of `points`, per meter) against the `grants` of `unit`, with the
/// unit's `features` giving each meter's rate, and the balance at `now`.
pub fn allocate(
    unit: &str,
    grants: &[CreditGrant],
    features: &[&CreditFeature],
    points: &[i64],
    usage: &[SegmentUsage],
    now: i64,
) -> Allocation {
    let mut uses: Vec<GrantUse> = grants
        .iter()
        .filter(|g| g.unit == unit)
        .map(|g| GrantUse {
            grant: g.clone(),
            burned: Decimal::ZERO,
        })
        .collect();
    uses.sort_by(|a, b| a.grant.consumption_order(&b.grant));
    // Segments in time order, meters by name within one: a deterministic order.
    let mut by_segment: BTreeMap<(usize, &str), Decimal> = BTreeMap::new();
    for u in usage {
        *by_segment.entry((u.segment, &u.meter)).or_default() += u.quantity;
    }
    let mut uncovered = Decimal::ZERO;
    for ((segment, meter), quantity) in by_segment {
        let Some(feature) = features.iter().find(|f| f.meter == meter) else {
            continue;
        };
        let mut burn = quantity * feature.per_unit;
        let start = segment.checked_sub(1).and_then(|i| points.get(i)).copied();
        if let Some(start) = start {
            burn = burn_from(&mut uses, start, &feature.prices, burn);
        }
        uncovered += burn;
    }
    let (mut granted, mut burned) = (Decimal::ZERO, Decimal::ZERO);
    for u in uses.iter().filter(|u| u.grant.usable_at(now)) {
        granted += u.grant.amount;
        burned += u.burned;
    }
    Allocation {
        balance: Balance {
            unit: unit.to_owned(),
            granted: granted.normalize(),
            burned: burned.normalize(),
            available: (granted - burned).normalize(),
        },
        grants: uses,
        uncovered: uncovered.normalize(),
    }
}

/// Burns `burn` from the grants usable at `start` that apply to the meter, in order; returns
/// what none covered.
fn burn_from(uses: &mut [GrantUse], start: i64, prices: &[String], mut burn: Decimal) -> Decimal {
    for u in uses.iter_mut() {
        if burn <= Decimal::ZERO {
            break;
        }
        if !u.grant.usable_at(start) || !u.grant.applies_to(prices) {
            continue;
        }
        let take = burn.min(u.grant.amount - u.burned);
        if take > Decimal::ZERO {
            u.burned += take;
            burn -= take;
        }
    }
    burn
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn grant(id: &str, amount: i64, priority: i64, ends: Option<i64>) -> CreditGrant {
        CreditGrant {
            id: id.into(),
            customer: None,
            unit: "credits".into(),
            amount: Decimal::from(amount),
            priority,
            created_ms: 0,
            effective_ms: 0,
            expires_ms: ends,
            voided_ms: None,
            category: None,
            name: None,
            prices: None,
        }
    }

    fn feature(meter: &str, per_unit: &str, prices: &[&str]) -> CreditFeature {
        CreditFeature {
            name: meter.into(),
            meter: meter.into(),
            unit: "credits".into(),
            per_unit: Decimal::from_str(per_unit).unwrap(),
            prices: prices.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn usage(segment: usize, meter: &str, quantity: &str) -> SegmentUsage {
        SegmentUsage {
            segment,
            meter: meter.into(),
            quantity: Decimal::from_str(quantity).unwrap(),
        }
    }

    #[test]
    fn burns_follow_priority_then_expiry_and_stop_at_an_end() {
        let grants = [
            grant("late", 100, 50, None),
            grant("soon", 10, 10, Some(1000)),
            grant("later", 5, 10, Some(5000)),
        ];
        let points = breakpoints(&grants);
        assert_eq!(points, [0, 1000, 5000]);
        let f = feature("tokens", "1", &[]);
        // 12 in [0, 1000): soon 10, later 2. 4 in [1000, 5000): later 3, late 1.
        let burns = [usage(1, "tokens", "12"), usage(2, "tokens", "4")];
        let a = allocate("credits", &grants, &[&f], &points, &burns, 2000);
        let burned: Vec<_> = a
            .grants
            .iter()
            .map(|u| (u.grant.id.as_str(), u.burned))
            .collect();
        assert_eq!(
            burned,
            [("soon", 10.into()), ("later", 5.into()), ("late", 1.into())]
        );
        assert_eq!(
            (a.balance.granted, a.balance.available),
            (105.into(), 99.into())
        );
        assert_eq!(a.uncovered, Decimal::ZERO);
    }

    #[test]
    fn fractions_are_exact_and_uncovered_burns_take_nothing_later() {
        let grants = [grant("g", 1, 50, None)];
        let points = breakpoints(&grants);
        let f = feature("gpu", "0.0167", &[]);
        let burns = [
            usage(0, "gpu", "100"),
            usage(1, "gpu", "3"),
            usage(1, "gpu", "0.5"),
        ];
        let a = allocate("credits", &grants, &[&f], &points, &burns, 10);
        assert_eq!(a.balance.burned.to_string(), "0.05845");
        assert_eq!(a.balance.available.to_string(), "0.94155");
        assert_eq!(
            a.uncovered.to_string(),
            "1.67",
            "before the grant: uncovered"
        );
    }

    #[test]
    fn a_grant_scoped_to_prices_takes_only_their_meters() {
        let mut scoped = grant("scoped", 10, 1, None);
        scoped.prices = Some(vec!["price_gpu".into()]);
        let grants = [scoped, grant("any", 10, 50, None)];
        let points = breakpoints(&grants);
        let (gpu, tokens) = (
            feature("gpu", "1", &["price_gpu"]),
            feature("tokens", "1", &[]),
        );
        let burns = [usage(1, "tokens", "4"), usage(1, "gpu", "3")];
        let a = allocate("credits", &grants, &[&gpu, &tokens], &points, &burns, 10);
        let burned: Vec<_> = a.grants.iter().map(|u| u.burned).collect();
        assert_eq!(burned, [Decimal::from(3), Decimal::from(4)]);
    }
}
