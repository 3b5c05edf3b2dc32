//! Self-serve changes: subscribe, change plan, cancel, resume, preview. Each change is stored
//! as a command in the outbox and answered 202; `GET /v1/commands/{id}` follows it.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::auth::KeyScope;
use super::error::ApiError;
use super::json::ApiJson;
use super::tenants::{SubscriptionOut, load};
use crate::domain::{rfc3339, rfc3339_secs};
use crate::outbound::{CancelRequest, CommandKind, SetRequest, fingerprint};
use crate::state::AppState;
use crate::store::{CommandRow, Enqueued, NewCommand, TenantRecord, now_ms};
use crate::stripe::objects;
use crate::stripe::{ObjectKind, PreviewRequest, Proration, VendorError};

/// The body of `POST /v1/tenants/{t}/subscription`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionIn {
    /// A price or plan id, or a price's lookup key.
    pub price: String,
    pub quantity: Option<u32>,
    pub proration: Option<Proration>,
    pub trial_days: Option<u32>,
}

/// A command as the product sees it.
#[derive(Debug, Serialize)]
pub struct CommandOut {
    pub id: String,
    pub tenant_id: String,
    pub kind: String,
    /// `pending`, `succeeded`, `failed` or `conflict`.
    pub status: String,
    pub request: Value,
    pub attempts: i32,
    /// Why the last attempt did not end the command (it is retried).
    pub last_error: Option<String>,
    /// Why it failed or conflicted.
    pub error: Option<CommandError>,
    /// The subscription the vendor confirmed, or its current one on conflict.
    pub subscription: Option<SubscriptionOut>,
    /// The customer a `customer.sync` command created or updated.
    pub customer_id: Option<String>,
    /// The invoice and credit grant a `credits.top_up` made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_up: Option<Value>,
    pub created_at: String,
    pub updated_at: String,
    pub completed_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CommandError {
    pub code: String,
    pub message: String,
}

impl From<CommandRow> for CommandOut {
    fn from(row: CommandRow) -> Self {
        let result: Option<Value> = row
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok());
        let kind_of_result = result
            .as_ref()
            .and_then(objects::target)
            .map(|(kind, _)| kind);
        let subscription = result
            .as_ref()
            .filter(|_| kind_of_result == Some(ObjectKind::Subscription))
            .map(|object| objects::subscription(object).into());
        let customer_id = result
            .as_ref()
            .filter(|_| kind_of_result == Some(ObjectKind::Customer))
            .and_then(|object| objects::id_of(&object["id"]));
        let top_up = result
            .as_ref()
            .filter(|_| row.kind == CommandKind::CreditsTopUp.as_str())
            .map(|r| {
                serde_json::json!({
                    "invoice_id": objects::id_of(&r["invoice"]["id"]),
                    "credit_grant_id": objects::id_of(&r["credit_grant"]["id"]),
                })
            });
        let error = match row.status.as_str() {
            "failed" | "conflict" => Some(CommandError {
                code: row.error_code.unwrap_or_else(|| "failed".to_owned()),
                message: row.last_error.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        Self {
            id: row.command_id,
            tenant_id: row.tenant_id,
            kind: row.kind,
            request: serde_json::from_str(&row.request).unwrap_or(Value::Null),
            attempts: row.attempts,
            last_error: (row.status == "pending")
                .then_some(row.last_error)
                .flatten(),
            status: row.status,
            error,
            subscription,
            customer_id,
            top_up,
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
            completed_at: row.completed_at.map(rfc3339),
        }
    }
}

/// `POST /v1/tenants/{t}/subscription`: subscribe, or change the price and quantity.
pub async fn set_subscription(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SubscriptionIn>,
) -> Result<Response, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let price = body.price.trim();
    if price.is_empty() || price.len() > 255 {
        return Err(
            ApiError::bad_request("invalid_value", "price must be 1 to 255 characters")
                .with_field("price"),
        );
    }
    let quantity = body.quantity.unwrap_or(1);
    if !(1..=1_000_000).contains(&quantity) {
        return Err(ApiError::bad_request(
            "invalid_value",
            "quantity must be between 1 and 1000000",
        )
        .with_field("quantity"));
    }
    if body.trial_days.is_some_and(|d| !(1..=730).contains(&d)) {
        return Err(
            ApiError::bad_request("invalid_value", "trial_days must be between 1 and 730")
                .with_field("trial_days"),
        );
    }
    let request = SetRequest {
        price: price.to_owned(),
        resolved_price: resolve_price(&state, price).await?,
        quantity,
        proration: body.proration.unwrap_or_default(),
        trial_days: body.trial_days,
    };
    // The digest covers what the caller asked for, not what it resolved to.
    let asked = serde_json::json!({
        "price": request.price, "quantity": quantity,
        "proration": request.proration, "trial_days": request.trial_days,
    });
    let request = serde_json::to_value(&request).expect("serializable");
    enqueue(
        &state,
        &tenant,
        &headers,
        CommandKind::SubscriptionSet,
        request,
        &asked,
    )
    .await
}

/// `DELETE /v1/tenants/{t}/subscription?at_period_end=true|false` (default true).
pub async fn cancel_subscription(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let at_period_end = match query.get("at_period_end").map(String::as_str) {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("at_period_end must be true or false, not `{other}`"),
            )
            .with_field("at_period_end"));
        }
    };
    require_subscription(&state, &tenant).await?;
    let request = serde_json::to_value(CancelRequest { at_period_end }).expect("serializable");
    enqueue(
        &state,
        &tenant,
        &headers,
        CommandKind::SubscriptionCancel,
        request.clone(),
        &request,
    )
    .await
}

/// `POST /v1/tenants/{t}/subscription/resume`: undoes a cancel at period end.
pub async fn resume_subscription(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    require_subscription(&state, &tenant).await?;
    let request = serde_json::json!({});
    enqueue(
        &state,
        &tenant,
        &headers,
        CommandKind::SubscriptionResume,
        request.clone(),
        &request,
    )
    .await
}

/// `GET /v1/commands/{id}`.
pub async fn get_command(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(command_id): Path<String>,
) -> Result<Json<CommandOut>, ApiError> {
    let not_found =
        || ApiError::not_found("command_not_found", format!("no command `{command_id}`"));
    if command_id.len() > 64 {
        return Err(not_found());
    }
    let row = state
        .db
        .commands()
        .get(&command_id)
        .await?
        .filter(|row| scope.allows(&row.tenant_id))
        .ok_or_else(not_found)?;
    Ok(Json(row.into()))
}

/// `GET /v1/tenants/{t}/subscription/preview?price=...&quantity=...&proration=...`: the
/// vendor's upcoming invoice for the change, without making it.
pub async fn preview_subscription(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let vendor = state.vendor.clone().ok_or_else(vendor_not_configured)?;
    let (price, quantity, proration) = preview_query(&query)?;
    let Some(customer) = tenant.customer_id.as_deref() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_customer",
            "the tenant has no Stripe customer yet (PUT the tenant first)",
        ));
    };
    let resolved = resolve_price(&state, price).await?;
    let current = crate::mirror::current_subscription(&state.db, customer)
        .await?
        .map(|(_, s)| s)
        .filter(|s| s.liveness() > 0);
    let item = current
        .as_ref()
        .and_then(|s| Some((s.id.as_str(), s.items.first()?.id.as_deref()?)));
    let request = PreviewRequest {
        customer,
        current: item,
        price: &resolved,
        quantity,
        proration,
    };
    let invoice = vendor.preview(&request).await.map_err(vendor_error)?;
    let invoice = objects::invoice(&invoice);
    Ok(Json(serde_json::json!({
        "tenant_id": tenant.tenant_id,
        "price": resolved,
        "quantity": quantity,
        "proration": proration,
        "currency": invoice.currency,
        "total": invoice.total,
        "amount_due": invoice.amount_due,
        "period_start": invoice.period_start.map(rfc3339_secs),
        "period_end": invoice.period_end.map(rfc3339_secs),
        "lines": preview_lines(&invoice),
    })))
}

/// A preview's `price` (required), `quantity` (1 to 1,000,000; default 1) and `proration`.
fn preview_query(query: &HashMap<String, String>) -> Result<(&str, u32, Proration), ApiError> {
    let price = query
        .get("price")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("missing_value", "price is required").with_field("price")
        })?;
    let quantity = match query.get("quantity") {
        None => 1,
        Some(q) => q
            .parse::<u32>()
            .ok()
            .filter(|q| (1..=1_000_000).contains(q))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_value", "quantity must be between 1 and 1000000")
                    .with_field("quantity")
            })?,
    };
    let proration = match query.get("proration") {
        None => Proration::default(),
        Some(p) => serde_json::from_value(Value::String(p.clone())).map_err(|_| {
            ApiError::bad_request(
                "invalid_value",
                "proration must be create_prorations, none or always_invoice",
            )
            .with_field("proration")
        })?,
    };
    Ok((price, quantity, proration))
}

/// The preview invoice's lines as the API shows them.
fn preview_lines(invoice: &crate::domain::Invoice) -> Vec<Value> {
    let line = |line: &crate::domain::InvoiceLine| {
        serde_json::json!({
            "description": line.description,
            "amount": line.amount,
            "currency": line.currency.as_ref().or(invoice.currency.as_ref()),
            "price": line.price,
            "quantity": line.quantity.map(|q| q.normalize().to_string()),
            "proration": line.proration,
            "period_start": line.period_start.map(rfc3339_secs),
            "period_end": line.period_end.map(rfc3339_secs),
        })
    };
    invoice.lines.iter().map(line).collect()
}

/// The tenant's unfinished commands, for the tenant view.
pub async fn pending_of(state: &AppState, tenant_id: &str) -> Result<Vec<CommandOut>, ApiError> {
    let rows = state.db.commands().pending_of(tenant_id).await?;
    Ok(rows.into_iter().map(CommandOut::from).collect())
}

/// The `customer.sync` command `PUT /v1/tenants/{t}` stores with the tenant, when the vendor is
/// configured.
pub fn customer_sync(state: &AppState) -> Option<NewCommand> {
    state.vendor.as_ref()?;
    let request = serde_json::json!({});
    Some(NewCommand {
        command_id: new_command_id(),
        kind: CommandKind::CustomerSync.as_str().to_owned(),
        request: request.to_string(),
        client_key: None,
        request_digest: digest(CommandKind::CustomerSync, &request),
        base: None,
    })
}

/// Stores the command (after a `customer.sync` when the tenant has no customer and none is
/// pending) and answers 202, or answers with the command an earlier use of the caller's
/// Idempotency-Key stored.
async fn enqueue(
    state: &AppState,
    tenant: &TenantRecord,
    headers: &HeaderMap,
    kind: CommandKind,
    request: Value,
    asked: &Value,
) -> Result<Response, ApiError> {
    if state.vendor.is_none() {
        return Err(vendor_not_configured());
    }
    let client_key = client_key(headers)?;
    let request_digest = digest(kind, asked);
    let base = match &tenant.customer_id {
        Some(customer) => {
            let current = crate::mirror::current_subscription(&state.db, customer).await?;
            fingerprint(current.as_ref().map(|(_, s)| s))
        }
        None => fingerprint(None),
    };
    let mut commands = Vec::with_capacity(2);
    if tenant.customer_id.is_none() {
        let pending = state.db.commands().pending_of(&tenant.tenant_id).await?;
        if !pending
            .iter()
            .any(|c| c.kind == CommandKind::CustomerSync.as_str())
            && let Some(sync) = customer_sync(state)
        {
            commands.push(sync);
        }
    }
    commands.push(NewCommand {
        command_id: new_command_id(),
        kind: kind.as_str().to_owned(),
        request: request.to_string(),
        client_key: client_key.clone(),
        request_digest: request_digest.clone(),
        base: Some(base),
    });
    let enqueued = state
        .db
        .commands()
        .enqueue(&tenant.tenant_id, &commands, now_ms())
        .await?;
    let (row, replayed) = match enqueued {
        Enqueued::New(row) => {
            state.outbox_wake.notify_one();
            tracing::info!(tenant_id = %tenant.tenant_id, command_id = %row.command_id, kind = kind.as_str(), "command accepted");
            (row, false)
        }
        Enqueued::Existing(row)
            if row.request_digest == request_digest && row.kind == kind.as_str() =>
        {
            (row, true)
        }
        Enqueued::Existing(row) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                format!(
                    "Idempotency-Key was first used for command {} with another request",
                    row.command_id
                ),
            )
            .with_field("Idempotency-Key"));
        }
    };
    let location = format!("/v1/commands/{}", row.command_id);
    let mut response = (StatusCode::ACCEPTED, Json(CommandOut::from(row))).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Cancel and resume need a subscription: a live one in the mirror, or one on its way.
async fn require_subscription(state: &AppState, tenant: &TenantRecord) -> Result<(), ApiError> {
    // Pending first: a command that ends applies its state in the same transaction, so if it
    // is no longer pending, the mirror read after shows what it did.
    let pending = state.db.commands().pending_of(&tenant.tenant_id).await?;
    if pending
        .iter()
        .any(|c| c.kind == CommandKind::SubscriptionSet.as_str())
    {
        return Ok(());
    }
    if let Some(customer) = &tenant.customer_id
        && crate::mirror::current_subscription(&state.db, customer)
            .await?
            .is_some_and(|(_, s)| s.liveness() > 0)
    {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "no_subscription",
        format!("tenant `{}` has no live subscription", tenant.tenant_id),
    ))
}

/// A price id, plan id or lookup key, as the id the vendor takes: the mirrored price or plan
/// with that id, else the mirrored price with that lookup key, else the text itself (the vendor
/// refuses an unknown id, and the command fails with its message).
async fn resolve_price(state: &AppState, text: &str) -> Result<String, ApiError> {
    let mirror = state.db.mirror();
    for kind in [ObjectKind::Price, ObjectKind::Plan] {
        if mirror
            .get(kind.as_str(), text)
            .await?
            .is_some_and(|row| !row.deleted)
        {
            return Ok(text.to_owned());
        }
    }
    let prices = mirror.of_type(ObjectKind::Price.as_str()).await?;
    let by_lookup_key = prices.into_iter().find_map(|row| {
        let price: Value = serde_json::from_str(&row.payload).ok()?;
        (price["lookup_key"].as_str() == Some(text)).then_some(row.object_id)
    });
    Ok(by_lookup_key.unwrap_or_else(|| text.to_owned()))
}

fn client_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_value",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
            .with_field("Idempotency-Key")
        })?;
    Ok(Some(key.to_owned()))
}

fn digest(kind: CommandKind, request: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_str().as_bytes());
    hasher.update(b"\n");
    hasher.update(request.to_string().as_bytes());
    hex::encode(hasher.finalize())
}

/// Time-ordered and unique: `cmd_` and a UUIDv7 without dashes.
fn new_command_id() -> String {
    format!("cmd_{}", uuid::Uuid::now_v7().simple())
}

fn vendor_not_configured() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "vendor_not_configured",
        "no Stripe API key is configured (stripe.api_key): changes cannot reach the vendor",
    )
}

fn vendor_error(error: VendorError) -> ApiError {
    match error {
        VendorError::Rejected { code, message, .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "vendor_rejected",
            match code {
                Some(code) => format!("{message} ({code})"),
                None => message,
            },
        ),
        VendorError::Unavailable(message) => {
            tracing::warn!(error = %message, "vendor unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "vendor_unavailable",
                "the vendor cannot be reached; retry later",
            )
        }
        VendorError::Malformed(message) => {
            tracing::warn!(error = %message, "unexpected vendor answer");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "vendor_error",
                "the vendor answered something unexpected",
            )
        }
    }
}
