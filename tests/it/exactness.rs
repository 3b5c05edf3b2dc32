//! Billing figures stay exact at period edges, under races between planners and snapshots,
//! and when rows commit late.

use std::collections::HashMap;
use std::str::FromStr;

use billsync::state::AppState;
use billsync::store::{Db, Source};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use wiremock::MockServer;

use crate::helpers::{Backend, TestApp, event, on_both_backends, subscription, use_test_catalog};
use crate::usage::{linked_tenant, metered, url_form};

on_both_backends!(
    usage_before_the_paid_period_never_counts_in_it,
    late_usage_after_a_renewal_goes_into_its_own_period,
    usage_of_an_invoiced_period_is_reported_not_pushed,
    usage_waits_for_a_renewal_billsync_has_not_heard_of,
    a_replica_pushes_usage_its_counters_never_heard_of,
    two_planners_racing_push_each_event_once,
    overlapping_snapshots_fold_each_event_once,
    a_row_committed_after_a_snapshot_is_still_counted,
    check_and_record_under_load_answers_every_call_and_holds_every_limit,
);

const HOUR: i64 = 3_600_000;

fn rfc3339(ms: i64) -> String {
    billsync::domain::rfc3339(ms)
}

/// A usage event at `at_ms`.
fn usage_at(id: &str, meter: &str, quantity: i64, at_ms: i64) -> Value {
    json!({"id": id, "tenant_id": "acme", "meter": meter, "quantity": quantity,
        "timestamp": rfc3339(at_ms), "properties": {"user_id": id}})
}

/// Applies vendor states to the mirror as webhook copies (no refetch), in order.
async fn apply(state: &AppState, objects: &[(&str, Value)]) {
    let rows: Vec<_> = objects
        .iter()
        .enumerate()
        .map(|(i, (kind, object))| {
            let id = format!("evt_{}_{}", uuid::Uuid::new_v4().simple(), i);
            let created = billsync::store::now_ms() / 1000;
            let event = event(&id, kind, created, object.clone());
            billsync::sync::events::from_event(&event.to_string(), &event, Source::Webhook).unwrap()
        })
        .collect();
    state
        .db
        .inbox()
        .insert(&rows, billsync::store::now_ms())
        .await
        .unwrap();
    let mut applier = state.applier();
    applier.vendor = None;
    while applier.step().await.unwrap() > 0 {}
}

/// The tenant's subscription with its period `[start_ms, end_ms)`.
fn subscription_in(period: (i64, i64), status: &str) -> (&'static str, Value) {
    let mut sub = subscription("sub_acme", "cus_acme", "price_pro", status, 1);
    let item = &mut sub["items"]["data"][0];
    item["current_period_start"] = json!(period.0 / 1000);
    item["current_period_end"] = json!(period.1 / 1000);
    ("customer.subscription.updated", sub)
}

/// The renewal invoice billing the usage of `period`, in `status`.
fn invoice_for(period: (i64, i64), status: &str) -> (&'static str, Value) {
    let invoice = json!({"id": "in_acme", "object": "invoice", "customer": "cus_acme",
        "status": status, "subscription": "sub_acme", "billing_reason": "subscription_cycle",
        "period_start": period.0 / 1000, "period_end": period.1 / 1000, "created": period.1 / 1000,
        "currency": "usd", "total": 0, "lines": {"object": "list", "data": []}});
    ("invoice.finalized", invoice)
}

/// What Stripe's meter bills for `[start_ms, end_ms)`: the events it holds (one per
/// identifier) timestamped inside the period, summed, or (`last`) the latest one's value.
async fn billed(vendor: &MockServer, event_name: &str, period: (i64, i64), last: bool) -> Decimal {
    let mut held: HashMap<String, (i64, usize, Decimal)> = HashMap::new();
    let requests = vendor.received_requests().await.unwrap();
    for (order, request) in requests.iter().enumerate() {
        if request.url.path() != "/v1/billing/meter_events" {
            continue;
        }
        let form = url_form(&request.body);
        if form["event_name"] != event_name {
            continue;
        }
        let at = form["timestamp"].parse::<i64>().unwrap() * 1000;
        let value = Decimal::from_str(&form["payload[value]"]).unwrap();
        held.entry(form["identifier"].clone())
            .or_insert((at, order, value));
    }
    let mut inside: Vec<(i64, usize, Decimal)> = held
        .into_values()
        .filter(|(at, _, _)| (period.0..period.1).contains(at))
        .collect();
    inside.sort();
    if last {
        inside.last().map(|(_, _, v)| *v).unwrap_or_default()
    } else {
        inside.iter().map(|(_, _, v)| *v).sum()
    }
}

/// Runs SQL on either backend.
async fn sql(db: &Db, statement: &str) {
    let statement = sqlx::AssertSqlSafe(statement.to_owned());
    match db {
        Db::Sqlite(pool) => sqlx::query(statement).execute(pool).await.map(drop),
        Db::Postgres(pool) => sqlx::query(statement).execute(pool).await.map(drop),
    }
    .unwrap();
}

/// Two periods of two hours, the second starting at `renewal`.
fn periods_around(renewal: i64) -> ((i64, i64), (i64, i64)) {
    ((renewal - 2 * HOUR, renewal), (renewal, renewal + 2 * HOUR))
}

/// The start of the current hour, minus `hours`.
fn hour_start(hours: i64) -> i64 {
    let now = billsync::store::now_ms();
    now.div_euclid(HOUR) * HOUR - hours * HOUR
}

async fn usage_before_the_paid_period_never_counts_in_it(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    // The paid period began at 10:37; 50 GB were read at 10:05, before it, and 5 GB at 10:38.
    let hour = hour_start(2);
    let paid = (hour + 37 * 60_000, hour + 30 * 24 * HOUR);
    apply(&state, &[subscription_in(paid, "active")]).await;
    let now = billsync::store::now_ms();
    let early = usage_at("early", "storage", 50, hour + 5 * 60_000);
    let inside = usage_at("inside", "storage", 5, hour + 38 * 60_000);
    state.metering.ingest(&[early, inside], now).await.unwrap();
    state
        .pusher(state.vendor.clone().unwrap())
        .step()
        .await
        .unwrap();
    assert_eq!(
        billed(&vendor, "storage", paid, true).await,
        Decimal::from(5),
        "the paid period is billed its own maximum"
    );
}

async fn late_usage_after_a_renewal_goes_into_its_own_period(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let (past, current) = periods_around(hour_start(1));
    apply(&state, &[subscription_in(past, "active")]).await;
    let pusher = state.pusher(state.vendor.clone().unwrap());
    let now = billsync::store::now_ms();
    let first = [
        usage_at("s1", "storage", 7, past.0 + 10 * 60_000),
        usage_at("c1", "calls", 7, past.0 + 10 * 60_000),
    ];
    state.metering.ingest(&first, now).await.unwrap();
    pusher.step().await.unwrap();

    apply(&state, &[subscription_in(current, "active")]).await;
    let later = [
        usage_at("s2", "storage", 3, current.0 + 60_000),
        usage_at("c2", "calls", 3, current.0 + 60_000),
        // Happened before the renewal, arrived after it.
        usage_at("s3", "storage", 9, past.1 - 10 * 60_000),
        usage_at("c3", "calls", 9, past.1 - 10 * 60_000),
    ];
    state.metering.ingest(&later, now).await.unwrap();
    pusher.step().await.unwrap();

    let figures = (
        billed(&vendor, "storage", past, true).await,
        billed(&vendor, "storage", current, true).await,
        billed(&vendor, "calls", past, false).await,
        billed(&vendor, "calls", current, false).await,
    );
    let d = Decimal::from;
    assert_eq!(figures, (d(9), d(3), d(16), d(3)), "(max, max, sum, sum)");
}

async fn usage_of_an_invoiced_period_is_reported_not_pushed(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let (past, current) = periods_around(hour_start(1));
    apply(
        &state,
        &[
            subscription_in(past, "active"),
            subscription_in(current, "active"),
            invoice_for(past, "open"),
        ],
    )
    .await;
    let now = billsync::store::now_ms();
    let late = usage_at("late", "calls", 4, past.1 - 60_000);
    let current_usage = usage_at("now", "calls", 2, current.0 + 60_000);
    state
        .metering
        .ingest(&[late, current_usage], now)
        .await
        .unwrap();
    let pusher = state.pusher(state.vendor.clone().unwrap());
    pusher.step().await.unwrap();
    assert_eq!(billed(&vendor, "calls", past, false).await, Decimal::ZERO);
    assert_eq!(billed(&vendor, "calls", current, false).await, Decimal::TWO);
    let pushes = state.db.usage().pushes_of("acme", "calls").await.unwrap();
    let held = pushes.iter().find(|p| p.status == "invoice_final").unwrap();
    assert_eq!(held.value, "4");
    assert!(held.last_error.as_deref().unwrap().contains("in_acme"));
}

async fn usage_waits_for_a_renewal_billsync_has_not_heard_of(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let (past, current) = periods_around(hour_start(0));
    apply(&state, &[subscription_in(past, "active")]).await;
    let pusher = state.pusher(state.vendor.clone().unwrap());
    let now = billsync::store::now_ms();
    let after = usage_at("after", "storage", 6, current.0 + 1);
    state.metering.ingest(&[after], now).await.unwrap();
    pusher.step().await.unwrap();
    let pushes = state.db.usage().pushes_of("acme", "storage").await.unwrap();
    assert!(
        pushes.is_empty(),
        "nothing goes out before the renewal is known: {pushes:?}"
    );

    apply(&state, &[subscription_in(current, "active")]).await;
    assert_eq!(pusher.step().await.unwrap().sent, 1);
    assert_eq!(
        billed(&vendor, "storage", current, true).await,
        Decimal::from(6)
    );
    assert_eq!(billed(&vendor, "storage", past, true).await, Decimal::ZERO);
}

async fn a_replica_pushes_usage_its_counters_never_heard_of(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let paid = (hour_start(2), hour_start(2) + 30 * 24 * HOUR);
    apply(&state, &[subscription_in(paid, "active")]).await;
    // Another replica on the same database; this one never hears of its usage.
    let other = AppState::build((*state.settings).clone()).await.unwrap();
    let now = billsync::store::now_ms();
    let events = [
        usage_at("a", "users", 1, now - 60_000),
        usage_at("b", "users", 1, now - 50_000),
        usage_at("m", "storage", 42, now - 40_000),
    ];
    other.metering.ingest(&events, now).await.unwrap();
    state
        .pusher(state.vendor.clone().unwrap())
        .step()
        .await
        .unwrap();
    assert_eq!(billed(&vendor, "users", paid, true).await, Decimal::TWO);
    assert_eq!(
        billed(&vendor, "storage", paid, true).await,
        Decimal::from(42)
    );
}

async fn two_planners_racing_push_each_event_once(backend: Backend) {
    let (vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let other = AppState::build((*state.settings).clone()).await.unwrap();
    let (slow, fast) = (
        state.pusher(state.vendor.clone().unwrap()),
        other.pusher(other.vendor.clone().unwrap()),
    );
    let now = billsync::store::now_ms();
    let at = now - 60_000;
    let first = [
        usage_at("e1", "calls", 1, at),
        usage_at("e2", "calls", 2, at),
    ];
    state.metering.ingest(&first, now).await.unwrap();
    // The slow planner reads e1 and e2 and stalls (it lost its lease, say) before writing.
    let stale = slow.plan_chunk().await.unwrap();
    assert_eq!(stale.pushes().count(), 1);
    state
        .metering
        .ingest(&[usage_at("e3", "calls", 4, at)], now)
        .await
        .unwrap();
    // Meanwhile the new lease holder plans e1, e2 and e3 together and sends them.
    assert_eq!(fast.step().await.unwrap().sent, 1);
    let written = slow.write_plan(&stale).await.unwrap();
    slow.step().await.unwrap();
    fast.step().await.unwrap();
    let period = (0, i64::MAX);
    assert_eq!(
        billed(&vendor, "calls", period, false).await,
        Decimal::from(7)
    );
    assert!(!written, "the stale plan is refused whole");
    let pushes = state.db.usage().pushes_of("acme", "calls").await.unwrap();
    assert_eq!(pushes.len(), 1, "{pushes:?}");
}

async fn overlapping_snapshots_fold_each_event_once(backend: Backend) {
    let (_vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let other = AppState::build((*state.settings).clone()).await.unwrap();
    let now = billsync::store::now_ms();
    let events: Vec<Value> = (0..50)
        .map(|i| usage_at(&format!("e{i}"), "calls", 1, now - 60_000))
        .collect();
    state.metering.ingest(&events, now).await.unwrap();
    // Two snapshot jobs at once: one that lost its lease and the one that took it.
    for _ in 0..3 {
        let later = now + 120_000;
        let (a, b) = tokio::join!(
            state.metering.snapshot(later),
            other.metering.snapshot(later)
        );
        a.unwrap();
        b.unwrap();
    }
    let restarted = AppState::build((*state.settings).clone()).await.unwrap();
    restarted.metering.rebuild().await.unwrap();
    let used = restarted
        .metering
        .period_usage("acme", "calls", now)
        .await
        .unwrap();
    assert_eq!(used, Some(Decimal::from(50)));
}

async fn a_row_committed_after_a_snapshot_is_still_counted(backend: Backend) {
    let (_vendor, state, _db) = metered(backend).await;
    linked_tenant(&state, "acme", "cus_acme").await;
    let now = billsync::store::now_ms();
    let on_time = usage_at("on-time", "calls", 3, now - 5 * 60_000);
    state
        .metering
        .ingest(&[on_time], now - 5 * 60_000)
        .await
        .unwrap();
    state.metering.snapshot(now).await.unwrap();
    // Stamped two minutes ago (a slow transaction, a replica with a skewed clock), committed
    // only now, after the snapshot.
    let stamped = now - 2 * 60_000;
    sql(
        &state.db,
        &format!(
            "INSERT INTO usage_events (tenant_id, event_id, meter, quantity, occurred_at, received_at) \
             VALUES ('acme', 'late-commit', 'calls', '4', {stamped}, {stamped})"
        ),
    )
    .await;
    state.metering.snapshot(now + 1000).await.unwrap();
    for _ in 0..2 {
        // After a restart, and again after the next snapshot.
        let restarted = AppState::build((*state.settings).clone()).await.unwrap();
        restarted.metering.rebuild().await.unwrap();
        let used = restarted
            .metering
            .period_usage("acme", "calls", now)
            .await
            .unwrap();
        assert_eq!(used, Some(Decimal::from(7)));
        restarted.metering.snapshot(now + 2000).await.unwrap();
    }
    if let Db::Postgres(pool) = &state.db {
        // A transaction open across a snapshot: its row is folded by the next one.
        let mut open = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO usage_events (tenant_id, event_id, meter, quantity, occurred_at, received_at) \
             VALUES ('acme', 'open-tx', 'calls', '10', $1, $1)",
        )
        .bind(stamped)
        .execute(&mut *open)
        .await
        .unwrap();
        state.metering.snapshot(now + 3000).await.unwrap();
        open.commit().await.unwrap();
        state.metering.snapshot(now + 4000).await.unwrap();
        let restarted = AppState::build((*state.settings).clone()).await.unwrap();
        restarted.metering.rebuild().await.unwrap();
        let used = restarted.metering.period_usage("acme", "calls", now).await;
        assert_eq!(used.unwrap(), Some(Decimal::from(17)));
    }
}

async fn check_and_record_under_load_answers_every_call_and_holds_every_limit(backend: Backend) {
    // The default pool (10 connections), 100 tenants on the free plan (10 calls each).
    let app = TestApp::spawn_with(backend, use_test_catalog).await;
    for t in 0..100 {
        app.put_tenant(&format!("t{t}"), json!({})).await;
    }
    // 200 calls at once, two per tenant, each recording 6: exactly one of each pair fits.
    let call = |i: usize| {
        let request = app
            .v1(
                reqwest::Method::POST,
                &format!("/v1/tenants/t{}/entitlements/check", i % 100),
            )
            .timeout(std::time::Duration::from_secs(60))
            .json(
                &json!({"feature": "api_calls", "quantity": 6, "record": {"id": format!("r{i}")}}),
            );
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (i % 100, status, response.json::<Value>().await.unwrap())
        }
    };
    let answers = futures_util::future::join_all((0..200).map(call)).await;
    let mut by_tenant: HashMap<usize, Vec<Value>> = HashMap::new();
    for (tenant, status, body) in answers {
        assert_eq!(status, 200, "{body}");
        by_tenant.entry(tenant).or_default().push(body);
    }
    for (tenant, answers) in by_tenant {
        let recorded: Vec<bool> = answers.iter().map(|a| a["recorded"] == true).collect();
        assert_eq!(
            recorded.iter().filter(|r| **r).count(),
            1,
            "t{tenant}: {answers:?}"
        );
        let refused = answers.iter().find(|a| a["recorded"] == false).unwrap();
        assert_eq!(refused["reason"], "limit_exceeded", "t{tenant}: {refused}");
        assert_eq!(refused["used"], "6", "refused at 6 of 10, not below");
        let used = app.check(&format!("t{tenant}"), "api_calls").await;
        assert_eq!(used["used"], "6", "t{tenant}: {used}");
    }
}
