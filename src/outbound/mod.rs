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
//!
//! `mod.rs` has the commands' kinds, keys and fingerprints and the worker's loop; `attempt.rs`
//! one attempt and how it is recorded; `execute.rs` what an attempt does at the vendor;
//! `top_up.rs` a credit top-up's attempt.

mod attempt;
mod execute;
mod top_up;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::Subscription;
use crate::metrics::Metrics;
use crate::store::{Db, now_ms};
use crate::stripe::{BillingVendor, Proration};
use crate::sync::Applier;

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
    /// Invoice a credit top-up, pay it, grant the credits ([`crate::topup::TopUpRequest`]).
    CreditsTopUp,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CustomerSync => "customer.sync",
            Self::SubscriptionSet => "subscription.set",
            Self::SubscriptionCancel => "subscription.cancel",
            Self::SubscriptionResume => "subscription.resume",
            Self::CreditsTopUp => "credits.top_up",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::CustomerSync,
            Self::SubscriptionSet,
            Self::SubscriptionCancel,
            Self::SubscriptionResume,
            Self::CreditsTopUp,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::objects;
    use serde_json::Value;
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
