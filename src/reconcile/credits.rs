//! Credits (`area: credits`): per tenant and currency, what billsync's usage burned from
//! Stripe's credit grants in the window against what Stripe's credit balance transactions
//! debited in it (`GET /v1/billing/credit_balance_transactions?customer=..`).
//!
//! billsync's figure is computed from rows: the grants in the mirror and the usage log, burned
//! in Stripe's order ([`crate::credits::balance::allocate`]); what usage in `[from, to)` burned
//! is what the usage before `to` burned less what the usage before `from` did (a burn never
//! depends on later usage). Stripe debits credits when an invoice applies them, net of debits
//! given back (`credit.type` `credits_application_invoice_voided`), in whole minor units: a
//! difference of less than one minor unit is rounding, not a finding. Reconcile whole billing
//! periods, with the invoices that close them inside the window.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::json;

use super::{Finding, Item};
use crate::credits::CreditFeature;
use crate::credits::balance::{allocate, breakpoints};
use crate::error::WorkError;
use crate::store::Db;
use crate::stripe::{CreditTransaction, CreditVendor};
use crate::topup::is_currency;

/// What usage of `tenant` in `[from_ms, to_ms)` burned from its grants, per currency unit.
pub async fn burned(
    db: &Db,
    features: &BTreeMap<String, CreditFeature>,
    tenant: &str,
    (from_ms, to_ms): (i64, i64),
) -> Result<BTreeMap<String, Decimal>, WorkError> {
    let credits = db.credits();
    let grants = crate::credits::grants_of(&credits.grant_payloads(tenant).await?);
    let mut out = BTreeMap::new();
    for (unit, unit_features) in crate::credits::units(features) {
        if !is_currency(unit) {
            continue;
        }
        let of_unit: Vec<_> = grants.iter().filter(|g| g.unit == unit).cloned().collect();
        let mut points = breakpoints(&of_unit);
        points.extend([from_ms, to_ms]);
        points.sort_unstable();
        points.dedup();
        let meters: Vec<String> = unit_features.iter().map(|f| f.meter.clone()).collect();
        let usage = credits.usage_by_segment(tenant, &meters, &points).await?;
        let burned_before = |at: i64| {
            // Usage before `at` lies in the segments before the one `at` starts.
            let last = points.partition_point(|&p| p <= at);
            let before: Vec<_> = usage.iter().filter(|u| u.segment < last).cloned().collect();
            let allocation = allocate(unit, &of_unit, &unit_features, &points, &before, to_ms);
            allocation.grants.iter().map(|g| g.burned).sum::<Decimal>()
        };
        out.insert(
            unit.to_owned(),
            burned_before(to_ms) - burned_before(from_ms),
        );
    }
    Ok(out)
}

/// Stripe's net debits per currency, and the transactions whose amount could not be read.
pub fn debited(transactions: &[CreditTransaction]) -> (BTreeMap<String, Decimal>, Vec<String>) {
    let mut out: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for t in transactions {
        let given_back = t.kind == "credit"
            && t.raw["credit"]["type"].as_str() == Some("credits_application_invoice_voided");
        let sign = match t.kind.as_str() {
            "debit" => Decimal::ONE,
            _ if given_back => Decimal::NEGATIVE_ONE,
            _ => continue,
        };
        match (t.amount, &t.currency) {
            (Some(amount), Some(currency)) => {
                *out.entry(currency.clone()).or_default() += sign * amount;
            }
            _ => unreadable.push(t.id.clone()),
        }
    }
    (out, unreadable)
}

/// The `credit_mismatch` items of one tenant: a currency whose figures differ by a minor unit
/// or more, or whose transactions could not all be read.
pub async fn items(
    db: &Db,
    vendor: &dyn CreditVendor,
    features: &BTreeMap<String, CreditFeature>,
    (tenant, customer): (&str, &str),
    (from_ms, to_ms): (i64, i64),
) -> Result<Vec<Item>, WorkError> {
    let burned = burned(db, features, tenant, (from_ms, to_ms)).await?;
    if burned.is_empty() {
        return Ok(Vec::new());
    }
    let (from_s, to_s) = (from_ms.div_euclid(1000), to_ms.div_euclid(1000));
    let Some(transactions) = vendor.credit_transactions(customer, from_s, to_s).await? else {
        tracing::info!(
            tenant_id = tenant,
            "the vendor lists no credit balance transactions: credits not reconciled"
        );
        return Ok(Vec::new());
    };
    let (debited, unreadable) = debited(&transactions);
    let mut units: Vec<&String> = burned.keys().chain(debited.keys()).collect();
    units.sort();
    units.dedup();
    let mut out = Vec::new();
    for unit in units {
        let ours = burned.get(unit).copied().unwrap_or_default();
        let theirs = debited.get(unit).copied().unwrap_or_default();
        let difference = ours - theirs;
        if difference.abs() < Decimal::ONE && unreadable.is_empty() {
            continue;
        }
        let ids: Vec<&str> = (transactions.iter())
            .filter(|t| t.currency.as_deref() == Some(unit.as_str()))
            .map(|t| t.id.as_str())
            .collect();
        out.push(Item {
            area: "credits",
            finding: Finding::CreditMismatch,
            tenant_id: Some(tenant.to_owned()),
            detail: json!({
                "customer_id": customer,
                "unit": unit,
                "burned": ours.normalize().to_string(),
                "vendor_debited": theirs.normalize().to_string(),
                "difference": difference.normalize().to_string(),
                "cause": cause(difference, &unreadable),
                "evidence": {"transactions": ids, "unreadable_transactions": unreadable},
            }),
            repair: None,
        });
    }
    Ok(out)
}

fn cause(difference: Decimal, unreadable: &[String]) -> String {
    if !unreadable.is_empty() {
        return format!(
            "{} credit balance transactions have no amount billsync can read",
            unreadable.len()
        );
    }
    if difference > Decimal::ZERO {
        "billsync's usage burned more than Stripe debited: usage Stripe did not bill against the \
         grants yet (an invoice not final in the window), or usage it lost"
            .to_owned()
    } else {
        "Stripe debited more than billsync's usage burned: usage billsync did not record, or \
         grants applied to other metered prices"
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::credit_transaction;

    #[test]
    fn net_debits_count_voided_applications_back() {
        let t = |v: serde_json::Value| credit_transaction(&v);
        let transactions = [
            t(json!({"id": "a", "type": "debit", "effective_at": 1,
                "debit": {"amount": {"monetary": {"value": 300, "currency": "usd"}}}})),
            t(json!({"id": "b", "type": "credit", "effective_at": 1,
                "credit": {"type": "credits_application_invoice_voided",
                    "amount": {"monetary": {"value": 100, "currency": "usd"}}}})),
            t(json!({"id": "c", "type": "credit", "effective_at": 1,
                "credit": {"type": "credits_granted",
                    "amount": {"monetary": {"value": 5000, "currency": "usd"}}}})),
            t(json!({"id": "d", "type": "debit", "effective_at": 1})),
        ];
        let (debited, unreadable) = debited(&transactions);
        assert_eq!(debited["usd"], Decimal::from(200));
        assert_eq!(unreadable, vec!["d".to_owned()]);
    }
}
