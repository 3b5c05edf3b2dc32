//! Check-and-record: a usage event stored only when the meter's figure over a period allows
//! it, one at a time per tenant and meter, whichever replica records it. The figure comes from
//! the usage log, never from the counters (which may not have heard of another replica yet).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;
use serde_json::Value;

use super::{Metering, Rejection, sample_of};
use crate::catalog::Meter;
use crate::store::{Backend, StoreError, UsageRow, lease_key};

/// One lock per tenant and meter, in this process.
pub type RecordLocks = Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>;

/// What check-and-record did. Figures are the meter's over the period (`None`: no usage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Stored now.
    Stored {
        before: Option<Decimal>,
        after: Option<Decimal>,
    },
    /// An event with this id was stored before: nothing stored.
    Existing { used: Option<Decimal> },
    /// The figure did not allow it: nothing stored.
    Refused { used: Option<Decimal> },
    /// The event itself is invalid.
    Invalid(Rejection),
}

impl Metering {
    /// Stores `event` only when `allow(figure)` says so, `figure` being the meter's over
    /// `period` from the usage log. On PostgreSQL the database lock, the figure and the insert
    /// share one transaction, so one pooled connection (never two at once, which a full pool
    /// could not give); on SQLite, one process, an in-process lock does.
    pub async fn record_checked(
        &self,
        event: &Value,
        now: i64,
        period: (i64, i64),
        allow: impl FnOnce(Option<Decimal>) -> bool + Send,
    ) -> Result<Recorded, StoreError> {
        let (row, meter) = match self.validate(event, now) {
            Ok(valid) => valid,
            Err((code, message)) => {
                let index = 0;
                return Ok(Recorded::Invalid(Rejection {
                    index,
                    code,
                    message,
                }));
            }
        };
        // Only one of this process's calls per tenant and meter waits for the database lock.
        let lock = self.record_lock(&row.tenant_id, &meter.name);
        let _turn = lock.lock().await;
        let recorded = match self.db.backend() {
            Backend::Postgres => {
                self.record_in_one_transaction(&row, meter, period, allow)
                    .await?
            }
            Backend::Sqlite => self.record_under_lock(&row, meter, period, allow).await?,
        };
        if matches!(recorded, Recorded::Stored { .. }) {
            self.counters.record(
                &row.tenant_id,
                &meter.name,
                meter.aggregation,
                sample_of(&row),
            );
            self.metrics.add(
                "billsync_usage_accepted_total",
                "Usage events accepted.",
                &[],
                1,
            );
        }
        Ok(recorded)
    }

    async fn record_in_one_transaction(
        &self,
        row: &UsageRow,
        meter: &Meter,
        period: (i64, i64),
        allow: impl FnOnce(Option<Decimal>) -> bool + Send,
    ) -> Result<Recorded, StoreError> {
        let _gate = self.gate.read().await;
        let key = lease_key(&format!("record:{}/{}", row.tenant_id, meter.name));
        let payloads = |new: &[&UsageRow]| self.notifications(new);
        let checked = self
            .db
            .usage()
            .record_checked(row, meter.aggregation, (period, key), &payloads, |figure| {
                allow(decimal(figure))
            })
            .await?;
        let (before, after) = (
            decimal(checked.before.as_deref()),
            decimal(checked.after.as_deref()),
        );
        Ok(if checked.existed {
            Recorded::Existing { used: before }
        } else if checked.stored {
            Recorded::Stored { before, after }
        } else {
            Recorded::Refused { used: before }
        })
    }

    async fn record_under_lock(
        &self,
        row: &UsageRow,
        meter: &Meter,
        period: (i64, i64),
        allow: impl FnOnce(Option<Decimal>) -> bool + Send,
    ) -> Result<Recorded, StoreError> {
        let before = self
            .period_figure(&row.tenant_id, &meter.name, period)
            .await?;
        if self
            .db
            .usage()
            .exists(&row.tenant_id, &row.event_id)
            .await?
        {
            return Ok(Recorded::Existing { used: before });
        }
        if !allow(before) {
            return Ok(Recorded::Refused { used: before });
        }
        let stored = {
            let _gate = self.gate.read().await;
            let _turn = self.writer.lock().await;
            self.db.usage().insert(std::slice::from_ref(row)).await?[0]
        };
        if !stored {
            // A plain usage call with the same id got there first.
            return Ok(Recorded::Existing { used: before });
        }
        let after = self
            .period_figure(&row.tenant_id, &meter.name, period)
            .await?;
        Ok(Recorded::Stored { before, after })
    }

    fn record_lock(&self, tenant: &str, meter: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.record_locks.lock().expect("record locks");
        locks
            .entry((tenant.to_owned(), meter.to_owned()))
            .or_default()
            .clone()
    }
}

fn decimal(figure: Option<&str>) -> Option<Decimal> {
    figure
        .and_then(|f| Decimal::from_str(f).ok())
        .map(|d| d.normalize())
}
