//! Inbound sync: vendor events and fetched states reach the inbox (webhooks, the catch-up poller,
//! the drift sweep, backfill), and the applier brings the mirror to them.

pub mod applier;
pub mod backfill;
pub mod events;
pub mod outbox;
pub mod poller;
pub mod replay;
pub mod sweep;

use serde_json::Value;

use crate::domain::Subscription;
use crate::store::{Db, InboxRow, MirrorRow, StoreError};
use crate::vendor::stripe::objects;
use crate::vendor::{ObjectKind, VendorError};

pub use applier::Applier;

/// The prefix of the idempotency keys billsync's own commands carry.
pub const OWN_KEY_PREFIX: &str = "billsync-";

/// True when the row is the vendor's echo of one of billsync's own commands.
pub fn is_own(row: &InboxRow) -> bool {
    row.idempotency_key
        .as_deref()
        .is_some_and(|key| key.starts_with(OWN_KEY_PREFIX))
}

/// Sends a vendor request that observes objects' states (a fetch, a list, a write's answer) and
/// returns its answer with their version: the moment, by the database's clock, just before the
/// request was sent. The vendor's state is at least that new, and a request sent after a change
/// is versioned above every request sent before it, wherever it came from (see
/// docs/architecture.md, "Versions"). Retries inside the request keep this moment: a retried
/// write's answer may be the one Stripe saved for the first attempt.
pub async fn observe<T>(
    db: &Db,
    request: impl Future<Output = Result<T, VendorError>>,
) -> Result<(T, i64), SyncError> {
    // `request` is not sent before it is awaited.
    let at = db.clock_ms().await?;
    Ok((request.await?, at))
}

/// A customer's subscription as the tenant sees it: the liveliest mirrored one, newest first
/// among equals.
pub async fn current_subscription(
    db: &Db,
    customer_id: &str,
) -> Result<Option<(MirrorRow, Subscription)>, StoreError> {
    let rows = db
        .mirror()
        .of_customer(customer_id, ObjectKind::Subscription.as_str())
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let object: Value = serde_json::from_str(&row.payload).ok()?;
            let subscription = objects::subscription(&object);
            Some((row, subscription))
        })
        .max_by_key(|(row, s)| (s.liveness(), s.created, row.object_id.clone())))
}

/// Marks that the billing periods of states mirrored before they were kept have been recorded.
const PERIODS_SEEDED: &str = "billing_periods.seeded";

/// Records the billing periods of the subscriptions and invoices already in the mirror, once
/// (a database from a version that kept none); later states record theirs as they are applied.
pub async fn seed_billing_periods(db: &Db) -> Result<(), StoreError> {
    if db.sync_state().get(PERIODS_SEEDED).await?.is_some() {
        return Ok(());
    }
    let mut periods = Vec::new();
    let kinds = [ObjectKind::Subscription, ObjectKind::Invoice].map(ObjectKind::as_str);
    db.mirror()
        .each(&kinds, None, |row| {
            let (Some(kind), Some(customer)) =
                (ObjectKind::parse(&row.object_type), row.customer_id)
            else {
                return;
            };
            if let Ok(object) = serde_json::from_str::<Value>(&row.payload) {
                for period in objects::billing_periods(kind, &object, row.deleted) {
                    periods.push((customer.clone(), period));
                }
            }
        })
        .await?;
    for chunk in periods.chunks(500) {
        db.periods().record(chunk).await?;
    }
    let now = crate::store::now_ms();
    db.sync_state()
        .set(PERIODS_SEEDED, &now.to_string(), now)
        .await
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vendor(#[from] VendorError),
    #[error("stored payload is not JSON: {0}")]
    Payload(String),
    /// Without refetch, an event whose object is only a pointer (a refund names its charge)
    /// cannot be applied; it waits for the vendor.
    #[error("{0} carries no copy of the object it changes; applying it needs the vendor")]
    NeedsVendor(String),
}
