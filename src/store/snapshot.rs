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

/// What [`Usage::counter_state`] read.
pub struct CounterState {
    pub buckets: Vec<(String, String, i64, String)>,
    pub rows: Vec<UsageRow>,
    /// PostgreSQL: the transactions the read saw.
    pub seen: Option<TxSnapshot>,
}

/// What the next snapshot folds: the events at positions in `[from, to)`.
pub struct SnapshotSource {
    pub from: i64,
    pub to: i64,
    pub rows: Vec<UsageRow>,
}

/// One folded bucket: tenant, meter, hour and its state (JSON).
pub type BucketState = (String, String, i64, String);

/// A usage row and its commit position.
#[derive(sqlx::FromRow)]
struct Positioned {
    #[sqlx(flatten)]
    row: UsageRow,
    position: i64,
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

impl Usage<'_> {
    /// Everything the usage counters are rebuilt from, read at one instant: the snapshot
    /// buckets, the events above its watermark and, on PostgreSQL, the snapshot of transactions
    /// the read saw (`pg_current_snapshot()`), so that notifications of those same transactions
    /// are not counted again.
    pub async fn counter_state(&self) -> Result<CounterState, StoreError> {
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
            let watermark: Option<(String,)> =
                sqlx::query_as("SELECT value FROM sync_state WHERE name = $1")
                    .bind(WATERMARK)
                    .fetch_optional(&mut *tx)
                    .await?;
            let watermark: i64 = watermark.and_then(|(v,)| v.parse().ok()).unwrap_or(0);
            let rows = sqlx::query_as::<_, Positioned>(sqlx::AssertSqlSafe(sql))
                .bind(watermark)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(CounterState {
                buckets,
                rows: rows.into_iter().map(|p| p.row).collect(),
                seen,
            })
        })?;
        Ok(state)
    }

    /// The events the next snapshot folds: from the watermark up to a position below which
    /// every commit has ended (SQLite: past the last row; PostgreSQL: the oldest transaction
    /// still running in this database), so that none committing later can land below it.
    pub async fn snapshot_source(&self) -> Result<SnapshotSource, StoreError> {
        let sql = above_sql(self.db.backend());
        let source = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let watermark: Option<(String,)> =
                sqlx::query_as("SELECT value FROM sync_state WHERE name = $1")
                    .bind(WATERMARK)
                    .fetch_optional(&mut *tx)
                    .await?;
            let from: i64 = watermark.and_then(|(v,)| v.parse().ok()).unwrap_or(0);
            let horizon: Option<i64> = if self.db.backend() == Backend::Postgres {
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
                TxSnapshot::parse(&snapshot).map(|s| s.horizon(&running))
            } else {
                None
            };
            let mut rows = sqlx::query_as::<_, Positioned>(sqlx::AssertSqlSafe(sql))
                .bind(from)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            let to = match horizon {
                Some(xmin) => {
                    rows.retain(|p| p.position < xmin);
                    xmin.max(from)
                }
                None => rows.last().map_or(from, |p| p.position + 1),
            };
            Ok::<_, sqlx::Error>(SnapshotSource {
                from,
                to,
                rows: rows.into_iter().map(|p| p.row).collect(),
            })
        })?;
        Ok(source)
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
