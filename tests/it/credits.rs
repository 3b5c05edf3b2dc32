//! Prepaid credits: Stripe's credit grants mirrored by webhook and by backfill, burned exactly
//! by check-and-record of credit-priced features, never below zero under concurrency, voided
//! and expired grants, and the paginated ledger.

use billsync::state::AppState;
use serde_json::{Value, json};
use wiremock::Mock;
use wiremock::matchers::{method, path};

use crate::entitlements::{onboard, service};
use crate::helpers::{Backend, TestApp, customer, event, on_both_backends, use_vendor, wait_for};
use crate::sweep::{customers_without_subscriptions, list};

on_both_backends!(
    a_grant_arrives_by_webhook_and_usage_burns_it_down_exactly,
    grants_burn_in_priority_and_expiry_order_and_an_expired_one_stops_counting,
    a_voided_grant_reduces_the_balance,
    concurrent_check_and_record_never_take_credits_below_zero,
    the_credits_ledger_paginates_newest_first,
    a_grant_arrives_by_backfill_and_a_fake_without_credit_grants_breaks_nothing,
);

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A credit grant of `amount` (`{"type": "monetary", ...}` or custom pricing unit).
pub(crate) fn grant(id: &str, cus: &str, amount: Value, fields: Value) -> Value {
    let mut g = json!({"id": id, "object": "billing.credit_grant", "customer": cus,
        "amount": amount, "applicability_config": {"scope": {"price_type": "metered"}},
        "category": "paid", "created": now() - 7200, "effective_at": now() - 7200,
        "expires_at": null, "voided_at": null, "priority": 50, "livemode": false,
        "metadata": {}, "name": null, "test_clock": null, "updated": now() - 7200});
    for (k, v) in fields.as_object().unwrap() {
        g[k] = v.clone();
    }
    g
}

pub(crate) fn usd(cents: i64) -> Value {
    json!({"type": "monetary", "monetary": {"currency": "usd", "value": cents}})
}

fn credits(value: &str) -> Value {
    json!({"type": "custom_pricing_unit", "custom_pricing_unit": {"value": value}})
}

/// Delivers a grant event and waits until the tenant's ledger shows its state (voided or not).
pub(crate) async fn deliver_grant(
    app: &TestApp,
    tenant: &str,
    event_type: &str,
    created: i64,
    object: Value,
) {
    let id = format!("evt_{}", uuid::Uuid::new_v4().simple());
    app.deliver(&event(&id, event_type, created, object.clone()))
        .await;
    let voided = !object["voided_at"].is_null();
    wait_for("the grant applied", || async {
        let ledger = app
            .get_json(&format!("/v1/tenants/{tenant}/credits?limit=100"))
            .await;
        ledger["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == object["id"] && e["voided_at"].is_null() != voided)
    })
    .await;
}

async fn record(app: &TestApp, tenant: &str, feature: &str, quantity: Value, id: &str) -> Value {
    let body = json!({"feature": feature, "quantity": quantity, "record": {"id": id}});
    app.check_body(tenant, body).await
}

async fn record_at(app: &TestApp, tenant: &str, quantity: i64, id: &str, at: i64) -> Value {
    let timestamp = chrono::DateTime::from_timestamp(at, 0)
        .unwrap()
        .to_rfc3339();
    let body = json!({"feature": "ai_tokens", "quantity": quantity,
        "record": {"id": id, "timestamp": timestamp}});
    app.check_body(tenant, body).await
}

/// The tenant's balance in `unit` from `GET .../credits`.
async fn balance(app: &TestApp, tenant: &str, unit: &str) -> Value {
    let view = app.get_json(&format!("/v1/tenants/{tenant}/credits")).await;
    let balances = view["balances"].as_array().unwrap();
    balances
        .iter()
        .find(|b| b["unit"] == unit)
        .cloned()
        .unwrap_or_else(|| panic!("no {unit} balance in {view}"))
}

async fn a_grant_arrives_by_webhook_and_usage_burns_it_down_exactly(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, "gpu", "cus_gpu", json!({})).await;
    let refused = record(&app, "gpu", "gpu_minutes", json!(1), "before").await;
    assert_eq!(refused["reason"], "insufficient_credits", "{refused}");
    assert_eq!(refused["recorded"], false);

    // $1.00: 100 cents, burned at 0.0167 cents per GPU second.
    let g = grant("credgr_gpu", "cus_gpu", usd(100), json!({}));
    deliver_grant(&app, "gpu", "billing.credit_grant.created", now(), g).await;
    let first = record(&app, "gpu", "gpu_minutes", json!(3), "r1").await;
    assert_eq!(first["allowed"], true, "{first}");
    assert_eq!(first["recorded"], true);
    assert_eq!(first["credits"]["cost"], "0.0501", "0.0167 × 3, exactly");
    assert_eq!(first["credits"]["balance"]["available"], "99.9499");
    assert_eq!(first["remaining"], "99.9499");
    // Fractions of a fraction: never rounded away.
    record(&app, "gpu", "gpu_minutes", json!("0.5"), "r2").await;
    for i in 0..3 {
        record(&app, "gpu", "gpu_minutes", json!(1), &format!("r3-{i}")).await;
    }
    // 3 + 0.5 + 3 = 6.5 seconds: 0.10855 cents.
    let b = balance(&app, "gpu", "usd").await;
    assert_eq!(
        b,
        json!({"unit": "usd", "granted": "100", "burned": "0.10855", "available": "99.89145"})
    );
    let view = app.get_json("/v1/tenants/gpu/entitlements").await;
    assert_eq!(
        view["credits"],
        json!([{"unit": "credits", "granted": "0", "burned": "0", "available": "0"}, b])
    );

    // A repeated record id is not burned twice.
    let again = record(&app, "gpu", "gpu_minutes", json!(3), "r1").await;
    assert_eq!(
        (again["allowed"].clone(), again["recorded"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(balance(&app, "gpu", "usd").await["available"], "99.89145");
    // What is left covers 5,981 seconds (99.8827 cents), not 5,982 (99.8994).
    let too_much = record(&app, "gpu", "gpu_minutes", json!(5982), "big").await;
    assert_eq!(too_much["reason"], "insufficient_credits", "{too_much}");
    let fits = app
        .check_body("gpu", json!({"feature": "gpu_minutes", "quantity": 5981}))
        .await;
    assert_eq!(fits["allowed"], true, "{fits}");
    app.stop().await;
}

async fn grants_burn_in_priority_and_expiry_order_and_an_expired_one_stops_counting(
    backend: Backend,
) {
    let app = service(backend).await;
    onboard(&app, "order", "cus_order", json!({})).await;
    let t0 = now() - 3600;
    let grants = [
        // First by priority and the earliest expiry; expires half an hour in.
        grant(
            "credgr_a",
            "cus_order",
            credits("10"),
            json!({"priority": 10, "effective_at": t0, "expires_at": t0 + 1800}),
        ),
        // Same priority, expires later: second.
        grant(
            "credgr_b",
            "cus_order",
            credits("5"),
            json!({"priority": 10, "effective_at": t0, "expires_at": now() + 3600}),
        ),
        // The default priority: last.
        grant(
            "credgr_c",
            "cus_order",
            credits("100"),
            json!({"effective_at": t0}),
        ),
        // Another unit: never burned by tokens.
        grant(
            "credgr_usd",
            "cus_order",
            usd(500),
            json!({"priority": 1, "effective_at": t0}),
        ),
    ];
    for g in grants {
        deliver_grant(&app, "order", "billing.credit_grant.created", now(), g).await;
    }
    // 12 tokens while A is usable: 10 from A, 2 from B.
    assert_eq!(
        record_at(&app, "order", 12, "u1", t0 + 60).await["allowed"],
        true
    );
    // After A expired: 4 tokens, 3 from B and 1 from C.
    assert_eq!(
        record_at(&app, "order", 4, "u2", t0 + 2400).await["allowed"],
        true
    );
    let b = balance(&app, "order", "credits").await;
    assert_eq!(
        b,
        json!({"unit": "credits", "granted": "105", "burned": "6", "available": "99"})
    );
    let ledger = app.get_json("/v1/tenants/order/credits?limit=100").await;
    let burned_of = |id: &str| {
        let entry = ledger["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .unwrap()
            .clone();
        (
            entry["burned"].as_str().unwrap().to_owned(),
            entry["status"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(burned_of("credgr_a"), ("10".into(), "expired".into()));
    assert_eq!(burned_of("credgr_b"), ("5".into(), "active".into()));
    assert_eq!(burned_of("credgr_c"), ("1".into(), "active".into()));
    assert_eq!(burned_of("credgr_usd"), ("0".into(), "active".into()));
    // Usage before any grant took effect burns none of them.
    let early = record_at(&app, "order", 1, "u0", t0 - 60).await;
    assert_eq!(early["reason"], "insufficient_credits", "{early}");
    app.stop().await;
}

async fn a_voided_grant_reduces_the_balance(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, "void", "cus_void", json!({})).await;
    let kept = grant(
        "credgr_kept",
        "cus_void",
        credits("7"),
        json!({"priority": 60}),
    );
    let voided = grant("credgr_void", "cus_void", credits("50"), json!({}));
    deliver_grant(&app, "void", "billing.credit_grant.created", now(), kept).await;
    deliver_grant(
        &app,
        "void",
        "billing.credit_grant.created",
        now(),
        voided.clone(),
    )
    .await;
    // A minute ago, so that the void (at a whole second) comes after it.
    assert_eq!(
        record_at(&app, "void", 10, "t1", now() - 60).await["allowed"],
        true
    );
    assert_eq!(balance(&app, "void", "credits").await["available"], "47");

    let mut update = voided;
    update["voided_at"] = json!(now());
    deliver_grant(
        &app,
        "void",
        "billing.credit_grant.updated",
        now() + 1,
        update,
    )
    .await;
    // The 10 burned before the void stay burned from it; its 40 left are gone.
    let b = balance(&app, "void", "credits").await;
    assert_eq!(
        b,
        json!({"unit": "credits", "granted": "7", "burned": "0", "available": "7"})
    );
    let refused = record(&app, "void", "ai_tokens", json!(8), "t2").await;
    assert_eq!(refused["reason"], "insufficient_credits", "{refused}");
    assert_eq!(
        record(&app, "void", "ai_tokens", json!(7), "t3").await["allowed"],
        true
    );
    app.stop().await;
}

async fn concurrent_check_and_record_never_take_credits_below_zero(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, "burst", "cus_burst", json!({})).await;
    let g = grant("credgr_burst", "cus_burst", credits("10"), json!({}));
    deliver_grant(&app, "burst", "billing.credit_grant.created", now(), g).await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let requests: Vec<_> = (0..5)
            .map(|i| {
                app.v1(
                    reqwest::Method::POST,
                    "/v1/tenants/burst/entitlements/check",
                )
                .json(&json!({"feature": "ai_tokens", "record": {"id": format!("w{worker}-{i}")}}))
            })
            .collect();
        tasks.spawn(async move {
            let mut allowed = 0;
            for request in requests {
                let answer: Value = request.send().await.unwrap().json().await.unwrap();
                if answer["allowed"] == true {
                    allowed += 1;
                } else {
                    assert_eq!(answer["reason"], "insufficient_credits", "{answer}");
                }
            }
            allowed
        });
    }
    let allowed: i32 = tasks.join_all().await.into_iter().sum();
    assert_eq!(allowed, 10, "exactly the credits, never more");
    let b = balance(&app, "burst", "credits").await;
    assert_eq!(
        b,
        json!({"unit": "credits", "granted": "10", "burned": "10", "available": "0"})
    );
    app.stop().await;
}

async fn the_credits_ledger_paginates_newest_first(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, "book", "cus_book", json!({})).await;
    let t0 = now() - 600;
    let g = grant(
        "credgr_book",
        "cus_book",
        credits("100"),
        json!({"effective_at": t0}),
    );
    deliver_grant(&app, "book", "billing.credit_grant.created", now(), g).await;
    for i in 0..5 {
        assert_eq!(
            record_at(&app, "book", i + 1, &format!("b{i}"), t0 + 10 * (i + 1)).await["allowed"],
            true
        );
    }
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("&cursor={c}"));
        let page = app
            .get_json(&format!("/v1/tenants/book/credits?limit=2{query}"))
            .await;
        pages += 1;
        for entry in page["data"].as_array().unwrap() {
            ids.push(entry["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(ids, ["b4", "b3", "b2", "b1", "b0", "credgr_book"]);
    assert_eq!(pages, 3);
    let page = app.get_json("/v1/tenants/book/credits?limit=1").await;
    assert_eq!(
        page["data"][0],
        json!({"type": "burn", "id": "b4", "at": page["data"][0]["at"],
        "unit": "credits", "amount": "5", "feature": "ai_tokens", "meter": "tokens", "quantity": "5"})
    );
    let bad = app
        .v1(reqwest::Method::GET, "/v1/tenants/book/credits?cursor=nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let unknown = app
        .v1(reqwest::Method::GET, "/v1/tenants/nobody/credits")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    app.stop().await;
}

async fn a_grant_arrives_by_backfill_and_a_fake_without_credit_grants_breaks_nothing(
    backend: Backend,
) {
    // Knows every customer `cus_<n>` (tenant `t<n>`), and no subscription.
    let (vendor, _) = customers_without_subscriptions().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers"))
        .respond_with(list(vec![customer("cus_7", "t7")]))
        .mount(&vendor)
        .await;
    let g = grant("credgr_bf", "cus_7", credits("25"), json!({}));
    let grants = Mock::given(method("GET"))
        .and(path("/v1/billing/credit_grants"))
        .respond_with(list(vec![g]))
        .mount_as_scoped(&vendor)
        .await;
    // Every other list answers 404, as a fake lacking them would.
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        crate::helpers::use_test_catalog(s);
        s.stripe.refetch = false;
    })
    .await;
    let state = AppState::build(app.settings.clone()).await.expect("state");
    let client = state.vendor.clone().unwrap();
    let report = billsync::sync::backfill::run(&state.db, client.clone(), &state.applier())
        .await
        .unwrap();
    assert!(
        report
            .kinds
            .iter()
            .any(|(k, listed, _)| k.as_str() == "credit_grant" && *listed == 1),
        "{report:?}"
    );
    assert_eq!(balance(&app, "t7", "credits").await["available"], "25");
    assert_eq!(
        record(&app, "t7", "ai_tokens", json!(25), "all").await["allowed"],
        true
    );
    assert_eq!(balance(&app, "t7", "credits").await["available"], "0");

    // Now the fake lacks credit grants: backfill skips the kind, the sweep still passes.
    drop(grants);
    let report = billsync::sync::backfill::run(&state.db, client.clone(), &state.applier())
        .await
        .unwrap();
    assert!(
        report
            .unsupported
            .iter()
            .any(|k| k.as_str() == "credit_grant"),
        "{report:?}"
    );
    state
        .sweep(client)
        .step()
        .await
        .expect("a sweep pass despite the 404");
    let listed = vendor
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            r.url.path() == "/v1/billing/credit_grants"
                && r.url.query().unwrap_or_default().contains("customer=cus_7")
        })
        .count();
    assert_eq!(listed, 1, "the sweep asked for the customer's grants once");
    assert_eq!(balance(&app, "t7", "credits").await["available"], "0");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_credits_hold_across_replicas() {
    let a = service(Backend::Postgres).await;
    let b = a.replica().await;
    onboard(&a, "pair", "cus_pair", json!({})).await;
    let g = grant("credgr_pair", "cus_pair", credits("1000"), json!({}));
    deliver_grant(&a, "pair", "billing.credit_grant.created", now(), g).await;
    // 1,000 credits: exactly ten records of 100 fit, whichever replica takes them.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let app = if i % 2 == 0 { &a } else { &b };
        let request = app
            .v1(reqwest::Method::POST, "/v1/tenants/pair/entitlements/check")
            .json(&json!({"feature": "ai_tokens", "quantity": 100, "record": {"id": format!("r{i}")}}));
        tasks.spawn(async move {
            let answer: Value = request.send().await.unwrap().json().await.unwrap();
            (answer["allowed"] == true, answer)
        });
    }
    let answers = tasks.join_all().await;
    let allowed = answers.iter().filter(|(allowed, _)| *allowed).count();
    assert_eq!(allowed, 10, "exactly the credits, never more: {answers:?}");
    for app in [&a, &b] {
        assert_eq!(balance(app, "pair", "credits").await["available"], "0");
    }
    b.stop().await;
    a.stop().await;
}
