//! Stripe, through [`StripeHttp`]: reads parse tolerantly (current objects and older shapes such
//! as legacy plans and localstripe's lists alike), writes carry idempotency keys.

mod http;
pub mod objects;

pub use http::StripeHttp;
