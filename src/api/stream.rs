//! `GET /v1/entitlements/stream`: Server-Sent Events carrying the entitlement state of every
//! tenant the key may see, then each change, resumable from a cursor on any replica. The
//! protocol is in docs/entitlements.md ("The change stream") and `openapi.yaml`.
//!
//! Each stream is a task writing into a bounded channel that the response body reads. While it
//! sends a snapshot (or what a resumed client missed) it waits for the consumer; once live, a
//! consumer that lets the channel fill, or falls behind the hub's broadcast, gets a `bye` with
//! its cursor and the stream ends: the server's memory never grows with a slow consumer.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};

use super::auth::KeyScope;
use super::error::ApiError;
use crate::entitlements::stream::Change;
use crate::state::AppState;
use crate::store::{StoreError, now_ms};

/// The protocol's version, in `hello`.
const PROTOCOL: u32 = 1;
/// How far before its last usage event a resumed stream looks for usage it missed: replicas'
/// clocks and commit delays.
const USAGE_MARGIN_MS: i64 = 5_000;
/// Tenants (and changes) read per query.
const PAGE: u32 = 500;
/// Tenant models a snapshot computes at once (each a few queries when not cached); below the
/// default pool of 10 connections, so that other requests still find one.
const SNAPSHOT_CONCURRENCY: usize = 4;
/// How long a live stream may take to read every state again (a product, price or plan
/// changed) before it is let go.
const RESEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Where to resume; `Last-Event-ID` is read when this is absent.
    pub cursor: Option<String>,
}

/// Where a client is: the last change it has (`seq`, the change log's, the same on every
/// replica) and when the latest usage it has was sent (Unix ms). On the wire `<seq>-<ms>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub seq: i64,
    pub usage_at: i64,
}

impl Cursor {
    pub fn parse(text: &str) -> Option<Self> {
        let (seq, usage_at) = text.trim().split_once('-')?;
        Some(Self {
            seq: seq.parse().ok().filter(|s| *s >= 0)?,
            usage_at: usage_at.parse().ok().filter(|s| *s >= 0)?,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.seq, self.usage_at)
    }
}

pub async fn stream(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let last_event_id = (headers.get("last-event-id")).and_then(|v| v.to_str().ok());
    let raw = query.cursor.as_deref().or(last_event_id).map(str::trim);
    let cursor = match raw.filter(|c| !c.is_empty()) {
        None => None,
        Some(text) => Some(Cursor::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "the cursor is not one this stream gave (`<seq>-<ms>`)",
            )
            .with_field("cursor")
        })?),
    };
    let settings = &state.settings.entitlements;
    let heartbeat = settings.stream_heartbeat;
    let (tx, rx) = mpsc::channel(settings.stream_buffer);
    // Subscribed before anything is read: no change falls in between. A database that cannot
    // be read answers 503 here, before the stream starts.
    let changes = state.stream.subscribe();
    let upto = state.db.changes().bounds().await?.1.unwrap_or(0);
    tokio::spawn(Connection { state, scope, tx }.run(changes, cursor, upto));
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat")))
}

/// Why a stream ends from the server's side.
enum Stop {
    /// The client went away.
    Gone,
    /// A `bye` to send with this reason and cursor.
    Bye(&'static str, Option<Cursor>),
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        tracing::warn!(error = %error, "entitlement stream: the database failed; ending it");
        Stop::Bye("error", None)
    }
}

struct Connection {
    state: AppState,
    scope: KeyScope,
    tx: mpsc::Sender<Event>,
}

impl Connection {
    async fn run(
        self,
        mut changes: broadcast::Receiver<Arc<Change>>,
        cursor: Option<Cursor>,
        upto: i64,
    ) {
        let Err(Stop::Bye(reason, at)) = self.serve(&mut changes, cursor, upto).await else {
            return;
        };
        let bye = json!({"reason": reason, "cursor": at.map(|c| c.to_string())});
        let _ = self.tx.try_send(event("bye", &bye));
        if reason == "slow_consumer" {
            self.state.metrics.inc(
                "billsync_stream_disconnects_total",
                "Entitlement streams ended by the server, by reason.",
                &[("reason", reason)],
            );
        }
    }

    /// `hello`; the snapshot, or what the client missed since its cursor (up to `upto`, the
    /// newest change when the stream was subscribed); `ready`; then each change, until the
    /// client goes away or is let go.
    async fn serve(
        &self,
        changes: &mut broadcast::Receiver<Arc<Change>>,
        cursor: Option<Cursor>,
        upto: i64,
    ) -> Result<(), Stop> {
        let started = now_ms();
        self.wait_send(event("hello", &self.hello())).await?;
        let resumed = match cursor {
            Some(from) if self.resumable(from, started).await? => {
                self.replay(from, upto).await?;
                true
            }
            Some(_) => {
                let reset = json!({"reason": "cursor_too_old"});
                self.wait_send(event("reset", &reset)).await?;
                false
            }
            None => false,
        };
        if !resumed {
            self.snapshot().await?;
        }
        let mut at = Cursor {
            seq: upto,
            usage_at: started,
        };
        self.ready(at, resumed).await?;
        self.live(changes, &mut at).await
    }

    fn hello(&self) -> Value {
        let settings = &self.state.settings.entitlements;
        let plans = self.state.entitlements.plans();
        // A client cannot decide these from its copy (the balance is live): it asks the server.
        let credit_features: serde_json::Map<String, Value> = (plans.credits.values())
            .map(|f| {
                let price = json!({"meter": f.meter, "unit": f.unit,
                    "credits_per_unit": f.per_unit.normalize().to_string()});
                (f.name.clone(), price)
            })
            .collect();
        json!({
            "protocol": PROTOCOL,
            "fail_open": plans.fail_open,
            "credit_features": credit_features,
            "stale_after_ms": settings.stale_after.as_millis() as u64,
            "coalesce_ms": settings.stream_coalesce.as_millis() as u64,
            "heartbeat_ms": settings.stream_heartbeat.as_millis() as u64,
        })
    }

    async fn ready(&self, at: Cursor, resumed: bool) -> Result<(), Stop> {
        let ready = json!({"cursor": at.to_string(), "resumed": resumed});
        self.wait_send(event("ready", &ready).id(at.to_string()))
            .await
    }

    /// Whether the change log still holds every change after `from`, and its usage time is
    /// within the log's retention.
    async fn resumable(&self, from: Cursor, now: i64) -> Result<bool, Stop> {
        let (oldest, newest) = self.state.db.changes().bounds().await?;
        let retention = self.state.settings.entitlements.stream_retention;
        let kept = match (oldest, newest) {
            (Some(oldest), Some(newest)) => from.seq >= oldest - 1 && from.seq <= newest,
            _ => from.seq == 0,
        };
        Ok(kept && now - from.usage_at <= retention.as_millis() as i64 && from.usage_at <= now)
    }

    /// Every tenant the key may see, in tenant order.
    async fn snapshot(&self) -> Result<(), Stop> {
        if let Some(tenants) = self.scope.only() {
            for tenant in tenants {
                self.send_state(tenant, None).await?;
            }
            return Ok(());
        }
        let mut after = String::new();
        loop {
            let page = self.state.db.tenants().ids_after(&after, PAGE).await?;
            // Cold models cost a few queries each: several at once, sent in order.
            let mut states = futures_util::stream::iter(page.iter().cloned())
                .map(|tenant| async move { self.state_event(&tenant, None).await })
                .buffered(SNAPSHOT_CONCURRENCY);
            while let Some(event) = states.next().await {
                self.wait_send(event?).await?;
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => after = last.clone(),
                _ => return Ok(()),
            }
        }
    }

    /// The tenants changed after `from` (up to `upto`) and those with usage since its usage
    /// time, each once, in the order of their last change.
    async fn replay(&self, from: Cursor, upto: i64) -> Result<(), Stop> {
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        let mut seq = from.seq;
        while seq < upto {
            let page = self.state.db.changes().after(seq, PAGE).await?;
            for change in page.iter().filter(|c| c.seq <= upto) {
                let Some(tenant) = &change.tenant_id else {
                    // Every tenant changed: send them all.
                    return self.snapshot().await;
                };
                if self.scope.allows(tenant) {
                    last.insert(tenant.clone(), change.seq);
                }
            }
            seq = match page.last() {
                Some(change) if page.len() == PAGE as usize => change.seq,
                _ => upto,
            };
        }
        let usage = self.state.db.usage();
        for tenant in usage.tenants_since(from.usage_at - USAGE_MARGIN_MS).await? {
            if self.scope.allows(&tenant) {
                last.entry(tenant).or_insert(from.seq);
            }
        }
        let mut ordered: Vec<(i64, String)> = last.into_iter().map(|(t, s)| (s, t)).collect();
        ordered.sort();
        for (seq, tenant) in ordered {
            let usage_at = from.usage_at;
            self.send_state(&tenant, Some(Cursor { seq, usage_at }))
                .await?;
        }
        Ok(())
    }

    /// One tenant's state now (`removed` when it is gone), waiting for the consumer.
    async fn send_state(&self, tenant: &str, id: Option<Cursor>) -> Result<(), Stop> {
        let event = self.state_event(tenant, id).await?;
        self.wait_send(event).await
    }

    /// One tenant's state now, as an event (`removed` when it is gone).
    async fn state_event(&self, tenant: &str, id: Option<Cursor>) -> Result<Event, Stop> {
        let entitlements = &self.state.entitlements;
        let event = match entitlements.model(tenant).await? {
            Some(model) => {
                self.state.stream.sent(tenant, model.expires_at);
                event("tenant", &entitlements.state_of(&model, now_ms()))
            }
            None => event("removed", &json!({"tenant_id": tenant})),
        };
        Ok(match id {
            Some(id) => event.id(id.to_string()),
            None => event,
        })
    }

    /// Forwards the hub's changes the key may see, newer than `at`.
    async fn live(
        &self,
        changes: &mut broadcast::Receiver<Arc<Change>>,
        at: &mut Cursor,
    ) -> Result<(), Stop> {
        let closing = self.state.stream.closing().clone();
        loop {
            let received = tokio::select! {
                () = closing.cancelled() => return Err(Stop::Bye("shutdown", Some(*at))),
                () = self.tx.closed() => return Err(Stop::Gone),
                received = changes.recv() => received,
            };
            match received {
                Ok(change) => self.forward(&change, at).await?,
                Err(RecvError::Lagged(_)) => return Err(Stop::Bye("slow_consumer", Some(*at))),
                Err(RecvError::Closed) => return Err(Stop::Bye("shutdown", Some(*at))),
            }
        }
    }

    async fn forward(&self, change: &Change, at: &mut Cursor) -> Result<(), Stop> {
        match change {
            Change::Tenant { seq, tenant, state } => {
                if !self.scope.allows(tenant) || (*seq < at.seq) {
                    return Ok(());
                }
                let next = Cursor { seq: *seq, ..*at };
                let sent = match state {
                    Some(state) => event("tenant", state),
                    None => event("removed", &json!({"tenant_id": tenant})),
                };
                self.try_send(sent.id(next.to_string()), *at)?;
                *at = next;
                Ok(())
            }
            Change::Usage {
                tenant,
                meter,
                used,
                at: when,
            } => {
                if !self.scope.allows(tenant) {
                    return Ok(());
                }
                let next = Cursor {
                    usage_at: at.usage_at.max(*when),
                    ..*at
                };
                let usage = json!({"tenant_id": tenant, "meter": meter, "used": used,
                    "at": crate::domain::rfc3339(*when)});
                self.try_send(event("usage", &usage).id(next.to_string()), *at)?;
                *at = next;
                Ok(())
            }
            Change::All { seq } => {
                // Every state again, at the consumer's pace but not forever: one that stalls
                // resumes from its cursor later, which replays this change.
                let again = async {
                    let reset = json!({"reason": "catalog_changed"});
                    self.wait_send(event("reset", &reset)).await?;
                    self.snapshot().await?;
                    let next = Cursor {
                        seq: at.seq.max(*seq),
                        ..*at
                    };
                    self.ready(next, false).await.map(|()| next)
                };
                let stalled = Stop::Bye("slow_consumer", Some(*at));
                *at =
                    (tokio::time::timeout(RESEND_PATIENCE, again).await).map_err(|_| stalled)??;
                Ok(())
            }
        }
    }

    /// Sends, waiting for room (a snapshot: the consumer reads at its pace).
    async fn wait_send(&self, event: Event) -> Result<(), Stop> {
        self.tx.send(event).await.map_err(|_| Stop::Gone)
    }

    /// Sends a live change, or lets a consumer that let the channel fill go (one place is kept
    /// for the `bye`).
    fn try_send(&self, event: Event, at: Cursor) -> Result<(), Stop> {
        if self.tx.capacity() <= 1 {
            return Err(Stop::Bye("slow_consumer", Some(at)));
        }
        self.tx.try_send(event).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => Stop::Bye("slow_consumer", Some(at)),
            mpsc::error::TrySendError::Closed(_) => Stop::Gone,
        })
    }
}

fn event(kind: &'static str, data: &Value) -> Event {
    Event::default().event(kind).data(data.to_string())
}
