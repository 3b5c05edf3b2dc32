//! Integration tests: the real service on port 0, spoken to over HTTP, on SQLite and on
//! PostgreSQL (a fresh database per test).

mod binary;
mod helpers;

mod catalog;
mod claims;
mod cli;
mod client;
mod client_credits;
mod commands;
mod console;
mod console_api;
mod credit_totals;
mod credits;
mod docs;
mod e2e;
mod entitlements;
mod exactness;
mod health;
mod inbound;
mod limits;
mod openapi;
mod quantities;
mod reconcile;
mod repair;
mod replicas;
mod revenue;
mod security;
mod simulation;
mod statuses;
mod stream;
mod sweep;
mod sync;
mod tenants;
mod topup;
mod topup_failures;
mod usage;
mod webhooks;
