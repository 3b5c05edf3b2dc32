//! Burning credits: whether a usage event of a credit-priced feature is covered by the tenant's
//! balance, judged from rows under the tenant's lock for the unit, so that a burst of
//! check-and-records on any number of replicas never takes the balance below zero.

use std::sync::Arc;

use rust_decimal::Decimal;

use super::CreditFeature;
use super::balance::{Balance, SegmentUsage, allocate};
use super::book::{CreditBook, TenantGrants};
use super::grants::CreditGrant;
use crate::store::{Db, StoreError, UsageRow};

/// The credit half of a check-and-record: the unit the event burns and every feature burning
/// it (their usage shares the balance).
#[derive(Debug, Clone)]
pub struct CreditCheck {
    pub unit: String,
    pub features: Vec<CreditFeature>,
    /// The moment the balance is stated for (Unix ms).
    pub now: i64,
    /// Every credit-priced meter (what the running totals keep) and the grants last read.
    pub book: Arc<CreditBook>,
}

/// The balance before the event and with it, and whether the grants covered it whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Burn {
    pub before: Balance,
    pub with_event: Balance,
    /// What the event costs: its quantity times the feature's rate.
    pub cost: Decimal,
    pub covered: bool,
}

impl Burn {
    /// The balance change storing the event makes, for the low-balance alarm.
    pub fn change<'a>(&'a self, tenant_id: &'a str) -> crate::topup::BalanceChange<'a> {
        crate::topup::BalanceChange {
            tenant_id,
            unit: &self.before.unit,
            available_before: self.before.available,
            available_after: self.with_event.available,
        }
    }
}

impl CreditCheck {
    /// The lock every replica takes before judging a burn for `tenant` (one per tenant: a
    /// recompute of its running totals, which every unit shares, may happen under it).
    pub fn lock_name(&self, tenant: &str) -> String {
        crate::store::credit_lock(tenant)
    }

    /// [`Self::judge`] against the grants and running totals as they stand (outside a
    /// transaction: under SQLite's lock, or for a check that records nothing).
    pub async fn judge_from_store(&self, db: &Db, row: &UsageRow) -> Result<Burn, StoreError> {
        let (grants, usage) = super::read_credits(db, &self.book, &row.tenant_id).await?;
        Ok(self.judge_with(&grants, usage, row))
    }

    /// [`Self::judge`] with all of a tenant's grants (of every unit) and its usage per segment
    /// of their cuts.
    pub fn judge_with(
        &self,
        grants: &TenantGrants,
        usage: Vec<SegmentUsage>,
        row: &UsageRow,
    ) -> Burn {
        self.judge(&grants.of_unit(&self.unit), &grants.points, usage, row)
    }

    /// Judges `row` against the usage already stored: covered when burning it leaves no more
    /// usage uncovered than before (every bit of it found a grant usable at its time).
    pub fn judge(
        &self,
        grants: &[CreditGrant],
        points: &[i64],
        mut usage: Vec<SegmentUsage>,
        row: &UsageRow,
    ) -> Burn {
        let features: Vec<&CreditFeature> = self.features.iter().collect();
        let before = allocate(&self.unit, grants, &features, points, &usage, self.now);
        let quantity: Decimal = row.quantity.parse().unwrap_or_default();
        let rate = features
            .iter()
            .find(|f| f.meter == row.meter)
            .map_or(Decimal::ZERO, |f| f.per_unit);
        usage.push(SegmentUsage {
            segment: points.partition_point(|&p| p <= row.occurred_at),
            meter: row.meter.clone(),
            quantity,
        });
        let with_event = allocate(&self.unit, grants, &features, points, &usage, self.now);
        Burn {
            covered: with_event.uncovered <= before.uncovered,
            before: before.balance,
            with_event: with_event.balance,
            cost: (quantity * rate).normalize(),
        }
    }
}
