//! The error of background work that reads or writes the database and the vendor: the inbound
//! applier and its feeders, the outbox, reconciliation.

use crate::store::StoreError;
use crate::stripe::VendorError;

#[derive(Debug, thiserror::Error)]
pub enum WorkError {
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
