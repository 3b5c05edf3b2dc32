//! The applier, the poller, the sweep, backfill and replay against a wiremock Stripe.

use billsync::state::AppState;
use billsync::store::{NewEvent, Source};
use billsync::sync::events;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    Backend, TestApp, customer, event, on_both_backends, state, subscription, take_webhooks,
    use_vendor, wait_for,
};

on_both_backends!(
    refetch_applies_the_vendor_state_once_for_many_events,
    an_object_the_vendor_no_longer_has_is_marked_deleted,
    a_lost_webhook_is_caught_by_the_poller,
    a_change_with_no_event_is_caught_by_the_sweep,
    a_429_storm_and_5xx_replies_are_retried_without_loss,
    a_failing_apply_stays_visible_and_is_retried_until_it_succeeds,
    shuffled_deliveries_end_in_the_same_mirror,
    backfill_lists_everything_and_resumes_after_an_interruption,
    replay_rebuilds_the_mirror_from_stored_events_without_the_vendor,
    invoices_and_payments_are_listed_newest_first_with_cursors,
    active_entitlements_and_refunds_are_refetched_through_their_parent,
);

fn row(event: &Value) -> NewEvent {
    events::from_event(&event.to_string(), event, Source::Webhook).unwrap()
}

async fn mirror_payload(state: &AppState, kind: &str, id: &str) -> Option<Value> {
    let row = state.db.mirror().get(kind, id).await.unwrap()?;
    Some(serde_json::from_str(&row.payload).unwrap())
}

async fn refetch_applies_the_vendor_state_once_for_many_events(backend: Backend) {
    let vendor = MockServer::start().await;
    let current = subscription("sub_1", "cus_1", "price_gold", "active", 3);
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&current))
        .expect(1)
        .mount(&vendor)
        .await;
    let (state, _db) = state(backend, |s| use_vendor(s, &vendor.uri())).await;
    // Three events, oldest copies first, arriving together: one fetch, the vendor's state wins.
    let stale = |i: i64, price: &str| {
        row(&event(
            &format!("evt_s{i}"),
            "customer.subscription.updated",
            1_700_000_000 + i,
            subscription("sub_1", "cus_1", price, "trialing", 1),
        ))
    };
    let rows = [
        stale(1, "price_bronze"),
        stale(2, "price_silver"),
        stale(3, "price_bronze"),
    ];
    state.db.inbox().insert(&rows, 0).await.unwrap();
    assert_eq!(state.applier().step().await.unwrap(), 3);
    assert_eq!(
        mirror_payload(&state, "subscription", "sub_1").await,
        Some(current)
    );
    let stats = state.db.inbox().stats().await.unwrap();
    assert_eq!((stats.applied, stats.pending, stats.failed), (3, 0, 0));
    vendor.verify().await;
}

async fn an_object_the_vendor_no_longer_has_is_marked_deleted(backend: Backend) {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_gone"))
        .respond_with(ResponseTemplate::new(404).set_body_json(
            json!({"error": {"code": "resource_missing", "message": "No such customer"}}),
        ))
        .mount(&vendor)
        .await;
    let (state, _db) = state(backend, |s| use_vendor(s, &vendor.uri())).await;
    let seen = row(&event(
        "evt_g1",
        "customer.created",
        1_700_000_000,
        customer("cus_gone", "gone"),
    ));
    state.db.inbox().insert(&[seen], 0).await.unwrap();
    state.applier().step().await.unwrap();
    let mirrored = state
        .db
        .mirror()
        .get("customer", "cus_gone")
        .await
        .unwrap()
        .unwrap();
    assert!(mirrored.deleted);
    let tenant = billsync::domain::TenantId::parse("gone").unwrap();
    assert!(
        state.db.tenants().get(&tenant).await.unwrap().is_none(),
        "a deleted customer creates no tenant"
    );
}

async fn a_lost_webhook_is_caught_by_the_poller(backend: Backend) {
    let vendor = MockServer::start().await;
    let now = chrono::Utc::now().timestamp();
    let lost = event(
        "evt_lost",
        "customer.created",
        now,
        customer("cus_lost", "lost-hook"),
    );
    Mock::given(method("GET"))
        .and(path("/v1/events"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [lost], "has_more": false})),
        )
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_lost"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer("cus_lost", "lost-hook")))
        .mount(&vendor)
        .await;
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        s.sync.poll_interval = std::time::Duration::from_millis(100);
    })
    .await;
    wait_for("the poller to bring the lost event", || async {
        app.get_tenant("lost-hook").await.status() == 200
    })
    .await;
    let tenant = app.get_json("/v1/tenants/lost-hook").await;
    assert_eq!(tenant["customer_id"], "cus_lost");
    let events = app.get_json("/v1/tenants/lost-hook/events").await;
    assert_eq!(events["data"][0]["source"], "poll");
    let status = app.get_json("/v1/sync/status").await;
    assert!(
        status["events_cursor"].is_string() && status["last_poll_at"].is_string(),
        "{status}"
    );
    let polls = vendor.received_requests().await.unwrap();
    let first = polls.iter().find(|r| r.url.path() == "/v1/events").unwrap();
    let since: i64 = first
        .url
        .query_pairs()
        .find(|(k, _)| k == "created[gte]")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(
        (now - 65..=now - 55).contains(&since),
        "the poller reads back one overlap: {since} vs {now}"
    );
    app.stop().await;
}

async fn a_change_with_no_event_is_caught_by_the_sweep(backend: Backend) {
    let vendor = MockServer::start().await;
    let list = |data: Vec<Value>| {
        ResponseTemplate::new(200)
            .set_body_json(json!({"object": "list", "data": data, "has_more": false}))
    };
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(list(vec![
            customer("cus_sw", "swept"),
            customer("cus_other", ""),
        ]))
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(list(vec![subscription(
            "sub_sw",
            "cus_sw",
            "price_pro",
            "active",
            5,
        )]))
        .mount(&vendor)
        .await;
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.stripe.refetch = false;
        s.sync.sweep_interval = std::time::Duration::from_millis(200);
    })
    .await;
    // The mirror knows the tenant on the basic price; the dashboard change emits no event.
    app.deliver(&event(
        "evt_c",
        "customer.created",
        1_700_000_000,
        customer("cus_sw", "swept"),
    ))
    .await;
    app.deliver(&event(
        "evt_s",
        "customer.subscription.created",
        1_700_000_001,
        subscription("sub_sw", "cus_sw", "price_basic", "active", 1),
    ))
    .await;
    wait_for("the sweep to apply the vendor's price", || async {
        let response = app.get_tenant("swept").await;
        response.status() == 200
            && response.json::<Value>().await.unwrap()["subscription"]["items"][0]["price"]
                == "price_pro"
    })
    .await;
    let tenant = app.get_json("/v1/tenants/swept").await;
    assert_eq!(tenant["subscription"]["items"][0]["quantity"], 5);
    let events = app.get_json("/v1/tenants/swept/events").await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"] == "sweep"),
        "{events}"
    );
    assert_eq!(
        app.get_tenant("other").await.status(),
        404,
        "customers of no tenant stay tenant-less"
    );
    app.stop().await;
}

async fn a_429_storm_and_5xx_replies_are_retried_without_loss(backend: Backend) {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_storm"))
        .respond_with(
            ResponseTemplate::new(429)
                .set_body_json(json!({"error": {"message": "Too many requests"}})),
        )
        .up_to_n_times(4)
        .with_priority(1)
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_storm"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(2)
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_storm"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer("cus_storm", "stormy")))
        .with_priority(3)
        .mount(&vendor)
        .await;
    let (state, _db) = state(backend, |s| {
        use_vendor(s, &vendor.uri());
        s.stripe.max_retries = 8;
    })
    .await;
    let rows: Vec<NewEvent> = (0..5)
        .map(|i| {
            row(&event(
                &format!("evt_st{i}"),
                "customer.updated",
                1_700_000_000 + i,
                customer("cus_storm", "stormy"),
            ))
        })
        .collect();
    state.db.inbox().insert(&rows, 0).await.unwrap();
    state.applier().step().await.unwrap();
    let stats = state.db.inbox().stats().await.unwrap();
    assert_eq!((stats.applied, stats.failed, stats.pending), (5, 0, 0));
    let tenant = billsync::domain::TenantId::parse("stormy").unwrap();
    assert_eq!(
        state
            .db
            .tenants()
            .get(&tenant)
            .await
            .unwrap()
            .unwrap()
            .customer_id
            .as_deref(),
        Some("cus_storm")
    );
    assert_eq!(
        vendor.received_requests().await.unwrap().len(),
        7,
        "4 × 429, 2 × 503, then the answer"
    );
    let metrics = state.metrics.render();
    assert!(
        metrics.contains(r#"billsync_vendor_requests_total{endpoint="customers",status="429"} 4"#),
        "{metrics}"
    );
}

async fn a_failing_apply_stays_visible_and_is_retried_until_it_succeeds(backend: Backend) {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_flaky"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_flaky"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer("cus_flaky", "flaky")))
        .with_priority(2)
        .mount(&vendor)
        .await;
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.stripe.max_retries = 0;
        s.sync.max_retry_delay = std::time::Duration::from_secs(1);
    })
    .await;
    app.deliver(&event(
        "evt_flaky",
        "customer.created",
        1_700_000_000,
        customer("cus_flaky", "flaky"),
    ))
    .await;
    wait_for("the failure to show in sync status", || async {
        let status = app.get_json("/v1/sync/status").await;
        status["inbox"]["failed"] == 1
            && status["failed_events"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("500"))
    })
    .await;
    wait_for("the retry to succeed", || async {
        app.get_tenant("flaky").await.status() == 200
    })
    .await;
    let events = app.get_json("/v1/tenants/flaky/events").await;
    assert_eq!(events["data"][0]["outcome"], "applied");
    assert_eq!(
        events["data"][0]["attempts"], 3,
        "two failures, then the apply"
    );
    app.stop().await;
}

async fn shuffled_deliveries_end_in_the_same_mirror(backend: Backend) {
    // Without refetch, ordering rests on event creation times: any delivery order, with
    // duplicates, must end in the newest state of every object.
    let (state, _db) = state(backend, |s| s.stripe.refetch = false).await;
    let applier = state.applier();
    let history = |run: usize| -> Vec<Value> {
        let cus = format!("cus_p{run}");
        let mut stream = vec![
            event(
                &format!("evt_{run}_c1"),
                "customer.created",
                100,
                customer(&cus, &format!("prop-{run}")),
            ),
            event(&format!("evt_{run}_c2"), "customer.updated", 160, {
                let mut c = customer(&cus, &format!("prop-{run}"));
                c["email"] = json!("renamed@example.test");
                c
            }),
        ];
        let states = [
            ("price_a", "trialing", 1),
            ("price_a", "active", 1),
            ("price_b", "active", 4),
            ("price_b", "past_due", 4),
            ("price_c", "active", 2),
        ];
        for (i, (price, status, quantity)) in states.iter().enumerate() {
            stream.push(event(
                &format!("evt_{run}_s{i}"),
                "customer.subscription.updated",
                110 + 10 * i as i64,
                subscription(&format!("sub_p{run}"), &cus, price, status, *quantity),
            ));
        }
        stream.push(event(&format!("evt_{run}_i1"), "invoice.created", 120, json!({"id": format!("in_p{run}"), "object": "invoice", "customer": cus, "status": "draft", "created": 120})));
        stream.push(event(&format!("evt_{run}_i2"), "invoice.paid", 150, json!({"id": format!("in_p{run}"), "object": "invoice", "customer": cus, "status": "paid", "created": 120})));
        stream
    };
    for run in 0..25 {
        let mut stream = history(run);
        let mut rng = fastrand::Rng::with_seed(run as u64);
        // Redeliver a few, then shuffle.
        for _ in 0..3 {
            let again = stream[rng.usize(..stream.len())].clone();
            stream.push(again);
        }
        rng.shuffle(&mut stream);
        for delivery in &stream {
            state.db.inbox().insert(&[row(delivery)], 0).await.unwrap();
            applier.step().await.unwrap();
        }
        let sub = mirror_payload(&state, "subscription", &format!("sub_p{run}"))
            .await
            .unwrap();
        assert_eq!(
            (
                sub["items"]["data"][0]["price"]["id"].as_str(),
                sub["status"].as_str()
            ),
            (Some("price_c"), Some("active")),
            "run {run}"
        );
        let cus = mirror_payload(&state, "customer", &format!("cus_p{run}"))
            .await
            .unwrap();
        assert_eq!(cus["email"], "renamed@example.test", "run {run}");
        let invoice = mirror_payload(&state, "invoice", &format!("in_p{run}"))
            .await
            .unwrap();
        assert_eq!(invoice["status"], "paid", "run {run}");
    }
}

async fn backfill_lists_everything_and_resumes_after_an_interruption(backend: Backend) {
    let vendor = MockServer::start().await;
    let empty = json!({"object": "list", "data": [], "has_more": false});
    for collection in [
        "products",
        "prices",
        "plans",
        "subscription_schedules",
        "invoices",
        "payment_intents",
        "charges",
        "credit_notes",
    ] {
        Mock::given(method("GET"))
            .and(path(format!("/v1/{collection}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(&empty))
            .mount(&vendor)
            .await;
    }
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .and(query_param("starting_after", "cus_b1"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .and(query_param("starting_after", "cus_b1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "has_more": false, "data": [customer("cus_b2", "bf-two")]}),
        ))
        .with_priority(2)
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "has_more": true, "data": [customer("cus_b1", "bf-one")]}),
        ))
        .with_priority(3)
        .expect(1)
        .mount(&vendor)
        .await;
    Mock::given(method("GET")).and(path("/v1/subscriptions")).and(query_param("status", "all"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"object": "list", "has_more": false, "data": [subscription("sub_b1", "cus_b1", "price_x", "canceled", 1)]})))
        .mount(&vendor).await;

    let (state, _db) = state(backend, |s| {
        use_vendor(s, &vendor.uri());
        s.stripe.max_retries = 0;
    })
    .await;
    let vendor_client = state.vendor.clone().unwrap();
    let interrupted =
        billsync::sync::backfill::run(&state.db, vendor_client.clone(), &state.applier()).await;
    assert!(interrupted.is_err(), "the second customer page failed");
    let report = billsync::sync::backfill::run(&state.db, vendor_client, &state.applier())
        .await
        .unwrap();
    let customers = report
        .kinds
        .iter()
        .find(|(k, ..)| k.as_str() == "customer")
        .unwrap();
    assert_eq!(
        customers.1, 1,
        "resumed after the first page, which is not listed again"
    );
    for tenant in ["bf-one", "bf-two"] {
        let id = billsync::domain::TenantId::parse(tenant).unwrap();
        assert!(
            state.db.tenants().get(&id).await.unwrap().is_some(),
            "{tenant}"
        );
    }
    let sub = state
        .db
        .mirror()
        .get("subscription", "sub_b1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sub.status.as_deref(),
        Some("canceled"),
        "backfill includes ended subscriptions"
    );
    vendor.verify().await;
}

async fn replay_rebuilds_the_mirror_from_stored_events_without_the_vendor(backend: Backend) {
    let vendor = MockServer::start().await;
    let latest = subscription("sub_r", "cus_r", "price_new", "active", 2);
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions/sub_r"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&latest))
        .mount(&vendor)
        .await;
    let (state, _db) = state(backend, |s| use_vendor(s, &vendor.uri())).await;
    let rows = [
        row(&event(
            "evt_r1",
            "customer.created",
            1_700_000_000,
            customer("cus_r", "replayed"),
        )),
        row(&event(
            "evt_r2",
            "customer.subscription.updated",
            1_700_000_001,
            subscription("sub_r", "cus_r", "price_old", "active", 1),
        )),
    ];
    state.db.inbox().insert(&rows[..1], 0).await.unwrap();
    // Apply the customer from its own copy (as if refetch were off), the subscription by refetch.
    let mut no_vendor = state.applier();
    no_vendor.vendor = None;
    no_vendor.step().await.unwrap();
    state.db.inbox().insert(&rows[1..], 0).await.unwrap();
    state.applier().step().await.unwrap();
    let calls = vendor.received_requests().await.unwrap().len();

    let clean = billsync::sync::replay::run(&state.db, false).await.unwrap();
    assert!(clean.differences.is_empty(), "{:?}", clean.differences);
    assert_eq!(clean.objects_rebuilt, 2);

    // Damage the mirror; replay finds it, repairs it, and never calls the vendor.
    let mut damaged = billsync::sync::applier::object_state(
        billsync::stripe::ObjectKind::Subscription,
        "sub_r",
        &json!({"id": "sub_r", "object": "subscription", "status": "canceled", "customer": "cus_r"}),
        i64::MAX,
        false,
    );
    damaged.status = Some("canceled".into());
    state.db.mirror().overwrite(&damaged, 0).await.unwrap();
    let found = billsync::sync::replay::run(&state.db, false).await.unwrap();
    assert_eq!(found.differences.len(), 1);
    assert_eq!(
        (
            found.differences[0].object_id.as_str(),
            found.differences[0].kind
        ),
        ("sub_r", "differs")
    );
    assert_eq!(
        mirror_payload(&state, "subscription", "sub_r")
            .await
            .unwrap()["status"],
        "canceled",
        "a dry run writes nothing"
    );
    let repaired = billsync::sync::replay::run(&state.db, true).await.unwrap();
    assert_eq!(repaired.written, 1);
    assert_eq!(
        mirror_payload(&state, "subscription", "sub_r").await,
        Some(latest)
    );
    assert_eq!(
        vendor.received_requests().await.unwrap().len(),
        calls,
        "replay made no vendor call"
    );
}

async fn invoices_and_payments_are_listed_newest_first_with_cursors(backend: Backend) {
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    app.deliver(&event(
        "evt_ic",
        "customer.created",
        1_700_000_000,
        customer("cus_inv", "invoiced"),
    ))
    .await;
    for i in 0..5 {
        let invoice = json!({"id": format!("in_{i}"), "object": "invoice", "customer": "cus_inv", "status": "paid",
            "currency": "jpy", "total": 1000 * i, "amount_due": 1000 * i, "amount_paid": 1000 * i, "amount_remaining": 0,
            "created": 1_700_000_000 + i, "lines": {"data": [{"id": format!("il_{i}"), "amount": 1000 * i, "currency": "jpy",
            "quantity": i, "price": {"id": "price_api"}, "period": {"start": 1_700_000_000, "end": 1_702_592_000}}]}});
        app.deliver(&event(
            &format!("evt_in{i}"),
            "invoice.paid",
            1_700_000_100 + i,
            invoice,
        ))
        .await;
    }
    app.deliver(&event("evt_pi", "payment_intent.succeeded", 1_700_000_200, json!({"id": "pi_1", "object": "payment_intent",
        "customer": "cus_inv", "amount": 4000, "amount_received": 4000, "currency": "jpy", "status": "succeeded", "invoice": "in_4", "created": 1_700_000_200}))).await;
    app.deliver(&event("evt_ch", "charge.refunded", 1_700_000_300, json!({"id": "ch_1", "object": "charge", "customer": "cus_inv",
        "amount": 4000, "amount_refunded": 1000, "refunded": false, "disputed": false, "currency": "jpy", "status": "succeeded",
        "payment_intent": "pi_1", "invoice": "in_4", "created": 1_700_000_201}))).await;
    wait_for("all events applied", || async {
        app.get_json("/v1/sync/status").await["inbox"]["applied"] == 8
    })
    .await;

    let first = app.get_json("/v1/tenants/invoiced/invoices?limit=2").await;
    let ids = |page: &Value| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), ["in_4", "in_3"]);
    assert_eq!(
        first["data"][0]["total"], 4000,
        "integer minor units (JPY has no decimals)"
    );
    assert_eq!(first["data"][0]["lines"][0]["quantity"], "4");
    assert_eq!(first["data"][0]["lines"][0]["price"], "price_api");
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .get_json(&format!(
            "/v1/tenants/invoiced/invoices?limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(ids(&second), ["in_2", "in_1"]);
    let last = app
        .get_json(&format!(
            "/v1/tenants/invoiced/invoices?limit=2&cursor={}",
            second["next_cursor"].as_str().unwrap()
        ))
        .await;
    assert_eq!(ids(&last), ["in_0"]);
    assert_eq!(last["next_cursor"], Value::Null);

    let payments = app.get_json("/v1/tenants/invoiced/payments").await;
    assert_eq!(ids(&payments), ["ch_1", "pi_1"]);
    assert_eq!(payments["data"][0]["amount_refunded"], 1000);
    assert_eq!(payments["data"][0]["kind"], "charge");

    let bad = app
        .v1(
            reqwest::Method::GET,
            "/v1/tenants/invoiced/invoices?limit=500",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        crate::helpers::error_of(bad).await.2.as_deref(),
        Some("limit")
    );
    app.stop().await;
}

async fn active_entitlements_and_refunds_are_refetched_through_their_parent(backend: Backend) {
    let vendor = MockServer::start().await;
    let entitlement = json!({"id": "ent_1", "object": "entitlements.active_entitlement", "lookup_key": "sso",
        "feature": "feat_1", "livemode": false});
    Mock::given(method("GET"))
        .and(path("/v1/entitlements/active_entitlements"))
        .and(query_param("customer", "cus_e"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [entitlement], "has_more": false})),
        )
        .expect(1)
        .mount(&vendor)
        .await;
    let charge = json!({"id": "ch_9", "object": "charge", "customer": "cus_e", "amount": 900, "amount_refunded": 900,
        "refunded": true, "disputed": false, "currency": "usd", "status": "succeeded", "created": 1_700_000_000});
    Mock::given(method("GET"))
        .and(path("/v1/charges/ch_9"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&charge))
        .expect(1)
        .mount(&vendor)
        .await;
    let (state, _db) = state(backend, |s| use_vendor(s, &vendor.uri())).await;
    let summary = json!({"object": "entitlements.active_entitlement_summary", "customer": "cus_e",
        "entitlements": {"object": "list", "data": [], "has_more": false}});
    let refund = json!({"id": "re_1", "object": "refund", "amount": 900, "charge": "ch_9", "status": "succeeded"});
    let rows = [
        row(&event(
            "evt_e1",
            "entitlements.active_entitlement_summary.updated",
            1_700_000_000,
            summary,
        )),
        row(&event(
            "evt_r1",
            "charge.refund.updated",
            1_700_000_000,
            refund,
        )),
    ];
    state.db.inbox().insert(&rows, 0).await.unwrap();
    state.applier().step().await.unwrap();
    let summary = mirror_payload(&state, "active_entitlements", "cus_e")
        .await
        .unwrap();
    assert_eq!(summary["entitlements"]["data"][0]["lookup_key"], "sso");
    assert_eq!(mirror_payload(&state, "charge", "ch_9").await, Some(charge));
    vendor.verify().await;
}
