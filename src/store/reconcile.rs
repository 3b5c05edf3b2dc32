//! Reconciliation: the runs and their findings, and the reads a run makes (usage in a window,
//! the pushes of that window, the mirrored invoices and payments).

use super::{Db, MirrorRow, PushRow, StoreError, on_pool};

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RunRow {
    pub run_id: String,
    pub period_from: i64,
    pub period_to: i64,
    pub tenant_id: Option<String>,
    pub dry_run: bool,
    pub trigger: String,
    pub status: String,
    pub summary: Option<String>,
    pub error: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// One finding as stored: its JSON is the report's item.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ItemRow {
    pub seq: i64,
    pub area: String,
    pub finding: String,
    pub tenant_id: Option<String>,
    pub item: String,
}

/// A usage event as a reconciliation reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UsageFact {
    pub tenant_id: String,
    pub event_id: String,
    pub meter: String,
    pub quantity: String,
    pub occurred_at: i64,
    pub unique_value: Option<String>,
    pub received_at: i64,
    pub push_id: Option<String>,
}

macro_rules! run_columns {
    () => {
        "run_id, period_from, period_to, tenant_id, dry_run, trigger, status, summary, error, \
         started_at, finished_at"
    };
}

macro_rules! push_columns {
    () => {
        "push_id, tenant_id, meter, customer_id, event_name, window_start, value, timestamp, \
         event_count, status, attempts, last_error, next_attempt_at, created_at, sent_at"
    };
}

macro_rules! mirror_columns {
    () => {
        "object_type, object_id, customer_id, status, created, version, deleted, payload, synced_at"
    };
}

pub struct Reconciliations<'a> {
    db: &'a Db,
}

impl<'a> Reconciliations<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    pub async fn start(&self, run: &RunRow) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(concat!(
                "INSERT INTO reconciliation_runs (",
                run_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ))
            .bind(&run.run_id)
            .bind(run.period_from)
            .bind(run.period_to)
            .bind(&run.tenant_id)
            .bind(run.dry_run)
            .bind(&run.trigger)
            .bind(&run.status)
            .bind(&run.summary)
            .bind(&run.error)
            .bind(run.started_at)
            .bind(run.finished_at)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// Stores the report's items and summary and marks the run done, in one transaction.
    pub async fn finish(
        &self,
        run_id: &str,
        summary: &str,
        items: &[(String, String, Option<String>, String)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for (offset, chunk) in items.chunks(500).enumerate() {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO reconciliation_items (run_id, seq, area, finding, tenant_id, item) ",
                );
                insert.push_values(chunk.iter().enumerate(), |mut b, (i, item)| {
                    b.push_bind(run_id)
                        .push_bind((offset * 500 + i) as i64)
                        .push_bind(&item.0)
                        .push_bind(&item.1)
                        .push_bind(&item.2)
                        .push_bind(&item.3);
                });
                insert.build().execute(&mut *tx).await?;
            }
            sqlx::query(
                "UPDATE reconciliation_runs SET status = 'done', summary = $2, finished_at = $3 \
                 WHERE run_id = $1",
            )
            .bind(run_id)
            .bind(summary)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })?;
        Ok(())
    }

    pub async fn fail(&self, run_id: &str, error: &str, now_ms: i64) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE reconciliation_runs SET status = 'failed', error = $2, finished_at = $3 \
                 WHERE run_id = $1",
            )
            .bind(run_id)
            .bind(error)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    pub async fn get(&self, run_id: &str) -> Result<Option<RunRow>, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, RunRow>(concat!(
                "SELECT ",
                run_columns!(),
                " FROM reconciliation_runs WHERE run_id = $1"
            ))
            .bind(run_id)
            .fetch_optional(pool)
            .await
        })?;
        Ok(row)
    }

    /// Marks runs left `running` by a process that stopped as failed; returns how many.
    pub async fn fail_interrupted(&self, now_ms: i64) -> Result<u64, StoreError> {
        let done = on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE reconciliation_runs SET status = 'failed', \
                 error = 'interrupted: the process stopped before the report was stored', \
                 finished_at = $1 WHERE status = 'running'",
            )
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })?;
        Ok(done)
    }

    /// A page of a run's items after `after_seq`, in report order.
    pub async fn items(
        &self,
        run_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<ItemRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, ItemRow>(
                "SELECT seq, area, finding, tenant_id, item FROM reconciliation_items \
                 WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .bind(run_id)
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Calls `each` with every usage event that occurred in `[from_ms, to_ms)`, of one tenant
    /// or all, streamed (in no particular order) rather than loaded at once.
    pub async fn each_usage(
        &self,
        from_ms: i64,
        to_ms: i64,
        tenant: Option<&str>,
        mut each: impl FnMut(UsageFact),
    ) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        on_pool!(self.db, |pool| {
            let mut rows = sqlx::query_as::<_, UsageFact>(
                "SELECT tenant_id, event_id, meter, quantity, occurred_at, unique_value, received_at, \
                 push_id FROM usage_events WHERE occurred_at >= $1 AND occurred_at < $2 \
                 AND ($3 IS NULL OR tenant_id = $3)",
            )
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
    pub async fn pushes(
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

    /// Calls `each` with every mirrored object of the kinds named (not deleted), of one customer
    /// or all, streamed rather than loaded at once.
    pub async fn each_mirrored(
        &self,
        kinds: &[&str],
        customer: Option<&str>,
        mut each: impl FnMut(MirrorRow),
    ) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        on_pool!(self.db, |pool| {
            let mut query = sqlx::QueryBuilder::new(concat!(
                "SELECT ",
                mirror_columns!(),
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
    pub async fn mirrored(
        &self,
        kinds: &[&str],
        from_s: i64,
        customer: Option<&str>,
    ) -> Result<Vec<MirrorRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            let mut query = sqlx::QueryBuilder::new(concat!(
                "SELECT ",
                mirror_columns!(),
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
}
