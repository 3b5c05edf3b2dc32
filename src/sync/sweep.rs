//! The drift sweep: some changes come with no event at all (lost beyond the events API's 30 days,
//! or a vendor that never emits them). Every interval it lists the customers and live
//! subscriptions, and queues each that belongs to a known tenant and differs from the mirror.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::applier::tenant_claim;
use super::events;
use crate::entitlements::SyncHealth;
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::mirror::observe;
use crate::store::{Db, NewEvent, Source, now_ms};
use crate::stripe::objects;
use crate::stripe::{BillingVendor, Fetched, ListFilter, ObjectKind};

pub const LAST_RUN: &str = "sweep.last_run_at";

#[derive(Clone)]
pub struct Sweep {
    pub db: Db,
    pub vendor: Arc<dyn BillingVendor>,
    pub interval: Duration,
    pub tenant_key: String,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Told whether vendor sync works, for the staleness of entitlement answers.
    pub health: Arc<SyncHealth>,
}

impl Sweep {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
            }
            if let Err(error) = self.step().await {
                self.health.failed();
                crate::cluster::tell_health(&self.db, None).await;
                tracing::warn!(error = %error, "drift sweep failed; retrying next interval");
            }
        }
    }

    /// One sweep; returns how many objects differed from the mirror.
    pub async fn step(&self) -> Result<usize, WorkError> {
        // Every state listed below is at least as new as this: every known tenant's state is
        // confirmed as of now. Each state is versioned by the request that listed it.
        let started = now_ms();
        let mut queued = Vec::new();
        let known = self.customers(&mut queued).await?;
        let listed = self.subscriptions(&known, &mut queued).await?;
        self.unlisted_subscriptions(&known, &listed, &mut queued)
            .await?;

        // Every known tenant's customer and live subscriptions were just read: confirmed.
        self.health.confirmed(started);
        let changed = queued.len();
        self.db.inbox().insert(&queued, now_ms()).await?;
        self.db
            .sync_state()
            .set(crate::cluster::CONFIRMED_AT, &started.to_string(), now_ms())
            .await?;
        crate::cluster::tell_health(&self.db, Some(started)).await;
        self.db
            .sync_state()
            .set(LAST_RUN, &now_ms().to_string(), now_ms())
            .await?;
        self.metrics.add(
            "billsync_sweep_changes_total",
            "Objects the drift sweep found different from the mirror.",
            &[],
            changed as u64,
        );
        if changed > 0 {
            tracing::info!(changed, "drift sweep found changes no event had brought");
            self.wake.notify_one();
        }
        Ok(changed)
    }

    /// Queues the customers of known tenants, and of customers that name a tenant, that differ
    /// from the mirror; returns all those customers' ids.
    async fn customers(&self, queued: &mut Vec<NewEvent>) -> Result<HashSet<String>, WorkError> {
        let linked = self.db.tenants().linked_customers().await?;
        let mut known: HashSet<String> = linked.into_iter().collect();
        for (customer, listed_at) in self.list_all(ObjectKind::Customer).await? {
            let id = objects::id_of(&customer).unwrap_or_default();
            if tenant_claim(&customer, &self.tenant_key).is_some() {
                known.insert(id);
            } else if !known.contains(&id) {
                continue;
            }
            self.queue_if_changed(ObjectKind::Customer, &customer, listed_at, queued)
                .await?;
        }
        Ok(known)
    }

    /// Queues the listed subscriptions of `known` customers that differ from the mirror;
    /// returns their ids.
    async fn subscriptions(
        &self,
        known: &HashSet<String>,
        queued: &mut Vec<NewEvent>,
    ) -> Result<HashSet<String>, WorkError> {
        let mut listed = HashSet::new();
        for (subscription, listed_at) in self.list_all(ObjectKind::Subscription).await? {
            let kind = ObjectKind::Subscription;
            if !objects::customer_of(kind, &subscription).is_some_and(|c| known.contains(&c)) {
                continue;
            }
            listed.insert(objects::id_of(&subscription).unwrap_or_default());
            self.queue_if_changed(kind, &subscription, listed_at, queued)
                .await?;
        }
        Ok(listed)
    }

    /// A live subscription the list no longer shows ended without an event reaching us: each
    /// is fetched, and queued if it differs.
    async fn unlisted_subscriptions(
        &self,
        known: &HashSet<String>,
        listed: &HashSet<String>,
        queued: &mut Vec<NewEvent>,
    ) -> Result<(), WorkError> {
        let kind = ObjectKind::Subscription;
        for customer in known {
            for row in self
                .db
                .mirror()
                .of_customer(customer, kind.as_str())
                .await?
            {
                let ended = matches!(
                    row.status.as_deref(),
                    Some("canceled" | "incomplete_expired")
                );
                if ended || listed.contains(&row.object_id) {
                    continue;
                }
                let fetch = self.vendor.fetch(kind, &row.object_id);
                if let (Fetched::Found(object), at) = observe(&self.db, fetch).await? {
                    self.queue_if_changed(kind, &object, at, queued).await?;
                }
            }
        }
        Ok(())
    }

    /// Every object of the kind, each with when the page holding it was asked for.
    async fn list_all(&self, kind: ObjectKind) -> Result<Vec<(Value, i64)>, WorkError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let filter = ListFilter::default();
            let list = self.vendor.list(kind, &filter, after.as_deref());
            let (page, listed_at) = observe(&self.db, list).await?;
            after = page.data.last().and_then(|o| objects::id_of(&o["id"]));
            all.extend(page.data.into_iter().map(|object| (object, listed_at)));
            if !page.has_more || after.is_none() {
                return Ok(all);
            }
        }
    }

    async fn queue_if_changed(
        &self,
        kind: ObjectKind,
        object: &Value,
        fetched_at: i64,
        queue: &mut Vec<NewEvent>,
    ) -> Result<(), WorkError> {
        if differs_from_mirror(&self.db, kind, object).await? {
            queue.extend(events::from_fetched_state(
                kind,
                object,
                Source::Sweep,
                fetched_at,
            ));
        }
        Ok(())
    }
}

/// Whether the mirror lacks this exact state of the object.
pub async fn differs_from_mirror(
    db: &Db,
    kind: ObjectKind,
    object: &Value,
) -> Result<bool, WorkError> {
    let Some(id) = objects::id_of(&object["id"]) else {
        return Ok(false);
    };
    Ok(match db.mirror().get(kind.as_str(), &id).await? {
        Some(row) if !row.deleted => {
            serde_json::from_str::<Value>(&row.payload).ok().as_ref() != Some(object)
        }
        _ => true,
    })
}
