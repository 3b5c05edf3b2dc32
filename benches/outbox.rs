//! Self-serve changes through the outbox: commands per second, and request-to-confirmed
//! latency, against a wiremock Stripe that answers every call in 20 ms, inside a configured
//! vendor rate limit.
//!
//!     cargo bench --bench outbox
//!     cargo bench --bench outbox -- quick
//!
//! Each command is a new subscription for a tenant that has a customer: the worker reads the
//! customer's subscriptions (one call), then creates one (a second call). The service runs in
//! this process on loopback, in release mode; the clients post over HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use billsync::app;
use billsync::state;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

mod common;
#[path = "common/tenants.rs"]
mod tenants;

use common::{Backend, Database, quantiles};

/// How long the fake vendor takes to answer each call.
const VENDOR_DELAY: Duration = Duration::from_millis(20);
/// The configured vendor rate limit (calls per second, every worker together).
const RATE_LIMIT: u32 = 500;
/// Commands in flight at once in the worker.
const CONCURRENCY: usize = 32;
/// Clients posting commands at once.
const CLIENTS: usize = 16;

/// Answers `POST /v1/subscriptions` with a subscription for the customer and price posted.
struct Created(Arc<AtomicUsize>);

impl Respond for Created {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        let body = String::from_utf8_lossy(&request.body);
        let form: std::collections::HashMap<String, String> =
            reqwest::Url::parse(&format!("http://x/?{body}"))
                .unwrap()
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let now = chrono::Utc::now().timestamp();
        ResponseTemplate::new(200)
            .set_delay(VENDOR_DELAY)
            .set_body_json(json!({
                "id": format!("sub_{n}"), "object": "subscription", "status": "active",
                "customer": form["customer"], "created": now, "cancel_at_period_end": false,
                "items": {"object": "list", "data": [{"id": format!("si_{n}"), "quantity": 1,
                    "price": {"id": form["items[0][price]"]},
                    "current_period_start": now, "current_period_end": now + 2_592_000}]}
            }))
    }
}

struct Run {
    commands: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    vendor_calls_per_sec: f64,
}

/// Posts `commands` new subscriptions, as fast as [`CLIENTS`] clients can (`pace: None`) or at
/// `pace` per second, and measures them until every one is confirmed.
async fn run(backend: Backend, commands: usize, pace: Option<u32>) -> Run {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(VENDOR_DELAY)
                .set_body_json(json!({"object": "list", "has_more": false, "data": []})),
        )
        .mount(&vendor)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions"))
        .respond_with(Created(Arc::default()))
        .mount(&vendor)
        .await;

    let db = Database::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    std::fs::write(&catalog, tenants::CATALOG).unwrap();
    let mut settings = tenants::settings(&db.url, &catalog);
    settings.stripe.api_key = Some(billsync::config::Secret::new("sk_test_bench"));
    settings.stripe.api_base = vendor.uri();
    settings.stripe.rate_limit = RATE_LIMIT;
    settings.outbox.concurrency = CONCURRENCY;
    settings.sync.poll_interval = Duration::from_secs(3600);
    settings.sync.sweep_interval = Duration::from_secs(3600);
    settings.database.max_connections = 20;
    {
        let state = state::AppState::build(settings.clone()).await.unwrap();
        tenants::link_customers(&state.db, commands).await;
        state.db.close().await;
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app::run(settings, listener, shutdown.clone()));
    let client = reqwest::Client::new();
    while client
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let post = move |client: reqwest::Client, t: usize| async move {
        let response = client
            .post(format!("http://{address}/v1/tenants/t{t}/subscription"))
            .bearer_auth(tenants::API_KEY)
            .json(&json!({"price": "price_pro"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    };
    let mut posting = tokio::task::JoinSet::new();
    match pace {
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..CLIENTS {
                let (client, next) = (client.clone(), next.clone());
                posting.spawn(async move {
                    let mut ids = Vec::new();
                    loop {
                        let t = next.fetch_add(1, Ordering::Relaxed);
                        if t >= commands {
                            break ids;
                        }
                        ids.push(post(client.clone(), t).await);
                    }
                });
            }
        }
        Some(rate) => {
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for t in 0..commands {
                ticks.tick().await;
                let client = client.clone();
                posting.spawn(async move { vec![post(client, t).await] });
            }
        }
    }
    let mut ids = Vec::with_capacity(commands);
    while let Some(done) = posting.join_next().await {
        ids.extend(done.unwrap());
    }

    // Confirmed: read from the database (polling every command over HTTP would load the service).
    let check = state::open_database(&tenants::settings(&db.url, &catalog))
        .await
        .unwrap();
    let rows = loop {
        let mut rows = Vec::with_capacity(ids.len());
        for id in &ids {
            rows.push(check.commands().get(id).await.unwrap().unwrap());
        }
        if rows.iter().all(|r| r.status != "pending") {
            break rows;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "commands did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let failed = rows.iter().filter(|r| r.status != "succeeded").count();
    assert_eq!(
        failed,
        0,
        "every command succeeds: {:?}",
        rows.iter().find(|r| r.status != "succeeded")
    );
    let first = rows.iter().map(|r| r.created_at).min().unwrap();
    let last = rows.iter().filter_map(|r| r.completed_at).max().unwrap();
    let elapsed = Duration::from_millis((last - first).max(1) as u64);
    let mut latencies: Vec<Duration> = rows
        .iter()
        .map(|r| Duration::from_millis((r.completed_at.unwrap() - r.created_at).max(0) as u64))
        .collect();
    let q = quantiles(&mut latencies, &[0.5, 0.99]);
    let calls = vendor.received_requests().await.unwrap_or_default().len();
    check.close().await;
    shutdown.cancel();
    server.await.unwrap().unwrap();
    db.drop_now().await;
    Run {
        commands,
        per_sec: commands as f64 / elapsed.as_secs_f64(),
        p50_ms: q[0].as_secs_f64() * 1000.0,
        p99_ms: q[1].as_secs_f64() * 1000.0,
        vendor_calls_per_sec: calls as f64 / elapsed.as_secs_f64(),
    }
}

#[tokio::main]
async fn main() {
    state::init_crypto();
    let quick = std::env::args().any(|a| a == "quick");
    let commands = if quick { 500 } else { 3000 };
    let paced = if quick { 400 } else { 2000 };
    println!(
        "billsync outbox benchmark: new subscriptions, vendor answering in {} ms, rate limit {RATE_LIMIT} calls/s, \
         outbox.concurrency = {CONCURRENCY}, {CLIENTS} HTTP clients",
        VENDOR_DELAY.as_millis()
    );
    println!(
        "| database | load | commands | commands/s | request to confirmed p50 / p99 | vendor calls/s (limit {RATE_LIMIT}) |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, backend) in [
        ("SQLite", Backend::Sqlite),
        ("PostgreSQL", Backend::Postgres),
    ] {
        for (load, count, pace) in [
            (format!("as fast as {CLIENTS} clients post"), commands, None),
            ("paced at 200 commands/s".to_owned(), paced, Some(200)),
        ] {
            let r = run(backend, count, pace).await;
            println!(
                "| {label} | {load} | {} | {:.0} | {:.0} / {:.0} ms | {:.0} |",
                r.commands, r.per_sec, r.p50_ms, r.p99_ms, r.vendor_calls_per_sec
            );
        }
    }
}
