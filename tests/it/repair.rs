//! Usage Stripe lost, found and repaired before the invoice is final: against a Stripe meter
//! fake that acknowledges every meter event but silently drops the first ones of some
//! customers, and answers its event summaries from what it kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{Backend, TestApp, on_both_backends, wait_for};
use crate::reconcile::{
    DAY, MISSING, Seed, found, gauge, now, open_period_subscription, reconcile, service,
    subscribed_with_settled_usage, window,
};

on_both_backends!(
    lost_usage_is_found_and_repaired_once_and_the_next_pass_changes_nothing,
    a_draft_invoice_is_checked_and_repaired_before_it_is_final,
    a_final_invoice_is_never_repaired,
);

/// One meter event Stripe kept: customer, timestamp (Unix s), value.
type Kept = (String, i64, i64);

/// Stripe's `calls` meter: takes every event (one per identifier), drops the first `drops`
/// events of each customer named, and sums what it kept.
#[derive(Clone, Default)]
struct LossyMeter {
    kept: Arc<Mutex<BTreeMap<String, Kept>>>,
    drops: Arc<Mutex<HashMap<String, usize>>>,
    /// Every identifier it was sent, in order (repeats included).
    received: Arc<Mutex<Vec<String>>>,
}

impl LossyMeter {
    fn dropping(customers: &[(&str, usize)]) -> Self {
        let meter = Self::default();
        let drops = customers.iter().map(|(c, n)| (c.to_string(), *n));
        meter.drops.lock().unwrap().extend(drops);
        meter
    }

    fn total(&self, customer: &str, from: i64, to: i64) -> i64 {
        let kept = self.kept.lock().unwrap();
        (kept.values())
            .filter(|(c, at, _)| c == customer && (from..to).contains(at))
            .map(|(_, _, v)| v)
            .sum()
    }

    fn received(&self, prefix: &str) -> Vec<String> {
        let received = self.received.lock().unwrap();
        (received.iter().filter(|i| i.starts_with(prefix)).cloned()).collect()
    }

    async fn mount(&self, vendor: &MockServer) {
        Mock::given(method("POST"))
            .and(path("/v1/billing/meter_events"))
            .respond_with(Events(self.clone()))
            .mount(vendor)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/billing/meters/mtr_calls/event_summaries"))
            .respond_with(Summaries(self.clone()))
            .mount(vendor)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/billing/meters"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"object": "list",
                "has_more": false, "data": [{"id": "mtr_calls", "object": "billing.meter",
                "event_name": "calls"}]})),
            )
            .mount(vendor)
            .await;
    }
}

struct Events(LossyMeter);

impl Respond for Events {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body = String::from_utf8_lossy(&request.body);
        let form = reqwest::Url::parse(&format!("http://form/?{body}")).unwrap();
        let field: HashMap<String, String> = form.query_pairs().into_owned().collect();
        let identifier = field["identifier"].clone();
        let customer = field["payload[stripe_customer_id]"].clone();
        let meter = &self.0;
        meter.received.lock().unwrap().push(identifier.clone());
        let mut drops = meter.drops.lock().unwrap();
        match drops.get_mut(&customer).filter(|n| **n > 0) {
            Some(left) => *left -= 1,
            None => {
                let value = field["payload[value]"].parse().unwrap();
                let at = field["timestamp"].parse().unwrap();
                let mut kept = meter.kept.lock().unwrap();
                kept.entry(identifier).or_insert((customer, at, value));
            }
        }
        ResponseTemplate::new(200).set_body_json(json!({"object": "billing.meter_event"}))
    }
}

struct Summaries(LossyMeter);

impl Respond for Summaries {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let time = |name: &str| query[name].parse::<i64>().unwrap();
        let total = (self.0).total(&query["customer"], time("start_time"), time("end_time"));
        ResponseTemplate::new(200).set_body_json(json!({"object": "list", "has_more": false,
            "data": [{"object": "billing.meter_event_summary", "aggregated_value": total}]}))
    }
}

/// Each tenant's subscription as Stripe lists it (the drift check asks).
async fn mount_subscriptions(vendor: &MockServer, tenants: &[&str]) {
    for tenant in tenants {
        let listed = json!({"object": "list", "has_more": false,
            "data": [open_period_subscription(tenant)]});
        Mock::given(method("GET"))
            .and(path("/v1/subscriptions"))
            .and(query_param("customer", format!("cus_{tenant}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(listed))
            .mount(vendor)
            .await;
    }
}

/// Runs `sql` on the service's database.
async fn execute(app: &TestApp, sql: &'static str) {
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    match &db {
        billsync::store::Db::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        billsync::store::Db::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop),
    }
    .unwrap();
    db.close().await;
}

/// The push ledger's rows of one kind.
async fn ledger(app: &TestApp, kind: &str) -> Vec<billsync::store::PushRow> {
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    let pushes = db.usage().pushes_between(i64::MIN, i64::MAX, None).await;
    db.close().await;
    (pushes.unwrap().into_iter())
        .filter(|p| p.kind == kind)
        .collect()
}

/// Every usage push sent, then backdated as if sent before the settle point.
async fn settle_pushes(app: &TestApp, count: usize) {
    pushes_sent(app, count).await;
    backdate_pushes(app).await;
}

async fn pushes_sent(app: &TestApp, count: usize) {
    wait_for("every push to be sent", || async {
        let pushes = ledger(app, "usage").await;
        pushes.len() == count && pushes.iter().all(|p| p.status == "sent")
    })
    .await;
}

async fn backdate_pushes(app: &TestApp) {
    execute(app, "UPDATE usage_pushes SET sent_at = sent_at - 600000").await;
}

fn item<'a>(run: &'a Value, finding: &str) -> &'a Value {
    (run["items"].as_array().unwrap().iter())
        .find(|i| i["finding"] == finding)
        .unwrap_or_else(|| panic!("no {finding} in {run:#}"))
}

/// Stripe lost the 5 calls `lossy` pushed. A dry run shows the repair it would push; the
/// continuous check (repair on) finds the loss in one pass and pushes the 5 again, once; a
/// later pass (as if ten minutes later) finds the meter whole and pushes nothing.
async fn lost_usage_is_found_and_repaired_once_and_the_next_pass_changes_nothing(backend: Backend) {
    let vendor = MockServer::start().await;
    let meter = LossyMeter::dropping(&[("cus_lossy", 1)]);
    meter.mount(&vendor).await;
    mount_subscriptions(&vendor, &["lossy", "fine"]).await;
    let app = service(backend, &vendor, |s| {
        s.reconcile.vendor_usage = true;
        s.reconcile.open_check_interval = None;
    })
    .await;
    let mut seed = Seed { app: &app, n: 0 };
    for tenant in ["lossy", "fine"] {
        subscribed_with_settled_usage(&mut seed, tenant).await;
    }
    settle_pushes(&app, 2).await;

    // Repair off (the default), then a dry run with it on: shown, not pushed.
    let off = reconcile(&app, window()).await;
    let lost = BTreeMap::from([("vendor_missing".to_owned(), vec!["lossy".to_owned()])]);
    assert_eq!(found(&off), lost);
    let proposed = &item(&off, "vendor_missing")["repair"];
    assert_eq!(
        (proposed["status"].as_str(), proposed["value"].as_str()),
        (Some("off"), Some("5"))
    );
    let mut app = app;
    app.settings.reconcile.repair = true;
    let mut app = app.restart().await;
    let mut body = window();
    body["dry_run"] = json!(true);
    let dry = reconcile(&app, body).await;
    assert_eq!(found(&dry), lost);
    let proposed = &item(&dry, "vendor_missing")["repair"];
    assert_eq!(
        (proposed["status"].as_str(), proposed["value"].as_str()),
        (Some("dry_run"), Some("5"))
    );
    assert!(meter.received("bsr_").is_empty() && ledger(&app, "repair").await.is_empty());

    app.settings.reconcile.open_check_interval = Some(std::time::Duration::from_millis(200));
    let app = app.restart().await;
    wait_for("the repair", || async { meter.received("bsr_").len() == 1 }).await;
    wait_for("the open finding in /metrics", || async {
        gauge(&app, MISSING).await == Some(1.0)
    })
    .await;
    let repairs = ledger(&app, "repair").await;
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    let repair = &repairs[0];
    assert_eq!(
        (repair.status.as_str(), repair.value.as_str()),
        ("sent", "5")
    );
    assert_eq!(
        meter.received("bsr_"),
        std::slice::from_ref(&repair.push_id)
    );
    let evidence: Value = serde_json::from_str(repair.evidence.as_deref().unwrap()).unwrap();
    assert_eq!(
        (evidence["finding"].as_str(), evidence["vendor"].as_str()),
        (Some("vendor_missing"), Some("0"))
    );
    assert_eq!(
        meter.total("cus_lossy", 0, i64::MAX),
        5,
        "the meter is whole"
    );

    // Ten minutes later: the repair has settled and the pair is due again.
    execute(
        &app,
        "UPDATE usage_pushes SET sent_at = sent_at - 600000 WHERE kind = 'repair'",
    )
    .await;
    let app = rewind_open_check(app, 600_000).await;
    wait_for("the next pass", || async {
        gauge(&app, MISSING).await == Some(0.0)
    })
    .await;
    assert_eq!(meter.received("bsr_").len(), 1, "no second repair");
    assert_eq!(ledger(&app, "repair").await.len(), 1);
    let run = reconcile(&app, window()).await;
    assert_eq!(found(&run), BTreeMap::new(), "{run:#}");
    assert_eq!(meter.received("bsr_").len(), 1);
    app.stop().await;
}

/// Moves the continuous check's watermark back, as if its last pass were `ms` earlier (with the
/// check stopped meanwhile, so that no pass overwrites it).
async fn rewind_open_check(mut app: TestApp, ms: i64) -> TestApp {
    let interval = app.settings.reconcile.open_check_interval.take();
    let mut app = app.restart().await;
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    let mut state = billsync::reconcile::OpenCheckState::load(&db)
        .await
        .unwrap();
    state.watermark -= ms;
    state.save(&db).await.unwrap();
    db.close().await;
    app.settings.reconcile.open_check_interval = interval;
    app.restart().await
}

/// The period that just ended (P1) and the current one (P2), Unix s, on the minute.
fn periods() -> ((i64, i64), (i64, i64)) {
    let renewed = now() / 60 * 60 - DAY;
    ((renewed - 30 * DAY, renewed), (renewed, renewed + 30 * DAY))
}

/// The tenant's subscription in `period`, as webhooks and Stripe's list show it.
fn subscription_in(tenant: &str, (start, end): (i64, i64)) -> Value {
    let mut s = open_period_subscription(tenant);
    s["items"]["data"][0]["current_period_start"] = json!(start);
    s["items"]["data"][0]["current_period_end"] = json!(end);
    s
}

/// The renewal invoice billing P1's calls: `quantity` on its metered line.
fn renewal_invoice(tenant: &str, status: &str, quantity: i64) -> Value {
    let ((start, end), _) = periods();
    json!({"id": format!("in_{tenant}"), "object": "invoice", "customer": format!("cus_{tenant}"),
        "subscription": format!("sub_{tenant}"), "status": status, "currency": "eur",
        "total": 0, "amount_due": 0, "amount_paid": 0, "amount_remaining": 0,
        "created": end + 60, "period_start": start, "period_end": end,
        "status_transitions": {"finalized_at": (status != "draft").then_some(end + 3600)},
        "lines": {"object": "list", "data": [{"id": format!("il_{tenant}"), "object": "line_item",
            "amount": quantity * 10, "currency": "eur", "quantity": quantity,
            "price": {"id": "price_calls"}, "period": {"start": start, "end": end}}]}})
}

/// A service whose tenant pushed 5 calls in P1, which Stripe acknowledged and lost, settled
/// (backdated); then renewed into P2. Repair is on; the continuous check runs every `interval`.
async fn renewed_with_lost_usage(
    backend: Backend,
    vendor: &MockServer,
    tenant: &str,
    interval: std::time::Duration,
) -> (TestApp, LossyMeter) {
    let meter = LossyMeter::dropping(&[(&format!("cus_{tenant}"), 1)]);
    meter.mount(vendor).await;
    let (p1, p2) = periods();
    let listed =
        json!({"object": "list", "has_more": false, "data": [subscription_in(tenant, p2)]});
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(listed))
        .mount(vendor)
        .await;
    let app = service(backend, vendor, |s| {
        s.reconcile.vendor_usage = true;
        s.reconcile.repair = true;
        s.reconcile.open_check_interval = Some(interval);
    })
    .await;
    let mut seed = Seed { app: &app, n: 0 };
    seed.tenant(tenant).await;
    seed.deliver("customer.subscription.created", subscription_in(tenant, p1))
        .await;
    wait_for("the subscription", || async {
        app.get_json(&format!("/v1/tenants/{tenant}")).await["subscription"]["status"] == "active"
    })
    .await;
    seed.usage(tenant, p1.1 - DAY, &[5]).await;
    pushes_sent(&app, 1).await;
    // Renewed before the pushes settle: no pass of the check may find P1 still open.
    let period = |t: Value| t["subscription"]["current_period_start"].clone();
    let first = period(app.get_json(&format!("/v1/tenants/{tenant}")).await);
    seed.deliver("customer.subscription.updated", subscription_in(tenant, p2))
        .await;
    wait_for("the renewal", || async {
        period(app.get_json(&format!("/v1/tenants/{tenant}")).await) != first
    })
    .await;
    backdate_pushes(&app).await;
    (app, meter)
}

/// A draft invoice of P1 wakes the check at once (its interval is an hour): a stored run
/// (trigger `draft_invoice`) finds the loss and repairs it while the invoice is a draft. Once
/// Stripe finalizes it (simulated), with the repaired quantity, a run finds nothing.
async fn a_draft_invoice_is_checked_and_repaired_before_it_is_final(backend: Backend) {
    let vendor = MockServer::start().await;
    let hour = std::time::Duration::from_secs(3600);
    let (app, meter) = renewed_with_lost_usage(backend, &vendor, "drafty", hour).await;
    let mut seed = Seed { app: &app, n: 100 };
    seed.deliver("invoice.created", renewal_invoice("drafty", "draft", 0))
        .await;

    let runs = || async { app.get_json("/v1/reconciliations").await["data"].clone() };
    wait_for("the draft's run", || async {
        runs()
            .await
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == "done")
    })
    .await;
    let listed = runs().await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed[0]["trigger"], "draft_invoice");
    assert_eq!(listed[0]["summary"]["invoice"], "in_drafty");
    let run = app
        .get_json(&format!(
            "/v1/reconciliations/{}",
            listed[0]["id"].as_str().unwrap()
        ))
        .await;
    let missing = item(&run, "vendor_missing");
    assert_eq!(missing["evidence"]["invoice"], "in_drafty");
    let repair = &missing["repair"];
    assert_eq!(
        (repair["status"].as_str(), repair["value"].as_str()),
        (Some("sent"), Some("5"))
    );
    assert_eq!(repair["before_finalization"], true, "{missing:#}");
    let ((start, end), _) = periods();
    assert_eq!(
        meter.total("cus_drafty", start, end),
        5,
        "the draft's period is whole"
    );
    assert_eq!(meter.received("bsr_").len(), 1);

    // Stripe finalizes the invoice with what its meter holds now.
    seed.deliver("invoice.finalized", renewal_invoice("drafty", "open", 5))
        .await;
    let run = reconcile(&app, window()).await;
    let usage: Vec<&Value> = (run["items"].as_array().unwrap().iter())
        .filter(|i| i["area"] == "usage")
        .collect();
    assert!(usage.is_empty(), "{run:#}");
    assert_eq!(meter.received("bsr_").len(), 1);
    app.stop().await;
}

/// An invoice that arrives final (no draft seen) is never repaired, by the check or a run:
/// the run reports `vendor_mismatch` with its remedy.
async fn a_final_invoice_is_never_repaired(backend: Backend) {
    let vendor = MockServer::start().await;
    let often = std::time::Duration::from_millis(200);
    let (app, meter) = renewed_with_lost_usage(backend, &vendor, "closed", often).await;
    let mut seed = Seed { app: &app, n: 100 };
    seed.deliver("invoice.finalized", renewal_invoice("closed", "open", 0))
        .await;

    let run = reconcile(&app, window()).await;
    let mismatch = item(&run, "vendor_mismatch");
    assert_eq!(
        (mismatch["pushed"].as_str(), mismatch["vendor"].as_str()),
        (Some("5"), Some("0"))
    );
    assert!(
        mismatch["remedy"]
            .as_str()
            .unwrap()
            .contains("never repaired"),
        "{mismatch:#}"
    );
    assert!(mismatch.get("repair").is_none(), "{mismatch:#}");
    // Passes of the check come and go (every 200 ms, each exporting the gauge).
    wait_for("a pass", || async { gauge(&app, MISSING).await.is_some() }).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert!(meter.received("bsr_").is_empty());
    assert!(ledger(&app, "repair").await.is_empty());
    app.stop().await;
}
