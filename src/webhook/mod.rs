//! `POST /webhooks/stripe`: verify the raw bytes, then parse, then store in the inbox (with the
//! other deliveries in flight, [`intake`]) and answer once it is committed. Applying happens
//! after, from the inbox.

pub mod intake;
pub mod signature;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::state::AppState;
use crate::store::{Source, now_ms};
use crate::sync::events;

/// Largest webhook body accepted (Stripe's events are far smaller).
pub const MAX_BODY: usize = 1024 * 1024;

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let stripe = &state.settings.stripe;
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let now = now_ms();
    let verified = signature::verify(
        header,
        &body,
        &stripe.webhook_secrets,
        stripe.webhook_tolerance.as_secs() as i64,
        now / 1000,
    )
    .map_err(|error| {
        reject(&state, error.reason());
        ApiError::bad_request("invalid_signature", error.to_string())
    })?;

    let raw = std::str::from_utf8(verified.body).map_err(|_| {
        reject(&state, "invalid_payload");
        ApiError::bad_request("invalid_payload", "the body is not UTF-8")
    })?;
    let event: Value = serde_json::from_str(raw).map_err(|e| {
        reject(&state, "invalid_payload");
        ApiError::bad_request("invalid_payload", format!("the body is not JSON: {e}"))
    })?;
    let row = events::from_event(raw, &event, Source::Webhook).map_err(|e| {
        reject(&state, "invalid_payload");
        ApiError::bad_request("invalid_payload", e.to_string())
    })?;
    let event_type = row.event_type.clone();
    let event_id = row.event_id.clone();
    let new = state.intake.store(&state.db, row).await.map_err(|e| {
        reject(&state, "database_unavailable");
        // Stripe retries anything but a 2xx; a 503 says "later", whatever the cause.
        let mut error = ApiError::from(e);
        error.status = StatusCode::SERVICE_UNAVAILABLE;
        error
    })?;
    let duplicate = !new;
    state.metrics.inc(
        "billsync_webhooks_received_total",
        "Verified webhooks, by whether they were new.",
        &[("outcome", if duplicate { "duplicate" } else { "stored" })],
    );
    if !duplicate {
        state.wake.notify_one();
    }
    tracing::debug!(event_id = %event_id, event_type = %event_type, duplicate, "webhook stored");
    Ok(Json(
        json!({ "received": true, "event_id": event_id, "duplicate": duplicate }),
    ))
}

fn reject(state: &AppState, reason: &'static str) {
    state.metrics.inc(
        "billsync_webhooks_rejected_total",
        "Webhooks refused, by reason.",
        &[("reason", reason)],
    );
}
