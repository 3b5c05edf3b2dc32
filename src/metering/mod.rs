//! Metering: usage events are validated, de-duplicated on (tenant, event id) and stored in one
//! transaction before the answer; the in-memory counters count them at once (they answer
//! entitlement checks); the pusher carries them to Stripe's billing meters with identifiers
//! fixed before the first send, its figures computed from the usage log over exact billing
//! periods, never from the counters.

mod announce;
pub mod counters;
mod group;
pub mod periods;
pub mod pusher;
mod record;
mod snapshot;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;

use chrono::DateTime;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

use crate::catalog::{Aggregation, Catalog, Meter};
use crate::domain::TenantId;
use crate::metrics::Metrics;
use crate::store::{Backend, Db, DistinctDelta, Inserted, StoreError, UsageRow, UsageWriter};
pub use announce::Heard;
use counters::{Bucket, Counters, Sample};
pub use group::WaitingBatches;
pub use periods::{billing_period, calendar_month};
pub use record::{RecordLocks, RecordQueue, Recorded};

/// How far ahead of now an event's timestamp may be.
const MAX_AHEAD_MS: i64 = 5 * 60 * 1000;

/// One refused event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub index: usize,
    pub code: &'static str,
    pub message: String,
}

/// The answer to a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ingested {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: Vec<Rejection>,
}

#[derive(Clone)]
pub struct Metering {
    pub db: Db,
    pub catalog: Arc<Catalog>,
    pub counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
    /// SQLite takes one writer at a time and makes the others sleep and poll; queueing batches
    /// here instead keeps the tail latency down. Usage batches are stored on its connection.
    pub writer: Arc<tokio::sync::Mutex<UsageWriter>>,
    /// Usage batches waiting for the SQLite writer, stored together (see `group`).
    pub waiting: Arc<WaitingBatches>,
    /// Held shared by every ingest and exclusively by a rebuild, so that a rebuild's read of
    /// the database and the swap of the counters see no local ingest in between.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    /// This replica's id: the usage notifications it sends carry it, and it skips its own.
    pub origin: Arc<str>,
    /// Check-and-record's locks per tenant and meter (SQLite).
    pub record_locks: Arc<RecordLocks>,
    /// Check-and-records waiting for a batch transaction (PostgreSQL).
    pub record_queue: Arc<RecordQueue>,
    /// Told when usage arrives, for the revenue schedules of metered lines.
    pub revenue: Arc<crate::revenue::RevenueCache>,
    /// The catalog's credit-priced meters (whose usage the running credit totals keep) and the
    /// tenants' grants last read.
    pub credits: Arc<crate::credits::book::CreditBook>,
}

impl Metering {
    /// Validates, stores (durably, in one transaction) and counts a batch of usage events.
    pub async fn ingest(&self, events: &[Value], now: i64) -> Result<Ingested, StoreError> {
        self.ingest_visible(events, now, &|_| true).await
    }

    /// [`Self::ingest`] for a caller that may only see some tenants; others are unknown to it.
    pub async fn ingest_visible(
        &self,
        events: &[Value],
        now: i64,
        visible: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Ingested, StoreError> {
        let mut outcome = Ingested::default();
        let mut valid: Vec<(usize, UsageRow, &Meter)> = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            match self.validate(event, now) {
                Ok((row, meter)) => valid.push((index, row, meter)),
                Err((code, message)) => outcome.rejected.push(Rejection {
                    index,
                    code,
                    message,
                }),
            }
        }
        let (rows, meters) = self.admit(&valid, visible, &mut outcome).await?;
        let Inserted {
            new: inserted,
            distinct,
        } = self.store(&rows).await?;
        let earliest = rows.iter().zip(&inserted).filter(|(_, new)| **new);
        if let Some(earliest) = earliest.map(|(row, _)| row.occurred_at).min() {
            self.revenue.usage_arrived(earliest);
        }
        for ((row, meter), new) in rows.iter().zip(&meters).zip(&inserted) {
            if !new {
                outcome.duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            if meter.aggregation != Aggregation::UniqueCount {
                let sample = sample_of(row);
                (self.counters).record(&row.tenant_id, &meter.name, meter.aggregation, sample);
            }
        }
        self.counters.merge_distinct(&distinct);
        outcome.rejected.sort_by_key(|r| r.index);
        self.count(&outcome);
        Ok(outcome)
    }

    /// The valid events of known (and visible) tenants, each once per batch: a repeat within
    /// the batch is a duplicate like any other. The others are counted into `outcome`.
    async fn admit<'c>(
        &self,
        valid: &[(usize, UsageRow, &'c Meter)],
        visible: &(dyn Fn(&str) -> bool + Sync),
        outcome: &mut Ingested,
    ) -> Result<(Vec<UsageRow>, Vec<&'c Meter>), StoreError> {
        let tenants: HashSet<&str> = valid.iter().map(|(_, r, _)| r.tenant_id.as_str()).collect();
        let tenants: Vec<&str> = tenants.into_iter().collect();
        let known = self.db.tenants().existing(&tenants).await?;
        let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(valid.len());
        let mut rows = Vec::with_capacity(valid.len());
        let mut meters = Vec::with_capacity(valid.len());
        for (index, row, meter) in valid {
            if !known.contains(&row.tenant_id) || !visible(&row.tenant_id) {
                outcome.rejected.push(Rejection {
                    index: *index,
                    code: "unknown_tenant",
                    message: format!("no tenant `{}`", row.tenant_id),
                });
            } else if !seen.insert((row.tenant_id.as_str(), row.event_id.as_str())) {
                outcome.duplicates += 1;
            } else {
                rows.push(row.clone());
                meters.push(*meter);
            }
        }
        Ok((rows, meters))
    }

    /// Inserts the rows in one transaction (on SQLite one writer at a time, with the batches
    /// waiting beside them; on PostgreSQL with the notifications other replicas count from);
    /// whether each was new, and the distinct counts' changes.
    async fn store(&self, rows: &[UsageRow]) -> Result<Inserted, StoreError> {
        let _gate = self.gate.read().await;
        match self.db.backend() {
            Backend::Sqlite => self.store_in_a_group(rows).await,
            Backend::Postgres => {
                let payloads = |new: &[&UsageRow], distinct: &[DistinctDelta]| {
                    self.notifications(new, distinct)
                };
                (self.db.usage().keeping(&self.credits))
                    .insert_notifying(rows, &payloads)
                    .await
            }
        }
    }

    /// Copies SQLite's write-ahead log into the database file, between two usage batches so
    /// that it copies all of it and the next batch writes the log from its start again (see
    /// [`UsageWriter::checkpoint`]); nothing on PostgreSQL.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        self.writer.lock().await.checkpoint(&self.db).await
    }

    fn count(&self, outcome: &Ingested) {
        let count = |name, help, n: usize| self.metrics.add(name, help, &[], n as u64);
        count(
            "billsync_usage_accepted_total",
            "Usage events accepted.",
            outcome.accepted,
        );
        count(
            "billsync_usage_duplicates_total",
            "Usage events already stored.",
            outcome.duplicates,
        );
        count(
            "billsync_usage_rejected_total",
            "Usage events refused.",
            outcome.rejected.len(),
        );
    }

    /// Checks one event against the catalog and the clock.
    pub(crate) fn validate<'c>(
        &'c self,
        event: &Value,
        now: i64,
    ) -> Result<(UsageRow, &'c Meter), Refusal> {
        let text = |field: &str| event[field].as_str();
        let id = text("id").ok_or(("missing_field", "id is required".to_owned()))?;
        if id.is_empty() || id.len() > 255 {
            return Err(("invalid_id", "id must be 1 to 255 characters".to_owned()));
        }
        let tenant =
            text("tenant_id").ok_or(("missing_field", "tenant_id is required".to_owned()))?;
        TenantId::parse(tenant).map_err(|e| ("invalid_tenant_id", e.message))?;
        let meter_name = text("meter").ok_or(("missing_field", "meter is required".to_owned()))?;
        let meter = self.catalog.meters.get(meter_name).ok_or_else(|| {
            (
                "unknown_meter",
                format!("no meter `{meter_name}` in the catalog"),
            )
        })?;
        let quantity = quantity_of(event, meter)?;
        let occurred_at = occurred_at(event, meter, now)?;
        let properties = &event["properties"];
        if !(properties.is_null() || properties.is_object()) {
            return Err((
                "invalid_properties",
                "properties must be an object".to_owned(),
            ));
        }
        let row = UsageRow {
            tenant_id: tenant.to_owned(),
            event_id: id.to_owned(),
            meter: meter.name.clone(),
            quantity: quantity.normalize().to_string(),
            occurred_at,
            unique_value: unique_value(properties, meter)?,
            properties: (!properties.is_null()).then(|| properties.to_string()),
            received_at: now,
            push_id: None,
        };
        Ok((row, meter))
    }

    /// The meter's figure for the tenant over exactly `[from_ms, to_ms)`, from the usage log
    /// itself, whatever replica recorded it and whatever the counters have heard: what is
    /// pushed to the vendor and what hard limits are checked against. `None` without usage.
    pub async fn period_figure(
        &self,
        tenant: &str,
        meter: &str,
        period: (i64, i64),
    ) -> Result<Option<Decimal>, StoreError> {
        let Some(aggregation) = self.catalog.meters.get(meter).map(|m| m.aggregation) else {
            return Ok(None);
        };
        let usage = self.db.usage();
        let figure = match self.db.backend() {
            Backend::Postgres => usage
                .period_figure(tenant, meter, aggregation, period)
                .await?
                .and_then(|f| Decimal::from_str(&f).ok()),
            Backend::Sqlite => {
                let mut folded: Option<Bucket> = None;
                usage
                    .each_of_meter(tenant, meter, period, |row| {
                        let bucket = Bucket::of(aggregation, sample_of(&row));
                        match &mut folded {
                            Some(f) => f.merge(&bucket),
                            None => folded = Some(bucket),
                        }
                    })
                    .await?;
                folded.map(|b| b.value())
            }
        };
        Ok(figure.map(|f| f.normalize()))
    }

    /// The meter's usage for the tenant in the billing period holding `at_ms`, as the counters
    /// have it.
    pub async fn period_usage(
        &self,
        tenant: &str,
        meter: &str,
        at_ms: i64,
    ) -> Result<Option<Decimal>, StoreError> {
        let (from, to) = billing_period(&self.db, tenant, at_ms).await?;
        Ok(self
            .counters
            .fold(tenant, meter, from, to)
            .map(|b| b.value_from(from)))
    }
}

/// A stored event as the counters take it.
pub(crate) fn sample_of(row: &UsageRow) -> Sample<'_> {
    Sample {
        quantity: Decimal::from_str(&row.quantity).unwrap_or_default(),
        at_ms: row.occurred_at,
        event_id: &row.event_id,
        unique_value: row.unique_value.as_deref(),
    }
}

/// Why an event was refused: its code and message.
pub(crate) type Refusal = (&'static str, String);

/// An event's quantity, exact; one for meters that count events or distinct values.
fn quantity_of(event: &Value, meter: &Meter) -> Result<Decimal, Refusal> {
    match crate::domain::parse_quantity(&event["quantity"], meter.allow_negative) {
        Ok(Some(quantity)) => Ok(quantity),
        Ok(None)
            if matches!(
                meter.aggregation,
                Aggregation::Count | Aggregation::UniqueCount
            ) =>
        {
            Ok(Decimal::ONE)
        }
        Ok(None) => Err(("missing_field", "quantity is required".to_owned())),
        Err(refused) => Err((refused.code, refused.message.to_owned())),
    }
}

/// When the event happened (Unix ms; `now` without a timestamp): at most five minutes ahead,
/// and within the meter's late window.
fn occurred_at(event: &Value, meter: &Meter, now: i64) -> Result<i64, Refusal> {
    let occurred_at = match &event["timestamp"] {
        Value::Null => now,
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|_| {
                let message = format!("timestamp `{s}` is not RFC 3339");
                ("invalid_timestamp", message)
            })?
            .timestamp_millis(),
        _ => {
            let message = "timestamp must be an RFC 3339 string".to_owned();
            return Err(("invalid_timestamp", message));
        }
    };
    if occurred_at > now + MAX_AHEAD_MS {
        let message = "timestamp is more than 5 minutes ahead".to_owned();
        return Err(("timestamp_in_future", message));
    }
    if occurred_at < now - meter.late_window.as_millis() as i64 {
        let message = format!(
            "timestamp is older than meter `{}`'s late window",
            meter.name
        );
        return Err(("timestamp_too_old", message));
    }
    Ok(occurred_at)
}

/// The value a `unique_count` meter counts, from the event's properties.
fn unique_value(properties: &Value, meter: &Meter) -> Result<Option<String>, Refusal> {
    let (Some(property), Aggregation::UniqueCount) = (&meter.property, meter.aggregation) else {
        return Ok(None);
    };
    match &properties[property.as_str()] {
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        _ => {
            let message = format!(
                "meter `{}` counts distinct properties.{property}",
                meter.name
            );
            Err(("missing_property", message))
        }
    }
}
