//! Reconciliation runs and the findings they report.

use super::{Db, StoreError, on_pool};

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

macro_rules! run_columns {
    () => {
        "run_id, period_from, period_to, tenant_id, dry_run, trigger, status, summary, error, \
         started_at, finished_at"
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

    /// A page of runs, newest first (by `started_at`, then id), after the `(started_at, run_id)`
    /// cursor `before`. `status`: only runs in it. `found`: only runs whose stored report has
    /// findings (`true`) or has none (`false`); a run without a report (running or failed)
    /// matches neither.
    pub async fn page(
        &self,
        status: Option<&str>,
        found: Option<bool>,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<RunRow>, StoreError> {
        let (started, id) = before.unwrap_or((i64::MAX, String::new()));
        // The items are stored with the summary, in one transaction: a stored report has
        // findings exactly when it has items.
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, RunRow>(concat!(
                "SELECT ",
                run_columns!(),
                " FROM reconciliation_runs r \
                 WHERE (started_at < $1 OR (started_at = $1 AND run_id < $2)) \
                 AND ($3 IS NULL OR status = $3) \
                 AND ($4 IS NULL OR (summary IS NOT NULL AND EXISTS \
                     (SELECT 1 FROM reconciliation_items i WHERE i.run_id = r.run_id) = $4)) \
                 ORDER BY started_at DESC, run_id DESC LIMIT $5"
            ))
            .bind(started)
            .bind(&id)
            .bind(status)
            .bind(found)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Marks as failed the runs still `running` whose runner has not beaten since
    /// `silent_since` (it stopped); returns how many.
    pub async fn fail_interrupted(
        &self,
        now_ms: i64,
        silent_since: i64,
    ) -> Result<u64, StoreError> {
        let done = on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE reconciliation_runs SET status = 'failed', \
                 error = 'interrupted: the process stopped before the report was stored', \
                 finished_at = $1 WHERE status = 'running' AND COALESCE(beat_at, started_at) < $2",
            )
            .bind(now_ms)
            .bind(silent_since)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })?;
        Ok(done)
    }

    /// A running run's heartbeat.
    pub async fn beat(&self, run_id: &str, now_ms: i64) -> Result<(), StoreError> {
        on_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE reconciliation_runs SET beat_at = $2 WHERE run_id = $1 AND status = 'running'",
            )
            .bind(run_id)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    /// When the last run of `trigger` started.
    pub async fn last_started(&self, trigger: &str) -> Result<Option<i64>, StoreError> {
        let (started,): (Option<i64>,) = on_pool!(self.db, |pool| {
            sqlx::query_as("SELECT MAX(started_at) FROM reconciliation_runs WHERE trigger = $1")
                .bind(trigger)
                .fetch_one(pool)
                .await
        })?;
        Ok(started)
    }

    /// How many findings the latest finished run reported (none yet: `None`).
    pub async fn latest_findings(&self) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM reconciliation_items i WHERE i.run_id = r.run_id) \
                 FROM reconciliation_runs r WHERE r.status = 'done' \
                 ORDER BY r.finished_at DESC LIMIT 1",
            )
            .fetch_optional(pool)
            .await
        })?;
        Ok(row.map(|(n,)| n))
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
}
