//! The credits ledger of `GET /v1/tenants/{t}/credits`: the tenant's grants (each with what was
//! burned from it) and its burns (the usage events of credit-priced meters), newest first.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::CreditFeature;
use super::balance::{Allocation, Balance, allocate, breakpoints};
use crate::domain::rfc3339;
use crate::store::{Db, StoreError};

/// One ledger entry and its place in the order: `(at, key)`, newest first.
#[derive(Debug, Clone)]
pub struct Entry {
    pub at: i64,
    /// `g:<grant id>` or `b:<event id>`: unique, and what the cursor names.
    pub key: String,
    pub body: Value,
}

/// Every unit's balance, and a page of entries strictly before `before`, at most `limit`.
pub async fn page(
    db: &Db,
    features: &BTreeMap<String, CreditFeature>,
    tenant: &str,
    now: i64,
    before: Option<&(i64, String)>,
    limit: u32,
) -> Result<(Vec<Balance>, Vec<Entry>), StoreError> {
    let allocations = allocations(db, features, tenant, now).await?;
    let mut entries: Vec<Entry> = allocations
        .iter()
        .flat_map(|a| a.grants.iter())
        .map(|u| {
            let g = &u.grant;
            let body = json!({"type": "grant", "id": g.id, "at": rfc3339(g.effective_ms),
                "unit": g.unit, "amount": text(g.amount), "burned": text(u.burned),
                "remaining": text(g.amount - u.burned), "status": g.status(now),
                "priority": g.priority, "category": g.category, "name": g.name,
                "effective_at": rfc3339(g.effective_ms), "expires_at": g.expires_ms.map(rfc3339),
                "voided_at": g.voided_ms.map(rfc3339), "prices": g.prices});
            Entry {
                at: g.effective_ms,
                key: format!("g:{}", g.id),
                body,
            }
        })
        .filter(|e| before.is_none_or(|b| (e.at, &e.key) < (b.0, &b.1)))
        .collect();
    entries.extend(burns(db, features, tenant, before, limit).await?);
    entries.sort_by(|a, b| (b.at, &b.key).cmp(&(a.at, &a.key)));
    entries.truncate(limit as usize);
    Ok((
        allocations.into_iter().map(|a| a.balance).collect(),
        entries,
    ))
}

/// The allocation of every unit a feature burns or a grant is in.
async fn allocations(
    db: &Db,
    features: &BTreeMap<String, CreditFeature>,
    tenant: &str,
    now: i64,
) -> Result<Vec<Allocation>, StoreError> {
    let mut out = super::balance_of(db, features, tenant, now).await?;
    let grants = super::grants_of(&db.credits().grant_payloads(tenant).await?);
    let burned: BTreeSet<String> = out.iter().map(|a| a.balance.unit.clone()).collect();
    let others: BTreeSet<&str> = grants
        .iter()
        .map(|g| g.unit.as_str())
        .filter(|u| !burned.contains(*u))
        .collect();
    for unit in others {
        let points = breakpoints(&grants);
        out.push(allocate(unit, &grants, &[], &points, &[], now));
    }
    Ok(out)
}

/// Burns strictly before `before`, newest first, at most `limit`.
async fn burns(
    db: &Db,
    features: &BTreeMap<String, CreditFeature>,
    tenant: &str,
    before: Option<&(i64, String)>,
    limit: u32,
) -> Result<Vec<Entry>, StoreError> {
    let meters: Vec<String> = features.values().map(|f| f.meter.clone()).collect();
    // A grant's key sorts after every burn's at the same millisecond.
    let bound = before.map(|(at, key)| match key.strip_prefix("b:") {
        Some(id) => (*at, id.to_owned()),
        None => (at + 1, String::new()),
    });
    let rows = (db.credits())
        .burns_page(tenant, &meters, bound.as_ref(), limit)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let feature = features.values().find(|f| f.meter == row.meter)?;
            let quantity: Decimal = row.quantity.parse().ok()?;
            let body = json!({"type": "burn", "id": row.event_id, "at": rfc3339(row.occurred_at),
                "unit": feature.unit, "amount": text(quantity * feature.per_unit),
                "feature": feature.name, "meter": row.meter, "quantity": text(quantity)});
            Some(Entry {
                at: row.occurred_at,
                key: format!("b:{}", row.event_id),
                body,
            })
        })
        .collect())
}

fn text(d: Decimal) -> String {
    d.normalize().to_string()
}
