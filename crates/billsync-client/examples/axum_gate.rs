//! Gates a route on a feature with billsync's in-process client: an axum middleware that reads
//! the tenant from the `x-tenant-id` header and answers 403 with a JSON body when the tenant
//! may not use the feature.
//!
//! ```sh
//! BILLSYNC_URL=http://127.0.0.1:8080 BILLSYNC_API_KEY=some-long-secret-key \
//!     cargo run -p billsync-client --example axum_gate
//! curl -H 'x-tenant-id: acme' http://127.0.0.1:3000/reports/export
//! ```

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use billsync_client::{Client, Options, Staleness};
use rust_decimal::Decimal;
use serde_json::json;

/// The feature a route needs, with the client that checks it.
#[derive(Clone)]
struct Gate {
    client: Client,
    feature: &'static str,
}

async fn require_feature(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let Some(tenant) = (request.headers().get("x-tenant-id")).and_then(|v| v.to_str().ok()) else {
        let body =
            json!({"error": {"code": "missing_tenant", "message": "x-tenant-id is required"}});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    };
    let check = gate.client.check(tenant, gate.feature, Decimal::ONE).await;
    if !check.allowed {
        let body = json!({"error": {"code": "feature_not_allowed", "feature": gate.feature,
            "reason": check.reason, "message": format!("your plan does not include {}", gate.feature)}});
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    next.run(request).await
}

async fn export() -> &'static str {
    "the export\n"
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("BILLSYNC_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let key = std::env::var("BILLSYNC_API_KEY")?;
    let options = Options {
        staleness: Staleness::AskServer,
        ..Options::default()
    };
    let client = Client::connect(&url, &key, options).await?;
    let gate = Gate {
        client: client.clone(),
        feature: "exports",
    };
    let app = Router::new()
        .route("/reports/export", get(export))
        .route_layer(middleware::from_fn_with_state(gate, require_feature));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    client.shutdown().await?;
    Ok(())
}
