//! End to end against localstripe, a stateful third-party Stripe fake (PyPI), driven by the
//! official `stripe` SDK: what customer success does in the dashboard reaches the tenant.

use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::helpers::{API_KEY, Backend, TestApp, on_both_backends, venv_bin, wait_for};

on_both_backends!(
    e2e_a_dashboard_customer_subscription_and_plan_change_reach_the_tenant,
    e2e_self_serve_changes_reach_localstripe_once_and_come_back,
);

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

    /// Registers the service's webhook endpoint, signed with [`SECRET`].
    async fn send_webhooks_to(&self, app: &TestApp) {
        let registered = app
            .client
            .post(format!("{}/_config/webhooks/billsync", self.base))
            .form(&[
                ("url", app.url("/webhooks/stripe")),
                ("secret", SECRET.to_owned()),
            ])
            .send()
            .await
            .unwrap();
        assert!(registered.status().is_success());
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
    stripe.send_webhooks_to(&app).await;
    // A product backend's in-process client: its answers follow the dashboard's changes too.
    let client = billsync_client::Client::connect(&app.url(""), API_KEY, Default::default())
        .await
        .unwrap();

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
    let api_calls = app.check("e2e-tenant", "api_calls").await;
    assert_eq!(
        (api_calls["allowed"].as_bool(), api_calls["limit"].as_i64()),
        (Some(true), Some(100))
    );
    assert_eq!(
        app.check("e2e-tenant", "sso").await["reason"],
        "feature_not_in_plan"
    );
    wait_for("the client to answer for plan_basic", || async {
        client
            .check_in_memory("e2e-tenant", "api_calls", 1.into())
            .limit
            == Some(100)
    })
    .await;

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
    wait_for("the client to answer for plan_pro", || async {
        client
            .check_in_memory("e2e-tenant", "sso", 1.into())
            .allowed
    })
    .await;
    assert_eq!(
        client
            .check_in_memory("e2e-tenant", "api_calls", 1.into())
            .limit,
        Some(1000)
    );
    client.shutdown().await.unwrap();

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
    let metrics = app.metrics().await;
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

/// Sends a change and waits for its command to end; returns the command.
async fn change(app: &TestApp, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut request = app.v1(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202, "{path}");
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/commands/{id}");
    wait_for(&format!("command {id}"), || async {
        app.get_json(&path).await["status"] != "pending"
    })
    .await;
    let command = app.get_json(&path).await;
    assert_eq!(command["status"], "succeeded", "{command}");
    command
}

async fn e2e_self_serve_changes_reach_localstripe_once_and_come_back(backend: Backend) {
    let stripe = LocalStripe::start().await;
    let app = TestApp::spawn_with(backend, |s| {
        s.stripe.api_key = Some(billsync::config::Secret::new("sk_test_e2e"));
        s.stripe.api_base = stripe.base.clone();
        s.stripe.webhook_secrets = vec![billsync::config::Secret::new(SECRET)];
        s.stripe.legacy_plans = true;
        crate::helpers::use_test_catalog(s);
    })
    .await;
    stripe.send_webhooks_to(&app).await;
    stripe.flow(&["plans"]);

    // A new tenant: its customer appears at the vendor, named after it.
    let put = app
        .put_tenant(
            "self-serve",
            serde_json::json!({"name": "Self Serve", "email": "owner@self-serve.test"}),
        )
        .await;
    assert_eq!(put.status(), 201);
    wait_for("the tenant's customer", || async {
        let t = tenant(&app, "self-serve").await.unwrap();
        t["customer_id"].is_string() && t["pending"] == serde_json::json!([])
    })
    .await;
    let customer = tenant(&app, "self-serve").await.unwrap()["customer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let at_vendor = stripe.flow(&["customer", &customer]);
    assert_eq!(at_vendor["metadata"]["tenant_id"], "self-serve");
    assert_eq!(at_vendor["email"], "owner@self-serve.test");
    stripe.flow(&["card", &customer]);

    // Subscribe: the plan's quota applies at once.
    let path = "/v1/tenants/self-serve/subscription";
    let subscribed = change(
        &app,
        reqwest::Method::POST,
        path,
        Some(serde_json::json!({"price": "plan_basic"})),
    )
    .await;
    assert_eq!(
        subscribed["subscription"]["status"], "active",
        "{subscribed}"
    );
    let calls = app.check("self-serve", "api_calls").await;
    assert_eq!(
        (calls["allowed"].as_bool(), calls["limit"].as_i64()),
        (Some(true), Some(100))
    );
    assert_eq!(app.check("self-serve", "sso").await["allowed"], false);

    // The preview asks localstripe for the upcoming invoice and changes nothing.
    let preview = app
        .get_json("/v1/tenants/self-serve/subscription/preview?price=plan_pro")
        .await;
    assert_eq!(preview["currency"], "eur", "{preview}");
    assert!(
        preview["lines"].as_array().is_some_and(|l| !l.is_empty()),
        "{preview}"
    );

    // Upgrade: SSO follows.
    let upgraded = change(
        &app,
        reqwest::Method::POST,
        path,
        Some(serde_json::json!({"price": "plan_pro", "proration": "create_prorations"})),
    )
    .await;
    assert_eq!(upgraded["subscription"]["items"][0]["price"], "plan_pro");
    assert_eq!(app.check("self-serve", "sso").await["allowed"], true);
    assert_eq!(app.check("self-serve", "api_calls").await["limit"], 1000);

    // Cancel at period end, then resume: still on the plan throughout.
    let canceling = change(
        &app,
        reqwest::Method::DELETE,
        &format!("{path}?at_period_end=true"),
        None,
    )
    .await;
    assert_eq!(canceling["subscription"]["cancel_at_period_end"], true);
    assert_eq!(
        tenant(&app, "self-serve").await.unwrap()["subscription"]["cancel_at_period_end"],
        true
    );
    assert_eq!(app.check("self-serve", "sso").await["allowed"], true);
    let resumed = change(&app, reqwest::Method::POST, &format!("{path}/resume"), None).await;
    assert_eq!(resumed["subscription"]["cancel_at_period_end"], false);

    // One customer, one subscription at the vendor, in the state billsync shows.
    let subscriptions = stripe.flow(&["subscriptions", &customer]);
    let subscriptions = subscriptions.as_array().unwrap();
    assert_eq!(subscriptions.len(), 1, "{subscriptions:?}");
    assert_eq!(subscriptions[0]["plan"]["id"], "plan_pro");
    assert_eq!(subscriptions[0]["cancel_at_period_end"], false);
    let seen = tenant(&app, "self-serve").await.unwrap();
    assert_eq!(seen["subscription"]["id"], subscriptions[0]["id"]);
    assert_eq!(seen["subscription"]["items"][0]["price"], "plan_pro");
    assert_eq!(seen["subscription"]["cancel_at_period_end"], false);
    let status = app.get_json("/v1/sync/status").await;
    assert_eq!(status["inbox"]["failed"], 0, "{status}");
    // Finance: the invoices localstripe issued are matched by their payments, and the mirror
    // agrees with localstripe's subscription.
    wait_for("the tenant's invoices and payments", || async {
        let invoices = app.get_json("/v1/tenants/self-serve/invoices").await;
        let payments = app.get_json("/v1/tenants/self-serve/payments").await;
        !invoices["data"].as_array().unwrap().is_empty()
            && !payments["data"].as_array().unwrap().is_empty()
    })
    .await;
    wait_for("every delivered event to be applied", || async {
        app.get_json("/v1/sync/status").await["inbox"]["pending"] == 0
    })
    .await;
    let day = chrono::Duration::days(1);
    let response = app
        .v1(reqwest::Method::POST, "/v1/reconciliations")
        .json(&serde_json::json!({
            "from": (chrono::Utc::now() - day).to_rfc3339(),
            "to": (chrono::Utc::now() + day).to_rfc3339(),
            "tenant": "self-serve",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/reconciliations/{id}");
    wait_for("the reconciliation", || async {
        app.get_json(&path).await["status"] != "running"
    })
    .await;
    let run = app.get_json(&path).await;
    assert_eq!(run["status"], "done", "{run}");
    assert_eq!(run["items"], serde_json::json!([]), "{run:#}");
    assert!(
        run["summary"]["matched_invoices"].as_i64().unwrap() >= 1,
        "{run}"
    );
    assert_eq!(run["summary"]["drift_checked_tenants"], 1);

    // Revenue: what localstripe invoiced is billed, and earned day by day from its period.
    let invoiced: i64 = app.get_json("/v1/tenants/self-serve/invoices").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| matches!(i["status"].as_str(), Some("paid" | "open")))
        .filter_map(|i| i["total"].as_i64())
        .sum();
    assert!(invoiced > 0);
    let today = chrono::Utc::now().date_naive();
    let revenue = app
        .get_json(&format!(
            "/v1/tenants/self-serve/revenue?from={}&to={}&group_by=day",
            today - chrono::Days::new(1),
            today + chrono::Days::new(40)
        ))
        .await;
    let periods = revenue["periods"].as_array().unwrap();
    let billed: i64 = periods.iter().filter_map(|p| p["billed"].as_i64()).sum();
    let recognised: i64 = periods
        .iter()
        .filter_map(|p| p["recognised"]["total"].as_i64())
        .sum();
    assert_eq!(billed, invoiced, "{revenue:#}");
    assert_eq!(
        recognised, invoiced,
        "all earned within the 40 days: {revenue:#}"
    );
    assert_eq!(periods.last().unwrap()["deferred"], 0);
    assert!(
        revenue["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["kind"] == "subscription"),
        "{revenue:#}"
    );
    app.stop().await;
}
