//! Self-serve changes through the outbox against a wiremock Stripe that keeps state (customers
//! and subscriptions), with faults put in front of it: retries keep their idempotency key, a
//! crash between the vendor's answer and its record changes nothing twice, a dashboard edit in
//! between ends in conflict.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{
    Backend, TestApp, error_of, on_both_backends, take_webhooks, use_test_catalog, use_vendor,
    wait_for,
};

on_both_backends!(
    putting_a_tenant_creates_its_customer_once_and_carries_changes,
    a_500_is_retried_with_the_same_key_and_changes_the_vendor_once,
    a_429_with_should_retry_is_retried,
    a_card_error_fails_the_command_with_the_vendors_message,
    a_dashboard_edit_in_between_ends_in_conflict,
    a_crash_between_the_answer_and_its_record_changes_the_vendor_once,
    the_clients_idempotency_key_replays_or_refuses,
    cancel_at_period_end_and_resume_follow_the_vendor,
    cancel_now_ends_the_subscription_and_the_plan,
    the_echo_of_an_own_command_is_recognised_and_changes_nothing,
    the_late_echo_of_an_earlier_command_never_replaces_a_later_answer,
    bad_requests_are_refused_and_nothing_is_stored,
    the_preview_asks_the_vendor_and_changes_nothing,
    a_commands_answer_never_replaces_a_state_fetched_after_its_write_was_sent,
    a_fetch_that_reached_the_vendor_before_the_write_cannot_hide_the_change,
    a_stale_mirror_after_an_own_change_makes_no_conflict,
    the_echo_of_an_own_change_sets_a_stale_mirror_right,
);

/// The fake's state: customers and subscriptions by id, created in order.
#[derive(Default)]
struct Stripe {
    customers: BTreeMap<String, Value>,
    subscriptions: BTreeMap<String, Value>,
    next: u32,
}

type Shared = Arc<Mutex<Stripe>>;

pub(crate) fn form(request: &Request) -> BTreeMap<String, String> {
    let body = String::from_utf8_lossy(&request.body);
    reqwest::Url::parse(&format!("http://x/?{body}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn metadata(form: &BTreeMap<String, String>) -> Value {
    let pairs: serde_json::Map<String, Value> = form
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((key.to_owned(), json!(v)))
        })
        .collect();
    Value::Object(pairs)
}

fn sub_object(id: &str, customer: &str, price: &str, quantity: i64, metadata: Value) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "id": id, "object": "subscription", "customer": customer, "status": "active",
        "created": now, "cancel_at_period_end": false, "cancel_at": null, "trial_end": null,
        "metadata": metadata,
        "items": {"object": "list", "has_more": false, "data": [{
            "id": format!("si_{id}"), "object": "subscription_item", "quantity": quantity,
            "price": {"id": price, "object": "price"},
            "current_period_start": now - 86_400, "current_period_end": now + 29 * 86_400
        }]}
    })
}

/// Answers the Stripe calls billsync's outbox makes, keeping what they change.
struct Handler(Shared);

impl Respond for Handler {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut stripe = self.0.lock().unwrap();
        let path = request.url.path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
        let f = form(request);
        let ok = |v: &Value| ResponseTemplate::new(200).set_body_json(v);
        match (request.method.as_str(), segments.as_slice()) {
            ("POST", ["customers"]) => {
                stripe.next += 1;
                let id = format!("cus_{}", stripe.next);
                let customer = json!({"id": id, "object": "customer", "created": 1_700_000_000,
                    "name": f.get("name"), "email": f.get("email"), "metadata": metadata(&f)});
                stripe.customers.insert(id, customer.clone());
                ok(&customer)
            }
            ("POST", ["customers", id]) => {
                let Some(customer) = stripe.customers.get_mut(*id) else {
                    return ResponseTemplate::new(404).set_body_json(
                        json!({"error": {"message": format!("No such customer: '{id}'")}}),
                    );
                };
                customer["name"] = json!(f.get("name"));
                customer["email"] = json!(f.get("email"));
                ok(&customer.clone())
            }
            ("GET", ["subscriptions"]) => {
                let customer = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "customer")
                    .map(|(_, v)| v.into_owned());
                let data: Vec<Value> = stripe
                    .subscriptions
                    .values()
                    .filter(|s| customer.as_deref().is_none_or(|c| s["customer"] == c))
                    .filter(|s| s["status"] != "canceled")
                    .cloned()
                    .collect();
                ok(&json!({"object": "list", "has_more": false, "data": data}))
            }
            ("GET", ["subscriptions", id]) => match stripe.subscriptions.get(*id) {
                Some(s) => ok(s),
                None => ResponseTemplate::new(404)
                    .set_body_json(json!({"error": {"message": "No such subscription"}})),
            },
            ("POST", ["subscriptions"]) => {
                stripe.next += 1;
                let id = format!("sub_{}", stripe.next);
                let subscription = sub_object(
                    &id,
                    &f["customer"],
                    &f["items[0][price]"],
                    f["items[0][quantity]"].parse().unwrap(),
                    metadata(&f),
                );
                stripe.subscriptions.insert(id, subscription.clone());
                ok(&subscription)
            }
            ("POST", ["subscriptions", id]) => {
                let Some(s) = stripe.subscriptions.get_mut(*id) else {
                    return ResponseTemplate::new(404)
                        .set_body_json(json!({"error": {"message": "No such subscription"}}));
                };
                if let Some(price) = f.get("items[0][price]") {
                    s["items"]["data"][0]["price"]["id"] = json!(price);
                }
                if let Some(q) = f.get("items[0][quantity]") {
                    s["items"]["data"][0]["quantity"] = json!(q.parse::<i64>().unwrap());
                }
                if let Some(cancel) = f.get("cancel_at_period_end") {
                    s["cancel_at_period_end"] = json!(cancel == "true");
                }
                ok(&s.clone())
            }
            ("DELETE", ["subscriptions", id]) => {
                let Some(s) = stripe.subscriptions.get_mut(*id) else {
                    return ResponseTemplate::new(404)
                        .set_body_json(json!({"error": {"message": "No such subscription"}}));
                };
                s["status"] = json!("canceled");
                ok(&s.clone())
            }
            _ => ResponseTemplate::new(404)
                .set_body_json(json!({"error": {"message": "unknown route"}})),
        }
    }
}

/// Answers like [`Handler`], whose change is made at once, but only after a delay: a write
/// that lands at the vendor while its answer is still on its way.
struct Slow(Handler, Duration);

impl Respond for Slow {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.0.respond(request).set_delay(self.1)
    }
}

struct Fake {
    server: MockServer,
    state: Shared,
}

impl Fake {
    async fn start() -> Self {
        let server = MockServer::start().await;
        let state = Shared::default();
        Mock::given(path_regex(r"^/v1/(customers|subscriptions)(/[^/]+)?$"))
            .respond_with(Handler(state.clone()))
            .with_priority(10)
            .mount(&server)
            .await;
        Self { server, state }
    }

    /// The calls that reached the fake with `method` on a path starting with `prefix`.
    async fn calls(&self, method: &str, prefix: &str) -> Vec<Request> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.method.as_str() == method && r.url.path().starts_with(prefix))
            .collect()
    }

    fn subscriptions(&self) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .subscriptions
            .values()
            .cloned()
            .collect()
    }
}

async fn start(backend: Backend, fake: &Fake) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        use_vendor(s, &fake.server.uri());
        take_webhooks(s);
        use_test_catalog(s);
    })
    .await
}

async fn command(app: &TestApp, id: &str) -> Value {
    app.get_json(&format!("/v1/commands/{id}")).await
}

/// Waits until the command has ended; returns it.
async fn ended(app: &TestApp, id: &str) -> Value {
    wait_for(&format!("command {id} to end"), || async {
        command(app, id).await["status"] != "pending"
    })
    .await;
    command(app, id).await
}

/// PUTs the tenant and waits for its customer; returns the customer id.
async fn tenant_with_customer(app: &TestApp, tenant: &str) -> String {
    assert_eq!(
        app.put_tenant(
            tenant,
            json!({"name": "Acme", "email": "billing@acme.test"})
        )
        .await
        .status(),
        201
    );
    wait_for("the tenant's customer", || async {
        app.get_json(&format!("/v1/tenants/{tenant}")).await["customer_id"].is_string()
    })
    .await;
    app.get_json(&format!("/v1/tenants/{tenant}")).await["customer_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Subscribes and waits for the command to succeed; returns it.
async fn subscribed(app: &TestApp, tenant: &str, price: &str) -> Value {
    let accepted = subscribe(app, tenant, json!({ "price": price })).await;
    let done = ended(app, accepted["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    done
}

async fn subscribe(app: &TestApp, tenant: &str, body: Value) -> Value {
    let response = app
        .v1(Method::POST, &format!("/v1/tenants/{tenant}/subscription"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/commands/{}", body["id"].as_str().unwrap())
    );
    body
}

async fn putting_a_tenant_creates_its_customer_once_and_carries_changes(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    let created = app
        .put_tenant(
            "acme",
            json!({"name": "Acme", "email": "billing@acme.test"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let view: Value = created.json().await.unwrap();
    assert_eq!(view["pending"][0]["kind"], "customer.sync", "{view}");
    assert_eq!(view["pending"][0]["status"], "pending");
    let first = view["pending"][0]["id"].as_str().unwrap().to_owned();

    let done = ended(&app, &first).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let customer = done["customer_id"].as_str().unwrap().to_owned();
    let view = app.get_json("/v1/tenants/acme").await;
    assert_eq!(view["customer_id"], customer.as_str());
    assert_eq!(view["pending"], json!([]));
    let creates = fake.calls("POST", "/v1/customers").await;
    assert_eq!(creates.len(), 1);
    assert_eq!(form(&creates[0])["metadata[tenant_id]"], "acme");
    assert_eq!(
        creates[0].headers["idempotency-key"].to_str().unwrap(),
        format!("billsync-{first}")
    );

    // The same PUT again changes nothing and sends nothing; a new email goes out.
    let again = app
        .put_tenant(
            "acme",
            json!({"name": "Acme", "email": "billing@acme.test"}),
        )
        .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["pending"], json!([]));
    let changed: Value = app
        .put_tenant("acme", json!({"name": "Acme Ltd", "email": "ap@acme.test"}))
        .await
        .json()
        .await
        .unwrap();
    let second = changed["pending"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(ended(&app, &second).await["status"], "succeeded");
    let calls = fake.calls("POST", "/v1/customers").await;
    assert_eq!(calls.len(), 2, "one create, one update");
    assert_eq!(calls[1].url.path(), format!("/v1/customers/{customer}"));
    assert_eq!(form(&calls[1])["email"], "ap@acme.test");
    assert_eq!(
        fake.state.lock().unwrap().customers[&customer]["name"],
        "Acme Ltd"
    );
    app.stop().await;
}

async fn a_500_is_retried_with_the_same_key_and_changes_the_vendor_once(backend: Backend) {
    let fake = Fake::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(json!({"error": {"type": "api_error", "message": "boom"}})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&fake.server)
        .await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    assert_eq!(app.check("acme", "sso").await["allowed"], false);

    let accepted = subscribe(&app, "acme", json!({"price": "price_pro", "quantity": 2})).await;
    assert_eq!(accepted["status"], "pending");
    assert_eq!(accepted["kind"], "subscription.set");
    let id = accepted["id"].as_str().unwrap();
    let done = ended(&app, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["subscription"]["items"][0]["price"], "price_pro");
    assert_eq!(done["subscription"]["items"][0]["quantity"], 2);

    let posts = fake.calls("POST", "/v1/subscriptions").await;
    assert_eq!(posts.len(), 2, "the 500, then the retry");
    let keys: Vec<&str> = posts
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap())
        .collect();
    let key = format!("billsync-{id}");
    assert_eq!(keys, [key.as_str(), key.as_str()]);
    assert_eq!(fake.subscriptions().len(), 1, "one change at the vendor");
    assert_eq!(fake.subscriptions()[0]["metadata"]["billsync_command"], id);

    // The answer is in the mirror at once (no webhook), and the entitlements follow it.
    let tenant = app.get_json("/v1/tenants/acme").await;
    assert_eq!(
        tenant["subscription"]["items"][0]["price"], "price_pro",
        "{tenant}"
    );
    let sso = app.check("acme", "sso").await;
    assert_eq!(sso["allowed"], true, "{sso}");
    app.stop().await;
}

async fn a_429_with_should_retry_is_retried(backend: Backend) {
    let fake = Fake::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Stripe-Should-Retry", "true")
                .set_body_json(json!({"error": {"type": "invalid_request_error", "code": "lock_timeout", "message": "locked"}})),
        )
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&fake.server)
        .await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    let id = subscribe(&app, "acme", json!({"price": "price_pro"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(ended(&app, &id).await["status"], "succeeded");
    let posts = fake.calls("POST", "/v1/subscriptions").await;
    assert_eq!(posts.len(), 3);
    assert!(
        posts
            .iter()
            .all(|r| r.headers["idempotency-key"] == format!("billsync-{id}").as_str())
    );
    assert_eq!(fake.subscriptions().len(), 1);
    app.stop().await;
}

async fn a_card_error_fails_the_command_with_the_vendors_message(backend: Backend) {
    let fake = Fake::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions"))
        .respond_with(ResponseTemplate::new(402).set_body_json(json!({"error": {
            "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds."}})))
        .with_priority(1)
        .mount(&fake.server)
        .await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    let id = subscribe(&app, "acme", json!({"price": "price_pro"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = ended(&app, &id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "card_declined");
    assert_eq!(
        done["error"]["message"],
        "Your card has insufficient funds."
    );
    assert_eq!(
        fake.calls("POST", "/v1/subscriptions").await.len(),
        1,
        "a 402 is not retried"
    );
    assert_eq!(
        app.get_json("/v1/tenants/acme").await["subscription"],
        Value::Null
    );
    app.stop().await;
}

async fn a_dashboard_edit_in_between_ends_in_conflict(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    subscribed(&app, "acme", "plan_basic").await;

    // Customer success moves the tenant to another price in the dashboard; billsync has not
    // heard of it when the app asks for an upgrade.
    let sub_id = fake.subscriptions()[0]["id"].as_str().unwrap().to_owned();
    fake.state
        .lock()
        .unwrap()
        .subscriptions
        .get_mut(&sub_id)
        .unwrap()["items"]["data"][0]["price"]["id"] = json!("price_custom");
    let upgrade = subscribe(&app, "acme", json!({"price": "price_pro"})).await;
    let done = ended(&app, upgrade["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "conflict", "{done}");
    assert_eq!(done["error"]["code"], "conflict");
    assert_eq!(done["subscription"]["items"][0]["price"], "price_custom");
    assert_eq!(
        fake.calls("POST", &format!("/v1/subscriptions/{sub_id}"))
            .await
            .len(),
        0,
        "nothing was forced through"
    );
    // What the worker saw is the mirror's now.
    let tenant = app.get_json("/v1/tenants/acme").await;
    assert_eq!(tenant["subscription"]["items"][0]["price"], "price_custom");

    // Asked again against the state it now knows, the upgrade goes through.
    let retry = subscribe(&app, "acme", json!({"price": "price_pro"})).await;
    assert_eq!(
        ended(&app, retry["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    assert_eq!(
        fake.subscriptions()[0]["items"]["data"][0]["price"]["id"],
        "price_pro"
    );
    app.stop().await;
}

/// Makes every store of a command's end fail, as a crash between the vendor's answer and its
/// record would; `false` removes the fault.
async fn fail_settles(app: &TestApp, on: bool) {
    let url = app.settings.database.url.expose().to_owned();
    let statements: &[&str] = match (url.starts_with("sqlite"), on) {
        (true, true) => &[
            "CREATE TRIGGER fail_settle BEFORE UPDATE OF status ON commands \
             WHEN NEW.status <> 'pending' BEGIN SELECT RAISE(ABORT, 'injected crash'); END",
        ],
        (true, false) => &["DROP TRIGGER fail_settle"],
        (false, true) => &[
            "CREATE FUNCTION fail_settle() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected crash'; END $$",
            "CREATE TRIGGER fail_settle BEFORE UPDATE ON commands FOR EACH ROW \
             WHEN (NEW.status <> 'pending') EXECUTE FUNCTION fail_settle()",
        ],
        (false, false) => &["DROP TRIGGER fail_settle ON commands"],
    };
    use sqlx::Connection;
    if url.starts_with("sqlite") {
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        for s in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*s))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    } else {
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        for s in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*s))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
}

async fn a_crash_between_the_answer_and_its_record_changes_the_vendor_once(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    fail_settles(&app, true).await;
    let id = subscribe(&app, "acme", json!({"price": "price_pro"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("the vendor to have the change", || async {
        !fake.subscriptions().is_empty()
    })
    .await;
    // The vendor changed; billsync could not record it. It stops (a deploy, a crash) ...
    let app = app.restart().await;
    assert_eq!(command(&app, &id).await["status"], "pending");
    // ... and starts with the database healthy again.
    fail_settles(&app, false).await;
    let done = ended(&app, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        fake.calls("GET", "/v1/subscriptions").await.len() >= 2,
        "a second attempt read the vendor's state"
    );
    assert_eq!(
        fake.calls("POST", "/v1/subscriptions").await.len(),
        1,
        "the vendor's state showed the change had landed: it was not sent again"
    );
    assert_eq!(fake.subscriptions().len(), 1);
    assert_eq!(
        app.get_json("/v1/tenants/acme").await["subscription"]["items"][0]["price"],
        "price_pro"
    );
    app.stop().await;
}

async fn the_clients_idempotency_key_replays_or_refuses(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    let send = |body: Value| {
        app.v1(Method::POST, "/v1/tenants/acme/subscription")
            .header("Idempotency-Key", "upgrade-42")
            .json(&body)
            .send()
    };
    let first = send(json!({"price": "price_pro"})).await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let replay = send(json!({"price": "price_pro"})).await.unwrap();
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);

    let other = send(json!({"price": "plan_basic"})).await.unwrap();
    assert_eq!(
        error_of(other).await,
        (
            409,
            "idempotency_key_reused".into(),
            Some("Idempotency-Key".into())
        )
    );
    assert_eq!(
        ended(&app, first["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    assert_eq!(fake.calls("POST", "/v1/subscriptions").await.len(), 1);
    app.stop().await;
}

async fn cancel_at_period_end_and_resume_follow_the_vendor(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    let set = subscribe(&app, "acme", json!({"price": "price_pro"})).await;
    let cancel = app
        .v1(
            Method::DELETE,
            "/v1/tenants/acme/subscription?at_period_end=true",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let cancel: Value = cancel.json().await.unwrap();
    assert_eq!(cancel["request"], json!({"at_period_end": true}));
    let resume = app
        .v1(Method::POST, "/v1/tenants/acme/subscription/resume")
        .send()
        .await
        .unwrap();
    assert_eq!(resume.status(), 202);
    let resume: Value = resume.json().await.unwrap();
    // Queued behind each other, in order.
    let pending = app.get_json("/v1/tenants/acme").await["pending"].clone();
    assert!(pending.as_array().unwrap().len() <= 3, "{pending}");

    for id in [&set["id"], &cancel["id"]] {
        assert_eq!(
            ended(&app, id.as_str().unwrap()).await["status"],
            "succeeded"
        );
    }
    let resumed = ended(&app, resume["id"].as_str().unwrap()).await;
    assert_eq!(resumed["status"], "succeeded", "{resumed}");
    assert_eq!(resumed["subscription"]["cancel_at_period_end"], false);
    let sub = fake.subscriptions()[0]["id"].as_str().unwrap().to_owned();
    let updates: Vec<String> = fake
        .calls("POST", &format!("/v1/subscriptions/{sub}"))
        .await
        .iter()
        .map(|r| form(r)["cancel_at_period_end"].clone())
        .collect();
    assert_eq!(updates, ["true", "false"]);
    let tenant = app.get_json("/v1/tenants/acme").await;
    assert_eq!(tenant["subscription"]["cancel_at_period_end"], false);
    assert_eq!(app.check("acme", "sso").await["allowed"], true);
    app.stop().await;
}

async fn cancel_now_ends_the_subscription_and_the_plan(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    subscribed(&app, "acme", "price_pro").await;
    assert_eq!(app.check("acme", "sso").await["allowed"], true);
    let cancel: Value = app
        .v1(
            Method::DELETE,
            "/v1/tenants/acme/subscription?at_period_end=false",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let done = ended(&app, cancel["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["subscription"]["status"], "canceled");
    assert_eq!(fake.calls("DELETE", "/v1/subscriptions/").await.len(), 1);
    // The free plan of the test catalog has no SSO.
    let sso = app.check("acme", "sso").await;
    assert_eq!(sso["allowed"], false, "{sso}");
    app.stop().await;
}

async fn the_echo_of_an_own_command_is_recognised_and_changes_nothing(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    let id = subscribe(&app, "acme", json!({"price": "price_pro"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(ended(&app, &id).await["status"], "succeeded");
    let sub = fake.subscriptions()[0].clone();
    let before = app.get_json("/v1/tenants/acme").await;
    let fetches_before = fake.calls("GET", "/v1/subscriptions/").await.len();

    // Stamped, as Stripe would, in the second the change was made: after the write was sent,
    // so the echo's copy is the newer observation; it is the same state, and changes nothing.
    let mut echo = crate::helpers::event(
        "evt_echo",
        "customer.subscription.created",
        chrono::Utc::now().timestamp(),
        sub,
    );
    echo["request"] = json!({"id": "req_1", "idempotency_key": format!("billsync-{id}")});
    app.deliver(&echo).await;
    applied(&app, "evt_echo").await;
    let events = app.get_json("/v1/tenants/acme/events").await;
    let echo = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == "evt_echo")
        .unwrap()
        .clone();
    assert_eq!(echo["own_command"], true);
    assert_eq!(
        fake.calls("GET", "/v1/subscriptions/").await.len(),
        fetches_before,
        "no refetch for billsync's own change"
    );
    let after = app.get_json("/v1/tenants/acme").await;
    assert_eq!(after["subscription"], before["subscription"]);
    assert_eq!(
        after["synced_at"], before["synced_at"],
        "nothing was rewritten"
    );
    app.stop().await;
}

/// Waits until acme's event `id` has been applied.
async fn applied(app: &TestApp, id: &str) {
    wait_for("the event to be applied", || async {
        let events = app.get_json("/v1/tenants/acme/events").await;
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event_id"] == id && e["outcome"] == "applied")
    })
    .await;
}

async fn the_late_echo_of_an_earlier_command_never_replaces_a_later_answer(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    let first = subscribed(&app, "acme", "price_pro").await;
    let first_state = fake.subscriptions()[0].clone();
    let second = subscribe(&app, "acme", json!({"price": "price_pro", "quantity": 3})).await;
    assert_eq!(
        ended(&app, second["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );

    // The first command's webhook arrives last, stamped (as Stripe stamps it) in the second both
    // changes were made in: it is older than the second command's answer.
    let mut echo = crate::helpers::event(
        "evt_late_echo",
        "customer.subscription.created",
        chrono::Utc::now().timestamp(),
        first_state,
    );
    let key = format!("billsync-{}", first["id"].as_str().unwrap());
    echo["request"] = json!({"id": "req_1", "idempotency_key": key});
    app.deliver(&echo).await;
    applied(&app, "evt_late_echo").await;
    let tenant = app.get_json("/v1/tenants/acme").await;
    assert_eq!(
        tenant["subscription"]["items"][0]["quantity"], 3,
        "{tenant}"
    );
    app.stop().await;
}

async fn bad_requests_are_refused_and_nothing_is_stored(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    let post = |body: Value| {
        app.v1(Method::POST, "/v1/tenants/acme/subscription")
            .json(&body)
            .send()
    };
    let cases = [
        (json!({}), "price"),
        (json!({"price": ""}), "price"),
        (json!({"price": "price_pro", "quantity": 0}), "quantity"),
        (json!({"price": "price_pro", "quantity": -1}), "quantity"),
        (
            json!({"price": "price_pro", "proration": "sometimes"}),
            "proration",
        ),
        (json!({"price": "price_pro", "trial_days": 0}), "trial_days"),
        (json!({"price": "price_pro", "coupon": "x"}), "coupon"),
    ];
    for (body, field) in cases {
        let (status, _, got) = error_of(post(body.clone()).await.unwrap()).await;
        assert_eq!((status, got.as_deref()), (400, Some(field)), "{body}");
    }
    let unknown = app
        .v1(Method::POST, "/v1/tenants/nobody/subscription")
        .json(&json!({"price": "price_pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(unknown).await.0, 404);
    let cancel = app
        .v1(
            Method::DELETE,
            "/v1/tenants/acme/subscription?at_period_end=maybe",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(cancel).await.2.as_deref(), Some("at_period_end"));
    let nothing = app
        .v1(Method::DELETE, "/v1/tenants/acme/subscription")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(nothing).await.1, "no_subscription");
    let missing = app
        .v1(Method::GET, "/v1/commands/cmd_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(missing).await,
        (404, "command_not_found".into(), None)
    );
    assert_eq!(app.get_json("/v1/tenants/acme").await["pending"], json!([]));
    assert!(fake.calls("POST", "/v1/subscriptions").await.is_empty());
    app.stop().await;

    // Without a vendor, changes cannot go anywhere.
    let offline = TestApp::spawn(backend).await;
    offline.put_tenant("acme", json!({})).await;
    let refused = offline
        .v1(Method::POST, "/v1/tenants/acme/subscription")
        .json(&json!({"price": "price_pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(refused).await.0, 503);
    assert_eq!(
        offline.get_json("/v1/tenants/acme").await["pending"],
        json!([])
    );
    offline.stop().await;
}

async fn the_preview_asks_the_vendor_and_changes_nothing(backend: Backend) {
    let fake = Fake::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/invoices/create_preview"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "invoice", "currency": "eur", "total": 4000, "amount_due": 4000,
            "period_start": 1_700_000_000, "period_end": 1_702_592_000,
            "lines": {"object": "list", "data": [
                {"id": "il_1", "amount": -1000, "currency": "eur", "description": "Unused time on Basic",
                 "quantity": 1, "parent": {"subscription_item_details": {"proration": true}},
                 "pricing": {"price_details": {"price": "plan_basic"}}, "period": {"start": 1_700_000_000, "end": 1_702_592_000}},
                {"id": "il_2", "amount": 5000, "currency": "eur", "description": "Pro", "quantity": 1,
                 "proration": false, "price": {"id": "price_pro"}, "period": {"start": 1_702_592_000, "end": 1_705_270_400}}
            ]}
        })))
        .mount(&fake.server)
        .await;
    let app = start(backend, &fake).await;
    let customer = tenant_with_customer(&app, "acme").await;
    let preview = app
        .get_json("/v1/tenants/acme/subscription/preview?price=price_pro&quantity=1&proration=always_invoice")
        .await;
    assert_eq!(preview["total"], 4000);
    assert_eq!(preview["currency"], "eur");
    assert_eq!(preview["lines"][0]["proration"], true);
    assert_eq!(preview["lines"][0]["price"], "plan_basic");
    assert_eq!(preview["lines"][1]["amount"], 5000);
    let sent = fake.calls("POST", "/v1/invoices/create_preview").await;
    assert_eq!(sent.len(), 1);
    let f = form(&sent[0]);
    assert_eq!(f["customer"], customer);
    assert_eq!(f["subscription_details[items][0][price]"], "price_pro");
    assert_eq!(app.get_json("/v1/tenants/acme").await["pending"], json!([]));
    assert!(fake.subscriptions().is_empty());

    let bad = app
        .v1(
            Method::GET,
            "/v1/tenants/acme/subscription/preview?quantity=2",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(bad).await.2.as_deref(), Some("price"));
    app.stop().await;
}

async fn a_commands_answer_never_replaces_a_state_fetched_after_its_write_was_sent(
    backend: Backend,
) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    tenant_with_customer(&app, "acme").await;
    subscribed(&app, "acme", "plan_basic").await;
    let sub_id = fake.subscriptions()[0]["id"].as_str().unwrap().to_owned();
    let write_path = format!("/v1/subscriptions/{sub_id}");
    // The upgrade lands at the vendor at once; its answer takes 3 s to come back.
    Mock::given(method("POST"))
        .and(path(write_path.as_str()))
        .respond_with(Slow(Handler(fake.state.clone()), Duration::from_secs(3)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&fake.server)
        .await;
    let upgrade = subscribe(&app, "acme", json!({"price": "price_pro"})).await;
    let id = upgrade["id"].as_str().unwrap();
    wait_for("the upgrade to reach the vendor", || async {
        fake.calls("POST", &write_path).await.len() == 1
    })
    .await;

    // Meanwhile customer success moves the tenant to a custom price in the dashboard; its
    // webhook makes billsync fetch the subscription, and the mirror shows the edit.
    let edited = {
        let mut stripe = fake.state.lock().unwrap();
        let subscription = stripe.subscriptions.get_mut(&sub_id).unwrap();
        subscription["items"]["data"][0]["price"]["id"] = json!("price_custom");
        subscription.clone()
    };
    let now = chrono::Utc::now().timestamp();
    app.deliver(&crate::helpers::event(
        "evt_dashboard_edit",
        "customer.subscription.updated",
        now,
        edited,
    ))
    .await;
    let price = || async {
        app.get_json("/v1/tenants/acme").await["subscription"]["items"][0]["price"].clone()
    };
    wait_for("the dashboard edit in the mirror", || async {
        price().await == "price_custom"
    })
    .await;
    assert_eq!(
        command(&app, id).await["status"],
        "pending",
        "the upgrade's answer is still on its way"
    );

    // The answer arrives: the command succeeded with it, but it was observed before the edit
    // was, so the mirror keeps the edit.
    let done = ended(&app, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["subscription"]["items"][0]["price"], "price_pro");
    assert_eq!(price().await, "price_custom");
    app.stop().await;
}

/// Upgrades acme from `plan_basic` to `price_pro` while a fetch of the subscription races the
/// write: the write reaches the vendor at once and answers after `write_answer`; the fetch,
/// made for a dashboard webhook delivered while the write is on its way, was served before the
/// write landed (it returns the old state) and answers after `fetch_answer`. Returns the
/// upgrade's command id once it has ended, and the subscription's id.
async fn upgrade_racing_a_fetch(
    app: &TestApp,
    fake: &Fake,
    write_answer: Duration,
    fetch_answer: Duration,
) -> (String, String) {
    tenant_with_customer(app, "acme").await;
    subscribed(app, "acme", "plan_basic").await;
    let before = fake.subscriptions()[0].clone();
    let sub_id = before["id"].as_str().unwrap().to_owned();
    let sub_path = format!("/v1/subscriptions/{sub_id}");
    Mock::given(method("POST"))
        .and(path(sub_path.as_str()))
        .respond_with(Slow(Handler(fake.state.clone()), write_answer))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&fake.server)
        .await;
    Mock::given(method("GET"))
        .and(path(sub_path.as_str()))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(&before)
                .set_delay(fetch_answer),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&fake.server)
        .await;
    let upgrade = subscribe(app, "acme", json!({"price": "price_pro"})).await;
    let id = upgrade["id"].as_str().unwrap().to_owned();
    wait_for("the upgrade to reach the vendor", || async {
        fake.calls("POST", &sub_path).await.len() == 1
    })
    .await;
    let now = chrono::Utc::now().timestamp();
    let edit = crate::helpers::event("evt_racing", "customer.subscription.updated", now, before);
    app.deliver(&edit).await;
    assert_eq!(ended(app, &id).await["status"], "succeeded");
    applied(app, "evt_racing").await;
    (id, sub_id)
}

async fn price_in_mirror(app: &TestApp) -> Value {
    app.get_json("/v1/tenants/acme").await["subscription"]["items"][0]["price"].clone()
}

async fn a_fetch_that_reached_the_vendor_before_the_write_cannot_hide_the_change(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    // The fetch was sent after the write and answers first: the mirror holds its (old) state,
    // observed later than the write was sent, when the write's answer comes back.
    let (_, sub_id) =
        upgrade_racing_a_fetch(&app, &fake, Duration::from_secs(3), Duration::ZERO).await;
    assert_eq!(
        price_in_mirror(&app).await,
        "price_pro",
        "the ended command's change is in the mirror"
    );
    let fetches = fake
        .calls("GET", &format!("/v1/subscriptions/{sub_id}"))
        .await;
    assert_eq!(
        fetches.len(),
        2,
        "the racing fetch, then one after the write"
    );
    app.stop().await;
}

async fn a_stale_mirror_after_an_own_change_makes_no_conflict(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    // The write answers first and is applied; the racing fetch's old state answers last and,
    // sent later, replaces it: the mirror shows the plan before the upgrade.
    upgrade_racing_a_fetch(&app, &fake, Duration::from_secs(1), Duration::from_secs(3)).await;
    assert_eq!(price_in_mirror(&app).await, "plan_basic", "the setup");
    // Well after the upgrade ended, the app asks for more seats against what it reads.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let seats = subscribe(&app, "acme", json!({"price": "price_pro", "quantity": 2})).await;
    let done = ended(&app, seats["id"].as_str().unwrap()).await;
    assert_eq!(
        done["status"], "succeeded",
        "the vendor shows billsync's own latest change, not someone else's: {done}"
    );
    assert_eq!(fake.subscriptions()[0]["items"]["data"][0]["quantity"], 2);
    app.stop().await;
}

async fn the_echo_of_an_own_change_sets_a_stale_mirror_right(backend: Backend) {
    let fake = Fake::start().await;
    let app = start(backend, &fake).await;
    let (id, _) =
        upgrade_racing_a_fetch(&app, &fake, Duration::from_secs(1), Duration::from_secs(3)).await;
    assert_eq!(price_in_mirror(&app).await, "plan_basic", "the setup");
    let upgraded = fake.subscriptions()[0].clone();
    let now = chrono::Utc::now().timestamp();
    let mut echo = crate::helpers::event(
        "evt_own_echo",
        "customer.subscription.updated",
        now,
        upgraded,
    );
    echo["request"] = json!({"id": "req_2", "idempotency_key": format!("billsync-{id}")});
    app.deliver(&echo).await;
    applied(&app, "evt_own_echo").await;
    assert_eq!(
        price_in_mirror(&app).await,
        "price_pro",
        "an echo unlike the mirror is followed by a fetch"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_key_scoped_to_another_tenant_sees_no_commands() {
    let fake = Fake::start().await;
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        use_vendor(s, &fake.server.uri());
        s.api.tenant_keys = vec![(
            billsync::config::key_digest("scoped-key-0123456789").unwrap(),
            vec!["other".to_owned()],
        )];
    })
    .await;
    let view: Value = app
        .put_tenant("acme", json!({}))
        .await
        .json()
        .await
        .unwrap();
    let id = view["pending"][0]["id"].as_str().unwrap().to_owned();
    for (method, path) in [
        (Method::GET, format!("/v1/commands/{id}")),
        (Method::POST, "/v1/tenants/acme/subscription".to_owned()),
        (Method::DELETE, "/v1/tenants/acme/subscription".to_owned()),
        (
            Method::POST,
            "/v1/tenants/acme/subscription/resume".to_owned(),
        ),
        (
            Method::GET,
            "/v1/tenants/acme/subscription/preview?price=p".to_owned(),
        ),
    ] {
        let response = app
            .client
            .request(method.clone(), app.url(&path))
            .bearer_auth("scoped-key-0123456789")
            .json(&json!({"price": "price_pro"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_several_replicas_send_each_command_once() {
    let fake = Fake::start().await;
    let a = start(Backend::Postgres, &fake).await;
    let b = a.replica().await;
    let tenants: Vec<String> = (0..6).map(|i| format!("replica{i}")).collect();
    for (i, tenant) in tenants.iter().enumerate() {
        let app = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            app.put_tenant(tenant, json!({"name": "Acme"}))
                .await
                .status(),
            201
        );
    }
    let mut accepted = Vec::new();
    for (i, tenant) in tenants.iter().enumerate() {
        let app = if i % 2 == 0 { &b } else { &a };
        accepted.push(subscribe(app, tenant, json!({"price": "price_pro"})).await);
    }
    for command in &accepted {
        let done = ended(&a, command["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    // Both replicas' outboxes ran, yet every command reached the vendor once.
    let creates: Vec<_> = fake
        .calls("POST", "/v1/customers")
        .await
        .into_iter()
        .filter(|r| r.url.path() == "/v1/customers")
        .collect();
    assert_eq!(creates.len(), tenants.len());
    let keys: std::collections::HashSet<_> = creates
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), tenants.len());
    assert_eq!(fake.subscriptions().len(), tenants.len());
    let subscription_posts = fake.calls("POST", "/v1/subscriptions").await;
    assert_eq!(subscription_posts.len(), tenants.len());
    b.stop().await;
    a.stop().await;
}

/// The outbox's claim in the tests below: short, so that a vendor call outlasts it.
const CLAIM: Duration = Duration::from_secs(1);

async fn start_with_short_claims(fake: &Fake) -> TestApp {
    TestApp::spawn_with(Backend::Postgres, |s| {
        use_vendor(s, &fake.server.uri());
        use_test_catalog(s);
        s.claims.commands = CLAIM;
    })
    .await
}

/// Command attempts of `kind` that succeeded, counted on all of `apps`.
async fn successes(apps: &[&TestApp], kind: &str) -> u64 {
    let series = format!("billsync_commands_total{{kind=\"{kind}\",outcome=\"succeeded\"}} ");
    let mut total = 0;
    for app in apps {
        let metrics = app.metrics().await;
        total += metrics
            .lines()
            .filter_map(|line| line.strip_prefix(series.as_str()))
            .map(|value| value.parse::<u64>().unwrap())
            .sum::<u64>();
    }
    total
}

/// PUTs a new tenant; returns its `customer.sync` command's id.
async fn customer_sync(app: &TestApp, tenant: &str) -> String {
    let view: Value = app
        .put_tenant(tenant, json!({"name": "Acme"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["pending"][0]["kind"], "customer.sync", "{view}");
    view["pending"][0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_vendor_call_slower_than_the_claim_is_made_once() {
    let fake = Fake::start().await;
    // Creating the customer takes four claim times.
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(Slow(Handler(fake.state.clone()), 4 * CLAIM))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&fake.server)
        .await;
    let a = start_with_short_claims(&fake).await;
    let b = a.replica().await;
    let id = customer_sync(&a, "acme").await;
    let done = ended(&a, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // Both replicas' outboxes looked for work all along; the claim stayed with the one calling.
    assert_eq!(
        fake.calls("POST", "/v1/customers").await.len(),
        1,
        "one call at the vendor"
    );
    assert_eq!(successes(&[&a, &b], "customer.sync").await, 1);
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_dead_replicas_command_is_taken_over_within_the_claim_time() {
    let fake = Fake::start().await;
    // The first call does not come back before its replica dies.
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(ResponseTemplate::new(500).set_delay(6 * CLAIM))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&fake.server)
        .await;
    let a = start_with_short_claims(&fake).await;
    let id = customer_sync(&a, "acme").await;
    let calls = || async { fake.calls("POST", "/v1/customers").await.len() };
    wait_for("the first replica to call the vendor", || async {
        calls().await == 1
    })
    .await;
    let b = a.replica().await;
    let _database = a.crash();
    let crashed = std::time::Instant::now();
    wait_for("the other replica to take the command over", || async {
        calls().await == 2
    })
    .await;
    // Within the claim time, and a second's slack for a busy machine.
    let waited = crashed.elapsed();
    assert!(
        waited < CLAIM + Duration::from_secs(1),
        "taken over after {waited:?}"
    );
    let done = ended(&b, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    b.stop().await;
}
