//! openapi.yaml lists, for each route, every status the route answers. Each route is driven over
//! HTTP through every failure the harness can provoke: no key, a wrong key, a key scoped to other
//! tenants, the rate limit, bodies that are not JSON, malformed, of the wrong type or too large,
//! unknown and invalid ids and queries, no vendor, a vendor that refuses, answers garbage or
//! fails, and a database that is gone. Each `(method, route, status)` seen must be documented for
//! that route; and the failures every route of a kind can meet must have been seen, so that a
//! probe that stops provoking its failure is noticed too.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::{
    API_KEY, Backend, TestApp, drop_postgres_database, sign_now, take_webhooks, use_test_catalog,
    use_vendor, wait_for,
};
use crate::openapi::spec;

/// A key that sees only `acme`.
const SCOPED_KEY: &str = "scoped-acme-key-0123456789";
/// The largest body a route without its own limit takes, in the probed services.
const MAX_BODY: usize = 4096;

/// `(METHOD, template)` → the statuses openapi.yaml lists for it.
fn documented_statuses() -> BTreeMap<(String, String), BTreeSet<u16>> {
    let spec = spec();
    let mut documented = BTreeMap::new();
    for (path, item) in spec["paths"].as_mapping().expect("paths") {
        for (method, operation) in item.as_mapping().expect("path item") {
            let Some(responses) = operation["responses"].as_mapping() else {
                continue;
            };
            let statuses = responses
                .keys()
                .filter_map(|status| status.as_str()?.parse().ok())
                .collect();
            documented.insert(
                (
                    method.as_str().unwrap().to_uppercase(),
                    path.as_str().unwrap().to_owned(),
                ),
                statuses,
            );
        }
    }
    documented
}

/// What the probes saw: per route, each status with the first error code (or "-") and request.
#[derive(Default)]
struct Seen(BTreeMap<(String, &'static str), BTreeMap<u16, String>>);

impl Seen {
    fn statuses(&self, method: &Method, template: &str) -> BTreeSet<u16> {
        self.0
            .get(&(method.to_string(), template))
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every status seen that the spec does not list for its route, one line each.
    fn undocumented(&self) -> Vec<String> {
        let documented = documented_statuses();
        let mut missing = Vec::new();
        for ((method, template), statuses) in &self.0 {
            let listed = documented.get(&(method.clone(), (*template).to_owned()));
            for (status, example) in statuses {
                if !listed.is_some_and(|l| l.contains(status)) {
                    missing.push(format!("{method} {template} answered {status}: {example}"));
                }
            }
        }
        missing
    }
}

/// One service and the requests sent to it.
struct Prober<'a> {
    app: &'a TestApp,
    seen: &'a mut Seen,
    /// Command and reconciliation ids answered so far, for the routes that read them.
    ids: Vec<String>,
}

/// How a probe authenticates.
#[derive(Clone, Copy)]
enum Key {
    None,
    Wrong,
    Full,
    Scoped,
    Other(&'static str),
}

/// How a probe sends its body.
#[derive(Clone)]
enum Body {
    None,
    Json(String),
    Text(&'static str),
}

impl Prober<'_> {
    async fn send(
        &mut self,
        method: &Method,
        template: &'static str,
        path: &str,
        key: Key,
        body: Body,
    ) -> u16 {
        let mut request = self.app.client.request(method.clone(), self.app.url(path));
        request = match key {
            Key::None => request,
            Key::Wrong => request.bearer_auth("not-a-key-0123456789"),
            Key::Full => request.bearer_auth(API_KEY),
            Key::Scoped => request.bearer_auth(SCOPED_KEY),
            Key::Other(key) => request.bearer_auth(key),
        };
        request = match &body {
            Body::None => request,
            Body::Json(text) => request
                .header("content-type", "application/json")
                .body(text.clone()),
            Body::Text(text) => request.header("content-type", "text/plain").body(*text),
        };
        if template == "/webhooks/stripe"
            && let Body::Json(text) = &body
        {
            request = request.header("stripe-signature", sign_now(text));
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        // A stream (Server-Sent Events) does not end: its status is all there is to see.
        let body: Value = match crate::helpers::is_event_stream(&response) {
            true => Value::Null,
            false => response.json().await.unwrap_or(Value::Null),
        };
        if status == 202
            && let Some(id) = body["id"].as_str()
            && !self.ids.iter().any(|known| known == id)
        {
            self.ids.push(id.to_owned());
        }
        let code = body["error"]["code"].as_str().unwrap_or("-");
        self.seen
            .0
            .entry((method.to_string(), template))
            .or_default()
            .entry(status)
            .or_insert_with(|| format!("`{code}` for {method} {path}"));
        status
    }

    /// Every probe of one route with `key`, on every tenant and id worth trying.
    async fn route(&mut self, method: &Method, template: &'static str, key: Key) {
        for path in self.paths(template) {
            for query in QUERIES {
                self.send(
                    method,
                    template,
                    &format!("{path}{query}"),
                    key,
                    body_of(method, template),
                )
                .await;
            }
            if *method != Method::GET {
                for body in [
                    Body::Json("{}".into()),
                    Body::Json("{".into()),
                    Body::Json("[1]".into()),
                    Body::Json(r#"{"unknown": 1}"#.into()),
                    Body::Text("hello"),
                ] {
                    self.send(method, template, &path, key, body).await;
                }
            }
        }
    }

    /// The route's template with its ids filled in: a known tenant, an unknown one, another
    /// tenant of a scoped key, an invalid id; every command and run id seen, and unknown ones.
    fn paths(&self, template: &str) -> Vec<String> {
        let mut paths = vec![template.to_owned()];
        for (name, values) in [
            ("{tenant_id}", vec!["acme", "ghost", "other", "bad%20id!"]),
            (
                "{command_id}",
                [
                    vec!["cmd_nope", "x"],
                    self.ids.iter().map(String::as_str).collect(),
                ]
                .concat(),
            ),
            ("{event_id}", vec!["evt_broken", "evt_nope"]),
            ("{unit}", vec!["usd", "credits", "Bad%20Unit"]),
            (
                "{run_id}",
                [
                    vec!["run_nope", "x"],
                    self.ids.iter().map(String::as_str).collect(),
                ]
                .concat(),
            ),
        ] {
            paths = paths
                .into_iter()
                .flat_map(|p| {
                    if p.contains(name) {
                        values.iter().map(|v| p.replace(name, v)).collect()
                    } else {
                        vec![p]
                    }
                })
                .collect();
        }
        paths
    }

    /// Bodies over the route's limit.
    async fn oversized(&mut self, method: &Method, template: &'static str) {
        if *method == Method::GET {
            return;
        }
        let limit = match template {
            "/v1/usage" => billsync::api::usage::MAX_BODY,
            "/webhooks/stripe" => billsync::webhook::MAX_BODY,
            _ => MAX_BODY,
        };
        let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(limit));
        let path = self.paths(template).remove(0);
        self.send(method, template, &path, Key::Full, Body::Json(big))
            .await;
    }
}

/// Queries tried on every route: none, and each parameter some route reads, right and wrong.
const QUERIES: &[&str] = &[
    "",
    "?limit=0",
    "?limit=5&cursor=zzz",
    "?from=2026-01-01&to=2026-02-01",
    "?from=soon&to=later",
    "?from=2026-01-01&to=2026-02-01&group_by=week",
    "?from=2026-01-01&to=2026-02-01&tenant=acme",
    "?from=2026-01-01&to=2026-02-01&tenant=other",
    "?price=price_pro",
    "?price=price_pro&quantity=3",
    "?price=price_pro&quantity=7",
    "?price=price_pro&quantity=8",
    "?price=price_pro&quantity=0",
    "?meter=calls",
    "?at_period_end=maybe",
    "?status=done&found=true",
    "?status=succeeded",
    "?found=maybe",
];

/// A body the route takes, where it reads one.
fn sample_body(method: &Method, template: &str) -> Option<String> {
    let body = match (method.as_str(), template) {
        ("PUT", "/v1/tenants/{tenant_id}") => json!({"name": "Acme"}),
        ("POST", "/v1/tenants/{tenant_id}/subscription") => json!({"price": "price_pro"}),
        ("POST", "/v1/reconciliations") => json!({"from": "2026-01-01", "to": "2026-02-01"}),
        ("PUT", "/v1/tenants/{tenant_id}/credits/settings/{unit}") => json!({"threshold": 500}),
        ("POST", "/v1/usage") => json!({"events": [
            {"id": "e1", "tenant_id": "acme", "meter": "calls", "quantity": 1}
        ]}),
        ("POST", "/v1/tenants/{tenant_id}/entitlements/check") => json!({"feature": "api_calls"}),
        ("POST", "/v1/entitlements/check") => {
            json!({"checks": [{"tenant_id": "acme", "feature": "api_calls"}]})
        }
        ("POST", "/webhooks/stripe") => crate::helpers::event(
            &format!("evt_{}", uuid::Uuid::new_v4().simple()),
            "customer.updated",
            1_700_000_000,
            crate::helpers::customer("cus_acme", "acme"),
        ),
        _ => return None,
    };
    Some(body.to_string())
}

/// A vendor that knows acme's customer, answers a preview of quantity 3, answers one of
/// quantity 7 with garbage, fails one of quantity 8, and refuses everything else.
async fn refusing_vendor() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(crate::helpers::customer("cus_acme", "acme")),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    let quantity = |n: &'static str| {
        move |request: &Request| {
            request.url.path() == "/v1/invoices/create_preview"
                && String::from_utf8_lossy(&request.body).contains(&format!("%5Bquantity%5D={n}"))
        }
    };
    Mock::given(quantity("3"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "object": "invoice", "currency": "eur", "total": 4000, "amount_due": 4000,
            "period_start": 1_700_000_000, "period_end": 1_702_592_000,
            "lines": {"object": "list", "data": []}
        })))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(quantity("7"))
        .respond_with(ResponseTemplate::new(200).set_body_string("not json"))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(quantity("8"))
        .respond_with(ResponseTemplate::new(500))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(402).set_body_json(json!({"error": {
            "type": "card_error", "code": "card_declined", "message": "Your card was declined."
        }})))
        .with_priority(10)
        .mount(&server)
        .await;
    server
}

/// A query the route takes (the one probe of a route in some services).
fn good_query(template: &str) -> &'static str {
    match template {
        "/v1/revenue" | "/v1/tenants/{tenant_id}/revenue" => "?from=2026-01-01&to=2026-02-01",
        "/v1/tenants/{tenant_id}/subscription/preview" => "?price=price_pro&quantity=3",
        "/v1/tenants/{tenant_id}/usage" => "?meter=calls",
        _ => "",
    }
}

/// The route's sample body; `{}` for another route that is not a GET.
fn body_of(method: &Method, template: &str) -> Body {
    match sample_body(method, template) {
        Some(body) => Body::Json(body),
        None if *method == Method::GET => Body::None,
        None => Body::Json("{}".into()),
    }
}

fn is_v1(template: &str) -> bool {
    template.starts_with("/v1/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_a_route_answers_is_listed_for_it_in_openapi_yaml() {
    let routes = billsync::api::route_list();
    let mut seen = Seen::default();

    // A service with a vendor that refuses, webhooks, and a tenant-scoped key.
    let vendor = refusing_vendor().await;
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        use_test_catalog(s);
        s.api.max_body_bytes = MAX_BODY;
        s.api.tenant_keys = vec![(
            billsync::config::key_digest(SCOPED_KEY).unwrap(),
            vec!["acme".to_owned()],
        )];
    })
    .await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    wait_for("acme's customer", || async {
        app.get_json("/v1/tenants/acme").await["customer_id"].is_string()
    })
    .await;
    // An event whose object the vendor refuses to show: a failed event, for the retry route.
    app.deliver(&crate::helpers::event(
        "evt_broken",
        "customer.updated",
        1_700_000_000,
        crate::helpers::customer("cus_broken", "broken"),
    ))
    .await;
    wait_for("a failed event", || async {
        app.get_json("/v1/sync/status").await["inbox"]["failed"] == 1
    })
    .await;
    let mut prober = Prober {
        app: &app,
        seen: &mut seen,
        ids: Vec::new(),
    };
    for (method, template) in &routes {
        for key in [Key::Full, Key::Scoped] {
            prober.route(method, template, key).await;
        }
        if is_v1(template) {
            for key in [Key::None, Key::Wrong] {
                let path = prober.paths(template).remove(0);
                prober.send(method, template, &path, key, Body::None).await;
            }
        }
        prober.oversized(method, template).await;
    }
    // Once every route has run, every command and run id is known to the routes that read them.
    for (method, template) in &routes {
        if template.contains("{command_id}") || template.contains("{run_id}") {
            prober.route(method, template, Key::Full).await;
        }
    }
    app.stop().await;

    // No vendor, and a rate limit of one request a second: each route has a key of its own,
    // whose first request answers and whose next is over the limit.
    let key_of = |i: usize| -> &'static str {
        Box::leak(format!("rate-limited-{i:02}-0123456789").into_boxed_str())
    };
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        use_test_catalog(s);
        s.api.rate_limit = 1;
        for i in 0..routes.len() {
            s.api
                .key_digests
                .push(billsync::config::key_digest(key_of(i)).unwrap());
        }
    })
    .await;
    let mut prober = Prober {
        app: &app,
        seen: &mut seen,
        ids: Vec::new(),
    };
    for (i, (method, template)) in routes.iter().enumerate() {
        let path = prober.paths(template).remove(0) + good_query(template);
        for _ in 0..5 {
            let status = prober
                .send(
                    method,
                    template,
                    &path,
                    Key::Other(key_of(i)),
                    body_of(method, template),
                )
                .await;
            if status == 429 || !is_v1(template) {
                break;
            }
        }
    }
    app.stop().await;

    // The database goes away under a service whose tenant was warm.
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        use_test_catalog(s);
        take_webhooks(s);
        s.database.connect_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let crate::helpers::TestDatabase::Postgres { admin_url, name } = &app.db else {
        unreachable!("spawned on PostgreSQL")
    };
    drop_postgres_database(admin_url, name)
        .await
        .expect("drop the database under the service");
    let mut prober = Prober {
        app: &app,
        seen: &mut seen,
        ids: Vec::new(),
    };
    for (method, template) in &routes {
        let path = prober.paths(template).remove(0) + good_query(template);
        prober
            .send(
                method,
                template,
                &path,
                Key::Full,
                body_of(method, template),
            )
            .await;
    }
    app.stop().await;

    let undocumented = seen.undocumented();
    assert!(
        undocumented.is_empty(),
        "statuses answered but not listed in openapi.yaml for their route:\n{}",
        undocumented.join("\n")
    );
    // The failures every route of a kind meets were provoked.
    for (method, template) in &routes {
        let statuses = seen.statuses(method, template);
        let mut expected = vec![200..=299];
        if is_v1(template) {
            expected.extend([401..=401, 429..=429, 503..=503]);
        }
        if template.contains("{tenant_id}") {
            expected.extend([404..=404, 400..=400]);
        }
        if sample_body(method, template).is_some() {
            expected.extend([400..=400, 413..=413]);
        }
        for range in expected {
            assert!(
                statuses.iter().any(|s| range.contains(s)),
                "{method} {template} was never answered {range:?}; seen {statuses:?}"
            );
        }
    }
}
