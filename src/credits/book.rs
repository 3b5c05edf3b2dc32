//! What a credit check needs besides the running totals: the catalog's credit-priced features
//! and meters, and each tenant's grants, parsed once and kept for as long as the version they
//! were read at is current. The version (`credit_grant_versions`, bumped in the transaction of
//! every grant write) is read with the totals, in the burn's own locked transaction on
//! PostgreSQL: a stale entry is never used, whichever replica wrote the grant.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;

use super::CreditFeature;
use super::balance::{SegmentUsage, allocate, breakpoints};
use super::grants::CreditGrant;
use crate::store::{CreditState, Cuts, GrantRows, Total, UsageRow};

/// Entries kept before the cache starts over (a few hundred bytes each).
const MAX_TENANTS: usize = 100_000;

/// A tenant's grants as read at one version of its customer's grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantGrants {
    pub customer_id: Option<String>,
    pub version: i64,
    /// Every unit's.
    pub grants: Vec<CreditGrant>,
    /// Every grant's start and end: where the tenant's totals must be cut.
    pub points: Vec<i64>,
}

impl TenantGrants {
    pub fn read(rows: GrantRows) -> Self {
        let grants = super::grants_of(&rows.payloads);
        Self {
            customer_id: rows.customer_id,
            version: rows.version,
            points: breakpoints(&grants),
            grants,
        }
    }

    /// Whether `state` was read at the version these grants were.
    pub fn current_in(&self, state: &CreditState) -> bool {
        self.version == state.version && self.customer_id == state.customer_id
    }

    /// The grants of one unit.
    pub fn of_unit(&self, unit: &str) -> Vec<CreditGrant> {
        (self.grants.iter())
            .filter(|g| g.unit == unit)
            .cloned()
            .collect()
    }
}

/// The credit-priced features, their meters, and the grants last read per tenant.
#[derive(Debug, Default)]
pub struct CreditBook {
    pub features: BTreeMap<String, CreditFeature>,
    /// The meters the features burn, sorted: the usage the running totals keep.
    pub meters: Vec<String>,
    grants: Mutex<HashMap<String, Arc<TenantGrants>>>,
}

impl CreditBook {
    pub fn new(features: BTreeMap<String, CreditFeature>) -> Self {
        let mut meters: Vec<String> = features.values().map(|f| f.meter.clone()).collect();
        meters.sort_unstable();
        meters.dedup();
        Self {
            features,
            meters,
            grants: Mutex::default(),
        }
    }

    /// Whether usage of `meter` burns credits (and so is kept in the running totals).
    pub fn burns(&self, meter: &str) -> bool {
        self.meters
            .binary_search_by(|m| m.as_str().cmp(meter))
            .is_ok()
    }

    /// The cuts a tenant with these grants must have its totals at.
    pub fn cuts_for(&self, grants: &TenantGrants) -> Cuts {
        Cuts {
            points: grants.points.clone(),
            meters: self.meters.clone(),
        }
    }

    /// Whether the tenant's totals in `state` are cut as these grants need (a tenant without
    /// grants needs none).
    pub fn totals_current(&self, state: &CreditState, grants: &TenantGrants) -> bool {
        match &state.cuts {
            Some(cuts) => *cuts == self.cuts_for(grants),
            None => grants.points.is_empty(),
        }
    }

    /// The tenant's grants kept from an earlier read, if `state` shows them current.
    pub fn cached(&self, tenant: &str, state: &CreditState) -> Option<Arc<TenantGrants>> {
        let grants = self.grants.lock().expect("credit grants");
        grants.get(tenant).filter(|g| g.current_in(state)).cloned()
    }

    /// Keeps grants just read.
    pub fn keep(&self, tenant: &str, read: TenantGrants) -> Arc<TenantGrants> {
        let read = Arc::new(read);
        let mut grants = self.grants.lock().expect("credit grants");
        if grants.len() >= MAX_TENANTS {
            grants.clear();
        }
        grants.insert(tenant.to_owned(), read.clone());
        read
    }
}

/// The totals as `allocate` reads usage: the segment numbered as `width_bucket` would.
pub fn segment_usage(points: &[i64], totals: &[Total]) -> Vec<SegmentUsage> {
    (totals.iter())
        .map(|t| SegmentUsage {
            segment: points.partition_point(|&p| p <= t.segment),
            meter: t.meter.clone(),
            quantity: t.quantity,
        })
        .collect()
}

impl CreditBook {
    /// The tenant's available balance in each unit `rows` burn, at `now`, before and after
    /// they were added to its totals (`after`, cut at the grants' points).
    pub fn balances_moved(
        &self,
        grants: &TenantGrants,
        after: &[Total],
        rows: &[&UsageRow],
        now: i64,
    ) -> Vec<(String, Decimal, Decimal)> {
        let mut before: BTreeMap<(&str, i64), Decimal> = BTreeMap::new();
        for total in after {
            *before.entry((&total.meter, total.segment)).or_default() += total.quantity;
        }
        for row in rows {
            let segment = crate::store::credit_totals::segment_of(&grants.points, row.occurred_at);
            if let (Some(segment), Ok(quantity)) = (segment, row.quantity.parse::<Decimal>()) {
                *before.entry((&row.meter, segment)).or_default() -= quantity;
            }
        }
        let before: Vec<Total> = (before.into_iter())
            .map(|((meter, segment), quantity)| Total {
                meter: meter.to_owned(),
                segment,
                quantity,
            })
            .collect();
        let points = &grants.points;
        let mut moved = Vec::new();
        for (unit, features) in super::units(&self.features) {
            if !rows
                .iter()
                .any(|r| features.iter().any(|f| f.meter == r.meter))
            {
                continue;
            }
            let of_unit = grants.of_unit(unit);
            let balance = |totals: &[Total]| {
                let usage = segment_usage(points, totals);
                allocate(unit, &of_unit, &features, points, &usage, now)
                    .balance
                    .available
            };
            moved.push((unit.to_owned(), balance(&before), balance(after)));
        }
        moved
    }
}
