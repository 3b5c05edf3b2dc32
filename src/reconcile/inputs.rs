//! What a reconciliation reads from the mirror: the tenants in scope, the invoices of the
//! window and their payments, the invoice lines that bill a meter, and where each tenant's
//! unbilled usage starts.

use std::collections::HashMap;

use serde_json::Value;

use super::money::Billed;
use super::usage::{self, OpenPeriods};
use crate::catalog::Catalog;
use crate::domain::{Payment, Subscription};
use crate::store::{Db, MirrorRow, StoreError};
use crate::stripe::{ObjectKind, objects};

/// The tenants a run covers, with their customers.
pub struct Scope {
    /// `(tenant, customer)`, in tenant order.
    pub linked: Vec<(String, String)>,
    /// One tenant: its customer only ("" when it has none, which matches nothing).
    customer_filter: Option<String>,
}

impl Scope {
    pub async fn of(db: &Db, tenant: Option<&str>) -> Result<Self, StoreError> {
        let linked = db.tenants().linked(tenant).await?;
        let customer_filter = tenant.map(|_| linked.first().map_or("", |(_, c)| c).to_owned());
        Ok(Self {
            linked,
            customer_filter,
        })
    }

    fn filter(&self) -> Option<&str> {
        self.customer_filter.as_deref()
    }

    /// Customer → tenant.
    fn tenant_of(&self) -> HashMap<&str, &str> {
        (self.linked.iter())
            .map(|(t, c)| (c.as_str(), t.as_str()))
            .collect()
    }

    /// Invoices created in `[from_s, to_s)`, with their tenants.
    pub async fn invoices(
        &self,
        db: &Db,
        from_s: i64,
        to_s: i64,
    ) -> Result<Vec<Billed>, StoreError> {
        let kinds = [ObjectKind::Invoice.as_str()];
        let rows = db
            .mirror()
            .created_since(&kinds, from_s, self.filter())
            .await?;
        let in_window = rows
            .into_iter()
            .filter(|row| row.created.is_some_and(|c| c < to_s));
        Ok(self.billed(in_window))
    }

    /// One invoice of the tenants, with its tenant (none when it is not theirs).
    pub async fn invoice(&self, db: &Db, invoice_id: &str) -> Result<Vec<Billed>, StoreError> {
        let kind = ObjectKind::Invoice.as_str();
        let row = db.mirror().get(kind, invoice_id).await?;
        Ok(self.billed(row))
    }

    /// The invoice rows of the tenants' customers, read, with their tenants.
    fn billed(&self, rows: impl IntoIterator<Item = MirrorRow>) -> Vec<Billed> {
        let tenant_of = self.tenant_of();
        (rows.into_iter())
            .filter_map(|row| {
                let tenant = tenant_of.get(row.customer_id.as_deref()?)?.to_string();
                let raw: Value = serde_json::from_str(&row.payload).ok()?;
                let invoice = objects::invoice(&raw);
                Some(Billed {
                    tenant_id: tenant,
                    invoice,
                })
            })
            .collect()
    }

    /// The tenants' charges, payment intents and credit notes created since `from_s`.
    pub async fn payments(&self, db: &Db, from_s: i64) -> Result<Vec<Payment>, StoreError> {
        let tenant_of = self.tenant_of();
        let kinds = ["charge", "payment_intent", "credit_note"];
        let rows = db
            .mirror()
            .created_since(&kinds, from_s, self.filter())
            .await?;
        Ok(rows
            .into_iter()
            .filter(|row| (row.customer_id.as_deref()).is_some_and(|c| tenant_of.contains_key(c)))
            .filter_map(|row| {
                let raw: Value = serde_json::from_str(&row.payload).ok()?;
                Some(objects::payment(&row.object_type, &raw))
            })
            .collect())
    }

    /// Each tenant's current period (Unix ms), where its unbilled usage starts: that of its
    /// liveliest subscription (newest among equals), as the tenant view picks it.
    pub async fn open_periods(&self, db: &Db) -> Result<OpenPeriods, StoreError> {
        let tenant_of = self.tenant_of();
        let kinds = [ObjectKind::Subscription.as_str()];
        let rows = db
            .mirror()
            .created_since(&kinds, i64::MIN, self.filter())
            .await?;
        let mut current: HashMap<&str, Subscription> = HashMap::new();
        for row in rows {
            let Some(tenant) = row.customer_id.as_deref().and_then(|c| tenant_of.get(c)) else {
                continue;
            };
            let Ok(raw) = serde_json::from_str::<Value>(&row.payload) else {
                continue;
            };
            let s = objects::subscription(&raw);
            if (current.get(tenant)).is_none_or(|c| s.precedence() > c.precedence()) {
                current.insert(tenant, s);
            }
        }
        Ok(current
            .into_iter()
            .filter(|(_, s)| s.liveness() > 0)
            .filter_map(|(tenant, s)| {
                let start = s.current_period_start? * 1000;
                let end = s.current_period_end.map_or(i64::MAX, |e| e * 1000);
                Some((tenant.to_owned(), (start, end)))
            })
            .collect())
    }
}

/// The open units: per tenant with a current period and metered meter, from the period's
/// start (not before `from_ms`) to `settle_ms` rounded down to the minute (Stripe's meter
/// summaries end on minute boundaries); none where that is empty.
pub fn open_units(
    catalog: &Catalog,
    scope: &Scope,
    open: &OpenPeriods,
    from_ms: i64,
    settle_ms: i64,
) -> Vec<usage::Unit> {
    let end = settle_ms - settle_ms.rem_euclid(60_000);
    let mut units = Vec::new();
    for (tenant, customer) in &scope.linked {
        let Some(&(start, period_end)) = open.get(tenant) else {
            continue;
        };
        let start = start.max(from_ms);
        if start >= end {
            continue;
        }
        let metered = (catalog.meters.values()).filter(|m| m.stripe_event_name.is_some());
        units.extend(metered.map(|meter| usage::Unit {
            tenant_id: tenant.clone(),
            customer_id: customer.clone(),
            meter: meter.name.clone(),
            start,
            end,
            period_end,
            settle_at: end,
            invoice: None,
        }));
    }
    units
}

/// The units usage is reconciled in: each invoice line of a price that bills a meter. A draft's
/// pushes sent from `settle_ms` on may not be in the vendor's totals yet.
pub fn usage_units(
    catalog: &Catalog,
    scope: &Scope,
    invoices: &[Billed],
    settle_ms: i64,
) -> Vec<usage::Unit> {
    let price_meter: HashMap<&str, &str> = (catalog.meters.values())
        .flat_map(|m| (m.stripe_prices.iter()).map(move |p| (p.as_str(), m.name.as_str())))
        .collect();
    let customer_of: HashMap<&str, &str> = (scope.linked.iter())
        .map(|(t, c)| (t.as_str(), c.as_str()))
        .collect();
    let mut units = Vec::new();
    for billed in invoices {
        let invoice = &billed.invoice;
        let billed_at = invoice.finalized_at.or(invoice.created).unwrap_or(0) * 1000;
        let customer = customer_of.get(billed.tenant_id.as_str()).copied();
        for line in &invoice.lines {
            let Some(meter) = line.price.as_deref().and_then(|p| price_meter.get(p)) else {
                continue;
            };
            let (Some(start), Some(end)) = (line.period_start, line.period_end) else {
                continue;
            };
            units.push(usage::Unit {
                tenant_id: billed.tenant_id.clone(),
                customer_id: customer.unwrap_or_default().to_owned(),
                meter: meter.to_string(),
                start: start * 1000,
                end: end * 1000,
                period_end: end * 1000,
                settle_at: settle_ms,
                invoice: Some(usage::InvoiceLine {
                    invoice_id: invoice.id.clone(),
                    line_id: line.id.clone(),
                    quantity: line.quantity,
                    billed_at,
                    // A status billsync does not know is taken as final: never repaired.
                    is_final: invoice.status.as_deref() != Some("draft"),
                }),
            });
        }
    }
    units
}
