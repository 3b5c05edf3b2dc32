//! Stripe. Reads go through [`StripeHttp`], which parses tolerantly (current objects and older
//! shapes such as legacy plans and localstripe's lists alike); `sdk` builds the async-stripe
//! client.

mod http;
pub mod objects;
pub mod sdk;

pub use http::StripeHttp;
