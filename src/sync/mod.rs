//! Inbound sync: vendor events and fetched states reach the inbox (webhooks, the catch-up poller,
//! the drift sweep, backfill), and the applier brings the mirror to them.

pub mod applier;
pub mod backfill;
pub mod events;
pub mod poller;
pub mod replay;
pub mod sweep;
pub mod sweep_plan;

use serde_json::Value;

use crate::store::{Db, InboxRow, StoreError};
use crate::stripe::{ObjectKind, objects};

pub use applier::Applier;

/// True when the row is the vendor's echo of one of billsync's own commands.
pub fn is_own(row: &InboxRow) -> bool {
    row.idempotency_key
        .as_deref()
        .is_some_and(|key| key.starts_with(crate::outbound::OWN_KEY_PREFIX))
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
