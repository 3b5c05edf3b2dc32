//! Metering: `POST /v1/usage`, the counters, the pusher and the usage ledger.

use std::str::FromStr;

use billsync::state::AppState;
use billsync::store::{Db, UsageRow};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    Backend, TestApp, customer, error_of, event, on_both_backends, state, take_webhooks,
    use_test_catalog, use_vendor, wait_for,
};

on_both_backends!(
    usage_is_validated_event_by_event_and_stored_once,
    duplicates_are_refused_even_after_a_restart,
    decimal_quantities_add_up_exactly,
    every_aggregation_is_reported_by_the_ledger,
    counters_are_rebuilt_from_the_snapshot_and_the_events_after_it,
    a_crash_between_send_and_record_resends_the_same_identifier,
    late_usage_goes_out_as_a_new_delta,
    push_storms_are_retried_without_loss,
    usage_of_a_tenant_without_a_customer_waits_and_loses_nothing,
    usage_too_old_for_stripe_is_flagged_not_sent,
    max_unique_and_last_meters_push_the_period_value,
    the_ledger_shows_pushed_and_unpushed_usage_over_http,
    big_batches_are_taken_and_oversized_ones_refused,
    a_ledger_over_thousands_of_events_counts_each_once,
    paged_snapshots_fold_each_event_once_and_exactly,
    distinct_counts_match_the_log_across_snapshots_restarts_and_late_events,
    batches_waiting_for_the_writer_share_one_commit_and_count_each_event_once,
    a_checkpoint_waits_for_the_batch_being_stored_so_the_log_starts_again,
);

fn now_rfc3339(offset_secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_secs)).to_rfc3339()
}

fn usage(id: &str, tenant: &str, meter: &str, quantity: Value) -> Value {
    json!({"id": id, "tenant_id": tenant, "meter": meter, "quantity": quantity})
}

async fn post_usage(app: &TestApp, events: Vec<Value>) -> Value {
    let response = app
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn ledger(app: &TestApp, tenant: &str, meter: &str) -> Value {
    app.get_json(&format!("/v1/tenants/{tenant}/usage?meter={meter}"))
        .await
}

async fn usage_is_validated_event_by_event_and_stored_once(backend: Backend) {
    let app = TestApp::spawn_with(backend, use_test_catalog).await;
    app.put_tenant("acme", json!({})).await;
    let events = vec![
        usage("ok-1", "acme", "calls", json!(5)),
        usage("bad-meter", "acme", "nope", json!(1)),
        usage("bad-tenant", "ghost", "calls", json!(1)),
        usage("negative", "acme", "calls", json!("-1")),
        json!({"id": "future", "tenant_id": "acme", "meter": "calls", "quantity": 1, "timestamp": now_rfc3339(600)}),
        json!({"id": "old", "tenant_id": "acme", "meter": "builds", "timestamp": now_rfc3339(-2 * 86_400)}),
        usage("not-a-number", "acme", "calls", json!("lots")),
        json!({"tenant_id": "acme", "meter": "calls", "quantity": 1}),
        json!({"id": "no-user", "tenant_id": "acme", "meter": "users", "properties": {}}),
        usage("ok-2", "acme", "calls", json!("2.5")),
        usage("correction", "acme", "credits", json!("-3")),
        json!({"id": "ok-3", "tenant_id": "acme", "meter": "builds"}),
        usage("ok-1", "acme", "calls", json!(5)),
    ];
    let answer = post_usage(&app, events).await;
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64()),
        (Some(4), Some(1)),
        "{answer}"
    );
    let codes: Vec<(u64, &str)> = answer["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        codes,
        [
            (1, "unknown_meter"),
            (2, "unknown_tenant"),
            (3, "negative_quantity"),
            (4, "timestamp_in_future"),
            (5, "timestamp_too_old"),
            (6, "invalid_quantity"),
            (7, "missing_field"),
            (8, "missing_property")
        ]
    );
    assert_eq!(ledger(&app, "acme", "calls").await["total"], "7.5");
    assert_eq!(ledger(&app, "acme", "credits").await["total"], "-3");

    let (status, code, field) = error_of(
        app.v1(reqwest::Method::POST, "/v1/usage")
            .json(&json!({"events": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str(), field.as_deref()),
        (400, "invalid_value", Some("events"))
    );
    app.stop().await;
}

async fn duplicates_are_refused_even_after_a_restart(backend: Backend) {
    let app = TestApp::spawn_with(backend, use_test_catalog).await;
    app.put_tenant("acme", json!({})).await;
    let batch: Vec<Value> = (0..50)
        .map(|i| usage(&format!("e{i}"), "acme", "calls", json!(1)))
        .collect();
    assert_eq!(post_usage(&app, batch.clone()).await["accepted"], 50);
    let app = app.restart().await;
    let again = post_usage(&app, batch).await;
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(50))
    );
    assert_eq!(ledger(&app, "acme", "calls").await["total"], "50");
    app.stop().await;
}

async fn decimal_quantities_add_up_exactly(backend: Backend) {
    let app = TestApp::spawn_with(backend, use_test_catalog).await;
    app.put_tenant("acme", json!({})).await;
    post_usage(
        &app,
        vec![
            usage("a", "acme", "calls", json!(0.1)),
            usage("b", "acme", "calls", json!("0.2")),
        ],
    )
    .await;
    assert_eq!(ledger(&app, "acme", "calls").await["total"], "0.3");
    app.stop().await;
}

async fn every_aggregation_is_reported_by_the_ledger(backend: Backend) {
    let app = TestApp::spawn_with(backend, use_test_catalog).await;
    app.put_tenant("acme", json!({})).await;
    let at = |secs: i64| now_rfc3339(-secs);
    let mut events = Vec::new();
    for (i, (quantity, user, ago)) in [("5", "u1", 30), ("9", "u2", 20), ("4", "u1", 10)]
        .into_iter()
        .enumerate()
    {
        for meter in ["calls", "builds", "storage", "seats", "users"] {
            events.push(json!({"id": format!("{meter}-{i}"), "tenant_id": "acme", "meter": meter, "quantity": quantity,
                "timestamp": at(ago), "properties": {"user_id": user}}));
        }
    }
    events.reverse(); // arrival order must not matter, least of all for `last`
    assert_eq!(post_usage(&app, events).await["accepted"], 15);
    for (meter, total) in [
        ("calls", "18"),
        ("builds", "3"),
        ("storage", "9"),
        ("seats", "4"),
        ("users", "2"),
    ] {
        assert_eq!(ledger(&app, "acme", meter).await["total"], total, "{meter}");
    }
    app.stop().await;
}

async fn counters_are_rebuilt_from_the_snapshot_and_the_events_after_it(backend: Backend) {
    let (state, db) = state(backend, use_test_catalog).await;
    state
        .db
        .tenants()
        .upsert(
            &billsync::domain::TenantId::parse("acme").unwrap(),
            None,
            None,
            0,
            None,
        )
        .await
        .unwrap();
    let now = billsync::store::now_ms();
    let batch = |ids: std::ops::Range<i32>| -> Vec<Value> {
        ids.map(|i| json!({"id": format!("r{i}"), "tenant_id": "acme", "meter": "users", "properties": {"user_id": format!("u{}", i % 7)}}))
            .collect()
    };
    state
        .metering
        .ingest(&batch(0..20), now - 120_000)
        .await
        .unwrap();
    assert_eq!(
        state.metering.snapshot(now).await.unwrap(),
        20,
        "events older than a minute are folded"
    );
    state.metering.ingest(&batch(20..40), now).await.unwrap();
    state
        .metering
        .ingest(
            &[json!({"id": "s1", "tenant_id": "acme", "meter": "calls", "quantity": "1.25"})],
            now,
        )
        .await
        .unwrap();
    let before = (
        state
            .metering
            .period_usage("acme", "users", now)
            .await
            .unwrap(),
        state
            .metering
            .period_usage("acme", "calls", now)
            .await
            .unwrap(),
    );
    assert_eq!(
        before,
        (
            Some(Decimal::from(7)),
            Some(Decimal::from_str("1.25").unwrap())
        )
    );

    // A new process: only the snapshot and the 21 later events are read.
    let restarted = AppState::build((*state.settings).clone()).await.unwrap();
    assert_eq!(restarted.metering.rebuild().await.unwrap().0, 21);
    let after = (
        restarted
            .metering
            .period_usage("acme", "users", now)
            .await
            .unwrap(),
        restarted
            .metering
            .period_usage("acme", "calls", now)
            .await
            .unwrap(),
    );
    assert_eq!(after, before);
    drop(db);
}

/// A wiremock Stripe taking meter events; returns the server.
async fn meter_vendor() -> MockServer {
    let vendor = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/billing/meter_events"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"object": "billing.meter_event"})),
        )
        .mount(&vendor)
        .await;
    vendor
}

/// A state with the test catalog, pointed at a vendor that takes meter events.
pub(crate) async fn metered(
    backend: Backend,
) -> (MockServer, AppState, crate::helpers::TestDatabase) {
    let vendor = meter_vendor().await;
    let (state, db) = state(backend, |s| {
        use_test_catalog(s);
        use_vendor(s, &vendor.uri());
    })
    .await;
    (vendor, state, db)
}

/// Every meter event the vendor received: (identifier, value, Idempotency-Key).
async fn meter_events(vendor: &MockServer) -> Vec<(String, Decimal, String)> {
    vendor
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/v1/billing/meter_events")
        .map(|r| {
            let form: std::collections::HashMap<String, String> = url_form(&r.body);
            let key = r
                .headers
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (
                form["identifier"].clone(),
                Decimal::from_str(&form["payload[value]"]).unwrap(),
                key,
            )
        })
        .collect()
}

pub(crate) fn url_form(body: &[u8]) -> std::collections::HashMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(body)))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A tenant linked to a Stripe customer, as the applier would leave it.
pub(crate) async fn linked_tenant(state: &AppState, tenant: &str, customer_id: &str) {
    let event = event(
        &format!("evt_{tenant}"),
        "customer.created",
        1_700_000_000,
        customer(customer_id, tenant),
    );
    let row = billsync::sync::events::from_event(
        &event.to_string(),
        &event,
        billsync::store::Source::Webhook,
    )
    .unwrap();
    state.db.inbox().insert(&[row], 0).await.unwrap();
    let mut applier = state.applier();
    applier.vendor = None;
    applier.step().await.unwrap();
}

async fn a_crash_between_send_and_record_resends_the_same_identifier(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let now = billsync::store::now_ms();
    let events: Vec<Value> = (0..30)
        .map(|i| usage(&format!("c{i}"), "acme", "calls", json!("0.5")))
        .collect();
    assert_eq!(
        state.metering.ingest(&events, now).await.unwrap().accepted,
        30
    );
    let pusher = state.pusher(state.vendor.clone().unwrap());
    assert_eq!(pusher.step().await.unwrap().sent, 1);

    // The process died after Stripe answered and before the answer was recorded.
    sql(&state.db, "UPDATE usage_pushes SET status = 'pending'").await;
    let again = pusher.step().await.unwrap();
    assert_eq!(
        (again.planned, again.sent),
        (0, 1),
        "nothing new planned; the same push re-sent"
    );

    let sent = meter_events(&vendor).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].0, sent[1].0, "the same identifier both times");
    assert_eq!(
        sent[0].0, sent[0].2,
        "the identifier is also the idempotency key"
    );
    let unique: std::collections::HashMap<&str, Decimal> =
        sent.iter().map(|(id, v, _)| (id.as_str(), *v)).collect();
    assert_eq!(
        unique.values().copied().sum::<Decimal>(),
        Decimal::from(15),
        "unique identifiers carry exactly the accepted usage"
    );
}

async fn sql(db: &Db, statement: &'static str) {
    match db {
        Db::Sqlite(pool) => sqlx::query(statement).execute(pool).await.map(drop),
        Db::Postgres(pool) => sqlx::query(statement).execute(pool).await.map(drop),
    }
    .unwrap();
}

async fn late_usage_goes_out_as_a_new_delta(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let pusher = state.pusher(state.vendor.clone().unwrap());
    let now = billsync::store::now_ms();
    let at = chrono::Utc::now().to_rfc3339();
    let first =
        json!({"id": "l1", "tenant_id": "acme", "meter": "calls", "quantity": 10, "timestamp": at});
    state.metering.ingest(&[first], now).await.unwrap();
    pusher.step().await.unwrap();
    let late =
        json!({"id": "l2", "tenant_id": "acme", "meter": "calls", "quantity": 3, "timestamp": at});
    state.metering.ingest(&[late], now + 1000).await.unwrap();
    pusher.step().await.unwrap();
    let sent = meter_events(&vendor).await;
    let values: Vec<Decimal> = sent.iter().map(|(_, v, _)| *v).collect();
    assert_eq!(
        values,
        [Decimal::from(10), Decimal::from(3)],
        "the late event is a delta of its own"
    );
    assert_ne!(sent[0].0, sent[1].0);
}

async fn push_storms_are_retried_without_loss(backend: Backend) {
    let vendor = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/billing/meter_events"))
        .respond_with(ResponseTemplate::new(429))
        .up_to_n_times(5)
        .with_priority(1)
        .mount(&vendor)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/billing/meter_events"))
        .respond_with(ResponseTemplate::new(502))
        .up_to_n_times(3)
        .with_priority(2)
        .mount(&vendor)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/billing/meter_events"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .with_priority(3)
        .mount(&vendor)
        .await;
    let (state, _db) = state(backend, |s| {
        use_test_catalog(s);
        use_vendor(s, &vendor.uri());
        s.stripe.max_retries = 2;
        s.sync.max_retry_delay = std::time::Duration::from_millis(1);
    })
    .await;
    for (tenant, customer_id) in [("a", "cus_a"), ("b", "cus_b"), ("c", "cus_c")] {
        linked_tenant(&state, tenant, customer_id).await;
    }
    let events: Vec<Value> = ["a", "b", "c"]
        .iter()
        .flat_map(|t| (0..4).map(move |i| usage(&format!("{t}{i}"), t, "calls", json!(i + 1))))
        .collect();
    state
        .metering
        .ingest(&events, billsync::store::now_ms())
        .await
        .unwrap();
    let pusher = state.pusher(state.vendor.clone().unwrap());
    for _ in 0..10 {
        pusher.step().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for tenant in ["a", "b", "c"] {
        let pushes = state.db.usage().pushes_of(tenant, "calls").await.unwrap();
        assert_eq!(pushes.len(), 1, "{tenant}");
        assert_eq!(
            (pushes[0].status.as_str(), pushes[0].value.as_str()),
            ("sent", "10"),
            "{tenant}"
        );
    }
}

async fn usage_of_a_tenant_without_a_customer_waits_and_loses_nothing(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    state
        .db
        .tenants()
        .upsert(
            &billsync::domain::TenantId::parse("later").unwrap(),
            None,
            None,
            0,
            None,
        )
        .await
        .unwrap();
    state
        .metering
        .ingest(
            &[usage("w1", "later", "calls", json!(7))],
            billsync::store::now_ms(),
        )
        .await
        .unwrap();
    let pusher = state.pusher(state.vendor.clone().unwrap());
    assert_eq!(pusher.step().await.unwrap().planned, 0);
    assert!(meter_events(&vendor).await.is_empty());
    assert!(
        state
            .metrics
            .render()
            .contains("billsync_usage_push_backlog{} 1")
    );

    linked_tenant(&state, "later", "cus_later").await;
    assert_eq!(pusher.step().await.unwrap().sent, 1);
    assert_eq!(meter_events(&vendor).await[0].1, Decimal::from(7));
    assert!(
        state
            .metrics
            .render()
            .contains("billsync_usage_push_backlog{} 0")
    );
}

async fn usage_too_old_for_stripe_is_flagged_not_sent(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let old = json!({"id": "old", "tenant_id": "acme", "meter": "calls", "quantity": 4, "timestamp": now_rfc3339(-40 * 86_400)});
    assert_eq!(
        state
            .metering
            .ingest(&[old], billsync::store::now_ms())
            .await
            .unwrap()
            .accepted,
        1
    );
    let report = state
        .pusher(state.vendor.clone().unwrap())
        .step()
        .await
        .unwrap();
    assert_eq!((report.expired, report.sent), (1, 0));
    assert!(meter_events(&vendor).await.is_empty());
    let pushes = state.db.usage().pushes_of("acme", "calls").await.unwrap();
    assert_eq!(pushes[0].status, "expired");
    assert!(
        pushes[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("reconciliation")
    );
}

async fn max_unique_and_last_meters_push_the_period_value(backend: Backend) {
    let (_vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let pusher = state.pusher(state.vendor.clone().unwrap());
    let now = billsync::store::now_ms();
    let ev = |id: &str, meter: &str, q: i64, user: &str, ago: i64| {
        json!({"id": id, "tenant_id": "acme", "meter": meter,
        "quantity": q, "timestamp": now_rfc3339(-ago), "properties": {"user_id": user}})
    };
    state
        .metering
        .ingest(
            &[
                ev("m1", "storage", 8, "u1", 30),
                ev("m2", "storage", 3, "u1", 20),
            ],
            now,
        )
        .await
        .unwrap();
    state
        .metering
        .ingest(
            &[
                ev("u1", "users", 1, "ann", 30),
                ev("u2", "users", 1, "bob", 20),
                ev("u3", "users", 1, "ann", 10),
            ],
            now,
        )
        .await
        .unwrap();
    state
        .metering
        .ingest(
            &[ev("s1", "seats", 12, "x", 30), ev("s2", "seats", 9, "x", 5)],
            now,
        )
        .await
        .unwrap();
    pusher.step().await.unwrap();
    let value = |meter: &'static str| {
        let db = state.db.clone();
        async move {
            db.usage().pushes_of("acme", meter).await.unwrap()[0]
                .value
                .clone()
        }
    };
    assert_eq!(
        (
            value("storage").await,
            value("users").await,
            value("seats").await
        ),
        ("8".into(), "2".into(), "9".into())
    );
}

async fn the_ledger_shows_pushed_and_unpushed_usage_over_http(backend: Backend) {
    let vendor = meter_vendor().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_http"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer("cus_http", "ledger")))
        .mount(&vendor)
        .await;
    let app = TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.metering.push_interval = std::time::Duration::from_millis(100);
    })
    .await;
    app.put_tenant("ledger", json!({})).await;
    post_usage(
        &app,
        vec![
            usage("h1", "ledger", "calls", json!(2)),
            usage("h2", "ledger", "calls", json!(3)),
        ],
    )
    .await;
    let before = ledger(&app, "ledger", "calls").await;
    assert_eq!(
        (
            before["total"].as_str(),
            before["unpushed"].as_str(),
            before["pushed"].as_str()
        ),
        (Some("5"), Some("5"), Some("0"))
    );
    app.deliver(&event(
        "evt_link",
        "customer.created",
        1_700_000_000,
        customer("cus_http", "ledger"),
    ))
    .await;
    wait_for("the usage to be pushed", || async {
        ledger(&app, "ledger", "calls").await["pushed"] == "5"
    })
    .await;
    let after = app
        .get_json("/v1/tenants/ledger/usage?meter=calls&group_by=hour")
        .await;
    assert_eq!(
        after["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["events"].as_u64().unwrap())
            .sum::<u64>(),
        2
    );
    assert_eq!(after["unpushed"], "0");
    let (status, code, field) = error_of(
        app.v1(reqwest::Method::GET, "/v1/tenants/ledger/usage")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str(), field.as_deref()),
        (400, "missing_field", Some("meter"))
    );
    let bad = app
        .v1(
            reqwest::Method::GET,
            "/v1/tenants/ledger/usage?meter=calls&group_by=week",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.2.as_deref(), Some("group_by"));
    app.stop().await;
}

async fn big_batches_are_taken_and_oversized_ones_refused(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        s.metering.max_batch = 10_000;
    })
    .await;
    app.put_tenant("bulk", json!({})).await;
    let padding = "p".repeat(150);
    let batch: Vec<Value> = (0..10_000)
        .map(|i| json!({"id": format!("b{i}"), "tenant_id": "bulk", "meter": "calls", "quantity": 1, "properties": {"pad": padding}}))
        .collect();
    let answer = post_usage(&app, batch).await;
    assert_eq!(
        answer["accepted"], 10_000,
        "a 2 MB batch of 10,000 events is one call"
    );
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| usage(&format!("x{i}"), "bulk", "calls", json!(1)))
        .collect();
    let response = app
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(&json!({"events": too_many}))
        .send()
        .await
        .unwrap();
    let (status, code, field) = error_of(response).await;
    assert_eq!(
        (status, code.as_str(), field.as_deref()),
        (400, "too_many_events", Some("events"))
    );
    assert_eq!(ledger(&app, "bulk", "calls").await["total"], "10000");
    app.stop().await;
}

/// The ledger reads a range a page at a time; thousands of events, many sharing a millisecond
/// across page boundaries, are each counted once, as one fold over all of them would.
async fn a_ledger_over_thousands_of_events_counts_each_once(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        s.metering.max_batch = 10_000;
    })
    .await;
    app.put_tenant("big", json!({})).await;
    let now = chrono::Utc::now().timestamp_millis();
    let (from, to, hour) = (now - 24 * 3_600_000, now + 3_600_000, 3_600_000);
    // Three events to a millisecond, so that page boundaries (every 1,000 rows) fall in a tie.
    let at = |i: i64| now - 60_000 - (i / 3) * 7_919;
    let mut events = Vec::new();
    let mut expected_hours = std::collections::BTreeMap::<i64, (u64, Decimal)>::new();
    let mut total = Decimal::ZERO;
    for i in 0..3_500i64 {
        let quantity = Decimal::new(i % 7 * 10 + 5, 1);
        let occurred = at(i);
        let time = chrono::DateTime::from_timestamp_millis(occurred).unwrap();
        events.push(
            json!({"id": format!("e{i:05}"), "tenant_id": "big", "meter": "calls",
            "quantity": quantity.to_string(), "timestamp": time.to_rfc3339(),
            "properties": {"user_id": format!("u{}", i % 50)}}),
        );
        events.push(
            json!({"id": format!("u{i:05}"), "tenant_id": "big", "meter": "users",
            "quantity": 1, "timestamp": time.to_rfc3339(),
            "properties": {"user_id": format!("u{}", i % 50)}}),
        );
        let slot = expected_hours
            .entry(from + (occurred - from).div_euclid(hour) * hour)
            .or_default();
        (slot.0, slot.1) = (slot.0 + 1, slot.1 + quantity);
        total += quantity;
    }
    assert_eq!(post_usage(&app, events).await["accepted"], 7_000);
    let range = |meter: &str| {
        let rfc = |ms| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        format!(
            "/v1/tenants/big/usage?meter={meter}&group_by=hour&from={}&to={}",
            rfc(from),
            rfc(to)
        )
    };
    let calls = app.get_json(&range("calls")).await;
    assert_eq!(calls["total"], total.normalize().to_string());
    assert_eq!(calls["unpushed"], calls["total"]);
    let buckets: std::collections::BTreeMap<i64, (u64, Decimal)> = calls["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let start = chrono::DateTime::parse_from_rfc3339(b["start"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            let quantity = Decimal::from_str(b["quantity"].as_str().unwrap()).unwrap();
            (start, (b["events"].as_u64().unwrap(), quantity))
        })
        .collect();
    assert_eq!(
        buckets, expected_hours,
        "every hour holds each of its events once"
    );
    let users = app.get_json(&range("users")).await;
    assert_eq!(users["total"], "50");
    let events: u64 = users["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["events"].as_u64().unwrap())
        .sum();
    assert_eq!(events, 3_500);
    app.stop().await;
}

async fn acme_state(backend: Backend) -> (AppState, crate::helpers::TestDatabase) {
    let (state, db) = state(backend, use_test_catalog).await;
    let acme = billsync::domain::TenantId::parse("acme").unwrap();
    state
        .db
        .tenants()
        .upsert(&acme, None, None, 0, None)
        .await
        .unwrap();
    (state, db)
}

/// More events than a snapshot reads in one page, folded by two replicas at once (one lost its
/// lease), with more arriving in between: each is folded once, and the sum stays exact.
async fn paged_snapshots_fold_each_event_once_and_exactly(backend: Backend) {
    let (state, _db) = acme_state(backend).await;
    let other = AppState::build((*state.settings).clone()).await.unwrap();
    let now = billsync::store::now_ms();
    let batch = |from: usize, to: usize| -> Vec<Value> {
        (from..to)
            .map(|i| {
                let quantity = if i % 1000 == 7 { "0.000000001" } else { "0.1" };
                json!({"id": format!("p{i}"), "tenant_id": "acme", "meter": "calls", "quantity": quantity})
            })
            .collect()
    };
    let mut folded = 0;
    for (from, to) in [(0, 2_500), (2_500, 5_000), (5_000, 5_001)] {
        for chunk in batch(from, to).chunks(1000) {
            state.metering.ingest(chunk, now).await.unwrap();
        }
        let (a, b) = tokio::join!(
            state.metering.snapshot(now + 60_000),
            other.metering.snapshot(now + 60_000)
        );
        folded += a.unwrap() + b.unwrap();
    }
    assert_eq!(folded, 5_001, "every event folded by one of the two, once");
    let exact = Decimal::from_str("499.600000005").unwrap();
    let restarted = AppState::build((*state.settings).clone()).await.unwrap();
    assert_eq!(
        restarted.metering.rebuild().await.unwrap().0,
        0,
        "nothing above the watermark"
    );
    let used = restarted.metering.period_usage("acme", "calls", now).await;
    assert_eq!(used.unwrap(), Some(exact));
    let logged = (state.metering)
        .period_figure("acme", "calls", (0, i64::MAX))
        .await
        .unwrap();
    assert_eq!(logged, Some(exact));
}

/// The counters' distinct count of every window of hours, against the usage log's.
async fn assert_distinct_counts_match(state: &AppState, base: i64, hours: i64, when: &str) {
    const HOUR: i64 = 3_600_000;
    for a in 0..hours {
        for b in a + 1..=hours {
            let (from, to) = (base + a * HOUR, base + b * HOUR);
            let counted = (state.metering.counters)
                .fold("acme", "users", from, to)
                .map(|bucket| bucket.value_from(from));
            let logged = (state.metering)
                .period_figure("acme", "users", (from, to))
                .await
                .unwrap();
            assert_eq!(counted, logged, "hours {a}..{b} {when}");
        }
    }
}

/// Distinct values repeated across hours, batches, snapshots and restarts, arriving late (an
/// earlier hour after a later one) and from two batches at once: the counters' distinct count
/// of every window of hours is the usage log's.
async fn distinct_counts_match_the_log_across_snapshots_restarts_and_late_events(backend: Backend) {
    const HOUR: i64 = 3_600_000;
    let (state, _db) = acme_state(backend).await;
    let now = billsync::store::now_ms();
    let base = now.div_euclid(HOUR) * HOUR - 6 * HOUR;
    // Round r: 40 events over hours 0..6 in an order that goes back in time, 13 users.
    let round = |r: usize| -> Vec<Value> {
        (0..40)
            .map(|i| {
                let hour = ((i * 7 + r * 3) % 6) as i64;
                let at = base + hour * HOUR + i as i64 * 1000;
                json!({"id": format!("d{r}-{i}"), "tenant_id": "acme", "meter": "users",
                    "timestamp": billsync::domain::rfc3339(at),
                    "properties": {"user_id": format!("u{}", (i * 5 + r) % 13)}})
            })
            .collect()
    };
    state.metering.ingest(&round(0), now).await.unwrap();
    assert_distinct_counts_match(&state, base, 6, "after one batch").await;
    state.metering.snapshot(now).await.unwrap();
    let (one, two) = (round(1), round(2));
    let (a, b) = tokio::join!(
        state.metering.ingest(&one, now),
        state.metering.ingest(&two, now)
    );
    a.unwrap();
    b.unwrap();
    assert_distinct_counts_match(&state, base, 6, "after two batches at once").await;
    let restarted = AppState::build((*state.settings).clone()).await.unwrap();
    restarted.metering.rebuild().await.unwrap();
    assert_distinct_counts_match(&restarted, base, 6, "after a restart").await;
    restarted.metering.snapshot(now).await.unwrap();
    restarted.metering.ingest(&round(3), now).await.unwrap();
    let again = AppState::build((*state.settings).clone()).await.unwrap();
    again.metering.rebuild().await.unwrap();
    assert_distinct_counts_match(&again, base, 6, "after a snapshot and a restart").await;
    let period = again.metering.period_usage("acme", "users", now).await;
    assert_eq!(period.unwrap(), Some(Decimal::from(13)));
}

/// Usage events `from..to` of acme's `calls` meter.
fn calls(from: usize, to: usize) -> Vec<Value> {
    (from..to)
        .map(|i| json!({"id": format!("w{i}"), "tenant_id": "acme", "meter": "calls", "quantity": "1"}))
        .collect()
}

/// Three batches that arrive while the SQLite writer is busy wait and are stored in one
/// transaction; an event id two of them carry is accepted once. (PostgreSQL stores each
/// batch in its own transaction; the answers are the same.)
async fn batches_waiting_for_the_writer_share_one_commit_and_count_each_event_once(
    backend: Backend,
) {
    let (state, _db) = acme_state(backend).await;
    let now = billsync::store::now_ms();
    let busy = state.metering.writer.clone().lock_owned().await;
    let mut sent = tokio::task::JoinSet::new();
    for (from, to) in [(0, 300), (200, 500), (500, 600)] {
        let metering = state.metering.clone();
        sent.spawn(async move { metering.ingest(&calls(from, to), now).await.unwrap() });
    }
    if backend == Backend::Sqlite {
        while state.metering.waiting.len() < 3 {
            tokio::task::yield_now().await;
        }
    }
    drop(busy);
    let answers = sent.join_all().await;
    let accepted: usize = answers.iter().map(|a| a.accepted).sum();
    let duplicates: usize = answers.iter().map(|a| a.duplicates).sum();
    assert_eq!((accepted, duplicates), (600, 100), "{answers:?}");
    let used = state.metering.period_figure("acme", "calls", (0, i64::MAX));
    assert_eq!(used.await.unwrap(), Some(Decimal::from(600)));
    if backend == Backend::Sqlite {
        let metrics = state.metrics.render();
        assert!(
            metrics.contains("billsync_usage_commits_total{} 1\n"),
            "one commit for the three batches:\n{metrics}"
        );
    }
}

/// The checkpoint in the write-ahead log's header: SQLite adds one each time the log is
/// written again from its start.
fn log_restarts(state: &AppState) -> u32 {
    let url = state.settings.database.url.expose().to_owned();
    let file = url.trim_start_matches("sqlite://");
    let header = std::fs::read(format!("{file}-wal")).expect("the write-ahead log");
    u32::from_be_bytes(header[12..16].try_into().unwrap())
}

/// A checkpoint asked for while a batch is being stored runs after its commit, copies the
/// whole log, and the next batch writes the log from its start: under steady ingest the log
/// does not grow without end (a checkpoint beside the writer never caught up with it).
async fn a_checkpoint_waits_for_the_batch_being_stored_so_the_log_starts_again(backend: Backend) {
    let (state, _db) = acme_state(backend).await;
    let now = billsync::store::now_ms();
    state.metering.ingest(&calls(0, 200), now).await.unwrap();
    if backend == Backend::Postgres {
        // Nothing to copy; a checkpoint is harmless.
        state.metering.checkpoint().await.unwrap();
        return;
    }
    let before = log_restarts(&state);
    let mut busy = state.metering.writer.clone().lock_owned().await;
    let metering = state.metering.clone();
    let checkpoint = tokio::spawn(async move { metering.checkpoint().await });
    // The batch in flight, stored by whoever holds the writer.
    let rows: Vec<UsageRow> = (200..400)
        .map(|i| UsageRow {
            tenant_id: "acme".to_owned(),
            event_id: format!("w{i}"),
            meter: "calls".to_owned(),
            quantity: "1".to_owned(),
            occurred_at: now,
            received_at: now,
            ..UsageRow::default()
        })
        .collect();
    let book = &state.metering.credits;
    busy.insert_group(&state.db, book, &[&rows]).await.unwrap();
    drop(busy);
    checkpoint.await.unwrap().unwrap();
    state.metering.ingest(&calls(400, 600), now).await.unwrap();
    assert!(
        log_restarts(&state) > before,
        "the batch after the checkpoint starts the log again"
    );
}
