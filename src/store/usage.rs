//! The usage log, the push ledger, and the snapshot of the usage counters.

use super::{Db, StoreError, on_pool};

/// A validated usage event, ready to store.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageRow {
    pub tenant_id: String,
    pub event_id: String,
    pub meter: String,
    /// Exact decimal as text.
    pub quantity: String,
    pub occurred_at: i64,
    pub unique_value: Option<String>,
    pub properties: Option<String>,
    pub received_at: i64,
    pub push_id: Option<String>,
}

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
}

/// A usage row and one more column (a push's status, a customer id).
#[derive(sqlx::FromRow)]
struct UsageWith {
    #[sqlx(flatten)]
    row: UsageRow,
    extra: Option<String>,
}

macro_rules! usage_columns {
    () => {
        "tenant_id, event_id, meter, quantity, occurred_at, unique_value, properties, received_at, push_id"
    };
}

macro_rules! push_columns {
    () => {
        "push_id, tenant_id, meter, customer_id, event_name, window_start, value, timestamp, event_count, \
         status, attempts, last_error, next_attempt_at, created_at, sent_at"
    };
}

/// Rows per INSERT statement (well inside both backends' bind-parameter limits).
const CHUNK: usize = 500;

pub struct Usage<'a> {
    db: &'a Db,
}

impl<'a> Usage<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// Stores the events not stored before, all in one transaction; returns, for each event,
    /// whether it was new. The call returns only once they are durable.
    pub async fn insert(&self, rows: &[UsageRow]) -> Result<Vec<bool>, StoreError> {
        self.insert_notifying(rows, &|_| Vec::new()).await
    }

    /// [`Self::insert`], and on PostgreSQL a `billsync_usage` notification for each payload
    /// `payloads` makes of the new rows, sent in the same transaction: other replicas hear of
    /// exactly the usage that was committed (payloads are prefixed with the transaction id).
    pub async fn insert_notifying(
        &self,
        rows: &[UsageRow],
        payloads: &(dyn Fn(&[&UsageRow]) -> Vec<String> + Sync),
    ) -> Result<Vec<bool>, StoreError> {
        let notify = self.db.backend() == super::Backend::Postgres;
        let new: Vec<bool> = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let mut inserted = std::collections::HashSet::with_capacity(rows.len());
            for chunk in rows.chunks(CHUNK) {
                let mut query = sqlx::QueryBuilder::new(concat!(
                    "INSERT INTO usage_events (",
                    usage_columns!(),
                    ") "
                ));
                query.push_values(chunk, |mut b, row| {
                    b.push_bind(&row.tenant_id)
                        .push_bind(&row.event_id)
                        .push_bind(&row.meter)
                        .push_bind(&row.quantity)
                        .push_bind(row.occurred_at)
                        .push_bind(&row.unique_value)
                        .push_bind(&row.properties)
                        .push_bind(row.received_at)
                        .push_bind(Option::<String>::None);
                });
                query.push(
                    " ON CONFLICT (tenant_id, event_id) DO NOTHING RETURNING tenant_id, event_id",
                );
                let keys: Vec<(String, String)> =
                    query.build_query_as().fetch_all(&mut *tx).await?;
                inserted.extend(keys);
            }
            let new: Vec<bool> = rows
                .iter()
                .map(|r| inserted.contains(&(r.tenant_id.clone(), r.event_id.clone())))
                .collect();
            if notify && !inserted.is_empty() {
                let stored: Vec<&UsageRow> = rows
                    .iter()
                    .zip(&new)
                    .filter_map(|(row, new)| new.then_some(row))
                    .collect();
                let payloads = payloads(&stored);
                for chunk in payloads.chunks(CHUNK) {
                    let mut query = sqlx::QueryBuilder::new(
                        "SELECT pg_notify('billsync_usage', pg_current_xact_id()::text || ' ' || p) \
                         FROM (",
                    );
                    query.push_values(chunk, |mut b, payload| {
                        b.push_bind(payload);
                    });
                    query.push(") AS v (p)");
                    query.build().execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(new)
        })?;
        Ok(new)
    }

    /// Everything the usage counters are rebuilt from, read at one instant: the snapshot
    /// buckets, the events received since the snapshot's watermark (named by `watermark_key`
    /// in sync_state) and, on PostgreSQL, the snapshot of transactions the read saw
    /// (`pg_current_snapshot()`), so that notifications of those same transactions are not
    /// counted again.
    pub async fn counter_state(&self, watermark_key: &str) -> Result<CounterState, StoreError> {
        let state = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let seen = if self.db.backend() == super::Backend::Postgres {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    .execute(&mut *tx)
                    .await?;
                let (snapshot,): (String,) = sqlx::query_as("SELECT pg_current_snapshot()::text")
                    .fetch_one(&mut *tx)
                    .await?;
                TxSnapshot::parse(&snapshot)
            } else {
                None
            };
            let buckets = sqlx::query_as::<_, (String, String, i64, String)>(
                "SELECT tenant_id, meter, hour, state FROM usage_buckets",
            )
            .fetch_all(&mut *tx)
            .await?;
            let watermark: Option<(String,)> =
                sqlx::query_as("SELECT value FROM sync_state WHERE name = $1")
                    .bind(watermark_key)
                    .fetch_optional(&mut *tx)
                    .await?;
            let watermark: i64 = watermark.and_then(|(v,)| v.parse().ok()).unwrap_or(0);
            let rows = sqlx::query_as::<_, UsageRow>(concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage_events WHERE received_at >= $1 ORDER BY received_at"
            ))
            .bind(watermark)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(CounterState {
                buckets,
                rows,
                seen,
            })
        })?;
        Ok(state)
    }

    /// The meter's figure over the tenant's events that happened in `[from_ms, to_ms)`,
    /// computed by PostgreSQL from the usage log itself: what hard limits are checked against
    /// when several replicas record usage. `None` on SQLite (one process: its counters are
    /// exact) and when there is no usage.
    pub async fn period_figure(
        &self,
        tenant_id: &str,
        meter: &str,
        aggregation: crate::catalog::Aggregation,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        use crate::catalog::Aggregation;
        let super::Db::Postgres(pool) = self.db else {
            return Ok(None);
        };
        let sql = match aggregation {
            Aggregation::Sum => "SELECT SUM(quantity::numeric)::text",
            Aggregation::Count => "SELECT CASE WHEN COUNT(*) = 0 THEN NULL ELSE COUNT(*)::text END",
            Aggregation::Max => "SELECT MAX(quantity::numeric)::text",
            Aggregation::UniqueCount => {
                "SELECT CASE WHEN COUNT(*) = 0 THEN NULL ELSE COUNT(DISTINCT unique_value)::text END"
            }
            Aggregation::Last => {
                "SELECT (ARRAY_AGG(quantity ORDER BY occurred_at DESC, event_id DESC))[1]"
            }
        };
        let sql = format!(
            "{sql} FROM usage_events WHERE tenant_id = $1 AND meter = $2 \
             AND occurred_at >= $3 AND occurred_at < $4"
        );
        let (figure,): (Option<String>,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant_id)
            .bind(meter)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_one(pool)
            .await?;
        Ok(figure)
    }

    /// Events received in `[from_ms, to_ms)`, oldest first (for snapshots and start-up).
    pub async fn received_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, UsageRow>(concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage_events WHERE received_at >= $1 AND received_at < $2 ORDER BY received_at"
            ))
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// A tenant's events of one meter that happened in `[from_ms, to_ms)`, with the status of
    /// the push that carried each (NULL: not pushed).
    pub async fn of_tenant(
        &self,
        tenant_id: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(UsageRow, Option<String>)>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, UsageWith>(
                "SELECT e.tenant_id, e.event_id, e.meter, e.quantity, e.occurred_at, e.unique_value, e.properties, \
                 e.received_at, e.push_id, p.status AS extra FROM usage_events e \
                 LEFT JOIN usage_pushes p ON p.push_id = e.push_id \
                 WHERE e.tenant_id = $1 AND e.meter = $2 AND e.occurred_at >= $3 AND e.occurred_at < $4 \
                 ORDER BY e.occurred_at",
            )
            .bind(tenant_id)
            .bind(meter)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().map(|w| (w.row, w.extra)).collect())
    }

    /// Unpushed events of pushable meters whose tenant has a Stripe customer, oldest first,
    /// with that customer.
    pub async fn unpushed(
        &self,
        meters: &[String],
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
            // Tenant by tenant: a pass that plans in chunks splits at most one tenant's
            // events between two chunks, so chunks add no meter events.
            query.push(") ORDER BY e.tenant_id, e.meter, e.received_at LIMIT ");
            query.push_bind(i64::from(limit));
            query.build_query_as::<UsageWith>().fetch_all(pool).await
        })?;
        Ok(rows
            .into_iter()
            .map(|w| (w.row, w.extra.unwrap_or_default()))
            .collect())
    }

    /// Records pushes and ties their events to them, in one transaction: from here on each push
    /// is sent with its fixed identifier until Stripe has it.
    pub async fn plan_pushes(
        &self,
        pushes: &[(PushRow, Vec<(String, String)>)],
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for (push, events) in pushes {
                sqlx::query(concat!(
                    "INSERT INTO usage_pushes (",
                    push_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                     ON CONFLICT (push_id) DO NOTHING"
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
                .execute(&mut *tx)
                .await?;
                // A push carries one tenant's events: tie them to it by id, a chunk at a time.
                for chunk in events.chunks(CHUNK) {
                    let mut update = sqlx::QueryBuilder::new("UPDATE usage_events SET push_id = ");
                    update.push_bind(&push.push_id);
                    update.push(" WHERE push_id IS NULL AND tenant_id = ");
                    update.push_bind(&push.tenant_id);
                    update.push(" AND event_id IN (");
                    let mut ids = update.separated(", ");
                    for (_, event_id) in chunk {
                        ids.push_bind(event_id);
                    }
                    update.push(")");
                    update.build().execute(&mut *tx).await?;
                }
            }
            tx.commit().await
        })?;
        Ok(())
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

    /// Backlog figures: unpushed events of the given meters and the oldest one's receipt time.
    pub async fn backlog(&self, meters: &[String]) -> Result<(i64, Option<i64>), StoreError> {
        if meters.is_empty() {
            return Ok((0, None));
        }
        let row = on_pool!(self.db, |pool| {
            let mut query = sqlx::QueryBuilder::new(
                "SELECT COUNT(*), MIN(received_at) FROM usage_events WHERE push_id IS NULL AND meter IN (",
            );
            let mut list = query.separated(", ");
            for meter in meters {
                list.push_bind(meter);
            }
            query.push(")");
            query
                .build_query_as::<(i64, Option<i64>)>()
                .fetch_one(pool)
                .await
        })?;
        Ok(row)
    }

    /// The snapshot: every stored bucket, and the receipt time it covers events up to.
    pub async fn snapshot(&self) -> Result<Vec<(String, String, i64, String)>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String, String, i64, String)>(
                "SELECT tenant_id, meter, hour, state FROM usage_buckets",
            )
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Replaces snapshot buckets and moves the watermark, in one transaction.
    pub async fn save_snapshot(
        &self,
        buckets: &[(String, String, i64, String)],
        watermark: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for (tenant, meter, hour, state) in buckets {
                sqlx::query(
                    "INSERT INTO usage_buckets (tenant_id, meter, hour, state) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (tenant_id, meter, hour) DO UPDATE SET state = excluded.state",
                )
                .bind(tenant)
                .bind(meter)
                .bind(hour)
                .bind(state)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO sync_state (name, value, updated_at) VALUES ('usage.snapshot_until', $1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )
            .bind(watermark.to_string())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })?;
        Ok(())
    }

    /// One snapshot bucket's stored state.
    pub async fn bucket(
        &self,
        tenant_id: &str,
        meter: &str,
        hour: i64,
    ) -> Result<Option<String>, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String,)>(
                "SELECT state FROM usage_buckets WHERE tenant_id = $1 AND meter = $2 AND hour = $3",
            )
            .bind(tenant_id)
            .bind(meter)
            .bind(hour)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.map(|(s,)| s))
    }

    /// Whether the tenant already has a usage event with this id.
    pub async fn exists(&self, tenant_id: &str, event_id: &str) -> Result<bool, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (i64,)>(
                "SELECT COUNT(*) FROM usage_events WHERE tenant_id = $1 AND event_id = $2",
            )
            .bind(tenant_id)
            .bind(event_id)
            .fetch_one(pool)
            .await
        })?;
        Ok(row.0 > 0)
    }

    /// Calls `each` with every usage event that occurred in `[from_ms, to_ms)`, of one tenant
    /// or all, streamed (in no particular order) rather than loaded at once.
    pub async fn each_between(
        &self,
        from_ms: i64,
        to_ms: i64,
        tenant: Option<&str>,
        mut each: impl FnMut(UsageRow),
    ) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        on_pool!(self.db, |pool| {
            let mut rows = sqlx::query_as::<_, UsageRow>(concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage_events WHERE occurred_at >= $1 AND occurred_at < $2 \
                 AND ($3 IS NULL OR tenant_id = $3)"
            ))
            .bind(from_ms)
            .bind(to_ms)
            .bind(tenant)
            .fetch(pool);
            while let Some(fact) = rows.try_next().await? {
                each(fact);
            }
            Ok::<_, sqlx::Error>(())
        })?;
        Ok(())
    }

    /// Pushes of windows starting in `[from_ms, to_ms)`, and every push an event of that window
    /// names (a late push of a period-value meter starts in an earlier window).
    pub async fn pushes_between(
        &self,
        from_ms: i64,
        to_ms: i64,
        tenant: Option<&str>,
    ) -> Result<Vec<PushRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, PushRow>(concat!(
                "SELECT ",
                push_columns!(),
                " FROM usage_pushes WHERE window_start >= $1 AND window_start < $2 \
                 AND ($3 IS NULL OR tenant_id = $3) ORDER BY tenant_id, meter, window_start, push_id"
            ))
            .bind(from_ms)
            .bind(to_ms)
            .bind(tenant)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }
}

/// What [`Usage::counter_state`] read.
pub struct CounterState {
    pub buckets: Vec<(String, String, i64, String)>,
    pub rows: Vec<UsageRow>,
    /// PostgreSQL: the transactions the read saw.
    pub seen: Option<TxSnapshot>,
}

/// A PostgreSQL transaction snapshot (`xmin:xmax:xip,...`): which transactions had committed
/// when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxSnapshot {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl TxSnapshot {
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Self {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether the committed transaction `xid` was visible to the snapshot.
    pub fn saw(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

#[cfg(test)]
mod tests {
    use super::TxSnapshot;

    #[test]
    fn a_snapshot_sees_what_committed_before_it() {
        let snapshot = TxSnapshot::parse("100:105:101,103").unwrap();
        assert!(snapshot.saw(99));
        assert!(snapshot.saw(100));
        assert!(!snapshot.saw(101));
        assert!(snapshot.saw(102));
        assert!(!snapshot.saw(103));
        assert!(!snapshot.saw(105));
        assert!(!snapshot.saw(200));
        assert_eq!(
            TxSnapshot::parse("7:7:").unwrap().in_progress,
            Vec::<u64>::new()
        );
        assert!(TxSnapshot::parse("x").is_none());
    }
}
