//! The HTTP surface. Every route is listed once in [`routes`]; the router is built from that
//! list and a test checks the list against `openapi.yaml`.

pub mod auth;
pub mod commands;
pub mod console;
pub mod credit_settings;
pub mod credits;
pub mod entitlements;
pub mod error;
pub mod health;
pub mod json;
pub mod metrics;
pub mod notifications;
pub mod pagination;
pub mod reconcile;
pub mod revenue;
pub mod stream;
pub mod sync;
pub mod tenants;
pub mod usage;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{Method, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::state::AppState;
use crate::webhook;
use error::ApiError;

/// One route: method, path template, handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

fn route(method: Method, path: &'static str, handler: MethodRouter<AppState>) -> Route {
    Route {
        method,
        path,
        handler,
    }
}

/// Every route billsync serves. Longer than a screen on purpose: it is one table, a line or
/// three per route, that the router, the OpenAPI tests and the docs check all read, so a route
/// exists in one place only.
pub fn routes() -> Vec<Route> {
    vec![
        route(Method::GET, "/healthz", get(health::healthz)),
        route(Method::GET, "/readyz", get(health::readyz)),
        route(Method::GET, "/metrics", get(metrics::render)),
        route(Method::GET, "/v1/tenants", get(tenants::list_tenants)),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}",
            get(tenants::get_tenant),
        ),
        route(
            Method::PUT,
            "/v1/tenants/{tenant_id}",
            put(tenants::put_tenant),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/credits",
            get(credits::get_credits),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/invoices",
            get(sync::list_invoices),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/payments",
            get(sync::list_payments),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/events",
            get(sync::list_tenant_events),
        ),
        route(
            Method::POST,
            "/v1/tenants/{tenant_id}/subscription",
            post(commands::set_subscription),
        ),
        route(
            Method::DELETE,
            "/v1/tenants/{tenant_id}/subscription",
            delete(commands::cancel_subscription),
        ),
        route(
            Method::POST,
            "/v1/tenants/{tenant_id}/subscription/resume",
            post(commands::resume_subscription),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/subscription/preview",
            get(commands::preview_subscription),
        ),
        route(
            Method::GET,
            "/v1/commands/{command_id}",
            get(commands::get_command),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/credits/settings",
            get(credit_settings::list),
        ),
        route(
            Method::PUT,
            "/v1/tenants/{tenant_id}/credits/settings/{unit}",
            put(credit_settings::put),
        ),
        route(Method::GET, "/v1/notifications", get(notifications::list)),
        route(Method::GET, "/v1/sync/status", get(sync::sync_status)),
        route(
            Method::POST,
            "/v1/sync/events/{event_id}/retry",
            post(sync::retry_event),
        ),
        route(Method::GET, "/v1/revenue", get(revenue::revenue)),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/revenue",
            get(revenue::tenant_revenue),
        ),
        route(Method::POST, "/v1/reconciliations", post(reconcile::start)),
        route(Method::GET, "/v1/reconciliations", get(reconcile::list)),
        route(
            Method::GET,
            "/v1/reconciliations/{run_id}",
            get(reconcile::get),
        ),
        route(
            Method::POST,
            "/v1/usage",
            post(usage::post_usage).layer(DefaultBodyLimit::max(usage::MAX_BODY)),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/usage",
            get(usage::get_usage),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant_id}/entitlements",
            get(entitlements::get_entitlements),
        ),
        route(
            Method::POST,
            "/v1/tenants/{tenant_id}/entitlements/check",
            post(entitlements::check),
        ),
        route(
            Method::POST,
            "/v1/entitlements/check",
            post(entitlements::check_batch),
        ),
        route(Method::GET, "/v1/entitlements/stream", get(stream::stream)),
        route(
            Method::POST,
            "/webhooks/stripe",
            post(webhook::receive).layer(DefaultBodyLimit::max(webhook::MAX_BODY)),
        ),
    ]
}

/// `(method, path)` of every route, for the contract test.
pub fn route_list() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|r| (r.method, r.path)).collect()
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let mut by_path: BTreeMap<&'static str, MethodRouter<AppState>> = BTreeMap::new();
    for Route { path, handler, .. } in routes() {
        let handler = if path.starts_with("/v1/") {
            handler.route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::require_api_key,
            ))
        } else {
            handler
        };
        let merged = match by_path.remove(path) {
            Some(existing) => existing.merge(handler),
            None => handler,
        };
        by_path.insert(path, merged);
    }
    let router = by_path
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router.route(path, handler)
        });

    let max_body = state.settings.api.max_body_bytes;
    router
        .merge(console::router(state.settings.console.enabled))
        .fallback(|| async { ApiError::from_status(axum::http::StatusCode::NOT_FOUND) })
        // Inside the metrics middleware, so that it finds the id on the response it logs.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(
            // The request span is at debug: at tens of thousands of checks a second, an enabled
            // span per request would cost more than the check. Error responses are logged at
            // info by `metrics::track`, with the request id.
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|id| id.header_value().to_str().ok())
                        .unwrap_or("-");
                    tracing::debug_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id = %request_id,
                    )
                })
                .on_response(
                    |response: &Response, latency: Duration, _span: &tracing::Span| {
                        tracing::debug!(
                            status = response.status().as_u16(),
                            latency_ms = latency.as_secs_f64() * 1000.0,
                            "response"
                        );
                    },
                )
                // The metrics middleware already logs every 4xx and 5xx once, with its request
                // id; tower-http's own error line would repeat it without one.
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// The request id header, set on the request when absent and copied onto the response.
pub(crate) static REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Gives every error response the JSON error shape, including those made by the router (405)
/// and by layers (413) that know nothing of it. Called by the outermost middleware
/// ([`metrics::track`]), so that it costs no layer of its own.
pub(crate) fn json_error_body(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let mut replaced = ApiError::from_status(status).into_response();
    for name in [header::ALLOW, REQUEST_ID.clone()] {
        if let Some(value) = response.headers().get(&name) {
            replaced.headers_mut().insert(name, value.clone());
        }
    }
    replaced
}
