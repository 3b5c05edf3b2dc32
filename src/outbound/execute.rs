//! What one attempt does at the vendor. Before any subscription write it lists the customer's
//! live subscription: if it already is what the command asks for, the command succeeded (an
//! earlier attempt landed before a crash, or someone made the same change); if it differs from
//! the state the command was accepted against, and billsync's own commands do not explain the
//! difference, the command ends as `conflict`; otherwise the change is sent.

use serde::Deserialize;
use serde_json::Value;

use super::attempt::{Ending, Step};
use super::{
    CancelRequest, CommandKind, OWN_CHANGE_SLACK_MS, Outbox, SetRequest, fingerprint,
    idempotency_key,
};
use crate::domain::{Subscription, TenantId};
use crate::error::WorkError;
use crate::mirror::observe;
use crate::store::{CommandRow, TenantRecord};
use crate::stripe::{
    CustomerWrite, Fetched, ListFilter, ObjectKind, SubscriptionWrite, VendorError, objects,
};

/// A subscription command's attempt once the vendor's live subscription is known.
struct Attempt<'a> {
    outbox: &'a Outbox,
    command: &'a CommandRow,
    tenant: &'a TenantRecord,
    customer: &'a str,
    key: String,
    /// The customer's live subscription at the vendor, and when it was listed.
    current: Option<(Value, Subscription)>,
    listed_at: i64,
}

impl Outbox {
    pub(super) async fn execute(&self, command: &CommandRow) -> Result<Step, WorkError> {
        let Some(kind) = CommandKind::parse(&command.kind) else {
            let message = format!(
                "this billsync does not know commands of kind `{}`",
                command.kind
            );
            return Ok(Step::Done(Ending::failed("unknown_command", message)));
        };
        let tenant_id = TenantId::parse(&command.tenant_id)
            .map_err(|e| WorkError::Payload(format!("tenant id: {}", e.message)))?;
        let Some(tenant) = self.db.tenants().get(&tenant_id).await? else {
            let message = "the tenant no longer exists";
            return Ok(Step::Done(Ending::failed("tenant_not_found", message)));
        };
        let key = idempotency_key(&command.command_id);
        if kind == CommandKind::CustomerSync {
            return self.sync_customer(&tenant, &key).await;
        }
        if kind == CommandKind::CreditsTopUp {
            return self.top_up(command, &tenant, &key).await;
        }
        let Some(customer) = tenant.customer_id.as_deref() else {
            let reason = "the tenant has no Stripe customer yet".to_owned();
            return Ok(Step::Retry(reason));
        };
        let (current, listed_at) = self.live_subscription(customer).await?;
        let attempt = Attempt {
            outbox: self,
            command,
            tenant: &tenant,
            customer,
            key,
            current,
            listed_at,
        };
        match kind {
            CommandKind::SubscriptionSet => attempt.set().await,
            CommandKind::SubscriptionCancel => attempt.cancel().await,
            CommandKind::SubscriptionResume => attempt.resume().await,
            CommandKind::CustomerSync | CommandKind::CreditsTopUp => unreachable!("handled above"),
        }
    }

    /// Creates the tenant's customer, or carries its name and email to it.
    async fn sync_customer(&self, tenant: &TenantRecord, key: &str) -> Result<Step, WorkError> {
        let write = CustomerWrite {
            tenant_id: &tenant.tenant_id,
            name: tenant.name.as_deref(),
            email: tenant.email.as_deref(),
        };
        let existing = tenant.customer_id.as_deref();
        let written = self.vendor.write_customer(existing, &write, key);
        let (customer, at) = observe(&self.db, written).await?;
        Ok(Step::Done(Ending::succeeded(
            ObjectKind::Customer,
            customer,
            at,
        )))
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

impl Attempt<'_> {
    /// `subscription.set`: create the subscription, or swap its single item's price and
    /// quantity.
    async fn set(&self) -> Result<Step, WorkError> {
        let request: SetRequest = parse(&self.command.request)?;
        if let Some((object, s)) = &self.current
            && let [item] = &s.items[..]
            && item.price.as_deref() == Some(request.resolved_price.as_str())
            && item.quantity == Some(request.quantity.into())
        {
            return Ok(self.already(object.clone()));
        }
        if let Some(conflict) = self.conflict().await? {
            return Ok(conflict);
        }
        let metadata = self.metadata();
        let write = match &self.current {
            None => SubscriptionWrite::Create {
                customer: self.customer,
                price: &request.resolved_price,
                quantity: request.quantity,
                trial_days: request.trial_days,
                metadata: &metadata,
            },
            Some((_, s)) => match self.change(s, &request, &metadata)? {
                Ok(write) => write,
                Err(refused) => return Ok(refused),
            },
        };
        self.send(&write).await
    }

    /// The write that swaps the single item of `s` to the request's price and quantity, or the
    /// ending of a command that cannot be carried out.
    fn change<'w>(
        &self,
        s: &'w Subscription,
        request: &'w SetRequest,
        metadata: &'w [(&'w str, &'w str)],
    ) -> Result<Result<SubscriptionWrite<'w>, Step>, WorkError> {
        let [item] = &s.items[..] else {
            let message = format!(
                "subscription {} has {} items; billsync changes single-item subscriptions only",
                s.id,
                s.items.len()
            );
            return Ok(Err(Step::Done(Ending::failed("multiple_items", message))));
        };
        let Some(item_id) = item.id.as_deref() else {
            let message = "subscription item without an id".to_owned();
            return Err(WorkError::Vendor(VendorError::Malformed(message)));
        };
        let created_s = self.command.created_at / 1000;
        Ok(Ok(SubscriptionWrite::Change {
            subscription: &s.id,
            item: item_id,
            price: &request.resolved_price,
            quantity: request.quantity,
            proration: request.proration,
            trial_end: request
                .trial_days
                .map(|days| created_s + i64::from(days) * 86_400),
            metadata,
        }))
    }

    /// `subscription.cancel`: now, or at the period's end.
    async fn cancel(&self) -> Result<Step, WorkError> {
        let request: CancelRequest = parse(&self.command.request)?;
        match (&self.current, request.at_period_end) {
            (Some((object, s)), true) if s.cancel_at_period_end => {
                return Ok(self.already(object.clone()));
            }
            // Nothing live: if it is the one this command was to end, it has ended.
            (None, false) => {
                if let Some((ended, at)) = self.outbox.base_subscription(self.command).await? {
                    return Ok(Step::Done(Ending::succeeded(
                        ObjectKind::Subscription,
                        ended,
                        at,
                    )));
                }
            }
            _ => {}
        }
        if let Some(conflict) = self.conflict().await? {
            return Ok(conflict);
        }
        let Some((_, s)) = &self.current else {
            return Ok(no_subscription());
        };
        let metadata = self.metadata();
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
        self.send(&write).await
    }

    /// `subscription.resume`: undo a cancel at the period's end.
    async fn resume(&self) -> Result<Step, WorkError> {
        if let Some((object, s)) = &self.current
            && !s.cancel_at_period_end
            && (self.command.base.as_deref()).is_none_or(|base| base.starts_with(&s.id))
        {
            return Ok(self.already(object.clone()));
        }
        if let Some(conflict) = self.conflict().await? {
            return Ok(conflict);
        }
        let Some((_, s)) = &self.current else {
            return Ok(no_subscription());
        };
        let metadata = self.metadata();
        let write = SubscriptionWrite::CancelAtPeriodEnd {
            subscription: &s.id,
            cancel: false,
            metadata: &metadata,
        };
        self.send(&write).await
    }

    /// The metadata every subscription write carries.
    fn metadata(&self) -> [(&str, &str); 2] {
        [
            ("billsync_command", self.command.command_id.as_str()),
            ("tenant_id", self.tenant.tenant_id.as_str()),
        ]
    }

    /// The vendor already has what the command asks for.
    fn already(&self, object: Value) -> Step {
        Step::Done(Ending::succeeded(
            ObjectKind::Subscription,
            object,
            self.listed_at,
        ))
    }

    async fn send(&self, write: &SubscriptionWrite<'_>) -> Result<Step, WorkError> {
        let outbox = self.outbox;
        let written = outbox.vendor.write_subscription(write, &self.key);
        let (object, at) = observe(&outbox.db, written).await?;
        Ok(Step::Done(Ending::succeeded(
            ObjectKind::Subscription,
            object,
            at,
        )))
    }

    /// `Some(conflict)` when the vendor's subscription is not the one the command expects, nor
    /// one that billsync's own commands for the tenant made: since it was accepted (a command
    /// accepted while an earlier one was ending may have read the state before it), or the
    /// latest of them at any time (the mirror the command read may not have shown it yet: an
    /// answer from a fetch sent while that command's write was on its way can come back last).
    /// A change someone else made since shows as a state none of them made.
    async fn conflict(&self) -> Result<Option<Step>, WorkError> {
        let Some(base) = self.command.base.as_deref() else {
            return Ok(None);
        };
        let now = fingerprint(self.current.as_ref().map(|(_, s)| s));
        if now == base {
            return Ok(None);
        }
        let since = self.command.created_at - OWN_CHANGE_SLACK_MS;
        let commands = self.outbox.db.commands();
        let ours = commands
            .results_since(&self.command.tenant_id, since)
            .await?;
        let explained = ours.iter().any(|result| {
            serde_json::from_str::<Value>(result)
                .is_ok_and(|object| fingerprint(Some(&objects::subscription(&object))) == now)
        });
        let current = self.current.as_ref().map(|(object, _)| object.clone());
        Ok((!explained).then(|| Step::Done(Ending::conflict(current, self.listed_at))))
    }
}

fn no_subscription() -> Step {
    let message = "the tenant has no live subscription";
    Step::Done(Ending::failed("no_subscription", message))
}

pub(super) fn parse<T: for<'de> Deserialize<'de>>(request: &str) -> Result<T, WorkError> {
    serde_json::from_str(request).map_err(|e| WorkError::Payload(format!("command request: {e}")))
}
