//! What credit balances are computed from: a tenant's mirrored credit grants and its usage of
//! credit-priced meters, summed per segment between the grants' starts and ends (see
//! `credits::balance`). Both are read from rows; on PostgreSQL also inside check-and-record's
//! transaction.

use std::str::FromStr;

use rust_decimal::Decimal;

use super::credit_totals::{
    CreditState, GrantRows, credit_lock, grant_rows_pg, recompute_pg, recompute_sqlite,
    tenant_grant_rows, tenant_state,
};
use super::usage::usage_columns;
use super::{Db, StoreError, UsageRow, on_pool};
use crate::credits::balance::SegmentUsage;
use crate::credits::book::{CreditBook, TenantGrants};

/// The payloads of the credit grants mirrored for the tenant's customer.
const GRANTS: &str = "SELECT m.payload FROM mirror_objects m JOIN tenants t ON t.customer_id = m.customer_id \
     WHERE t.tenant_id = $1 AND m.object_type = 'credit_grant' AND m.deleted = FALSE \
     ORDER BY m.object_id";

/// PostgreSQL sums each meter's usage per segment, for several asks at once (the `n`th: a
/// tenant, its meters and breakpoints joined by [`SEP`]); `width_bucket` counts the breakpoints
/// at or before each event.
const SEGMENTS_PG: &str = "SELECT a.n, width_bucket(e.occurred_at, a.points)::bigint, e.meter, \
     SUM(e.quantity::numeric)::text \
     FROM (SELECT n, tenant, string_to_array(meters, E'\\x1f') AS meters, \
           string_to_array(points, E'\\x1f')::bigint[] AS points, from_ms \
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) \
           WITH ORDINALITY AS u (tenant, meters, points, from_ms, n)) AS a \
     JOIN usage_events e ON e.tenant_id = a.tenant AND e.meter = ANY(a.meters) \
     AND e.occurred_at >= a.from_ms GROUP BY 1, 2, 3";

/// Joins the meters and breakpoints of one ask in [`SEGMENTS_PG`].
const SEP: &str = "\u{1f}";

/// One tenant's question to [`usage_by_segment_of`]: its meters' usage per segment of `points`.
pub struct SegmentAsk<'a> {
    pub tenant: &'a str,
    pub meters: Vec<String>,
    pub points: &'a [i64],
}

pub struct Credits<'a> {
    pub(super) db: &'a Db,
}

impl Credits<'_> {
    /// The tenant's credit state: its grants' version, its cuts and its running totals, in
    /// one statement (`None`: no such tenant).
    pub async fn state(&self, tenant: &str) -> Result<Option<CreditState>, StoreError> {
        Ok(on_pool!(self.db, |pool| tenant_state!(pool, tenant)))
    }

    /// The tenant's grant payloads and their version, in one statement.
    pub async fn grant_rows(&self, tenant: &str) -> Result<GrantRows, StoreError> {
        Ok(on_pool!(self.db, |pool| tenant_grant_rows!(pool, tenant)))
    }

    /// Recomputes the tenant's running totals from the usage log at the cuts its grants need
    /// now, in a transaction of its own (under the tenant's credit lock on PostgreSQL; as the
    /// only writer on SQLite); returns the grants read.
    pub async fn refresh(
        &self,
        tenant: &str,
        book: &CreditBook,
    ) -> Result<TenantGrants, StoreError> {
        let grants = match self.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(super::lease_key(&credit_lock(tenant)))
                    .execute(&mut *tx)
                    .await?;
                let tenants = [tenant.to_owned()];
                let rows = grant_rows_pg(&mut tx, &tenants).await?.remove(tenant);
                let grants = TenantGrants::read(rows.unwrap_or_default());
                recompute_pg(&mut tx, tenant, &book.cuts_for(&grants)).await?;
                tx.commit().await?;
                grants
            }
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                // A write first: the transaction holds the writer's lock before it reads.
                sqlx::query("DELETE FROM credit_totals WHERE tenant_id = $1")
                    .bind(tenant)
                    .execute(&mut *tx)
                    .await?;
                let grants = TenantGrants::read(tenant_grant_rows!(&mut *tx, tenant));
                recompute_sqlite(&mut tx, tenant, &book.cuts_for(&grants)).await?;
                tx.commit().await?;
                grants
            }
        };
        Ok(grants)
    }

    pub async fn grant_payloads(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self.db, |pool| {
            sqlx::query_as(GRANTS).bind(tenant).fetch_all(pool).await
        })?;
        Ok(rows.into_iter().map(|(p,)| p).collect())
    }

    /// The tenant's usage of `meters` from the first breakpoint on, per segment and meter.
    pub async fn usage_by_segment(
        &self,
        tenant: &str,
        meters: &[String],
        points: &[i64],
    ) -> Result<Vec<SegmentUsage>, StoreError> {
        let Some(&from) = points.first() else {
            return Ok(Vec::new());
        };
        match self.db {
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                let meters = meters.to_vec();
                let ask = SegmentAsk {
                    tenant,
                    meters,
                    points,
                };
                let mut found = usage_by_segment_of(&mut conn, &[ask]).await?;
                Ok(found.pop().unwrap_or_default())
            }
            Db::Sqlite(pool) => {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT meter, quantity, occurred_at FROM usage_events WHERE tenant_id = ",
                );
                query.push_bind(tenant);
                query.push(" AND occurred_at >= ").push_bind(from);
                query.push(" AND meter IN (");
                let mut list = query.separated(", ");
                for meter in meters {
                    list.push_bind(meter);
                }
                query.push(")");
                let rows: Vec<(String, String, i64)> =
                    query.build_query_as().fetch_all(pool).await?;
                Ok(fold_segments(rows, points))
            }
        }
    }

    /// A page of the tenant's events of `meters`, newest first, strictly before the
    /// `(occurred_at, event_id)` cursor.
    pub async fn burns_page(
        &self,
        tenant: &str,
        meters: &[String],
        before: Option<&(i64, String)>,
        limit: u32,
    ) -> Result<Vec<UsageRow>, StoreError> {
        if meters.is_empty() {
            return Ok(Vec::new());
        }
        let (at, id) = before.map_or((i64::MAX, ""), |(at, id)| (*at, id.as_str()));
        let rows = on_pool!(self.db, |pool| {
            let mut query = sqlx::QueryBuilder::new(concat!(
                "SELECT ",
                usage_columns!(),
                " FROM usage_events WHERE tenant_id = "
            ));
            query.push_bind(tenant).push(" AND meter IN (");
            let mut list = query.separated(", ");
            for meter in meters {
                list.push_bind(meter);
            }
            query.push(") AND (occurred_at < ").push_bind(at);
            query.push(" OR (occurred_at = ").push_bind(at);
            query.push(" AND event_id < ").push_bind(id);
            query.push(")) ORDER BY occurred_at DESC, event_id DESC LIMIT ");
            query.push_bind(i64::from(limit));
            query.build_query_as::<UsageRow>().fetch_all(pool).await
        })?;
        Ok(rows)
    }
}

/// Each ask's usage per segment and meter, in one statement on a PostgreSQL connection or
/// transaction (an ask without breakpoints has none).
pub(super) async fn usage_by_segment_of(
    conn: &mut sqlx::PgConnection,
    asks: &[SegmentAsk<'_>],
) -> Result<Vec<Vec<SegmentUsage>>, sqlx::Error> {
    let mut found = vec![Vec::new(); asks.len()];
    let asked: Vec<&SegmentAsk> = asks.iter().filter(|a| !a.points.is_empty()).collect();
    if asked.is_empty() {
        return Ok(found);
    }
    let joined = |points: &[i64]| points.iter().map(i64::to_string).collect::<Vec<_>>();
    let rows: Vec<(i64, i64, String, Option<String>)> = sqlx::query_as(SEGMENTS_PG)
        .bind(asked.iter().map(|a| a.tenant).collect::<Vec<_>>())
        .bind(asked.iter().map(|a| a.meters.join(SEP)).collect::<Vec<_>>())
        .bind(
            asked
                .iter()
                .map(|a| joined(a.points).join(SEP))
                .collect::<Vec<_>>(),
        )
        .bind(asked.iter().map(|a| a.points[0]).collect::<Vec<_>>())
        .fetch_all(conn)
        .await?;
    let index: Vec<usize> = (0..asks.len())
        .filter(|&i| !asks[i].points.is_empty())
        .collect();
    for (n, segment, meter, sum) in rows {
        let (Some(sum), Ok(segment)) = (sum, usize::try_from(segment)) else {
            continue;
        };
        let Ok(quantity) = Decimal::from_str(&sum) else {
            continue;
        };
        let usage = SegmentUsage {
            segment,
            meter,
            quantity,
        };
        found[index[(n - 1) as usize]].push(usage);
    }
    Ok(found)
}

/// Sums `(meter, quantity, occurred_at)` rows per segment and meter (SQLite keeps quantities
/// as text it cannot add exactly).
fn fold_segments(rows: Vec<(String, String, i64)>, points: &[i64]) -> Vec<SegmentUsage> {
    let mut sums: std::collections::BTreeMap<(usize, String), Decimal> = Default::default();
    for (meter, quantity, at) in rows {
        let Ok(quantity) = Decimal::from_str(&quantity) else {
            continue;
        };
        let segment = points.partition_point(|&p| p <= at);
        *sums.entry((segment, meter)).or_default() += quantity;
    }
    sums.into_iter()
        .map(|((segment, meter), quantity)| SegmentUsage {
            segment,
            meter,
            quantity,
        })
        .collect()
}
