//! `GET /v1/notifications`: what billsync told (or is telling) the product, newest first, with
//! each delivery's attempts, status and last error.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::extract::{Query, State};
use serde::Serialize;
use serde_json::Value;

use super::auth::KeyScope;
use super::error::ApiError;
use super::pagination::PageRequest;
use super::sync::PageOut;
use crate::domain::{TenantId, rfc3339};
use crate::state::AppState;
use crate::store::NotificationRow;

#[derive(Debug, Serialize)]
pub struct NotificationOut {
    /// The event id the receiver dedupes on.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub tenant_id: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// The receiver's last HTTP status.
    pub last_status: Option<i32>,
    /// The body as sent.
    pub payload: Value,
    pub created_at: String,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
}

impl From<NotificationRow> for NotificationOut {
    fn from(row: NotificationRow) -> Self {
        Self {
            payload: serde_json::from_str(&row.payload).unwrap_or(Value::Null),
            next_attempt_at: (row.status == "pending").then(|| rfc3339(row.next_attempt_at)),
            created_at: rfc3339(row.created_at),
            delivered_at: row.delivered_at.map(rfc3339),
            id: row.event_id,
            kind: row.kind,
            tenant_id: row.tenant_id,
            status: row.status,
            attempts: row.attempts,
            last_error: row.last_error,
            last_status: row.last_status,
        }
    }
}

pub async fn list(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PageOut<NotificationOut>>, ApiError> {
    let tenant = match query.get("tenant_id") {
        Some(raw) => Some(TenantId::parse(raw)?),
        None => None,
    };
    let tenant = tenant.as_ref().map(TenantId::as_str);
    // A tenant-scoped key sees its tenants' notifications only: it must name one.
    if scope.is_limited() && !tenant.is_some_and(|t| scope.allows(t)) {
        return Err(ApiError::bad_request(
            "invalid_value",
            "a tenant-scoped key must name one of its tenants",
        )
        .with_field("tenant_id"));
    }
    let status = match query.get("status").map(String::as_str) {
        None => None,
        Some(s @ ("pending" | "delivered" | "failed")) => Some(s),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                "status must be pending, delivered or failed",
            )
            .with_field("status"));
        }
    };
    let page = PageRequest::from_query(&query)?;
    let mut rows = state
        .db
        .notifications()
        .page(tenant, status, page.before.clone(), page.fetch_limit())
        .await?;
    let next_cursor = page.finish(&mut rows, |r| (r.created_at, r.event_id.clone()));
    let data = rows.into_iter().map(NotificationOut::from).collect();
    Ok(Json(PageOut { data, next_cursor }))
}
