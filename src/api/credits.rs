//! Prepaid credits over HTTP: `GET /v1/tenants/{t}/credits` (balances and the ledger), and
//! the check (and check-and-record) of a credit-priced feature, which
//! `POST .../entitlements/check` hands over here.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Value, json};

use super::auth::KeyScope;
use super::entitlements::{CheckOut, RecordIn};
use super::error::ApiError;
use super::pagination::PageRequest;
use super::tenants::load;
use crate::credits::CreditFeature;
use crate::credits::balance::Balance;
use crate::credits::burn::{Burn, CreditCheck};
use crate::entitlements::model::Grant;
use crate::entitlements::{Decision, TenantModel};
use crate::metering::Recorded;
use crate::state::AppState;
use crate::store::{UsageRow, now_ms};

/// Why a credit-priced check is refused when the balance cannot cover it.
pub const INSUFFICIENT_CREDITS: &str = billsync_rules::reason::INSUFFICIENT_CREDITS;

/// The credit side of a check's answer.
#[derive(Debug, Serialize)]
pub struct CreditOut {
    pub unit: String,
    /// What the check's quantity costs: quantity × the feature's `credits_per_unit`.
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    /// The balance after the answer (with the record, when one was stored).
    pub balance: Balance,
}

#[derive(Debug, Serialize)]
pub struct CreditsOut {
    pub tenant_id: String,
    pub balances: Vec<Balance>,
    pub data: Vec<Value>,
    pub next_cursor: Option<String>,
}

pub async fn get_credits(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<CreditsOut>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let request = PageRequest::from_query(&query)?;
    let features = state.entitlements.plans().credits.clone();
    let (balances, mut entries) = crate::credits::ledger::page(
        &state.db,
        &features,
        &tenant.tenant_id,
        now_ms(),
        request.before.as_ref(),
        request.fetch_limit(),
    )
    .await?;
    let next_cursor = request.finish(&mut entries, |e| (e.at, e.key.clone()));
    Ok(Json(CreditsOut {
        tenant_id: tenant.tenant_id,
        balances,
        data: entries.into_iter().map(|e| e.body).collect(),
        next_cursor,
    }))
}

/// The balances shown with a tenant's entitlements.
pub async fn balances(state: &AppState, tenant: &str) -> Result<Vec<Balance>, ApiError> {
    let features = state.entitlements.plans().credits.clone();
    let allocations = crate::credits::balance_of(&state.db, &features, tenant, now_ms()).await?;
    Ok(allocations.into_iter().map(|a| a.balance).collect())
}

/// A check of a credit-priced feature: allowed while the tenant's credits in its unit cover
/// `quantity × credits_per_unit`; with `record`, burned in the same step, atomically.
pub async fn check(
    state: &AppState,
    model: Arc<TenantModel>,
    feature: &CreditFeature,
    quantity: Decimal,
    record: Option<&RecordIn>,
) -> Result<CheckOut, ApiError> {
    let now = now_ms();
    let (as_of, stale) = state.entitlements.freshness(&model, now);
    let decision = |allowed: bool, reason: &'static str, balance: &Balance| Decision {
        allowed,
        reason,
        limit: None,
        used: Some(balance.burned),
        remaining: Some(balance.available),
        as_of,
        stale,
    };
    if let Some(Grant::Boolean { enabled: false }) = model.features.get(&feature.name) {
        let refused = Decision {
            allowed: false,
            reason: "feature_not_in_plan",
            ..decision(false, "", &empty(&feature.unit))
        };
        return Ok(out(refused, record.map(|_| false), None));
    }
    let credit = CreditCheck {
        unit: feature.unit.clone(),
        features: (state.entitlements.plans().credits.values())
            .filter(|f| f.unit == feature.unit)
            .cloned()
            .collect(),
        now,
        book: state.metering.credits.clone(),
    };
    let Some(record) = record else {
        let row = UsageRow {
            tenant_id: model.tenant_id.clone(),
            meter: feature.meter.clone(),
            quantity: quantity.to_string(),
            occurred_at: now,
            ..UsageRow::default()
        };
        let burn = credit.judge_from_store(&state.db, &row).await?;
        let answer = match burn.covered {
            true => decision(true, "ok", &burn.before),
            false => decision(false, INSUFFICIENT_CREDITS, &burn.before),
        };
        return Ok(out(answer, None, Some(credit_out(&burn, &burn.before))));
    };
    let mut event = json!({"id": record.id, "tenant_id": model.tenant_id, "meter": feature.meter,
        "quantity": quantity.to_string()});
    if let Some(timestamp) = &record.timestamp {
        event["timestamp"] = json!(timestamp);
    }
    // Run to the end even if the caller goes away, so that the database lock is released.
    let metering = state.metering.clone();
    let (recorded, burn) =
        tokio::spawn(async move { metering.record_credits(&event, now_ms(), credit).await })
            .await
            .map_err(|e| ApiError::internal(&e))??;
    let burn = burn.ok_or_else(|| {
        ApiError::internal(&std::io::Error::other("a credit record without its burn"))
    })?;
    let (answer, stored, balance) = match recorded {
        Recorded::Invalid(rejection) => {
            return Err(
                ApiError::bad_request("invalid_record", rejection.message).with_field("record")
            );
        }
        Recorded::Existing { .. } => (decision(true, "ok", &burn.before), true, &burn.before),
        Recorded::Stored { .. } => (
            decision(true, "ok", &burn.with_event),
            true,
            &burn.with_event,
        ),
        Recorded::Refused { .. } => (
            decision(false, INSUFFICIENT_CREDITS, &burn.before),
            false,
            &burn.before,
        ),
    };
    let credit = credit_out(&burn, balance);
    Ok(out(answer, Some(stored), Some(credit)))
}

fn out(decision: Decision, recorded: Option<bool>, credits: Option<CreditOut>) -> CheckOut {
    CheckOut {
        decision,
        recorded,
        credits,
    }
}

fn credit_out(burn: &Burn, balance: &Balance) -> CreditOut {
    CreditOut {
        unit: balance.unit.clone(),
        cost: burn.cost,
        balance: balance.clone(),
    }
}

fn empty(unit: &str) -> Balance {
    Balance {
        unit: unit.to_owned(),
        granted: Decimal::ZERO,
        burned: Decimal::ZERO,
        available: Decimal::ZERO,
    }
}
