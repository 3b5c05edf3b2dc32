//! Health, readiness, metrics, auth, and the JSON shape of router-level errors.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{
    API_KEY, Backend, TestApp, drop_postgres_database, error_of, on_both_backends,
};

on_both_backends!(
    health_and_readiness_answer_without_a_key,
    readiness_says_whether_the_vendor_is_configured,
    v1_needs_a_configured_bearer_key,
    v1_is_closed_when_no_keys_are_configured,
    unknown_routes_and_methods_get_json_errors,
    every_response_carries_a_request_id,
    metrics_count_requests_by_route_and_status,
);

async fn health_and_readiness_answer_without_a_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["database"]["ok"], true);
    let backend_name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(ready["database"]["backend"], backend_name);
    app.stop().await;
}

async fn readiness_says_whether_the_vendor_is_configured(backend: Backend) {
    let off = TestApp::spawn(backend).await;
    let ready: Value = off
        .client
        .get(off.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["vendor"]["configured"], false);
    assert!(
        ready["vendor"]["message"]
            .as_str()
            .unwrap()
            .contains("vendor sync is off")
    );
    off.stop().await;

    let on = TestApp::spawn_with(backend, |s| {
        s.stripe.api_key = Some(billsync::config::Secret::new("sk_test_readiness"));
        s.stripe.api_base = "http://127.0.0.1:9".to_owned();
    })
    .await;
    let ready: Value = on
        .client
        .get(on.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["vendor"]["configured"], true);
    assert_eq!(ready["vendor"]["api_base"], "http://127.0.0.1:9");
    assert!(
        !ready.to_string().contains("sk_test_readiness"),
        "the key must not be shown"
    );
    on.stop().await;
}

async fn v1_needs_a_configured_bearer_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.url("/v1/tenants/acme");

    let missing = app.client.get(&url).send().await.unwrap();
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_eq!(error_of(missing).await.1, "unauthorized");

    for header in [
        "Bearer wrong-key-0123456789",
        "Basic dXNlcjpwYXNz",
        "Bearer ",
        API_KEY,
    ] {
        let response = app
            .client
            .get(&url)
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        let (status, code, _) = error_of(response).await;
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{header}");
    }
    let authorised = app
        .client
        .get(&url)
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        authorised.status(),
        404,
        "past auth, the tenant is simply unknown"
    );
    app.stop().await;
}

async fn v1_is_closed_when_no_keys_are_configured(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.api.key_digests.clear()).await;
    let response = app
        .v1(Method::GET, "/v1/tenants/acme")
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(response).await;
    assert_eq!((status, code.as_str()), (401, "unauthorized"));
    app.stop().await;
}

async fn unknown_routes_and_methods_get_json_errors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, code, _) =
        error_of(app.client.get(app.url("/nowhere")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (404, "route_not_found"));

    let response = app
        .v1(Method::DELETE, "/v1/tenants/acme")
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("allow"));
    let (status, code, _) = error_of(response).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    app.stop().await;
}

async fn every_response_carries_a_request_id(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let fresh = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert!(!fresh.headers()["x-request-id"].is_empty());
    let echoed = app
        .client
        .get(app.url("/nowhere"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-me-42");
    app.stop().await;
}

async fn metrics_count_requests_by_route_and_status(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for _ in 0..3 {
        app.get_tenant("ghost").await;
    }
    app.client
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text().await.unwrap();
    assert!(text.contains("billsync_build_info{version=\""), "{text}");
    assert!(
        text.contains(r#"billsync_http_requests_total{method="GET",route="/v1/tenants/{tenant_id}",status="404"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"route="unmatched",status="404"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"billsync_http_request_duration_seconds_count{method="GET",route="/v1/tenants/{tenant_id}",status="404"} 3"#),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_and_writes_get_503_when_postgres_goes_away() {
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        s.database.connect_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let crate::helpers::TestDatabase::Postgres { admin_url, name } = &app.db else {
        unreachable!("spawned on PostgreSQL")
    };
    drop_postgres_database(admin_url, name)
        .await
        .expect("drop the database under the service");

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["database"]["ok"], false);

    let (status, code, _) = error_of(app.put_tenant("late", serde_json::json!({})).await).await;
    assert_eq!((status, code.as_str()), (503, "database_unavailable"));
    app.stop().await;
}

#[tokio::test]
async fn a_second_serve_on_one_sqlite_file_is_refused_with_a_message() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = billsync::app::run(
        app.settings.clone(),
        listener,
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let message = second.expect_err("a second serve is refused").to_string();
    assert!(
        message.contains("another billsync serve") && message.contains("PostgreSQL"),
        "{message}"
    );
    // Once the first has stopped, the file is free again.
    let app = app.restart().await;
    assert_eq!(app.get_tenant("nobody").await.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn each_key_is_held_to_its_rate_limit() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.api.rate_limit = 1;
        s.api
            .key_digests
            .push(billsync::config::key_digest("another-key-0123456789").unwrap());
    })
    .await;
    // One request a second: of twenty in a row, the first goes through and most do not.
    let mut limited = None;
    for i in 0..20 {
        let response = app.get_tenant("nobody").await;
        if i == 0 {
            assert_eq!(response.status(), 404);
        } else if response.status() == 429 {
            limited = Some(response);
            break;
        }
    }
    let limited = limited.expect("a request over the limit is refused");
    assert!(
        limited.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another key has its own budget; unauthenticated routes none.
    let other = app
        .client
        .get(app.url("/v1/tenants/nobody"))
        .bearer_auth("another-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.stop().await;
}
