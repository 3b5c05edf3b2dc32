//! The usage log, the push ledger, and the snapshot of the usage counters.

use super::{Db, StoreError, on_pool};
use crate::domain::Ceiling;

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
    /// The billing period whose usage it carries, `[start, end)` in Unix ms (`None` for pushes
    /// planned before periods were kept).
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
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

/// The SQL computing a meter's figure over the rows of a `FROM usage_events WHERE ...` that
/// follows it (PostgreSQL). `last` breaks ties on time by the greater event id, byte by byte
/// as the counters do, whatever the database's collation.
fn figure_select(aggregation: crate::catalog::Aggregation) -> &'static str {
    use crate::catalog::Aggregation;
    match aggregation {
        Aggregation::Sum => "SELECT SUM(quantity::numeric)::text",
        Aggregation::Count => "SELECT CASE WHEN COUNT(*) = 0 THEN NULL ELSE COUNT(*)::text END",
        Aggregation::Max => "SELECT MAX(quantity::numeric)::text",
        Aggregation::UniqueCount => {
            "SELECT CASE WHEN COUNT(*) = 0 THEN NULL ELSE COUNT(DISTINCT unique_value)::text END"
        }
        Aggregation::Last => {
            "SELECT (ARRAY_AGG(quantity ORDER BY occurred_at DESC, event_id COLLATE \"C\" DESC))[1]"
        }
    }
}

/// The figure after a check's record, when it follows from the figure before (sums, counts,
/// maxima); `None` when it must be read again.
fn after_of(check: &RecordCheck, before: Option<&str>) -> Option<String> {
    use crate::catalog::Aggregation;
    use rust_decimal::Decimal;
    use std::str::FromStr;
    let before = before.map_or(Ok(Decimal::ZERO), Decimal::from_str).ok()?;
    let quantity = Decimal::from_str(&check.row.quantity).ok()?;
    let after = match check.aggregation {
        Aggregation::Sum => before.checked_add(quantity)?,
        Aggregation::Count => before + Decimal::ONE,
        Aggregation::Max if before.is_zero() && quantity.is_sign_negative() => return None,
        Aggregation::Max => before.max(quantity),
        Aggregation::Last | Aggregation::UniqueCount => return None,
    };
    Some(after.normalize().to_string())
}

/// For each check, whether its event is stored and its meter's figure over its period, read on
/// a transaction in one statement per aggregation.
async fn figures_in(
    tx: &mut sqlx::PgConnection,
    checks: &[RecordCheck],
) -> Result<Vec<(bool, Option<String>)>, sqlx::Error> {
    let mut figures = vec![(false, None); checks.len()];
    let mut aggregations: Vec<crate::catalog::Aggregation> =
        checks.iter().map(|c| c.aggregation).collect();
    aggregations.dedup();
    for aggregation in aggregations {
        let of: Vec<usize> = (0..checks.len())
            .filter(|&i| checks[i].aggregation == aggregation)
            .collect();
        let column = |f: fn(&RecordCheck) -> String| -> Vec<String> {
            of.iter().map(|&i| f(&checks[i])).collect()
        };
        let sql = format!(
            // A scalar subquery, not EXISTS: PostgreSQL may turn EXISTS into a hash of the
            // whole table, built for every batch.
            "SELECT c.n, (SELECT TRUE FROM usage_events e WHERE e.tenant_id = c.tenant \
             AND e.event_id = c.eid) IS NOT NULL, ({} FROM usage_events e WHERE e.tenant_id = c.tenant \
             AND e.meter = c.meter AND e.occurred_at >= c.from_ms AND e.occurred_at < c.to_ms) \
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[]) \
             WITH ORDINALITY AS c (tenant, meter, from_ms, to_ms, eid, n)",
            figure_select(aggregation)
        );
        let found: Vec<(i64, bool, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(column(|c| c.row.tenant_id.clone()))
            .bind(column(|c| c.row.meter.clone()))
            .bind(of.iter().map(|&i| checks[i].period.0).collect::<Vec<_>>())
            .bind(of.iter().map(|&i| checks[i].period.1).collect::<Vec<_>>())
            .bind(column(|c| c.row.event_id.clone()))
            .fetch_all(&mut *tx)
            .await?;
        for (n, existed, figure) in found {
            figures[of[(n - 1) as usize]] = (existed, figure);
        }
    }
    Ok(figures)
}

/// One check-and-record of a [`Usage::record_checked`] batch.
pub struct RecordCheck {
    pub row: UsageRow,
    pub aggregation: crate::catalog::Aggregation,
    pub period: (i64, i64),
    /// The transaction lock of its tenant and meter.
    pub lock_key: i64,
    /// The most the figure may be for the record to be stored.
    pub ceiling: Ceiling,
}

/// What [`Usage::record_checked`] found and did. Figures are exact decimals as text (`None`:
/// no usage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRecord {
    /// The event id was stored before: nothing written.
    pub existed: bool,
    /// The event was stored now.
    pub stored: bool,
    pub before: Option<String>,
    pub after: Option<String>,
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
         status, attempts, last_error, next_attempt_at, created_at, sent_at, period_start, period_end"
    };
}

/// Rows per INSERT statement (well inside both backends' bind-parameter limits).
const CHUNK: usize = 500;

/// Sends, on a PostgreSQL transaction `$tx`, the `billsync_usage` notifications `$payloads`
/// makes of `$stored` (new rows), each prefixed with the transaction's id.
macro_rules! notify_usage {
    ($tx:expr, $stored:expr, $payloads:expr) => {{
        let tx = $tx;
        let stored: &[&UsageRow] = $stored;
        let payloads = $payloads(stored);
        for chunk in payloads.chunks(CHUNK) {
            let mut query = sqlx::QueryBuilder::new(
                "SELECT pg_notify('billsync_usage', pg_current_xact_id()::text || ' ' || p) FROM (",
            );
            query.push_values(chunk, |mut b, payload| {
                b.push_bind(payload);
            });
            query.push(") AS v (p)");
            query.build().execute(&mut *tx).await?;
        }
    }};
}

/// Inserts usage rows not stored before on a transaction `$tx` and, when `$notify`, sends the
/// `billsync_usage` notifications `$payloads` makes of the new ones (PostgreSQL); evaluates to
/// whether each row was new.
macro_rules! insert_usage {
    ($tx:expr, $rows:expr, $payloads:expr, $notify:expr) => {{
        let (rows, payloads, notify): (
            &[UsageRow],
            &(dyn Fn(&[&UsageRow]) -> Vec<String> + Sync),
            bool,
        ) = ($rows, $payloads, $notify);
        let tx = $tx;
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
            let keys: Vec<(String, String)> = query.build_query_as().fetch_all(&mut *tx).await?;
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
            notify_usage!(&mut *tx, &stored, payloads);
        }
        new
    }};
}

pub struct Usage<'a> {
    pub(super) db: &'a Db,
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
            let new = insert_usage!(&mut *tx, rows, payloads, notify);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(new)
        })?;
        Ok(new)
    }

    /// The meter's figure over the tenant's events that happened in `[from_ms, to_ms)`,
    /// computed by PostgreSQL from the usage log itself (`None` without usage). On SQLite, which
    /// keeps quantities as text it cannot add exactly, `Err(Unsupported)`: fold
    /// [`Self::each_of_meter`] instead.
    pub async fn period_figure(
        &self,
        tenant_id: &str,
        meter: &str,
        aggregation: crate::catalog::Aggregation,
        (from_ms, to_ms): (i64, i64),
    ) -> Result<Option<String>, StoreError> {
        let super::Db::Postgres(pool) = self.db else {
            return Err(StoreError::Setup(
                "period figures are computed in SQL on PostgreSQL only".to_owned(),
            ));
        };
        let sql = format!(
            "{} FROM usage_events WHERE tenant_id = $1 AND meter = $2 \
             AND occurred_at >= $3 AND occurred_at < $4",
            figure_select(aggregation)
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

    /// Check-and-records on PostgreSQL, a batch in one transaction on one pooled connection,
    /// in a handful of statements whatever its size: takes every check's transaction lock (one
    /// per tenant and meter, across replicas; in key order, so that two batches never wait on
    /// each other in a cycle), reads whether each event is stored and each meter's figure,
    /// stores the rows their `allow` lets through, notifies the other replicas of them, and
    /// reads the figures after. The checks' lock keys must differ (a batch holds one check
    /// per tenant and meter). One commit for the batch: a transaction that notifies commits
    /// alone database-wide, so a commit per record would bound every replica's records by one
    /// commit's latency.
    pub async fn record_checked(
        &self,
        checks: &[RecordCheck],
        payloads: &(dyn Fn(&[&UsageRow]) -> Vec<String> + Sync),
    ) -> Result<Vec<CheckedRecord>, StoreError> {
        let super::Db::Postgres(pool) = self.db else {
            return Err(StoreError::Setup(
                "check-and-record in one transaction is for PostgreSQL".to_owned(),
            ));
        };
        let mut tx = pool.begin().await?;
        let mut keys: Vec<i64> = checks.iter().map(|c| c.lock_key).collect();
        keys.sort_unstable();
        sqlx::query(
            "SELECT pg_advisory_xact_lock(k) FROM (SELECT unnest($1::bigint[]) AS k ORDER BY 1) AS keys",
        )
        .bind(&keys)
        .execute(&mut *tx)
        .await?;
        let before = figures_in(&mut tx, checks).await?;
        let allowed: Vec<usize> = (0..checks.len())
            .filter(|&i| {
                let (existed, figure) = &before[i];
                let figure = figure.as_deref().and_then(|f| f.parse().ok());
                !existed && checks[i].ceiling.admits(figure)
            })
            .collect();
        let rows: Vec<UsageRow> = allowed.iter().map(|&i| checks[i].row.clone()).collect();
        let new = insert_usage!(&mut *tx, &rows, payloads, true);
        let stored: Vec<usize> = allowed
            .iter()
            .zip(&new)
            .filter_map(|(&i, new)| new.then_some(i))
            .collect();
        // Sums, counts and maxima after a record follow from before; the others are read again.
        let reread = stored
            .iter()
            .any(|&i| after_of(&checks[i], before[i].1.as_deref()).is_none());
        let after = if reread {
            figures_in(&mut tx, checks).await?
        } else {
            before.clone()
        };
        tx.commit().await?;
        Ok(before
            .into_iter()
            .zip(after)
            .enumerate()
            .map(|(i, ((existed, before), (_, after)))| {
                let stored = stored.contains(&i);
                let after = match after_of(&checks[i], before.as_deref()) {
                    Some(figure) if stored => Some(figure),
                    _ if stored => after,
                    _ => before.clone(),
                };
                CheckedRecord {
                    // Allowed and not new: the same event id came in under another meter.
                    existed: existed || (allowed.contains(&i) && !stored),
                    stored,
                    after,
                    before,
                }
            })
            .collect())
    }

    /// Calls `each` with every event of the tenant's meter that happened in `[from_ms, to_ms)`,
    /// streamed.
    pub async fn each_of_meter(
        &self,
        tenant_id: &str,
        meter: &str,
        (from_ms, to_ms): (i64, i64),
        mut each: impl FnMut(UsageRow),
    ) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        on_pool!(self.db, |pool| {
            let mut rows = sqlx::query_as::<_, UsageRow>(concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage_events WHERE tenant_id = $1 AND meter = $2 \
                 AND occurred_at >= $3 AND occurred_at < $4"
            ))
            .bind(tenant_id)
            .bind(meter)
            .bind(from_ms)
            .bind(to_ms)
            .fetch(pool);
            while let Some(row) = rows.try_next().await? {
                each(row);
            }
            Ok::<_, sqlx::Error>(())
        })?;
        Ok(())
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
                let inserted = sqlx::query(concat!(
                    "INSERT INTO usage_pushes (",
                    push_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
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
                .bind(push.period_start)
                .bind(push.period_end)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                // A push carries one tenant's events: tie them to it by id, a chunk at a time.
                let mut tied = 0;
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
