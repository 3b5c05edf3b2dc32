//! The billing vendor: [`BillingVendor`] says what billsync needs from one, in billsync's own
//! words ([`vendor`]); [`StripeHttp`] is Stripe's client behind it ([`http`]), and [`objects`]
//! holds the only code that reads Stripe's JSON shapes (current objects and older ones such as
//! legacy plans and localstripe's lists alike). Everything else sees [`ObjectKind`], raw JSON it
//! stores as received, domain types and [`VendorError`].

mod form;
mod http;
mod limiter;
pub mod objects;
mod topup;
mod vendor;

pub use http::StripeHttp;
pub use topup::credit_transaction;
pub use vendor::*;
