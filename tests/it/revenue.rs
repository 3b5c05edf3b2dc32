//! Revenue over HTTP and from the command line: invoices, a credit note and a refund reach the
//! mirror through webhooks, and the report follows them.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    Backend, TestApp, customer, error_of, event, on_both_backends, take_webhooks, wait_for,
};

on_both_backends!(
    the_report_follows_invoices_credit_notes_and_refunds,
    the_schedule_is_reused_until_a_webhook_changes_an_invoice,
    late_usage_in_a_metered_lines_period_changes_the_kept_schedule,
);

/// 2024-01-01T00:00:00Z.
const JAN_1: i64 = 1_704_067_200;
const DAY: i64 = 86_400;

fn invoice(id: &str, customer: &str, amount: i64, start: i64, end: i64, currency: &str) -> Value {
    json!({"id": id, "object": "invoice", "customer": customer, "status": "paid", "currency": currency,
        "total": amount, "amount_due": amount, "amount_paid": amount, "created": start,
        "status_transitions": {"finalized_at": start},
        "lines": {"object": "list", "data": [{"id": format!("il_{id}"), "object": "line_item",
            "amount": amount, "currency": currency, "type": "subscription",
            "price": {"id": "price_pro", "recurring": {"interval": "month"}},
            "period": {"start": start, "end": end}}]}})
}

async fn applied(app: &TestApp, n: &mut usize, kind: &str, object: Value) {
    *n += 1;
    app.deliver(&event(
        &format!("evt_r{n}"),
        kind,
        JAN_1 + *n as i64,
        object,
    ))
    .await;
    wait_for(&format!("evt_r{n} applied"), || async {
        let status = app.get_json("/v1/sync/status").await;
        status["inbox"]["pending"] == 0 && status["inbox"]["failed"] == 0
    })
    .await;
}

async fn the_report_follows_invoices_credit_notes_and_refunds(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        take_webhooks(s);
        s.stripe.refetch = false;
        s.api.tenant_keys = vec![(
            billsync::config::key_digest("scoped-revenue-key-000").unwrap(),
            vec!["acme".to_owned()],
        )];
    })
    .await;
    let mut n = 0;
    applied(
        &app,
        &mut n,
        "customer.created",
        customer("cus_acme", "acme"),
    )
    .await;
    let feb_1 = JAN_1 + 31 * DAY;
    let mar_1 = feb_1 + 29 * DAY;
    applied(
        &app,
        &mut n,
        "invoice.finalized",
        invoice("in_jan", "cus_acme", 3100, JAN_1, feb_1, "eur"),
    )
    .await;
    applied(
        &app,
        &mut n,
        "invoice.finalized",
        invoice("in_feb", "cus_acme", 2900, feb_1, mar_1, "eur"),
    )
    .await;

    let path = "/v1/revenue?from=2024-01-01&to=2024-03-01&group_by=month";
    let report = app.get_json(path).await;
    let periods = report["periods"].as_array().unwrap();
    assert_eq!(periods.len(), 2, "{report}");
    assert_eq!(periods[0]["start"], "2024-01-01");
    assert_eq!(periods[0]["recognised"]["subscription"], 3100);
    assert_eq!(periods[0]["billed"], 3100);
    assert_eq!(periods[0]["deferred"], 0);
    assert_eq!(
        periods[1]["recognised"]["total"], 2900,
        "a leap February: 29 days"
    );

    // A credit note on the 11th of February takes back from that day on; January is closed.
    applied(&app, &mut n, "credit_note.created", json!({"id": "cn_1", "object": "credit_note",
        "customer": "cus_acme", "invoice": "in_feb", "status": "issued", "created": feb_1 + 10 * DAY,
        "currency": "eur", "total": 580, "amount": 580,
        "lines": {"data": [{"invoice_line_item": "il_in_feb", "amount": 580}]}})).await;
    let report = app.get_json(path).await;
    assert_eq!(report["periods"][0]["recognised"]["total"], 3100);
    assert_eq!(report["periods"][1]["recognised"]["reversal"], -580);
    assert_eq!(report["periods"][1]["billed"], 2900 - 580);
    assert_eq!(report["periods"][1]["deferred"], 0);

    // By day: the 10th of February is as it was; the 11th carries the catch-up.
    let days = app
        .get_json("/v1/revenue?from=2024-02-10&to=2024-02-12&group_by=day&currency=EUR")
        .await;
    assert_eq!(days["periods"][0]["recognised"]["total"], 100);
    assert_eq!(days["periods"][1]["recognised"]["reversal"], -200 - 20);

    // A refund no credit note covers, and the tenant view with the lines behind the figures.
    applied(&app, &mut n, "charge.refunded", json!({"id": "ch_1", "object": "charge", "customer": "cus_acme",
        "invoice": "in_jan", "amount": 3100, "amount_refunded": 310, "currency": "eur", "status": "succeeded",
        "created": JAN_1, "refunds": {"data": [{"id": "re_1", "amount": 310, "created": mar_1}]}})).await;
    let tenant = app
        .get_json("/v1/tenants/acme/revenue?from=2024-01-01&to=2024-04-01")
        .await;
    let lines = tenant["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    let jan = lines.iter().find(|l| l["invoice"] == "in_jan").unwrap();
    assert_eq!(jan["kind"], "subscription");
    assert_eq!(jan["service_end"], "2024-01-31");
    assert_eq!(jan["adjustments"][0]["cause"], "refund");
    assert_eq!(jan["adjustments"][0]["amount"], 310);
    assert_eq!(tenant["periods"][2]["recognised"]["reversal"], -310);
    assert_eq!(tenant["periods"][2]["billed"], -310);

    // Bad input, and tenant-scoped keys.
    let bad = app
        .v1(Method::GET, "/v1/revenue?from=2024-02-01&to=2024-01-01")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.2.as_deref(), Some("to"));
    let bad = app
        .v1(
            Method::GET,
            "/v1/revenue?from=2024-01-01&to=2024-02-01&group_by=week",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.2.as_deref(), Some("group_by"));
    let scoped = |path: &str| {
        app.client
            .get(app.url(path))
            .bearer_auth("scoped-revenue-key-000")
            .send()
    };
    assert_eq!(
        scoped("/v1/revenue?from=2024-01-01&to=2024-02-01")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        scoped("/v1/revenue?from=2024-01-01&to=2024-02-01&tenant=other")
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        scoped("/v1/revenue?from=2024-01-01&to=2024-02-01&tenant=acme")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        scoped("/v1/tenants/other/revenue?from=2024-01-01&to=2024-02-01")
            .await
            .unwrap()
            .status(),
        404
    );

    // The command line prints the same figures.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
        .args([
            "revenue",
            "--from",
            "2024-01-01",
            "--to",
            "2024-03-01",
            "--format",
            "json",
        ])
        .env("BILLSYNC_DATABASE__URL", app.settings.database.url.expose())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["periods"], app.get_json(path).await["periods"]);
    let csv = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
        .args([
            "revenue",
            "--from",
            "2024-01-01",
            "--to",
            "2024-03-01",
            "--format",
            "csv",
        ])
        .env("BILLSYNC_DATABASE__URL", app.settings.database.url.expose())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&csv.stdout);
    assert_eq!(
        text.lines().nth(1),
        Some("eur,2024-01-01,2024-02-01,3100,0,0,0,3100,3100,0,0"),
        "{text}"
    );
    app.stop().await;
}

/// `billsync_revenue_rebuilds_total` as `/metrics` shows it (0 before the first rebuild).
async fn rebuilds(app: &TestApp) -> u64 {
    let metrics = app.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("billsync_revenue_rebuilds_total{} "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// The rebuild count once requests for `paths` stop rebuilding: on PostgreSQL the applier's
/// own writes come back a moment later as notifications, each dropping the kept schedules once
/// more, so a count read right after a write is not yet the one that stays.
async fn settled_rebuilds(app: &TestApp, paths: &[&str]) -> u64 {
    let mut last = u64::MAX;
    for _ in 0..50 {
        for path in paths {
            app.get_json(path).await;
        }
        let now = rebuilds(app).await;
        if now == last {
            return now;
        }
        last = now;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    panic!("the revenue schedules were built again on every request");
}

/// Requests in a row answer from one built schedule (each view, all tenants or one, is built
/// once); a new invoice delivered by webhook drops it, and the next answer shows the invoice.
async fn the_schedule_is_reused_until_a_webhook_changes_an_invoice(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        take_webhooks(s);
        s.stripe.refetch = false;
    })
    .await;
    let mut n = 0;
    applied(
        &app,
        &mut n,
        "customer.created",
        customer("cus_c", "cached"),
    )
    .await;
    let feb_1 = JAN_1 + 31 * DAY;
    let jan = invoice("in_c1", "cus_c", 3100, JAN_1, feb_1, "eur");
    applied(&app, &mut n, "invoice.finalized", jan).await;

    let path = "/v1/revenue?from=2024-01-01&to=2024-03-01&group_by=month";
    let tenant_path = "/v1/tenants/cached/revenue?from=2024-01-01&to=2024-03-01";
    let kept = settled_rebuilds(&app, &[path, tenant_path]).await;
    let first = app.get_json(path).await;
    let tenant_first = app.get_json(tenant_path).await;
    assert_eq!(app.get_json(path).await, first);
    assert_eq!(app.get_json(tenant_path).await, tenant_first);
    let other_window = app
        .get_json("/v1/revenue?from=2024-01-01&to=2024-02-01")
        .await;
    assert_eq!(other_window["periods"][0]["recognised"]["total"], 3100);
    assert_eq!(rebuilds(&app).await, kept, "no change, no rebuild");
    assert_eq!(first["periods"][1]["recognised"]["total"], 0, "{first}");

    let feb = invoice("in_c2", "cus_c", 2900, feb_1, feb_1 + 29 * DAY, "eur");
    applied(&app, &mut n, "invoice.finalized", feb).await;
    let after = app.get_json(path).await;
    assert!(
        rebuilds(&app).await > kept,
        "the invoice dropped the kept schedule"
    );
    assert_eq!(after["periods"][1]["recognised"]["total"], 2900, "{after}");
    let kept = settled_rebuilds(&app, &[path, tenant_path]).await;
    let tenant_after = app.get_json(tenant_path).await;
    assert_eq!(tenant_after["lines"].as_array().unwrap().len(), 2);
    assert_eq!(app.get_json(path).await, after);
    assert_eq!(rebuilds(&app).await, kept);
    app.stop().await;
}

/// Posts one `calls` event of 10 for the tenant `metered` at `at` (Unix seconds).
async fn post_calls(app: &TestApp, id: &str, at: i64) {
    let at = chrono::DateTime::from_timestamp(at, 0)
        .unwrap()
        .to_rfc3339();
    let body = json!({"events": [{"id": id, "tenant_id": "metered", "meter": "calls",
        "quantity": 10, "timestamp": at}]});
    let response = app.v1(Method::POST, "/v1/usage").json(&body).send().await;
    assert_eq!(
        response.unwrap().json::<Value>().await.unwrap()["accepted"],
        1
    );
}

/// A metered line's revenue follows its period's usage: usage that arrives late inside that
/// period drops the kept schedule and moves revenue to its day; usage after it does not.
async fn late_usage_in_a_metered_lines_period_changes_the_kept_schedule(backend: Backend) {
    let vendor = wiremock::MockServer::start().await;
    let app = crate::reconcile::service(backend, &vendor, |_| {}).await;
    let mut seed = crate::reconcile::Seed { app: &app, n: 0 };
    seed.tenant("metered").await;
    let start = (crate::reconcile::now() / DAY - 20) * DAY;
    let end = start + 10 * DAY;
    post_calls(&app, "early", start + 2 * DAY + 3600).await;
    seed.deliver("invoice.finalized", json!({"id": "in_m", "object": "invoice",
        "customer": "cus_metered", "status": "paid", "currency": "eur", "total": 1000,
        "amount_due": 1000, "amount_paid": 1000, "created": end, "status_transitions": {"finalized_at": end},
        "lines": {"object": "list", "data": [{"id": "il_m", "object": "line_item", "amount": 1000,
            "currency": "eur", "quantity": 10, "price": {"id": "price_calls"},
            "period": {"start": start, "end": end}}]}}))
        .await;
    let date = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string()
    };
    let path = format!(
        "/v1/revenue?from={}&to={}&group_by=day",
        date(start),
        date(end)
    );
    let on_day =
        |report: &Value, day: i64| report["periods"][day as usize]["recognised"]["usage"].clone();
    wait_for("the invoice", || async {
        on_day(&app.get_json(&path).await, 2) == 1000
    })
    .await;
    let kept = settled_rebuilds(&app, &[&path]).await;

    post_calls(&app, "after", crate::reconcile::now()).await;
    assert_eq!(on_day(&app.get_json(&path).await, 2), 1000);
    assert_eq!(
        rebuilds(&app).await,
        kept,
        "usage after the period changes nothing"
    );

    post_calls(&app, "late", start + 5 * DAY + 3600).await;
    let report = app.get_json(&path).await;
    assert_eq!(
        (on_day(&report, 2), on_day(&report, 5)),
        (json!(500), json!(500)),
        "{report}"
    );
    assert_eq!(rebuilds(&app).await, kept + 1);
    app.stop().await;
}
