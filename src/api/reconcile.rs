//! Reconciliations: `POST /v1/reconciliations` starts a run, `GET /v1/reconciliations` lists
//! the runs, `GET /v1/reconciliations/{id}` shows one with a page of its items. They span every
//! tenant's money, so a tenant-scoped key may not use them.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::KeyScope;
use super::error::ApiError;
use super::json::ApiJson;
use super::pagination::PageRequest;
use super::sync::PageOut;
use crate::domain::{TenantId, parse_time, rfc3339};
use crate::reconcile::Params;
use crate::state::AppState;
use crate::store::RunRow;

const DEFAULT_ITEMS: u32 = 100;
const MAX_ITEMS: u32 = 1000;
/// What a refused `POST /v1/reconciliations` is told to wait: about one short run.
const RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunIn {
    /// RFC 3339 or `YYYY-MM-DD`; the window is `[from, to)`.
    pub from: String,
    pub to: String,
    pub tenant: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

pub async fn start(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    ApiJson(body): ApiJson<RunIn>,
) -> Result<Response, ApiError> {
    forbid_scoped(&scope)?;
    let params = params(&body)?;
    // Taken before the run is stored: a refused call leaves nothing behind.
    let Ok(slot) = state.run_slots.clone().try_acquire_owned() else {
        return Ok(too_many_runs(state.settings.reconcile.max_concurrent_runs));
    };
    let reconciler = state.reconciler();
    let run_id = reconciler.begin(&params, "api").await?;
    tracing::info!(key = scope.key_id(), run_id, "reconciliation started");
    tokio::spawn({
        let run_id = run_id.clone();
        async move {
            if let Err(error) = reconciler.finish(&run_id, &params).await {
                tracing::warn!(run_id, error = %error, "reconciliation failed");
            }
            drop(slot);
        }
    });
    let run = state
        .db
        .reconciliations()
        .get(&run_id)
        .await?
        .ok_or_else(|| ApiError::internal(&std::io::Error::other("run vanished")))?;
    let mut response = (StatusCode::ACCEPTED, Json(view(&run, Vec::new(), None))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/reconciliations/{run_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// 429 `too_many_runs`: every slot is computing a run; one frees when a run ends.
fn too_many_runs(limit: usize) -> Response {
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_runs",
        format!(
            "{limit} reconciliations are running (reconcile.max_concurrent_runs); retry after \
             {RETRY_AFTER_SECS} s"
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}

pub async fn get(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(run_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<RunWithItemsOut>, ApiError> {
    forbid_scoped(&scope)?;
    let limit = match query.get("limit") {
        None => DEFAULT_ITEMS,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_ITEMS).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_value", format!("limit must be 1 to {MAX_ITEMS}"))
                    .with_field("limit")
            })?,
    };
    let after = match query.get("cursor") {
        None => -1,
        Some(raw) => raw.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::bad_request("invalid_value", "cursor is not one this API gave out")
                .with_field("cursor")
        })?,
    };
    let run = state
        .db
        .reconciliations()
        .get(&run_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "reconciliation_not_found",
                format!("no reconciliation `{run_id}`"),
            )
        })?;
    let mut rows = state
        .db
        .reconciliations()
        .items(&run_id, after, limit + 1)
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = more
        .then(|| rows.last().map(|r| r.seq.to_string()))
        .flatten();
    let items = rows
        .into_iter()
        .filter_map(|r| serde_json::from_str(&r.item).ok())
        .collect();
    Ok(Json(view(&run, items, next)))
}

/// The runs, newest first, a page at a time; `status` and `found` filter them.
pub async fn list(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PageOut<RunOut>>, ApiError> {
    forbid_scoped(&scope)?;
    let status = match query.get("status").map(String::as_str) {
        None => None,
        Some(status @ ("running" | "done" | "failed")) => Some(status),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                "status must be running, done or failed",
            )
            .with_field("status"));
        }
    };
    let found = match query.get("found").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return Err(
                ApiError::bad_request("invalid_value", "found must be true or false")
                    .with_field("found"),
            );
        }
    };
    let page = PageRequest::from_query(&query)?;
    let mut runs = state
        .db
        .reconciliations()
        .page(status, found, page.before.clone(), page.fetch_limit())
        .await?;
    let next_cursor = page.finish(&mut runs, |run| (run.started_at, run.run_id.clone()));
    let data = runs.iter().map(RunOut::new).collect();
    Ok(Json(PageOut { data, next_cursor }))
}

/// A run without its items: each entry of the list.
#[derive(Debug, Serialize)]
pub struct RunOut {
    pub id: String,
    /// `running`, `done` or `failed`.
    pub status: String,
    pub from: String,
    pub to: String,
    pub tenant_id: Option<String>,
    pub dry_run: bool,
    /// `api`, `cli` or `schedule`.
    pub trigger: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// The report's summary, once the run is done.
    pub summary: Option<Value>,
}

impl RunOut {
    fn new(run: &RunRow) -> Self {
        Self {
            id: run.run_id.clone(),
            status: run.status.clone(),
            from: rfc3339(run.period_from),
            to: rfc3339(run.period_to),
            tenant_id: run.tenant_id.clone(),
            dry_run: run.dry_run,
            trigger: run.trigger.clone(),
            started_at: rfc3339(run.started_at),
            finished_at: run.finished_at.map(rfc3339),
            error: run.error.clone(),
            summary: run
                .summary
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
        }
    }
}

/// A run with a page of its items.
#[derive(Debug, Serialize)]
pub struct RunWithItemsOut {
    #[serde(flatten)]
    pub run: RunOut,
    pub items: Vec<Value>,
    pub next_cursor: Option<String>,
}

fn view(run: &RunRow, items: Vec<Value>, next_cursor: Option<String>) -> RunWithItemsOut {
    RunWithItemsOut {
        run: RunOut::new(run),
        items,
        next_cursor,
    }
}

fn params(body: &RunIn) -> Result<Params, ApiError> {
    let time = |field: &'static str, text: &str| {
        parse_time(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_value",
                format!("{field} must be an RFC 3339 time or a YYYY-MM-DD date"),
            )
            .with_field(field)
        })
    };
    let from_ms = time("from", &body.from)?;
    let to_ms = time("to", &body.to)?;
    if to_ms <= from_ms {
        return Err(
            ApiError::bad_request("invalid_value", "to must be after from").with_field("to"),
        );
    }
    let tenant = body
        .tenant
        .as_deref()
        .map(TenantId::parse)
        .transpose()?
        .map(|t| t.as_str().to_owned());
    Ok(Params {
        from_ms,
        to_ms,
        tenant,
        dry_run: body.dry_run,
        invoice: None,
    })
}

fn forbid_scoped(scope: &KeyScope) -> Result<(), ApiError> {
    if scope.is_limited() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a tenant-scoped key cannot reconcile: reconciliations span every tenant",
        ));
    }
    Ok(())
}
