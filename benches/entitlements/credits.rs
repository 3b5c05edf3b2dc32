//! Credit-priced check-and-record over HTTP (64 connections over 1,000 tenants, each with one
//! credit grant, every request burning one unit), then the balance read in process.

use std::time::Instant;

use super::common::{Backend, Database, quantiles};

use super::{Server, WRK_RECORD_SCRIPT, record_state, tenants, wrk_feature};

const TENANTS: usize = 1_000;

/// The entitlement catalog and a credit-priced feature burning 0.0167 credits per token.
const CATALOG: &str = "[meters.calls]\naggregation = \"sum\"\n\n[features.api_calls]\nmeter = \"calls\"\n\n\
[meters.tokens]\naggregation = \"sum\"\n\n[features.ai_tokens]\nmeter = \"tokens\"\n\
credits_per_unit = \"0.0167\"\ncredit_unit = \"credits\"\n\n\
[plans.free]\nfeatures = { api_calls = 1000000, sso = true }\n";

/// One grant of a million credits for each customer `cus_<t>`.
async fn grant_credits(db: &billsync::store::Db) {
    let created = billsync::store::now_ms() / 1000 - 3600;
    let grants: Vec<billsync::store::Apply> = (0..TENANTS)
        .map(|t| billsync::store::Apply {
            state: billsync::store::ObjectState {
                object_type: "credit_grant".into(),
                object_id: format!("credgr_{t}"),
                customer_id: Some(format!("cus_{t}")),
                status: None,
                created: Some(created),
                version: 1,
                deleted: false,
                payload: serde_json::json!({"id": format!("credgr_{t}"),
                    "object": "billing.credit_grant", "customer": format!("cus_{t}"),
                    "amount": {"type": "custom_pricing_unit",
                        "custom_pricing_unit": {"value": "1000000"}},
                    "created": created, "effective_at": created, "priority": 50})
                .to_string(),
                periods: Vec::new(),
            },
            claim: None,
            event_ids: Vec::new(),
            refetched: false,
        })
        .collect();
    for chunk in grants.chunks(1000) {
        db.mirror().apply(chunk, 0).await.unwrap();
    }
}

pub async fn check_and_record(backend: Backend, seconds: u32) {
    let database = Database::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let (settings, state) = record_state(&database, dir.path(), CATALOG).await;
    tenants::create_tenants(&state.db, TENANTS).await;
    tenants::link_customers(&state.db, TENANTS).await;
    grant_credits(&state.db).await;
    drop(state);
    let script = dir.path().join("record.lua");
    std::fs::write(&script, WRK_RECORD_SCRIPT).unwrap();
    let server = Server::start(settings.clone());
    let shape = |s| (2, 64, s);
    let _ = wrk_feature(&server.address, shape(2), TENANTS, &script, "ai_tokens");
    let run = wrk_feature(
        &server.address,
        shape(seconds),
        TENANTS,
        &script,
        "ai_tokens",
    );
    println!(
        "| HTTP credit-priced check-and-record, {backend:?}, default pool (10), 64 connections over {TENANTS} tenants, {seconds} s: records/s; p50 / p99 / p99.9 | {} |",
        run.figures()
    );
    server.stop();
    balance_reads(backend, settings).await;
    database.drop_now().await;
}

/// The balance read in process (`credits::balance_of`: the grants and the running totals, read
/// and burned), 5,000 reads over the tenants the run above burned from.
async fn balance_reads(backend: Backend, settings: billsync::config::Settings) {
    let state = billsync::state::AppState::build(settings).await.unwrap();
    let features = state.entitlements.plans().credits.clone();
    let mut samples = Vec::with_capacity(5_000);
    let mut rows = 0usize;
    for n in 0..5_000usize {
        let tenant = format!("t{}", (n * 7919) % TENANTS);
        let started = Instant::now();
        let balances =
            billsync::credits::balance_of(&state.db, &features, &tenant, billsync::store::now_ms())
                .await
                .unwrap();
        samples.push(started.elapsed());
        rows += balances.len();
    }
    assert_eq!(rows, 5_000, "one unit per tenant");
    let q = quantiles(&mut samples, &[0.5, 0.99, 0.999]);
    println!(
        "| in-process balance read, {backend:?} (grants + running totals of one tenant), p50 / p99 / p99.9 | {} / {} / {} µs |",
        q[0].as_micros(),
        q[1].as_micros(),
        q[2].as_micros()
    );
}
