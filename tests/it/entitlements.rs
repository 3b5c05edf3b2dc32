//! Entitlement checks: plans, metadata overrides, statuses, isolation, and check-and-record.

use serde_json::{Value, json};

use crate::helpers::{
    Backend, TestApp, customer, error_of, event, on_both_backends, take_webhooks, use_test_catalog,
    wait_for,
};

on_both_backends!(
    a_bad_record_timestamp_is_refused_whatever_the_answer,
    the_catalog_plan_grants_features_and_quotas_that_usage_uses_up,
    product_metadata_sets_the_quota_and_a_customer_override_wins,
    subscription_statuses_decide_access,
    unknown_tenants_get_an_answer_and_bad_bodies_a_400,
    a_key_scoped_to_one_tenant_sees_no_other,
    concurrent_check_and_record_never_exceed_a_hard_limit,
    never_synced_state_fails_closed_unless_the_feature_fails_open,
    many_checks_go_in_one_batch,
    the_answer_changes_when_a_past_due_grace_runs_out,
);

/// A subscription on `price` whose period started `started_days_ago`.
fn live_subscription(
    id: &str,
    cus: &str,
    price: &str,
    status: &str,
    started_days_ago: i64,
) -> Value {
    let start = chrono::Utc::now().timestamp() - started_days_ago * 86_400;
    json!({"id": id, "object": "subscription", "customer": cus, "status": status, "created": start,
        "cancel_at_period_end": false, "items": {"data": [{"id": format!("si_{id}"), "quantity": 1,
        "price": {"id": price, "object": "price"}, "current_period_start": start, "current_period_end": start + 30 * 86_400}]}})
}

/// No catalog file: no meters, no plans, no free plan.
fn without_catalog(settings: &mut billsync::config::Settings) {
    settings.catalog.path = std::env::temp_dir().join("billsync-no-such-catalog.toml");
    settings.catalog.required = false;
}

pub(crate) async fn service(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        take_webhooks(s);
        s.stripe.refetch = false;
    })
    .await
}

/// Delivers a customer for `tenant` and waits until the tenant exists.
pub(crate) async fn onboard(app: &TestApp, tenant: &str, cus: &str, metadata: Value) {
    let mut c = customer(cus, tenant);
    for (k, v) in metadata.as_object().unwrap() {
        c["metadata"][k] = v.clone();
    }
    app.deliver(&event(
        &format!("evt_{cus}_{}", uuid::Uuid::new_v4().simple()),
        "customer.updated",
        chrono::Utc::now().timestamp(),
        c,
    ))
    .await;
    wait_for("the tenant", || async {
        app.get_tenant(tenant).await.status() == 200
    })
    .await;
}

async fn subscribe(app: &TestApp, subscription: Value) {
    let created = chrono::Utc::now().timestamp();
    let id = format!("evt_sub_{}", uuid::Uuid::new_v4().simple());
    app.deliver(&event(
        &id,
        "customer.subscription.updated",
        created,
        subscription,
    ))
    .await;
    wait_for("the subscription applied", || async {
        app.get_json("/v1/sync/status").await["inbox"]["pending"] == 0
    })
    .await;
}

async fn check(app: &TestApp, tenant: &str, body: Value) -> Value {
    app.check_body(tenant, body).await
}

async fn post_usage(app: &TestApp, events: Value) -> Value {
    let response = app
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn the_catalog_plan_grants_features_and_quotas_that_usage_uses_up(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, "pro", "cus_pro", json!({})).await;
    subscribe(
        &app,
        live_subscription("sub_pro", "cus_pro", "price_pro", "active", 1),
    )
    .await;

    let view = app.get_json("/v1/tenants/pro/entitlements").await;
    assert_eq!(view["plan"], "price_pro");
    assert_eq!(view["status"], "active");
    assert_eq!(
        view["features"]["sso"],
        json!({"kind": "boolean", "enabled": true})
    );
    assert_eq!(view["features"]["api_calls"]["limit"], 1000);
    assert_eq!(view["features"]["api_calls"]["meter"], "calls");
    assert!(view["as_of"].is_string());

    assert_eq!(
        check(&app, "pro", json!({"feature": "sso"})).await["reason"],
        "ok"
    );
    assert_eq!(
        check(&app, "pro", json!({"feature": "payroll"})).await["reason"],
        "feature_not_in_plan"
    );
    post_usage(
        &app,
        json!([{"id": "u1", "tenant_id": "pro", "meter": "calls", "quantity": 995}]),
    )
    .await;
    let near = check(&app, "pro", json!({"feature": "api_calls", "quantity": 5})).await;
    assert_eq!(
        (
            near["allowed"].as_bool(),
            near["used"].as_str(),
            near["remaining"].as_str()
        ),
        (Some(true), Some("995"), Some("5"))
    );
    let over = check(&app, "pro", json!({"feature": "api_calls", "quantity": 6})).await;
    assert_eq!(
        (
            over["allowed"].as_bool(),
            over["reason"].as_str(),
            over["limit"].as_i64()
        ),
        (Some(false), Some("limit_exceeded"), Some(1000))
    );
    app.stop().await;
}

async fn product_metadata_sets_the_quota_and_a_customer_override_wins(backend: Backend) {
    let app = service(backend).await;
    let product = |limit: &str| json!({"id": "prod_x", "object": "product", "metadata": {"billsync.api_calls": limit, "billsync.sso": "true"}});
    let now = chrono::Utc::now().timestamp();
    app.deliver(&event(
        "evt_p1",
        "product.created",
        now - 10,
        product("5000"),
    ))
    .await;
    app.deliver(&event(
        "evt_pr1",
        "price.created",
        now - 10,
        json!({"id": "price_meta", "object": "price", "product": "prod_x",
        "metadata": {"billsync.exports": "not-a-value"}}),
    ))
    .await;
    onboard(&app, "meta", "cus_meta", json!({})).await;
    subscribe(
        &app,
        live_subscription("sub_meta", "cus_meta", "price_meta", "active", 1),
    )
    .await;
    assert_eq!(limit(&app).await, 5000);
    assert_eq!(
        check(&app, "meta", json!({"feature": "exports"})).await["reason"],
        "feature_not_in_plan",
        "an invalid value is ignored"
    );
    let reported = app.get_json("/v1/sync/status").await["invalid_metadata"]["meta"].clone();
    assert!(
        reported[0]
            .as_str()
            .is_some_and(|p| p.contains("billsync.exports")),
        "and reported: {reported}"
    );

    app.deliver(&event(
        "evt_p2",
        "product.updated",
        now - 5,
        product("7000"),
    ))
    .await;
    wait_for("the product edit", || async { limit(&app).await == 7000 }).await;

    onboard(
        &app,
        "meta",
        "cus_meta",
        json!({"billsync.api_calls": "unlimited"}),
    )
    .await;
    wait_for("the customer override", || async {
        limit(&app).await == Value::Null
    })
    .await;
    let unlimited = check(
        &app,
        "meta",
        json!({"feature": "api_calls", "quantity": 1_000_000}),
    )
    .await;
    assert_eq!(unlimited["allowed"], true);
    app.stop().await;
}

async fn limit(app: &TestApp) -> Value {
    check(app, "meta", json!({"feature": "api_calls"})).await["limit"].clone()
}

async fn subscription_statuses_decide_access(backend: Backend) {
    let app = service(backend).await;
    let cases = [
        ("trialing", 1, "ok", 1000),
        ("past_due", 1, "ok", 1000),
        ("past_due", 5, "ok", 10),
        ("canceled", 1, "ok", 10),
        ("unpaid", 1, "ok", 10),
    ];
    for (i, (status, days, reason, limit)) in cases.into_iter().enumerate() {
        let (tenant, cus) = (format!("st{i}"), format!("cus_st{i}"));
        onboard(&app, &tenant, &cus, json!({})).await;
        subscribe(
            &app,
            live_subscription(&format!("sub_st{i}"), &cus, "price_pro", status, days),
        )
        .await;
        let answer = check(&app, &tenant, json!({"feature": "api_calls"})).await;
        assert_eq!(
            (answer["reason"].as_str(), answer["limit"].as_i64()),
            (Some(reason), Some(limit)),
            "{status} since {days} days"
        );
        let sso = check(&app, &tenant, json!({"feature": "sso"})).await["allowed"].clone();
        assert_eq!(sso, limit == 1000, "{status}: the free plan has no sso");
    }
    app.stop().await;

    // Without a free plan, an inactive subscription grants nothing.
    let app = TestApp::spawn_with(backend, |s| {
        take_webhooks(s);
        s.stripe.refetch = false;
        without_catalog(s);
    })
    .await;
    onboard(&app, "lapsed", "cus_lapsed", json!({})).await;
    subscribe(
        &app,
        live_subscription("sub_l", "cus_lapsed", "price_pro", "canceled", 1),
    )
    .await;
    assert_eq!(
        check(&app, "lapsed", json!({"feature": "api_calls"})).await["reason"],
        "subscription_inactive"
    );
    onboard(&app, "nosub", "cus_nosub", json!({})).await;
    assert_eq!(
        check(&app, "nosub", json!({"feature": "api_calls"})).await["reason"],
        "no_subscription"
    );
    app.stop().await;
}

async fn unknown_tenants_get_an_answer_and_bad_bodies_a_400(backend: Backend) {
    let app = service(backend).await;
    let answer = check(&app, "nobody", json!({"feature": "sso"})).await;
    assert_eq!(
        (answer["allowed"].as_bool(), answer["reason"].as_str()),
        (Some(false), Some("unknown_tenant"))
    );
    let bad = app
        .v1(
            reqwest::Method::POST,
            "/v1/tenants/nobody/entitlements/check",
        )
        .header("content-type", "application/json")
        .body("{\"feature\":")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.1, "invalid_json");
    let bad = app
        .v1(
            reqwest::Method::POST,
            "/v1/tenants/nobody/entitlements/check",
        )
        .json(&json!({"feature": "sso", "quantity": -2}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.2.as_deref(), Some("quantity"));
    app.stop().await;
}

async fn a_key_scoped_to_one_tenant_sees_no_other(backend: Backend) {
    const SCOPED: &str = "scoped-key-for-tenant-a-000";
    let app = TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        s.api.tenant_keys = vec![(
            billsync::config::key_digest(SCOPED).unwrap(),
            vec!["tenant-a".to_owned()],
        )];
    })
    .await;
    for tenant in ["tenant-a", "tenant-b"] {
        assert_eq!(app.put_tenant(tenant, json!({})).await.status(), 201);
    }
    let as_scoped = |method: reqwest::Method, path: &str| {
        app.client
            .request(method, app.url(path))
            .bearer_auth(SCOPED)
    };
    for path in [
        "/v1/tenants/{t}",
        "/v1/tenants/{t}/entitlements",
        "/v1/tenants/{t}/usage?meter=calls",
        "/v1/tenants/{t}/invoices",
        "/v1/tenants/{t}/payments",
        "/v1/tenants/{t}/events",
    ] {
        let own = as_scoped(reqwest::Method::GET, &path.replace("{t}", "tenant-a"))
            .send()
            .await
            .unwrap();
        assert_eq!(own.status(), 200, "{path}");
        let other = as_scoped(reqwest::Method::GET, &path.replace("{t}", "tenant-b"))
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(other).await.0, 404, "{path}");
    }
    let status = as_scoped(reqwest::Method::GET, "/v1/sync/status")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(status).await.0,
        403,
        "sync status names every tenant"
    );
    let put = as_scoped(reqwest::Method::PUT, "/v1/tenants/tenant-b")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 404);
    let check = as_scoped(
        reqwest::Method::POST,
        "/v1/tenants/tenant-b/entitlements/check",
    )
    .json(&json!({"feature": "sso"}))
    .send()
    .await
    .unwrap();
    assert_eq!(check.status(), 404);
    let usage = as_scoped(reqwest::Method::POST, "/v1/usage")
        .json(&json!({"events": [{"id": "x", "tenant_id": "tenant-b", "meter": "calls", "quantity": 1},
                                 {"id": "y", "tenant_id": "tenant-a", "meter": "calls", "quantity": 1}]}))
        .send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(
        (
            usage["accepted"].as_u64(),
            usage["rejected"][0]["code"].as_str()
        ),
        (Some(1), Some("unknown_tenant"))
    );
    app.stop().await;
}

async fn concurrent_check_and_record_never_exceed_a_hard_limit(backend: Backend) {
    let app = service(backend).await;
    onboard(
        &app,
        "race",
        "cus_race",
        json!({"billsync.api_calls": "10"}),
    )
    .await;
    subscribe(
        &app,
        live_subscription("sub_race", "cus_race", "price_pro", "active", 1),
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let requests: Vec<_> = (0..5)
            .map(|i| {
                app.v1(reqwest::Method::POST, "/v1/tenants/race/entitlements/check")
                    .json(&json!({"feature": "api_calls", "record": {"id": format!("w{worker}-{i}")}}))
            })
            .collect();
        tasks.spawn(async move {
            let mut allowed = 0;
            for request in requests {
                let answer: Value = request.send().await.unwrap().json().await.unwrap();
                if answer["allowed"] == true {
                    assert_eq!(answer["recorded"], true);
                    allowed += 1;
                }
            }
            allowed
        });
    }
    let allowed: i32 = tasks.join_all().await.into_iter().sum();
    assert_eq!(allowed, 10, "exactly the limit, never more");
    let final_check = check(&app, "race", json!({"feature": "api_calls"})).await;
    assert_eq!(
        (final_check["used"].as_str(), final_check["reason"].as_str()),
        (Some("10"), Some("limit_exceeded"))
    );
    // A retried record is idempotent: allowed again, counted once.
    let retry = check(
        &app,
        "race",
        json!({"feature": "api_calls", "record": {"id": "w0-0"}}),
    )
    .await;
    let retry_ok = retry["allowed"] == true || retry["reason"] == "limit_exceeded";
    assert!(retry_ok, "{retry}");
    assert_eq!(
        check(&app, "race", json!({"feature": "api_calls"})).await["used"],
        "10"
    );
    app.stop().await;
}

async fn never_synced_state_fails_closed_unless_the_feature_fails_open(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        s.catalog.path = s.catalog.path.clone();
    })
    .await;
    app.put_tenant("fresh", json!({})).await;
    // The test catalog has a free plan: a tenant with no customer gets it.
    assert_eq!(
        check(&app, "fresh", json!({"feature": "api_calls"})).await["limit"],
        10
    );
    app.stop().await;

    let app = TestApp::spawn_with(backend, without_catalog).await;
    app.put_tenant("fresh", json!({})).await;
    let closed = check(&app, "fresh", json!({"feature": "api_calls"})).await;
    assert_eq!(
        (
            closed["allowed"].as_bool(),
            closed["reason"].as_str(),
            closed["stale"].as_bool()
        ),
        (Some(false), Some("no_subscription"), Some(true))
    );
    app.stop().await;
}

async fn many_checks_go_in_one_batch(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, "batch", "cus_batch", json!({})).await;
    subscribe(
        &app,
        live_subscription("sub_b", "cus_batch", "price_pro", "active", 1),
    )
    .await;
    let checks: Vec<Value> = (0..1000)
        .map(|i| match i % 3 {
            0 => json!({"tenant_id": "batch", "feature": "sso"}),
            1 => json!({"tenant_id": "ghost", "feature": "sso"}),
            _ => json!({"tenant_id": "batch", "feature": "api_calls", "quantity": 2000}),
        })
        .collect();
    let answer: Value = app
        .v1(reqwest::Method::POST, "/v1/entitlements/check")
        .json(&json!({"checks": checks}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 1000);
    assert_eq!(
        (
            results[0]["reason"].as_str(),
            results[1]["reason"].as_str(),
            results[2]["reason"].as_str()
        ),
        (Some("ok"), Some("unknown_tenant"), Some("limit_exceeded"))
    );
    assert_eq!(results[1]["tenant_id"], "ghost");
    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"tenant_id": "batch", "feature": "sso"}))
        .collect();
    let refused = app
        .v1(reqwest::Method::POST, "/v1/entitlements/check")
        .json(&json!({"checks": too_many}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(refused).await.1, "too_many_checks");
    app.stop().await;
}

async fn the_answer_changes_when_a_past_due_grace_runs_out(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        take_webhooks(s);
        s.stripe.refetch = false;
        // The period began a day ago: the grace ends two seconds from now.
        s.entitlements.past_due_grace = std::time::Duration::from_secs(86_400 + 2);
    })
    .await;
    onboard(&app, "grace", "cus_grace", json!({})).await;
    subscribe(
        &app,
        live_subscription("sub_g", "cus_grace", "price_pro", "past_due", 1),
    )
    .await;
    assert_eq!(
        check(&app, "grace", json!({"feature": "api_calls"})).await["limit"],
        1000
    );
    // Nothing changes at the vendor; time alone moves the tenant to the free plan.
    wait_for("the grace to run out", || async {
        check(&app, "grace", json!({"feature": "api_calls"})).await["limit"] == 10
    })
    .await;
    app.stop().await;
}

async fn a_bad_record_timestamp_is_refused_whatever_the_answer(backend: Backend) {
    let app = service(backend).await;
    for timestamp in ["", "yesterday", "2026-13-01T00:00:00Z"] {
        let response = app
            .v1(
                reqwest::Method::POST,
                "/v1/tenants/nobody/entitlements/check",
            )
            .json(&json!({"feature": "sso", "record": {"id": "r1", "timestamp": timestamp}}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (
                400,
                "invalid_record".to_owned(),
                Some("record.timestamp".to_owned())
            ),
            "{timestamp:?}"
        );
    }
    app.stop().await;
}
