//! The catch-up poller: reads the vendor's events list from a stored cursor (with an overlap for
//! events listed late) and puts what it finds into the inbox, so that a lost webhook costs at
//! most one poll interval.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events;
use crate::entitlements::SyncHealth;
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::store::{Db, Source, now_ms};
use crate::stripe::BillingVendor;
use crate::stripe::objects;

pub const CURSOR: &str = "events.cursor";
pub const LAST_RUN: &str = "poll.last_run_at";

#[derive(Clone)]
pub struct Poller {
    pub db: Db,
    pub vendor: Arc<dyn BillingVendor>,
    pub interval: Duration,
    pub overlap: Duration,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Told whether vendor sync works, for the staleness of entitlement answers.
    pub health: Arc<SyncHealth>,
}

impl Poller {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.step().await {
                self.health.failed();
                crate::cluster::tell_health(&self.db, None).await;
                tracing::warn!(error = %error, "events poller failed; retrying next interval");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass over the events since the cursor; returns how many were new to the inbox.
    pub async fn step(&self) -> Result<usize, WorkError> {
        let state = self.db.sync_state();
        let overlap = self.overlap.as_secs() as i64;
        let cursor = match state.get(CURSOR).await? {
            Some(value) => value.parse::<i64>().unwrap_or(0),
            // A first start reads only the last overlap; `billsync backfill` covers the rest.
            None => now_ms() / 1000,
        };
        let mut newest = cursor;
        let mut inserted = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .vendor
                .list_events_since(cursor - overlap, after.as_deref())
                .await?;
            let mut rows = Vec::with_capacity(page.data.len());
            for event in &page.data {
                newest = newest.max(objects::int(&event["created"]).unwrap_or(0));
                match events::from_event(&event.to_string(), event, Source::Poll) {
                    Ok(row) => rows.push(row),
                    Err(error) => {
                        tracing::warn!(error = %error, "events list returned an unusable event")
                    }
                }
            }
            inserted += self.db.inbox().insert(&rows, now_ms()).await?;
            after = page
                .data
                .last()
                .and_then(|e: &Value| e["id"].as_str())
                .map(str::to_owned);
            if !page.has_more || after.is_none() {
                break;
            }
        }
        state.set(CURSOR, &newest.to_string(), now_ms()).await?;
        state.set(LAST_RUN, &now_ms().to_string(), now_ms()).await?;
        self.metrics.add(
            "billsync_poller_events_total",
            "Events the poller found that no webhook had delivered.",
            &[],
            inserted as u64,
        );
        if inserted > 0 {
            tracing::info!(
                inserted,
                "poller found events the webhooks had not delivered"
            );
            self.wake.notify_one();
        }
        Ok(inserted)
    }
}
