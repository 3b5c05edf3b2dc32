//! The tenants repository.

use crate::domain::{Email, TenantId, TenantName};

use super::commands::insert_command;
use super::{Db, NewCommand, StoreError, on_pool};

/// A tenant as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TenantRecord {
    pub tenant_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub customer_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The outcome of [`Tenants::upsert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upserted {
    Created(TenantRecord),
    Updated(TenantRecord),
}

pub struct Tenants<'a> {
    db: &'a Db,
}

/// The columns of [`TenantRecord`], spliced into literal SQL.
macro_rules! columns {
    () => {
        "tenant_id, name, email, customer_id, created_at, updated_at"
    };
}

impl<'a> Tenants<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    pub async fn get(&self, id: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let record = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, TenantRecord>(concat!(
                "SELECT ",
                columns!(),
                " FROM tenants WHERE tenant_id = $1"
            ))
            .bind(id.as_str())
            .fetch_optional(pool)
            .await
        })?;
        Ok(record)
    }

    /// Creates the tenant or replaces its name and email, in one transaction.
    /// `updated_at` moves only when something changed. `sync`, the command that carries the
    /// tenant to the vendor's customer, is stored in the same transaction when the tenant is new
    /// or changed, or has no customer and no such command pending.
    pub async fn upsert(
        &self,
        id: &TenantId,
        name: Option<&TenantName>,
        email: Option<&Email>,
        now_ms: i64,
        sync: Option<&NewCommand>,
    ) -> Result<Upserted, StoreError> {
        let name = name.map(TenantName::as_str);
        let email = email.map(Email::as_str);
        let upserted = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let created = sqlx::query_as::<_, TenantRecord>(concat!(
                "INSERT INTO tenants (",
                columns!(),
                ") VALUES ($1, $2, $3, NULL, $4, $4) ON CONFLICT (tenant_id) DO NOTHING RETURNING ",
                columns!()
            ))
            .bind(id.as_str())
            .bind(name)
            .bind(email)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let before = match &created {
                Some(_) => None,
                None => Some(
                    sqlx::query_as::<_, (Option<String>, Option<String>)>(
                        "SELECT name, email FROM tenants WHERE tenant_id = $1",
                    )
                    .bind(id.as_str())
                    .fetch_one(&mut *tx)
                    .await?,
                ),
            };
            let upserted = match created {
                Some(record) => Upserted::Created(record),
                None => Upserted::Updated(
                    sqlx::query_as::<_, TenantRecord>(concat!(
                        "UPDATE tenants SET name = $2, email = $3, updated_at = CASE \
                         WHEN name IS DISTINCT FROM $2 OR email IS DISTINCT FROM $3 THEN $4 \
                         ELSE updated_at END WHERE tenant_id = $1 RETURNING ",
                        columns!()
                    ))
                    .bind(id.as_str())
                    .bind(name)
                    .bind(email)
                    .bind(now_ms)
                    .fetch_one(&mut *tx)
                    .await?,
                ),
            };
            if let Some(command) = sync {
                let changed =
                    before.is_none_or(|(n, e)| n.as_deref() != name || e.as_deref() != email);
                let unlinked = match &upserted {
                    Upserted::Created(r) | Upserted::Updated(r) => r.customer_id.is_none(),
                };
                let waiting: (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM commands WHERE tenant_id = $1 AND kind = $2 \
                     AND status = 'pending'",
                )
                .bind(id.as_str())
                .bind(&command.kind)
                .fetch_one(&mut *tx)
                .await?;
                if changed || (unlinked && waiting.0 == 0) {
                    insert_command!(&mut *tx, id.as_str(), command, now_ms).await?;
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(upserted)
        })?;
        Ok(upserted)
    }

    /// Every tenant linked to a customer (or only `only`), as (tenant, customer), in tenant
    /// order.
    pub async fn linked(&self, only: Option<&str>) -> Result<Vec<(String, String)>, StoreError> {
        // Two statements: SQLite answers `tenant_id = $1` from the key, not `($1 IS NULL OR
        // tenant_id = $1)`.
        let sql = match only {
            Some(_) => {
                "SELECT tenant_id, customer_id FROM tenants WHERE tenant_id = $1 \
                 AND customer_id IS NOT NULL"
            }
            None => {
                "SELECT tenant_id, customer_id FROM tenants WHERE customer_id IS NOT NULL \
                 AND $1 IS NULL ORDER BY tenant_id"
            }
        };
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String, String)>(sql)
                .bind(only)
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }

    /// Up to `limit` tenant ids after `after`, in order.
    pub async fn ids_after(&self, after: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String,)>(
                "SELECT tenant_id FROM tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2",
            )
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    /// The known tenants (linked to a customer) the drift sweep should visit next, as
    /// `(tenant_id, customer_id)`: up to `active` whose customer's mirrored objects changed
    /// since their last visit (oldest visit first), then the least recently visited (never
    /// visited first), `limit` in all.
    pub async fn sweep_due(
        &self,
        active: u32,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let active_rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String, String)>(
                "SELECT tenant_id, customer_id FROM tenants t WHERE customer_id IS NOT NULL \
                 AND EXISTS (SELECT 1 FROM mirror_objects m WHERE m.customer_id = t.customer_id \
                 AND m.synced_at > COALESCE(t.swept_at, 0)) \
                 ORDER BY COALESCE(swept_at, 0), tenant_id LIMIT $1",
            )
            .bind(i64::from(active.min(limit)))
            .fetch_all(pool)
            .await
        })?;
        let oldest = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (String, String)>(
                "SELECT tenant_id, customer_id FROM tenants WHERE customer_id IS NOT NULL \
                 ORDER BY COALESCE(swept_at, 0), tenant_id LIMIT $1",
            )
            .bind(i64::from(limit) + active_rows.len() as i64)
            .fetch_all(pool)
            .await
        })?;
        let mut due = active_rows;
        for row in oldest {
            if due.len() >= limit as usize {
                break;
            }
            if !due.iter().any(|(t, _)| *t == row.0) {
                due.push(row);
            }
        }
        Ok(due)
    }

    /// Records that the sweep visited these tenants at `at` (Unix ms).
    pub async fn mark_swept(&self, tenant_ids: &[String], at: i64) -> Result<(), StoreError> {
        for chunk in tenant_ids.chunks(500) {
            let marks = (2..chunk.len() + 2)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!("UPDATE tenants SET swept_at = $1 WHERE tenant_id IN ({marks})");
            on_pool!(self.db, |pool| {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(at);
                for id in chunk {
                    query = query.bind(id);
                }
                query.execute(pool).await.map(|_| ())
            })?;
        }
        Ok(())
    }

    /// How many tenants are linked to a customer, how many of them the sweep never visited,
    /// and the oldest visit among the others (Unix ms).
    pub async fn sweep_coverage(&self) -> Result<(i64, i64, Option<i64>), StoreError> {
        Ok(on_pool!(self.db, |pool| {
            sqlx::query_as::<_, (i64, i64, Option<i64>)>(
                "SELECT COUNT(*), COUNT(*) - COUNT(swept_at), MIN(swept_at) FROM tenants \
                 WHERE customer_id IS NOT NULL",
            )
            .fetch_one(pool)
            .await
        })?)
    }

    /// Tenants whose id or customer id starts with `q`, or whose name or email does ignoring
    /// ASCII case, after the tenant id `after`, in tenant id order (byte order on both
    /// backends); every tenant when `q` is empty. Each match is a range over an index.
    pub async fn search(
        &self,
        q: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        let c = match self.db {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => " COLLATE \"C\"",
        };
        if q.is_empty() {
            let sql = format!(
                "SELECT {} FROM tenants WHERE tenant_id{c} > $1 ORDER BY tenant_id{c} LIMIT $2",
                columns!()
            );
            let rows = on_pool!(self.db, |pool| {
                sqlx::query_as::<_, TenantRecord>(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await
            })?;
            return Ok(rows);
        }
        let arm = |expr: &str, lo: &str, hi: &str| {
            format!(
                "SELECT {} FROM tenants WHERE {expr}{c} >= {lo} AND {expr}{c} < {hi} \
                 AND tenant_id{c} > $5",
                columns!()
            )
        };
        let sql = format!(
            "SELECT * FROM ({} UNION {} UNION {} UNION {}) AS found \
             ORDER BY tenant_id{c} LIMIT $6",
            arm("tenant_id", "$1", "$2"),
            arm("customer_id", "$1", "$2"),
            arm("lower(name)", "$3", "$4"),
            arm("lower(email)", "$3", "$4"),
        );
        let lower = q.to_ascii_lowercase();
        // The largest character: every string that starts with the prefix sorts below this.
        let upper = |p: &str| format!("{p}\u{10FFFF}");
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, TenantRecord>(sqlx::AssertSqlSafe(sql))
                .bind(q)
                .bind(upper(q))
                .bind(&lower)
                .bind(upper(&lower))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        })?;
        Ok(rows)
    }

    /// Which of `ids` are known tenants.
    pub async fn existing(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let rows = on_pool!(self.db, |pool| {
            let mut query =
                sqlx::QueryBuilder::new("SELECT tenant_id FROM tenants WHERE tenant_id IN (");
            let mut list = query.separated(", ");
            for id in ids {
                list.push_bind(*id);
            }
            query.push(")");
            query.build_query_as::<(String,)>().fetch_all(pool).await
        })?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }
}
