//! The bounded drift sweep against a wiremock Stripe: its calls stay within the budget, every
//! known tenant is checked within the longest unchecked time it reports, and a change that no
//! event brought is found. Passes are stepped by hand on a state sharing the service's database.

use std::time::Duration;

use billsync::state::AppState;
use billsync::store::Db;
use billsync::sync::sweep::Sweep;
use billsync::sync::sweep_plan::plan;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{
    Backend, TestApp, customer, event, on_both_backends, subscription, take_webhooks, use_vendor,
    wait_for,
};

on_both_backends!(
    the_sweep_stays_within_its_budget_and_checks_every_known_tenant_within_the_bound,
    a_changed_subscription_with_no_event_is_found_by_a_sweep_of_its_tenant,
    a_tenant_with_recent_activity_is_checked_before_its_turn,
);

/// Answers `GET /v1/customers/cus_<n>` with the customer of tenant `t<n>`.
struct Customers;

impl Respond for Customers {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request.url.path().rsplit('/').next().unwrap_or_default();
        let tenant = format!("t{}", id.trim_start_matches("cus_"));
        ResponseTemplate::new(200).set_body_json(customer(id, &tenant))
    }
}

pub(crate) fn list(data: Vec<Value>) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(json!({"object": "list", "data": data, "has_more": false}))
}

/// Inserts `count` tenants `t<n>` linked to customers `cus_<n>`, as the benches do.
async fn link_tenants(db: &Db, count: usize) {
    macro_rules! insert {
        ($pool:expr, $chunk:expr) => {{
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO tenants (tenant_id, customer_id, created_at, updated_at) ",
            );
            query.push_values($chunk, |mut b, i| {
                b.push_bind(format!("t{i}"))
                    .push_bind(format!("cus_{i}"))
                    .push_bind(0_i64)
                    .push_bind(0_i64);
            });
            query.build().execute($pool).await.map(drop)
        }};
    }
    for chunk in (0..count).collect::<Vec<_>>().chunks(2000) {
        match db {
            Db::Sqlite(pool) => insert!(pool, chunk),
            Db::Postgres(pool) => insert!(pool, chunk),
        }
        .unwrap();
    }
}

/// The service's own state on its database, with a sweep passing every `interval`.
async fn stepped_sweep(app: &TestApp, interval: Duration) -> (AppState, Sweep) {
    let state = AppState::build(app.settings.clone()).await.expect("state");
    let sweep = Sweep {
        interval,
        ..state.sweep(state.vendor.clone().expect("vendor"))
    };
    (state, sweep)
}

/// Vendor calls the sweep makes: customers fetched and subscriptions listed.
async fn sweep_calls(vendor: &MockServer) -> usize {
    let requests = vendor.received_requests().await.unwrap_or_default();
    requests
        .iter()
        .filter(|r| {
            let p = r.url.path();
            p.starts_with("/v1/customers/") || p.starts_with("/v1/subscriptions")
        })
        .count()
}

/// A Stripe fake that knows every customer `cus_<n>` and no subscription.
pub(crate) async fn customers_without_subscriptions() -> MockServer {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path_regex("^/v1/customers/cus_[0-9]+$"))
        .respond_with(Customers)
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(list(vec![]))
        .mount(&vendor)
        .await;
    vendor
}

async fn the_sweep_stays_within_its_budget_and_checks_every_known_tenant_within_the_bound(
    backend: Backend,
) {
    const TENANTS: usize = 1000;
    const BUDGET: u32 = 1000;
    let vendor = customers_without_subscriptions().await;
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        s.stripe.refetch = false;
        s.sync.sweep_budget = BUDGET;
    })
    .await;
    let interval = Duration::from_secs(30);
    let (state, sweep) = stepped_sweep(&app, interval).await;
    link_tenants(&state.db, TENANTS).await;
    let expected = plan(BUDGET, interval, TENANTS as u64);
    assert_eq!(
        (expected.calls_per_pass, expected.tenants_per_pass),
        (500, 250)
    );

    let started = billsync::store::now_ms();
    let passes = expected.longest_unchecked.as_secs() / interval.as_secs();
    assert_eq!(passes, 6, "{expected:?}");
    let mut before = sweep_calls(&vendor).await;
    for pass in 0..passes {
        sweep.step().await.expect("a sweep pass");
        let calls = sweep_calls(&vendor).await;
        assert!(
            calls - before <= expected.calls_per_pass as usize && calls > before,
            "pass {pass} made {} calls, over its {}",
            calls - before,
            expected.calls_per_pass
        );
        before = calls;
    }
    let (known, never, oldest) = state.db.tenants().sweep_coverage().await.unwrap();
    assert_eq!(
        (known, never),
        (TENANTS as i64, 0),
        "every tenant was checked"
    );
    assert!(oldest.unwrap() >= started);

    let status = app.get_json("/v1/sync/status").await;
    let shown = &status["sweep"];
    assert_eq!(shown["budget_per_minute"], BUDGET);
    assert_eq!(shown["known_tenants"], TENANTS);
    assert_eq!(shown["never_swept"], 0);
    let bound = plan(BUDGET, app.settings.sync.sweep_interval, TENANTS as u64);
    assert_eq!(
        shown["longest_unchecked_seconds"].as_f64(),
        Some(bound.longest_unchecked.as_secs_f64())
    );
    assert!(shown["oldest_swept_at"].is_string(), "{status}");
    let gauge = state
        .metrics
        .gauge("billsync_sweep_longest_unchecked_seconds");
    assert_eq!(gauge, [(String::new(), 180.0)], "six passes of 30 s");
    app.stop().await;
}

async fn a_changed_subscription_with_no_event_is_found_by_a_sweep_of_its_tenant(backend: Backend) {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_sw"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer("cus_sw", "swept")))
        .mount(&vendor)
        .await;
    // Only a list by customer answers: the sweep never lists the whole account.
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .and(query_param("customer", "cus_sw"))
        .respond_with(list(vec![subscription(
            "sub_sw",
            "cus_sw",
            "price_pro",
            "active",
            5,
        )]))
        .mount(&vendor)
        .await;
    // A live subscription the mirror has and the list no longer shows ended with no event.
    let mut ended = subscription("sub_old", "cus_sw", "price_basic", "canceled", 1);
    ended["ended_at"] = json!(1_700_000_500);
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_old"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ended))
        .mount(&vendor)
        .await;
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.stripe.refetch = false;
    })
    .await;
    let mirrored = [
        ("customer.created", customer("cus_sw", "swept")),
        (
            "customer.subscription.created",
            subscription("sub_sw", "cus_sw", "price_basic", "active", 1),
        ),
        (
            "customer.subscription.created",
            subscription("sub_old", "cus_sw", "price_basic", "active", 1),
        ),
    ];
    for (i, (kind, object)) in mirrored.into_iter().enumerate() {
        app.deliver(&event(
            &format!("evt_{i}"),
            kind,
            1_700_000_000 + i as i64,
            object,
        ))
        .await;
    }
    wait_for("the tenant to be linked", || async {
        app.get_tenant("swept").await.status() == 200
    })
    .await;
    let (state, sweep) = stepped_sweep(&app, Duration::from_secs(1)).await;
    wait_for("both subscriptions to be mirrored", || async {
        let mirror = state.db.mirror();
        let rows = mirror.of_customer("cus_sw", "subscription").await;
        rows.unwrap().len() == 2
    })
    .await;

    assert!(sweep.step().await.expect("a sweep pass") >= 2);
    wait_for("the sweep to apply the vendor's price", || async {
        let tenant = app.get_json("/v1/tenants/swept").await;
        tenant["subscription"]["items"][0]["price"] == "price_pro"
    })
    .await;
    wait_for("the unlisted subscription to end", || async {
        let mirror = state.db.mirror();
        let old = mirror.get("subscription", "sub_old").await;
        old.unwrap().unwrap().status.as_deref() == Some("canceled")
    })
    .await;
    let events = app.get_json("/v1/tenants/swept/events").await;
    let sources: Vec<&Value> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["source"])
        .collect();
    assert!(sources.iter().any(|s| *s == "sweep"), "{events}");
    app.stop().await;
}

async fn a_tenant_with_recent_activity_is_checked_before_its_turn(backend: Backend) {
    let vendor = customers_without_subscriptions().await;
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.stripe.refetch = false;
        // Eight calls a pass of 30 s: four tenants, one of them ahead of its turn.
        s.sync.sweep_budget = 16;
    })
    .await;
    let (state, sweep) = stepped_sweep(&app, Duration::from_secs(30)).await;
    link_tenants(&state.db, 8).await;
    let tenants = state.db.tenants();
    let ids = |range: std::ops::Range<usize>| range.map(|i| format!("t{i}")).collect::<Vec<_>>();
    let now = billsync::store::now_ms();
    tenants.mark_swept(&ids(0..4), now - 60_000).await.unwrap();
    tenants.mark_swept(&ids(4..8), now - 30_000).await.unwrap();
    // t6's customer changes after its last check (a webhook): activity.
    let mut changed = customer("cus_6", "t6");
    changed["name"] = json!("Renamed");
    app.deliver(&event("evt_t6", "customer.updated", now / 1000, changed))
        .await;
    wait_for("the change to be mirrored", || async {
        let mirror = state.db.mirror();
        mirror.get("customer", "cus_6").await.unwrap().is_some()
    })
    .await;

    let due = tenants.sweep_due(1, 4).await.unwrap();
    let due: Vec<&str> = due.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        due,
        ["t6", "t0", "t1", "t2"],
        "the active one, then the oldest"
    );
    sweep.step().await.expect("a sweep pass");
    // Those four were checked now; t3 waited longest and goes next.
    let order = tenants.sweep_due(0, 8).await.unwrap();
    let order: Vec<&str> = order.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(order, ["t3", "t4", "t5", "t7", "t0", "t1", "t2", "t6"]);
    app.stop().await;
}
