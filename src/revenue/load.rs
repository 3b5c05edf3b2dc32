//! The schedule's inputs, read from the store: every finalized invoice, credit note and
//! refunded charge of the tenants' customers, and the daily usage of metered lines.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde_json::Value;

use super::{Builder, Day, Inputs, Schedule, day_of};
use crate::catalog::{Aggregation, Catalog};
use crate::domain::Invoice;
use crate::store::{Db, StoreError};
use crate::stripe::objects;

/// What the mirror gave: invoices with metered lines (kept until the usage of their periods is
/// read, with that span), credit notes and refunded charges (fewer, kept for the end).
#[derive(Default)]
struct Kept {
    metered: Vec<(String, Invoice, (i64, i64))>,
    notes: Vec<Value>,
    charges: Vec<Value>,
}

/// Reads the schedule's inputs from the store and builds it; invoices without metered lines
/// stream past and become lines at once.
pub async fn load(
    db: &Db,
    catalog: &Catalog,
    tenant: Option<&str>,
) -> Result<Schedule, StoreError> {
    Ok(load_spanned(db, catalog, tenant).await?.0)
}

/// [`load`], and the end (Unix ms) of the usage its metered lines read, if any.
pub async fn load_spanned(
    db: &Db,
    catalog: &Catalog,
    tenant: Option<&str>,
) -> Result<(Schedule, Option<i64>), StoreError> {
    let linked = db.tenants().linked(tenant).await?;
    let tenant_of: HashMap<&str, &str> = linked
        .iter()
        .map(|(t, c)| (c.as_str(), t.as_str()))
        .collect();
    // One tenant: its customer only ("" when it has none, which matches nothing).
    let customer = tenant.map(|_| linked.first().map_or("", |(_, c)| c.as_str()));
    let mut inputs = Inputs {
        price_meter: catalog
            .meters
            .values()
            .flat_map(|m| m.stripe_prices.iter().map(|p| (p.clone(), m.name.clone())))
            .collect(),
        ..Inputs::default()
    };
    let mut builder = Builder::default();
    let mut kept = Kept::default();
    db.mirror()
        .each(&["invoice", "credit_note", "charge"], customer, |row| {
            let Some(owner) = row.customer_id.as_deref().and_then(|c| tenant_of.get(c)) else {
                return;
            };
            let Ok(raw) = serde_json::from_str::<Value>(&row.payload) else {
                return;
            };
            match row.object_type.as_str() {
                "invoice" => {
                    let invoice = objects::invoice(&raw);
                    match metered_span(&inputs, &invoice) {
                        Some(span) => kept.metered.push((owner.to_string(), invoice, span)),
                        None => builder.invoice(&inputs, owner, &invoice),
                    }
                }
                "credit_note" => kept.notes.push(raw),
                _ if refunded(&raw) => kept.charges.push(raw),
                _ => {}
            }
        })
        .await?;
    let span = kept
        .metered
        .iter()
        .map(|(_, _, span)| *span)
        .reduce(|(a, b), (s, e)| (a.min(s), b.max(e)));
    if let Some(span) = span {
        inputs.usage = daily_usage(db, catalog, tenant, span).await?;
    }
    for (owner, invoice, _) in &kept.metered {
        builder.invoice(&inputs, owner, invoice);
    }
    let usage_until_ms = span.map(|(_, end)| end * 1000);
    Ok((builder.finish(&kept.notes, &kept.charges), usage_until_ms))
}

/// `(tenant, meter)` → usage per day.
type Usage = HashMap<(String, String), BTreeMap<Day, Decimal>>;

/// Whether a charge had money refunded.
fn refunded(charge: &Value) -> bool {
    let payment = objects::payment("charge", charge);
    payment.amount_refunded.is_some_and(|a| a > 0) || objects::charge_refunds(charge).is_some()
}

/// Daily usage of the catalog's meters over `(start, end)` (Unix seconds): a `sum` meter's
/// days are weighted by quantity, other meters' by their number of events.
async fn daily_usage(
    db: &Db,
    catalog: &Catalog,
    tenant: Option<&str>,
    (start, end): (i64, i64),
) -> Result<Usage, StoreError> {
    let by_quantity: HashMap<&str, bool> = catalog
        .meters
        .values()
        .map(|m| (m.name.as_str(), m.aggregation == Aggregation::Sum))
        .collect();
    let mut usage = Usage::new();
    db.usage()
        .each_between(start * 1000, end * 1000, tenant, |event| {
            let Some(&sum) = by_quantity.get(event.meter.as_str()) else {
                return;
            };
            let weight = if sum {
                event.quantity.parse().unwrap_or_default()
            } else {
                Decimal::ONE
            };
            *usage
                .entry((event.tenant_id, event.meter))
                .or_default()
                .entry(day_of(event.occurred_at.div_euclid(1000)))
                .or_default() += weight;
        })
        .await?;
    Ok(usage)
}

/// The span (Unix seconds) of an invoice's lines whose price a catalog meter bills, if any.
fn metered_span(inputs: &Inputs, invoice: &Invoice) -> Option<(i64, i64)> {
    invoice
        .lines
        .iter()
        .filter(|line| (line.price.as_ref()).is_some_and(|p| inputs.price_meter.contains_key(p)))
        .filter_map(|line| Some((line.period_start?, line.period_end?)))
        .reduce(|(a, b), (s, e)| (a.min(s), b.max(e)))
}
