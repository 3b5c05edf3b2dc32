//! The routes the console needs: `GET /v1/tenants` (search, pages, scoped keys) and
//! `POST /v1/sync/events/{event_id}/retry`.

use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    Backend, TestApp, customer, error_of, event, on_both_backends, take_webhooks, use_vendor,
    wait_for,
};

on_both_backends!(
    tenants_are_found_by_id_name_or_email_prefix_a_page_at_a_time,
    a_scoped_key_finds_only_its_tenants,
    a_failed_event_is_retried_now_on_request,
);

const SCOPED_KEY: &str = "scoped-console-key-0123456789";

fn ids(page: &Value) -> Vec<&str> {
    page["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|t| t["tenant_id"].as_str().expect("tenant_id"))
        .collect()
}

async fn seed(app: &TestApp) {
    for (id, name, email) in [
        ("acme", "Acme Inc.", "billing@acme.example"),
        ("acme-labs", "Acme Labs", "finance@labs.example"),
        ("globex", "Globex", "ap@globex.example"),
        ("initech", "Initech", "Billing@initech.example"),
        ("umbrella", "Umbrella Corp", "money@umbrella.example"),
    ] {
        let response = app
            .put_tenant(id, json!({"name": name, "email": email}))
            .await;
        assert_eq!(response.status(), 201);
    }
}

async fn tenants_are_found_by_id_name_or_email_prefix_a_page_at_a_time(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    seed(&app).await;
    let find = |q: &str| format!("/v1/tenants?q={}", urlencode(q));

    assert_eq!(
        ids(&app.get_json(&find("acme")).await),
        ["acme", "acme-labs"]
    );
    assert_eq!(ids(&app.get_json(&find("UMBRELLA c")).await), ["umbrella"]);
    assert_eq!(
        ids(&app.get_json(&find("billing@")).await),
        ["acme", "initech"],
        "email, ignoring case"
    );
    assert_eq!(
        ids(&app.get_json(&find("ap@globex.example")).await),
        ["globex"]
    );
    assert!(ids(&app.get_json(&find("nobody")).await).is_empty());

    let mut seen = Vec::new();
    let mut next = Some("/v1/tenants?limit=2".to_owned());
    while let Some(url) = next {
        let page = app.get_json(&url).await;
        assert!(page["data"].as_array().unwrap().len() <= 2);
        seen.extend(ids(&page).into_iter().map(str::to_owned));
        next = page["next_cursor"]
            .as_str()
            .map(|c| format!("/v1/tenants?limit=2&cursor={c}"));
    }
    assert_eq!(seen, ["acme", "acme-labs", "globex", "initech", "umbrella"]);
    let page = app.get_json("/v1/tenants?q=a&limit=1").await;
    assert_eq!(ids(&page), ["acme"]);
    assert_eq!(page["next_cursor"], "acme");

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=%2F%2F", "cursor"),
        ("q=%01", "q"),
    ] {
        let response = app
            .v1(Method::GET, &format!("/v1/tenants?{query}"))
            .send()
            .await
            .unwrap();
        let (status, code, got) = error_of(response).await;
        assert_eq!(
            (status, code.as_str(), got.as_deref()),
            (400, "invalid_value", Some(field))
        );
    }
    app.stop().await;
}

fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn a_scoped_key_finds_only_its_tenants(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.api.tenant_keys = vec![(
            billsync::config::key_digest(SCOPED_KEY).unwrap(),
            vec!["globex".to_owned(), "acme-labs".to_owned()],
        )];
    })
    .await;
    seed(&app).await;
    let scoped = |url: &str| app.client.get(app.url(url)).bearer_auth(SCOPED_KEY).send();
    let all: Value = scoped("/v1/tenants").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&all), ["acme-labs", "globex"]);
    let found: Value = scoped("/v1/tenants?q=acme")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&found), ["acme-labs"]);
    let paged: Value = scoped("/v1/tenants?limit=1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&paged), ["acme-labs"]);
    assert_eq!(paged["next_cursor"], "acme-labs");
    let retry = app
        .client
        .post(app.url("/v1/sync/events/evt_any/retry"))
        .bearer_auth(SCOPED_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(retry).await.1, "forbidden");
    app.stop().await;
}

async fn a_failed_event_is_retried_now_on_request(backend: Backend) {
    let vendor = MockServer::start().await;
    let failing = || {
        Mock::given(method("GET"))
            .and(path("/v1/customers/cus_flaky"))
            .respond_with(ResponseTemplate::new(500))
    };
    failing().mount(&vendor).await;
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.stripe.max_retries = 0;
        s.sync.max_retry_delay = std::time::Duration::from_secs(3600);
    })
    .await;
    let created = event(
        "evt_flaky",
        "customer.created",
        1_700_000_000,
        customer("cus_flaky", "flaky"),
    );
    app.deliver(&created).await;
    // After two failures the next automatic attempt is seconds away: the retry below is ours.
    wait_for("two failed attempts", || async {
        let status = app.get_json("/v1/sync/status").await;
        status["failed_events"][0]["attempts"].as_i64() >= Some(2)
    })
    .await;
    vendor.reset().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_flaky"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer("cus_flaky", "flaky")))
        .mount(&vendor)
        .await;
    let retried = app
        .v1(Method::POST, "/v1/sync/events/evt_flaky/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 202);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(retried["event_id"], "evt_flaky");
    assert_eq!(retried["outcome"], "failed");
    wait_for("the retried event to apply", || async {
        app.get_tenant("flaky").await.status() == 200
    })
    .await;
    wait_for(
        "the status to name the poller among this replica's jobs",
        || async {
            let status = app.get_json("/v1/sync/status").await;
            status["this_replica"]["id"].is_string()
                && status["this_replica"]["jobs"]
                    .as_array()
                    .is_some_and(|jobs| jobs.iter().any(|j| j == "poller"))
        },
    )
    .await;
    let found = app.get_json("/v1/tenants?q=cus_fl").await;
    assert_eq!(ids(&found), ["flaky"], "found by its Stripe customer id");

    let again = app
        .v1(Method::POST, "/v1/sync/events/evt_flaky/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(again).await,
        (409, "event_not_failed".into(), None)
    );
    let unknown = app
        .v1(Method::POST, "/v1/sync/events/evt_nope/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(unknown).await,
        (404, "event_not_found".into(), None)
    );
    let odd = app
        .v1(Method::POST, "/v1/sync/events/evt%00nul/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(odd).await, (404, "event_not_found".into(), None));
    app.stop().await;
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_can_be_turned_off() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response.headers()[name]
                .to_str()
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        let csp = header("content-security-policy");
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
        assert!(csp.contains("frame-ancestors 'none'"));
        assert_eq!(header("x-frame-options"), "DENY");
        let body = response.text().await.unwrap();
        assert!(!body.contains(crate::helpers::API_KEY));
        if kind == "text/html" {
            let inline = [
                "<script>",
                "onclick=",
                "onsubmit=",
                "onload=",
                "javascript:",
            ];
            assert!(!inline.iter().any(|i| body.contains(i)), "no inline script");
        }
    }
    // The key travels only in the Authorization header: a cookie carries nothing, and no
    // cross-origin request is let in (no CORS headers), so a forged request is a 401.
    let forged = app
        .client
        .post(app.url("/v1/reconciliations"))
        .header("cookie", format!("key={}", crate::helpers::API_KEY))
        .header("origin", "https://evil.example")
        .header("content-type", "application/json")
        .body(r#"{"from":"2026-01-01","to":"2026-02-01"}"#)
        .send()
        .await
        .unwrap();
    assert!(
        forged
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert_eq!(error_of(forged).await.1, "unauthorized");
    let preflight = app
        .client
        .request(Method::OPTIONS, app.url("/v1/reconciliations"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert!(
        preflight
            .headers()
            .get("access-control-allow-headers")
            .is_none()
    );
    app.stop().await;

    let off = TestApp::spawn_with(Backend::Sqlite, |s| s.console.enabled = false).await;
    let response = off.client.get(off.url("/console")).send().await.unwrap();
    assert_eq!(
        error_of(response).await,
        (404, "route_not_found".into(), None)
    );
    off.stop().await;
}
