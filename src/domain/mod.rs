//! Plain types with parse constructors; no I/O.

pub mod billing;
mod quantity;
mod tenant;
mod time;

pub use billing::{
    BillingPeriod, CreditNote, CreditNoteLine, Invoice, InvoiceLine, Payment, Refund, Subscription,
    SubscriptionItem, invoice_is_final, liveness_of,
};
// Shared with the client crate, with the rest of the entitlement decision.
pub use billsync_rules::Ceiling;
pub use quantity::{MAX_DIGITS, QuantityError, parse_quantity};
pub use tenant::{Email, TenantId, TenantName};
pub use time::{parse_time, rfc3339, rfc3339_secs};

/// A value that failed to parse, naming the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}
