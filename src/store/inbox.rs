//! The inbox: every vendor event (and every state a sweep or backfill fetched), stored before it
//! is acknowledged and applied after. Unique on `event_id`.

use super::{Db, StoreError, on_pool};

/// Where an inbox row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Webhook,
    Poll,
    Sweep,
    Backfill,
    /// The vendor's answer to one of billsync's own commands.
    Command,
    /// A state a reconciliation's drift check fetched, to repair the mirror.
    Reconcile,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Poll => "poll",
            Self::Sweep => "sweep",
            Self::Backfill => "backfill",
            Self::Command => "command",
            Self::Reconcile => "reconcile",
        }
    }

    /// Sweep, backfill, command and reconcile rows carry a state fetched just now, not an
    /// event's snapshot.
    pub fn is_fresh_state(name: &str) -> bool {
        matches!(name, "sweep" | "backfill" | "command" | "reconcile")
    }
}

/// A row to insert.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub event_type: String,
    pub source: Source,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub customer_id: Option<String>,
    /// Unix milliseconds.
    pub event_created: i64,
    pub idempotency_key: Option<String>,
    pub payload: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InboxRow {
    pub event_id: String,
    pub event_type: String,
    pub source: String,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub customer_id: Option<String>,
    pub tenant_id: Option<String>,
    pub event_created: i64,
    pub idempotency_key: Option<String>,
    pub payload: String,
    pub received_at: i64,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: i64,
    pub applied_at: Option<i64>,
    pub applied_payload: Option<String>,
    pub applied_version: Option<i64>,
}

/// Counts for `GET /v1/sync/status`.
#[derive(Debug, Clone, Default)]
pub struct InboxStats {
    pub pending: i64,
    pub failed: i64,
    pub applied: i64,
    pub skipped: i64,
    /// `event_created` of the oldest row still waiting (pending or failed).
    pub oldest_waiting: Option<i64>,
    /// `event_created` of the newest applied vendor event (webhook or poll).
    pub newest_applied_event: Option<i64>,
    pub last_webhook_at: Option<i64>,
}

macro_rules! columns {
    () => {
        "event_id, event_type, source, object_type, object_id, customer_id, tenant_id, event_created, \
         idempotency_key, payload, received_at, status, attempts, last_error, next_attempt_at, \
         applied_at, applied_payload, applied_version"
    };
}

/// The statement that stores one [`NewEvent`] unless its id is there, on any connection (the
/// mirror stores a command's confirmed state in the transaction that applies it).
macro_rules! insert_event {
    ($conn:expr, $event:expr, $status:expr, $now_ms:expr) => {{
        let e: &$crate::store::NewEvent = $event;
        sqlx::query(
            "INSERT INTO inbox_events (event_id, event_type, source, object_type, object_id, customer_id, \
             event_created, idempotency_key, payload, received_at, status, attempts, next_attempt_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $10) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&e.event_id)
        .bind(&e.event_type)
        .bind(e.source.as_str())
        .bind(&e.object_type)
        .bind(&e.object_id)
        .bind(&e.customer_id)
        .bind(e.event_created)
        .bind(&e.idempotency_key)
        .bind(&e.payload)
        .bind($now_ms)
        .bind($status)
        .execute($conn)
    }};
}
pub(super) use insert_event;

pub struct Inbox<'a> {
    db: &'a Db,
}

impl<'a> Inbox<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// Stores the events that are not there yet, in one transaction; returns how many were new.
    /// Rows with nothing to apply are stored as `skipped`.
    pub async fn insert(&self, events: &[NewEvent], now_ms: i64) -> Result<usize, StoreError> {
        let inserted = self.insert_each(events, now_ms).await?;
        Ok(inserted.into_iter().filter(|new| *new).count())
    }

    /// [`Inbox::insert`], telling for each event whether it was new (of an id given twice,
    /// the first); a statement per 500 rows.
    pub async fn insert_each(
        &self,
        events: &[NewEvent],
        now_ms: i64,
    ) -> Result<Vec<bool>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut new: std::collections::HashSet<String> = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let mut new = Vec::with_capacity(events.len());
            for chunk in events.chunks(500) {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO inbox_events (event_id, event_type, source, object_type, object_id, \
                     customer_id, event_created, idempotency_key, payload, received_at, status, \
                     attempts, next_attempt_at) ",
                );
                insert.push_values(chunk, |mut row, e| {
                    let status = if e.object_type.is_some() {
                        "pending"
                    } else {
                        "skipped"
                    };
                    row.push_bind(&e.event_id)
                        .push_bind(&e.event_type)
                        .push_bind(e.source.as_str())
                        .push_bind(&e.object_type)
                        .push_bind(&e.object_id)
                        .push_bind(&e.customer_id)
                        .push_bind(e.event_created)
                        .push_bind(&e.idempotency_key)
                        .push_bind(&e.payload)
                        .push_bind(now_ms)
                        .push_bind(status)
                        .push_bind(0_i32)
                        .push_bind(now_ms);
                });
                insert.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
                new.extend(
                    insert
                        .build_query_scalar::<String>()
                        .fetch_all(&mut *tx)
                        .await?,
                );
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(new.into_iter().collect())
        })?;
        Ok(events.iter().map(|e| new.remove(&e.event_id)).collect())
    }

    /// Claims the rows due for (another) apply, oldest event first: each claimed row is put off
    /// for `claim_ms`, so another replica skips it (PostgreSQL: `FOR UPDATE SKIP LOCKED`), and
    /// comes back by itself if this process dies before it settles the row.
    pub async fn due(
        &self,
        now_ms: i64,
        limit: u32,
        claim_ms: i64,
    ) -> Result<Vec<InboxRow>, StoreError> {
        let sql = format!(
            "UPDATE inbox_events SET next_attempt_at = $3 WHERE event_id IN (SELECT event_id \
             FROM inbox_events WHERE status IN ('pending', 'failed') AND next_attempt_at <= $1 \
             ORDER BY event_created, event_id LIMIT $2{}) RETURNING {}",
            self.db.skip_locked(),
            columns!()
        );
        let mut rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, InboxRow>(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(i64::from(limit))
                .bind(now_ms + claim_ms)
                .fetch_all(pool)
                .await
        })?;
        rows.sort_by(|a, b| (a.event_created, &a.event_id).cmp(&(b.event_created, &b.event_id)));
        Ok(rows)
    }

    pub async fn mark_skipped(
        &self,
        event_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE inbox_events SET status = 'skipped', last_error = $2, applied_at = $3 WHERE event_id = $1",
            )
            .bind(event_id)
            .bind(reason)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// Records a failed attempt; the row is retried at `next_attempt_at`.
    pub async fn mark_failed(
        &self,
        event_id: &str,
        error: &str,
        next_attempt_at: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE inbox_events SET status = 'failed', attempts = attempts + 1, last_error = $2, \
                 next_attempt_at = $3 WHERE event_id = $1",
            )
            .bind(event_id)
            .bind(error)
            .bind(next_attempt_at)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    pub async fn stats(&self) -> Result<InboxStats, StoreError> {
        let stats = on_pool!(self.db, |pool| {
            let counts: Vec<(String, i64)> =
                sqlx::query_as("SELECT status, COUNT(*) FROM inbox_events GROUP BY status")
                    .fetch_all(pool)
                    .await?;
            let (oldest_waiting,): (Option<i64>,) = sqlx::query_as(
                "SELECT MIN(event_created) FROM inbox_events WHERE status IN ('pending', 'failed')",
            )
            .fetch_one(pool)
            .await?;
            let (newest_applied_event,): (Option<i64>,) = sqlx::query_as(
                "SELECT MAX(event_created) FROM inbox_events WHERE status = 'applied' AND source IN ('webhook', 'poll')",
            )
            .fetch_one(pool)
            .await?;
            let (last_webhook_at,): (Option<i64>,) = sqlx::query_as(
                "SELECT MAX(received_at) FROM inbox_events WHERE source = 'webhook'",
            )
            .fetch_one(pool)
            .await?;
            let mut stats = InboxStats {
                oldest_waiting,
                newest_applied_event,
                last_webhook_at,
                ..InboxStats::default()
            };
            for (status, n) in counts {
                match status.as_str() {
                    "pending" => stats.pending = n,
                    "failed" => stats.failed = n,
                    "applied" => stats.applied = n,
                    "skipped" => stats.skipped = n,
                    _ => {}
                }
            }
            Ok::<_, sqlx::Error>(stats)
        })?;
        Ok(stats)
    }

    /// Makes a failed row due now, for the applier's next pass. `Err(status)` when the row is
    /// there but not failed; `Ok(None)` when there is no such row.
    pub async fn retry_now(
        &self,
        event_id: &str,
        now_ms: i64,
    ) -> Result<Result<Option<InboxRow>, String>, StoreError> {
        let found = on_pool!(self.db, |pool| {
            let due = sqlx::query_as::<_, InboxRow>(concat!(
                "UPDATE inbox_events SET next_attempt_at = $2 WHERE event_id = $1 \
                 AND status = 'failed' RETURNING ",
                columns!()
            ))
            .bind(event_id)
            .bind(now_ms)
            .fetch_optional(pool)
            .await?;
            if due.is_some() {
                return Ok(Ok(due));
            }
            let status: Option<(String,)> =
                sqlx::query_as("SELECT status FROM inbox_events WHERE event_id = $1")
                    .bind(event_id)
                    .fetch_optional(pool)
                    .await?;
            Ok::<_, sqlx::Error>(match status {
                Some((status,)) => Err(status),
                None => Ok(None),
            })
        })?;
        Ok(found)
    }

    /// Rows that failed and wait for a retry, oldest first.
    pub async fn failed(&self, limit: u32) -> Result<Vec<InboxRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, InboxRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM inbox_events WHERE status = 'failed' ORDER BY event_created, event_id LIMIT $1"
            ))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// A tenant's events, newest first, before the `(event_created, event_id)` cursor: those
    /// applied for it, and those of its customer still waiting or failing.
    pub async fn for_tenant(
        &self,
        tenant_id: &str,
        customer_id: Option<&str>,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<InboxRow>, StoreError> {
        let (created, id) = before.unwrap_or((i64::MAX, String::new()));
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, InboxRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM inbox_events WHERE (tenant_id = $1 OR (tenant_id IS NULL AND customer_id = $5)) \
                 AND (event_created < $2 OR (event_created = $2 AND event_id < $3)) \
                 ORDER BY event_created DESC, event_id DESC LIMIT $4"
            ))
            .bind(tenant_id)
            .bind(created)
            .bind(id)
            .bind(i64::from(limit))
            .bind(customer_id)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Every row that was applied, in the order their states are versioned (for replay).
    pub async fn applied_in_order(
        &self,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<InboxRow>, StoreError> {
        let (created, id) = after.unwrap_or((i64::MIN, String::new()));
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, InboxRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM inbox_events WHERE status = 'applied' \
                 AND (event_created > $1 OR (event_created = $1 AND event_id > $2)) \
                 ORDER BY event_created, event_id LIMIT $3"
            ))
            .bind(created)
            .bind(id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }
}
