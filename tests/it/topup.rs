//! Low balance and auto top-up (issue 20, must-have 4), over HTTP against a wiremock Stripe
//! that honours idempotency keys (a repeated key answers the first answer and makes nothing)
//! and a wiremock receiver of notifications: a crossing notifies once and tops up once through
//! failures of Stripe and of the receiver, and across two replicas; the signature verifies;
//! the alarm re-arms after the top-up.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use billsync::store::{Db, now_ms};
use billsync::topup::BalanceChange;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sha2::Sha256;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::commands::form;
use crate::entitlements::onboard;
use crate::helpers::{
    Backend, TestApp, error_of, event, on_both_backends, take_webhooks, use_test_catalog,
    use_vendor, wait_for,
};

on_both_backends!(
    settings_are_exact_and_validated,
    a_crossing_notifies_once_and_tops_up_once_through_failures,
    the_alarm_rearms_after_the_top_up_and_crosses_again,
    burns_over_http_cross_and_the_top_ups_grant_rearms,
    reconciliation_finds_a_seeded_difference_between_burns_and_debits,
);

mod postgres_replicas {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_deliver_once_and_top_up_once() {
        super::two_replicas_deliver_once_and_top_up_once().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_killed_mid_top_up_and_mid_delivery_duplicates_nothing() {
        super::a_replica_killed_mid_top_up_and_mid_delivery_duplicates_nothing().await
    }
}

const SECRET: &str = "notify_secret_for_tests";

/// The Stripe fake: what each idempotency key answered, and steps to fail once.
#[derive(Default)]
pub(crate) struct Stripe {
    answers: BTreeMap<String, Value>,
    pub(crate) created: BTreeMap<&'static str, u32>,
    fail_once: HashSet<&'static str>,
    next: u32,
    /// What `GET /v1/billing/credit_balance_transactions` lists.
    transactions: Vec<Value>,
    /// Steps whose first answer is made and kept but comes back too late (the caller dies).
    hang_once: HashSet<&'static str>,
    /// Every payment is declined (402 `card_declined`), as for a card without funds.
    pub(crate) decline: bool,
    /// Every write answers 503.
    pub(crate) unavailable: bool,
}

pub(crate) type Shared = Arc<Mutex<Stripe>>;

struct StripeHandler(Shared);

impl Respond for StripeHandler {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut stripe = self.0.lock().unwrap();
        let path = request.url.path().to_owned();
        let f = form(request);
        let step: &'static str = match path.as_str() {
            "/v1/invoices" => "invoice",
            "/v1/invoiceitems" => "item",
            "/v1/billing/credit_grants" => "grant",
            p if p.ends_with("/finalize") => "finalize",
            p if p.ends_with("/pay") => "pay",
            "/v1/billing/credit_balance_transactions" => {
                let data = stripe.transactions.clone();
                return ResponseTemplate::new(200)
                    .set_body_json(json!({"object": "list", "has_more": false, "data": data}));
            }
            p if p.starts_with("/v1/invoices/") && request.method.as_str() == "GET" => {
                let id = p.trim_start_matches("/v1/invoices/");
                return ResponseTemplate::new(200)
                    .set_body_json(json!({"id": id, "object": "invoice", "status": "paid"}));
            }
            // Every other list (drift's subscriptions, meters): empty.
            _ if request.method.as_str() == "GET" => {
                return ResponseTemplate::new(200)
                    .set_body_json(json!({"object": "list", "has_more": false, "data": []}));
            }
            _ => {
                return ResponseTemplate::new(404)
                    .set_body_json(json!({"error": {"message": "unknown"}}));
            }
        };
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .expect("every write carries an idempotency key")
            .to_owned();
        if let Some(answer) = stripe.answers.get(&key) {
            return ResponseTemplate::new(200).set_body_json(answer.clone());
        }
        if stripe.unavailable {
            return ResponseTemplate::new(503).set_body_json(json!({"error": {"message": "down"}}));
        }
        if stripe.decline && step == "pay" {
            *stripe.created.entry("declined").or_default() += 1;
            return ResponseTemplate::new(402).set_body_json(json!({"error": {
                "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
                "message": "Your card was declined."}}));
        }
        if stripe.fail_once.remove(step) {
            return ResponseTemplate::new(500).set_body_json(json!({"error": {"message": "boom"}}));
        }
        stripe.next += 1;
        let n = stripe.next;
        let answer = match step {
            "invoice" => json!({"id": format!("in_{n}"), "object": "invoice", "status": "draft",
                "customer": f["customer"], "currency": f["currency"]}),
            "item" => {
                json!({"id": format!("ii_{n}"), "object": "invoiceitem", "invoice": f["invoice"],
                "amount": f["amount"].parse::<i64>().unwrap()})
            }
            "finalize" => {
                json!({"id": path.split('/').nth(3), "object": "invoice", "status": "open"})
            }
            "pay" => json!({"id": path.split('/').nth(3), "object": "invoice", "status": "paid"}),
            _ => json!({"id": format!("credgr_{n}"), "object": "billing.credit_grant",
                "customer": f["customer"], "category": f["category"],
                "amount": {"type": "monetary", "monetary": {
                    "value": f["amount[monetary][value]"].parse::<i64>().unwrap(),
                    "currency": f["amount[monetary][currency]"]}},
                "metadata": {"billsync_command": f.get("metadata[billsync_command]")}}),
        };
        *stripe.created.entry(step).or_default() += 1;
        stripe.answers.insert(key, answer.clone());
        let response = ResponseTemplate::new(200).set_body_json(answer);
        if stripe.hang_once.remove(step) {
            return response.set_delay(std::time::Duration::from_secs(30));
        }
        response
    }
}

/// The product's receiver: every request it got, and how many to refuse with 500 first.
#[derive(Default)]
pub(crate) struct Receiver {
    pub(crate) got: Vec<(BTreeMap<String, String>, String)>,
    refuse: u32,
    /// Take the first delivery but answer too late (the deliverer dies first).
    hang_first: bool,
}

struct ReceiverHandler(Arc<Mutex<Receiver>>);

impl Respond for ReceiverHandler {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut receiver = self.0.lock().unwrap();
        let headers = request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        receiver
            .got
            .push((headers, String::from_utf8_lossy(&request.body).into_owned()));
        if std::mem::take(&mut receiver.hang_first) {
            return ResponseTemplate::new(204).set_delay(std::time::Duration::from_secs(30));
        }
        if receiver.refuse > 0 {
            receiver.refuse -= 1;
            return ResponseTemplate::new(500);
        }
        ResponseTemplate::new(204)
    }
}

pub(crate) struct World {
    pub(crate) app: TestApp,
    pub(crate) stripe: Shared,
    pub(crate) receiver: Arc<Mutex<Receiver>>,
    pub(crate) db: Db,
    _servers: (MockServer, MockServer),
}

async fn world(backend: Backend, refuse: u32, fail_once: &[&'static str]) -> World {
    world_with(backend, refuse, fail_once, |_| {}).await
}

/// [`world`], with more settings changed by `adjust`.
pub(crate) async fn world_with(
    backend: Backend,
    refuse: u32,
    fail_once: &[&'static str],
    adjust: impl FnOnce(&mut billsync::config::Settings),
) -> World {
    let stripe_server = MockServer::start().await;
    let stripe: Shared = Arc::default();
    stripe.lock().unwrap().fail_once = fail_once.iter().copied().collect();
    Mock::given(any())
        .respond_with(StripeHandler(stripe.clone()))
        .mount(&stripe_server)
        .await;
    let receiver_server = MockServer::start().await;
    let receiver = Arc::new(Mutex::new(Receiver {
        refuse,
        ..Receiver::default()
    }));
    Mock::given(any())
        .respond_with(ReceiverHandler(receiver.clone()))
        .mount(&receiver_server)
        .await;
    let (stripe_uri, receiver_uri) = (stripe_server.uri(), receiver_server.uri());
    let app = TestApp::spawn_with(backend, |s| {
        use_vendor(s, &stripe_uri);
        use_test_catalog(s);
        take_webhooks(s);
        s.stripe.refetch = false;
        // A failed call fails the attempt at once: the command's next attempt replays.
        s.stripe.max_retries = 0;
        s.notify.url = Some(format!("{receiver_uri}/hooks/billsync"));
        s.notify.secret = Some(billsync::config::Secret::new(SECRET));
        s.notify.max_retry_delay = std::time::Duration::from_millis(50);
        // A dead replica's command is taken over within a second.
        s.claims.commands = std::time::Duration::from_secs(1);
        adjust(s);
    })
    .await;
    onboard(&app, "acme", "cus_acme", json!({})).await;
    let db = Db::connect(&app.settings.database).await.unwrap();
    World {
        app,
        stripe,
        receiver,
        db,
        _servers: (stripe_server, receiver_server),
    }
}

fn change(before: i64, after: i64) -> BalanceChange<'static> {
    BalanceChange {
        tenant_id: "acme",
        unit: "usd",
        available_before: Decimal::from(before),
        available_after: Decimal::from(after),
    }
}

/// The crossing a change of acme's `usd` balance made, if any (in a transaction of its own).
pub(crate) async fn crossed(db: &Db, before: i64, after: i64) -> Option<i64> {
    let alerts = db.credit_alerts();
    alerts
        .balance_changed(&change(before, after), now_ms())
        .await
        .unwrap()
}

async fn put_settings(app: &TestApp, unit: &str, body: Value) -> reqwest::Response {
    app.v1(
        Method::PUT,
        &format!("/v1/tenants/acme/credits/settings/{unit}"),
    )
    .json(&body)
    .send()
    .await
    .unwrap()
}

pub(crate) async fn auto_top_up(app: &TestApp) {
    let body = json!({"threshold": 500, "top_up_amount": "2000", "auto_top_up": true});
    assert_eq!(put_settings(app, "usd", body).await.status(), 200);
}

/// Verifies a delivery's `Billsync-Signature` as a receiver would.
pub(crate) fn verify(headers: &BTreeMap<String, String>, body: &str) -> bool {
    let signature = &headers["billsync-signature"];
    let (t, v1) = signature
        .split_once(",v1=")
        .map(|(t, v)| (t.trim_start_matches("t="), v))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    mac.verify_slice(&hex::decode(v1).unwrap()).is_ok()
}

pub(crate) async fn command_status(app: &TestApp, id: &str) -> String {
    let command = app.get_json(&format!("/v1/commands/{id}")).await;
    command["status"].as_str().unwrap().to_owned()
}

async fn settings_are_exact_and_validated(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        take_webhooks(s);
        s.stripe.refetch = false;
    })
    .await;
    onboard(&app, "acme", "cus_acme", json!({})).await;
    let refused = [
        ("usd", json!({"threshold": "5.5"}), "threshold"),
        ("usd", json!({"threshold": -1}), "threshold"),
        ("usd", json!({"threshold": "1e3"}), "threshold"),
        (
            "usd",
            json!({"threshold": 5, "top_up_amount": "12.5"}),
            "top_up_amount",
        ),
        (
            "usd",
            json!({"threshold": 5, "top_up_amount": 0}),
            "top_up_amount",
        ),
        (
            "usd",
            json!({"threshold": 5, "auto_top_up": true}),
            "auto_top_up",
        ),
        (
            "credits",
            json!({"threshold": 5, "top_up_amount": 100}),
            "top_up_amount",
        ),
        ("USD", json!({"threshold": 5}), "unit"),
    ];
    for (unit, body, field) in refused {
        let (status, code, got) = error_of(put_settings(&app, unit, body.clone()).await).await;
        assert_eq!((status, code.as_str()), (400, "invalid_value"), "{body}");
        assert_eq!(got.as_deref(), Some(field), "{body}");
    }
    assert!(
        app.get_json("/v1/tenants/acme/credits/settings").await["data"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A JSON number is read from its text, exactly.
    let exact = app
        .v1(Method::PUT, "/v1/tenants/acme/credits/settings/credits")
        .header("content-type", "application/json")
        .body(r#"{"threshold": 0.00000000000000000000000001}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(exact.status(), 200);
    let usd = json!({"threshold": 500, "top_up_amount": 2000, "auto_top_up": true});
    assert_eq!(put_settings(&app, "usd", usd).await.status(), 200);
    let listed = app.get_json("/v1/tenants/acme/credits/settings").await;
    assert_eq!(listed["data"][0]["unit"], "credits");
    assert_eq!(
        listed["data"][0]["threshold"],
        "0.00000000000000000000000001"
    );
    assert_eq!(listed["data"][1]["top_up_amount"], 2000);
    assert_eq!(listed["data"][1]["armed"], true);
    let missing = app
        .v1(Method::PUT, "/v1/tenants/nobody/credits/settings/usd")
        .json(&json!({"threshold": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

async fn a_crossing_notifies_once_and_tops_up_once_through_failures(backend: Backend) {
    // The receiver refuses twice; Stripe fails the payment and the grant once each.
    let w = world(backend, 2, &["pay", "grant"]).await;
    auto_top_up(&w.app).await;
    let alerts = w.db.credit_alerts();
    assert_eq!(crossed(&w.db, 900, 600).await, None);
    assert_eq!(crossed(&w.db, 600, 400).await, Some(1));
    // Further burns below the threshold: no second crossing.
    assert_eq!(crossed(&w.db, 400, 100).await, None);
    let crossings = alerts.crossings("acme", "usd").await.unwrap();
    assert_eq!(crossings.len(), 1);
    let command = crossings[0].command_id.clone().unwrap();
    wait_for("the top-up", || async {
        command_status(&w.app, &command).await == "succeeded"
    })
    .await;
    let got = w.app.get_json(&format!("/v1/commands/{command}")).await;
    assert_eq!(got["kind"], "credits.top_up");
    assert_eq!(got["top_up"]["invoice_id"], "in_1", "{got}");
    assert!(
        got["top_up"]["credit_grant_id"]
            .as_str()
            .unwrap()
            .starts_with("credgr_")
    );
    assert!(got["attempts"].as_i64().unwrap() >= 3, "{got}");
    let created = w.stripe.lock().unwrap().created.clone();
    for step in ["invoice", "item", "finalize", "pay", "grant"] {
        assert_eq!(created.get(step), Some(&1), "{step}: {created:?}");
    }
    wait_for("the notification", || async {
        let page = w.app.get_json("/v1/notifications?tenant_id=acme").await;
        page["data"][0]["status"] == "delivered"
    })
    .await;
    let page = w.app.get_json("/v1/notifications").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let note = &page["data"][0];
    assert_eq!(
        (note["attempts"].as_i64(), note["type"].as_str()),
        (Some(3), Some("credits.balance_low"))
    );
    assert_eq!(
        note["payload"]["data"]["top_up"]["command_id"],
        json!(command)
    );
    assert_eq!(note["payload"]["data"]["available_after"], "400");
    let receiver = w.receiver.lock().unwrap();
    assert_eq!(receiver.got.len(), 3);
    for (headers, body) in &receiver.got {
        assert!(verify(headers, body), "signature of {body}");
        assert_eq!(headers["billsync-event-id"], note["id"].as_str().unwrap());
        assert_eq!(body, &receiver.got[0].1, "the same body every time");
    }
    let (headers, body) = &receiver.got[0];
    let tampered = body.replace("400", "401");
    assert!(!verify(headers, &tampered));
}

async fn the_alarm_rearms_after_the_top_up_and_crosses_again(backend: Backend) {
    let w = world(backend, 0, &[]).await;
    auto_top_up(&w.app).await;
    let alerts = w.db.credit_alerts();
    assert_eq!(crossed(&w.db, 500, 499).await, Some(1));
    let settings = w.app.get_json("/v1/tenants/acme/credits/settings").await;
    assert_eq!(settings["data"][0]["armed"], false);
    // The top-up's grant arrives: 499 + 2000.
    assert_eq!(crossed(&w.db, 499, 2499).await, None);
    let settings = w.app.get_json("/v1/tenants/acme/credits/settings").await;
    assert_eq!(settings["data"][0]["armed"], true);
    assert_eq!(crossed(&w.db, 2499, 10).await, Some(2));
    let crossings = alerts.crossings("acme", "usd").await.unwrap();
    assert_eq!(crossings.len(), 2);
    for crossing in &crossings {
        let id = crossing.command_id.clone().unwrap();
        wait_for("each top-up", || async {
            command_status(&w.app, &id).await == "succeeded"
        })
        .await;
    }
    assert_eq!(w.stripe.lock().unwrap().created.get("grant"), Some(&2));
    wait_for("two notifications delivered", || async {
        let page = w.app.get_json("/v1/notifications?status=delivered").await;
        page["data"].as_array().unwrap().len() == 2
    })
    .await;
    assert_eq!(w.receiver.lock().unwrap().got.len(), 2);
}

/// A monetary grant of `cents` for `cus_acme`, effective an hour ago.
fn usd_grant(id: &str, cents: i64) -> Value {
    let at = chrono::Utc::now().timestamp() - 3600;
    json!({"id": id, "object": "billing.credit_grant", "customer": "cus_acme",
        "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": cents}},
        "applicability_config": {"scope": {"price_type": "metered"}}, "category": "paid",
        "created": at, "effective_at": at, "expires_at": null, "voided_at": null,
        "priority": 50, "livemode": false, "metadata": {}, "updated": at})
}

async fn grant_arrives(app: &TestApp, grant: Value) {
    let id = format!("evt_{}", uuid::Uuid::new_v4().simple());
    let now = chrono::Utc::now().timestamp();
    app.deliver(&event(&id, "billing.credit_grant.created", now, grant))
        .await;
    wait_for("the grant applied", || async {
        app.get_json("/v1/sync/status").await["inbox"]["pending"] == 0
    })
    .await;
}

/// Check-and-records `seconds` of `gpu_minutes` (0.0167 usd cents a second); asserts it was
/// allowed.
async fn burn(app: &TestApp, seconds: i64, id: &str) {
    let body = json!({"feature": "gpu_minutes", "quantity": seconds, "record": {"id": id}});
    let answer = app.check_body("acme", body).await;
    assert_eq!(answer["allowed"], true, "{answer}");
}

async fn burns_over_http_cross_and_the_top_ups_grant_rearms(backend: Backend) {
    let w = world(backend, 0, &[]).await;
    grant_arrives(&w.app, usd_grant("credgr_first", 1000)).await;
    auto_top_up(&w.app).await;
    let alerts = w.db.credit_alerts();
    burn(&w.app, 20_000, "u1").await; // 334 cents: 666 left
    assert!(alerts.crossings("acme", "usd").await.unwrap().is_empty());
    burn(&w.app, 10_000, "u2").await; // 167 cents: 499 left, below 500
    burn(&w.app, 100, "u3").await; // further below: no second crossing
    let crossings = alerts.crossings("acme", "usd").await.unwrap();
    assert_eq!(crossings.len(), 1);
    assert_eq!(
        (
            crossings[0].available_before.as_str(),
            crossings[0].available_after.as_str()
        ),
        ("666", "499")
    );
    let command = crossings[0].command_id.clone().unwrap();
    wait_for("the top-up", || async {
        command_status(&w.app, &command).await == "succeeded"
    })
    .await;
    // The top-up's grant comes back from Stripe: the alarm re-arms (just after the apply).
    grant_arrives(&w.app, usd_grant("credgr_topup", 2000)).await;
    wait_for("the alarm re-armed", || async {
        let settings = w.app.get_json("/v1/tenants/acme/credits/settings").await;
        settings["data"][0]["armed"] == true
    })
    .await;
    burn(&w.app, 120_000, "u4").await; // 2004 cents: 2497.33 - 2004 = 493.33 left
    assert_eq!(alerts.crossings("acme", "usd").await.unwrap().len(), 2);
    wait_for("two notifications delivered", || async {
        let page = w.app.get_json("/v1/notifications?status=delivered").await;
        page["data"].as_array().unwrap().len() == 2
    })
    .await;
}

/// Waits until `app` has ended the first crossing's top-up and delivered its notification;
/// the command's id.
async fn top_up_done_and_delivered(app: &TestApp, db: &Db) -> String {
    let crossings = db.credit_alerts().crossings("acme", "usd").await.unwrap();
    let command = crossings[0].command_id.clone().unwrap();
    wait_for("the top-up", || async {
        command_status(app, &command).await == "succeeded"
    })
    .await;
    wait_for("the notification", || async {
        let page = app.get_json("/v1/notifications").await;
        page["data"][0]["status"] == "delivered"
    })
    .await;
    command
}

async fn two_replicas_deliver_once_and_top_up_once() {
    let w = world(Backend::Postgres, 0, &[]).await;
    let replica = w.app.replica().await;
    auto_top_up(&w.app).await;
    // The same crossing seen by two transactions at once: one takes it. Both read the armed
    // settings and then wait for the row, held here, so they are truly at once: run one after
    // the other, the second would count a crossing of its own (its balance starts above).
    let pool = sqlx::PgPool::connect(w.app.settings.database.url.expose())
        .await
        .unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM credit_settings WHERE tenant_id = 'acme' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let judge = |db: Db| {
        tokio::spawn(async move {
            db.credit_alerts()
                .balance_changed(&change(600, 400), now_ms())
                .await
                .unwrap()
        })
    };
    let a = judge(w.db.clone());
    let b = judge(Db::connect(&w.app.settings.database).await.unwrap());
    wait_for("both transactions waiting for the settings row", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'UPDATE credit_settings%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        waiting == 2
    })
    .await;
    holder.rollback().await.unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.into_iter().chain(b).collect::<Vec<_>>(), vec![1]);
    top_up_done_and_delivered(&replica, &w.db).await;
    // Both replicas run the outbox and stand for the notify lease; a second pass would show.
    let status = replica.get_json("/v1/sync/status").await;
    assert_eq!(status["notifications"]["pending"], 0);
    wait_for("both replicas idle a while", || async {
        let stripe = w.stripe.lock().unwrap().answers.len();
        stripe == 5
    })
    .await;
    assert_eq!(w.receiver.lock().unwrap().got.len(), 1);
    assert_eq!(w.stripe.lock().unwrap().created.get("grant"), Some(&1));
    replica.stop().await;
}

fn debit(id: &str, cents: Value) -> Value {
    json!({"id": id, "object": "billing.credit_balance_transaction", "type": "debit",
        "created": chrono::Utc::now().timestamp(), "effective_at": chrono::Utc::now().timestamp(),
        "credit_grant": "credgr_first", "livemode": false,
        "debit": {"type": "credits_applied", "amount": {"type": "monetary",
            "monetary": {"currency": "usd", "value": cents}}}})
}

async fn reconciliation_finds_a_seeded_difference_between_burns_and_debits(backend: Backend) {
    let w = world(backend, 0, &[]).await;
    grant_arrives(&w.app, usd_grant("credgr_first", 1000)).await;
    burn(&w.app, 20_000, "u1").await; // 334 cents
    burn(&w.app, 30, "u2").await; // 0.501 cents
    let window =
        json!({"from": "2026-01-01", "to": "2099-01-01", "tenant": "acme", "dry_run": true});
    // Stripe debited what billsync burned, in whole cents (and a value as a string): agreed.
    w.stripe.lock().unwrap().transactions =
        vec![debit("cbtxn_1", json!(300)), debit("cbtxn_2", json!("34"))];
    let run = crate::reconcile::reconcile(&w.app, window.clone()).await;
    let credits: Vec<&Value> = (run["items"].as_array().unwrap().iter())
        .filter(|i| i["area"] == "credits")
        .collect();
    assert!(credits.is_empty(), "{run}");
    // A debit Stripe lost: the difference, itemised with its evidence.
    w.stripe.lock().unwrap().transactions = vec![debit("cbtxn_1", json!(300))];
    let run = crate::reconcile::reconcile(&w.app, window).await;
    let credits: Vec<&Value> = (run["items"].as_array().unwrap().iter())
        .filter(|i| i["area"] == "credits")
        .collect();
    assert_eq!(credits.len(), 1, "{run}");
    let item = credits[0];
    assert_eq!(item["finding"], "credit_mismatch");
    assert_eq!(item["tenant_id"], "acme");
    assert_eq!(
        (
            item["burned"].as_str(),
            item["vendor_debited"].as_str(),
            item["difference"].as_str()
        ),
        (Some("334.501"), Some("300"), Some("34.501"))
    );
    assert_eq!(item["evidence"]["transactions"], json!(["cbtxn_1"]));
}

async fn a_replica_killed_mid_top_up_and_mid_delivery_duplicates_nothing() {
    let w = world(Backend::Postgres, 0, &[]).await;
    // Stripe makes the grant but its answer never reaches the first replica; the receiver
    // takes the first delivery but its 2xx never reaches the first replica either.
    w.stripe.lock().unwrap().hang_once.insert("grant");
    w.receiver.lock().unwrap().hang_first = true;
    auto_top_up(&w.app).await;
    assert_eq!(crossed(&w.db, 600, 400).await, Some(1));
    wait_for("the grant made and the delivery received", || async {
        let granted = w.stripe.lock().unwrap().created.get("grant") == Some(&1);
        granted && w.receiver.lock().unwrap().got.len() == 1
    })
    .await;
    let survivor = w.app.replica().await;
    let World {
        app,
        stripe,
        receiver,
        db,
        _servers,
    } = w;
    let _database = app.crash();
    top_up_done_and_delivered(&survivor, &db).await;
    let created = stripe.lock().unwrap().created.clone();
    for step in ["invoice", "item", "finalize", "pay", "grant"] {
        assert_eq!(created.get(step), Some(&1), "{step}: {created:?}");
    }
    let got = receiver.lock().unwrap().got.clone();
    assert_eq!(
        got.len(),
        2,
        "at least once: delivered again after the crash"
    );
    assert_eq!(got[0].0["billsync-event-id"], got[1].0["billsync-event-id"]);
    assert_eq!(got[0].1, got[1].1);
    survivor.stop().await;
}
