//! Running totals of credit-priced usage: per tenant, meter and segment (cut at the starts and
//! ends of the tenant's grants, `credit_cuts`), the summed quantity (`credit_totals`), written
//! in the transaction of every usage row it counts ([`KeepTotals`], called by `insert_usage!`)
//! and recomputed from the usage log only when the cuts change ([`recompute_pg`],
//! [`recompute_sqlite`]). A check reads them with the grants' version ([`states_pg`],
//! [`Credits::state`](super::Credits::state)) instead of the tenant's whole usage history.
//!
//! Why a recompute never loses a concurrent row. PostgreSQL: every transaction that stores
//! usage of a credit-priced meter first takes the tenant's credit lock shared
//! ([`lock_shared_pg`]); a recompute (and a burn) holds it exclusively, so a row is either
//! committed before the recompute reads the log, or added to the totals after it, against the
//! new cuts. SQLite: one writer at a time, and a recompute's first statement is a write.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use rust_decimal::Decimal;

use super::UsageRow;

/// The lock a tenant's burns and recomputes hold exclusively and its usage writes shared.
pub fn credit_lock(tenant: &str) -> String {
    format!("credits:{tenant}")
}

/// Where a tenant's totals are cut, and which meters they total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cuts {
    pub points: Vec<i64>,
    pub meters: Vec<String>,
}

/// The summed quantity of one meter from the cut `segment` to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Total {
    pub meter: String,
    pub segment: i64,
    pub quantity: Decimal,
}

/// A tenant's credit state as one statement reads it.
#[derive(Debug, Clone, Default)]
pub struct CreditState {
    pub customer_id: Option<String>,
    /// The version of the customer's grants (0: none was ever written).
    pub version: i64,
    /// `None`: never cut.
    pub cuts: Option<Cuts>,
    pub totals: Vec<Total>,
    /// The tenant has low-balance settings (in some unit).
    pub alarmed: bool,
}

/// A tenant's grant payloads and the version they are at, read in one statement.
#[derive(Debug, Clone, Default)]
pub struct GrantRows {
    pub customer_id: Option<String>,
    pub version: i64,
    pub payloads: Vec<String>,
}

/// The columns [`fold_states`] reads, for tenants named by the `WHERE` that follows.
pub(super) const STATE: &str = "SELECT t.tenant_id, t.customer_id, COALESCE(v.version, 0), \
     c.points, c.meters, s.meter, s.segment, CAST(s.quantity AS TEXT), \
     EXISTS (SELECT 1 FROM credit_settings a WHERE a.tenant_id = t.tenant_id) FROM tenants t \
     LEFT JOIN credit_grant_versions v ON v.customer_id = t.customer_id \
     LEFT JOIN credit_cuts c ON c.tenant_id = t.tenant_id \
     LEFT JOIN credit_totals s ON s.tenant_id = t.tenant_id WHERE ";

/// [`STATE`] for a batch of tenants (PostgreSQL): lateral lookups by each tenant (`OFFSET 0`
/// keeps them from being flattened), so that a batch reads its tenants' rows by index whatever
/// the tables' sizes (plain joins are planned as hashes of the whole tables).
const STATE_PG: &str = "SELECT a.tenant_id, t.customer_id, \
     COALESCE((SELECT v.version FROM credit_grant_versions v WHERE v.customer_id = t.customer_id), 0), \
     c.points, c.meters, s.meter, s.segment, s.quantity::text, \
     EXISTS (SELECT 1 FROM credit_settings x WHERE x.tenant_id = a.tenant_id) \
     FROM unnest($1::text[]) AS a (tenant_id) \
     JOIN LATERAL (SELECT t.customer_id FROM tenants t WHERE t.tenant_id = a.tenant_id OFFSET 0) AS t ON TRUE \
     LEFT JOIN LATERAL (SELECT c.points, c.meters FROM credit_cuts c WHERE c.tenant_id = a.tenant_id OFFSET 0) AS c ON TRUE \
     LEFT JOIN LATERAL (SELECT s.meter, s.segment, s.quantity FROM credit_totals s \
       WHERE s.tenant_id = a.tenant_id OFFSET 0) AS s ON TRUE";

/// The columns [`fold_grants`] reads, for tenants named by the `WHERE` that follows.
pub(super) const GRANT_ROWS: &str = "SELECT t.tenant_id, t.customer_id, COALESCE(v.version, 0), \
     m.payload FROM tenants t \
     LEFT JOIN credit_grant_versions v ON v.customer_id = t.customer_id \
     LEFT JOIN mirror_objects m ON m.customer_id = t.customer_id \
     AND m.object_type = 'credit_grant' AND m.deleted = FALSE WHERE ";

pub(super) type StateRow = (
    String,
    Option<String>,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    bool,
);

pub(super) fn fold_states(rows: Vec<StateRow>) -> HashMap<String, CreditState> {
    let mut states: HashMap<String, CreditState> = HashMap::new();
    for (tenant, customer_id, version, points, meters, meter, segment, quantity, alarmed) in rows {
        let state = states.entry(tenant).or_insert_with(|| CreditState {
            customer_id,
            version,
            alarmed,
            cuts: points.zip(meters).map(|(p, m)| Cuts {
                points: parse_points(&p),
                meters: serde_json::from_str(&m).unwrap_or_default(),
            }),
            totals: Vec::new(),
        });
        if let (Some(meter), Some(segment), Some(quantity)) = (meter, segment, quantity)
            && let Ok(quantity) = Decimal::from_str(&quantity)
        {
            state.totals.push(Total {
                meter,
                segment,
                quantity,
            });
        }
    }
    states
}

pub(super) type GrantRow = (String, Option<String>, i64, Option<String>);

/// One tenant's credit state ([`STATE`]) on any connection or pool of either backend; `None`:
/// no such tenant. Needs `?` on `sqlx::Error`.
macro_rules! tenant_state {
    ($conn:expr, $tenant:expr) => {{
        let tenant: &str = $tenant;
        let sql = format!("{}t.tenant_id = $1", $crate::store::credit_totals::STATE);
        let rows: Vec<$crate::store::credit_totals::StateRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(tenant)
                .fetch_all($conn)
                .await?;
        $crate::store::credit_totals::fold_states(rows).remove(tenant)
    }};
}
pub(crate) use tenant_state;

/// One tenant's grant payloads and their version ([`GRANT_ROWS`]) on any connection or pool
/// of either backend. Needs `?` on `sqlx::Error`.
macro_rules! tenant_grant_rows {
    ($conn:expr, $tenant:expr) => {{
        let tenant: &str = $tenant;
        let sql = format!(
            "{}t.tenant_id = $1 ORDER BY m.object_id",
            $crate::store::credit_totals::GRANT_ROWS
        );
        let rows: Vec<$crate::store::credit_totals::GrantRow> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(tenant)
                .fetch_all($conn)
                .await?;
        ($crate::store::credit_totals::fold_grants(rows).remove(tenant)).unwrap_or_default()
    }};
}
pub(crate) use tenant_grant_rows;

pub(super) fn fold_grants(rows: Vec<GrantRow>) -> HashMap<String, GrantRows> {
    let mut grants: HashMap<String, GrantRows> = HashMap::new();
    for (tenant, customer_id, version, payload) in rows {
        let of = grants.entry(tenant).or_insert_with(|| GrantRows {
            customer_id,
            version,
            payloads: Vec::new(),
        });
        of.payloads.extend(payload);
    }
    grants
}

pub(super) fn parse_points(text: &str) -> Vec<i64> {
    text.split(',').filter_map(|p| p.parse().ok()).collect()
}

fn join_points(points: &[i64]) -> String {
    points
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The credit state of each of `tenants` (PostgreSQL, one statement).
pub(super) async fn states_pg(
    conn: &mut sqlx::PgConnection,
    tenants: &[String],
) -> Result<HashMap<String, CreditState>, sqlx::Error> {
    let rows: Vec<StateRow> = sqlx::query_as(STATE_PG)
        .bind(tenants)
        .fetch_all(conn)
        .await?;
    Ok(fold_states(rows))
}

/// The grant payloads and versions of each of `tenants` (PostgreSQL, one statement).
pub(super) async fn grant_rows_pg(
    conn: &mut sqlx::PgConnection,
    tenants: &[String],
) -> Result<HashMap<String, GrantRows>, sqlx::Error> {
    let sql = format!("{GRANT_ROWS}t.tenant_id = ANY($1) ORDER BY t.tenant_id, m.object_id");
    let rows: Vec<GrantRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenants)
        .fetch_all(conn)
        .await?;
    Ok(fold_grants(rows))
}

/// Takes the credit locks of `tenants` shared, in key order (PostgreSQL).
pub(super) async fn lock_shared_pg(
    conn: &mut sqlx::PgConnection,
    tenants: &[&str],
) -> Result<(), sqlx::Error> {
    if tenants.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<i64> = (tenants.iter())
        .map(|t| super::lease_key(&credit_lock(t)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared(k) FROM (SELECT unnest($1::bigint[]) AS k ORDER BY 1) AS keys",
    )
    .bind(&keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// Recomputes the tenant's totals of `meters` from the usage log at `points`, under its credit
/// lock held exclusively (PostgreSQL); returns them.
pub(super) async fn recompute_pg(
    conn: &mut sqlx::PgConnection,
    tenant: &str,
    cuts: &Cuts,
) -> Result<Vec<Total>, sqlx::Error> {
    sqlx::query("DELETE FROM credit_totals WHERE tenant_id = $1")
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    conn.write_cuts(tenant, cuts).await?;
    if cuts.points.is_empty() || cuts.meters.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "INSERT INTO credit_totals (tenant_id, meter, segment, quantity) \
         SELECT $1, e.meter, p.points[width_bucket(e.occurred_at, p.points)], SUM(e.quantity::numeric) \
         FROM usage_events e, (SELECT $2::bigint[] AS points) AS p \
         WHERE e.tenant_id = $1 AND e.meter = ANY($3) AND e.occurred_at >= p.points[1] \
         GROUP BY 2, 3 RETURNING meter, segment, quantity::text",
    )
    .bind(tenant)
    .bind(&cuts.points)
    .bind(&cuts.meters)
    .fetch_all(&mut *conn)
    .await?;
    Ok(totals_of(rows))
}

/// [`recompute_pg`] on SQLite, whose quantities are text it cannot add exactly: the rows are
/// summed here. Its first statement is a write, so that it holds the only writer's lock.
pub(super) async fn recompute_sqlite(
    conn: &mut sqlx::SqliteConnection,
    tenant: &str,
    cuts: &Cuts,
) -> Result<Vec<Total>, sqlx::Error> {
    sqlx::query("DELETE FROM credit_totals WHERE tenant_id = $1")
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    conn.write_cuts(tenant, cuts).await?;
    let totals = sqlite_totals_from_log(&mut *conn, tenant, cuts).await?;
    for total in &totals {
        sqlx::query(
            "INSERT INTO credit_totals (tenant_id, meter, segment, quantity) VALUES ($1, $2, $3, $4)",
        )
        .bind(tenant)
        .bind(&total.meter)
        .bind(total.segment)
        .bind(total.quantity.normalize().to_string())
        .execute(&mut *conn)
        .await?;
    }
    Ok(totals)
}

/// The tenant's usage of the cuts' meters per segment, summed here from its rows (SQLite).
async fn sqlite_totals_from_log(
    conn: &mut sqlx::SqliteConnection,
    tenant: &str,
    cuts: &Cuts,
) -> Result<Vec<Total>, sqlx::Error> {
    let Some(&from) = cuts.points.first() else {
        return Ok(Vec::new());
    };
    let mut sums: BTreeMap<(String, i64), Decimal> = BTreeMap::new();
    for meter in &cuts.meters {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT quantity, occurred_at FROM usage_events \
             WHERE tenant_id = $1 AND meter = $2 AND occurred_at >= $3",
        )
        .bind(tenant)
        .bind(meter)
        .bind(from)
        .fetch_all(&mut *conn)
        .await?;
        for (quantity, at) in rows {
            let segment = segment_of(&cuts.points, at);
            if let (Ok(quantity), Some(segment)) = (Decimal::from_str(&quantity), segment) {
                *sums.entry((meter.clone(), segment)).or_default() += quantity;
            }
        }
    }
    Ok((sums.into_iter())
        .map(|((meter, segment), quantity)| Total {
            meter,
            segment,
            quantity,
        })
        .collect())
}

/// Writes the tenant's cuts (either backend).
macro_rules! write_cuts_on {
    ($conn:expr, $tenant:expr, $cuts:expr) => {
        sqlx::query(
            "INSERT INTO credit_cuts (tenant_id, points, meters, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id) DO UPDATE SET points = excluded.points, \
             meters = excluded.meters, updated_at = excluded.updated_at",
        )
        .bind($tenant)
        .bind(join_points(&$cuts.points))
        .bind(serde_json::to_string(&$cuts.meters).expect("strings"))
        .bind(super::now_ms())
        .execute($conn)
    };
}

/// Writing the cuts on either backend's connection.
pub(super) trait CutsWriter {
    async fn write_cuts(&mut self, tenant: &str, cuts: &Cuts) -> Result<(), sqlx::Error>;
}

impl CutsWriter for sqlx::PgConnection {
    async fn write_cuts(&mut self, tenant: &str, cuts: &Cuts) -> Result<(), sqlx::Error> {
        write_cuts_on!(self, tenant, cuts).await.map(|_| ())
    }
}

impl CutsWriter for sqlx::SqliteConnection {
    async fn write_cuts(&mut self, tenant: &str, cuts: &Cuts) -> Result<(), sqlx::Error> {
        write_cuts_on!(self, tenant, cuts).await.map(|_| ())
    }
}

fn totals_of(rows: Vec<(String, i64, String)>) -> Vec<Total> {
    (rows.into_iter())
        .filter_map(|(meter, segment, quantity)| {
            Some(Total {
                meter,
                segment,
                quantity: Decimal::from_str(&quantity).ok()?,
            })
        })
        .collect()
}

/// The cut starting the segment `at` falls in; `None` before the first.
pub fn segment_of(points: &[i64], at: i64) -> Option<i64> {
    let n = points.partition_point(|&p| p <= at);
    n.checked_sub(1).map(|i| points[i])
}

/// Adding new usage rows to their tenants' totals, in the transaction that stores them
/// (called by `insert_usage!` with the rows of credit-priced meters; on PostgreSQL after
/// [`lock_shared_pg`]).
pub(crate) trait KeepTotals {
    /// Takes the tenants' credit locks shared, before their rows are stored (PostgreSQL).
    async fn lock_for_totals(&mut self, tenants: &[&str]) -> Result<(), sqlx::Error>;
    /// The tenant's totals at `cuts` summed from the usage log itself, written nowhere: for a
    /// write that finds the totals not yet at its grants' cuts.
    async fn totals_from_log(
        &mut self,
        tenant: &str,
        cuts: &Cuts,
    ) -> Result<Vec<Total>, sqlx::Error>;
    async fn add_to_totals(&mut self, rows: &[&UsageRow]) -> Result<(), sqlx::Error>;
}

impl KeepTotals for sqlx::PgConnection {
    async fn lock_for_totals(&mut self, tenants: &[&str]) -> Result<(), sqlx::Error> {
        lock_shared_pg(self, tenants).await
    }

    async fn totals_from_log(
        &mut self,
        tenant: &str,
        cuts: &Cuts,
    ) -> Result<Vec<Total>, sqlx::Error> {
        if cuts.points.is_empty() || cuts.meters.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT e.meter, p.points[width_bucket(e.occurred_at, p.points)], \
             SUM(e.quantity::numeric)::text \
             FROM usage_events e, (SELECT $2::bigint[] AS points) AS p \
             WHERE e.tenant_id = $1 AND e.meter = ANY($3) AND e.occurred_at >= p.points[1] \
             GROUP BY 1, 2",
        )
        .bind(tenant)
        .bind(&cuts.points)
        .bind(&cuts.meters)
        .fetch_all(self)
        .await?;
        Ok(totals_of(rows))
    }

    async fn add_to_totals(&mut self, rows: &[&UsageRow]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&UsageRow) -> String| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
        // In key order, so that two writers never wait on each other's totals in a cycle.
        sqlx::query(
            "INSERT INTO credit_totals (tenant_id, meter, segment, quantity) \
             SELECT r.tenant_id, r.meter, p.points[width_bucket(r.occurred_at, p.points)], \
             SUM(r.quantity::numeric) \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) \
             AS r (tenant_id, meter, quantity, occurred_at) \
             JOIN LATERAL (SELECT string_to_array(NULLIF(c.points, ''), ',')::bigint[] AS points \
               FROM credit_cuts c WHERE c.tenant_id = r.tenant_id OFFSET 0) AS p ON TRUE \
             WHERE r.occurred_at >= p.points[1] GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 \
             ON CONFLICT (tenant_id, meter, segment) \
             DO UPDATE SET quantity = credit_totals.quantity + excluded.quantity",
        )
        .bind(column(|r| r.tenant_id.clone()))
        .bind(column(|r| r.meter.clone()))
        .bind(column(|r| r.quantity.clone()))
        .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
        .execute(self)
        .await?;
        Ok(())
    }
}

impl KeepTotals for sqlx::SqliteConnection {
    /// One writer at a time: nothing to take.
    async fn lock_for_totals(&mut self, _tenants: &[&str]) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn totals_from_log(
        &mut self,
        tenant: &str,
        cuts: &Cuts,
    ) -> Result<Vec<Total>, sqlx::Error> {
        sqlite_totals_from_log(self, tenant, cuts).await
    }

    async fn add_to_totals(&mut self, rows: &[&UsageRow]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tenants: Vec<&str> = rows.iter().map(|r| r.tenant_id.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut query = sqlx::QueryBuilder::new(
            "SELECT tenant_id, points FROM credit_cuts WHERE points <> '' AND tenant_id IN (",
        );
        let mut list = query.separated(", ");
        for tenant in &tenants {
            list.push_bind(*tenant);
        }
        query.push(")");
        let cuts: HashMap<String, Vec<i64>> = (query.build_query_as::<(String, String)>())
            .fetch_all(&mut *self)
            .await?
            .into_iter()
            .map(|(tenant, points)| (tenant, parse_points(&points)))
            .collect();
        if cuts.is_empty() {
            return Ok(());
        }
        let mut sums: BTreeMap<(&str, &str, i64), Decimal> = BTreeMap::new();
        for row in rows {
            let Some(points) = cuts.get(&row.tenant_id) else {
                continue;
            };
            if let (Some(segment), Ok(quantity)) = (
                segment_of(points, row.occurred_at),
                Decimal::from_str(&row.quantity),
            ) {
                let key = (row.tenant_id.as_str(), row.meter.as_str(), segment);
                *sums.entry(key).or_default() += quantity;
            }
        }
        for ((tenant, meter, segment), quantity) in sums {
            let before: Option<(String,)> = sqlx::query_as(
                "SELECT quantity FROM credit_totals WHERE tenant_id = $1 AND meter = $2 AND segment = $3",
            )
            .bind(tenant)
            .bind(meter)
            .bind(segment)
            .fetch_optional(&mut *self)
            .await?;
            let before = before.and_then(|(q,)| Decimal::from_str(&q).ok());
            let after = before.unwrap_or_default() + quantity;
            sqlx::query(
                "INSERT INTO credit_totals (tenant_id, meter, segment, quantity) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (tenant_id, meter, segment) DO UPDATE SET quantity = excluded.quantity",
            )
            .bind(tenant)
            .bind(meter)
            .bind(segment)
            .bind(after.normalize().to_string())
            .execute(&mut *self)
            .await?;
        }
        Ok(())
    }
}

/// After usage rows were added to the totals in a plain write (not a check-and-record, which
/// judges its own burns), on the same transaction `$tx`: for each of their tenants with
/// low-balance settings, the balance before and after the rows in every unit they burn, seen
/// by the alarm ([`balance_changed!`](crate::store::balance_changed)). Tenants without settings
/// cost one statement for the batch. Needs `?` on `sqlx::Error`.
macro_rules! usage_alarms {
    ($tx:expr, $book:expr, $kept:expr) => {{
        use $crate::store::credit_totals::KeepTotals as _;
        let (book, kept): (&$crate::credits::book::CreditBook, &[&UsageRow]) = ($book, $kept);
        let tx = $tx;
        let mut tenants: Vec<&str> = kept.iter().map(|r| r.tenant_id.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut query = sqlx::QueryBuilder::new(
            "SELECT DISTINCT tenant_id FROM credit_settings WHERE tenant_id IN (",
        );
        let mut list = query.separated(", ");
        for tenant in &tenants {
            list.push_bind(*tenant);
        }
        query.push(")");
        let alarmed: Vec<(String,)> = query.build_query_as().fetch_all(&mut *tx).await?;
        let now = $crate::store::now_ms();
        for (tenant,) in alarmed {
            let state =
                $crate::store::credit_totals::tenant_state!(&mut *tx, &tenant).unwrap_or_default();
            let grants = match book.cached(&tenant, &state) {
                Some(grants) => grants,
                None => {
                    let rows = $crate::store::credit_totals::tenant_grant_rows!(&mut *tx, &tenant);
                    book.keep(&tenant, $crate::credits::book::TenantGrants::read(rows))
                }
            };
            // Totals not (yet) at the grants' cuts, which only a burn or a refresh may move:
            // this once, the log itself.
            let totals = match book.totals_current(&state, &grants) {
                true => state.totals,
                false => tx.totals_from_log(&tenant, &book.cuts_for(&grants)).await?,
            };
            let of_tenant: Vec<&UsageRow> = (kept.iter().copied())
                .filter(|r| r.tenant_id == tenant)
                .collect();
            for (unit, before, after) in book.balances_moved(&grants, &totals, &of_tenant, now) {
                let change = $crate::topup::BalanceChange {
                    tenant_id: &tenant,
                    unit: &unit,
                    available_before: before,
                    available_after: after,
                };
                $crate::store::balance_changed!(&mut *tx, &change, now);
            }
        }
    }};
}
pub(crate) use usage_alarms;
