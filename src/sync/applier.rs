//! The applier: brings the mirror to the state each inbox row calls for. With refetch on (the
//! default) it asks the vendor for the object's current state, once per object however many
//! events name it; otherwise it applies the event's own copy, and the mirror's version check keeps
//! an older copy from overwriting a newer one.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClaimRenewal;
use crate::domain::TenantId;
use crate::entitlements::Entitlements;
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::store::{
    Apply, ApplyOutcome, Confirmed, Db, InboxRow, ObjectState, Queue, Source, StoreError,
    TenantClaim, now_ms,
};
use crate::stripe::objects;
use crate::stripe::{BillingVendor, Fetched, ObjectKind};

/// How long the applier idles when nothing wakes it.
const IDLE: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Applier {
    pub db: Db,
    pub vendor: Option<Arc<dyn BillingVendor>>,
    pub refetch: bool,
    pub tenant_key: String,
    pub batch: u32,
    /// How long a claim on a batch lasts unless renewed (`claims.inbox`).
    pub claim: Duration,
    pub max_retry_delay: Duration,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Told which tenants' read models the applied states change.
    pub entitlements: Option<Entitlements>,
    /// Woken when a draft invoice is applied (the open period check repairs before Stripe
    /// finalizes it).
    pub drafts: Option<Arc<Notify>>,
    /// Told when an applied state changes what revenue is built from.
    pub revenue: Option<Arc<crate::revenue::RevenueCache>>,
}

/// What a group of rows for one object comes to.
enum Prepared {
    Apply(Vec<Apply>),
    /// Nothing to apply, for this reason.
    Skip(&'static str),
}

impl Applier {
    /// Applies until `shutdown`; woken at once by new inbox rows.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let settled = match self.step().await {
                Ok(n) => n,
                Err(error) => {
                    tracing::warn!(error = %error, "applier: cannot read the inbox");
                    0
                }
            };
            if settled > 0 {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(IDLE) => {}
            }
        }
    }

    /// Applies every row due now (one batch, one transaction); returns how many rows it settled
    /// or deferred.
    pub async fn step(&self) -> Result<usize, StoreError> {
        let claim = self.claim.as_millis() as i64;
        let rows = self.db.inbox().due(now_ms(), self.batch, claim).await?;
        let count = rows.len();
        let Some(until) = rows.first().map(|row| row.next_attempt_at) else {
            return Ok(0);
        };
        // The vendor is asked while the claim is renewed; the rows are settled after.
        let ids = rows.iter().map(|row| row.event_id.clone()).collect();
        let renewal = ClaimRenewal::start(
            self.db.clone(),
            Queue::Inbox,
            ids,
            until,
            self.claim,
            self.metrics.clone(),
        );
        let (mut ready, mut skipped, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for group in group_by_object(rows) {
            match self.prepare(&group).await {
                Ok(Prepared::Apply(applies)) => ready.push((group, applies)),
                Ok(Prepared::Skip(reason)) => skipped.push((group, reason)),
                Err(error) => failed.push((group, error)),
            }
        }
        renewal.finish().await;
        for (group, reason) in skipped {
            for row in group {
                self.db
                    .inbox()
                    .mark_skipped(&row.event_id, reason, now_ms())
                    .await?;
            }
        }
        for (group, error) in &failed {
            self.defer(group, error).await?;
        }
        self.write(ready).await?;
        // billsync_sync_lag_seconds is read from the database on each scrape (api/metrics.rs),
        // not here: the inbox's counts per batch would cost more than the batch as it grows.
        Ok(count)
    }

    /// Writes the prepared states in one transaction, or object by object if that fails.
    async fn write(&self, ready: Vec<(Vec<InboxRow>, Vec<Apply>)>) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let items: Vec<Apply> = ready
            .iter()
            .flat_map(|(_, applies)| applies.iter().cloned())
            .collect();
        match self.db.mirror().apply(&items, now_ms()).await {
            Ok(outcomes) => {
                self.invalidate(&items, &outcomes);
                self.grants_applied(&items, &outcomes).await;
                for conflict in outcomes.into_iter().filter_map(|o| o.conflict) {
                    tracing::warn!(conflict = %conflict, "tenant mapping conflict; the first customer keeps the tenant");
                }
                self.record_applied(ready.iter().flat_map(|(group, _)| group), started);
            }
            // One bad object must not hold back the batch: apply each group alone.
            Err(error) if ready.len() > 1 => {
                tracing::warn!(error = %error, "batch apply failed; applying object by object");
                for (group, applies) in &ready {
                    match self.db.mirror().apply(applies, now_ms()).await {
                        Ok(outcomes) => {
                            self.invalidate(applies, &outcomes);
                            self.grants_applied(applies, &outcomes).await;
                            self.record_applied(group.iter(), started);
                        }
                        Err(error) => self.defer(group, &error.into()).await?,
                    }
                }
            }
            Err(error) => {
                let error = WorkError::from(error);
                for (group, _) in &ready {
                    self.defer(group, &error).await?;
                }
            }
        }
        Ok(())
    }

    /// Drops the read models the applied states feed: a tenant's own objects change its model;
    /// a product, price or plan may change anyone's. A draft invoice wakes the draft check.
    fn invalidate(&self, items: &[Apply], outcomes: &[ApplyOutcome]) {
        let draft = |(item, outcome): (&Apply, &ApplyOutcome)| {
            outcome.written
                && item.state.object_type == "invoice"
                && item.state.status.as_deref() == Some("draft")
        };
        if let Some(drafts) = &self.drafts
            && items.iter().zip(outcomes).any(draft)
        {
            drafts.notify_one();
        }
        let revenue_input = |(item, outcome): (&Apply, &ApplyOutcome)| {
            outcome.written
                && matches!(
                    item.state.object_type.as_str(),
                    "invoice" | "credit_note" | "charge" | "customer"
                )
        };
        if let Some(revenue) = &self.revenue
            && items.iter().zip(outcomes).any(revenue_input)
        {
            revenue.changed();
        }
        let Some(entitlements) = &self.entitlements else {
            return;
        };
        for (item, outcome) in items.iter().zip(outcomes) {
            if !outcome.written {
                continue;
            }
            match item.state.object_type.as_str() {
                "product" | "price" | "plan" => entitlements.invalidate_all(),
                _ => {
                    if let Some(tenant) = &outcome.tenant_id {
                        entitlements.invalidate(tenant);
                    }
                    if let Some(claim) = &item.claim {
                        entitlements.invalidate(&claim.tenant_id);
                    }
                }
            }
        }
    }

    /// The low-balance alarm of each tenant whose credit grants changed ([`crate::topup`]).
    async fn grants_applied(&self, items: &[Apply], outcomes: &[ApplyOutcome]) {
        let tenants: std::collections::BTreeSet<String> = (items.iter().zip(outcomes))
            .filter(|(item, outcome)| outcome.written && item.state.object_type == "credit_grant")
            .filter_map(|(_, outcome)| outcome.tenant_id.clone())
            .collect();
        if tenants.is_empty() {
            return;
        }
        let Some(entitlements) = &self.entitlements else {
            return;
        };
        let features = entitlements.plans().credits.clone();
        crate::topup::grants_applied(&self.db, &features, &tenants).await;
    }

    fn record_applied<'a>(
        &self,
        rows: impl Iterator<Item = &'a InboxRow>,
        started: std::time::Instant,
    ) {
        let now = now_ms();
        let mut n = 0;
        for row in rows {
            n += 1;
            self.metrics.inc(
                "billsync_events_applied_total",
                "Inbox rows applied to the mirror, by event type.",
                &[("type", &row.event_type)],
            );
            self.metrics.observe(
                "billsync_apply_latency_seconds",
                "From an inbox row's arrival to its apply.",
                &[("source", &row.source)],
                (now - row.received_at).max(0) as f64 / 1000.0,
            );
        }
        if n > 0 {
            self.metrics.observe(
                "billsync_apply_batch_seconds",
                "Time to write one batch of applies to the database.",
                &[],
                started.elapsed().as_secs_f64(),
            );
        }
    }

    /// Records the failure on every row of the group; each is retried with backoff.
    async fn defer(&self, group: &[InboxRow], error: &WorkError) -> Result<(), StoreError> {
        let message = error.to_string();
        for row in group {
            let delay = crate::retry::after_failures(row.attempts, self.max_retry_delay);
            tracing::warn!(event_id = %row.event_id, attempts = row.attempts + 1, error = %message, "apply failed; will retry");
            self.metrics.inc(
                "billsync_events_failed_total",
                "Failed apply attempts, by event type.",
                &[("type", &row.event_type)],
            );
            self.db
                .inbox()
                .mark_failed(&row.event_id, &message, now_ms() + delay.as_millis() as i64)
                .await?;
        }
        Ok(())
    }

    /// The states a group of rows for one object calls for: the vendor's current state (one
    /// fetch for the whole group) or each row's own copy. Writes nothing.
    async fn prepare(&self, group: &[InboxRow]) -> Result<Prepared, WorkError> {
        let first = &group[0];
        let (Some(kind), Some(object_id)) = (
            first.object_type.as_deref().and_then(ObjectKind::parse),
            first.object_id.clone(),
        ) else {
            return Ok(Prepared::Skip("nothing to apply"));
        };
        // billsync's own commands already applied the vendor's answer (the same state as the
        // event's copy): their events need no refetch, unless the mirror shows something else.
        let has_events = group
            .iter()
            .any(|row| !Source::is_fresh_state(&row.source) && !super::is_own(row));
        // A refund or dispute names its charge but carries no copy of it: only a fetch helps.
        let copies: Vec<_> = group.iter().map(|row| state_of_row(row, kind)).collect();
        let has_events = has_events || self.echo_differs(group, kind, &object_id, &copies).await?;
        let needs_vendor = copies
            .iter()
            .any(|c| matches!(c, Err(WorkError::NeedsVendor(_))));
        if needs_vendor && self.vendor.is_none() {
            return Ok(Prepared::Skip(
                "carries no copy of the object; applying it needs the vendor (stripe.api_key)",
            ));
        }
        let applies = match &self.vendor {
            Some(vendor) if (self.refetch && has_events) || needs_vendor => {
                let (object, fetched_at, deleted) =
                    self.fetch(vendor.as_ref(), kind, &object_id).await?;
                let ids = group.iter().map(|r| r.event_id.clone()).collect();
                vec![self.apply_of(kind, &object_id, &object, fetched_at, deleted, ids, true)]
            }
            _ => group
                .iter()
                .zip(copies)
                .map(|(row, copy)| {
                    let (object, version, deleted) = copy?;
                    Ok(self.apply_of(
                        kind,
                        &object_id,
                        &object,
                        version,
                        deleted,
                        vec![row.event_id.clone()],
                        false,
                    ))
                })
                .collect::<Result<_, WorkError>>()?,
        };
        Ok(Prepared::Apply(applies))
    }

    /// Whether the group holds the echo of an own command whose copy is not what the mirror
    /// shows. The command's answer may have lost to a fetch sent while its write was on its way
    /// that reached the vendor first and answered last; then the echo is the sign of a change
    /// no observation has yet followed, and the object is fetched (see docs/architecture.md,
    /// "Versions of mirror rows").
    async fn echo_differs(
        &self,
        group: &[InboxRow],
        kind: ObjectKind,
        object_id: &str,
        copies: &[Result<(Value, i64, bool), WorkError>],
    ) -> Result<bool, WorkError> {
        let echoes: Vec<&Value> = group
            .iter()
            .zip(copies)
            .filter(|(row, _)| super::is_own(row) && !Source::is_fresh_state(&row.source))
            .filter_map(|(_, copy)| copy.as_ref().ok().map(|(object, _, _)| object))
            .collect();
        if !self.refetch || self.vendor.is_none() || echoes.is_empty() {
            return Ok(false);
        }
        let mirrored = self.db.mirror().get(kind.as_str(), object_id).await?;
        let mirrored = mirrored.and_then(|row| serde_json::from_str::<Value>(&row.payload).ok());
        Ok(echoes.iter().any(|copy| mirrored.as_ref() != Some(*copy)))
    }

    /// The vendor's current state of an object, versioned by when the fetch was sent, and
    /// whether it is gone (then a tombstone).
    async fn fetch(
        &self,
        vendor: &dyn BillingVendor,
        kind: ObjectKind,
        object_id: &str,
    ) -> Result<(Value, i64, bool), WorkError> {
        let (fetched, at) = crate::mirror::observe(&self.db, vendor.fetch(kind, object_id)).await?;
        Ok(match fetched {
            Fetched::Found(object) => (object, at, false),
            Fetched::Gone => (tombstone(kind, object_id), at, true),
        })
    }

    /// Applies a state the vendor just answered with (an outbox command's result) together
    /// with its inbox row and the command's end, and drops the read models it changes.
    ///
    /// If the mirror holds a later observation (a request sent while the command's write was on
    /// its way, which may have reached the vendor before or after the write), the order is
    /// unknown: the object is fetched again, after the write ended, and that state is applied
    /// instead, recorded on the command's inbox row. So a client that sees the command ended
    /// sees its change, or a later one, in the mirror. Should that fetch fail, the answer is
    /// settled and the later observation stays until the object's next event or the sweep.
    pub async fn apply_confirmed(
        &self,
        kind: ObjectKind,
        object: &Value,
        version: i64,
        confirmed: Confirmed<'_>,
    ) -> Result<(), StoreError> {
        // `from_fetched_state` made the record, so the object has an id.
        let object_id = objects::id_of(object).unwrap_or_default();
        let ids = vec![confirmed.record.event_id.clone()];
        let answer = self.apply_of(kind, &object_id, object, version, false, ids.clone(), false);
        let Some(vendor) = &self.vendor else {
            return self.confirm(answer, confirmed).await;
        };
        let first_try = Confirmed {
            unless_superseded: true,
            ..confirmed
        };
        if self.try_confirm(&answer, first_try).await? {
            return Ok(());
        }
        match self.fetch(vendor.as_ref(), kind, &object_id).await {
            Ok((now, at, deleted)) => {
                let item = self.apply_of(kind, &object_id, &now, at, deleted, ids, true);
                self.confirm(item, confirmed).await
            }
            Err(error) => {
                tracing::warn!(object_id, %error, "could not fetch a command's object again; its answer is settled as it came");
                self.confirm(answer, confirmed).await
            }
        }
    }

    /// Writes `item` with the command's end unconditionally.
    async fn confirm(&self, item: Apply, confirmed: Confirmed<'_>) -> Result<(), StoreError> {
        let confirmed = Confirmed {
            unless_superseded: false,
            ..confirmed
        };
        self.try_confirm(&item, confirmed).await.map(drop)
    }

    /// Writes `item` with the command's end; false when it was refused as superseded.
    async fn try_confirm(
        &self,
        item: &Apply,
        confirmed: Confirmed<'_>,
    ) -> Result<bool, StoreError> {
        let items = std::slice::from_ref(item);
        let mirror = self.db.mirror();
        let Some(outcomes) = mirror.apply_with(items, Some(confirmed), now_ms()).await? else {
            return Ok(false);
        };
        self.invalidate(items, &outcomes);
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_of(
        &self,
        kind: ObjectKind,
        object_id: &str,
        object: &Value,
        version: i64,
        deleted: bool,
        event_ids: Vec<String>,
        refetched: bool,
    ) -> Apply {
        Apply {
            state: object_state(kind, object_id, object, version, deleted),
            claim: (kind == ObjectKind::Customer)
                .then(|| tenant_claim(object, &self.tenant_key))
                .flatten(),
            event_ids,
            refetched,
        }
    }
}

/// The mirror row for an object state.
pub fn object_state(
    kind: ObjectKind,
    object_id: &str,
    object: &Value,
    version: i64,
    deleted: bool,
) -> ObjectState {
    let deleted = deleted || objects::is_deleted(object);
    ObjectState {
        object_type: kind.as_str().to_owned(),
        object_id: object_id.to_owned(),
        customer_id: objects::customer_of(kind, object),
        status: objects::status_of(object),
        created: objects::int(&object["created"]),
        version,
        deleted,
        payload: object.to_string(),
        periods: objects::billing_periods(kind, object, deleted),
    }
}

/// The state a row carries without asking the vendor: the refetched state recorded when it was
/// applied, or else its own copy, with its version ([`copy_version`]).
pub fn state_of_row(row: &InboxRow, kind: ObjectKind) -> Result<(Value, i64, bool), WorkError> {
    if let (Some(payload), Some(version)) = (&row.applied_payload, row.applied_version) {
        let object: Value =
            serde_json::from_str(payload).map_err(|e| WorkError::Payload(e.to_string()))?;
        let deleted = objects::is_deleted(&object);
        return Ok((object, version, deleted));
    }
    let event: Value =
        serde_json::from_str(&row.payload).map_err(|e| WorkError::Payload(e.to_string()))?;
    let object = event["data"]["object"].clone();
    // A refund or dispute event names its charge; its own copy is not the charge's state.
    let object = match objects::target(&object) {
        Some((target_kind, _))
            if target_kind == kind
                && object["object"] != "refund"
                && object["object"] != "dispute" =>
        {
            object
        }
        _ => return Err(WorkError::NeedsVendor(row.event_type.clone())),
    };
    let deletes = row.event_type.ends_with(".deleted")
        && matches!(
            kind,
            ObjectKind::Customer
                | ObjectKind::Product
                | ObjectKind::Price
                | ObjectKind::Plan
                | ObjectKind::Invoice
        );
    Ok((object, copy_version(row), deletes))
}

/// The version of the state a row carries. A state billsync observed itself (sweep, backfill,
/// reconciliation, a command's answer) is versioned by the moment it started the request
/// (`event_created`, Unix ms). A vendor event's own copy is versioned by the last millisecond
/// of the second Stripe created it in: the change it reports happened within that second, so
/// any request started before the change is versioned lower.
///
/// The echo of one of billsync's own commands is the lowest version of all: the command's
/// answer, applied when the command ended, is the same state or a newer one (a later command
/// of the tenant may have followed within the same second), so the echo never replaces
/// anything; it only fills in an object the mirror lacks.
pub fn copy_version(row: &InboxRow) -> i64 {
    if Source::is_fresh_state(&row.source) {
        row.event_created
    } else if super::is_own(row) {
        i64::MIN
    } else {
        row.event_created.div_euclid(1000) * 1000 + 999
    }
}

/// What the mirror keeps for an object the vendor no longer has.
fn tombstone(kind: ObjectKind, object_id: &str) -> Value {
    json!({ "id": object_id, "object": kind.as_str(), "deleted": true })
}

/// The tenant a customer names in its metadata, when the value is a valid tenant id.
pub fn tenant_claim(customer: &Value, key: &str) -> Option<TenantClaim> {
    let raw = customer["metadata"][key].as_str()?;
    match TenantId::parse(raw.trim()) {
        Ok(tenant) => Some(TenantClaim {
            tenant_id: tenant.as_str().to_owned(),
            name: customer["name"].as_str().map(str::to_owned),
            email: customer["email"].as_str().map(str::to_owned),
        }),
        Err(error) => {
            tracing::warn!(customer = ?customer["id"].as_str(), value = raw, error = %error, "customer names an invalid tenant id");
            None
        }
    }
}

/// Rows grouped by the object they touch, in order of each object's first row.
fn group_by_object(rows: Vec<InboxRow>) -> Vec<Vec<InboxRow>> {
    let mut groups: Vec<Vec<InboxRow>> = Vec::new();
    let mut index: std::collections::HashMap<(Option<String>, Option<String>), usize> =
        Default::default();
    for row in rows {
        let key = (row.object_type.clone(), row.object_id.clone());
        match index.get(&key) {
            Some(&i) => groups[i].push(row),
            None => {
                index.insert(key, groups.len());
                groups.push(vec![row]);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_claims_need_a_valid_id() {
        let customer = json!({"id": "cus_1", "metadata": {"tenant_id": "acme"}, "name": "Acme"});
        assert_eq!(
            tenant_claim(&customer, "tenant_id").unwrap().tenant_id,
            "acme"
        );
        assert!(tenant_claim(&customer, "other_key").is_none());
        let bad = json!({"id": "cus_2", "metadata": {"tenant_id": "no spaces allowed"}});
        assert!(tenant_claim(&bad, "tenant_id").is_none());
    }
}
