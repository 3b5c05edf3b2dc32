//! Prepaid credits: Stripe's billing credit grants, burned by billsync's own usage log.
//!
//! What was decided, for whoever builds on this (low balance, top-ups, reconciliation):
//!
//! - **Grants** are mirrored like every other object (`ObjectKind::CreditGrant`, mirror rows of
//!   type `credit_grant`, raw payload kept) and read with `stripe::objects::credit_grant` into
//!   [`grants::CreditGrant`]. A grant is usable from `effective_at` until the earlier of
//!   `expires_at` and `voided_at`: burns made before a void or an expiry stay burned from it,
//!   and what was left is gone from then on.
//! - **Units.** A monetary grant's unit is its lowercase currency (`usd`) and its amount is in
//!   minor units (cents), as Stripe gives it; a custom pricing unit grant's unit is the unit's
//!   id (or `credits`). A credit-priced feature (catalog `credits_per_unit` + `credit_unit`)
//!   burns `quantity × credits_per_unit` of its unit per usage event of its meter. Every
//!   figure is an exact `Decimal`: a burn may be a fraction of a minor unit and is never
//!   rounded.
//! - **Burns are rows.** A burn is a usage event of a credit-priced feature's meter, taken from
//!   the usage log (`usage_events`), the source of truth: nothing else stores a burn, and no
//!   cache answers a decision. [`balance::allocate`] applies them to the grants in Stripe's
//!   order (priority, then earliest expiry, then creation), each at the event's time, only to
//!   grants usable then (and, for a grant scoped to `prices`, only for meters whose
//!   `stripe_prices` name one of them). Burns no grant covers are `uncovered` (billed by Stripe
//!   as plain usage), never taken from a later grant.
//! - **Running totals.** What a check reads instead of every burn: per tenant, meter and
//!   segment (time cut at every grant's start and end, of every unit), the summed quantity
//!   (`store::credit_totals`), written in the transaction of every usage row of a credit-priced
//!   meter and recomputed from the log only when the grants move the cuts. Filling grants in a
//!   fixed order is additive, so the figures are exactly the log's. The grants themselves are
//!   kept parsed per tenant ([`book::CreditBook`]) while their version, read with the totals,
//!   is current.
//! - **Balance** ([`balance::Balance`] `{unit, granted, burned, available}`): over the grants
//!   usable now, `available = granted − burned`. [`balance_of`] reads it from the store (any
//!   backend, outside a transaction, [`read_credits`]); on PostgreSQL the same computation runs
//!   inside check-and-record's transaction (`store::record`), under the tenant's credit lock.
//! - **Where a balance changes:** [`burn::record`] (check-and-record of a credit-priced
//!   feature: the one place a burn is admitted, atomically, under a lock per tenant taken on
//!   every replica); plain `POST /v1/usage` also stores burns, unchecked (its transaction sees
//!   low-balance crossings); and the applier storing a `credit_grant` mirror row (created,
//!   updated, voided, expired).

pub mod balance;
pub mod book;
pub mod burn;
pub mod grants;
pub mod ledger;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;

use crate::catalog::{Aggregation, Meter};
use crate::store::{Db, StoreError};
use balance::{Allocation, SegmentUsage, allocate};
use book::{TenantGrants, segment_usage};
use grants::CreditGrant;

/// A credit-priced feature: each unit of its meter burns `per_unit` of `unit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditFeature {
    pub name: String,
    pub meter: String,
    /// A lowercase currency (burns in minor units), a custom pricing unit id, or `credits`.
    pub unit: String,
    pub per_unit: Decimal,
    /// The meter's `stripe_prices`, for grants scoped to prices.
    pub prices: Vec<String>,
}

/// The credit-priced features of the catalog's `[features]`, checked against its meters.
pub fn features_of(
    features: &toml::Table,
    meters: &BTreeMap<String, Meter>,
) -> Result<BTreeMap<String, CreditFeature>, String> {
    let mut parsed: BTreeMap<String, CreditFeature> = BTreeMap::new();
    for (name, def) in features {
        let Some(table) = def.as_table() else {
            continue;
        };
        let (rate, unit) = (table.get("credits_per_unit"), table.get("credit_unit"));
        let feature = match (rate, unit) {
            (None, None) => continue,
            (Some(rate), Some(unit)) => credit_feature(name, table, rate, unit, meters)?,
            (Some(_), None) => {
                return Err(format!(
                    "features.{name}: credits_per_unit needs credit_unit (a currency such as \
                     \"usd\", a custom pricing unit id, or \"credits\")"
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "features.{name}: credit_unit needs credits_per_unit"
                ));
            }
        };
        if let Some(other) = parsed.values().find(|f| f.meter == feature.meter) {
            return Err(format!(
                "features.{name}: meter `{}` already burns credits for features.{}",
                feature.meter, other.name
            ));
        }
        parsed.insert(name.clone(), feature);
    }
    Ok(parsed)
}

fn credit_feature(
    name: &str,
    table: &toml::Table,
    rate: &toml::Value,
    unit: &toml::Value,
    meters: &BTreeMap<String, Meter>,
) -> Result<CreditFeature, String> {
    let per_unit = match rate {
        toml::Value::String(text) => Decimal::from_str(text.trim()).ok(),
        toml::Value::Integer(n) => Some(Decimal::from(*n)),
        _ => None,
    }
    .filter(|d| *d > Decimal::ZERO)
    .ok_or_else(|| {
        format!(
            "features.{name}.credits_per_unit must be a positive decimal written as a string \
             (e.g. \"0.0167\") or an integer, so it stays exact"
        )
    })?;
    let unit = unit
        .as_str()
        .filter(|u| {
            (1..=64).contains(&u.len())
                && u.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .ok_or_else(|| {
            format!(
                "features.{name}.credit_unit must be a lowercase currency (\"usd\"), a custom \
                 pricing unit id, or \"credits\""
            )
        })?;
    let meter = match table.get("meter") {
        Some(meter) => meter.as_str().unwrap_or_default(),
        None => name,
    };
    match meters.get(meter) {
        Some(m) if m.aggregation == Aggregation::Sum && !m.allow_negative => Ok(CreditFeature {
            name: name.to_owned(),
            meter: meter.to_owned(),
            unit: unit.to_owned(),
            per_unit: per_unit.normalize(),
            prices: m.stripe_prices.clone(),
        }),
        Some(_) => Err(format!(
            "features.{name}: meter `{meter}` must have aggregation = \"sum\" and no \
             allow_negative to burn credits"
        )),
        None => Err(format!(
            "features.{name}: meter `{meter}` is not in [meters]"
        )),
    }
}

/// The units the features burn, each with its features.
pub fn units(features: &BTreeMap<String, CreditFeature>) -> BTreeMap<&str, Vec<&CreditFeature>> {
    let mut units: BTreeMap<&str, Vec<&CreditFeature>> = BTreeMap::new();
    for feature in features.values() {
        units.entry(&feature.unit).or_default().push(feature);
    }
    units
}

/// The tenant's grants, from the mirror (any that cannot be read are skipped, logged).
pub fn grants_of(payloads: &[String]) -> Vec<CreditGrant> {
    payloads
        .iter()
        .filter_map(|p| {
            let object = serde_json::from_str(p).ok()?;
            let grant = crate::stripe::objects::credit_grant(&object);
            if grant.is_none() {
                tracing::warn!(payload = %p, "a credit grant without an amount billsync reads; not counted");
            }
            grant
        })
        .collect()
}

/// The tenant's allocation in each unit its features burn, read from the store, at `now`:
/// from its running totals ([`read_credits`]), whatever its usage history.
pub async fn balance_of(
    db: &Db,
    features: &BTreeMap<String, CreditFeature>,
    tenant: &str,
    now: i64,
) -> Result<Vec<Allocation>, StoreError> {
    if features.is_empty() {
        return Ok(Vec::new());
    }
    let book = book::CreditBook::new(features.clone());
    let (grants, usage) = read_credits(db, &book, tenant).await?;
    let mut out = Vec::new();
    for (unit, unit_features) in units(features) {
        let of_unit = grants.of_unit(unit);
        let (points, features) = (&grants.points, &unit_features);
        out.push(allocate(unit, &of_unit, features, points, &usage, now));
    }
    Ok(out)
}

/// Attempts at a consistent read before falling back to the usage log itself.
const READS: usize = 3;

/// The tenant's grants and its usage per segment of their cuts, from the running totals: the
/// grants from `book` while their version is current, the totals recomputed first if their
/// cuts are not the grants' (a grant changed since). Outside a transaction: for reads, and
/// for SQLite's check-and-record under its process lock.
pub async fn read_credits(
    db: &Db,
    book: &book::CreditBook,
    tenant: &str,
) -> Result<(Arc<TenantGrants>, Vec<SegmentUsage>), StoreError> {
    let credits = db.credits();
    for _ in 0..READS {
        let state = credits.state(tenant).await?.unwrap_or_default();
        let grants = match book.cached(tenant, &state) {
            Some(grants) => grants,
            None => book.keep(
                tenant,
                TenantGrants::read(credits.grant_rows(tenant).await?),
            ),
        };
        if !grants.current_in(&state) {
            continue; // a grant was written between the two reads
        }
        if book.totals_current(&state, &grants) {
            return Ok((grants.clone(), segment_usage(&grants.points, &state.totals)));
        }
        book.keep(tenant, credits.refresh(tenant, book).await?);
    }
    // Grants changing faster than they can be read: the usage log itself.
    let grants = book.keep(
        tenant,
        TenantGrants::read(credits.grant_rows(tenant).await?),
    );
    let usage = (credits.usage_by_segment(tenant, &book.meters, &grants.points)).await?;
    Ok((grants, usage))
}
