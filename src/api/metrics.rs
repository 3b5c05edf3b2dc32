//! The HTTP side of metrics: a middleware timing every request, and `GET /metrics`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;
use crate::store::StoreError;

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
    refresh_gauges(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Sets the gauges that describe the shared database rather than this process (backlogs, sync
/// lag, findings), so that every replica's `/metrics` tells the same; called on each scrape.
/// A database that does not answer within a second leaves the previous values.
async fn refresh_gauges(state: &AppState) {
    let refresh = async {
        let metrics = &state.metrics;
        let now = crate::store::now_ms();
        let age = |at: Option<i64>| at.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        let inbox = state.db.inbox().stats().await?;
        metrics.set(
            "billsync_inbox_backlog",
            "Vendor events stored and not applied yet (pending or failed, to be retried).",
            &[],
            (inbox.pending + inbox.failed) as f64,
        );
        metrics.set(
            "billsync_inbox_oldest_waiting_seconds",
            "Age (by vendor creation time) of the oldest vendor event not applied yet.",
            &[],
            age(inbox.oldest_waiting),
        );
        if let Some(newest) = inbox.newest_applied_event {
            metrics.set(
                "billsync_sync_lag_seconds",
                "Now minus the creation time of the newest applied vendor event.",
                &[],
                age(Some(newest)),
            );
        }
        let (commands, oldest) = state.db.commands().backlog().await?;
        metrics.set(
            "billsync_outbox_backlog",
            "Self-serve commands accepted and not finished yet.",
            &[],
            commands as f64,
        );
        metrics.set(
            "billsync_outbox_oldest_seconds",
            "Age of the oldest unfinished self-serve command.",
            &[],
            age(oldest),
        );
        if let Some(vendor) = &state.vendor {
            state.pusher(vendor.clone()).record_backlog().await?;
        }
        let (pushes, oldest) = state.db.usage().pending_pushes().await?;
        metrics.set(
            "billsync_usage_pushes_pending",
            "Meter events planned and not yet taken by the vendor (first send or a retry).",
            &[],
            pushes as f64,
        );
        metrics.set(
            "billsync_usage_oldest_pending_push_seconds",
            "Age of the oldest meter event not yet taken by the vendor.",
            &[],
            age(oldest),
        );
        if let Some(findings) = state.db.reconciliations().latest_findings().await? {
            metrics.set(
                "billsync_reconciliation_open_findings",
                "Findings of the latest reconciliation run.",
                &[],
                findings as f64,
            );
        }
        crate::reconcile::OpenCheckState::load(&state.db)
            .await?
            .export(metrics);
        Ok::<_, StoreError>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(1), refresh).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(error = %error, "gauges not refreshed"),
        Err(_) => tracing::debug!("gauges not refreshed: the database is slow"),
    }
}
