//! The mirror's read side: a tenant's invoices, payments and vendor events, and the sync status.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Serialize;
use serde_json::{Value, json};

use super::auth::KeyScope;
use super::error::ApiError;
use super::pagination::PageRequest;
use super::tenants::load;
use crate::domain::{Invoice, Payment, rfc3339, rfc3339_secs};
use crate::state::AppState;
use crate::store::{MirrorRow, PageKinds, now_ms};
use crate::stripe::objects;
use crate::sync::{poller, sweep};

/// A page of items and the cursor of the next page (null on the last).
#[derive(Debug, Serialize)]
pub struct PageOut<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct InvoiceOut {
    pub id: String,
    pub number: Option<String>,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub total: Option<i64>,
    pub amount_due: Option<i64>,
    pub amount_paid: Option<i64>,
    pub amount_remaining: Option<i64>,
    pub subscription: Option<String>,
    pub created: Option<String>,
    pub due_date: Option<String>,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub lines: Vec<LineOut>,
    pub synced_at: String,
}

#[derive(Debug, Serialize)]
pub struct LineOut {
    pub id: Option<String>,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    /// Exact decimal, as a string.
    pub quantity: Option<String>,
    pub price: Option<String>,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub description: Option<String>,
}

impl InvoiceOut {
    fn new(invoice: Invoice, synced_at: i64) -> Self {
        Self {
            id: invoice.id,
            number: invoice.number,
            status: invoice.status,
            currency: invoice.currency,
            total: invoice.total,
            amount_due: invoice.amount_due,
            amount_paid: invoice.amount_paid,
            amount_remaining: invoice.amount_remaining,
            subscription: invoice.subscription,
            created: invoice.created.map(rfc3339_secs),
            due_date: invoice.due_date.map(rfc3339_secs),
            period_start: invoice.period_start.map(rfc3339_secs),
            period_end: invoice.period_end.map(rfc3339_secs),
            lines: invoice
                .lines
                .into_iter()
                .map(|line| LineOut {
                    id: line.id,
                    amount: line.amount,
                    currency: line.currency,
                    quantity: line.quantity.map(|q| q.normalize().to_string()),
                    price: line.price,
                    period_start: line.period_start.map(rfc3339_secs),
                    period_end: line.period_end.map(rfc3339_secs),
                    description: line.description,
                })
                .collect(),
            synced_at: rfc3339(synced_at),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PaymentOut {
    pub id: String,
    /// `payment_intent`, `charge` or `credit_note`.
    pub kind: String,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub amount: Option<i64>,
    pub amount_received: Option<i64>,
    pub amount_refunded: Option<i64>,
    pub refunded: bool,
    pub disputed: bool,
    pub invoice: Option<String>,
    pub payment_intent: Option<String>,
    pub created: Option<String>,
    pub synced_at: String,
}

impl PaymentOut {
    fn new(p: Payment, synced_at: i64) -> Self {
        Self {
            id: p.id,
            kind: p.kind,
            status: p.status,
            currency: p.currency,
            amount: p.amount,
            amount_received: p.amount_received,
            amount_refunded: p.amount_refunded,
            refunded: p.refunded,
            disputed: p.disputed,
            invoice: p.invoice,
            payment_intent: p.payment_intent,
            created: p.created.map(rfc3339_secs),
            synced_at: rfc3339(synced_at),
        }
    }
}

async fn customer_page(
    state: &AppState,
    scope: &KeyScope,
    tenant_id: &str,
    query: &HashMap<String, String>,
    kinds: PageKinds,
) -> Result<(Vec<MirrorRow>, Option<String>), ApiError> {
    let tenant = load(state, scope, tenant_id).await?;
    let page = PageRequest::from_query(query)?;
    let Some(customer) = tenant.customer_id else {
        return Ok((Vec::new(), None));
    };
    let mut rows = state
        .db
        .mirror()
        .page_of_customer(&customer, kinds, page.before.clone(), page.fetch_limit())
        .await?;
    let next = page.finish(&mut rows, |row| {
        (row.created.unwrap_or(0), row.object_id.clone())
    });
    Ok((rows, next))
}

fn parse(row: &MirrorRow) -> Value {
    serde_json::from_str(&row.payload).unwrap_or(Value::Null)
}

pub async fn list_invoices(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PageOut<InvoiceOut>>, ApiError> {
    let (rows, next_cursor) =
        customer_page(&state, &scope, &tenant_id, &query, PageKinds::Invoices).await?;
    let data = rows
        .iter()
        .map(|row| InvoiceOut::new(objects::invoice(&parse(row)), row.synced_at))
        .collect();
    Ok(Json(PageOut { data, next_cursor }))
}

pub async fn list_payments(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PageOut<PaymentOut>>, ApiError> {
    let (rows, next_cursor) =
        customer_page(&state, &scope, &tenant_id, &query, PageKinds::Payments).await?;
    let data = rows
        .iter()
        .map(|row| {
            PaymentOut::new(
                objects::payment(&row.object_type, &parse(row)),
                row.synced_at,
            )
        })
        .collect();
    Ok(Json(PageOut { data, next_cursor }))
}

#[derive(Debug, Serialize)]
pub struct EventOut {
    pub event_id: String,
    pub event_type: String,
    /// `webhook`, `poll`, `sweep` or `backfill`.
    pub source: String,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub created: String,
    pub received_at: String,
    /// `pending`, `applied`, `skipped` or `failed`.
    pub outcome: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub applied_at: Option<String>,
    /// True when the event came from billsync's own command (its idempotency key).
    pub own_command: bool,
}

/// The vendor events (and fetched states) that touched the tenant, newest first.
pub async fn list_tenant_events(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<PageOut<EventOut>>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let page = PageRequest::from_query(&query)?;
    let mut rows = state
        .db
        .inbox()
        .for_tenant(
            &tenant.tenant_id,
            tenant.customer_id.as_deref(),
            page.before.clone(),
            page.fetch_limit(),
        )
        .await?;
    let next_cursor = page.finish(&mut rows, |row| (row.event_created, row.event_id.clone()));
    let data = rows
        .into_iter()
        .map(|row| EventOut {
            own_command: crate::sync::is_own(&row),
            event_id: row.event_id,
            event_type: row.event_type,
            source: row.source,
            object_type: row.object_type,
            object_id: row.object_id,
            created: rfc3339(row.event_created),
            received_at: rfc3339(row.received_at),
            outcome: row.status,
            attempts: row.attempts,
            last_error: row.last_error,
            applied_at: row.applied_at.map(rfc3339),
        })
        .collect();
    Ok(Json(PageOut { data, next_cursor }))
}

/// Where sync stands: cursor, last webhook, backlog, failures, lags. It names every tenant, so
/// a tenant-scoped key may not read it.
pub async fn sync_status(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
) -> Result<Json<Value>, ApiError> {
    if scope.is_limited() {
        let message = "a tenant-scoped key cannot read the sync status of every tenant";
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            message,
        ));
    }
    let now = now_ms();
    let stats = state.db.inbox().stats().await?;
    let sync = state.db.sync_state();
    let millis = |v: Option<String>| v.and_then(|v| v.parse::<i64>().ok());
    let cursor = millis(sync.get(poller::CURSOR).await?);
    let last_poll = millis(sync.get(poller::LAST_RUN).await?);
    let last_sweep = millis(sync.get(sweep::LAST_RUN).await?);
    let failed: Vec<Value> = state
        .db
        .inbox()
        .failed(20)
        .await?
        .into_iter()
        .map(|row| {
            json!({
                "event_id": row.event_id,
                "event_type": row.event_type,
                "attempts": row.attempts,
                "last_error": row.last_error,
                "next_attempt_at": rfc3339(row.next_attempt_at),
            })
        })
        .collect();
    let seconds_since = |t: Option<i64>| t.map(|t| ((now - t).max(0) as f64) / 1000.0);
    let (commands_pending, oldest_command) = state.db.commands().backlog().await?;
    let commands_failed = state.db.commands().failed_count().await?;
    let (pushes_pending, oldest_push) = state.db.usage().pending_pushes().await?;
    let (notes_pending, notes_failed, oldest_note) = state.db.notifications().backlog().await?;
    let here = this_replica(&state);
    let jobs = jobs(&state, &here).await?;
    Ok(Json(json!({
        "vendor": {
            "configured": state.vendor.is_some(),
            "refetch": state.settings.stripe.refetch,
        },
        "events_cursor": cursor.map(rfc3339_secs),
        "last_webhook_at": stats.last_webhook_at.map(rfc3339),
        "last_poll_at": last_poll.map(rfc3339),
        "last_sweep_at": last_sweep.map(rfc3339),
        "sweep": sweep_coverage(&state).await?,
        "inbox": {
            "pending": stats.pending,
            "failed": stats.failed,
            "applied": stats.applied,
            "skipped": stats.skipped,
            "oldest_waiting_at": stats.oldest_waiting.map(rfc3339),
        },
        "failed_events": failed,
        "outbox": {
            "pending": commands_pending,
            "oldest_pending_at": oldest_command.map(rfc3339),
            "failed": commands_failed,
        },
        "notifications": {
            "configured": state.settings.notify.url.is_some(),
            "pending": notes_pending,
            "oldest_pending_at": oldest_note.map(rfc3339),
            "failed": notes_failed,
        },
        "this_replica": here,
        "jobs": jobs,
        "usage_pusher": {
            "pending": pushes_pending,
            "oldest_pending_at": oldest_push.map(rfc3339),
        },
        "invalid_metadata": state.entitlements.invalid_metadata(),
        "lag_seconds": {
            "sync": seconds_since(stats.newest_applied_event),
            "poller": seconds_since(last_poll),
            "sweep": seconds_since(last_sweep),
            "backlog": seconds_since(stats.oldest_waiting),
            "outbox": seconds_since(oldest_command),
        },
    })))
}

/// What the drift sweep's budget covers: the known tenants, the longest one goes unchecked,
/// and the oldest check among those checked (`never_swept`: not checked yet).
async fn sweep_coverage(state: &AppState) -> Result<Value, ApiError> {
    let (known, never, oldest) = state.db.tenants().sweep_coverage().await?;
    let sync = &state.settings.sync;
    let plan =
        crate::sync::sweep_plan::plan(sync.sweep_budget, sync.sweep_interval, known.max(0) as u64);
    Ok(json!({
        "budget_per_minute": sync.sweep_budget,
        "interval_seconds": sync.sweep_interval.as_secs_f64(),
        "tenants_per_pass": plan.tenants_per_pass,
        "known_tenants": known,
        "never_swept": never,
        "longest_unchecked_seconds": plan.longest_unchecked.as_secs_f64(),
        "oldest_swept_at": oldest.map(rfc3339),
    }))
}

/// The replica answering and the singleton jobs it runs now (the leases it holds, as its
/// `billsync_lease_held` gauge says). With several replicas, each answers for itself.
fn this_replica(state: &AppState) -> Value {
    let mut jobs: Vec<String> = state
        .metrics
        .gauge("billsync_lease_held")
        .into_iter()
        .filter(|(_, held)| *held > 0.0)
        .filter_map(|(labels, _)| {
            let name = labels.strip_prefix("lease=\"")?.strip_suffix('"')?;
            Some(name.to_owned())
        })
        .collect();
    jobs.sort();
    json!({ "id": &*state.metering.origin, "jobs": jobs })
}

/// Each singleton job and the replica running it (`null`: none runs it now: it is not
/// configured, or its replica died and another has not taken it yet). On PostgreSQL from the
/// database's advisory locks, so that every replica gives the same answer; on SQLite this
/// process runs every job it started.
async fn jobs(state: &AppState, here: &Value) -> Result<Value, ApiError> {
    let held = crate::store::lease_holders(&state.db).await?;
    let jobs: Vec<Value> = (crate::cluster::SINGLETON_JOBS.iter())
        .map(|job| {
            let replica = match &state.db {
                crate::store::Db::Sqlite(_) => (here["jobs"].as_array())
                    .is_some_and(|mine| mine.iter().any(|j| j == job))
                    .then(|| here["id"].clone()),
                crate::store::Db::Postgres(_) => {
                    let key = crate::store::lease_key(job);
                    (held.iter().find(|(k, _)| *k == key)).map(|(_, holder)| json!(holder))
                }
            };
            json!({ "job": job, "replica": replica })
        })
        .collect();
    Ok(json!(jobs))
}

/// The answer to a retry: the event, now due.
#[derive(Debug, Serialize)]
pub struct RetryOut {
    pub event_id: String,
    pub event_type: String,
    /// Still `failed` until the applier's next pass settles it.
    pub outcome: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: String,
}

/// `POST /v1/sync/events/{event_id}/retry`: a failed inbox event is applied again now rather
/// than at its backoff's time. Logged with the key that asked. Like the sync status that lists
/// failed events, it spans every tenant, so a tenant-scoped key may not use it.
pub async fn retry_event(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(event_id): Path<String>,
) -> Result<(axum::http::StatusCode, Json<RetryOut>), ApiError> {
    if scope.is_limited() {
        let message = "a tenant-scoped key cannot retry inbox events";
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            message,
        ));
    }
    let not_found = || ApiError::not_found("event_not_found", format!("no event `{event_id}`"));
    // No stored id is longer, or holds a control character (PostgreSQL refuses NUL).
    if event_id.len() > 255 || event_id.chars().any(char::is_control) {
        return Err(not_found());
    }
    let row = match state.db.inbox().retry_now(&event_id, now_ms()).await? {
        Ok(Some(row)) => row,
        Ok(None) => return Err(not_found()),
        Err(status) => {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "event_not_failed",
                format!("event `{event_id}` is {status}, not failed: there is nothing to retry"),
            ));
        }
    };
    tracing::info!(
        key = scope.key_id(),
        event_id = %row.event_id,
        attempts = row.attempts,
        "failed event retried now"
    );
    state.wake.notify_one();
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(RetryOut {
            event_id: row.event_id,
            event_type: row.event_type,
            outcome: row.status,
            attempts: row.attempts,
            last_error: row.last_error,
            next_attempt_at: rfc3339(row.next_attempt_at),
        }),
    ))
}
