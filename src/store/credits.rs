//! What credit balances are computed from: a tenant's mirrored credit grants and its usage of
//! credit-priced meters, summed per segment between the grants' starts and ends (see
//! `credits::balance`). Both are read from rows; on PostgreSQL also inside check-and-record's
//! transaction.

use std::str::FromStr;

use rust_decimal::Decimal;

use super::usage::usage_columns;
use super::{Db, StoreError, UsageRow, on_pool};
use crate::credits::balance::SegmentUsage;

/// The payloads of the credit grants mirrored for the tenant's customer.
const GRANTS: &str = "SELECT m.payload FROM mirror_objects m JOIN tenants t ON t.customer_id = m.customer_id \
     WHERE t.tenant_id = $1 AND m.object_type = 'credit_grant' AND m.deleted = FALSE \
     ORDER BY m.object_id";

/// PostgreSQL sums each meter's usage per segment; `width_bucket` counts the breakpoints at or
/// before each event.
const SEGMENTS_PG: &str = "SELECT width_bucket(occurred_at, $3::bigint[])::bigint, meter, \
     SUM(quantity::numeric)::text FROM usage_events \
     WHERE tenant_id = $1 AND meter = ANY($2) AND occurred_at >= $4 GROUP BY 1, 2";

pub struct Credits<'a> {
    pub(super) db: &'a Db,
}

impl Credits<'_> {
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
                Ok(usage_by_segment_in(&mut conn, tenant, meters, points).await?)
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

/// [`Credits::grant_payloads`] on a PostgreSQL transaction.
pub(super) async fn grant_payloads_in(
    conn: &mut sqlx::PgConnection,
    tenant: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(GRANTS).bind(tenant).fetch_all(conn).await?;
    Ok(rows.into_iter().map(|(p,)| p).collect())
}

/// [`Credits::usage_by_segment`] on a PostgreSQL connection or transaction.
pub(super) async fn usage_by_segment_in(
    conn: &mut sqlx::PgConnection,
    tenant: &str,
    meters: &[String],
    points: &[i64],
) -> Result<Vec<SegmentUsage>, sqlx::Error> {
    let Some(&from) = points.first() else {
        return Ok(Vec::new());
    };
    let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(SEGMENTS_PG)
        .bind(tenant)
        .bind(meters)
        .bind(points)
        .bind(from)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(segment, meter, sum)| {
            let quantity = Decimal::from_str(sum.as_deref()?).ok()?;
            Some(SegmentUsage {
                segment: usize::try_from(segment).ok()?,
                meter,
                quantity,
            })
        })
        .collect())
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
