//! Metering figures: ingestion events/s and acknowledgement latency for batches of 1, 100 and
//! 1,000 events at 1% duplicates, on SQLite and PostgreSQL; acknowledgement latency at a paced
//! 5,000 events/s; vendor calls per second when 20,000 events/s are pushed.
//!
//!     cargo bench --bench metering            # about 2 minutes after the build
//!     cargo bench --bench metering -- quick
//!
//! Needs PostgreSQL (BILLSYNC_BENCH_DATABASE_URL, an admin URL; default
//! postgres://postgres@127.0.0.1:5432/postgres).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use billsync::app;
use billsync::state::{self, AppState};
use billsync::stripe::{
    BillingVendor, CustomerWrite, Fetched, ListFilter, MeterEvent, ObjectKind, Page,
    PreviewRequest, SubscriptionWrite, VendorError,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;
#[path = "common/tenants.rs"]
mod tenants;

use common::{Backend, Database, percentiles};
use tenants::{API_KEY, settings};

const TENANTS: usize = 500;
const CONCURRENCY: usize = 4;

/// Batches of `size` events; one event in a hundred repeats an id already sent.
fn batches(size: usize, count: usize, offset: usize) -> Vec<Value> {
    let mut next = offset;
    (0..count)
        .map(|_| {
            let events: Vec<Value> = (0..size)
                .map(|_| {
                    next += 1;
                    let id = if next.is_multiple_of(100) && next > offset + 1 { next - 1 } else { next };
                    json!({"id": format!("e{id}"), "tenant_id": format!("t{}", id % TENANTS), "meter": "calls", "quantity": "1.5"})
                })
                .collect();
            json!({ "events": events })
        })
        .collect()
}

struct Run {
    events_per_sec: f64,
    p50: f64,
    p99: f64,
}

/// Sends the bodies with `CONCURRENCY` clients; with `pace`, one request per `pace` overall.
async fn drive(base: &str, bodies: Vec<Value>, events: usize, pace: Option<Duration>) -> Run {
    let bodies = Arc::new(
        bodies
            .into_iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (bodies, next, base) = (bodies.clone(), next.clone(), base.to_owned());
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                if let Some(pace) = pace {
                    tokio::time::sleep_until((started + pace * i as u32).into()).await;
                }
                let sent = Instant::now();
                let response = client
                    .post(format!("{base}/v1/usage"))
                    .bearer_auth(API_KEY)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
                samples.push(sent.elapsed());
            }
            samples
        });
    }
    let mut samples: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
    let elapsed = started.elapsed().as_secs_f64();
    let (p50, p99) = percentiles(&mut samples);
    Run {
        events_per_sec: events as f64 / elapsed,
        p50,
        p99,
    }
}

async fn ingestion(backend: Backend, catalog: &std::path::Path, quick: bool) -> Vec<(String, Run)> {
    let db = Database::create(backend).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app::run(
        settings(&db.url, catalog),
        listener,
        shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in 0..TENANTS {
        let response = client
            .put(format!("{base}/v1/tenants/t{t}"))
            .bearer_auth(API_KEY)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let scale = if quick { 5 } else { 1 };
    let mut results = Vec::new();
    let mut offset = 0;
    for (size, count) in [(1, 3000 / scale), (100, 400 / scale), (1000, 60 / scale)] {
        let run = drive(&base, batches(size, count, offset), size * count, None).await;
        offset += size * count + 10;
        results.push((format!("batches of {size}"), run));
    }
    // 5,000 events/s: 50 batches of 100 a second for 10 s.
    let paced = 500 / scale;
    let run = drive(
        &base,
        batches(100, paced, offset),
        100 * paced,
        Some(Duration::from_millis(20)),
    )
    .await;
    results.push(("paced 5,000 events/s, batches of 100".to_owned(), run));
    shutdown.cancel();
    server.await.unwrap().unwrap();
    db.drop_now().await;
    results
}

/// Counts meter events; answers at once.
#[derive(Default)]
struct CountingVendor {
    calls: AtomicUsize,
}

#[async_trait]
impl BillingVendor for CountingVendor {
    async fn fetch(&self, _: ObjectKind, _: &str) -> Result<Fetched, VendorError> {
        Ok(Fetched::Gone)
    }
    async fn list(
        &self,
        _: ObjectKind,
        _: &ListFilter,
        _: Option<&str>,
    ) -> Result<Page, VendorError> {
        Ok(Page::default())
    }
    async fn report_usage(&self, _: &MeterEvent) -> Result<(), VendorError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn list_events_since(&self, _: i64, _: Option<&str>) -> Result<Page, VendorError> {
        Ok(Page::default())
    }
    async fn write_customer(
        &self,
        _: Option<&str>,
        _: &CustomerWrite<'_>,
        _: &str,
    ) -> Result<Value, VendorError> {
        Err(VendorError::Unavailable(
            "the metering bench writes no customers".into(),
        ))
    }
    async fn write_subscription(
        &self,
        _: &SubscriptionWrite<'_>,
        _: &str,
    ) -> Result<Value, VendorError> {
        Err(VendorError::Unavailable(
            "the metering bench writes no subscriptions".into(),
        ))
    }
    async fn preview(&self, _: &PreviewRequest<'_>) -> Result<Value, VendorError> {
        Err(VendorError::Unavailable(
            "the metering bench previews nothing".into(),
        ))
    }
    async fn meter_usage(
        &self,
        _: &str,
        _: &str,
        _: i64,
        _: i64,
    ) -> Result<Option<rust_decimal::Decimal>, VendorError> {
        Ok(None)
    }
}

/// Vendor calls per second when one push interval (10 s) carries 20,000 events/s.
async fn vendor_calls(catalog: &std::path::Path) -> (usize, f64) {
    let db = Database::create(Backend::Postgres).await;
    state::init_crypto();
    let state = AppState::build(settings(&db.url, catalog)).await.unwrap();
    tenants::link_customers(&state.db, TENANTS).await;
    let interval = state.settings.metering.push_interval;
    let events = 20_000 * interval.as_secs() as usize;
    let now = billsync::store::now_ms();
    for body in batches(1000, events / 1000, 0) {
        state
            .metering
            .ingest(body["events"].as_array().unwrap(), now)
            .await
            .unwrap();
    }
    let vendor = Arc::new(CountingVendor::default());
    let pusher = state.pusher(vendor.clone());
    pusher.step().await.unwrap();
    let calls = vendor.calls.load(Ordering::Relaxed);
    state.db.close().await;
    db.drop_now().await;
    (events, calls as f64 / interval.as_secs_f64())
}

#[tokio::main]
async fn main() {
    state::init_crypto();
    let quick = std::env::args().any(|a| a == "quick");
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    std::fs::write(
        &catalog,
        "[meters.calls]\naggregation = \"sum\"\nstripe_event_name = \"calls\"\n",
    )
    .unwrap();
    println!(
        "billsync metering benchmark ({CONCURRENCY} concurrent clients, {TENANTS} tenants, 1% duplicates)"
    );
    println!(
        "| load | SQLite events/s | SQLite ack p50 / p99 | PostgreSQL events/s | PostgreSQL ack p50 / p99 |"
    );
    println!("|---|---|---|---|---|");
    let sqlite = ingestion(Backend::Sqlite, &catalog, quick).await;
    let postgres = ingestion(Backend::Postgres, &catalog, quick).await;
    for ((label, s), (_, p)) in sqlite.iter().zip(&postgres) {
        println!(
            "| {label} | {:.0} | {:.2} / {:.2} ms | {:.0} | {:.2} / {:.2} ms |",
            s.events_per_sec, s.p50, s.p99, p.events_per_sec, p.p50, p.p99
        );
    }
    let (events, per_sec) = vendor_calls(&catalog).await;
    println!(
        "| push of {events} events (20,000/s for one 10 s interval) | vendor calls/s: {per_sec:.1} | | | |"
    );
}
