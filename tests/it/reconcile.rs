//! Reconciliation over HTTP and from the command line: a seeded scenario with each kind of
//! finding (usage through the real pusher against a wiremock Stripe, invoices and payments
//! through webhooks), each listed exactly once and nothing else; a clean period is an empty
//! report and exit code 0.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    Backend, TestApp, customer, error_of, event, on_both_backends, subscription, take_webhooks,
    use_vendor, wait_for,
};

on_both_backends!(
    runs_are_listed_newest_first_a_page_at_a_time_and_filtered,
    a_run_whose_runner_stopped_is_marked_failed,
    every_kind_of_finding_is_listed_once_and_nothing_else,
    a_clean_period_gives_an_empty_report,
    drift_is_reported_and_repaired_unless_dry_run,
    the_vendors_meter_totals_are_compared,
    the_open_period_is_compared_with_the_vendors_meter_up_to_the_settle_point,
    the_continuous_check_shows_open_findings_in_metrics,
    the_continuous_check_spends_its_budget_and_carries_the_rest_over,
);

pub(crate) const DAY: i64 = 86_400;

/// A tenant, its usage, and the (quantity, finalization time) of its invoice, if any.
type UsageCase<'a> = (&'a str, &'a [i64], Option<(i64, i64)>);
/// A tenant, its invoice's status and currency and amount paid, its payment (amount, currency,
/// other charge fields), and the invoice's due date.
type MoneyCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    i64,
    Option<(i64, &'a str, Value)>,
    Option<i64>,
);

const CATALOG: &str = r#"
[meters.calls]
aggregation = "sum"
stripe_event_name = "calls"
late_window = "90d"
stripe_prices = ["price_calls"]
"#;

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A service with the catalog above, webhooks and a vendor.
pub(crate) async fn service(
    backend: Backend,
    vendor: &MockServer,
    adjust: impl FnOnce(&mut billsync::config::Settings),
) -> TestApp {
    let path = std::env::temp_dir().join(format!(
        "billsync-reconcile-catalog-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, CATALOG).unwrap();
    TestApp::spawn_with(backend, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.stripe.refetch = false;
        s.catalog.path = path;
        s.catalog.required = true;
        s.metering.push_interval = std::time::Duration::from_millis(100);
        s.reconcile.vendor_usage = false;
        adjust(s);
    })
    .await
}

/// Meter events are taken, except those named in `refuse` (400) and `fail` (500).
async fn meter_events(vendor: &MockServer, refuse: &[&str], fail: &[&str]) {
    for customer in refuse {
        Mock::given(method("POST"))
            .and(path("/v1/billing/meter_events"))
            .and(body_string_contains(format!(
                "payload%5Bstripe_customer_id%5D={customer}"
            )))
            .respond_with(ResponseTemplate::new(400).set_body_json(
                json!({"error": {"type": "invalid_request_error", "message": "No such customer"}}),
            ))
            .with_priority(1)
            .mount(vendor)
            .await;
    }
    for customer in fail {
        Mock::given(method("POST"))
            .and(path("/v1/billing/meter_events"))
            .and(body_string_contains(format!(
                "payload%5Bstripe_customer_id%5D={customer}"
            )))
            .respond_with(ResponseTemplate::new(500))
            .with_priority(1)
            .mount(vendor)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/v1/billing/meter_events"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"object": "billing.meter_event"})),
        )
        .with_priority(5)
        .mount(vendor)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("^/v1/subscriptions$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "data": [], "has_more": false})),
        )
        .with_priority(9)
        .mount(vendor)
        .await;
}

/// A finalized invoice with one line.
#[allow(clippy::too_many_arguments)]
fn invoice(
    id: &str,
    customer: &str,
    status: &str,
    currency: &str,
    total: i64,
    paid: i64,
    line: Value,
    due: Option<i64>,
    finalized: i64,
) -> Value {
    json!({
        "id": id, "object": "invoice", "customer": customer, "status": status, "currency": currency,
        "total": total, "amount_due": total, "amount_paid": paid, "amount_remaining": total - paid,
        "created": now() - 9 * DAY, "due_date": due, "status_transitions": {"finalized_at": finalized},
        "lines": {"object": "list", "data": [line]}
    })
}

fn usage_line(quantity: i64, start: i64, end: i64) -> Value {
    json!({"id": "il_usage", "object": "line_item", "amount": quantity * 10, "currency": "eur",
        "quantity": quantity, "price": {"id": "price_calls"}, "period": {"start": start, "end": end}})
}

fn flat_line() -> Value {
    json!({"id": "il_flat", "object": "line_item", "amount": 1000, "currency": "eur", "quantity": 1,
        "price": {"id": "price_flat"}, "period": {"start": now() - 30 * DAY, "end": now() - 20 * DAY}})
}

fn charge(
    id: &str,
    customer: &str,
    invoice: &str,
    amount: i64,
    currency: &str,
    extra: Value,
) -> Value {
    let mut charge = json!({"id": id, "object": "charge", "customer": customer, "invoice": invoice,
        "amount": amount, "currency": currency, "status": "succeeded", "paid": true,
        "amount_refunded": 0, "refunded": false, "disputed": false, "created": now() - 5 * DAY});
    if let (Value::Object(c), Value::Object(e)) = (&mut charge, extra) {
        c.extend(e);
    }
    charge
}

pub(crate) struct Seed<'a> {
    pub(crate) app: &'a TestApp,
    pub(crate) n: usize,
}

impl Seed<'_> {
    pub(crate) async fn deliver(&mut self, kind: &str, object: Value) {
        self.n += 1;
        self.app
            .deliver(&event(
                &format!("evt_seed_{}", self.n),
                kind,
                now() - 60,
                object,
            ))
            .await;
    }

    pub(crate) async fn tenant(&mut self, tenant: &str) -> String {
        let id = format!("cus_{tenant}");
        self.deliver("customer.created", customer(&id, tenant))
            .await;
        let app = self.app;
        wait_for(&format!("tenant {tenant}"), || async {
            app.get_tenant(tenant).await.status() == 200
        })
        .await;
        id
    }

    pub(crate) async fn usage(&mut self, tenant: &str, at: i64, quantities: &[i64]) {
        let events: Vec<Value> = quantities
            .iter()
            .enumerate()
            .map(|(i, q)| {
                self.n += 1;
                json!({"id": format!("u{}-{i}", self.n), "tenant_id": tenant, "meter": "calls",
                    "quantity": q, "timestamp": chrono::DateTime::from_timestamp(at + i as i64, 0).unwrap().to_rfc3339()})
            })
            .collect();
        let response = self
            .app
            .v1(Method::POST, "/v1/usage")
            .json(&json!({"events": events}))
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["accepted"], quantities.len(), "{body}");
    }
}

pub(crate) async fn reconcile(app: &TestApp, body: Value) -> Value {
    // Every delivered webhook applied first: a webhook is acknowledged before it is applied.
    wait_for("the inbox to be applied", || async {
        app.get_json("/v1/sync/status").await["inbox"]["pending"] == 0
    })
    .await;
    let response = app
        .v1(Method::POST, "/v1/reconciliations")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/reconciliations/{id}?limit=1000");
    wait_for("the reconciliation", || async {
        app.get_json(&path).await["status"] != "running"
    })
    .await;
    let run = app.get_json(&path).await;
    assert_eq!(run["status"], "done", "{run}");
    run
}

/// `billsync reconcile` over [`window`] on the service's database and catalog, with `args`.
fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    let w = window();
    std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
        .args(["reconcile", "--from", w["from"].as_str().unwrap()])
        .args(["--to", w["to"].as_str().unwrap()])
        .args(args)
        .env("BILLSYNC_DATABASE__URL", app.settings.database.url.expose())
        .env("BILLSYNC_CATALOG__PATH", &app.settings.catalog.path)
        .output()
        .unwrap()
}

pub(crate) fn window() -> Value {
    let at = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap().to_rfc3339();
    json!({"from": at(now() - 60 * DAY), "to": at(now())})
}

/// finding → tenants, from a report.
pub(crate) fn found(run: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in run["items"].as_array().unwrap() {
        out.entry(item["finding"].as_str().unwrap().to_owned())
            .or_default()
            .push(item["tenant_id"].as_str().unwrap_or("-").to_owned());
    }
    out
}

async fn every_kind_of_finding_is_listed_once_and_nothing_else(backend: Backend) {
    let vendor = MockServer::start().await;
    meter_events(&vendor, &["cus_rejected"], &["cus_unpushed"]).await;
    let app = service(backend, &vendor, |_| {}).await;
    let mut seed = Seed { app: &app, n: 0 };
    let (p_start, p_end) = (now() - 20 * DAY, now() - 10 * DAY);
    let in_p = now() - 15 * DAY;

    // Usage: one tenant per usage finding, and one where all four figures agree.
    let usage_cases: [UsageCase; 7] = [
        ("clean", &[4, 6], Some((10, p_end + DAY))),
        ("unpushed", &[5], Some((5, p_end + DAY))),
        ("rejected", &[7], Some((7, p_end + DAY))),
        ("afterinvoice", &[4], Some((0, now() - 9 * DAY))),
        ("mismatch", &[8], Some((99, now() + DAY))),
        ("noinvoice", &[6], None),
        ("late", &[3], None),
    ];
    for (tenant, quantities, bill) in usage_cases {
        let customer = seed.tenant(tenant).await;
        let (at, start, end) = if tenant == "late" {
            (now() - 40 * DAY, now() - 45 * DAY, now() - 38 * DAY)
        } else {
            (in_p, p_start, p_end)
        };
        seed.usage(tenant, at, quantities).await;
        let bill = bill.or((tenant == "late").then_some((3, now() - 37 * DAY)));
        if let Some((quantity, finalized)) = bill {
            let total = quantity * 10;
            seed.deliver(
                "invoice.finalized",
                invoice(
                    &format!("in_{tenant}"),
                    &customer,
                    "paid",
                    "eur",
                    total,
                    total,
                    usage_line(quantity, start, end),
                    None,
                    finalized,
                ),
            )
            .await;
            if total > 0 {
                seed.deliver(
                    "charge.succeeded",
                    charge(
                        &format!("ch_{tenant}"),
                        &customer,
                        &format!("in_{tenant}"),
                        total,
                        "eur",
                        json!({}),
                    ),
                )
                .await;
            }
        }
    }
    // Money: one tenant per money finding, and one paid invoice that matches.
    let past = Some(now() - 2 * DAY);
    let money_cases: [MoneyCase; 10] = [
        (
            "paid",
            "paid",
            "eur",
            1000,
            Some((1000, "eur", json!({}))),
            None,
        ),
        ("missing", "open", "eur", 0, None, past),
        (
            "partial",
            "open",
            "eur",
            0,
            Some((400, "eur", json!({}))),
            past,
        ),
        (
            "over",
            "paid",
            "eur",
            1000,
            Some((1500, "eur", json!({}))),
            None,
        ),
        (
            "short",
            "paid",
            "eur",
            1000,
            Some((900, "eur", json!({}))),
            None,
        ),
        (
            "refund",
            "paid",
            "eur",
            1000,
            Some((1000, "eur", json!({"amount_refunded": 300}))),
            None,
        ),
        (
            "dispute",
            "paid",
            "eur",
            1000,
            Some((1000, "eur", json!({"disputed": true}))),
            None,
        ),
        ("voided", "void", "eur", 0, None, None),
        ("lost", "uncollectible", "eur", 0, None, past),
        (
            "foreign",
            "paid",
            "eur",
            1000,
            Some((1000, "usd", json!({}))),
            None,
        ),
    ];
    for (tenant, status, currency, paid, pay, due) in money_cases {
        let customer = seed.tenant(tenant).await;
        let id = format!("in_{tenant}");
        seed.deliver(
            "invoice.finalized",
            invoice(
                &id,
                &customer,
                status,
                currency,
                1000,
                paid,
                flat_line(),
                due,
                now() - 8 * DAY,
            ),
        )
        .await;
        if let Some((amount, currency, extra)) = pay {
            seed.deliver(
                "charge.succeeded",
                charge(
                    &format!("ch_{tenant}"),
                    &customer,
                    &id,
                    amount,
                    currency,
                    extra,
                ),
            )
            .await;
        }
    }
    wait_for("every push to settle", || async {
        let requests = vendor.received_requests().await.unwrap_or_default();
        let sent: std::collections::BTreeSet<String> = requests
            .iter()
            .filter(|r| r.url.path() == "/v1/billing/meter_events")
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .filter_map(|b| {
                b.split("payload%5Bstripe_customer_id%5D=")
                    .nth(1)
                    .map(|c| c.split('&').next().unwrap_or("").to_owned())
            })
            .collect();
        [
            "cus_clean",
            "cus_unpushed",
            "cus_rejected",
            "cus_afterinvoice",
            "cus_mismatch",
            "cus_noinvoice",
        ]
        .iter()
        .all(|c| sent.contains(*c))
    })
    .await;

    let run = reconcile(&app, window()).await;
    let expected: BTreeMap<String, Vec<String>> = [
        ("not_yet_pushed", "unpushed"),
        ("rejected_by_vendor", "rejected"),
        ("arrived_after_invoice", "afterinvoice"),
        ("invoice_mismatch", "mismatch"),
        ("invoice_missing", "noinvoice"),
        ("outside_vendor_window", "late"),
        ("missing_payment", "missing"),
        ("partially_paid", "partial"),
        ("overpaid", "over"),
        ("amount_mismatch", "short"),
        ("refunded", "refund"),
        ("disputed", "dispute"),
        ("void", "voided"),
        ("uncollectible", "lost"),
        ("currency_mismatch", "foreign"),
    ]
    .into_iter()
    .map(|(f, t)| (f.to_owned(), vec![t.to_owned()]))
    .collect();
    assert_eq!(found(&run), expected, "{run:#}");

    // Every item carries its figures and points at its evidence.
    let items = run["items"].as_array().unwrap();
    let unpushed = items
        .iter()
        .find(|i| i["finding"] == "not_yet_pushed")
        .unwrap();
    assert_eq!(
        (unpushed["accepted"].as_str(), unpushed["invoiced"].as_str()),
        (Some("5"), Some("5"))
    );
    assert_eq!(unpushed["pushed"], Value::Null);
    assert_eq!(unpushed["evidence"]["invoice"], "in_unpushed");
    assert_eq!(unpushed["evidence"]["invoice_line"], "il_usage");
    assert!(
        !unpushed["evidence"]["push_ids"]
            .as_array()
            .unwrap()
            .is_empty()
            || unpushed["evidence"]["unpushed_events"] == 1,
        "{unpushed}"
    );
    let mismatch = items
        .iter()
        .find(|i| i["finding"] == "invoice_mismatch")
        .unwrap();
    assert_eq!(
        (mismatch["pushed"].as_str(), mismatch["invoiced"].as_str()),
        (Some("8"), Some("99"))
    );
    assert_eq!(
        mismatch["evidence"]["push_ids"].as_array().unwrap().len(),
        1
    );
    let partial = items
        .iter()
        .find(|i| i["finding"] == "partially_paid")
        .unwrap();
    assert_eq!(
        (partial["received"].as_i64(), partial["amount_due"].as_i64()),
        (Some(400), Some(1000))
    );
    assert_eq!(partial["evidence"]["charges"], json!(["ch_partial"]));
    let summary = &run["summary"];
    assert_eq!(summary["items"], 15);
    assert_eq!(summary["findings"]["partially_paid"]["count"], 1);
    assert_eq!(
        summary["findings"]["partially_paid"]["amount_due"]["eur"],
        1000
    );

    // The same inputs give the same report.
    let again = reconcile(&app, window()).await;
    assert_eq!(again["items"], run["items"]);

    // One tenant only; pages follow the cursor.
    let mut one = window();
    one["tenant"] = json!("partial");
    assert_eq!(found(&reconcile(&app, one).await).len(), 1);
    let first = app
        .get_json(&format!(
            "/v1/reconciliations/{}?limit=10",
            run["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(first["items"].as_array().unwrap().len(), 10);
    let cursor = first["next_cursor"].as_str().unwrap();
    let rest = app
        .get_json(&format!(
            "/v1/reconciliations/{}?limit=10&cursor={cursor}",
            run["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 5);
    assert_eq!(rest["next_cursor"], Value::Null);

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("billsync_reconciliation_open_findings"),
        "{metrics}"
    );

    let bad = app
        .v1(Method::POST, "/v1/reconciliations")
        .json(&json!({"from": "yesterday", "to": "2026-01-01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.2.as_deref(), Some("from"));
    let missing = app
        .v1(Method::GET, "/v1/reconciliations/rec_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(missing).await.1, "reconciliation_not_found");

    // The command line prints the same report and exits 1.
    let output = cli(&app, &["--format", "json", "--dry-run"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(found(&printed), expected);
    let csv = cli(&app, &["--format", "csv"]);
    let text = String::from_utf8_lossy(&csv.stdout);
    assert_eq!(text.lines().count(), 16, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("money,partially_paid,partial,in_partial,")),
        "{text}"
    );
    app.stop().await;
}

async fn a_clean_period_gives_an_empty_report(backend: Backend) {
    let vendor = MockServer::start().await;
    meter_events(&vendor, &[], &[]).await;
    let app = service(backend, &vendor, |_| {}).await;
    let mut seed = Seed { app: &app, n: 0 };
    let customer = seed.tenant("clean").await;
    seed.usage("clean", now() - 15 * DAY, &[2, 3]).await;
    seed.deliver(
        "invoice.finalized",
        invoice(
            "in_clean",
            &customer,
            "paid",
            "eur",
            50,
            50,
            usage_line(5, now() - 20 * DAY, now() - 10 * DAY),
            None,
            now() - 9 * DAY + 3600,
        ),
    )
    .await;
    seed.deliver(
        "charge.succeeded",
        charge("ch_clean", &customer, "in_clean", 50, "eur", json!({})),
    )
    .await;
    wait_for("the push", || async {
        vendor
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .any(|r| r.url.path() == "/v1/billing/meter_events")
    })
    .await;
    // The push is sent now, after the invoice above was finalized: move the finalization on.
    seed.deliver(
        "invoice.finalized",
        invoice(
            "in_clean",
            &customer,
            "paid",
            "eur",
            50,
            50,
            usage_line(5, now() - 20 * DAY, now() - 10 * DAY),
            None,
            now() + DAY,
        ),
    )
    .await;
    let run = reconcile(&app, window()).await;
    assert_eq!(run["items"], json!([]), "{run:#}");
    assert_eq!(run["summary"]["matched_invoices"], 1);
    let output = cli(&app, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("0 finding(s)"));
    app.stop().await;
}

async fn drift_is_reported_and_repaired_unless_dry_run(backend: Backend) {
    let vendor = MockServer::start().await;
    let now_sub = |status: &str| {
        let mut s = subscription("sub_d", "cus_drifty", "price_pro", status, 1);
        s["items"]["data"][0]["current_period_start"] = json!(now() - DAY);
        s["items"]["data"][0]["current_period_end"] = json!(now() + 29 * DAY);
        s
    };
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "has_more": false, "data": [now_sub("past_due")]}),
        ))
        .mount(&vendor)
        .await;
    let app = service(backend, &vendor, |_| {}).await;
    let mut seed = Seed { app: &app, n: 0 };
    seed.tenant("drifty").await;
    seed.deliver("customer.subscription.created", now_sub("active"))
        .await;
    wait_for("the subscription", || async {
        app.get_json("/v1/tenants/drifty").await["subscription"]["status"] == "active"
    })
    .await;

    let mut dry = window();
    dry["dry_run"] = json!(true);
    let run = reconcile(&app, dry).await;
    assert_eq!(
        found(&run),
        BTreeMap::from([("drift".to_owned(), vec!["drifty".to_owned()])])
    );
    let item = &run["items"][0];
    assert_eq!(
        item["differences"]["status"],
        json!({"mirror": "active", "vendor": "past_due"})
    );
    assert_eq!(item["repaired"], false);
    assert_eq!(
        app.get_json("/v1/tenants/drifty").await["subscription"]["status"],
        "active"
    );

    let run = reconcile(&app, window()).await;
    assert_eq!(run["items"][0]["repaired"], true);
    wait_for("the repair", || async {
        app.get_json("/v1/tenants/drifty").await["subscription"]["status"] == "past_due"
    })
    .await;
    let events = app.get_json("/v1/tenants/drifty/events").await;
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"] == "reconcile"),
        "the repair is logged as such: {events}"
    );
    assert_eq!(reconcile(&app, window()).await["items"], json!([]));
    app.stop().await;
}

async fn the_vendors_meter_totals_are_compared(backend: Backend) {
    let vendor = MockServer::start().await;
    meter_events(&vendor, &[], &[]).await;
    Mock::given(method("GET"))
        .and(path("/v1/billing/meters"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"object": "list", "has_more": false,
            "data": [{"id": "mtr_calls", "object": "billing.meter", "event_name": "calls"}]})),
        )
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/billing/meters/mtr_calls/event_summaries"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"object": "list", "has_more": false,
            "data": [{"object": "billing.meter_event_summary", "aggregated_value": 4.0}]})),
        )
        .mount(&vendor)
        .await;
    let app = service(backend, &vendor, |s| s.reconcile.vendor_usage = true).await;
    let mut seed = Seed { app: &app, n: 0 };
    let customer = seed.tenant("gap").await;
    seed.usage("gap", now() - 15 * DAY, &[5]).await;
    seed.deliver(
        "invoice.finalized",
        invoice(
            "in_gap",
            &customer,
            "paid",
            "eur",
            50,
            50,
            usage_line(5, now() - 20 * DAY, now() - 10 * DAY),
            None,
            now() + DAY,
        ),
    )
    .await;
    seed.deliver(
        "charge.succeeded",
        charge("ch_gap", &customer, "in_gap", 50, "eur", json!({})),
    )
    .await;
    wait_for("the push", || async {
        vendor
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .any(|r| r.url.path() == "/v1/billing/meter_events")
    })
    .await;
    let run = reconcile(&app, window()).await;
    assert_eq!(
        found(&run),
        BTreeMap::from([("vendor_mismatch".to_owned(), vec!["gap".to_owned()])]),
        "{run:#}"
    );
    let item = &run["items"][0];
    assert_eq!(
        (
            item["accepted"].as_str(),
            item["pushed"].as_str(),
            item["vendor"].as_str(),
            item["invoiced"].as_str()
        ),
        (Some("5"), Some("5"), Some("4"), Some("5"))
    );
    let asked = vendor.received_requests().await.unwrap_or_default();
    let summary = asked
        .iter()
        .find(|r| r.url.path().ends_with("/event_summaries"))
        .unwrap();
    let query: BTreeMap<String, String> = summary
        .url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(query["customer"], customer);
    app.stop().await;
}

/// The current period of three tenants, whose Stripe meter holds less, more and as much as
/// billsync pushed before the settle point; usage after it (a minute ago) is not compared.
async fn the_open_period_is_compared_with_the_vendors_meter_up_to_the_settle_point(
    backend: Backend,
) {
    let vendor = MockServer::start().await;
    let cases = [("less", 3), ("more", 8), ("equal", 5)];
    mount_open_periods(&vendor, &cases).await;
    let app = service(backend, &vendor, |s| s.reconcile.vendor_usage = true).await;
    let mut seed = Seed { app: &app, n: 0 };
    for (tenant, _) in cases {
        subscribed_with_settled_usage(&mut seed, tenant).await;
        // In flight: after the settle point (5 minutes ago by default).
        seed.usage(tenant, now() - 60, &[7]).await;
    }
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    wait_for("every push to be sent", || async {
        let pushes = (db.usage().pushes_between(0, i64::MAX, None).await).unwrap();
        pushes.len() == 2 * cases.len() && pushes.iter().all(|p| p.status == "sent")
    })
    .await;
    let early = (db.usage().pushes_between(0, i64::MAX, Some("less")).await)
        .unwrap()
        .into_iter()
        .find(|p| p.value == "5")
        .unwrap();

    // Just sent, Stripe's summaries may not show the pushes yet: only more than was pushed is
    // a finding.
    let run = reconcile(&app, window()).await;
    assert_eq!(
        found(&run),
        BTreeMap::from([("vendor_extra".to_owned(), vec!["more".to_owned()])]),
        "{run:#}"
    );
    // As if sent before the settle point.
    let backdate = "UPDATE usage_pushes SET sent_at = sent_at - 600000";
    match &db {
        billsync::store::Db::Sqlite(pool) => sqlx::query(backdate).execute(pool).await.map(drop),
        billsync::store::Db::Postgres(pool) => sqlx::query(backdate).execute(pool).await.map(drop),
    }
    .unwrap();
    db.close().await;

    let run = reconcile(&app, window()).await;
    assert_eq!(
        found(&run),
        BTreeMap::from([
            ("vendor_extra".to_owned(), vec!["more".to_owned()]),
            ("vendor_missing".to_owned(), vec!["less".to_owned()]),
        ]),
        "{run:#}"
    );
    let missing = (run["items"].as_array().unwrap().iter())
        .find(|i| i["finding"] == "vendor_missing")
        .unwrap();
    assert_eq!(
        (
            missing["accepted"].as_str(),
            missing["pushed"].as_str(),
            missing["vendor"].as_str(),
            missing["invoiced"].as_str()
        ),
        (Some("5"), Some("5"), Some("3"), None),
        "{missing:#}"
    );
    assert_eq!(missing["meter"], "calls");
    let sent = &missing["evidence"]["sent_pushes"];
    assert_eq!(sent.as_array().unwrap().len(), 1, "{missing:#}");
    assert_eq!(sent[0]["push_id"], early.push_id.as_str());
    assert_eq!(sent[0]["value"], "5");
    assert!(sent[0]["timestamp"].is_string() && sent[0]["sent_at"].is_string());
    assert_eq!(missing["evidence"]["push_ids"], json!([early.push_id]));

    // Stripe is asked up to the settle point, on a minute boundary.
    let asked = vendor.received_requests().await.unwrap_or_default();
    let summary = (asked.iter())
        .find(|r| r.url.path().ends_with("/event_summaries"))
        .unwrap();
    let query: BTreeMap<String, String> = (summary.url.query_pairs())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let end: i64 = query["end_time"].parse().unwrap();
    assert_eq!(end % 60, 0);
    assert!(end <= now() - 300 && end > now() - 600, "{query:?}");
    app.stop().await;
}

/// A run left `running` by a process that stopped: SQLite's next `serve` fails it at start; on
/// PostgreSQL, where another replica may still be running it, only once it has been silent for
/// 30 s. A run that is still beating is left alone.
async fn a_run_whose_runner_stopped_is_marked_failed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    let now = billsync::store::now_ms();
    let run = |id: &str, started_at: i64| billsync::store::RunRow {
        run_id: id.to_owned(),
        period_from: 0,
        period_to: now,
        tenant_id: None,
        dry_run: true,
        trigger: "api".to_owned(),
        status: "running".to_owned(),
        summary: None,
        error: None,
        started_at,
        finished_at: None,
    };
    let runs = db.reconciliations();
    runs.start(&run("rec_silent", now - 60_000)).await.unwrap();
    // Started now, not a minute ago: the running service's own check for silent runs must not
    // fail it between its start and its first beat.
    runs.start(&run("rec_beating", now)).await.unwrap();
    // Beating into the future: still beating however long this machine takes to restart the
    // service (a run is interrupted after 30 s of silence).
    runs.beat("rec_beating", now + 600_000).await.unwrap();
    db.close().await;

    let app = app.restart().await;
    let status = |id: &'static str| {
        let app = &app;
        async move {
            app.get_json(&format!("/v1/reconciliations/{id}")).await["status"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(status("rec_silent").await, "failed");
    let beating = match backend {
        Backend::Sqlite => "failed",
        Backend::Postgres => "running",
    };
    assert_eq!(status("rec_beating").await, beating);
    app.stop().await;
}

/// A run stored as `running` at `started_at`, for the store-seeded tests.
fn stored_run(id: &str, started_at: i64) -> billsync::store::RunRow {
    billsync::store::RunRow {
        run_id: id.to_owned(),
        period_from: 0,
        period_to: started_at,
        tenant_id: None,
        dry_run: true,
        trigger: "api".to_owned(),
        status: "running".to_owned(),
        summary: None,
        error: None,
        started_at,
        finished_at: None,
    }
}

/// The ids of a page of `GET /v1/reconciliations`.
fn ids(page: &Value) -> Vec<&str> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_str().unwrap())
        .collect()
}

/// Five runs: one that found something, a clean one, a failed one, and two running that
/// started in the same millisecond (the id breaks the tie).
async fn runs_are_listed_newest_first_a_page_at_a_time_and_filtered(backend: Backend) {
    const SCOPED_KEY: &str = "scoped-acme-key-0123456789";
    let app = TestApp::spawn_with(backend, |s| {
        s.api.tenant_keys = vec![(
            billsync::config::key_digest(SCOPED_KEY).unwrap(),
            vec!["acme".to_owned()],
        )];
    })
    .await;
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    let now = billsync::store::now_ms();
    let id = |n: u32| format!("rec_{n:032x}");
    let runs = db.reconciliations();
    for (n, started_at) in [(1, now - 4000), (2, now - 3000), (3, now - 2000)] {
        runs.start(&stored_run(&id(n), started_at)).await.unwrap();
    }
    runs.start(&stored_run(&id(5), now - 1000)).await.unwrap();
    runs.start(&stored_run(&id(4), now - 1000)).await.unwrap();
    let item = |tenant: &str| {
        let json = json!({"area": "money", "finding": "void", "tenant_id": tenant});
        (
            "money".to_owned(),
            "void".to_owned(),
            Some(tenant.to_owned()),
            json.to_string(),
        )
    };
    let summary = |items: usize| json!({"items": items, "findings": {}}).to_string();
    runs.finish(&id(1), &summary(2), &[item("acme"), item("globex")], now)
        .await
        .unwrap();
    runs.finish(&id(2), &summary(0), &[], now).await.unwrap();
    runs.fail(&id(3), "vendor unavailable", now).await.unwrap();
    db.close().await;

    let all = app.get_json("/v1/reconciliations").await;
    assert_eq!(ids(&all), [id(5), id(4), id(3), id(2), id(1)], "{all:#}");
    assert_eq!(all["next_cursor"], Value::Null);
    let found = &all["data"][4];
    assert_eq!(found["status"], "done");
    assert_eq!(found["summary"]["items"], 2);
    assert!(
        found.get("items").is_none() && found.get("next_cursor").is_none(),
        "a listed run has no items: {found}"
    );
    assert_eq!(
        app.get_json(&format!("/v1/reconciliations/{}", id(1)))
            .await
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "items" && *k != "next_cursor")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<serde_json::Map<_, _>>(),
        *found.as_object().unwrap(),
        "a listed run is the run the single GET shows, without its items"
    );
    assert_eq!(all["data"][2]["error"], "vendor unavailable");

    let mut pages = Vec::new();
    let mut path = "/v1/reconciliations?limit=2".to_owned();
    loop {
        let page = app.get_json(&path).await;
        pages.push(
            ids(&page)
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/reconciliations?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, [vec![id(5), id(4)], vec![id(3), id(2)], vec![id(1)]]);

    for (query, expected) in [
        ("status=done", vec![id(2), id(1)]),
        ("status=failed", vec![id(3)]),
        ("status=running", vec![id(5), id(4)]),
        ("found=true", vec![id(1)]),
        ("found=false", vec![id(2)]),
        ("found=true&status=running", vec![]),
        ("status=done&found=false&limit=1", vec![id(2)]),
    ] {
        let page = app.get_json(&format!("/v1/reconciliations?{query}")).await;
        assert_eq!(ids(&page), expected, "{query}");
    }
    let paged = app
        .get_json("/v1/reconciliations?status=done&limit=1")
        .await;
    let cursor = paged["next_cursor"].as_str().unwrap();
    let next = app
        .get_json(&format!(
            "/v1/reconciliations?status=done&limit=1&cursor={cursor}"
        ))
        .await;
    assert_eq!(
        (ids(&paged), ids(&next)),
        (vec![id(2).as_str()], vec![id(1).as_str()])
    );
    assert_eq!(next["next_cursor"], Value::Null);

    for (query, field) in [
        ("status=succeeded", "status"),
        ("found=yes", "found"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("cursor=zzz", "cursor"),
    ] {
        let response = app
            .v1(Method::GET, &format!("/v1/reconciliations?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(response).await,
            (400, "invalid_value".to_owned(), Some(field.to_owned())),
            "{query}"
        );
    }
    let scoped = app
        .client
        .get(app.url("/v1/reconciliations"))
        .bearer_auth(SCOPED_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(scoped).await, (403, "forbidden".to_owned(), None));
    let anonymous = app
        .client
        .get(app.url("/v1/reconciliations"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    app.stop().await;
}

/// Stripe for the open-period tests: the `calls` meter, each tenant's total on it, and each
/// tenant's subscription with a current period from ten days ago to twenty days ahead.
async fn mount_open_periods(vendor: &MockServer, totals: &[(&str, i64)]) {
    meter_events(vendor, &[], &[]).await;
    Mock::given(method("GET"))
        .and(path("/v1/billing/meters"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"object": "list", "has_more": false,
            "data": [{"id": "mtr_calls", "object": "billing.meter", "event_name": "calls"}]})),
        )
        .mount(vendor)
        .await;
    let current = open_period_subscription;
    for (tenant, total) in totals {
        let customer = format!("cus_{tenant}");
        Mock::given(method("GET"))
            .and(path("/v1/billing/meters/mtr_calls/event_summaries"))
            .and(query_param("customer", customer.as_str()))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"object": "list",
                "has_more": false, "data": [{"object": "billing.meter_event_summary",
                "aggregated_value": total}]})),
            )
            .mount(vendor)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/subscriptions"))
            .and(query_param("customer", customer.as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"object": "list", "has_more": false, "data": [current(tenant)]}),
            ))
            .with_priority(1)
            .mount(vendor)
            .await;
    }
}

/// The tenant, its subscription from `mount_open_periods` (waited for), and 5 calls two days
/// ago, well before the settle point.
pub(crate) async fn subscribed_with_settled_usage(seed: &mut Seed<'_>, tenant: &str) {
    seed.tenant(tenant).await;
    let subscription = open_period_subscription(tenant);
    seed.deliver("customer.subscription.created", subscription)
        .await;
    let app = seed.app;
    wait_for("the subscription", || async {
        app.get_json(&format!("/v1/tenants/{tenant}")).await["subscription"]["status"] == "active"
    })
    .await;
    seed.usage(tenant, now() - 2 * DAY, &[5]).await;
}

/// A tenant's subscription as `mount_open_periods` lists it.
pub(crate) fn open_period_subscription(tenant: &str) -> Value {
    let mut s = subscription(
        &format!("sub_{tenant}"),
        &format!("cus_{tenant}"),
        "price_pro",
        "active",
        1,
    );
    s["items"]["data"][0]["current_period_start"] = json!(now() / 60 * 60 - 10 * DAY);
    s["items"]["data"][0]["current_period_end"] = json!(now() / 60 * 60 + 20 * DAY);
    s
}

/// A service whose tenants each have a current period, 5 pushed and sent before the settle
/// point (backdated), and the given total on Stripe's meter; the continuous check is off until
/// the test turns it on and restarts.
async fn settled_open_periods(
    backend: Backend,
    vendor: &MockServer,
    totals: &[(&str, i64)],
) -> TestApp {
    mount_open_periods(vendor, totals).await;
    let app = service(backend, vendor, |s| {
        s.reconcile.vendor_usage = true;
        s.reconcile.open_check_interval = None;
    })
    .await;
    let mut seed = Seed { app: &app, n: 0 };
    for (tenant, _) in totals {
        subscribed_with_settled_usage(&mut seed, tenant).await;
    }
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    wait_for("every push to be sent", || async {
        let pushes = (db.usage().pushes_between(0, i64::MAX, None).await).unwrap();
        pushes.len() == totals.len() && pushes.iter().all(|p| p.status == "sent")
    })
    .await;
    // As if sent before the settle point.
    let backdate = "UPDATE usage_pushes SET sent_at = sent_at - 600000";
    match &db {
        billsync::store::Db::Sqlite(pool) => sqlx::query(backdate).execute(pool).await.map(drop),
        billsync::store::Db::Postgres(pool) => sqlx::query(backdate).execute(pool).await.map(drop),
    }
    .unwrap();
    db.close().await;
    app
}

/// The value of one series in `/metrics`.
pub(crate) async fn gauge(app: &TestApp, series: &str) -> Option<f64> {
    let text = app.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

pub(crate) const MISSING: &str = r#"billsync_reconcile_open_findings{finding="vendor_missing"} "#;
const EXTRA: &str = r#"billsync_reconcile_open_findings{finding="vendor_extra"} "#;

/// How many meter summaries Stripe was asked for.
async fn summary_calls(vendor: &MockServer) -> usize {
    let asked = vendor.received_requests().await.unwrap_or_default();
    (asked.iter())
        .filter(|r| r.url.path().ends_with("/event_summaries"))
        .count()
}

/// With the check on, a pass compares each tenant's settled open period with Stripe's meter,
/// as a run would, and the metric counts what it found; no run is stored.
async fn the_continuous_check_shows_open_findings_in_metrics(backend: Backend) {
    let vendor = MockServer::start().await;
    let totals = [("less", 3), ("more", 8), ("equal", 5)];
    let mut app = settled_open_periods(backend, &vendor, &totals).await;
    assert_eq!(summary_calls(&vendor).await, 0);
    app.settings.reconcile.open_check_interval = Some(std::time::Duration::from_millis(200));
    let app = app.restart().await;

    wait_for("the open findings in /metrics", || async {
        gauge(&app, MISSING).await == Some(1.0) && gauge(&app, EXTRA).await == Some(1.0)
    })
    .await;
    assert_eq!(summary_calls(&vendor).await, totals.len());
    let runs = app.get_json("/v1/reconciliations").await;
    assert_eq!(runs["data"], json!([]), "{runs:#}");
    app.stop().await;
}

/// With a budget of 2 calls a window and 5 tenants due, a pass asks Stripe twice and carries
/// the other 3 over (in the stored state, which a restarted service goes on from); once the
/// window has passed, later passes check them, each tenant once.
async fn the_continuous_check_spends_its_budget_and_carries_the_rest_over(backend: Backend) {
    let vendor = MockServer::start().await;
    let totals = [("t1", 0), ("t2", 0), ("t3", 0), ("t4", 0), ("t5", 0)];
    let mut app = settled_open_periods(backend, &vendor, &totals).await;
    app.settings.reconcile.open_check_interval = Some(std::time::Duration::from_millis(200));
    app.settings.reconcile.open_check_budget = 2;
    // One window for the whole first part: no more calls can be made in it.
    app.settings.reconcile.open_check_window = std::time::Duration::from_secs(3600);
    let mut app = app.restart().await;

    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    let state = || async {
        billsync::reconcile::OpenCheckState::load(&db)
            .await
            .unwrap()
    };
    wait_for("the first pass", || async { state().await.watermark > 0 }).await;
    let first = state().await;
    assert_eq!(first.pending.len(), 3, "{first:?}");
    assert_eq!(first.spent, 2, "{first:?}");
    assert_eq!(summary_calls(&vendor).await, 2);
    wait_for("the metric", || async {
        gauge(&app, MISSING).await == Some(2.0)
    })
    .await;

    app.settings.reconcile.open_check_window = std::time::Duration::from_millis(300);
    let app = app.restart().await;
    wait_for("every tenant checked", || async {
        gauge(&app, MISSING).await == Some(5.0)
    })
    .await;
    assert!(state().await.pending.is_empty());
    assert_eq!(summary_calls(&vendor).await, totals.len());
    db.close().await;
    app.stop().await;
}
