//! The HTTP side of metrics: a middleware timing every request, and `GET /metrics`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;

/// Records every request under its route template (and gives error responses the JSON shape) ("unmatched" for unknown routes, so that
/// probing random paths cannot grow the label set).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let response = super::json_error_body(next.run(request).await);
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let status = response.status().as_u16();
    if status >= 400 {
        let request_id = response
            .headers()
            .get(&super::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info!(
            method = %method,
            route,
            status,
            request_id,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "response"
        );
    }
    state.metrics.observe_request(
        method.as_str(),
        route,
        status,
        started.elapsed().as_secs_f64(),
    );
    response
}

pub async fn render(State(state): State<AppState>) -> Response {
    crate::app::refresh_gauges(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
