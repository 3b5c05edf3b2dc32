//! Check-and-record: a usage event stored only when the meter's figure over a period allows
//! it, one at a time per tenant and meter, whichever replica records it. The figure comes from
//! the usage log, never from the counters (which may not have heard of another replica yet).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;
use serde_json::Value;

use tokio::sync::{Semaphore, oneshot};

use super::{Metering, Rejection, sample_of};
use crate::catalog::Meter;
use crate::credits::burn::{Burn, CreditCheck};
use crate::domain::Ceiling;
use crate::store::{
    Backend, CheckedRecord, DistinctDelta, RecordCheck, StoreError, UsageRow, lease_key,
};

/// One lock per tenant and meter (or credit unit), in this process (SQLite).
pub type RecordLocks = Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>;

/// Most check-and-records in one transaction.
const RECORD_BATCH: usize = 32;
/// Batch transactions at once (each holds one pooled connection).
const RECORD_TRANSACTIONS: usize = 4;

/// A queued check and where its answer goes.
type Queued = (
    RecordCheck,
    oneshot::Sender<Result<CheckedRecord, StoreError>>,
);

/// PostgreSQL's check-and-records, batched: each call queues its check, and whoever holds one
/// of [`RECORD_TRANSACTIONS`] permits runs the waiting checks in batches of up to
/// [`RECORD_BATCH`], one transaction each, until the queue is empty. Every waiting call also
/// waits for a permit, so a check queued just as a batch ended is run by its own caller. A
/// transaction that notifies other replicas commits alone database-wide: one commit per
/// record would bound the rate at one commit's latency.
pub struct RecordQueue {
    waiting: Mutex<Vec<Queued>>,
    running: Semaphore,
}

impl RecordQueue {
    /// The oldest waiting checks, at most one per tenant and meter (a later one of the same
    /// waits for the next batch, which sees this one's record).
    fn next_batch(&self) -> Vec<Queued> {
        let mut waiting = self.waiting.lock().expect("record queue");
        let mut keys = std::collections::HashSet::new();
        let mut batch = Vec::new();
        let mut left = Vec::with_capacity(waiting.len());
        for entry in waiting.drain(..) {
            if batch.len() < RECORD_BATCH && keys.insert(entry.0.lock_key) {
                batch.push(entry);
            } else {
                left.push(entry);
            }
        }
        *waiting = left;
        batch
    }
}

impl Default for RecordQueue {
    fn default() -> Self {
        Self {
            waiting: Mutex::default(),
            running: Semaphore::new(RECORD_TRANSACTIONS),
        }
    }
}

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
    /// Stores `event` only when the meter's figure over `period`, from the usage log, is within
    /// `ceiling`. On PostgreSQL the database lock, the figure and the insert
    /// share one transaction, so one pooled connection (never two at once, which a full pool
    /// could not give), batched with other calls; on SQLite, one process, an in-process lock
    /// does.
    pub async fn record_checked(
        &self,
        event: &Value,
        now: i64,
        period: (i64, i64),
        ceiling: Ceiling,
    ) -> Result<Recorded, StoreError> {
        Ok(self.record_with(event, now, period, ceiling, None).await?.0)
    }

    /// Stores `event`, of a credit-priced feature's meter, only when the tenant's credits in
    /// the check's unit cover it, judged from the grants and the usage log under one lock per
    /// tenant and unit (on every replica); also the balance before and with the event.
    pub async fn record_credits(
        &self,
        event: &Value,
        now: i64,
        credit: CreditCheck,
    ) -> Result<(Recorded, Option<Burn>), StoreError> {
        self.record_with(event, now, (0, 0), Ceiling::Unlimited, Some(credit))
            .await
    }

    async fn record_with(
        &self,
        event: &Value,
        now: i64,
        period: (i64, i64),
        ceiling: Ceiling,
        credit: Option<CreditCheck>,
    ) -> Result<(Recorded, Option<Burn>), StoreError> {
        let (row, meter) = match self.validate(event, now) {
            Ok(valid) => valid,
            Err((code, message)) => {
                let index = 0;
                let rejection = Rejection {
                    index,
                    code,
                    message,
                };
                return Ok((Recorded::Invalid(rejection), None));
            }
        };
        let lock_name = match &credit {
            Some(credit) => credit.lock_name(&row.tenant_id),
            None => format!("record:{}/{}", row.tenant_id, meter.name),
        };
        match self.db.backend() {
            Backend::Postgres => {
                let check = RecordCheck {
                    row: row.clone(),
                    aggregation: meter.aggregation,
                    period,
                    lock_key: lease_key(&lock_name),
                    ceiling,
                    credit,
                };
                self.record_in_a_batch(check).await
            }
            Backend::Sqlite => {
                let lock = self.record_lock(&row.tenant_id, &lock_name);
                let _turn = lock.lock().await;
                let burn = match &credit {
                    Some(credit) => Some(credit.judge_from_store(&self.db, &row).await?),
                    None => None,
                };
                let covered = burn.as_ref().is_none_or(|b| b.covered);
                let ceiling = if covered { ceiling } else { Ceiling::Never };
                let change = burn.as_ref().map(|b| b.change(&row.tenant_id));
                let recorded =
                    (self.record_under_lock(&row, meter, period, ceiling, change.as_ref())).await?;
                if matches!(recorded, Recorded::Stored { .. }) {
                    self.count_recorded(&row);
                }
                Ok((recorded, burn))
            }
        }
    }

    /// PostgreSQL: queues the check for the next batch transaction and, while no batch runs
    /// for it, runs batches itself (see [`RecordQueue`]).
    async fn record_in_a_batch(
        &self,
        check: RecordCheck,
    ) -> Result<(Recorded, Option<Burn>), StoreError> {
        let (reply, mut answer) = oneshot::channel();
        self.record_queue
            .waiting
            .lock()
            .expect("record queue")
            .push((check, reply));
        let checked = loop {
            tokio::select! {
                biased;
                answer = &mut answer => break answer.unwrap_or_else(|_| {
                    Err(StoreError::Setup("the batch holding this record stopped".to_owned()))
                })?,
                permit = self.record_queue.running.acquire() => {
                    let _permit = permit.expect("the record queue's semaphore is never closed");
                    self.run_record_batch().await;
                }
            }
        };
        let (before, after) = (
            decimal(checked.before.as_deref()),
            decimal(checked.after.as_deref()),
        );
        let recorded = if checked.existed {
            Recorded::Existing { used: before }
        } else if checked.stored {
            Recorded::Stored { before, after }
        } else {
            Recorded::Refused { used: before }
        };
        Ok((recorded, checked.burn))
    }

    /// Runs one batch of the queued check-and-records (the oldest), answering each. A caller
    /// runs one batch per permit, so that its own answer never waits behind later arrivals.
    async fn run_record_batch(&self) {
        {
            let batch = self.record_queue.next_batch();
            if batch.is_empty() {
                return;
            }
            let (checks, replies): (Vec<RecordCheck>, Vec<_>) = batch.into_iter().unzip();
            let payloads =
                |new: &[&UsageRow], distinct: &[DistinctDelta]| self.notifications(new, distinct);
            let _gate = self.gate.read().await;
            match (self.db.usage().keeping(&self.credits))
                .record_checked(&checks, &payloads)
                .await
            {
                Ok((records, distinct)) => {
                    self.counters.merge_distinct(&distinct);
                    for ((record, check), reply) in records.into_iter().zip(&checks).zip(replies) {
                        if record.stored {
                            self.count_recorded(&check.row);
                        }
                        let _ = reply.send(Ok(record));
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, records = replies.len(), "check-and-record batch failed");
                    for reply in replies {
                        let _ = reply.send(Err(error.shared()));
                    }
                }
            }
        }
    }

    /// Counts a recorded event in the counters (but for distinct values, counted from what
    /// the database returned) and the metrics, as ingest does.
    fn count_recorded(&self, row: &UsageRow) {
        self.revenue.usage_arrived(row.occurred_at);
        if let Some(meter) = self.folded_meter(&row.meter) {
            let sample = sample_of(row);
            self.counters
                .record(&row.tenant_id, &meter.name, meter.aggregation, sample);
        }
        self.metrics.add(
            "billsync_usage_accepted_total",
            "Usage events accepted.",
            &[],
            1,
        );
    }

    async fn record_under_lock(
        &self,
        row: &UsageRow,
        meter: &Meter,
        period: (i64, i64),
        ceiling: Ceiling,
        change: Option<&crate::topup::BalanceChange<'_>>,
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
        if !ceiling.admits(before) {
            return Ok(Recorded::Refused { used: before });
        }
        let stored = {
            let _gate = self.gate.read().await;
            let _turn = self.writer.lock().await;
            let usage = self.db.usage().keeping(&self.credits);
            let inserted = usage.insert_burning(row, change).await?;
            self.counters.merge_distinct(&inserted.distinct);
            inserted.new[0]
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
