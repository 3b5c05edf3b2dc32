//! Metering: usage events are validated, de-duplicated on (tenant, event id) and stored in one
//! transaction before the answer; the in-memory counters count them at once; the pusher carries
//! them to Stripe's billing meters with identifiers fixed before the first send.

pub mod counters;
pub mod pusher;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Aggregation, Catalog, Meter};
use crate::domain::TenantId;
use crate::metrics::Metrics;
use crate::store::{Backend, Db, StoreError, TxSnapshot, UsageRow, now_ms};
use counters::{Bucket, Counters, Sample, hour_of};

/// How far ahead of now an event's timestamp may be.
const MAX_AHEAD_MS: i64 = 5 * 60 * 1000;
/// Events received this recently are left out of a snapshot: their transactions may still be
/// committing, and start-up replays everything after the snapshot anyway.
const SNAPSHOT_LAG_MS: i64 = 60_000;
const WATERMARK: &str = "usage.snapshot_until";

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
    /// here instead keeps the tail latency down.
    pub writer: Arc<tokio::sync::Mutex<()>>,
    /// Held shared by every ingest and exclusively by a rebuild, so that a rebuild's read of
    /// the database and the swap of the counters see no local ingest in between.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    /// This replica's id: the usage notifications it sends carry it, and it skips its own.
    pub origin: Arc<str>,
}

/// Largest `billsync_usage` notification payload (PostgreSQL's limit is 8000 bytes).
const NOTIFY_MAX_BYTES: usize = 7000;
/// Distinct values per announced bucket piece.
const UNIQUE_PER_ENTRY: usize = 32;

/// What a usage notification from another replica did to the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Counted.
    Counted,
    /// Sent by this replica (already counted) or by a transaction the last rebuild read.
    Known,
    /// Too large to carry its usage, or unreadable: the counters must be rebuilt.
    Resync,
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

        let tenants: Vec<&str> = valid
            .iter()
            .map(|(_, r, _)| r.tenant_id.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let known = self.db.tenants().existing(&tenants).await?;
        let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(valid.len());
        let mut rows = Vec::with_capacity(valid.len());
        let mut meters = Vec::with_capacity(valid.len());
        for (index, row, meter) in &valid {
            if !known.contains(&row.tenant_id) || !visible(&row.tenant_id) {
                outcome.rejected.push(Rejection {
                    index: *index,
                    code: "unknown_tenant",
                    message: format!("no tenant `{}`", row.tenant_id),
                });
                continue;
            }
            // A repeat within the batch is a duplicate like any other.
            if !seen.insert((row.tenant_id.as_str(), row.event_id.as_str())) {
                outcome.duplicates += 1;
                continue;
            }
            rows.push(row.clone());
            meters.push(*meter);
        }

        let _gate = self.gate.read().await;
        let inserted = match self.db.backend() {
            Backend::Sqlite => {
                let _turn = self.writer.lock().await;
                self.db.usage().insert(&rows).await?
            }
            Backend::Postgres => {
                let payloads = |new: &[&UsageRow]| self.notifications(new);
                self.db.usage().insert_notifying(&rows, &payloads).await?
            }
        };
        for ((row, meter), new) in rows.iter().zip(&meters).zip(&inserted) {
            if !new {
                outcome.duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            self.counters.record(
                &row.tenant_id,
                &meter.name,
                meter.aggregation,
                sample_of(row),
            );
        }
        outcome.rejected.sort_by_key(|r| r.index);
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
        Ok(outcome)
    }

    /// Checks one event against the catalog and the clock.
    fn validate<'c>(
        &'c self,
        event: &Value,
        now: i64,
    ) -> Result<(UsageRow, &'c Meter), (&'static str, String)> {
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
        let parsed = crate::domain::parse_quantity(&event["quantity"], meter.allow_negative);
        let quantity = match parsed {
            Ok(Some(quantity)) => quantity,
            // Counting events or distinct values needs no quantity.
            Ok(None)
                if matches!(
                    meter.aggregation,
                    Aggregation::Count | Aggregation::UniqueCount
                ) =>
            {
                Decimal::ONE
            }
            Ok(None) => return Err(("missing_field", "quantity is required".to_owned())),
            Err(refused) => return Err((refused.code, refused.message.to_owned())),
        };
        let occurred_at = match &event["timestamp"] {
            Value::Null => now,
            Value::String(s) => DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    (
                        "invalid_timestamp",
                        format!("timestamp `{s}` is not RFC 3339"),
                    )
                })?
                .timestamp_millis(),
            _ => {
                return Err((
                    "invalid_timestamp",
                    "timestamp must be an RFC 3339 string".to_owned(),
                ));
            }
        };
        if occurred_at > now + MAX_AHEAD_MS {
            return Err((
                "timestamp_in_future",
                "timestamp is more than 5 minutes ahead".to_owned(),
            ));
        }
        if occurred_at < now - meter.late_window.as_millis() as i64 {
            return Err((
                "timestamp_too_old",
                format!("timestamp is older than meter `{meter_name}`'s late window"),
            ));
        }
        let properties = &event["properties"];
        if !(properties.is_null() || properties.is_object()) {
            return Err((
                "invalid_properties",
                "properties must be an object".to_owned(),
            ));
        }
        let unique_value = match (&meter.property, meter.aggregation) {
            (Some(property), Aggregation::UniqueCount) => {
                Some(match &properties[property.as_str()] {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => {
                        return Err((
                            "missing_property",
                            format!("meter `{meter_name}` counts distinct properties.{property}"),
                        ));
                    }
                })
            }
            _ => None,
        };
        Ok((
            UsageRow {
                tenant_id: tenant.to_owned(),
                event_id: id.to_owned(),
                meter: meter.name.clone(),
                quantity: quantity.normalize().to_string(),
                occurred_at,
                unique_value,
                properties: (!properties.is_null()).then(|| properties.to_string()),
                received_at: now,
                push_id: None,
            },
            meter,
        ))
    }

    /// Rebuilds the counters: the stored snapshot, then every event received after it, read at
    /// one instant and swapped in whole. Returns how many events it replayed and, on
    /// PostgreSQL, which transactions the read saw (their notifications are not counted again).
    pub async fn rebuild(&self) -> Result<(usize, Option<TxSnapshot>), StoreError> {
        let _gate = self.gate.write().await;
        let state = self.db.usage().counter_state(WATERMARK).await?;
        let fresh = Counters::default();
        for (tenant, meter, hour, bucket) in &state.buckets {
            match serde_json::from_str::<Bucket>(bucket) {
                Ok(bucket) => fresh.merge(tenant, meter, *hour, &bucket),
                Err(error) => {
                    tracing::error!(tenant, meter, hour, error = %error, "unreadable usage snapshot bucket")
                }
            }
        }
        for row in &state.rows {
            if let Some(meter) = self.catalog.meters.get(&row.meter) {
                fresh.record(
                    &row.tenant_id,
                    &meter.name,
                    meter.aggregation,
                    sample_of(row),
                );
            }
        }
        self.counters.replace_with(fresh);
        Ok((state.rows.len(), state.seen))
    }

    /// The `billsync_usage` notifications announcing `rows` to the other replicas: their
    /// buckets per tenant, meter and hour, as `<origin> <JSON>` payloads small enough to send.
    fn notifications(&self, rows: &[&UsageRow]) -> Vec<String> {
        let mut buckets: HashMap<(&str, &str, i64), Bucket> = HashMap::new();
        for row in rows {
            let Some(meter) = self.catalog.meters.get(&row.meter) else {
                continue;
            };
            let bucket = Bucket::of(meter.aggregation, sample_of(row));
            buckets
                .entry((&row.tenant_id, &row.meter, hour_of(row.occurred_at)))
                .and_modify(|b| b.merge(&bucket))
                .or_insert(bucket);
        }
        let mut payloads = Vec::new();
        let mut entries: Vec<String> = Vec::new();
        let mut size = 0;
        let pieces = buckets.iter().flat_map(|(key, bucket)| match bucket {
            // Distinct values merge by union: a long set goes out in pieces.
            Bucket::Unique { values } if values.len() > UNIQUE_PER_ENTRY => values
                .iter()
                .collect::<Vec<_>>()
                .chunks(UNIQUE_PER_ENTRY)
                .map(|chunk| {
                    let values = chunk.iter().map(|v| (*v).clone()).collect();
                    (*key, Bucket::Unique { values })
                })
                .collect::<Vec<_>>(),
            _ => vec![(*key, bucket.clone())],
        });
        for ((tenant, meter, hour), bucket) in pieces {
            let entry = serde_json::to_string(&(tenant, meter, hour, &bucket)).expect("serialises");
            if entry.len() > NOTIFY_MAX_BYTES {
                // Too large to announce (a huge property value): every replica rebuilds.
                payloads.push(format!("{} resync", self.origin));
                continue;
            }
            if size + entry.len() > NOTIFY_MAX_BYTES {
                payloads.push(format!("{} [{}]", self.origin, entries.join(",")));
                entries.clear();
                size = 0;
            }
            size += entry.len() + 1;
            entries.push(entry);
        }
        if !entries.is_empty() {
            payloads.push(format!("{} [{}]", self.origin, entries.join(",")));
        }
        payloads
    }

    /// Counts the usage another replica announced (`<xid> <origin> <JSON>`), unless this
    /// replica sent it or its transaction was read by the last rebuild (`seen`).
    pub fn hear(&self, payload: &str, seen: Option<&TxSnapshot>) -> Heard {
        let mut parts = payload.splitn(3, ' ');
        let (Some(xid), Some(origin), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Heard::Resync;
        };
        if origin == &*self.origin {
            return Heard::Known;
        }
        if let (Some(seen), Ok(xid)) = (seen, xid.parse::<u64>())
            && seen.saw(xid)
        {
            return Heard::Known;
        }
        let Ok(entries) = serde_json::from_str::<Vec<(String, String, i64, Bucket)>>(body) else {
            return Heard::Resync;
        };
        for (tenant, meter, hour, bucket) in &entries {
            self.counters.merge(tenant, meter, *hour, bucket);
        }
        Heard::Counted
    }

    async fn watermark(&self) -> Result<i64, StoreError> {
        Ok(self
            .db
            .sync_state()
            .get(WATERMARK)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Folds the events received since the last snapshot (but for the last minute) into the
    /// stored buckets; returns how many events it folded.
    pub async fn snapshot(&self, now: i64) -> Result<usize, StoreError> {
        let from = self.watermark().await?;
        let to = now - SNAPSHOT_LAG_MS;
        if to <= from {
            return Ok(0);
        }
        let rows = self.db.usage().received_between(from, to).await?;
        let mut folded: HashMap<(String, String, i64), Bucket> = HashMap::new();
        for row in &rows {
            let Some(meter) = self.catalog.meters.get(&row.meter) else {
                continue;
            };
            let bucket = Bucket::of(meter.aggregation, sample_of(row));
            folded
                .entry((
                    row.tenant_id.clone(),
                    row.meter.clone(),
                    hour_of(row.occurred_at),
                ))
                .and_modify(|b| b.merge(&bucket))
                .or_insert(bucket);
        }
        let mut states = Vec::with_capacity(folded.len());
        for ((tenant, meter, hour), mut bucket) in folded {
            let stored = self.db.usage().bucket(&tenant, &meter, hour).await?;
            if let Some(mut merged) = stored.and_then(|s| serde_json::from_str::<Bucket>(&s).ok()) {
                merged.merge(&bucket);
                bucket = merged;
            }
            let state = serde_json::to_string(&bucket).expect("buckets serialise");
            states.push((tenant, meter, hour, state));
        }
        self.db.usage().save_snapshot(&states, to, now).await?;
        Ok(rows.len())
    }

    /// Snapshots every `interval` until `shutdown`.
    /// Snapshots at once (a replica that has just taken the lease may follow one that was
    /// killed before its snapshot), then every `interval`, until `shutdown`.
    pub async fn run_snapshots(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.snapshot(now_ms()).await {
                tracing::warn!(error = %error, "usage snapshot failed; retrying next interval");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// The meter's figure for the tenant over `[from_ms, to_ms)` from the usage log itself
    /// (PostgreSQL), whatever replica recorded it; `None` on SQLite, whose one process's
    /// counters are exact.
    pub async fn exact_usage(
        &self,
        tenant: &str,
        meter: &str,
        (from_ms, to_ms): (i64, i64),
    ) -> Result<Option<Decimal>, StoreError> {
        let Some(aggregation) = self.catalog.meters.get(meter).map(|m| m.aggregation) else {
            return Ok(None);
        };
        if self.db.backend() == Backend::Sqlite {
            return Ok(None);
        }
        // On PostgreSQL `None` only means no usage yet.
        let figure = self
            .db
            .usage()
            .period_figure(tenant, meter, aggregation, from_ms, to_ms)
            .await?;
        Ok(Some(
            figure
                .and_then(|f| Decimal::from_str(&f).ok())
                .unwrap_or(Decimal::ZERO)
                .normalize(),
        ))
    }

    /// The meter's usage for the tenant in the billing period holding `at_ms`.
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
            .map(|b| b.value()))
    }
}

/// A stored event as the counters take it.
fn sample_of(row: &UsageRow) -> Sample<'_> {
    Sample {
        quantity: Decimal::from_str(&row.quantity).unwrap_or_default(),
        at_ms: row.occurred_at,
        event_id: &row.event_id,
        unique_value: row.unique_value.as_deref(),
    }
}

/// The billing period holding `at_ms`: the tenant's subscription period when it holds it, else
/// the calendar month (UTC).
pub async fn billing_period(db: &Db, tenant: &str, at_ms: i64) -> Result<(i64, i64), StoreError> {
    let tenant_id = TenantId::parse(tenant).ok();
    let record = match &tenant_id {
        Some(id) => db.tenants().get(id).await?,
        None => None,
    };
    let subscription = match record.and_then(|r| r.customer_id) {
        Some(customer) => crate::sync::current_subscription(db, &customer).await?,
        None => None,
    };
    let period = subscription
        .and_then(|(_, s)| Some((s.current_period_start? * 1000, s.current_period_end? * 1000)))
        .filter(|(start, end)| (*start..*end).contains(&at_ms));
    Ok(period.unwrap_or_else(|| calendar_month(at_ms)))
}

/// The UTC calendar month holding `at_ms`, as `[start, end)` in milliseconds.
pub fn calendar_month(at_ms: i64) -> (i64, i64) {
    let at = Utc.timestamp_millis_opt(at_ms).single().unwrap_or_default();
    let start = Utc
        .with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let (year, month) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    let end = Utc
        .with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    (start.timestamp_millis(), end.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_months_wrap_the_year() {
        let dec = Utc
            .with_ymd_and_hms(2026, 12, 31, 23, 0, 0)
            .unwrap()
            .timestamp_millis();
        let (start, end) = calendar_month(dec);
        assert_eq!(
            start,
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
        assert_eq!(
            end,
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
    }

    async fn replica(origin: &str) -> Metering {
        let settings = crate::config::DatabaseSettings {
            url: crate::config::Secret::new("sqlite::memory:"),
            max_connections: 1,
            connect_timeout: Duration::from_secs(5),
        };
        let catalog = Catalog::parse(
            "[meters.calls]\naggregation = \"sum\"\n\
             [meters.users]\naggregation = \"unique_count\"\nproperty = \"user_id\"\n",
        )
        .unwrap();
        Metering {
            db: Db::connect(&settings).await.unwrap(),
            catalog: Arc::new(catalog),
            counters: Arc::default(),
            metrics: Arc::default(),
            writer: Arc::default(),
            gate: Arc::default(),
            origin: origin.into(),
        }
    }

    fn row(id: usize, meter: &str, quantity: &str, user: Option<String>) -> UsageRow {
        UsageRow {
            tenant_id: "acme".to_owned(),
            event_id: format!("e{id}"),
            meter: meter.to_owned(),
            quantity: quantity.to_owned(),
            occurred_at: 1_764_000_000_000 + id as i64 * 1000,
            unique_value: user,
            properties: None,
            received_at: 1_764_000_000_000,
            push_id: None,
        }
    }

    #[tokio::test]
    async fn another_replica_counts_what_one_announces_once() {
        let (sender, listener) = (replica("a").await, replica("b").await);
        // 500 distinct users: more than one payload can carry, so the set goes in pieces.
        let rows: Vec<UsageRow> = (0..500)
            .map(|i| row(i, "users", "1", Some(format!("user-{i:05}"))))
            .chain((500..1000).map(|i| row(i, "calls", "0.5", None)))
            .collect();
        let refs: Vec<&UsageRow> = rows.iter().collect();
        let payloads = sender.notifications(&refs);
        assert!(payloads.len() > 1, "{} payloads", payloads.len());
        for (xid, payload) in payloads.iter().enumerate() {
            assert!(payload.len() <= NOTIFY_MAX_BYTES + 64, "{}", payload.len());
            let notified = format!("{} {payload}", 1000 + xid);
            assert_eq!(sender.hear(&notified, None), Heard::Known, "its own");
            assert_eq!(listener.hear(&notified, None), Heard::Counted);
        }
        let period = (0, i64::MAX);
        let figure = |m: &Metering, meter: &str| {
            m.counters
                .fold("acme", meter, period.0, period.1)
                .map(|b| b.value())
        };
        assert_eq!(figure(&listener, "users"), Some(Decimal::from(500)));
        assert_eq!(figure(&listener, "calls"), Some(Decimal::from(250)));
        // A transaction the last rebuild saw is not counted again.
        let seen = TxSnapshot::parse("5000:5000:").unwrap();
        let again = format!("1000 {}", payloads[0]);
        assert_eq!(listener.hear(&again, Some(&seen)), Heard::Known);
        assert_eq!(figure(&listener, "calls"), Some(Decimal::from(250)));
        assert_eq!(listener.hear("1 b garbage", None), Heard::Known);
        assert_eq!(listener.hear("1 c garbage", None), Heard::Resync);
    }
}
