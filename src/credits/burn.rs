//! Burning credits: whether a usage event of a credit-priced feature is covered by the tenant's
//! balance, judged from rows under the tenant's lock for the unit, so that a burst of
//! check-and-records on any number of replicas never takes the balance below zero.

use rust_decimal::Decimal;

use super::CreditFeature;
use super::balance::{Balance, SegmentUsage, allocate, breakpoints};
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
    /// The lock every replica takes before judging a burn of this unit for `tenant`.
    pub fn lock_name(&self, tenant: &str) -> String {
        format!("credits:{tenant}/{}", self.unit)
    }

    /// The meters whose usage burns the unit.
    pub fn meters(&self) -> Vec<String> {
        self.features.iter().map(|f| f.meter.clone()).collect()
    }

    /// Of the grants read, those of this unit and the segments they cut time into.
    pub fn grants_and_points(&self, grants: Vec<CreditGrant>) -> (Vec<CreditGrant>, Vec<i64>) {
        let grants: Vec<CreditGrant> = grants.into_iter().filter(|g| g.unit == self.unit).collect();
        let points = breakpoints(&grants);
        (grants, points)
    }

    /// [`Self::judge`] with the grants and usage read from the store as they stand (outside a
    /// transaction: under SQLite's lock, or for a check that records nothing).
    pub async fn judge_from_store(&self, db: &Db, row: &UsageRow) -> Result<Burn, StoreError> {
        let credits = db.credits();
        let payloads = credits.grant_payloads(&row.tenant_id).await?;
        let (grants, points) = self.grants_and_points(super::grants_of(&payloads));
        let usage = credits
            .usage_by_segment(&row.tenant_id, &self.meters(), &points)
            .await?;
        Ok(self.judge(&grants, &points, usage, row))
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
