//! End to end against localstripe, a stateful third-party Stripe fake (PyPI), driven by the
//! official `stripe` SDK: what customer success does in the dashboard reaches the tenant.

use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::helpers::{Backend, TestApp, on_both_backends, venv_bin, wait_for};

on_both_backends!(e2e_a_dashboard_customer_subscription_and_plan_change_reach_the_tenant);

const SECRET: &str = "whsec_e2e_localstripe";

/// localstripe on a free loopback port, killed on drop.
struct LocalStripe {
    child: Child,
    base: String,
}

impl LocalStripe {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(venv_bin("localstripe"))
            .args(["--port", &port.to_string(), "--from-scratch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start localstripe");
        let base = format!("http://127.0.0.1:{port}");
        let client = crate::helpers::http_client();
        wait_for("localstripe to listen", || async {
            client
                .get(format!("{base}/v1/plans"))
                .basic_auth("sk_test_e2e", Some(""))
                .send()
                .await
                .is_ok()
        })
        .await;
        Self { child, base }
    }

    fn flow(&self, args: &[&str]) -> Value {
        let output = Command::new(venv_bin("python"))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/e2e/localstripe_flow.py"
            ))
            .arg(&self.base)
            .args(args)
            .output()
            .expect("python");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("flow prints JSON")
    }
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn check(app: &TestApp, feature: &str) -> Value {
    let response = app
        .v1(
            reqwest::Method::POST,
            "/v1/tenants/e2e-tenant/entitlements/check",
        )
        .json(&serde_json::json!({ "feature": feature }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn tenant(app: &TestApp, id: &str) -> Option<Value> {
    let response = app.get_tenant(id).await;
    (response.status() == 200).then_some(response.json().await.unwrap())
}

async fn e2e_a_dashboard_customer_subscription_and_plan_change_reach_the_tenant(backend: Backend) {
    let stripe = LocalStripe::start().await;
    let app = TestApp::spawn_with(backend, |s| {
        s.stripe.api_key = Some(billsync::config::Secret::new("sk_test_e2e"));
        s.stripe.api_base = stripe.base.clone();
        s.stripe.webhook_secrets = vec![billsync::config::Secret::new(SECRET)];
        s.stripe.legacy_plans = true;
        s.sync.poll_interval = std::time::Duration::from_secs(2);
        s.sync.sweep_interval = std::time::Duration::from_secs(1);
        crate::helpers::use_test_catalog(s);
    })
    .await;
    let registered = app
        .client
        .post(format!("{}/_config/webhooks/billsync", stripe.base))
        .form(&[
            ("url", app.url("/webhooks/stripe")),
            ("secret", SECRET.to_owned()),
        ])
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());

    let created = stripe.flow(&["setup", "e2e-tenant"]);
    wait_for("the subscription on plan_basic", || async {
        tenant(&app, "e2e-tenant").await.is_some_and(|t| {
            t["subscription"]["items"][0]["price"] == "plan_basic"
                && t["subscription"]["status"] == "active"
        })
    })
    .await;
    let seen = tenant(&app, "e2e-tenant").await.unwrap();
    assert_eq!(seen["customer_id"], created["customer"]);
    assert_eq!(seen["subscription"]["id"], created["subscription"]);
    assert_eq!(seen["email"], "e2e-tenant@example.test");

    // The test catalog gives plan_basic 100 API calls and no SSO.
    let api_calls = check(&app, "api_calls").await;
    assert_eq!(
        (api_calls["allowed"].as_bool(), api_calls["limit"].as_i64()),
        (Some(true), Some(100))
    );
    assert_eq!(check(&app, "sso").await["reason"], "feature_not_in_plan");

    // localstripe never emits customer.subscription.updated: the sweep must find the change.
    let sub = created["subscription"].as_str().unwrap();
    let item = created["item"].as_str().unwrap();
    stripe.flow(&["change", sub, item, "plan_pro"]);
    wait_for("the plan change", || async {
        tenant(&app, "e2e-tenant")
            .await
            .is_some_and(|t| t["subscription"]["items"][0]["price"] == "plan_pro")
    })
    .await;

    let events = app
        .get_json("/v1/tenants/e2e-tenant/events?limit=100")
        .await;
    let sources: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["source"].as_str())
        .collect();
    assert!(
        sources.contains(&"sweep"),
        "the plan change came through the sweep: {sources:?}"
    );
    // Webhooks and the poller race for the same events; whichever stores one first wins.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("billsync_webhooks_received_total{outcome="),
        "localstripe's webhooks arrived: {metrics}"
    );
    assert!(
        !metrics.contains("billsync_webhooks_rejected_total"),
        "{metrics}"
    );
    let status = app.get_json("/v1/sync/status").await;
    assert_eq!(status["inbox"]["failed"], 0, "{status}");
    app.stop().await;
}
