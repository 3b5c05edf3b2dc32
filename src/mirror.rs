//! The mirror as the rest of billsync reads and versions it: a customer's current subscription,
//! and when a vendor answer was observed (every state written to the mirror carries that moment
//! as its version).

use serde_json::Value;

use crate::domain::Subscription;
use crate::error::WorkError;
use crate::store::{Db, MirrorRow, StoreError};
use crate::stripe::{ObjectKind, VendorError, objects};

/// Sends a vendor request that observes objects' states (a fetch, a list, a write's answer) and
/// returns its answer with their version: the moment, by the database's clock, just before the
/// request was sent. The vendor's state is at least that new, and a request sent after a change
/// is versioned above every request sent before it, wherever it came from (see
/// docs/architecture.md, "Versions"). Retries inside the request keep this moment: a retried
/// write's answer may be the one Stripe saved for the first attempt.
pub async fn observe<T>(
    db: &Db,
    request: impl Future<Output = Result<T, VendorError>>,
) -> Result<(T, i64), WorkError> {
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
