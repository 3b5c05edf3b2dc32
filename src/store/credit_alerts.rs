//! Per-tenant credit settings and the crossing of their thresholds ([`crate::topup`]).

use rust_decimal::Decimal;

use super::{Db, StoreError, on_pool};
use crate::topup::CreditSettings;

/// A tenant's settings for one unit, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CreditSettingsRow {
    pub tenant_id: String,
    pub unit: String,
    pub threshold: String,
    pub top_up_amount: Option<String>,
    pub auto_top_up: i32,
    pub armed: i32,
    pub crossings: i32,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One crossing, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CrossingRow {
    pub tenant_id: String,
    pub unit: String,
    pub seq: i32,
    pub threshold: String,
    pub available_before: String,
    pub available_after: String,
    pub event_id: String,
    pub command_id: Option<String>,
    pub created_at: i64,
}

impl CreditSettingsRow {
    /// The settings as [`crate::topup`] reads them; a value that does not parse is a decode
    /// error (only billsync writes them).
    pub fn parsed(&self) -> Result<CreditSettings, sqlx::Error> {
        let decode = |e: String| sqlx::Error::Decode(e.into());
        let threshold: Decimal = self
            .threshold
            .parse()
            .map_err(|e| decode(format!("credit_settings.threshold: {e}")))?;
        let top_up_amount = match &self.top_up_amount {
            Some(a) => Some(
                a.parse::<i64>()
                    .map_err(|e| decode(format!("credit_settings.top_up_amount: {e}")))?,
            ),
            None => None,
        };
        Ok(CreditSettings {
            threshold,
            top_up_amount,
            auto_top_up: self.auto_top_up != 0,
            armed: self.armed != 0,
            crossings: i64::from(self.crossings),
        })
    }
}

macro_rules! settings_columns {
    () => {
        "tenant_id, unit, threshold, top_up_amount, auto_top_up, armed, crossings, created_at, \
         updated_at"
    };
}

/// Called inside the transaction that changes a tenant's available balance in a unit, with the
/// balance before and after ([`crate::topup::BalanceChange`]): records a crossing of the
/// tenant's threshold once (its notification and, with auto top-up, its top-up command in the
/// same transaction), or re-arms the alarm. Evaluates to the crossing's number, if one
/// happened. Needs `?` on `sqlx::Error`.
macro_rules! balance_changed {
    ($conn:expr, $change:expr, $now_ms:expr) => {{
        let change: &$crate::topup::BalanceChange<'_> = $change;
        let now_ms: i64 = $now_ms;
        let row = sqlx::query_as::<_, $crate::store::CreditSettingsRow>(
            "SELECT tenant_id, unit, threshold, top_up_amount, auto_top_up, armed, crossings, \
             created_at, updated_at FROM credit_settings WHERE tenant_id = $1 AND unit = $2",
        )
        .bind(change.tenant_id)
        .bind(change.unit)
        .fetch_optional($conn)
        .await?;
        let mut crossed: Option<i64> = None;
        if let Some(row) = row {
            let settings = row.parsed()?;
            match $crate::topup::alarm(&settings, change) {
                $crate::topup::Alarm::Cross => {
                    // Taken by whichever transaction counts it first; the others find the
                    // count moved (PostgreSQL re-reads the row after waiting for its lock).
                    let taken = sqlx::query(
                        "UPDATE credit_settings SET armed = 0, crossings = crossings + 1, \
                         updated_at = $4 WHERE tenant_id = $1 AND unit = $2 AND crossings = $3",
                    )
                    .bind(change.tenant_id)
                    .bind(change.unit)
                    .bind(row.crossings)
                    .bind(now_ms)
                    .execute($conn)
                    .await?
                    .rows_affected()
                        > 0;
                    if taken {
                        let seq = settings.crossings + 1;
                        let rows = $crate::topup::crossing_rows(&settings, change, seq, now_ms);
                        $crate::store::insert_crossing!($conn, change, &settings, &rows, now_ms);
                        crossed = Some(seq);
                    }
                }
                $crate::topup::Alarm::Rearm => {
                    sqlx::query(
                        "UPDATE credit_settings SET armed = 1, updated_at = $3 \
                         WHERE tenant_id = $1 AND unit = $2 AND armed = 0",
                    )
                    .bind(change.tenant_id)
                    .bind(change.unit)
                    .bind(now_ms)
                    .execute($conn)
                    .await?;
                }
                $crate::topup::Alarm::Stay => {}
            }
        }
        crossed
    }};
}
pub(crate) use balance_changed;

/// The crossing's row, its notification and its command (see [`balance_changed!`]).
macro_rules! insert_crossing {
    ($conn:expr, $change:expr, $settings:expr, $rows:expr, $now_ms:expr) => {{
        let rows: &$crate::topup::CrossingRows = $rows;
        sqlx::query(
            "INSERT INTO credit_crossings (tenant_id, unit, seq, threshold, available_before, \
             available_after, event_id, command_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind($change.tenant_id)
        .bind($change.unit)
        .bind(rows.seq as i32)
        .bind($settings.threshold.to_string())
        .bind($change.available_before.to_string())
        .bind($change.available_after.to_string())
        .bind(&rows.notification.event_id)
        .bind(rows.command.as_ref().map(|c| c.command_id.clone()))
        .bind($now_ms)
        .execute($conn)
        .await?;
        $crate::store::insert_notification!($conn, &rows.notification, $now_ms).await?;
        if let Some(command) = &rows.command {
            $crate::store::insert_command!($conn, $change.tenant_id, command, $now_ms).await?;
        }
    }};
}
pub(crate) use insert_crossing;

/// [`balance_changed!`] for each of a PostgreSQL batch's changes, on its transaction: one
/// statement finds which (tenant, unit) have settings, so that a batch of tenants without any
/// costs one round trip, not one per change.
pub(super) async fn balances_changed_in(
    tx: &mut sqlx::PgConnection,
    changes: &[crate::topup::BalanceChange<'_>],
) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = changes.iter().map(|c| c.tenant_id).collect();
    let units: Vec<&str> = changes.iter().map(|c| c.unit).collect();
    let with_settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.tenant_id, s.unit FROM credit_settings s \
         JOIN unnest($1::text[], $2::text[]) AS c(tenant_id, unit) \
         ON s.tenant_id = c.tenant_id AND s.unit = c.unit",
    )
    .bind(&tenants)
    .bind(&units)
    .fetch_all(&mut *tx)
    .await?;
    let now = super::now_ms();
    for change in changes {
        let key = (change.tenant_id, change.unit);
        if with_settings
            .iter()
            .any(|(t, u)| (t.as_str(), u.as_str()) == key)
        {
            balance_changed!(&mut *tx, change, now);
        }
    }
    Ok(())
}

pub struct CreditAlerts<'a> {
    db: &'a Db,
}

impl<'a> CreditAlerts<'a> {
    pub(super) fn new(db: &'a Db) -> Self {
        Self { db }
    }

    /// The tenant's settings, by unit.
    pub async fn settings_of(&self, tenant_id: &str) -> Result<Vec<CreditSettingsRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, CreditSettingsRow>(concat!(
                "SELECT ",
                settings_columns!(),
                " FROM credit_settings WHERE tenant_id = $1 ORDER BY unit"
            ))
            .bind(tenant_id)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// Creates or replaces the settings of one unit; the alarm's state and the crossings'
    /// count stay.
    pub async fn put(
        &self,
        tenant_id: &str,
        unit: &str,
        threshold: Decimal,
        top_up_amount: Option<i64>,
        auto_top_up: bool,
        now_ms: i64,
    ) -> Result<CreditSettingsRow, StoreError> {
        let row = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, CreditSettingsRow>(concat!(
                "INSERT INTO credit_settings (tenant_id, unit, threshold, top_up_amount, \
                 auto_top_up, armed, crossings, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 1, 0, $6, $6) \
                 ON CONFLICT (tenant_id, unit) DO UPDATE SET threshold = excluded.threshold, \
                 top_up_amount = excluded.top_up_amount, auto_top_up = excluded.auto_top_up, \
                 updated_at = excluded.updated_at RETURNING ",
                settings_columns!()
            ))
            .bind(tenant_id)
            .bind(unit)
            .bind(threshold.to_string())
            .bind(top_up_amount.map(|a| a.to_string()))
            .bind(i32::from(auto_top_up))
            .bind(now_ms)
            .fetch_one(pool)
            .await
        })?;
        Ok(row)
    }

    /// The tenant's crossings in a unit, oldest first.
    pub async fn crossings(
        &self,
        tenant_id: &str,
        unit: &str,
    ) -> Result<Vec<CrossingRow>, StoreError> {
        let rows = on_pool!(self.db, |pool| {
            sqlx::query_as::<_, CrossingRow>(
                "SELECT tenant_id, unit, seq, threshold, available_before, available_after, \
                 event_id, command_id, created_at FROM credit_crossings \
                 WHERE tenant_id = $1 AND unit = $2 ORDER BY seq",
            )
            .bind(tenant_id)
            .bind(unit)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows)
    }

    /// [`balance_changed!`] in a transaction of its own, for a change stored elsewhere (and for
    /// tests).
    pub async fn balance_changed(
        &self,
        change: &crate::topup::BalanceChange<'_>,
        now_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let crossed = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let crossed = balance_changed!(&mut *tx, change, now_ms);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(crossed)
        })?;
        Ok(crossed)
    }
}
