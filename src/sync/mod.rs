//! Inbound sync: vendor events and fetched states reach the inbox (webhooks, the catch-up poller,
//! the drift sweep, backfill), and the applier brings the mirror to them.

pub mod applier;
pub mod backfill;
pub mod events;
pub mod poller;
pub mod replay;
pub mod sweep;

use crate::store::StoreError;
use crate::vendor::VendorError;

pub use applier::Applier;

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
