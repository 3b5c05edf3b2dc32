//! Entitlement checks: `GET /v1/tenants/{t}/entitlements`, `POST /v1/tenants/{t}/entitlements/check`
//! and the batch `POST /v1/entitlements/check`.

use std::collections::BTreeMap;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auth::KeyScope;
use super::error::ApiError;
use super::json::ApiJson;
use super::tenants::load;
use crate::domain::{TenantId, parse_quantity, rfc3339};
use crate::entitlements::model::Grant;
use crate::entitlements::{Decision, TenantModel};
use crate::metering::Recorded;
use crate::state::AppState;
use crate::store::now_ms;

/// Most checks in one batch call.
pub const MAX_CHECKS: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckIn {
    pub feature: String,
    /// How much the action would use of a quota (default 1).
    pub quantity: Option<Value>,
    /// Record the usage when allowed, in the same atomic step.
    pub record: Option<RecordIn>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordIn {
    /// The usage event id: a repeated id is recorded once.
    pub id: String,
    pub timestamp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchCheckIn {
    pub tenant_id: String,
    pub feature: String,
    pub quantity: Option<Value>,
    pub record: Option<RecordIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchIn {
    pub checks: Vec<BatchCheckIn>,
}

#[derive(Debug, Serialize)]
pub struct CheckOut {
    #[serde(flatten)]
    pub decision: Decision,
    /// Whether a `record` was stored (or had been, for a repeated id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded: Option<bool>,
    /// For a credit-priced feature: its unit, the check's cost and the balance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<super::credits::CreditOut>,
}

/// The check's quantity, by the same rule as usage (checks never take negatives); default 1.
fn quantity(raw: &Option<Value>) -> Result<Decimal, ApiError> {
    let raw = raw.as_ref().unwrap_or(&Value::Null);
    parse_quantity(raw, false)
        .map(|quantity| quantity.unwrap_or(Decimal::ONE))
        .map_err(|refused| ApiError::from(refused).with_field("quantity"))
}

fn unknown_tenant() -> CheckOut {
    CheckOut {
        decision: Decision::UNKNOWN_TENANT,
        recorded: None,
        credits: None,
    }
}

/// One check (and record), the heart of both check routes.
async fn check_one(
    state: &AppState,
    tenant: &str,
    feature: &str,
    quantity: Decimal,
    record: Option<&RecordIn>,
) -> Result<CheckOut, ApiError> {
    let entitlements = &state.entitlements;
    // A record's timestamp is checked whatever the answer, not only when it is recorded.
    if let Some(timestamp) = record.and_then(|r| r.timestamp.as_deref())
        && chrono::DateTime::parse_from_rfc3339(timestamp).is_err()
    {
        return Err(ApiError::bad_request(
            "invalid_record",
            format!("record.timestamp `{timestamp}` is not an RFC 3339 date-time"),
        )
        .with_field("record.timestamp"));
    }
    if let Some(credit) = entitlements.plans().credits.get(feature).cloned() {
        let Some(model) = entitlements.model(tenant).await? else {
            return Ok(unknown_tenant());
        };
        return super::credits::check(state, model, &credit, quantity, record).await;
    }
    if record.is_none() {
        // The hot path: a warm tenant is answered from memory.
        if let Some(decision) = entitlements.check_warm(tenant, feature, quantity, now_ms()) {
            return Ok(CheckOut {
                decision,
                recorded: None,
                credits: None,
            });
        }
    }
    let Some(model) = entitlements.model(tenant).await? else {
        return Ok(unknown_tenant());
    };
    let decision = entitlements.decide(&model, feature, quantity, now_ms());
    let Some(record) = record else {
        return Ok(CheckOut {
            decision,
            recorded: None,
            credits: None,
        });
    };
    let Some(Grant::Quota { meter, .. }) = model.features.get(feature) else {
        // Nothing to count: a boolean feature, or one the plan lacks.
        return Ok(CheckOut {
            decision,
            recorded: Some(false),
            credits: None,
        });
    };
    // Check and record under one lock per tenant and meter: the last unit goes once. Run to
    // the end even if the caller goes away, so that the database lock is always released.
    let (state, tenant, feature, meter) = (
        state.clone(),
        tenant.to_owned(),
        feature.to_owned(),
        meter.clone(),
    );
    let record = record.clone();
    tokio::spawn(async move {
        let names = (tenant.as_str(), feature.as_str(), meter.as_str());
        record_within_limit(&state, names, quantity, &record, model).await
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
}

/// The recording half of check-and-record: the record is stored only when the quota allows
/// it, with `used` read from the usage log under one lock per tenant and meter, so that what
/// other requests and replicas recorded counts too and the last unit goes once.
async fn record_within_limit(
    state: &AppState,
    (tenant, feature, meter): (&str, &str, &str),
    quantity: Decimal,
    record: &RecordIn,
    model: std::sync::Arc<TenantModel>,
) -> Result<CheckOut, ApiError> {
    let mut event = json!({"id": record.id, "tenant_id": tenant, "meter": meter, "quantity": quantity.to_string()});
    if let Some(timestamp) = &record.timestamp {
        event["timestamp"] = json!(timestamp);
    }
    let entitlements = &state.entitlements;
    let ceiling = entitlements.ceiling(&model, feature, quantity);
    let recorded = state
        .metering
        .record_checked(&event, now_ms(), model.period, ceiling)
        .await?;
    // The decision given `used` from the usage log (`None`: no usage yet).
    let decide = |quantity, used: Option<Decimal>| {
        let used = Some(used.unwrap_or_default());
        entitlements.decide_with_used(&model, feature, quantity, now_ms(), used)
    };
    // The record is there: allowed, with `used` as it stands.
    let recorded_with = |used| Decision {
        allowed: true,
        reason: "ok",
        ..decide(Decimal::ZERO, used)
    };
    let (decision, recorded) = match recorded {
        Recorded::Invalid(rejection) => {
            return Err(
                ApiError::bad_request("invalid_record", rejection.message).with_field("record")
            );
        }
        Recorded::Existing { used } => (recorded_with(used), true),
        Recorded::Refused { used } => (decide(quantity, used), false),
        // `used` as it stands after this record.
        Recorded::Stored { after, .. } => (recorded_with(after), true),
    };
    Ok(CheckOut {
        decision,
        recorded: Some(recorded),
        credits: None,
    })
}

pub async fn check(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<CheckIn>,
) -> Result<Json<CheckOut>, ApiError> {
    let tenant = TenantId::parse(&tenant_id)?;
    if !scope.allows(tenant.as_str()) {
        return Err(ApiError::not_found(
            "tenant_not_found",
            format!("no tenant `{tenant}`"),
        ));
    }
    let quantity = quantity(&body.quantity)?;
    Ok(Json(
        check_one(
            &state,
            tenant.as_str(),
            &body.feature,
            quantity,
            body.record.as_ref(),
        )
        .await?,
    ))
}

pub async fn check_batch(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    ApiJson(body): ApiJson<BatchIn>,
) -> Result<Json<Value>, ApiError> {
    if body.checks.len() > MAX_CHECKS {
        let message = format!("at most {MAX_CHECKS} checks per call");
        return Err(ApiError::bad_request("too_many_checks", message).with_field("checks"));
    }
    // Every quantity is checked before any check runs, so a bad one records nothing.
    let quantities = body
        .checks
        .iter()
        .enumerate()
        .map(|(i, check)| {
            quantity(&check.quantity).map_err(|e| e.with_field(format!("checks[{i}].quantity")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut results = Vec::with_capacity(body.checks.len());
    for (i, (check, quantity)) in body.checks.iter().zip(quantities).enumerate() {
        let visible = TenantId::parse(&check.tenant_id).is_ok() && scope.allows(&check.tenant_id);
        let out = if visible {
            let record = check.record.as_ref();
            check_one(&state, &check.tenant_id, &check.feature, quantity, record)
                .await
                .map_err(|e| match e.field.clone() {
                    Some(field) if field.starts_with("record") => {
                        e.with_field(format!("checks[{i}].{field}"))
                    }
                    _ => e,
                })?
        } else {
            unknown_tenant()
        };
        let mut value = serde_json::to_value(out).expect("check answers serialise");
        value["tenant_id"] = json!(check.tenant_id);
        value["feature"] = json!(check.feature);
        results.push(value);
    }
    Ok(Json(json!({ "results": results })))
}

#[derive(Debug, Serialize)]
pub struct EntitlementsOut {
    pub tenant_id: String,
    pub plan: Option<String>,
    pub status: Option<String>,
    pub as_of: Option<String>,
    pub stale: bool,
    pub features: BTreeMap<String, Value>,
    /// The tenant's credit balance in each unit a credit-priced feature burns.
    pub credits: Vec<crate::credits::balance::Balance>,
}

pub async fn get_entitlements(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
) -> Result<Json<EntitlementsOut>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let model: std::sync::Arc<TenantModel> = state
        .entitlements
        .model(&tenant.tenant_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("tenant_not_found", format!("no tenant `{tenant_id}`"))
        })?;
    let (as_of, stale) = state.entitlements.freshness(&model, now_ms());
    let (start, end) = model.period;
    let features = model
        .features
        .iter()
        .map(|(name, grant)| {
            let value = match grant {
                Grant::Boolean { enabled } => json!({"kind": "boolean", "enabled": enabled}),
                Grant::Quota { limit, meter } => {
                    let used = state.entitlements.used(&model, meter);
                    let remaining = limit.map(|l| (Decimal::from(l) - used).max(Decimal::ZERO).normalize().to_string());
                    json!({"kind": "quota", "limit": limit, "used": used.normalize().to_string(), "remaining": remaining,
                        "meter": meter, "period_start": rfc3339(start), "period_end": rfc3339(end)})
                }
            };
            (name.clone(), value)
        })
        .collect();
    Ok(Json(EntitlementsOut {
        tenant_id: model.tenant_id.clone(),
        plan: model.plan.clone(),
        status: model.status.clone(),
        as_of: as_of.map(rfc3339),
        stale,
        features,
        credits: super::credits::balances(&state, &model.tenant_id).await?,
    }))
}
