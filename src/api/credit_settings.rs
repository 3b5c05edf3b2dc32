//! A tenant's low-balance and auto top-up settings, per credit unit
//! (`GET /v1/tenants/{t}/credits/settings`, `PUT /v1/tenants/{t}/credits/settings/{unit}`).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::KeyScope;
use super::error::ApiError;
use super::json::ApiJson;
use super::tenants::load;
use crate::domain::{parse_quantity, rfc3339};
use crate::state::AppState;
use crate::store::{CreditSettingsRow, now_ms};
use crate::topup::is_currency;

/// The body of `PUT /v1/tenants/{t}/credits/settings/{unit}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditSettingsIn {
    /// An exact decimal in the unit's terms (minor units of a currency), at least 0.
    pub threshold: Value,
    /// Minor units of the currency, a positive integer; needed for auto top-up.
    #[serde(default)]
    pub top_up_amount: Value,
    #[serde(default)]
    pub auto_top_up: bool,
}

#[derive(Debug, Serialize)]
pub struct CreditSettingsOut {
    pub unit: String,
    /// A decimal string.
    pub threshold: String,
    /// Minor units of the currency.
    pub top_up_amount: Option<i64>,
    pub auto_top_up: bool,
    /// False from a crossing until the balance is at or above the threshold again.
    pub armed: bool,
    pub crossings: i32,
    pub updated_at: String,
}

#[derive(Debug, Serialize)]
pub struct CreditSettingsList {
    pub tenant_id: String,
    pub data: Vec<CreditSettingsOut>,
}

impl From<CreditSettingsRow> for CreditSettingsOut {
    fn from(row: CreditSettingsRow) -> Self {
        Self {
            threshold: row.threshold,
            top_up_amount: row.top_up_amount.and_then(|a| a.parse().ok()),
            auto_top_up: row.auto_top_up != 0,
            armed: row.armed != 0,
            crossings: row.crossings,
            updated_at: rfc3339(row.updated_at),
            unit: row.unit,
        }
    }
}

pub async fn list(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
) -> Result<Json<CreditSettingsList>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let rows = state
        .db
        .credit_alerts()
        .settings_of(&tenant.tenant_id)
        .await?;
    Ok(Json(CreditSettingsList {
        tenant_id: tenant.tenant_id,
        data: rows.into_iter().map(CreditSettingsOut::from).collect(),
    }))
}

pub async fn put(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path((tenant_id, unit)): Path<(String, String)>,
    ApiJson(body): ApiJson<CreditSettingsIn>,
) -> Result<Json<CreditSettingsOut>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let unit = valid_unit(&unit)?;
    let (threshold, top_up_amount) = amounts(&unit, &body)?;
    if body.auto_top_up && (top_up_amount.is_none() || !is_currency(&unit)) {
        let message = if is_currency(&unit) {
            "auto_top_up needs a top_up_amount"
        } else {
            "auto top-up works for currency units only (Stripe's billing credits are monetary)"
        };
        return Err(ApiError::bad_request("invalid_value", message).with_field("auto_top_up"));
    }
    let row = state
        .db
        .credit_alerts()
        .put(
            &tenant.tenant_id,
            &unit,
            threshold,
            top_up_amount,
            body.auto_top_up,
            now_ms(),
        )
        .await?;
    tracing::info!(tenant_id = %tenant.tenant_id, unit, auto_top_up = body.auto_top_up, "credit settings changed");
    Ok(Json(row.into()))
}

/// A unit: a lowercase currency or a credit unit id, 1 to 64 of `[a-z0-9_]`.
fn valid_unit(unit: &str) -> Result<String, ApiError> {
    let ok = (1..=64).contains(&unit.len())
        && unit
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        let message =
            "unit must be a lowercase currency (usd) or a credit unit id of a-z, 0-9 and _";
        return Err(ApiError::bad_request("invalid_value", message).with_field("unit"));
    }
    Ok(unit.to_owned())
}

/// The threshold (exact, at least 0; whole minor units for a currency) and the top-up amount.
fn amounts(unit: &str, body: &CreditSettingsIn) -> Result<(Decimal, Option<i64>), ApiError> {
    let invalid = |field: &str, message: &str| {
        ApiError::bad_request("invalid_value", message.to_owned()).with_field(field.to_owned())
    };
    let threshold = parse_quantity(&body.threshold, false)
        .map_err(|e| invalid("threshold", e.message))?
        .ok_or_else(|| invalid("threshold", "threshold is required"))?;
    if is_currency(unit) && !threshold.fract().is_zero() {
        return Err(invalid(
            "threshold",
            "threshold of a currency is in whole minor units (cents)",
        ));
    }
    let top_up = match parse_quantity(&body.top_up_amount, false)
        .map_err(|e| invalid("top_up_amount", e.message))?
    {
        None => None,
        Some(amount) => {
            let whole = (amount.fract().is_zero() && amount > Decimal::ZERO)
                .then(|| i64::try_from(amount).ok())
                .flatten();
            Some(whole.ok_or_else(|| {
                invalid(
                    "top_up_amount",
                    "top_up_amount is a positive whole number of minor units",
                )
            })?)
        }
    };
    if top_up.is_some() && !is_currency(unit) {
        return Err(invalid(
            "top_up_amount",
            "a top-up amount needs a currency unit",
        ));
    }
    Ok((threshold.normalize(), top_up))
}
