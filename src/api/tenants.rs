//! Tenants: `PUT` and `GET /v1/tenants/{tenant_id}`, with the mirrored subscription.

use axum::Extension;
use axum::Json;
use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};

use super::auth::KeyScope;
use super::commands::{CommandOut, customer_sync, pending_of};
use super::error::ApiError;
use super::json::ApiJson;
use super::pagination::limit_from_query;
use super::sync::PageOut;
use crate::domain::{Email, Subscription, TenantId, TenantName, rfc3339, rfc3339_secs};
use crate::state::AppState;
use crate::store::{TenantRecord, Upserted, now_ms};
use crate::stripe::ObjectKind;

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
    pub subscription: Option<SubscriptionOut>,
    /// When the vendor state was last confirmed; null until then.
    pub synced_at: Option<String>,
    /// Commands sent to the vendor and not yet confirmed, oldest first.
    pub pending: Vec<CommandOut>,
    pub created_at: String,
    pub updated_at: String,
}

/// The tenant's subscription as mirrored from the vendor.
#[derive(Debug, Serialize)]
pub struct SubscriptionOut {
    pub id: String,
    pub status: String,
    pub items: Vec<ItemOut>,
    pub current_period_start: Option<String>,
    pub current_period_end: Option<String>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<String>,
    pub trial_end: Option<String>,
    /// While collection is paused: Stripe's `pause_collection.behavior`.
    pub pause: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ItemOut {
    /// The price id, or the plan id for legacy plans.
    pub price: Option<String>,
    pub quantity: Option<i64>,
}

impl From<Subscription> for SubscriptionOut {
    fn from(s: Subscription) -> Self {
        Self {
            id: s.id,
            status: s.status,
            items: s
                .items
                .into_iter()
                .map(|item| ItemOut {
                    price: item.price,
                    quantity: item.quantity.and_then(|q| q.to_i64()),
                })
                .collect(),
            current_period_start: s.current_period_start.map(rfc3339_secs),
            current_period_end: s.current_period_end.map(rfc3339_secs),
            cancel_at_period_end: s.cancel_at_period_end,
            cancel_at: s.cancel_at.map(rfc3339_secs),
            trial_end: s.trial_end.map(rfc3339_secs),
            pause: s.pause,
        }
    }
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
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    ApiJson(body): ApiJson<TenantIn>,
) -> Result<(StatusCode, Json<TenantOut>), ApiError> {
    let tenant_id = TenantId::parse(&tenant_id)?;
    if !scope.allows(tenant_id.as_str()) {
        return Err(not_found(&tenant_id));
    }
    let name = body.name.as_deref().map(TenantName::parse).transpose()?;
    let email = body.email.as_deref().map(Email::parse).transpose()?;
    let sync = customer_sync(&state);
    let upserted = state
        .db
        .tenants()
        .upsert(
            &tenant_id,
            name.as_ref(),
            email.as_ref(),
            now_ms(),
            sync.as_ref(),
        )
        .await?;
    if sync.is_some() {
        state.outbox_wake.notify_one();
    }
    Ok(match upserted {
        Upserted::Created(record) => {
            tracing::info!(tenant_id = %tenant_id, "tenant created");
            (StatusCode::CREATED, Json(view(&state, record).await?))
        }
        Upserted::Updated(record) => (StatusCode::OK, Json(view(&state, record).await?)),
    })
}

pub async fn get_tenant(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
) -> Result<Json<TenantOut>, ApiError> {
    let record = load(&state, &scope, &tenant_id).await?;
    Ok(Json(view(&state, record).await?))
}

/// The tenant named in the path, or a JSON 400/404 (also for a tenant the key may not see).
pub async fn load(
    state: &AppState,
    scope: &KeyScope,
    raw_id: &str,
) -> Result<TenantRecord, ApiError> {
    let tenant_id = TenantId::parse(raw_id)?;
    if !scope.allows(tenant_id.as_str()) {
        return Err(not_found(&tenant_id));
    }
    state
        .db
        .tenants()
        .get(&tenant_id)
        .await?
        .ok_or_else(|| not_found(&tenant_id))
}

fn not_found(tenant_id: &TenantId) -> ApiError {
    ApiError::not_found("tenant_not_found", format!("no tenant `{tenant_id}`"))
}

/// The tenant with its mirrored subscription: the liveliest one, newest first among equals.
async fn view(state: &AppState, record: TenantRecord) -> Result<TenantOut, ApiError> {
    let pending = pending_of(state, &record.tenant_id).await?;
    let Some(customer_id) = record.customer_id.clone() else {
        let mut out = TenantOut::from(record);
        out.pending = pending;
        return Ok(out);
    };
    let mirror = state.db.mirror();
    let customer = mirror
        .get(ObjectKind::Customer.as_str(), &customer_id)
        .await?;
    let chosen = crate::mirror::current_subscription(&state.db, &customer_id).await?;
    let synced_at = customer
        .iter()
        .map(|c| c.synced_at)
        .chain(chosen.iter().map(|(row, _)| row.synced_at))
        .max();
    let mut out = TenantOut::from(record);
    out.pending = pending;
    out.subscription = chosen.map(|(_, s)| s.into());
    out.synced_at = synced_at.map(rfc3339);
    Ok(out)
}

/// One tenant in a list: who it is, without its subscription.
#[derive(Debug, Serialize)]
pub struct TenantItemOut {
    pub tenant_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub customer_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<TenantRecord> for TenantItemOut {
    fn from(r: TenantRecord) -> Self {
        Self {
            tenant_id: r.tenant_id,
            name: r.name,
            email: r.email,
            customer_id: r.customer_id,
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

/// The longest `q` taken, in characters: as long as the longest email.
const MAX_QUERY: usize = 254;

/// `GET /v1/tenants?q=&limit=&cursor=`: tenants in tenant id order whose id or Stripe
/// customer id starts with `q`, or whose name or email does ignoring case; every tenant
/// without `q`. A tenant-scoped key sees only its tenants.
pub async fn list_tenants(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PageOut<TenantItemOut>>, ApiError> {
    let q = query.get("q").map(|q| q.trim()).unwrap_or("");
    if q.chars().count() > MAX_QUERY || q.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("q must be at most {MAX_QUERY} characters, without control characters"),
        )
        .with_field("q"));
    }
    let limit = limit_from_query(&query)?;
    let after = match query.get("cursor") {
        None => String::new(),
        Some(raw) => TenantId::parse(raw)
            .map_err(|_| {
                ApiError::bad_request("invalid_value", "cursor is not one this API gave out")
                    .with_field("cursor")
            })?
            .as_str()
            .to_owned(),
    };
    let mut rows = match scope.only() {
        None => state.db.tenants().search(q, &after, limit + 1).await?,
        Some(only) => scoped_search(&state, only, q, &after).await?,
    };
    let next_cursor = (rows.len() > limit as usize).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.tenant_id.clone())
    });
    let data = rows.into_iter().map(TenantItemOut::from).collect();
    Ok(Json(PageOut {
        data,
        next_cursor: next_cursor.flatten(),
    }))
}

/// The search for a tenant-scoped key: its few tenants, matched here as the database would.
async fn scoped_search(
    state: &AppState,
    only: &[String],
    q: &str,
    after: &str,
) -> Result<Vec<TenantRecord>, ApiError> {
    let lower = q.to_ascii_lowercase();
    let starts = |v: &Option<String>, p: &str, fold: bool| {
        v.as_deref().is_some_and(|v| match fold {
            true => v.to_ascii_lowercase().starts_with(p),
            false => v.starts_with(p),
        })
    };
    let mut rows = Vec::new();
    for id in only {
        let Ok(id) = TenantId::parse(id) else {
            continue;
        };
        let Some(r) = state.db.tenants().get(&id).await? else {
            continue;
        };
        let matched = r.tenant_id.starts_with(q)
            || starts(&r.customer_id, q, false)
            || starts(&r.name, &lower, true)
            || starts(&r.email, &lower, true);
        if matched && r.tenant_id.as_str() > after {
            rows.push(r);
        }
    }
    rows.sort_by(|a, b| a.tenant_id.as_bytes().cmp(b.tenant_id.as_bytes()));
    Ok(rows)
}
