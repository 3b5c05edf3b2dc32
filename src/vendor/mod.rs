//! The billing vendor. Stripe's shapes stay in `stripe`; the rest of billsync speaks domain types.

pub mod stripe;
