//! Notifications to the product: each written in the transaction of what causes it, delivered
//! by [`crate::notify`] until the receiver accepts it.

use super::{Db, StoreError, on_pool};

/// A notification to store.
#[derive(Debug, Clone)]
pub struct NewNotification {
    /// What the receiver dedupes on: the same on every delivery.
    pub event_id: String,
    pub tenant_id: String,
    /// The event's `type`.
    pub kind: String,
    /// The JSON body sent.
    pub payload: String,
}

/// A notification as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NotificationRow {
    pub event_id: String,
    pub tenant_id: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub payload: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub last_status: Option<i32>,
    pub created_at: i64,
    pub updated_at: i64,
    pub delivered_at: Option<i64>,
}

macro_rules! columns {
    () => {
        "event_id, tenant_id, type, payload, status, attempts, next_attempt_at, last_error, \
         last_status, created_at, updated_at, delivered_at"
    };
}

/// Inserts a [`NewNotification`], due at once, on any connection or transaction.
macro_rules! insert_notification {
    ($conn:expr, $n:expr, $now_ms:expr) => {{
        let n: &$crate::store::NewNotification = $n;
        sqlx::query(
            "INSERT INTO notifications (event_id, tenant_id, type, payload, status, attempts, \
             next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5, $5)",
        )
        .bind(&n.event_id)
        .bind(&n.tenant_id)
        .bind(&n.kind)
        .bind(&n.payload)
        .bind($now_ms)
        .execute($conn)
    }};
}
pub(crate) use insert_notification;

/// How an attempt at a delivery ended.
#[derive(Debug, Clone)]
pub enum Delivery<'a> {
    /// The receiver answered 2xx.
    Delivered { status: i32 },
    /// Try again at `next_attempt_at`.
    Retry {
        status: Option<i32>,
        error: &'a str,
        next_attempt_at: i64,
    },
    /// Given up.
    Failed { status: Option<i32>, error: &'a str },
}

pub struct Notifications<'a> {
    db: &'a Db,
}

impl<'a> Notifications<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// Stores a notification in a transaction of its own.
    pub async fn insert(&self, n: &NewNotification, now_ms: i64) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| insert_notification!(pool, n, now_ms)
            .await
            .map(drop))?;
        Ok(())
    }

    pub async fn get(&self, event_id: &str) -> Result<Option<NotificationRow>, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, NotificationRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM notifications WHERE event_id = $1"
            ))
            .bind(event_id)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row)
    }

    /// Pending notifications due at `now_ms`, oldest first. One replica delivers (under the
    /// `notify` lease), so no claim is needed.
    pub async fn due(&self, now_ms: i64, limit: u32) -> Result<Vec<NotificationRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, NotificationRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM notifications WHERE status = 'pending' AND next_attempt_at <= $1 \
                 ORDER BY created_at, event_id LIMIT $2"
            ))
            .bind(now_ms)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// The earliest attempt scheduled after `now_ms`.
    pub async fn next_attempt(&self, now_ms: i64) -> Result<Option<i64>, StoreError> {
        let (next,): (Option<i64>,) = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT MIN(next_attempt_at) FROM notifications WHERE status = 'pending' \
                 AND next_attempt_at > $1",
            )
            .bind(now_ms)
            .fetch_one(pool)
            .await
        })?;
        Ok(next)
    }

    /// Records an attempt (counting it) on a still pending notification.
    pub async fn record(
        &self,
        event_id: &str,
        delivery: &Delivery<'_>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (status, http, error, next, delivered_at) = match *delivery {
            Delivery::Delivered { status } => ("delivered", Some(status), None, 0, Some(now_ms)),
            Delivery::Retry {
                status,
                error,
                next_attempt_at,
            } => ("pending", status, Some(error), next_attempt_at, None),
            Delivery::Failed { status, error } => ("failed", status, Some(error), 0, None),
        };
        on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE notifications SET status = $2, attempts = attempts + 1, last_status = $3, \
                 last_error = $4, next_attempt_at = CASE WHEN $2 = 'pending' THEN $5 \
                 ELSE next_attempt_at END, delivered_at = $6, updated_at = $7 \
                 WHERE event_id = $1 AND status = 'pending'",
            )
            .bind(event_id)
            .bind(status)
            .bind(http)
            .bind(error)
            .bind(next)
            .bind(delivered_at)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// A page of notifications, newest first, before `(created_at, event_id)`, optionally of
    /// one tenant and one status.
    pub async fn page(
        &self,
        tenant_id: Option<&str>,
        status: Option<&str>,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<NotificationRow>, StoreError> {
        let (before_at, before_id) = before.unwrap_or((i64::MAX, String::new()));
        // A plain `tenant_id = $1` when one is named: `($1 IS NULL OR ...)` keeps both planners
        // off `notifications_tenant` (SQLite always, PostgreSQL once it plans generically), and
        // they walk every tenant's notifications instead (docs/benchmarks.md, Console).
        let sql = match tenant_id {
            Some(_) => concat!(
                "SELECT ",
                columns!(),
                " FROM notifications WHERE tenant_id = $1"
            ),
            None => concat!(
                "SELECT ",
                columns!(),
                " FROM notifications WHERE $1 IS NULL"
            ),
        };
        let sql = format!(
            "{sql} AND ($2 IS NULL OR status = $2) \
             AND (created_at < $3 OR (created_at = $3 AND ($4 = '' OR event_id < $4))) \
             ORDER BY created_at DESC, event_id DESC LIMIT $5"
        );
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, NotificationRow>(sqlx::AssertSqlSafe(sql))
                .bind(tenant_id)
                .bind(status)
                .bind(before_at)
                .bind(before_id)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }

    /// How many notifications are pending and failed, and since when the oldest pending one.
    pub async fn backlog(&self) -> Result<(i64, i64, Option<i64>), StoreError> {
        let row: (i64, i64, Option<i64>) = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT COALESCE(SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), 0), \
                 MIN(CASE WHEN status = 'pending' THEN created_at END) FROM notifications",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(row)
    }
}
