//! The pusher: carries accepted usage to Stripe's billing meters exactly once.
//!
//! Each pass first *plans*: the unpushed events of tenants that have a Stripe customer are
//! grouped per tenant, meter, billing period and window (`metering.push_window`), and each
//! group becomes a push row whose identifier is derived from its events, written in the same
//! transaction that ties the events to it: all or nothing, so that a planner finding any of
//! its events already tied (another planner, one that lost its lease, got there first) writes
//! nothing. Then it *sends* every pending push with that identifier (also its idempotency
//! key). A crash after the send and before the record re-sends the same identifier, which
//! Stripe keeps once; usage arriving late for a window already pushed forms a new group with a
//! new identifier, a delta.
//!
//! Periods (see [`super::periods`]): usage goes into the billing period it happened in, never
//! into another. A group never spans two periods and its meter event is timestamped inside its
//! period. Usage past the last known period of a live subscription waits until billsync hears
//! of the renewal; usage of a period whose invoice is final is reported (`invoice_final`), not
//! sent.
//!
//! Values: `sum` meters push the group's total and `count` meters its number of events (the
//! Stripe meter sums both). `max`, `unique_count` and `last` meters push the period's value,
//! computed from the usage log over the period's exact bounds (never from the counters, which
//! may not have heard of another replica's usage yet), stamped as late in the period as now
//! allows, so that Stripe's `last` takes it over any earlier push.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::periods::{self, Period, Standing, TenantPeriods};
use super::{Meter, Metering};
use crate::store::{NewPush, PushRow, StoreError, UnpushedKey, UsageRow, now_ms};
use crate::stripe::{BillingVendor, MeterEvent, VendorError};

/// Stripe takes meter events up to 35 days old; older usage is flagged, not sent.
const VENDOR_WINDOW_MS: i64 = 35 * 24 * 3_600_000;
/// Keep clear of the edge of that window.
const WINDOW_MARGIN_MS: i64 = 3_600_000;
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
    /// Pushes of periods whose invoice was already final: reported, not sent.
    pub invoiced: usize,
    /// Events left for a renewal billsync has not heard of yet.
    pub waiting: usize,
    /// Chunks another planner had tied some events of first: nothing written.
    pub lost: usize,
    pub sent: usize,
    pub rejected: usize,
    pub retrying: usize,
}

/// Pushes planned from a chunk of unpushed events, not written yet.
#[derive(Debug, Clone, Default)]
pub struct PlannedChunk {
    pushes: Vec<NewPush>,
    /// Events read.
    read: usize,
    /// Events left waiting for their period.
    waiting: usize,
    /// Where the read ended: the next chunk of the pass starts after it.
    last: Option<UnpushedKey>,
}

impl PlannedChunk {
    /// The pushes, each with the events it carries.
    pub fn pushes(&self) -> impl Iterator<Item = (&PushRow, usize)> {
        self.pushes.iter().map(|p| (&p.row, p.events.len()))
    }

    fn count(&self, report: &mut PushReport) {
        for push in &self.pushes {
            match push.row.status.as_str() {
                "expired" => report.expired += 1,
                "invoice_final" => report.invoiced += 1,
                _ => report.planned += 1,
            }
        }
    }
}

/// Unpushed events that go into one push: one tenant's, of one meter, in one billing period
/// and (for meters that sum) one window.
struct Group {
    customer: String,
    period: Period,
    events: Vec<UsageRow>,
}

impl Pusher {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
            }
            match self.pass(&shutdown).await {
                Ok(report)
                    if report.sent + report.rejected + report.expired + report.invoiced > 0 =>
                {
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
    pub async fn step(&self) -> Result<PushReport, StoreError> {
        self.pass(&CancellationToken::new()).await
    }

    /// One pass, which stops between chunks and batches once `stop` is cancelled (the lease
    /// was lost, or the service is stopping).
    async fn pass(&self, stop: &CancellationToken) -> Result<PushReport, StoreError> {
        let mut report = PushReport::default();
        self.plan(&mut report, stop).await?;
        self.send(&mut report, stop).await?;
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
    async fn plan(
        &self,
        report: &mut PushReport,
        stop: &CancellationToken,
    ) -> Result<(), StoreError> {
        let meters = self.pushable_meters();
        let mut after = None;
        for _ in 0..PLAN_CHUNKS {
            if stop.is_cancelled() {
                break;
            }
            let chunk = self.prepare(&meters, after.as_ref()).await?;
            let full = chunk.read >= PLAN_LIMIT as usize;
            report.waiting += chunk.waiting;
            after = chunk.last.clone();
            if self.write_plan(&chunk).await? {
                chunk.count(report);
            } else {
                report.lost += 1;
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// Plans the first chunk of unpushed events without writing it (see [`Self::write_plan`]).
    pub async fn plan_chunk(&self) -> Result<PlannedChunk, StoreError> {
        self.prepare(&self.pushable_meters(), None).await
    }

    /// Writes a planned chunk, all or nothing; `false` when another planner tied some of its
    /// events first (nothing written: the next pass plans what is left).
    pub async fn write_plan(&self, chunk: &PlannedChunk) -> Result<bool, StoreError> {
        if chunk.pushes.is_empty() {
            return Ok(true);
        }
        let written = self.metering.db.usage().plan_pushes(&chunk.pushes).await?;
        if !written {
            tracing::info!(
                "usage push plan dropped: another planner took some of its events first"
            );
        }
        Ok(written)
    }

    /// Reads up to [`PLAN_LIMIT`] unpushed events after `after` and groups them into pushes.
    async fn prepare(
        &self,
        meters: &[String],
        after: Option<&UnpushedKey>,
    ) -> Result<PlannedChunk, StoreError> {
        let db = &self.metering.db;
        let rows = db.usage().unpushed(meters, after, PLAN_LIMIT).await?;
        let mut chunk = PlannedChunk {
            read: rows.len(),
            last: rows.last().map(|(row, _)| UnpushedKey::of(row)),
            ..PlannedChunk::default()
        };
        let customers: HashSet<&str> = rows.iter().map(|(_, c)| c.as_str()).collect();
        let customers: Vec<&str> = customers.into_iter().collect();
        let known = periods::of_customers(db, &customers).await?;
        let window_ms = self.window.as_millis() as i64;
        let mut groups: BTreeMap<(String, String, i64, Option<i64>), Group> = BTreeMap::new();
        for (row, customer) in rows {
            let Some(meter) = self.metering.catalog.meters.get(&row.meter) else {
                continue;
            };
            let period = known.get(&customer).map_or_else(
                || TenantPeriods::default().holding(row.occurred_at),
                |p| p.holding(row.occurred_at),
            );
            if period.standing == Standing::Unconfirmed {
                chunk.waiting += 1;
                continue;
            }
            // A period's value goes out once per pass; sums go out per window.
            let window = (!meter.aggregation.is_period_value())
                .then(|| row.occurred_at.div_euclid(window_ms) * window_ms);
            let key = (
                row.tenant_id.clone(),
                row.meter.clone(),
                period.start,
                window,
            );
            groups
                .entry(key)
                .or_insert_with(|| Group {
                    customer,
                    period,
                    events: Vec::new(),
                })
                .events
                .push(row);
        }
        let now = now_ms();
        for ((tenant, meter, _, _), group) in groups {
            if let Some(push) = self.push_of(&tenant, &meter, group, now).await? {
                chunk.pushes.push(push);
            }
        }
        Ok(chunk)
    }

    /// The push carrying a group's events: its value, timestamp and status.
    async fn push_of(
        &self,
        tenant: &str,
        meter_name: &str,
        mut group: Group,
        now: i64,
    ) -> Result<Option<NewPush>, StoreError> {
        let Some(meter) = self.metering.catalog.meters.get(meter_name) else {
            return Ok(None);
        };
        let Some(event_name) = meter.stripe_event_name.clone() else {
            return Ok(None);
        };
        group.events.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        let events = &group.events;
        let latest = (events.iter().map(|e| e.occurred_at).max()).unwrap_or(group.period.start);
        let window_ms = self.window.as_millis() as i64;
        let window = latest.div_euclid(window_ms) * window_ms;
        let (value, stamp) = self.value_of(tenant, meter, &group, latest, now).await?;
        let (status, last_error) = status_of(&group.period, latest, now);
        let keys: Vec<(String, String)> = events
            .iter()
            .map(|e| (e.tenant_id.clone(), e.event_id.clone()))
            .collect();
        let push = PushRow {
            push_id: identifier(tenant, meter_name, window, &keys),
            tenant_id: tenant.to_owned(),
            meter: meter_name.to_owned(),
            customer_id: group.customer,
            event_name,
            window_start: window,
            value: value.normalize().to_string(),
            timestamp: stamp.div_euclid(1000),
            event_count: i32::try_from(events.len()).unwrap_or(i32::MAX),
            status: status.to_owned(),
            attempts: 0,
            last_error,
            next_attempt_at: now,
            created_at: now,
            sent_at: None,
            period_start: Some(group.period.start),
            period_end: Some(group.period.end),
            kind: "usage".to_owned(),
            evidence: None,
        };
        Ok(Some(NewPush {
            row: push,
            events: keys,
            replaces_earlier: meter.aggregation.is_period_value(),
        }))
    }

    /// A push's value and when it is stamped (Unix ms). A period-value meter's value is its
    /// figure over the whole period, from the usage log, stamped as late in the period as now
    /// allows and after the period's earlier pushes when there is room, so that Stripe's `last`
    /// takes the newest value. Others carry their events' count or sum, stamped at the latest.
    async fn value_of(
        &self,
        tenant: &str,
        meter: &Meter,
        group: &Group,
        latest: i64,
        now: i64,
    ) -> Result<(Decimal, i64), StoreError> {
        let events = &group.events;
        if meter.aggregation == crate::catalog::Aggregation::Count {
            return Ok((Decimal::from(events.len()), latest));
        }
        if !meter.aggregation.is_period_value() {
            let quantity = |e: &UsageRow| Decimal::from_str(&e.quantity).unwrap_or_default();
            return Ok((events.iter().map(quantity).sum(), latest));
        }
        let Period { start, end, .. } = group.period;
        let metering = &self.metering;
        let value = (metering.period_figure(tenant, &meter.name, (start, end))).await?;
        let last = (metering.db.usage().last_stamp(tenant, &meter.name, start)).await?;
        let after_last = last.map_or(i64::MIN, |s| (s + 1) * 1000);
        let stamp = now.max(after_last).min(end - 1000).max(latest);
        Ok((value.unwrap_or_default(), stamp))
    }

    /// Sends the due pushes, [`SEND_CONCURRENCY`] at a time, claiming [`SEND_LIMIT`] at once and
    /// renewing the claim until each is settled.
    async fn send(
        &self,
        report: &mut PushReport,
        stop: &CancellationToken,
    ) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        let db = &self.metering.db;
        let claim = self.claim.as_millis() as i64;
        let mut sent = 0;
        while sent < SEND_PER_PASS && !stop.is_cancelled() {
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
        let outcome = deliver(self.vendor.as_ref(), &push, self.max_retry_delay).await;
        renewal.let_go(&push.push_id);
        let metering = &self.metering;
        outcome
            .record(&metering.db, &metering.metrics, &push)
            .await?;
        Ok(outcome.status)
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

/// What sending one push came to.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `sent`, `rejected` (the vendor refused it) or `pending` (retry at `next`).
    pub status: &'static str,
    pub error: Option<String>,
    pub next: i64,
}

impl Delivery {
    /// Counts the outcome and settles the push row with it.
    pub async fn record(
        &self,
        db: &crate::store::Db,
        metrics: &crate::metrics::Metrics,
        push: &PushRow,
    ) -> Result<(), StoreError> {
        metrics.inc(
            "billsync_usage_pushes_total",
            "Meter events sent to the vendor, by outcome (pending: to be retried).",
            &[("outcome", self.status)],
        );
        let usage = db.usage();
        (usage.settle_push(
            &push.push_id,
            self.status,
            self.error.as_deref(),
            self.next,
            now_ms(),
        ))
        .await
    }
}

/// Sends one push as a meter event, its identifier also the idempotency key.
pub async fn deliver(
    vendor: &dyn BillingVendor,
    push: &PushRow,
    max_retry_delay: Duration,
) -> Delivery {
    let event = MeterEvent {
        event_name: push.event_name.clone(),
        customer_id: push.customer_id.clone(),
        value: push.value.clone(),
        timestamp: push.timestamp,
        identifier: push.push_id.clone(),
    };
    let (status, error, next) = match vendor.report_usage(&event).await {
        Ok(()) => ("sent", None, now_ms()),
        // Stripe keeps one event per identifier: a refusal for that reason means it has it.
        Err(VendorError::Rejected { message, .. }) if is_duplicate_identifier(&message) => {
            ("sent", None, now_ms())
        }
        Err(error @ VendorError::Rejected { .. }) => {
            ("rejected", Some(error.to_string()), now_ms())
        }
        Err(error) => {
            let delay = crate::retry::after_failures(push.attempts, max_retry_delay);
            let next = now_ms() + delay.as_millis() as i64;
            ("pending", Some(error.to_string()), next)
        }
    };
    Delivery {
        status,
        error,
        next,
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

/// A new push's status: not sent when its period's invoice is final or it is older than the
/// vendor's window (both left for reconciliation), else pending.
fn status_of(period: &Period, latest: i64, now: i64) -> (&'static str, Option<String>) {
    match &period.standing {
        Standing::Invoiced { invoice_id } => (
            "invoice_final",
            Some(format!(
                "its period's invoice {invoice_id} is final: reported for a credit note or a \
                 manual charge, not sent"
            )),
        ),
        _ if latest < now - VENDOR_WINDOW_MS + WINDOW_MARGIN_MS => (
            "expired",
            Some("older than the vendor's 35-day window: left for reconciliation".to_owned()),
        ),
        _ => ("pending", None),
    }
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
