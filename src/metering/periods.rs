//! Which billing period a usage event belongs to.
//!
//! The periods are the ones the vendor stated, kept in `billing_periods` as the mirror applies
//! subscriptions (each period a subscription was seen in) and renewal invoices (the usage
//! period each bills, and whether the invoice is final). An event belongs to the latest-started
//! period holding its time, cut where a later one starts; outside every period, to the
//! calendar month cut at the neighbouring periods, which nothing bills; past the last known
//! period of a live subscription, to a renewal billsync has not heard of yet.

use std::collections::HashMap;

use chrono::{Datelike, TimeZone, Utc};

use crate::domain::{TenantId, invoice_is_final, liveness_of};
use crate::store::{Db, PeriodRow, StoreError};

/// A billing period, `[start, end)` in Unix milliseconds, and what its usage is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub start: i64,
    pub end: i64,
    pub standing: Standing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// A subscription's period: its usage is billed on the invoice for it.
    Billed,
    /// A subscription's period whose invoice is final: usage still arriving for it can no
    /// longer be billed, and is reported instead of pushed.
    Invoiced { invoice_id: String },
    /// No subscription covers the time: nothing bills this usage.
    Unbilled,
    /// After a known period of a subscription that went on (it was last seen live, or has a
    /// later period): billsync has not heard of this period yet (the bounds are a guess);
    /// usage waits for it.
    Unconfirmed,
}

/// One tenant's known billing periods.
#[derive(Debug, Clone, Default)]
pub struct TenantPeriods {
    rows: Vec<PeriodRow>,
}

impl TenantPeriods {
    pub fn new(rows: Vec<PeriodRow>) -> Self {
        Self { rows }
    }

    /// The period holding `at_ms`.
    pub fn holding(&self, at_ms: i64) -> Period {
        let holding = self
            .rows
            .iter()
            .filter(|r| r.period_start <= at_ms && at_ms < r.period_end)
            .max_by_key(|r| (r.period_start, &r.subscription_id));
        let next_start = self.next_start(at_ms);
        if let Some(row) = holding {
            let standing = match (&row.invoice_id, row.invoice_status.as_deref()) {
                (Some(id), Some(status)) if invoice_is_final(status) => Standing::Invoiced {
                    invoice_id: id.clone(),
                },
                _ => Standing::Billed,
            };
            return Period {
                start: row.period_start,
                end: next_start.map_or(row.period_end, |s| s.min(row.period_end)),
                standing,
            };
        }
        if let Some(last) = self.continued_past(at_ms) {
            let length = last.period_end - last.period_start;
            return Period {
                start: last.period_end,
                end: next_start.unwrap_or(last.period_end + length),
                standing: Standing::Unconfirmed,
            };
        }
        let (month_start, month_end) = calendar_month(at_ms);
        let previous_end = self
            .rows
            .iter()
            .map(|r| r.period_end)
            .filter(|end| *end <= at_ms)
            .max();
        Period {
            start: previous_end.map_or(month_start, |e| e.max(month_start)),
            end: next_start.map_or(month_end, |s| s.min(month_end)),
            standing: Standing::Unbilled,
        }
    }

    fn next_start(&self, at_ms: i64) -> Option<i64> {
        self.rows
            .iter()
            .map(|r| r.period_start)
            .filter(|start| *start > at_ms)
            .min()
    }

    /// The period ended last before `at_ms`, when its subscription went on past it: it has a
    /// later period (the ones in between are not known yet), or it was last seen live (its
    /// renewal is not known yet).
    fn continued_past(&self, at_ms: i64) -> Option<&PeriodRow> {
        let last = self
            .rows
            .iter()
            .filter(|r| r.period_end <= at_ms)
            .max_by_key(|r| (r.period_end, r.period_start))?;
        let of_subscription = || {
            self.rows
                .iter()
                .filter(|r| r.subscription_id == last.subscription_id)
        };
        let later = of_subscription().any(|r| r.period_start > last.period_start);
        let live = of_subscription()
            .max_by_key(|r| r.period_start)
            .and_then(|r| r.subscription_status.as_deref())
            .is_some_and(|s| liveness_of(s) > 0);
        (later || live).then_some(last)
    }
}

/// The known periods of each of these customers (customers without any are left out).
pub async fn of_customers(
    db: &Db,
    customers: &[&str],
) -> Result<HashMap<String, TenantPeriods>, StoreError> {
    let mut by_customer: HashMap<String, TenantPeriods> = HashMap::new();
    for row in db.periods().of_customers(customers).await? {
        by_customer
            .entry(row.customer_id.clone())
            .or_default()
            .rows
            .push(row);
    }
    Ok(by_customer)
}

/// The tenant's known periods (none without a Stripe customer).
pub async fn of_tenant(db: &Db, tenant: &str) -> Result<TenantPeriods, StoreError> {
    let record = match TenantId::parse(tenant) {
        Ok(id) => db.tenants().get(&id).await?,
        Err(_) => None,
    };
    let Some(customer) = record.and_then(|r| r.customer_id) else {
        return Ok(TenantPeriods::default());
    };
    Ok(of_customers(db, &[&customer])
        .await?
        .remove(&customer)
        .unwrap_or_default())
}

/// The bounds of the tenant's billing period holding `at_ms`.
pub async fn billing_period(db: &Db, tenant: &str, at_ms: i64) -> Result<(i64, i64), StoreError> {
    let period = of_tenant(db, tenant).await?.holding(at_ms);
    Ok((period.start, period.end))
}

/// The UTC calendar month holding `at_ms`, as `[start, end)` in milliseconds.
pub fn calendar_month(at_ms: i64) -> (i64, i64) {
    let at = Utc.timestamp_millis_opt(at_ms).single().unwrap_or_default();
    let start = Utc
        .with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let (year, month) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    let end = Utc
        .with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    (start.timestamp_millis(), end.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_months_wrap_the_year() {
        let dec = Utc
            .with_ymd_and_hms(2026, 12, 31, 23, 0, 0)
            .unwrap()
            .timestamp_millis();
        let (start, end) = calendar_month(dec);
        assert_eq!(
            start,
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
        assert_eq!(
            end,
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
    }

    const HOUR: i64 = 3_600_000;

    fn row(
        sub: &str,
        start: i64,
        end: i64,
        status: Option<&str>,
        invoice: Option<&str>,
    ) -> PeriodRow {
        PeriodRow {
            customer_id: "cus_1".into(),
            subscription_id: sub.into(),
            period_start: start,
            period_end: end,
            subscription_status: status.map(str::to_owned),
            invoice_id: invoice.map(|_| "in_1".to_owned()),
            invoice_status: invoice.map(str::to_owned),
        }
    }

    #[test]
    fn usage_finds_the_period_it_happened_in() {
        // Periods of a day from a subscription that started at 10:37 on day 10 of a month.
        let day = 24 * HOUR;
        let month = calendar_month(1_780_000_000_000).0;
        let start = month + 9 * day + 10 * HOUR + 37 * 60_000;
        let periods = TenantPeriods::new(vec![
            row("sub_1", start, start + day, Some("active"), Some("paid")),
            row("sub_1", start + day, start + 2 * day, Some("active"), None),
        ]);
        let before = periods.holding(start - 32 * 60_000);
        assert_eq!(
            (before.start, before.end),
            (month, start),
            "before the subscription"
        );
        assert_eq!(before.standing, Standing::Unbilled);
        let first = periods.holding(start + HOUR);
        assert_eq!((first.start, first.end), (start, start + day));
        assert_eq!(
            first.standing,
            Standing::Invoiced {
                invoice_id: "in_1".into()
            }
        );
        let second = periods.holding(start + day);
        assert_eq!(
            (second.start, second.standing),
            (start + day, Standing::Billed)
        );
        let after = periods.holding(start + 2 * day + 1);
        assert_eq!(
            after.standing,
            Standing::Unconfirmed,
            "a renewal not heard of yet"
        );
        assert_eq!(after.start, start + 2 * day);
        let ended = TenantPeriods::new(vec![row(
            "sub_1",
            start,
            start + day,
            Some("canceled"),
            None,
        )]);
        let later = ended.holding(start + day + HOUR);
        assert_eq!(
            (later.start, later.standing),
            (start + day, Standing::Unbilled)
        );
        // A plan switch to a new subscription cuts the old period where the new one starts.
        let switched = TenantPeriods::new(vec![
            row("sub_1", start, start + day, Some("canceled"), None),
            row(
                "sub_2",
                start + HOUR,
                start + HOUR + day,
                Some("active"),
                None,
            ),
        ]);
        assert_eq!(switched.holding(start + 1).end, start + HOUR);
        assert_eq!(switched.holding(start + 2 * HOUR).start, start + HOUR);
    }
}
