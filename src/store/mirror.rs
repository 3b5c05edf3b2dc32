//! The mirror: the vendor's current state, one row per object (written by `apply.rs`), and the
//! sync workers' named values (`SyncState`).

use super::periods::upsert_periods;
use super::{Db, StoreError, on_pool};
use crate::domain::BillingPeriod;

/// A vendor object's state, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectState {
    pub object_type: String,
    pub object_id: String,
    pub customer_id: Option<String>,
    pub status: Option<String>,
    /// The vendor's `created`, Unix seconds.
    pub created: Option<i64>,
    /// Orders states of one object: when the state was observed, Unix ms (see
    /// `sync::applier::copy_version` and `sync::observe`). A state replaces the stored one
    /// only if its version is at least as high.
    pub version: i64,
    pub deleted: bool,
    pub payload: String,
    /// The billing periods the state names (kept in `billing_periods` when it is applied).
    pub periods: Vec<BillingPeriod>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MirrorRow {
    pub object_type: String,
    pub object_id: String,
    pub customer_id: Option<String>,
    pub status: Option<String>,
    pub created: Option<i64>,
    pub version: i64,
    pub deleted: bool,
    pub payload: String,
    pub synced_at: i64,
}

macro_rules! columns {
    () => {
        "object_type, object_id, customer_id, status, created, version, deleted, payload, synced_at"
    };
}

pub struct Mirror<'a> {
    pub(super) db: &'a Db,
}

impl<'a> Mirror<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    pub async fn get(
        &self,
        object_type: &str,
        object_id: &str,
    ) -> Result<Option<MirrorRow>, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, MirrorRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM mirror_objects WHERE object_type = $1 AND object_id = $2"
            ))
            .bind(object_type)
            .bind(object_id)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row)
    }

    /// A customer's objects of one type that still exist, newest first.
    pub async fn of_customer(
        &self,
        customer_id: &str,
        object_type: &str,
    ) -> Result<Vec<MirrorRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, MirrorRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM mirror_objects WHERE customer_id = $1 AND object_type = $2 AND deleted = FALSE \
                 ORDER BY created DESC, object_id DESC"
            ))
            .bind(customer_id)
            .bind(object_type)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// A page of a customer's invoices (`kinds` = invoice) or payments, newest first, before the
    /// `(created, object_id)` cursor.
    pub async fn page_of_customer(
        &self,
        customer_id: &str,
        kinds: PageKinds,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<MirrorRow>, StoreError> {
        let (created, id) = before.unwrap_or((i64::MAX, String::new()));
        let rows = on_pool!(self.db, |pool| {
            let query = match kinds {
                PageKinds::Invoices => sqlx::query_as::<_, MirrorRow>(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM mirror_objects WHERE customer_id = $1 AND object_type = 'invoice' AND deleted = FALSE \
                     AND (created < $2 OR (created = $2 AND object_id < $3)) \
                     ORDER BY created DESC, object_id DESC LIMIT $4"
                )),
                PageKinds::Payments => sqlx::query_as::<_, MirrorRow>(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM mirror_objects WHERE customer_id = $1 AND deleted = FALSE \
                     AND object_type IN ('payment_intent', 'charge', 'credit_note') \
                     AND (created < $2 OR (created = $2 AND object_id < $3)) \
                     ORDER BY created DESC, object_id DESC LIMIT $4"
                )),
            };
            query
                .bind(customer_id)
                .bind(created)
                .bind(id)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }

    /// Every live (not deleted) object of a kind; for small kinds such as prices.
    pub async fn of_type(&self, object_type: &str) -> Result<Vec<MirrorRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, MirrorRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM mirror_objects WHERE object_type = $1 AND deleted = FALSE ORDER BY object_id"
            ))
            .bind(object_type)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Calls `each` with every mirrored object of the kinds named (not deleted), of one customer
    /// or all, streamed rather than loaded at once.
    pub async fn each(
        &self,
        kinds: &[&str],
        customer: Option<&str>,
        mut each: impl FnMut(MirrorRow),
    ) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        on_pool!(self.db, |pool| {
            let mut query = sqlx::QueryBuilder::new(concat!(
                "SELECT ",
                columns!(),
                " FROM mirror_objects WHERE deleted = FALSE"
            ));
            if let Some(customer) = customer {
                query.push(" AND customer_id = ");
                query.push_bind(customer);
            }
            query.push(" AND object_type IN (");
            let mut list = query.separated(", ");
            for kind in kinds {
                list.push_bind(*kind);
            }
            query.push(") ORDER BY object_type, object_id");
            let mut rows = query.build_query_as::<MirrorRow>().fetch(pool);
            while let Some(row) = rows.try_next().await? {
                each(row);
            }
            Ok::<_, sqlx::Error>(())
        })?;
        Ok(())
    }

    /// Mirrored objects of the kinds named, created (vendor time, seconds) from `from_s` on,
    /// of one customer or all.
    pub async fn created_since(
        &self,
        kinds: &[&str],
        from_s: i64,
        customer: Option<&str>,
    ) -> Result<Vec<MirrorRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            let mut query = sqlx::QueryBuilder::new(concat!(
                "SELECT ",
                columns!(),
                " FROM mirror_objects WHERE deleted = FALSE AND created >= "
            ));
            query.push_bind(from_s);
            if let Some(customer) = customer {
                query.push(" AND customer_id = ");
                query.push_bind(customer);
            }
            query.push(" AND object_type IN (");
            let mut list = query.separated(", ");
            for kind in kinds {
                list.push_bind(*kind);
            }
            query.push(") ORDER BY object_type, object_id");
            query.build_query_as::<MirrorRow>().fetch_all(pool).await
        })?;
        Ok(rows)
    }

    /// A page of every mirror row in key order (for replay's comparison).
    pub async fn all_after(
        &self,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<Vec<MirrorRow>, StoreError> {
        let (object_type, object_id) = after.unwrap_or_default();
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, MirrorRow>(concat!(
                "SELECT ",
                columns!(),
                " FROM mirror_objects WHERE object_type > $1 OR (object_type = $1 AND object_id > $2) \
                 ORDER BY object_type, object_id LIMIT $3"
            ))
            .bind(object_type)
            .bind(object_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Replaces one row outright (replay's repair), whatever its version.
    pub async fn overwrite(&self, state: &ObjectState, now_ms: i64) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            upsert_periods!(&mut *tx, state);
            sqlx::query(
                "INSERT INTO mirror_objects (object_type, object_id, customer_id, status, created, version, deleted, \
                 payload, synced_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (object_type, object_id) DO UPDATE SET customer_id = excluded.customer_id, \
                 status = excluded.status, created = excluded.created, version = excluded.version, \
                 deleted = excluded.deleted, payload = excluded.payload, synced_at = excluded.synced_at",
            )
            .bind(&state.object_type)
            .bind(&state.object_id)
            .bind(&state.customer_id)
            .bind(&state.status)
            .bind(state.created)
            .bind(state.version)
            .bind(state.deleted)
            .bind(&state.payload)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })?;
        Ok(())
    }
}

/// Which objects a customer page lists.
#[derive(Debug, Clone, Copy)]
pub enum PageKinds {
    Invoices,
    /// Payment intents, charges and credit notes.
    Payments,
}

/// Cursors, checkpoints and last-run times.
pub struct SyncState<'a> {
    db: &'a Db,
}

impl<'a> SyncState<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    pub async fn get(&self, name: &str) -> Result<Option<String>, StoreError> {
        let value = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String,)>("SELECT value FROM sync_state WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await
        })?;
        Ok(value.map(|(v,)| v))
    }

    pub async fn set(&self, name: &str, value: &str, now_ms: i64) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(
                "INSERT INTO sync_state (name, value, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )
            .bind(name)
            .bind(value)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    pub async fn remove(&self, name: &str) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query("DELETE FROM sync_state WHERE name = $1")
                .bind(name)
                .execute(pool)
                .await
                .map(drop)
        })?;
        Ok(())
    }
}
