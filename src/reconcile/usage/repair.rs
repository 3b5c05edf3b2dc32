//! Repairs: usage Stripe acknowledged and then lost, pushed again before its invoice is final.
//!
//! A `vendor_missing` finding on an open period or a draft invoice's line proposes one meter
//! event: for `sum` and `count` meters the missing difference, for period-value meters the
//! period's value again (stamped after every earlier push, so that Stripe's `last` takes it).
//! Its identifier is a digest of the finding (tenant, meter, period, what billsync pushed and
//! what Stripe holds), so that repairing the same finding twice is one event at Stripe and one
//! row in the push ledger. A repair still on its way (pending, or sent after the settle point)
//! holds back another. A period whose invoice is final is never repaired (see `FINAL_REMEDY`).
//!
//! With `reconcile.repair` off, or in a dry run, the finding shows what would be pushed.

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Tally, Unit};
use crate::catalog::{Aggregation, Meter};
use crate::domain::rfc3339;
use crate::metering::pusher::deliver;
use crate::metrics::Metrics;
use crate::reconcile::Item;
use crate::store::{Db, PushRow, StoreError, now_ms};
use crate::stripe::BillingVendor;

/// A proposed repair: the push row it would record (kind `repair`, pending).
#[derive(Debug, Clone)]
pub struct Repair {
    pub push: PushRow,
}

/// The repair of a unit whose meter holds `vendor` where billsync's settled pushes come to
/// `settled`, or why there is none.
pub(super) fn proposal(
    meter: &Meter,
    unit: &Unit,
    tally: &Tally,
    settled: Decimal,
    vendor: Decimal,
    now: i64,
) -> Result<PushRow, &'static str> {
    let Some(event_name) = meter.stripe_event_name.clone() else {
        return Err("the meter is not pushed to Stripe");
    };
    let on_its_way = (tally.repairs.iter()).any(|r| {
        r.status == "pending"
            || (r.status == "sent" && r.sent_at.is_none_or(|at| at >= unit.settle_at))
    });
    if on_its_way {
        return Err("an earlier repair is on its way: Stripe's totals may not show it yet");
    }
    let latest_stamp = (tally.pushes.iter().chain(&tally.repairs))
        .map(|p| p.timestamp * 1000)
        .max();
    let last_ms = unit.period_end - 1000;
    let (value, stamp) = match meter.aggregation {
        Aggregation::Sum | Aggregation::Count => {
            // Inside what the next check asks Stripe about.
            (settled - vendor, unit.settle_at.min(unit.period_end) - 1000)
        }
        _ => {
            let after = latest_stamp.map_or(i64::MIN, |s| s + 1000);
            (settled, now.max(after).min(last_ms))
        }
    };
    if value <= Decimal::ZERO {
        return Err("nothing to push");
    }
    let stamp = stamp.max(unit.start);
    let push_id = identifier(unit, settled, vendor, value);
    Ok(PushRow {
        push_id,
        tenant_id: unit.tenant_id.clone(),
        meter: unit.meter.clone(),
        customer_id: unit.customer_id.clone(),
        event_name,
        // The unit it repairs: the ledger finds it there again.
        window_start: unit.start,
        value: value.normalize().to_string(),
        timestamp: stamp.div_euclid(1000),
        event_count: 0,
        status: "pending".to_owned(),
        attempts: 0,
        last_error: None,
        next_attempt_at: now,
        created_at: now,
        sent_at: None,
        period_start: Some(unit.start),
        period_end: Some(unit.period_end),
        kind: "repair".to_owned(),
        evidence: None,
    })
}

/// The repair's identifier: a digest of the finding it repairs.
fn identifier(unit: &Unit, settled: Decimal, vendor: Decimal, value: Decimal) -> String {
    let mut digest = Sha256::new();
    let figures = [settled, vendor, value].map(|d| d.normalize().to_string());
    let start = unit.start.to_string();
    let parts = [&unit.tenant_id, &unit.meter, &start]
        .into_iter()
        .chain(&figures);
    for part in parts {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    format!("bsr_{}", &hex::encode(digest.finalize())[..40])
}

/// The repairs a run or check carries out: whether it may, and with what.
pub struct Repairs<'a> {
    pub db: &'a Db,
    pub vendor: Option<&'a Arc<dyn BillingVendor>>,
    pub metrics: &'a Metrics,
    /// `reconcile.repair`.
    pub enabled: bool,
    pub dry_run: bool,
    pub max_retry_delay: Duration,
}

impl Repairs<'_> {
    /// Carries out the items' proposed repairs (records each in the push ledger, then sends
    /// it; one the vendor does not take now is retried by the pusher) and writes what became
    /// of each into its item's `repair`.
    pub async fn carry_out(&self, items: &mut [Item]) -> Result<usize, StoreError> {
        let mut carried = 0;
        for item in items.iter_mut() {
            let Some(repair) = item.repair.take() else {
                continue;
            };
            let mut push = repair.push;
            let mut shown = json!({
                "identifier": push.push_id,
                "value": push.value,
                "timestamp": rfc3339(push.timestamp * 1000),
            });
            let status = if !self.enabled {
                "off".to_owned()
            } else if self.dry_run {
                "dry_run".to_owned()
            } else {
                push.evidence = Some(item.to_json().to_string());
                carried += 1;
                let (status, sent_at) = self.push(push).await?;
                shown["sent_at"] = json!(sent_at.map(rfc3339));
                status
            };
            shown["status"] = json!(status);
            item.detail["repair"] = shown;
        }
        Ok(carried)
    }

    /// Records the repair and sends it; its status (`sent`, `pending`, `rejected`, or
    /// `already_<status>` when the ledger had it) and when the vendor took it.
    async fn push(&self, mut push: PushRow) -> Result<(String, Option<i64>), StoreError> {
        let usage = self.db.usage();
        // Claimed for the send below: the pusher takes it over only if this stops.
        push.next_attempt_at = now_ms() + 60_000;
        if !usage.insert_repair(&push).await? {
            let known = usage.push(&push.push_id).await?;
            let status = known.as_ref().map_or("unknown", |p| p.status.as_str());
            return Ok((format!("already_{status}"), known.and_then(|p| p.sent_at)));
        }
        let Some(vendor) = self.vendor else {
            return Ok(("pending".to_owned(), None));
        };
        let delivery = deliver(vendor.as_ref(), &push, self.max_retry_delay).await;
        delivery.record(self.db, self.metrics, &push).await?;
        tracing::warn!(
            tenant = push.tenant_id.as_str(),
            meter = push.meter.as_str(),
            value = push.value.as_str(),
            identifier = push.push_id.as_str(),
            status = delivery.status,
            "reconciliation repaired usage Stripe lost"
        );
        let sent_at = (delivery.status == "sent").then(now_ms);
        Ok((delivery.status.to_owned(), sent_at))
    }
}
