//! billsync: keeps a SaaS product's billing state two-way synced with its billing vendor.
//!
//! The map is in `docs/architecture.md`. [`app::run`] starts the whole service on a listener,
//! which is how `main` and the integration tests start it alike.

pub mod api;
pub mod app;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod credits;
pub mod domain;
pub mod entitlements;
pub mod error;
pub mod metering;
pub mod metrics;
pub mod mirror;
pub mod notify;
pub mod outbound;
pub mod reconcile;
pub mod retry;
pub mod revenue;
pub mod state;
pub mod store;
pub mod stripe;
pub mod sync;
pub mod telemetry;
pub mod topup;
pub mod webhook;
