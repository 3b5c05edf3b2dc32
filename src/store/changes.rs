//! The entitlement change log (`entitlement_changes`), written by database triggers with every
//! change to a tenant's entitlement inputs: the cursor of `GET /v1/entitlements/stream`.

use super::{Db, StoreError, on_pool};

/// One change: its cursor and its tenant (`None`: every tenant).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChangeRow {
    pub seq: i64,
    pub tenant_id: Option<String>,
    pub changed_at: i64,
}

pub struct Changes<'a> {
    db: &'a Db,
}

impl<'a> Changes<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// Up to `limit` changes after `seq`, in order.
    pub async fn after(&self, seq: i64, limit: u32) -> Result<Vec<ChangeRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, ChangeRow>(
                "SELECT seq, tenant_id, changed_at FROM entitlement_changes WHERE seq > $1 \
                 ORDER BY seq LIMIT $2",
            )
            .bind(seq)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// The oldest and the newest change kept: a cursor below the oldest less one has lost
    /// changes to pruning.
    pub async fn bounds(&self) -> Result<(Option<i64>, Option<i64>), StoreError> {
        let bounds = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (Option<i64>, Option<i64>)>(
                "SELECT MIN(seq), MAX(seq) FROM entitlement_changes",
            )
            .fetch_one(pool)
            .await
        })?;
        Ok(bounds)
    }

    /// Forgets the changes made before `before_ms`, but always keeps the newest (the cursor
    /// of an idle stream stays valid). Returns how many were removed.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        let removed = on_pool!(self.db, |pool| {
            sqlx::query(
                "DELETE FROM entitlement_changes WHERE changed_at < $1 \
                 AND seq < (SELECT MAX(seq) FROM entitlement_changes)",
            )
            .bind(before_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })?;
        Ok(removed)
    }
}
