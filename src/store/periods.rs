//! Billing periods as the vendor stated them (`billing_periods`): written with the mirror state
//! that states them, read by metering to find the period a usage event belongs to.

use super::{Db, StoreError, on_pool};

/// One stored billing period. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PeriodRow {
    pub customer_id: String,
    pub subscription_id: String,
    pub period_start: i64,
    pub period_end: i64,
    pub subscription_status: Option<String>,
    pub invoice_id: Option<String>,
    pub invoice_status: Option<String>,
}

/// Records one billing period of a customer, on any transaction: a period seen again takes the
/// newer end and status; an invoice's status fills in its period.
macro_rules! upsert_period {
    ($tx:expr, $customer:expr, $period:expr) => {{
        let period: &$crate::domain::BillingPeriod = $period;
        let (invoice_id, invoice_status) = period.invoice.clone().unzip();
        sqlx::query(
            "INSERT INTO billing_periods (customer_id, subscription_id, period_start, period_end, \
             subscription_status, invoice_id, invoice_status) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (customer_id, subscription_id, period_start) DO UPDATE SET \
             period_end = excluded.period_end, \
             subscription_status = COALESCE(excluded.subscription_status, billing_periods.subscription_status), \
             invoice_id = COALESCE(excluded.invoice_id, billing_periods.invoice_id), \
             invoice_status = COALESCE(excluded.invoice_status, billing_periods.invoice_status)",
        )
        .bind($customer)
        .bind(&period.subscription_id)
        .bind(period.start.saturating_mul(1000))
        .bind(period.end.saturating_mul(1000))
        .bind(&period.subscription_status)
        .bind(invoice_id)
        .bind(invoice_status)
        .execute($tx)
        .await?;
    }};
}

/// Records the billing periods an applied [`super::ObjectState`] names, on any transaction.
macro_rules! upsert_periods {
    ($tx:expr, $state:expr) => {{
        let state: &$crate::store::ObjectState = $state;
        if let Some(customer) = &state.customer_id {
            for period in &state.periods {
                $crate::store::periods::upsert_period!($tx, customer, period);
            }
        }
    }};
}
pub(crate) use {upsert_period, upsert_periods};

pub struct Periods<'a> {
    db: &'a Db,
}

impl<'a> Periods<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// Every stored period of these customers.
    pub async fn of_customers(&self, customers: &[&str]) -> Result<Vec<PeriodRow>, StoreError> {
        let mut all = Vec::new();
        for chunk in customers.chunks(500) {
            let rows = on_pool!(self.db, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT customer_id, subscription_id, period_start, period_end, subscription_status, \
                     invoice_id, invoice_status FROM billing_periods WHERE customer_id IN (",
                );
                let mut list = query.separated(", ");
                for customer in chunk {
                    list.push_bind(*customer);
                }
                query.push(")");
                query.build_query_as::<PeriodRow>().fetch_all(pool).await
            })?;
            all.extend(rows);
        }
        Ok(all)
    }

    /// The draft invoices that bill a linked tenant's period: (tenant, invoice), oldest period
    /// first.
    pub async fn drafts(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String, String)>(
                "SELECT t.tenant_id, p.invoice_id FROM billing_periods p \
                 JOIN tenants t ON t.customer_id = p.customer_id \
                 WHERE p.invoice_status = 'draft' AND p.invoice_id IS NOT NULL \
                 ORDER BY p.period_end, p.invoice_id",
            )
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Records periods of customers (the states already in the mirror when an upgrade from a
    /// version that kept none starts).
    pub async fn record(
        &self,
        periods: &[(String, crate::domain::BillingPeriod)],
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for (customer, period) in periods {
                upsert_period!(&mut *tx, customer, period);
            }
            tx.commit().await
        })?;
        Ok(())
    }
}
