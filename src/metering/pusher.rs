//! The pusher: carries accepted usage to Stripe's billing meters exactly once.
//!
//! Each pass first *plans*: the unpushed events of tenants that have a Stripe customer are
//! grouped per tenant, meter and window (`metering.push_window`), and each group becomes a push
//! row whose identifier is derived from its events, written in the same transaction that ties
//! the events to it. Then it *sends* every pending push with that identifier (also its
//! idempotency key). A crash after the send and before the record re-sends the same identifier,
//! which Stripe keeps once; usage arriving late for a window already pushed forms a new group
//! with a new identifier, a delta.
//!
//! Values: `sum` meters push the group's total and `count` meters its number of events (the
//! Stripe meter sums both). `max`, `unique_count` and `last` meters push the running value for
//! the billing period so far (the Stripe meter takes the last value: formula `last`).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{Metering, billing_period};
use crate::catalog::Aggregation;
use crate::store::{PushRow, StoreError, UsageRow, now_ms};
use crate::sync::SyncError;
use crate::vendor::{BillingVendor, MeterEvent, VendorError};

/// Stripe takes meter events up to 35 days old; older usage is flagged, not sent.
const VENDOR_WINDOW_MS: i64 = 35 * 24 * 3_600_000;
/// Keep clear of the edge of that window.
const WINDOW_MARGIN_MS: i64 = 3_600_000;
/// Events planned per pass (a pass groups them all, so one group is one vendor call), pushes
/// sent per pass.
/// Events planned per transaction: a pass plans in chunks, so that a pusher killed mid-pass
/// keeps what it planned before.
const PLAN_LIMIT: u32 = 20_000;
/// Chunks planned per pass at most.
const PLAN_CHUNKS: usize = 25;
/// Pushes claimed at a time (their claim is renewed while they are sent).
const SEND_LIMIT: u32 = 64;
/// Pushes sent at once: a slow vendor answer holds up one of them, not the pass.
const SEND_CONCURRENCY: usize = 8;
/// Pushes sent per pass at most.
const SEND_PER_PASS: usize = 5_000;

#[derive(Clone)]
pub struct Pusher {
    pub metering: Metering,
    pub vendor: Arc<dyn BillingVendor>,
    pub interval: Duration,
    pub window: Duration,
    pub max_retry_delay: Duration,
    /// How long a claim on a batch of pushes lasts unless renewed (`claims.pushes`).
    pub claim: Duration,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    pub planned: usize,
    pub expired: usize,
    pub sent: usize,
    pub rejected: usize,
    pub retrying: usize,
}

impl Pusher {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
            }
            match self.step().await {
                Ok(report) if report.sent + report.rejected + report.expired > 0 => {
                    tracing::info!(?report, "usage pushed")
                }
                Ok(report) if report != PushReport::default() => {
                    tracing::debug!(?report, "usage push pass: nothing taken yet")
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "usage push failed; retrying next interval")
                }
            }
        }
    }

    /// Plans what is new, then sends what is pending.
    pub async fn step(&self) -> Result<PushReport, SyncError> {
        let mut report = PushReport::default();
        self.plan(&mut report).await?;
        self.send(&mut report).await?;
        self.record_backlog().await?;
        Ok(report)
    }

    fn pushable_meters(&self) -> Vec<String> {
        let meters = &self.metering.catalog.meters;
        meters
            .values()
            .filter(|m| m.stripe_event_name.is_some())
            .map(|m| m.name.clone())
            .collect()
    }

    /// Plans the unpushed events, a chunk (one transaction) at a time.
    async fn plan(&self, report: &mut PushReport) -> Result<(), SyncError> {
        let meters = self.pushable_meters();
        for _ in 0..PLAN_CHUNKS {
            if self.plan_chunk(&meters, report).await? < PLAN_LIMIT as usize {
                break;
            }
        }
        Ok(())
    }

    /// Plans up to [`PLAN_LIMIT`] events; returns how many it read.
    async fn plan_chunk(
        &self,
        meters: &[String],
        report: &mut PushReport,
    ) -> Result<usize, SyncError> {
        let db = &self.metering.db;
        let rows = db.usage().unpushed(meters, PLAN_LIMIT).await?;
        let read = rows.len();
        let window_ms = self.window.as_millis() as i64;
        let mut groups: BTreeMap<(String, String, i64), (String, Vec<UsageRow>)> = BTreeMap::new();
        for (row, customer) in rows {
            let window = row.occurred_at.div_euclid(window_ms) * window_ms;
            groups
                .entry((row.tenant_id.clone(), row.meter.clone(), window))
                .or_insert_with(|| (customer, Vec::new()))
                .1
                .push(row);
        }
        let now = now_ms();
        let mut pushes = Vec::with_capacity(groups.len());
        for ((tenant, meter_name, window), (customer, mut events)) in groups {
            let Some(meter) = self.metering.catalog.meters.get(&meter_name) else {
                continue;
            };
            let Some(event_name) = meter.stripe_event_name.clone() else {
                continue;
            };
            events.sort_by(|a, b| a.event_id.cmp(&b.event_id));
            let latest = events.iter().map(|e| e.occurred_at).max().unwrap_or(window);
            let (value, stamp) = match meter.aggregation {
                Aggregation::Sum => {
                    let total = events
                        .iter()
                        .map(|e| Decimal::from_str(&e.quantity).unwrap_or_default())
                        .sum();
                    (total, latest)
                }
                Aggregation::Count => (Decimal::from(events.len()), latest),
                // The period's running value, stamped as late in the period as now allows, so
                // that Stripe's `last` takes it over any earlier push, even one for later events.
                Aggregation::Max | Aggregation::UniqueCount | Aggregation::Last => {
                    let (from, to) = billing_period(db, &tenant, latest).await?;
                    let value = self
                        .metering
                        .counters
                        .fold(&tenant, &meter_name, from, to)
                        .map(|b| b.value());
                    (value.unwrap_or_default(), now.min(to - 1000).max(latest))
                }
            };
            let expired = latest < now - VENDOR_WINDOW_MS + WINDOW_MARGIN_MS;
            let keys: Vec<(String, String)> = events
                .iter()
                .map(|e| (e.tenant_id.clone(), e.event_id.clone()))
                .collect();
            let push = PushRow {
                push_id: identifier(&tenant, &meter_name, window, &keys),
                tenant_id: tenant,
                meter: meter_name,
                customer_id: customer,
                event_name,
                window_start: window,
                value: value.normalize().to_string(),
                timestamp: stamp.div_euclid(1000),
                event_count: i32::try_from(events.len()).unwrap_or(i32::MAX),
                status: if expired { "expired" } else { "pending" }.to_owned(),
                attempts: 0,
                last_error: expired.then(|| {
                    "older than the vendor's 35-day window: left for reconciliation".to_owned()
                }),
                next_attempt_at: now,
                created_at: now,
                sent_at: None,
            };
            if expired {
                report.expired += 1;
            } else {
                report.planned += 1;
            }
            pushes.push((push, keys));
        }
        if !pushes.is_empty() {
            db.usage().plan_pushes(&pushes).await?;
        }
        Ok(read)
    }

    /// Sends the due pushes, [`SEND_CONCURRENCY`] at a time, claiming [`SEND_LIMIT`] at once and
    /// renewing the claim until each is settled.
    async fn send(&self, report: &mut PushReport) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        let db = &self.metering.db;
        let claim = self.claim.as_millis() as i64;
        let mut sent = 0;
        while sent < SEND_PER_PASS {
            let due = db.usage().due_pushes(now_ms(), SEND_LIMIT, claim).await?;
            let Some(until) = due.first().map(|push| push.next_attempt_at) else {
                break;
            };
            sent += due.len();
            let renewal = crate::cluster::ClaimRenewal::start(
                db.clone(),
                crate::store::Queue::Pushes,
                due.iter().map(|push| push.push_id.clone()).collect(),
                until,
                self.claim,
                self.metering.metrics.clone(),
            );
            let mut outcomes = futures_util::stream::iter(due)
                .map(|push| self.send_one(push, &renewal))
                .buffer_unordered(SEND_CONCURRENCY);
            while let Some(outcome) = outcomes.next().await {
                match outcome? {
                    "sent" => report.sent += 1,
                    "rejected" => report.rejected += 1,
                    _ => report.retrying += 1,
                }
            }
            drop(outcomes);
            renewal.finish().await;
        }
        Ok(())
    }

    /// Sends one push and records the outcome: `sent`, `rejected` or `pending` (retry later).
    async fn send_one(
        &self,
        push: PushRow,
        renewal: &crate::cluster::ClaimRenewal,
    ) -> Result<&'static str, StoreError> {
        let event = MeterEvent {
            event_name: push.event_name.clone(),
            customer_id: push.customer_id.clone(),
            value: push.value.clone(),
            timestamp: push.timestamp,
            identifier: push.push_id.clone(),
        };
        let (status, error, next) = match self.vendor.report_usage(&event).await {
            Ok(()) => ("sent", None, now_ms()),
            // Stripe keeps one event per identifier: a refusal for that reason means it has it.
            Err(VendorError::Rejected { message, .. }) if is_duplicate_identifier(&message) => {
                ("sent", None, now_ms())
            }
            Err(error @ VendorError::Rejected { .. }) => {
                ("rejected", Some(error.to_string()), now_ms())
            }
            Err(error) => {
                let delay = crate::sync::applier::retry_delay(push.attempts, self.max_retry_delay);
                (
                    "pending",
                    Some(error.to_string()),
                    now_ms() + delay.as_millis() as i64,
                )
            }
        };
        self.metering.metrics.inc(
            "billsync_usage_pushes_total",
            "Meter events sent to the vendor, by outcome (pending: to be retried).",
            &[("outcome", status)],
        );
        renewal.let_go(&push.push_id);
        self.metering
            .db
            .usage()
            .settle_push(&push.push_id, status, error.as_deref(), next, now_ms())
            .await?;
        Ok(status)
    }

    pub async fn record_backlog(&self) -> Result<(), StoreError> {
        let (count, oldest) = self
            .metering
            .db
            .usage()
            .backlog(&self.pushable_meters())
            .await?;
        let metrics = &self.metering.metrics;
        metrics.set(
            "billsync_usage_push_backlog",
            "Accepted usage events not yet pushed.",
            &[],
            count as f64,
        );
        let age = oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
        metrics.set(
            "billsync_usage_oldest_unpushed_seconds",
            "Age of the oldest accepted usage event not yet pushed.",
            &[],
            age,
        );
        Ok(())
    }
}

/// The push identifier: a digest of the tenant, meter, window and the events it carries, so that
/// the same events always make the same identifier and new events a new one.
pub fn identifier(tenant: &str, meter: &str, window: i64, events: &[(String, String)]) -> String {
    let mut digest = Sha256::new();
    for part in [tenant, meter, &window.to_string()] {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    for (_, event_id) in events {
        digest.update(event_id.as_bytes());
        digest.update([0]);
    }
    format!("bsu_{}", &hex::encode(digest.finalize())[..40])
}

fn is_duplicate_identifier(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("identifier") && (message.contains("already") || message.contains("duplicate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_follow_the_events_they_carry() {
        let events = |ids: &[&str]| {
            ids.iter()
                .map(|i| ("t".to_owned(), i.to_string()))
                .collect::<Vec<_>>()
        };
        let a = identifier("t", "m", 0, &events(&["e1", "e2"]));
        assert_eq!(a, identifier("t", "m", 0, &events(&["e1", "e2"])));
        assert_ne!(a, identifier("t", "m", 0, &events(&["e3"])));
        assert_ne!(a, identifier("t", "m", 3_600_000, &events(&["e1", "e2"])));
        assert!(a.len() <= 100, "Stripe's identifier limit");
    }
}
