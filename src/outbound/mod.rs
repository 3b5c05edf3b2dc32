//! The outbound outbox: the product's changes (customer, subscription) go to the vendor as
//! commands, one tenant's in the order they were accepted, each with an idempotency key derived
//! from its id.
//!
//! Before each attempt the worker reads the vendor's current subscription. If it already is
//! what the command asks for, the command succeeded (an earlier attempt landed before a crash,
//! or someone made the same change); if it differs from the state the command was accepted
//! against, someone else changed it in between and the command ends as `conflict`; otherwise
//! the change is sent. The vendor's answer is stored with the command's end in one transaction
//! and applied to the mirror at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClaimRenewal;
use crate::domain::{Subscription, TenantId};
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::mirror::observe;
use crate::store::{CommandRow, Confirmed, Db, Queue, Settlement, Source, StoreError, now_ms};
use crate::stripe::objects;
use crate::stripe::{
    BillingVendor, CustomerWrite, Fetched, ListFilter, ObjectKind, Proration, SubscriptionWrite,
    VendorError,
};
use crate::sync::Applier;
use crate::sync::events;

/// How long the worker idles when nothing wakes it.
const IDLE: Duration = Duration::from_secs(1);

/// Own changes that ended this long before a command was accepted still explain a state it did
/// not expect: its base may have been read just before they reached the mirror.
const OWN_CHANGE_SLACK_MS: i64 = 1_000;

/// What a command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// Create the tenant's customer, or carry its name and email to it.
    CustomerSync,
    /// Create the subscription, or swap its price and quantity.
    SubscriptionSet,
    SubscriptionCancel,
    /// Undo a cancel at period end.
    SubscriptionResume,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CustomerSync => "customer.sync",
            Self::SubscriptionSet => "subscription.set",
            Self::SubscriptionCancel => "subscription.cancel",
            Self::SubscriptionResume => "subscription.resume",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::CustomerSync,
            Self::SubscriptionSet,
            Self::SubscriptionCancel,
            Self::SubscriptionResume,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// The parameters of `subscription.set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRequest {
    /// As the caller gave it: a price or plan id, or a lookup key.
    pub price: String,
    /// The price or plan id it names.
    pub resolved_price: String,
    pub quantity: u32,
    pub proration: Proration,
    pub trial_days: Option<u32>,
}

/// The parameters of `subscription.cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub at_period_end: bool,
}

/// The prefix of the idempotency keys billsync's own commands carry (inbound sync recognises
/// their echoes by it).
pub const OWN_KEY_PREFIX: &str = "billsync-";

/// The idempotency key of every attempt of a command.
pub fn idempotency_key(command_id: &str) -> String {
    format!("{OWN_KEY_PREFIX}{command_id}")
}

/// The parts of a subscription a command may change, as one comparable string: what a command
/// expects to find at the vendor when it is sent. An ended subscription counts as none.
pub fn fingerprint(subscription: Option<&Subscription>) -> String {
    let Some(s) = subscription.filter(|s| s.liveness() > 0) else {
        return "none".to_owned();
    };
    let mut items: Vec<String> = s
        .items
        .iter()
        .map(|item| {
            format!(
                "{}x{}",
                item.price.as_deref().unwrap_or("?"),
                item.quantity.map(|q| q.normalize()).unwrap_or_default()
            )
        })
        .collect();
    items.sort();
    format!(
        "{}|{}|cancel_at_period_end={}",
        s.id,
        items.join(","),
        s.cancel_at_period_end
    )
}

/// How an attempt ended.
#[derive(Debug)]
enum Step {
    Done(Ending),
    /// Worth another attempt later (vendor unavailable, customer not there yet).
    Retry(String),
}

#[derive(Debug)]
struct Ending {
    status: &'static str,
    /// The vendor object to show (the result, or the current state on conflict).
    object: Option<Observed>,
    error_code: Option<String>,
    message: Option<String>,
}

/// A vendor object as a request returned it, with its version: when the request was sent.
#[derive(Debug)]
struct Observed {
    kind: ObjectKind,
    object: Value,
    at: i64,
}

impl Ending {
    fn succeeded(kind: ObjectKind, object: Value, at: i64) -> Self {
        Self {
            status: "succeeded",
            object: Some(Observed { kind, object, at }),
            error_code: None,
            message: None,
        }
    }

    fn failed(code: &str, message: impl Into<String>) -> Self {
        Self {
            status: "failed",
            object: None,
            error_code: Some(code.to_owned()),
            message: Some(message.into()),
        }
    }

    fn conflict(current: Option<Value>, at: i64) -> Self {
        Self {
            status: "conflict",
            object: current.map(|object| Observed {
                kind: ObjectKind::Subscription,
                object,
                at,
            }),
            error_code: Some("conflict".to_owned()),
            message: Some(
                "the subscription changed at the vendor after this command was accepted; \
                 nothing was sent"
                    .to_owned(),
            ),
        }
    }
}

#[derive(Clone)]
pub struct Outbox {
    pub db: Db,
    pub vendor: Arc<dyn BillingVendor>,
    /// Applies confirmed states to the mirror and drops the read models they change.
    pub applier: Applier,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Commands in flight at once (each tenant's still one at a time).
    pub concurrency: usize,
    /// How long a claim on a command lasts unless renewed (`claims.commands`).
    pub claim: Duration,
    /// A command the vendor could not take for this long fails.
    pub give_up_after: Duration,
    pub max_retry_delay: Duration,
}

impl Outbox {
    /// Sends commands until `shutdown`, then lets the ones in flight finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut running: JoinSet<String> = JoinSet::new();
        let mut busy: HashSet<String> = HashSet::new();
        loop {
            if running.len() < self.concurrency {
                match self
                    .db
                    .commands()
                    .due(
                        now_ms(),
                        self.claim_limit(running.len()),
                        self.claim.as_millis() as i64,
                    )
                    .await
                {
                    Ok(due) => {
                        let mut unstarted = Vec::new();
                        for command in due {
                            // The tenant's last attempt settled but its task is still
                            // returning: give the claim back, the loop comes round again.
                            if running.len() >= self.concurrency
                                || !busy.insert(command.tenant_id.clone())
                            {
                                unstarted.push(command.command_id);
                                continue;
                            }
                            let worker = self.clone();
                            running.spawn(async move {
                                let tenant = command.tenant_id.clone();
                                worker.attempt(command).await;
                                tenant
                            });
                        }
                        if let Err(error) = self.db.commands().release(&unstarted, now_ms()).await {
                            tracing::warn!(error = %error, "outbox: cannot give claims back; they expire by themselves");
                        }
                    }
                    Err(error) => tracing::warn!(error = %error, "outbox: cannot read commands"),
                }
            }
            let idle = self.idle_for().await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Ok(tenant) = done {
                        busy.remove(&tenant);
                    }
                }
                () = self.wake.notified() => {}
                () = tokio::time::sleep(idle) => {}
            }
            while let Some(done) = running.try_join_next() {
                if let Ok(tenant) = done {
                    busy.remove(&tenant);
                }
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// As many commands as there are free slots.
    fn claim_limit(&self, running: usize) -> u32 {
        u32::try_from(self.concurrency.saturating_sub(running).max(1)).unwrap_or(u32::MAX)
    }

    /// Until the next scheduled retry, at most [`IDLE`]. Commands due now but held back (their
    /// tenant busy, every slot taken) wait for a slot to free, which wakes the loop.
    async fn idle_for(&self) -> Duration {
        let now = now_ms();
        match self.db.commands().next_retry(now).await {
            Ok(Some(at)) => {
                Duration::from_millis((at - now_ms()).clamp(1, IDLE.as_millis() as i64) as u64)
            }
            _ => IDLE,
        }
    }

    /// One attempt at one command (as claimed by `Commands::due`), recorded whatever happens.
    /// The claim is renewed until the vendor has answered.
    pub async fn attempt(&self, command: CommandRow) {
        let started = std::time::Instant::now();
        let renewal = ClaimRenewal::start(
            self.db.clone(),
            Queue::Commands,
            vec![command.command_id.clone()],
            command.next_attempt_at,
            self.claim,
            self.metrics.clone(),
        );
        let executed = self.execute(&command).await;
        renewal.finish().await;
        let step = match executed {
            Ok(step) => step,
            Err(WorkError::Vendor(VendorError::Rejected {
                status,
                code,
                message,
            })) => Step::Done(Ending::failed(
                code.as_deref().unwrap_or(if status == 404 {
                    "not_found"
                } else {
                    "vendor_rejected"
                }),
                message,
            )),
            Err(error) => Step::Retry(error.to_string()),
        };
        let outcome = match step {
            Step::Done(ending) => self.settle(&command, ending).await,
            Step::Retry(reason) => self.retry(&command, &reason).await,
        };
        match outcome {
            Ok(status) => {
                self.metrics.inc(
                    "billsync_commands_total",
                    "Outbox command attempts, by kind and outcome (pending: to be retried).",
                    &[("kind", &command.kind), ("outcome", status)],
                );
                if status != "pending" {
                    self.metrics.observe(
                        "billsync_command_seconds",
                        "From a command's acceptance to its end.",
                        &[("kind", &command.kind)],
                        (now_ms() - command.created_at).max(0) as f64 / 1000.0,
                    );
                }
                tracing::debug!(command_id = %command.command_id, status, elapsed_ms = started.elapsed().as_millis() as u64, "outbox attempt");
            }
            Err(error) => {
                // Like a crash after the call: the command stays pending and is tried again, when
                // the vendor's state tells whether the call landed. Not at once: the database is
                // failing.
                tracing::warn!(command_id = %command.command_id, error = %error, "outbox: cannot record the outcome; the command will be retried");
                tokio::time::sleep(IDLE).await;
            }
        }
    }

    async fn retry(&self, command: &CommandRow, reason: &str) -> Result<&'static str, StoreError> {
        let age = Duration::from_millis((now_ms() - command.created_at).max(0) as u64);
        if age >= self.give_up_after {
            let message = format!(
                "the vendor did not take the command within {}s: {reason}",
                self.give_up_after.as_secs()
            );
            return self
                .settle(command, Ending::failed("vendor_unavailable", message))
                .await;
        }
        let delay = crate::retry::after_failures(command.attempts, self.max_retry_delay);
        tracing::warn!(command_id = %command.command_id, attempts = command.attempts + 1, reason, "command will be retried");
        self.db
            .commands()
            .retry_later(
                &command.command_id,
                reason,
                now_ms() + delay.as_millis() as i64,
                now_ms(),
            )
            .await?;
        Ok("pending")
    }

    /// Stores the command's end. With a vendor state (the result, or the current state on
    /// conflict), the state's inbox row, its apply to the mirror and the command's end are one
    /// transaction: a client that sees the command ended sees the mirror and the entitlements
    /// after it. A crash before it leaves the command pending; its next attempt finds the
    /// state already at the vendor.
    async fn settle(
        &self,
        command: &CommandRow,
        ending: Ending,
    ) -> Result<&'static str, StoreError> {
        let rebase = match (&command.base, &ending.object) {
            (Some(old), Some(seen))
                if ending.status == "succeeded" && seen.kind == ObjectKind::Subscription =>
            {
                let new = fingerprint(Some(&objects::subscription(&seen.object)));
                Some((old.clone(), new))
            }
            _ => None,
        };
        let settlement = Settlement {
            status: ending.status,
            result: ending.object.as_ref().map(|seen| seen.object.to_string()),
            error_code: ending.error_code.clone(),
            message: ending.message.clone(),
            rebase,
        };
        // Versioned by when the request that returned it was sent, not by now: a state someone
        // fetched in the meantime may be newer.
        let record = ending.object.as_ref().and_then(|seen| {
            let mut event =
                events::from_fetched_state(seen.kind, &seen.object, Source::Command, seen.at)?;
            event.idempotency_key = Some(idempotency_key(&command.command_id));
            Some((seen, event))
        });
        match &record {
            Some((seen, event)) => {
                let confirmed = Confirmed {
                    record: event,
                    command,
                    settlement: &settlement,
                };
                self.applier
                    .apply_confirmed(seen.kind, &seen.object, seen.at, confirmed)
                    .await?;
            }
            None => {
                self.db
                    .commands()
                    .settle(command, &settlement, now_ms())
                    .await?;
            }
        }
        match ending.status {
            "failed" => {
                tracing::warn!(command_id = %command.command_id, kind = %command.kind, code = ending.error_code.as_deref().unwrap_or("-"), reason = ending.message.as_deref().unwrap_or("-"), "command failed")
            }
            "conflict" => {
                tracing::warn!(command_id = %command.command_id, kind = %command.kind, "command not sent: the subscription changed at the vendor")
            }
            _ => {
                tracing::info!(command_id = %command.command_id, kind = %command.kind, "command confirmed by the vendor")
            }
        }
        Ok(ending.status)
    }

    async fn execute(&self, command: &CommandRow) -> Result<Step, WorkError> {
        let Some(kind) = CommandKind::parse(&command.kind) else {
            return Ok(Step::Done(Ending::failed(
                "unknown_command",
                format!(
                    "this billsync does not know commands of kind `{}`",
                    command.kind
                ),
            )));
        };
        let tenant_id = TenantId::parse(&command.tenant_id)
            .map_err(|e| WorkError::Payload(format!("tenant id: {}", e.message)))?;
        let Some(tenant) = self.db.tenants().get(&tenant_id).await? else {
            return Ok(Step::Done(Ending::failed(
                "tenant_not_found",
                "the tenant no longer exists",
            )));
        };
        let key = idempotency_key(&command.command_id);
        if kind == CommandKind::CustomerSync {
            let write = CustomerWrite {
                tenant_id: &tenant.tenant_id,
                name: tenant.name.as_deref(),
                email: tenant.email.as_deref(),
            };
            let (customer, at) = observe(
                &self.db,
                self.vendor
                    .write_customer(tenant.customer_id.as_deref(), &write, &key),
            )
            .await?;
            return Ok(Step::Done(Ending::succeeded(
                ObjectKind::Customer,
                customer,
                at,
            )));
        }
        let Some(customer) = tenant.customer_id.as_deref() else {
            return Ok(Step::Retry(
                "the tenant has no Stripe customer yet".to_owned(),
            ));
        };
        let (current, listed_at) = self.live_subscription(customer).await?;
        let parsed = current.as_ref().map(|(_, s)| s);
        let metadata = [
            ("billsync_command", command.command_id.as_str()),
            ("tenant_id", tenant.tenant_id.as_str()),
        ];

        match kind {
            CommandKind::SubscriptionSet => {
                let request: SetRequest = parse(&command.request)?;
                if let Some((object, s)) = &current {
                    let single = s.items.len() == 1;
                    let item = &s.items[..];
                    if single
                        && item[0].price.as_deref() == Some(request.resolved_price.as_str())
                        && item[0].quantity == Some(request.quantity.into())
                    {
                        return Ok(Step::Done(Ending::succeeded(
                            ObjectKind::Subscription,
                            object.clone(),
                            listed_at,
                        )));
                    }
                }
                if let Some(conflict) = self.conflict(command, &current, listed_at).await? {
                    return Ok(conflict);
                }
                let write = match &current {
                    None => SubscriptionWrite::Create {
                        customer,
                        price: &request.resolved_price,
                        quantity: request.quantity,
                        trial_days: request.trial_days,
                        metadata: &metadata,
                    },
                    Some((_, s)) => {
                        let [item] = &s.items[..] else {
                            return Ok(Step::Done(Ending::failed(
                                "multiple_items",
                                format!(
                                    "subscription {} has {} items; billsync changes single-item subscriptions only",
                                    s.id,
                                    s.items.len()
                                ),
                            )));
                        };
                        let Some(item_id) = item.id.as_deref() else {
                            return Err(WorkError::Vendor(VendorError::Malformed(
                                "subscription item without an id".to_owned(),
                            )));
                        };
                        SubscriptionWrite::Change {
                            subscription: &s.id,
                            item: item_id,
                            price: &request.resolved_price,
                            quantity: request.quantity,
                            proration: request.proration,
                            trial_end: request
                                .trial_days
                                .map(|days| command.created_at / 1000 + i64::from(days) * 86_400),
                            metadata: &metadata,
                        }
                    }
                };
                self.send(&write, &key).await
            }
            CommandKind::SubscriptionCancel => {
                let request: CancelRequest = parse(&command.request)?;
                match (parsed, request.at_period_end) {
                    (Some(s), true) if s.cancel_at_period_end => {
                        return Ok(Step::Done(Ending::succeeded(
                            ObjectKind::Subscription,
                            current.expect("some").0,
                            listed_at,
                        )));
                    }
                    (None, false) => {
                        // Nothing live: if it is the one this command was to end, it has ended.
                        if let Some((ended, at)) = self.base_subscription(command).await? {
                            return Ok(Step::Done(Ending::succeeded(
                                ObjectKind::Subscription,
                                ended,
                                at,
                            )));
                        }
                    }
                    _ => {}
                }
                if let Some(conflict) = self.conflict(command, &current, listed_at).await? {
                    return Ok(conflict);
                }
                let Some(s) = parsed else {
                    return Ok(Step::Done(Ending::failed(
                        "no_subscription",
                        "the tenant has no live subscription",
                    )));
                };
                let write = if request.at_period_end {
                    SubscriptionWrite::CancelAtPeriodEnd {
                        subscription: &s.id,
                        cancel: true,
                        metadata: &metadata,
                    }
                } else {
                    SubscriptionWrite::CancelNow {
                        subscription: &s.id,
                    }
                };
                self.send(&write, &key).await
            }
            CommandKind::SubscriptionResume => {
                if let Some((object, s)) = &current
                    && !s.cancel_at_period_end
                    && command
                        .base
                        .as_deref()
                        .is_none_or(|base| base.starts_with(&s.id))
                {
                    return Ok(Step::Done(Ending::succeeded(
                        ObjectKind::Subscription,
                        object.clone(),
                        listed_at,
                    )));
                }
                if let Some(conflict) = self.conflict(command, &current, listed_at).await? {
                    return Ok(conflict);
                }
                let Some(s) = parsed else {
                    return Ok(Step::Done(Ending::failed(
                        "no_subscription",
                        "the tenant has no live subscription",
                    )));
                };
                let write = SubscriptionWrite::CancelAtPeriodEnd {
                    subscription: &s.id,
                    cancel: false,
                    metadata: &metadata,
                };
                self.send(&write, &key).await
            }
            CommandKind::CustomerSync => unreachable!("handled above"),
        }
    }

    async fn send(&self, write: &SubscriptionWrite<'_>, key: &str) -> Result<Step, WorkError> {
        let (object, at) = observe(&self.db, self.vendor.write_subscription(write, key)).await?;
        Ok(Step::Done(Ending::succeeded(
            ObjectKind::Subscription,
            object,
            at,
        )))
    }

    /// `Some(conflict)` when the vendor's subscription is not the one the command expects, nor
    /// one that billsync's own commands for the tenant made since it was accepted (a command
    /// accepted while an earlier one was ending may have read the state before it). `current`
    /// was listed at `listed_at`.
    async fn conflict(
        &self,
        command: &CommandRow,
        current: &Option<(Value, Subscription)>,
        listed_at: i64,
    ) -> Result<Option<Step>, WorkError> {
        let Some(base) = command.base.as_deref() else {
            return Ok(None);
        };
        let now = fingerprint(current.as_ref().map(|(_, s)| s));
        if now == base {
            return Ok(None);
        }
        let ours = self
            .db
            .commands()
            .results_since(&command.tenant_id, command.created_at - OWN_CHANGE_SLACK_MS)
            .await?;
        let explained = ours.iter().any(|result| {
            serde_json::from_str::<Value>(result)
                .is_ok_and(|object| fingerprint(Some(&objects::subscription(&object))) == now)
        });
        let current = current.as_ref().map(|(object, _)| object.clone());
        Ok((!explained).then(|| Step::Done(Ending::conflict(current, listed_at))))
    }

    /// The customer's live subscription at the vendor, the liveliest and newest one, and when
    /// the list was asked for.
    async fn live_subscription(
        &self,
        customer: &str,
    ) -> Result<(Option<(Value, Subscription)>, i64), WorkError> {
        let filter = ListFilter {
            customer: Some(customer.to_owned()),
            all_statuses: false,
        };
        let list = self.vendor.list(ObjectKind::Subscription, &filter, None);
        let (page, listed_at) = observe(&self.db, list).await?;
        let live = page
            .data
            .into_iter()
            .filter(|object| {
                objects::customer_of(ObjectKind::Subscription, object).as_deref() == Some(customer)
            })
            .map(|object| {
                let parsed = objects::subscription(&object);
                (object, parsed)
            })
            .filter(|(_, s)| s.liveness() > 0)
            .max_by(|(_, a), (_, b)| a.precedence().cmp(&b.precedence()));
        Ok((live, listed_at))
    }

    /// The subscription named by the command's base, as the vendor has it now, and when it was
    /// fetched.
    async fn base_subscription(
        &self,
        command: &CommandRow,
    ) -> Result<Option<(Value, i64)>, WorkError> {
        let Some(id) = command
            .base
            .as_deref()
            .and_then(|b| b.split('|').next())
            .filter(|id| *id != "none")
        else {
            return Ok(None);
        };
        let fetch = self.vendor.fetch(ObjectKind::Subscription, id);
        match observe(&self.db, fetch).await? {
            (Fetched::Found(object), at) => Ok(Some((object, at))),
            (Fetched::Gone, _) => Ok(None),
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(request: &str) -> Result<T, WorkError> {
    serde_json::from_str(request).map_err(|e| WorkError::Payload(format!("command request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fingerprints_ignore_status_changes_but_not_edits() {
        let trialing = json!({"id": "sub_1", "object": "subscription", "status": "trialing", "customer": "cus_1",
            "items": {"data": [{"id": "si_1", "price": {"id": "price_a"}, "quantity": 1}]}});
        let mut active = trialing.clone();
        active["status"] = json!("active");
        let mut upgraded = active.clone();
        upgraded["items"]["data"][0]["price"]["id"] = json!("price_b");
        let mut canceled = active.clone();
        canceled["status"] = json!("canceled");
        let f = |v: &Value| fingerprint(Some(&objects::subscription(v)));
        assert_eq!(f(&trialing), f(&active));
        assert_ne!(f(&active), f(&upgraded));
        assert_eq!(f(&canceled), "none");
        assert_eq!(fingerprint(None), "none");
    }

    #[test]
    fn keys_are_the_same_on_every_attempt() {
        assert_eq!(idempotency_key("cmd_1"), "billsync-cmd_1");
        assert_eq!(
            CommandKind::parse("subscription.set"),
            Some(CommandKind::SubscriptionSet)
        );
    }
}
