//! The usage log: usage events stored once, and figures over them.

pub use super::distinct::DistinctDelta;
use super::{Db, StoreError, on_pool};
use crate::credits::book::CreditBook;

/// A validated usage event, ready to store.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
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

/// The SQL computing a meter's figure over the rows of a `FROM usage_events WHERE ...` that
/// follows it (PostgreSQL). `last` breaks ties on time by the greater event id, byte by byte
/// as the counters do, whatever the database's collation.
pub(super) fn figure_select(aggregation: crate::catalog::Aggregation) -> &'static str {
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

/// A usage row and one more column (a push's status, a customer id).
#[derive(sqlx::FromRow)]
pub(super) struct UsageWith {
    #[sqlx(flatten)]
    pub(super) row: UsageRow,
    pub(super) extra: Option<String>,
}

macro_rules! usage_columns {
    () => {
        "tenant_id, event_id, meter, quantity, occurred_at, unique_value, properties, received_at, push_id"
    };
}

/// Makes the `billsync_usage` notification payloads of new rows and their distinct deltas.
pub type Payloads<'a> = dyn Fn(&[&UsageRow], &[DistinctDelta]) -> Vec<String> + Sync + 'a;

/// What storing usage rows did: whether each was new, and the changes to the counters'
/// distinct counts.
#[derive(Debug, Default)]
pub struct Inserted {
    pub new: Vec<bool>,
    pub distinct: Vec<DistinctDelta>,
}

/// Rows per INSERT statement (well inside both backends' bind-parameter limits).
pub(super) const CHUNK: usize = 500;

/// Sends, on a PostgreSQL transaction `$tx`, the `billsync_usage` notifications `$payloads`
/// makes of `$stored` (new rows) and `$distinct` (their distinct values' deltas), each prefixed
/// with the transaction's id.
macro_rules! notify_usage {
    ($tx:expr, $stored:expr, $distinct:expr, $payloads:expr) => {{
        let tx = $tx;
        let stored: &[&UsageRow] = $stored;
        let payloads = $payloads(stored, $distinct);
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

/// Inserts usage rows not stored before on a transaction `$tx`, adds those of credit-priced
/// meters to the running credit totals as `$credits` says ([`CreditWrite`]), adds their
/// distinct values (`usage_distinct`) and, when `$notify`, sends the `billsync_usage`
/// notifications `$payloads` makes of the new ones (PostgreSQL, which also locks the distinct values); evaluates to an
/// [`Inserted`].
macro_rules! insert_usage {
    ($tx:expr, $rows:expr, $payloads:expr, $notify:expr, $credits:expr) => {{
        use $crate::store::credit_totals::KeepTotals as _;
        let (rows, payloads, notify): (&[UsageRow], &Payloads<'_>, bool) =
            ($rows, $payloads, $notify);
        let credits: $crate::store::CreditWrite<'_> = $credits;
        let tx = $tx;
        if !credits.locked {
            let tenants: Vec<&str> = (rows.iter())
                .filter(|r| credits.keeps(&r.meter))
                .map(|r| r.tenant_id.as_str())
                .collect();
            tx.lock_for_totals(&tenants).await?;
        }
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
        let stored: Vec<&UsageRow> = rows
            .iter()
            .zip(&new)
            .filter_map(|(row, new)| new.then_some(row))
            .collect();
        let kept: Vec<&UsageRow> = (stored.iter().copied())
            .filter(|r| credits.keeps(&r.meter))
            .collect();
        tx.add_to_totals(&kept).await?;
        if let Some(book) = credits.book.filter(|_| credits.alarms && !kept.is_empty()) {
            $crate::store::credit_totals::usage_alarms!(&mut *tx, book, &kept);
        }
        let distinct = $crate::store::distinct::insert_distinct!(&mut *tx, &stored, notify);
        if notify && !stored.is_empty() {
            notify_usage!(&mut *tx, &stored, &distinct, payloads);
        }
        Inserted { new, distinct }
    }};
}

pub struct Usage<'a> {
    pub(super) db: &'a Db,
    book: Option<&'a CreditBook>,
}

/// What a usage write does for the running credit totals (`store::credit_totals`).
#[derive(Debug, Clone, Copy, Default)]
pub struct CreditWrite<'a> {
    /// The catalog's credit-priced meters; `None`: every row is kept as if its meter were one
    /// (always right, never faster).
    pub book: Option<&'a CreditBook>,
    /// The caller holds the rows' tenants' credit locks already (check-and-record's batch).
    pub locked: bool,
    /// Whether the write sees low-balance crossings itself (a plain write; a check-and-record
    /// judges its own burn and passes its change).
    pub alarms: bool,
}

impl CreditWrite<'_> {
    /// Whether rows of `meter` go into the running totals.
    pub fn keeps(&self, meter: &str) -> bool {
        self.book.is_none_or(|b| b.burns(meter))
    }
}

impl<'a> Usage<'a> {
    /// The tenants with usage received (stored) at or after `received_ms`.
    pub async fn tenants_since(&self, received_ms: i64) -> Result<Vec<String>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String,)>(
                "SELECT DISTINCT tenant_id FROM usage_events WHERE received_at >= $1",
            )
            .bind(received_ms)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    pub(super) fn new(db: &'a Db) -> Self {
        Self { db, book: None }
    }

    /// Writes that keep the running totals of `book`'s credit-priced meters only (without it,
    /// of every meter).
    pub fn keeping(self, book: &'a CreditBook) -> Self {
        Self {
            book: Some(book),
            ..self
        }
    }

    pub(super) fn credit_write(&self) -> CreditWrite<'a> {
        CreditWrite {
            book: self.book,
            locked: false,
            alarms: true,
        }
    }

    /// Stores the events not stored before, all in one transaction; returns, for each event,
    /// whether it was new (and the distinct counts' changes). The call returns only once they
    /// are durable.
    pub async fn insert(&self, rows: &[UsageRow]) -> Result<Inserted, StoreError> {
        self.insert_notifying(rows, &|_, _| Vec::new()).await
    }

    /// [`Self::insert`], and on PostgreSQL a `billsync_usage` notification for each payload
    /// `payloads` makes of the new rows, sent in the same transaction: other replicas hear of
    /// exactly the usage that was committed (payloads are prefixed with the transaction id).
    pub async fn insert_notifying(
        &self,
        rows: &[UsageRow],
        payloads: &Payloads<'_>,
    ) -> Result<Inserted, StoreError> {
        let notify = self.db.backend() == super::Backend::Postgres;
        let inserted = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let inserted = insert_usage!(&mut *tx, rows, payloads, notify, self.credit_write());
            tx.commit().await?;
            Ok::<_, sqlx::Error>(inserted)
        })?;
        Ok(inserted)
    }

    /// Stores one usage row and, when it is new, the balance change it makes
    /// ([`crate::topup`]), in one transaction; as [`Self::insert`], whether the row was new.
    pub async fn insert_burning(
        &self,
        row: &UsageRow,
        change: Option<&crate::topup::BalanceChange<'_>>,
    ) -> Result<Inserted, StoreError> {
        let notify = self.db.backend() == super::Backend::Postgres;
        let inserted = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let rows = std::slice::from_ref(row);
            let credits = CreditWrite {
                alarms: false,
                ..self.credit_write()
            };
            let inserted = insert_usage!(&mut *tx, rows, &|_, _| Vec::new(), notify, credits);
            if inserted.new[0]
                && let Some(change) = change
            {
                super::balance_changed!(&mut *tx, change, super::now_ms());
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(inserted)
        })?;
        Ok(inserted)
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

    /// A page of a tenant's events of one meter that happened in `[from_ms, to_ms)`, with the
    /// status of the push that carried each (NULL: not pushed), in (time, event id) order
    /// strictly after `after`; at most `limit` rows, so a year of usage is read a page at a time.
    pub async fn page_of_tenant(
        &self,
        (tenant_id, meter): (&str, &str),
        (from_ms, to_ms): (i64, i64),
        after: Option<&(i64, String)>,
        limit: u32,
    ) -> Result<Vec<(UsageRow, Option<String>)>, StoreError> {
        // Without a cursor, start before any event id at the window's first millisecond.
        let (after_at, after_id) = after.map_or((from_ms - 1, ""), |(at, id)| (*at, id.as_str()));
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, UsageWith>(
                "SELECT e.tenant_id, e.event_id, e.meter, e.quantity, e.occurred_at, e.unique_value, e.properties, \
                 e.received_at, e.push_id, p.status AS extra FROM usage_events e \
                 LEFT JOIN usage_pushes p ON p.push_id = e.push_id \
                 WHERE e.tenant_id = $1 AND e.meter = $2 AND e.occurred_at >= $3 AND e.occurred_at < $4 \
                 AND (e.occurred_at > $5 OR (e.occurred_at = $5 AND e.event_id > $6)) \
                 ORDER BY e.occurred_at, e.event_id LIMIT $7",
            )
            .bind(tenant_id)
            .bind(meter)
            .bind(from_ms)
            .bind(to_ms)
            .bind(after_at)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().map(|w| (w.row, w.extra)).collect())
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
        // Two statements, not `($3 IS NULL OR tenant_id = $3)`, which SQLite cannot answer
        // from the tenant's index.
        let sql = match tenant {
            Some(_) => concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage_events WHERE tenant_id = $3 AND occurred_at >= $1 AND occurred_at < $2"
            ),
            None => concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage_events WHERE occurred_at >= $1 AND occurred_at < $2 AND $3 IS NULL"
            ),
        };
        on_pool!(self.db, |pool| {
            let mut rows = sqlx::query_as::<_, UsageRow>(sql)
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
}

pub(super) use {insert_usage, notify_usage, usage_columns};
