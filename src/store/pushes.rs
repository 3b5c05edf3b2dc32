//! The push ledger: one row per meter event sent (or to be sent) to the vendor, its identifier
//! fixed before the first attempt, and the usage events each carries.

use super::usage::{CHUNK, UsageRow, UsageWith};
use super::{StoreError, Usage, on_pool};

/// A meter event for Stripe, recorded before it is first sent.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PushRow {
    pub push_id: String,
    pub tenant_id: String,
    pub meter: String,
    pub customer_id: String,
    pub event_name: String,
    pub window_start: i64,
    pub value: String,
    pub timestamp: i64,
    pub event_count: i32,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: i64,
    pub created_at: i64,
    pub sent_at: Option<i64>,
    /// The billing period whose usage it carries, `[start, end)` in Unix ms (`None` for pushes
    /// planned before periods were kept).
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    /// `usage` (carries events) or `repair` (reconciliation's, carrying none).
    pub kind: String,
    /// A repair's finding, as JSON.
    pub evidence: Option<String>,
}

/// A push to plan, with the events it carries.
#[derive(Debug, Clone)]
pub struct NewPush {
    pub row: PushRow,
    /// (tenant, event id) of each event it carries.
    pub events: Vec<(String, String)>,
    /// It carries its period's whole value: pushes of the same period not sent yet are
    /// `superseded`, so that an older value never reaches the vendor after a newer one.
    pub replaces_earlier: bool,
}

/// Where a chunk of [`Usage::unpushed`] ended: the next chunk starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpushedKey {
    pub tenant_id: String,
    pub meter: String,
    pub received_at: i64,
    pub event_id: String,
}

impl UnpushedKey {
    pub fn of(row: &UsageRow) -> Self {
        Self {
            tenant_id: row.tenant_id.clone(),
            meter: row.meter.clone(),
            received_at: row.received_at,
            event_id: row.event_id.clone(),
        }
    }
}

macro_rules! push_columns {
    () => {
        "push_id, tenant_id, meter, customer_id, event_name, window_start, value, timestamp, event_count, \
         status, attempts, last_error, next_attempt_at, created_at, sent_at, period_start, period_end, \
         kind, evidence"
    };
}

/// Inserts a push row unless one with its identifier exists; the rows written (0 or 1).
macro_rules! insert_push {
    ($executor:expr, $push:expr) => {{
        let push: &PushRow = $push;
        sqlx::query(concat!(
            "INSERT INTO usage_pushes (",
            push_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19) ON CONFLICT (push_id) DO NOTHING"
        ))
        .bind(&push.push_id)
        .bind(&push.tenant_id)
        .bind(&push.meter)
        .bind(&push.customer_id)
        .bind(&push.event_name)
        .bind(push.window_start)
        .bind(&push.value)
        .bind(push.timestamp)
        .bind(push.event_count)
        .bind(&push.status)
        .bind(push.attempts)
        .bind(&push.last_error)
        .bind(push.next_attempt_at)
        .bind(push.created_at)
        .bind(push.sent_at)
        .bind(push.period_start)
        .bind(push.period_end)
        .bind(&push.kind)
        .bind(&push.evidence)
        .execute($executor)
        .await?
        .rows_affected()
    }};
}

impl Usage<'_> {
    /// Unpushed events of pushable meters whose tenant has a Stripe customer, with that
    /// customer, tenant by tenant and meter by meter, oldest first within each: up to `limit`
    /// after `after` (the last key a previous chunk of the same pass read).
    pub async fn unpushed(
        &self,
        meters: &[String],
        after: Option<&UnpushedKey>,
        limit: u32,
    ) -> Result<Vec<(UsageRow, String)>, StoreError> {
        if meters.is_empty() {
            return Ok(Vec::new());
        }
        let rows = on_pool!(self.db, |pool| {
            let mut query = sqlx::QueryBuilder::new(
                "SELECT e.tenant_id, e.event_id, e.meter, e.quantity, e.occurred_at, e.unique_value, \
                 CAST(NULL AS TEXT) AS properties, e.received_at, e.push_id, t.customer_id AS extra \
                 FROM usage_events e JOIN tenants t ON t.tenant_id = e.tenant_id \
                 WHERE e.push_id IS NULL AND t.customer_id IS NOT NULL AND e.meter IN (",
            );
            let mut list = query.separated(", ");
            for meter in meters {
                list.push_bind(meter);
            }
            query.push(")");
            if let Some(key) = after {
                query.push(" AND (e.tenant_id, e.meter, e.received_at, e.event_id) > (");
                let mut tuple = query.separated(", ");
                tuple.push_bind(&key.tenant_id);
                tuple.push_bind(&key.meter);
                tuple.push_bind(key.received_at);
                tuple.push_bind(&key.event_id);
                query.push(")");
            }
            // Tenant by tenant: a pass that plans in chunks splits at most one tenant's
            // events between two chunks, so chunks add few meter events.
            query.push(" ORDER BY e.tenant_id, e.meter, e.received_at, e.event_id LIMIT ");
            query.push_bind(i64::from(limit));
            query.build_query_as::<UsageWith>().fetch_all(pool).await
        })?;
        Ok(rows
            .into_iter()
            .map(|w| (w.row, w.extra.unwrap_or_default()))
            .collect())
    }

    /// Records pushes and ties their events to them, in one transaction: from here on each push
    /// is sent with its fixed identifier until Stripe has it. All or nothing: when any event is
    /// already tied to a push (another planner, one that lost its lease, got there first),
    /// nothing is written and the answer is `false`.
    pub async fn plan_pushes(&self, pushes: &[NewPush]) -> Result<bool, StoreError> {
        let planned = on_pool!(self.db, |pool| {
            async {
                let mut tx = pool.begin().await?;
                for NewPush {
                    row: push,
                    events,
                    replaces_earlier,
                } in pushes
                {
                    if *replaces_earlier && push.status == "pending" {
                        sqlx::query(
                            "UPDATE usage_pushes SET status = 'superseded', last_error = $5 \
                         WHERE tenant_id = $1 AND meter = $2 AND period_start = $3 \
                         AND status = 'pending' AND push_id <> $4",
                        )
                        .bind(&push.tenant_id)
                        .bind(&push.meter)
                        .bind(push.period_start)
                        .bind(&push.push_id)
                        .bind(format!("replaced before it was sent by {}", push.push_id))
                        .execute(&mut *tx)
                        .await?;
                    }
                    let inserted = insert_push!(&mut *tx, push);
                    // A push carries one tenant's events: tie them to it by id, a chunk at a time.
                    let mut tied = 0;
                    for chunk in events.chunks(CHUNK) {
                        let mut update =
                            sqlx::QueryBuilder::new("UPDATE usage_events SET push_id = ");
                        update.push_bind(&push.push_id);
                        update.push(" WHERE push_id IS NULL AND tenant_id = ");
                        update.push_bind(&push.tenant_id);
                        update.push(" AND event_id IN (");
                        let mut ids = update.separated(", ");
                        for (_, event_id) in chunk {
                            ids.push_bind(event_id);
                        }
                        update.push(")");
                        tied += update.build().execute(&mut *tx).await?.rows_affected();
                    }
                    if inserted == 0 || tied != events.len() as u64 {
                        tx.rollback().await?;
                        return Ok::<_, sqlx::Error>(false);
                    }
                }
                tx.commit().await?;
                Ok(true)
            }
            .await
        })?;
        Ok(planned)
    }

    /// The latest timestamp (Unix seconds) of the pushes of a tenant's meter in the period
    /// starting at `period_start`.
    pub async fn last_stamp(
        &self,
        tenant_id: &str,
        meter: &str,
        period_start: i64,
    ) -> Result<Option<i64>, StoreError> {
        let (stamp,): (Option<i64>,) = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT MAX(timestamp) FROM usage_pushes WHERE tenant_id = $1 AND meter = $2 \
                 AND period_start = $3",
            )
            .bind(tenant_id)
            .bind(meter)
            .bind(period_start)
            .fetch_one(pool)
            .await
        })?;
        Ok(stamp)
    }

    /// Claims the pushes waiting to be sent (first time or again), oldest first; each is put
    /// off for `claim_ms` (PostgreSQL: `FOR UPDATE SKIP LOCKED`), so no other replica sends it
    /// meanwhile, and comes back by itself if this process dies before settling it.
    pub async fn due_pushes(
        &self,
        now_ms: i64,
        limit: u32,
        claim_ms: i64,
    ) -> Result<Vec<PushRow>, StoreError> {
        let sql = format!(
            "UPDATE usage_pushes SET next_attempt_at = $3 WHERE push_id IN (SELECT push_id \
             FROM usage_pushes WHERE status = 'pending' AND next_attempt_at <= $1 \
             ORDER BY created_at, push_id LIMIT $2{}) RETURNING {}",
            self.db.skip_locked(),
            push_columns!()
        );
        let mut rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, PushRow>(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(i64::from(limit))
                .bind(now_ms + claim_ms)
                .fetch_all(pool)
                .await
        })?;
        rows.sort_by(|a, b| (a.created_at, &a.push_id).cmp(&(b.created_at, &b.push_id)));
        Ok(rows)
    }

    /// How many pushes wait to be sent (first time or again), and when the oldest was planned.
    pub async fn pending_pushes(&self) -> Result<(i64, Option<i64>), StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (i64, Option<i64>)>(
                "SELECT COUNT(*), MIN(created_at) FROM usage_pushes WHERE status = 'pending'",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(row)
    }

    /// Settles a push: `sent`, `rejected` (the vendor refused it) or `pending` again (retry).
    pub async fn settle_push(
        &self,
        push_id: &str,
        status: &str,
        error: Option<&str>,
        next_attempt_at: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE usage_pushes SET status = $2, last_error = $3, next_attempt_at = $4, attempts = attempts + 1, \
                 sent_at = CASE WHEN $2 = 'sent' THEN $5 ELSE sent_at END WHERE push_id = $1",
            )
            .bind(push_id)
            .bind(status)
            .bind(error)
            .bind(next_attempt_at)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// Records a repair push (see `reconcile::repair`) unless its identifier is already in the
    /// ledger; `true` when written.
    pub async fn insert_repair(&self, push: &PushRow) -> Result<bool, StoreError> {
        let inserted = on_pool!(self.db, |pool| {
            async { Ok::<_, sqlx::Error>(insert_push!(pool, push)) }.await
        })?;
        Ok(inserted == 1)
    }

    /// One push row by its identifier.
    pub async fn push(&self, push_id: &str) -> Result<Option<PushRow>, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, PushRow>(concat!(
                "SELECT ",
                push_columns!(),
                " FROM usage_pushes WHERE push_id = $1"
            ))
            .bind(push_id)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row)
    }

    /// Push rows of a tenant and meter (for the ledger and tests).
    pub async fn pushes_of(
        &self,
        tenant_id: &str,
        meter: &str,
    ) -> Result<Vec<PushRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, PushRow>(concat!(
                "SELECT ",
                push_columns!(),
                " FROM usage_pushes WHERE tenant_id = $1 AND meter = $2 ORDER BY created_at, push_id"
            ))
            .bind(tenant_id)
            .bind(meter)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// The (tenant, meter) pairs with a push the vendor took (`sent_at`) in `[from_ms, to_ms)`,
    /// in that order.
    pub async fn sent_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String, String)>(
                "SELECT DISTINCT tenant_id, meter FROM usage_pushes \
                 WHERE sent_at >= $1 AND sent_at < $2 ORDER BY tenant_id, meter",
            )
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Pushes of windows starting in `[from_ms, to_ms)`, and every push an event of that window
    /// names (a late push of a period-value meter starts in an earlier window).
    pub async fn pushes_between(
        &self,
        from_ms: i64,
        to_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<PushRow>, StoreError> {
        // Two statements: SQLite answers `tenant_id = $3` from its index, not `($3 IS NULL OR
        // tenant_id = $3)`.
        let sql = match tenant {
            Some(_) => concat!(
                "SELECT ",
                push_columns!(),
                " FROM usage_pushes WHERE tenant_id = $3 AND window_start >= $1 AND window_start < $2 \
                 ORDER BY tenant_id, meter, window_start, push_id"
            ),
            None => concat!(
                "SELECT ",
                push_columns!(),
                " FROM usage_pushes WHERE window_start >= $1 AND window_start < $2 AND $3 IS NULL \
                 ORDER BY tenant_id, meter, window_start, push_id"
            ),
        };
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, PushRow>(sql)
                .bind(from_ms)
                .bind(to_ms)
                .bind(tenant)
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }
}
