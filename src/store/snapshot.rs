//! The usage counters' snapshot: per tenant, meter and hour, the buckets folded from the usage
//! log up to a watermark, so that a start-up replays only what came after.
//!
//! The watermark is a commit position, never a clock: on SQLite the rowid (its one writer
//! assigns rowids in commit order); on PostgreSQL the id of the transaction that stored the
//! event (`txid`), the watermark being a horizon below which every transaction has ended
//! (`pg_snapshot_xmin`). An event committed late, however old its timestamps, stays above the
//! watermark until a snapshot folds it, and a start-up replays it meanwhile.

use super::{Backend, StoreError, Usage, UsageRow, on_pool};

/// The sync_state row holding the watermark: events at positions below it are folded.
const WATERMARK: &str = "usage.snapshot_position";

/// The watermark, read on a transaction `$tx` (0 before the first snapshot).
macro_rules! watermark_in {
    ($tx:expr) => {{
        let watermark: Option<(String,)> =
            sqlx::query_as("SELECT value FROM sync_state WHERE name = $1")
                .bind(WATERMARK)
                .fetch_optional(&mut *$tx)
                .await?;
        watermark
            .and_then(|(v,)| v.parse::<i64>().ok())
            .unwrap_or(0)
    }};
}

/// What [`Usage::counter_state`] read besides the events it streamed.
pub struct CounterState {
    pub buckets: Vec<(String, String, i64, String)>,
    /// The distinct counts of `unique_count` meters, from `usage_distinct`: tenant, meter,
    /// hour, previous hour (`None`: none) and how many values.
    pub distinct: Vec<(String, String, i64, Option<i64>, i64)>,
    /// How many events above the watermark it streamed.
    pub replayed: usize,
    /// PostgreSQL: the transactions the read saw.
    pub seen: Option<TxSnapshot>,
}

/// What the next snapshot folds: the events at positions in `[from, to)`, read a page at a
/// time with [`Usage::snapshot_page`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSource {
    pub from: i64,
    pub to: i64,
}

/// Where a page of the snapshot's events ends: position, tenant and event id (SQLite's
/// positions are unique; PostgreSQL's are per transaction).
pub type PageCursor = (i64, String, String);

/// One folded bucket: tenant, meter, hour and its state (JSON).
pub type BucketState = (String, String, i64, String);

/// A usage row and its commit position.
#[derive(sqlx::FromRow)]
pub struct Positioned {
    #[sqlx(flatten)]
    pub row: UsageRow,
    pub position: i64,
}

/// The events above a position, with theirs, in position order.
fn above_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT tenant_id, event_id, meter, quantity, occurred_at, unique_value, properties, \
             received_at, push_id, rowid AS position FROM usage_events WHERE rowid >= $1 ORDER BY rowid"
        }
        Backend::Postgres => {
            "SELECT tenant_id, event_id, meter, quantity, occurred_at, unique_value, properties, \
             received_at, push_id, txid AS position FROM usage_events WHERE txid >= $1 ORDER BY txid"
        }
    }
}

/// A page of the events at positions in `[$2, $3)` after the cursor `($1, $4, $5)`, in cursor
/// order, at most `$6`. On PostgreSQL the index on (txid, tenant_id, event_id) answers a page
/// from the cursor on, so a page costs its own rows, not the rest of the window.
fn page_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT tenant_id, event_id, meter, quantity, occurred_at, unique_value, properties, \
             received_at, push_id, rowid AS position FROM usage_events \
             WHERE rowid > $1 AND rowid >= $2 AND rowid < $3 AND $4 = $4 AND $5 = $5 \
             ORDER BY rowid LIMIT $6"
        }
        Backend::Postgres => {
            "SELECT tenant_id, event_id, meter, quantity, occurred_at, unique_value, properties, \
             received_at, push_id, txid AS position FROM usage_events \
             WHERE txid >= $1 AND txid >= $2 AND txid < $3 AND (txid, tenant_id, event_id) > ($1, $4, $5) \
             ORDER BY txid, tenant_id, event_id LIMIT $6"
        }
    }
}

/// The distinct counts per tenant, meter, hour and previous hour of each value.
const DISTINCT_STATE: &str = "SELECT tenant_id, meter, hour, previous, COUNT(*) FROM \
     (SELECT tenant_id, meter, hour, LAG(hour) OVER (PARTITION BY tenant_id, meter, value ORDER BY hour) \
      AS previous FROM usage_distinct) AS d GROUP BY tenant_id, meter, hour, previous";

impl Usage<'_> {
    /// Everything the usage counters are rebuilt from, read at one instant: the snapshot
    /// buckets, the distinct counts, the events above its watermark (streamed to `each`, never
    /// held) and, on PostgreSQL, the snapshot of transactions the read saw
    /// (`pg_current_snapshot()`), so that notifications of those same transactions are not
    /// counted again.
    pub async fn counter_state(
        &self,
        mut each: impl FnMut(UsageRow),
    ) -> Result<CounterState, StoreError> {
        use futures_util::TryStreamExt;
        let sql = above_sql(self.db.backend());
        let state = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let seen = if self.db.backend() == Backend::Postgres {
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
            let buckets = sqlx::query_as::<_, BucketState>(
                "SELECT tenant_id, meter, hour, state FROM usage_buckets",
            )
            .fetch_all(&mut *tx)
            .await?;
            let distinct = sqlx::query_as(DISTINCT_STATE).fetch_all(&mut *tx).await?;
            let watermark = watermark_in!(tx);
            let mut replayed = 0;
            {
                let mut rows = sqlx::query_as::<_, Positioned>(sqlx::AssertSqlSafe(sql))
                    .bind(watermark)
                    .fetch(&mut *tx);
                while let Some(positioned) = rows.try_next().await? {
                    replayed += 1;
                    each(positioned.row);
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(CounterState {
                buckets,
                distinct,
                replayed,
                seen,
            })
        })?;
        Ok(state)
    }

    /// The positions the next snapshot folds: from the watermark up to a position below which
    /// every commit has ended (SQLite: past the last row; PostgreSQL: the oldest transaction
    /// still running in this database), so that none committing later can land below it.
    pub async fn snapshot_source(&self) -> Result<SnapshotSource, StoreError> {
        let source = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let from = watermark_in!(tx);
            let to = if self.db.backend() == Backend::Postgres {
                // The snapshot first, then who is running: a transaction of the snapshot's
                // that is not running any more has ended.
                let (snapshot,): (String,) = sqlx::query_as("SELECT pg_current_snapshot()::text")
                    .fetch_one(&mut *tx)
                    .await?;
                let running: Vec<(i64,)> = sqlx::query_as(
                    "SELECT backend_xid::text::bigint FROM pg_stat_activity \
                     WHERE datname = current_database() AND backend_xid IS NOT NULL",
                )
                .fetch_all(&mut *tx)
                .await?;
                let running: Vec<i64> = running.into_iter().map(|(x,)| x).collect();
                TxSnapshot::parse(&snapshot).map_or(from, |s| s.horizon(&running))
            } else {
                let (last,): (Option<i64>,) = sqlx::query_as("SELECT MAX(rowid) FROM usage_events")
                    .fetch_one(&mut *tx)
                    .await?;
                last.map_or(from, |last| last + 1)
            };
            tx.commit().await?;
            Ok::<_, sqlx::Error>(SnapshotSource {
                from,
                to: to.max(from),
            })
        })?;
        Ok(source)
    }

    /// A page of at most `limit` of the source's events, in position order after `after` (the
    /// previous page's last: [`PageCursor`]); empty past the last.
    pub async fn snapshot_page(
        &self,
        source: SnapshotSource,
        after: Option<&PageCursor>,
        limit: u32,
    ) -> Result<Vec<Positioned>, StoreError> {
        let sql = page_sql(self.db.backend());
        let (position, tenant, event) = match after {
            Some((p, t, e)) => (*p, t.as_str(), e.as_str()),
            None => (source.from - 1, "", ""),
        };
        let rows = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            if self.db.backend() == Backend::Postgres {
                // The window's rows are recent, so the planner's statistics lag behind them and
                // it would rather sort them all than walk the index in order for one page.
                sqlx::query("SET LOCAL enable_sort = off")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SET LOCAL enable_bitmapscan = off")
                    .execute(&mut *tx)
                    .await?;
            }
            let rows = sqlx::query_as::<_, Positioned>(sqlx::AssertSqlSafe(sql))
                .bind(position)
                .bind(source.from)
                .bind(source.to)
                .bind(tenant)
                .bind(event)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(rows)
        })?;
        Ok(rows)
    }

    /// Folds `buckets` into the stored ones (`merge(stored, new)` gives the state to keep) and
    /// moves the watermark from `from` to `to`, in one transaction. `false`, and nothing
    /// written, when the watermark is no longer at `from`: another snapshot folded these events
    /// meanwhile (a replica that lost its lease), and folding them twice would count them twice.
    pub async fn save_snapshot(
        &self,
        (from, to): (i64, i64),
        buckets: &[BucketState],
        merge: &(dyn Fn(&str, &str) -> String + Sync),
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let saved = on_pool!(self.db, |pool| {
            async {
            let mut tx = pool.begin().await?;
            let moved = sqlx::query(
                "INSERT INTO sync_state (name, value, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at \
                 WHERE sync_state.value = $4",
            )
            .bind(WATERMARK)
            .bind(to.to_string())
            .bind(now_ms)
            .bind(from.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 0 {
                tx.rollback().await?;
                return Ok::<_, sqlx::Error>(false);
            }
            for (tenant, meter, hour, state) in buckets {
                let stored: Option<(String,)> = sqlx::query_as(
                    "SELECT state FROM usage_buckets WHERE tenant_id = $1 AND meter = $2 AND hour = $3",
                )
                .bind(tenant)
                .bind(meter)
                .bind(hour)
                .fetch_optional(&mut *tx)
                .await?;
                let state = match stored {
                    Some((stored,)) => merge(&stored, state),
                    None => state.clone(),
                };
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
            tx.commit().await?;
            Ok(true)
        }
        .await
        })?;
        Ok(saved)
    }
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

    /// The oldest transaction id of the snapshot's that is still running, among `running` (the
    /// 32-bit ids of this database's running transactions, from `pg_stat_activity`), or else
    /// the next id to be given: every transaction below it has ended. Transactions of other
    /// databases of the cluster do not hold it back.
    pub fn horizon(&self, running: &[i64]) -> i64 {
        let running = |xid: &&u64| running.contains(&((**xid & 0xffff_ffff) as i64));
        let oldest = self.in_progress.iter().filter(running).min();
        oldest.copied().unwrap_or(self.xmax).min(self.xmax) as i64
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
        // 101 ended since; 103 still runs in this database.
        assert_eq!(snapshot.horizon(&[103, 7]), 103);
        assert_eq!(snapshot.horizon(&[]), 105, "nothing of ours running");
        let wrapped = TxSnapshot::parse("4294967400:4294967500:4294967401").unwrap();
        assert_eq!(
            wrapped.horizon(&[105]),
            4294967401,
            "32-bit ids after wraparound"
        );
    }
}
