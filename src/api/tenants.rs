//! `PUT /v1/tenants/{tenant_id}` and `GET /v1/tenants/{tenant_id}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::json::ApiJson;
use crate::app::AppState;
use crate::domain::{Email, TenantId, TenantName};
use crate::store::{TenantRecord, Upserted, now_ms};

/// The body of `PUT /v1/tenants/{tenant_id}`. PUT replaces: an absent field is cleared.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantIn {
    pub name: Option<String>,
    pub email: Option<String>,
}

/// A tenant as the product sees it.
#[derive(Debug, Serialize)]
pub struct TenantOut {
    pub tenant_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    /// The Stripe customer, once there is one.
    pub customer_id: Option<String>,
    /// The mirrored subscription; null until vendor sync has seen one.
    pub subscription: Option<serde_json::Value>,
    /// When the vendor state was last confirmed; null until then.
    pub synced_at: Option<String>,
    /// Commands sent to the vendor and not yet confirmed.
    pub pending: Vec<serde_json::Value>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<TenantRecord> for TenantOut {
    fn from(record: TenantRecord) -> Self {
        Self {
            tenant_id: record.tenant_id,
            name: record.name,
            email: record.email,
            customer_id: record.customer_id,
            subscription: None,
            synced_at: None,
            pending: Vec::new(),
            created_at: rfc3339(record.created_at),
            updated_at: rfc3339(record.updated_at),
        }
    }
}

/// Creates the tenant (201) or replaces its name and email (200).
pub async fn put_tenant(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<TenantIn>,
) -> Result<(StatusCode, Json<TenantOut>), ApiError> {
    let tenant_id = TenantId::parse(&tenant_id)?;
    let name = body.name.as_deref().map(TenantName::parse).transpose()?;
    let email = body.email.as_deref().map(Email::parse).transpose()?;
    let upserted = state
        .db
        .tenants()
        .upsert(&tenant_id, name.as_ref(), email.as_ref(), now_ms())
        .await?;
    Ok(match upserted {
        Upserted::Created(record) => {
            tracing::info!(tenant_id = %tenant_id, "tenant created");
            (StatusCode::CREATED, Json(record.into()))
        }
        Upserted::Updated(record) => (StatusCode::OK, Json(record.into())),
    })
}

pub async fn get_tenant(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
) -> Result<Json<TenantOut>, ApiError> {
    let tenant_id = TenantId::parse(&tenant_id)?;
    let record = state.db.tenants().get(&tenant_id).await?.ok_or_else(|| {
        ApiError::not_found("tenant_not_found", format!("no tenant `{tenant_id}`"))
    })?;
    Ok(Json(record.into()))
}

fn rfc3339(unix_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}
