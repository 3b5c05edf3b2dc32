//! Inbound-sync figures: webhook acknowledgement latency, apply throughput (refetch off), and
//! freshness (vendor change → visible in `GET /v1/tenants/{t}`) against localstripe with and
//! without webhooks.
//!
//!     cargo bench --bench sync            # everything (about 3 minutes after the build)
//!     cargo bench --bench sync -- quick   # fewer samples
//!
//! Needs PostgreSQL (BILLSYNC_BENCH_DATABASE_URL, an admin URL; default
//! postgres://postgres@127.0.0.1:5432/postgres) and the .venv that scripts/test creates.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use billsync::app;
use billsync::config::{Secret, Settings, key_digest};
use billsync::state::{self, AppState};
use billsync::store::{NewEvent, Source};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;

use common::{Backend, Database, percentiles};

const API_KEY: &str = "bench-api-key-0123456789";
const SECRET: &str = "whsec_bench";

fn settings(url: &str) -> Settings {
    let mut s = Settings::from_toml("").unwrap();
    s.database.url = Secret::new(url);
    s.api.key_digests = vec![key_digest(API_KEY).unwrap()];
    s.stripe.webhook_secrets = vec![Secret::new(SECRET)];
    s
}

struct Service {
    base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), state::AppError>>,
}

async fn serve(settings: Settings) -> Service {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app::run(settings, listener, shutdown.clone()));
    let client = reqwest::Client::new();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Service {
        base,
        shutdown,
        task,
    }
}

impl Service {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn customer_event(i: usize, created: i64) -> Value {
    json!({
        "id": format!("evt_bench_{i}"), "object": "event", "type": "customer.updated", "created": created,
        "data": {"object": {"id": format!("cus_{}", i % 500), "object": "customer", "created": created,
            "email": format!("c{i}@example.test"), "metadata": {"tenant_id": format!("t{}", i % 500)}}}
    })
}

/// Sequential signed webhooks against the running service (its applier working meanwhile).
async fn ack_latency(backend: Backend, n: usize) -> (f64, f64) {
    let db = Database::create(backend).await;
    let service = serve(settings(&db.url)).await;
    let client = reqwest::Client::new();
    let now = chrono::Utc::now().timestamp();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let body = customer_event(i, now).to_string();
        let signature = billsync::webhook::signature::header(SECRET, now, body.as_bytes());
        let started = Instant::now();
        let response = client
            .post(format!("{}/webhooks/stripe", service.base))
            .header("stripe-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        samples.push(started.elapsed());
    }
    service.stop().await;
    db.drop_now().await;
    percentiles(&mut samples)
}

/// Events applied per second from a full inbox, refetch off.
async fn apply_rate(backend: Backend, n: usize) -> f64 {
    let db = Database::create(backend).await;
    let mut s = settings(&db.url);
    s.stripe.refetch = false;
    let state = AppState::build(s).await.unwrap();
    let base = 1_700_000_000;
    let rows: Vec<NewEvent> = (0..n)
        .map(|i| {
            let event = json!({
                "id": format!("evt_apply_{i}"), "object": "event", "type": "customer.subscription.updated",
                "created": base + i as i64,
                "data": {"object": {"id": format!("sub_{}", i % 5000), "object": "subscription",
                    "customer": format!("cus_{}", i % 5000), "status": "active", "created": base,
                    "items": {"data": [{"id": "si_1", "price": {"id": format!("price_{}", i % 7)}, "quantity": 1}]}}}
            });
            billsync::sync::events::from_event(&event.to_string(), &event, Source::Webhook).unwrap()
        })
        .collect();
    for chunk in rows.chunks(1000) {
        state.db.inbox().insert(chunk, 0).await.unwrap();
    }
    let applier = state.applier();
    let started = Instant::now();
    let mut applied = 0;
    loop {
        let settled = applier.step().await.unwrap();
        if settled == 0 {
            break;
        }
        applied += settled;
    }
    let rate = applied as f64 / started.elapsed().as_secs_f64();
    state.db.close().await;
    db.drop_now().await;
    rate
}

fn venv_bin(tool: &str) -> PathBuf {
    let venv = std::env::var("BILLSYNC_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let path = venv.join("bin").join(tool);
    assert!(
        path.exists(),
        "{} is missing: run scripts/test once to create .venv",
        path.display()
    );
    path
}

/// Vendor change → visible in the tenant view, against localstripe, default sync settings.
async fn freshness(webhooks: bool, iterations: usize) -> (f64, f64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut localstripe = std::process::Command::new(venv_bin("localstripe"))
        .args(["--port", &port.to_string(), "--from-scratch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stripe = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let post = |path: &str, form: Vec<(String, String)>| {
        client
            .post(format!("{stripe}{path}"))
            .basic_auth("sk_test_bench", Some(""))
            .form(&form)
            .send()
    };
    while client
        .get(format!("{stripe}/v1/plans"))
        .basic_auth("sk_test_bench", Some(""))
        .send()
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pairs = |p: &[(&str, &str)]| {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    post(
        "/v1/plans",
        pairs(&[
            ("id", "plan_bench"),
            ("amount", "1000"),
            ("currency", "eur"),
            ("interval", "month"),
            ("product[name]", "Bench"),
        ]),
    )
    .await
    .unwrap();

    let db = Database::create(Backend::Sqlite).await;
    let mut s = settings(&db.url);
    s.stripe.api_key = Some(Secret::new("sk_test_bench"));
    s.stripe.api_base = stripe.clone();
    s.stripe.legacy_plans = true;
    let service = serve(s).await;
    if webhooks {
        let url = format!("{}/webhooks/stripe", service.base);
        post(
            "/_config/webhooks/bench",
            pairs(&[("url", &url), ("secret", SECRET)]),
        )
        .await
        .unwrap();
    }
    let tenant_view = |tenant: String| {
        let client = client.clone();
        let base = service.base.clone();
        async move {
            let response = client
                .get(format!("{base}/v1/tenants/{tenant}"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            if response.status() != 200 {
                return None;
            }
            Some(response.json::<Value>().await.unwrap())
        }
    };

    let mut samples = Vec::new();
    for i in 0..iterations {
        let tenant = format!("fresh-{i}");
        let token: Value = post(
            "/v1/tokens",
            pairs(&[
                ("card[number]", "4242424242424242"),
                ("card[exp_month]", "12"),
                ("card[exp_year]", "2034"),
                ("card[cvc]", "123"),
            ]),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let customer: Value = post(
            "/v1/customers",
            pairs(&[
                ("metadata[tenant_id]", &tenant),
                ("source", token["id"].as_str().unwrap()),
            ]),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        while tenant_view(tenant.clone()).await.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let subscription: Value = post(
            "/v1/subscriptions",
            pairs(&[
                ("customer", customer["id"].as_str().unwrap()),
                ("items[0][plan]", "plan_bench"),
            ]),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let changed_at = Instant::now();
        let id = subscription["id"].clone();
        loop {
            if tenant_view(tenant.clone())
                .await
                .is_some_and(|t| t["subscription"]["id"] == id)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples.push(changed_at.elapsed());
    }
    service.stop().await;
    let _ = localstripe.kill();
    let _ = localstripe.wait();
    db.drop_now().await;
    percentiles(&mut samples)
}

#[tokio::main]
async fn main() {
    state::init_crypto();
    let quick = std::env::args().any(|a| a == "quick");
    let (acks, applies, fresh_on, fresh_off) = if quick {
        (300, 4000, 5, 3)
    } else {
        (2000, 20_000, 20, 10)
    };
    println!(
        "billsync inbound-sync benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| measure | SQLite | PostgreSQL |");
    println!("|---|---|---|");
    let (sq50, sq99) = ack_latency(Backend::Sqlite, acks).await;
    let (pg50, pg99) = ack_latency(Backend::Postgres, acks).await;
    println!(
        "| webhook ack p50 / p99 ({acks} sequential) | {sq50:.2} / {sq99:.2} ms | {pg50:.2} / {pg99:.2} ms |"
    );
    let sq = apply_rate(Backend::Sqlite, applies).await;
    let pg = apply_rate(Backend::Postgres, applies).await;
    println!(
        "| events applied/s, refetch off ({applies} events, 5,000 objects) | {sq:.0} | {pg:.0} |"
    );
    let (on50, on99) = freshness(true, fresh_on).await;
    println!(
        "| freshness with webhooks, p50 / p99 ({fresh_on} changes, localstripe, SQLite) | {on50:.0} / {on99:.0} ms | |"
    );
    let (off50, off99) = freshness(false, fresh_off).await;
    println!(
        "| freshness without webhooks, p50 / p99 ({fresh_off} changes, poll every 10 s) | {off50:.0} / {off99:.0} ms | |"
    );
}
