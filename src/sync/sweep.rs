//! The drift sweep: some changes come with no event at all (lost beyond the events API's 30 days,
//! or a vendor that never emits them). Every interval it checks a few known tenants (those
//! linked to a customer), as many as its share of `sync.sweep_budget` pays for, least recently
//! checked first and recently active ones sooner: their customer and live subscriptions (and
//! credit grants, for a customer the mirror holds some of) are fetched, and each that differs
//! from the mirror is queued. Its cost never grows with the
//! Stripe account; the longest a tenant goes unchecked grows with the tenant count instead
//! (see [`sweep_plan`](super::sweep_plan)).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events;
use super::sweep_plan::{self, CALLS_PER_TENANT, SweepPlan};
use crate::entitlements::SyncHealth;
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::mirror::observe;
use crate::store::{Db, NewEvent, Source, now_ms};
use crate::stripe::objects;
use crate::stripe::{BillingVendor, Fetched, ListFilter, ObjectKind, VendorError};

pub const LAST_RUN: &str = "sweep.last_run_at";

#[derive(Clone)]
pub struct Sweep {
    pub db: Db,
    pub vendor: Arc<dyn BillingVendor>,
    pub interval: Duration,
    /// Stripe calls per minute (`sync.sweep_budget`).
    pub budget: u32,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Told whether vendor sync works, for the staleness of entitlement answers.
    pub health: Arc<SyncHealth>,
}

/// What one pass has spent and found so far.
#[derive(Default)]
struct Pass {
    calls: u64,
    queued: Vec<NewEvent>,
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

    /// The plan for the tenants known now.
    pub async fn plan(&self) -> Result<SweepPlan, WorkError> {
        let (known, _, _) = self.db.tenants().sweep_coverage().await?;
        Ok(sweep_plan::plan(
            self.budget,
            self.interval,
            known.max(0) as u64,
        ))
    }

    /// One pass; returns how many objects differed from the mirror.
    pub async fn step(&self) -> Result<usize, WorkError> {
        // Every state read below is at least as new as this. Each is versioned by its request.
        let started = now_ms();
        let plan = self.plan().await?;
        let due = (self.db.tenants())
            .sweep_due(plan.active_per_pass as u32, plan.tenants_per_pass as u32)
            .await?;
        let mut pass = Pass::default();
        let mut visited = Vec::new();
        let mut failure = None;
        for (tenant, customer) in due {
            if !visited.is_empty() && pass.calls + CALLS_PER_TENANT > plan.calls_per_pass {
                break;
            }
            match self.check(&customer, &mut pass).await {
                Ok(()) => visited.push(tenant),
                // The vendor refused this one tenant's reads: it goes to the back of the queue.
                Err(WorkError::Vendor(
                    e @ (VendorError::Rejected { .. } | VendorError::Malformed(_)),
                )) => {
                    tracing::warn!(tenant, customer, error = %e, "drift sweep could not check a tenant");
                    visited.push(tenant);
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let changed = pass.queued.len();
        self.db.inbox().insert(&pass.queued, now_ms()).await?;
        self.db.tenants().mark_swept(&visited, started).await?;
        self.record(&plan, &pass, changed);
        if changed > 0 {
            tracing::info!(changed, "drift sweep found changes no event had brought");
            self.wake.notify_one();
        }
        match failure {
            Some(error) => Err(error),
            None => {
                self.confirmed(started).await?;
                Ok(changed)
            }
        }
    }

    /// A pass that read all it set out to: the vendor answers, and webhooks and the poller
    /// cover what changed elsewhere, so vendor sync counts as confirmed.
    async fn confirmed(&self, started: i64) -> Result<(), WorkError> {
        self.health.confirmed(started);
        let state = self.db.sync_state();
        state
            .set(crate::cluster::CONFIRMED_AT, &started.to_string(), now_ms())
            .await?;
        crate::cluster::tell_health(&self.db, Some(started)).await;
        state.set(LAST_RUN, &now_ms().to_string(), now_ms()).await?;
        Ok(())
    }

    fn record(&self, plan: &SweepPlan, pass: &Pass, changed: usize) {
        let m = &self.metrics;
        m.add(
            "billsync_sweep_changes_total",
            "Objects the drift sweep found different from the mirror.",
            &[],
            changed as u64,
        );
        m.add(
            "billsync_sweep_calls_total",
            "Stripe calls the drift sweep made.",
            &[],
            pass.calls,
        );
        m.set(
            "billsync_sweep_longest_unchecked_seconds",
            "The longest a known tenant goes unchecked by the drift sweep, from its budget and the tenant count.",
            &[],
            plan.longest_unchecked.as_secs_f64(),
        );
    }

    /// Reads one customer and its live subscriptions, and queues what differs from the mirror.
    async fn check(&self, customer: &str, pass: &mut Pass) -> Result<(), WorkError> {
        pass.calls += 1;
        let fetch = self.vendor.fetch(ObjectKind::Customer, customer);
        if let (Fetched::Found(object), at) = observe(&self.db, fetch).await? {
            self.queue_if_changed(ObjectKind::Customer, &object, at, &mut pass.queued)
                .await?;
        }
        let listed = self.subscriptions(customer, pass).await?;
        self.unlisted_subscriptions(customer, &listed, pass).await?;
        self.credit_grants(customer, pass).await
    }

    /// Lists the customer's credit grants when the mirror holds some (a new grant comes with
    /// an event, or with backfill; this catches a void, an expiry or an edit no event brought),
    /// and queues those that differ. A vendor without credit grants (a fake's 404) is skipped.
    async fn credit_grants(&self, customer: &str, pass: &mut Pass) -> Result<(), WorkError> {
        let kind = ObjectKind::CreditGrant;
        let mirrored = self
            .db
            .mirror()
            .of_customer(customer, kind.as_str())
            .await?;
        if mirrored.is_empty() {
            return Ok(());
        }
        let filter = ListFilter {
            customer: Some(customer.to_owned()),
            all_statuses: false,
        };
        let mut after: Option<String> = None;
        loop {
            pass.calls += 1;
            let list = self.vendor.list(kind, &filter, after.as_deref());
            let (page, listed_at) = match observe(&self.db, list).await {
                Ok(listed) => listed,
                Err(WorkError::Vendor(
                    e @ (VendorError::Rejected { .. } | VendorError::Malformed(_)),
                )) => {
                    tracing::debug!(customer, error = %e, "the vendor does not list credit grants");
                    return Ok(());
                }
                Err(error) => return Err(error),
            };
            after = page.data.last().and_then(|o| objects::id_of(&o["id"]));
            for grant in &page.data {
                self.queue_if_changed(kind, grant, listed_at, &mut pass.queued)
                    .await?;
            }
            if !page.has_more || after.is_none() {
                return Ok(());
            }
        }
    }

    /// Queues the customer's listed (live) subscriptions that differ from the mirror; returns
    /// their ids.
    async fn subscriptions(
        &self,
        customer: &str,
        pass: &mut Pass,
    ) -> Result<HashSet<String>, WorkError> {
        let kind = ObjectKind::Subscription;
        let filter = ListFilter {
            customer: Some(customer.to_owned()),
            all_statuses: false,
        };
        let mut listed = HashSet::new();
        let mut after: Option<String> = None;
        loop {
            pass.calls += 1;
            let list = self.vendor.list(kind, &filter, after.as_deref());
            let (page, listed_at) = observe(&self.db, list).await?;
            after = page.data.last().and_then(|o| objects::id_of(&o["id"]));
            for subscription in &page.data {
                listed.insert(objects::id_of(&subscription["id"]).unwrap_or_default());
                self.queue_if_changed(kind, subscription, listed_at, &mut pass.queued)
                    .await?;
            }
            if !page.has_more || after.is_none() {
                return Ok(listed);
            }
        }
    }

    /// A live subscription the list no longer shows ended without an event reaching us: each
    /// is fetched, and queued if it differs.
    async fn unlisted_subscriptions(
        &self,
        customer: &str,
        listed: &HashSet<String>,
        pass: &mut Pass,
    ) -> Result<(), WorkError> {
        let kind = ObjectKind::Subscription;
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
            if ended || row.deleted || listed.contains(&row.object_id) {
                continue;
            }
            pass.calls += 1;
            let fetch = self.vendor.fetch(kind, &row.object_id);
            if let (Fetched::Found(object), at) = observe(&self.db, fetch).await? {
                self.queue_if_changed(kind, &object, at, &mut pass.queued)
                    .await?;
            }
        }
        Ok(())
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
