//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::state::AppState;
use crate::store::Backend;

/// The process is up and serving HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers; also says whether vendor sync is configured.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database_ok = match state.db.ping().await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(error = %error, "readiness: database check failed");
            false
        }
    };
    let backend = match state.db.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let vendor = if state.vendor.is_some() {
        json!({ "configured": true, "name": "stripe", "api_base": state.settings.stripe.api_base })
    } else {
        json!({
            "configured": false,
            "name": "stripe",
            "message": "no Stripe API key configured (stripe.api_key): vendor sync is off",
        })
    };
    let status = if database_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if database_ok { "ready" } else { "not_ready" },
        "database": { "backend": backend, "ok": database_ok },
        "vendor": vendor,
    });
    (status, Json(body))
}
