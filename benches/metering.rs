//! Metering figures: ingestion events/s and acknowledgement latency for batches of 1, 100 and
//! 1,000 events at 1% duplicates, on SQLite and PostgreSQL; acknowledgement latency at a paced
//! 5,000 events/s; vendor calls per second when 20,000 events/s are pushed.
//!
//!     cargo bench --bench metering            # about 2 minutes after the build
//!     cargo bench --bench metering -- quick
//!     cargo bench --bench metering -- sqlite  # SQLite batches of 1,000 only, three runs
//!     cargo bench --bench metering -- soak    # memory under steady load, 10 minutes
//!
//! The soak runs the release binary (`billsync serve`) in a child process on PostgreSQL with
//! 10,000 tenants, a `sum` and a `unique_count` meter, and prints its resident memory every
//! 10 s and each minute's peak; BILLSYNC_BENCH_SOAK_MINUTES (default 10) and
//! BILLSYNC_BENCH_SOAK_RATE (events/s, default 10,000) change it.
//!
//! Needs PostgreSQL (BILLSYNC_BENCH_DATABASE_URL, an admin URL; default
//! postgres://postgres@127.0.0.1:5432/postgres).

use std::process::{Child, Command, Stdio};
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

/// The ingestion loads on one server; with `thousands`, only `thousands` runs of batches of
/// 1,000 (no other load, no pacing).
async fn ingestion(
    backend: Backend,
    catalog: &std::path::Path,
    quick: bool,
    thousands: Option<usize>,
) -> Vec<(String, Run)> {
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
    let loads = match thousands {
        Some(runs) => vec![(1000, 60); runs],
        None => vec![(1, 3000 / scale), (100, 400 / scale), (1000, 60 / scale)],
    };
    for (size, count) in loads {
        let run = drive(&base, batches(size, count, offset), size * count, None).await;
        offset += size * count + 10;
        results.push((format!("batches of {size}"), run));
    }
    if thousands.is_some() {
        shutdown.cancel();
        server.await.unwrap().unwrap();
        db.drop_now().await;
        return results;
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

/// SQLite ingestion in batches of 1,000, three runs of 60,000 events on one server, and their
/// median (what `-- sqlite` prints; a short load to profile).
async fn sqlite_thousands(catalog: &std::path::Path) {
    let runs = ingestion(Backend::Sqlite, catalog, false, Some(3)).await;
    let mut rates: Vec<f64> = runs.iter().map(|(_, r)| r.events_per_sec).collect();
    for (label, run) in &runs {
        println!(
            "| SQLite {label} | {:.0} | {:.2} / {:.2} ms | | |",
            run.events_per_sec, run.p50, run.p99
        );
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "SQLite batches of 1000, median of three: {:.0} events/s",
        rates[1]
    );
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
    if std::env::args().any(|a| a == "soak") {
        return soak().await;
    }
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
    if std::env::args().any(|a| a == "sqlite") {
        return sqlite_thousands(&catalog).await;
    }
    let sqlite = ingestion(Backend::Sqlite, &catalog, quick, None).await;
    let postgres = ingestion(Backend::Postgres, &catalog, quick, None).await;
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

/// The soak's catalog: a `sum` meter and a `unique_count` one, each behind a quota.
const SOAK_CATALOG: &str = "[meters.calls]\naggregation = \"sum\"\n\n\
[meters.users]\naggregation = \"unique_count\"\nproperty = \"user_id\"\n\n\
[features.api_calls]\nmeter = \"calls\"\n\n[features.seats]\nmeter = \"users\"\n\n\
[plans.free]\nfeatures = { api_calls = 1000000000, seats = 1000000000 }\n";
const SOAK_TENANTS: usize = 10_000;
/// Distinct values of the `unique_count` meter across all tenants.
const SOAK_USERS: usize = 100_000;

/// A setting of the soak from the environment, or its default.
fn soak_setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `billsync serve`, the release binary, in a child process of its own on `url`; its port.
fn serve(url: &str, catalog: &std::path::Path) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_billsync"));
    // The benchmark's own BILLSYNC_BENCH_* settings are not the server's.
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("BILLSYNC_")) {
        command.env_remove(name);
    }
    let child = command
        .arg("serve")
        .env("BILLSYNC_LISTEN", format!("127.0.0.1:{port}"))
        .env("BILLSYNC_DATABASE__URL", url)
        .env("BILLSYNC_API__KEYS", API_KEY)
        .env("BILLSYNC_STRIPE__REFETCH", "false")
        .env("BILLSYNC_CATALOG__PATH", catalog)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("the billsync binary");
    (child, format!("http://127.0.0.1:{port}"))
}

/// Steady usage of both meters, `rate` events/s in 20 batches a second, values drawn from
/// [`SOAK_USERS`]; counts accepted events.
async fn soak_usage(base: String, rate: usize, accepted: Arc<AtomicUsize>) {
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let per_batch = rate.div_ceil(20);
    for round in 0usize.. {
        tick.tick().await;
        let events: Vec<Value> = (0..per_batch)
            .map(|i| {
                let tenant = format!("t{}", fastrand::usize(..SOAK_TENANTS));
                let id = format!("s{round}-{i}");
                if i % 2 == 0 {
                    json!({"id": id, "tenant_id": tenant, "meter": "calls", "quantity": "0.25"})
                } else {
                    let user = format!("u{}", fastrand::usize(..SOAK_USERS));
                    json!({"id": id, "tenant_id": tenant, "meter": "users", "properties": {"user_id": user}})
                }
            })
            .collect();
        let request = (http.post(format!("{base}/v1/usage")))
            .bearer_auth(API_KEY)
            .json(&json!({ "events": events }));
        let accepted = accepted.clone();
        tokio::spawn(async move {
            match request.send().await.and_then(|r| r.error_for_status()) {
                Ok(answer) => {
                    let answer: Value = answer.json().await.unwrap_or_default();
                    let count = answer["accepted"].as_u64().unwrap_or(0) as usize;
                    accepted.fetch_add(count, Ordering::Relaxed);
                }
                Err(error) => eprintln!("soak usage: {error}"),
            }
        });
    }
}

/// Entitlement checks of both quotas, 200 a second, on random tenants; counts answers.
async fn soak_checks(base: String, answered: Arc<AtomicUsize>) {
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for round in 0usize.. {
        tick.tick().await;
        let tenant = fastrand::usize(..SOAK_TENANTS);
        let feature = if round % 2 == 0 { "api_calls" } else { "seats" };
        let request = (http.post(format!("{base}/v1/tenants/t{tenant}/entitlements/check")))
            .bearer_auth(API_KEY)
            .json(&json!({"feature": feature, "quantity": 1}));
        let answered = answered.clone();
        tokio::spawn(async move {
            if let Ok(answer) = request.send().await.and_then(|r| r.error_for_status()) {
                let _ = answer.bytes().await;
                answered.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// The soak: the release binary on PostgreSQL with 10,000 tenants under steady usage of a
/// `sum` and a `unique_count` meter and steady checks, for BILLSYNC_BENCH_SOAK_MINUTES
/// (default 10) at BILLSYNC_BENCH_SOAK_RATE events/s (default 10,000); prints the server's
/// resident memory every 10 s and each minute's peak.
async fn soak() {
    let minutes = soak_setting("BILLSYNC_BENCH_SOAK_MINUTES", 10).max(2);
    let rate = soak_setting("BILLSYNC_BENCH_SOAK_RATE", 10_000) as usize;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    std::fs::write(&catalog, SOAK_CATALOG).unwrap();
    let db = Database::create(Backend::Postgres).await;
    let state = AppState::build(settings(&db.url, &catalog)).await.unwrap();
    tenants::create_tenants(&state.db, SOAK_TENANTS).await;
    state.db.close().await;
    let (mut child, base) = serve(&db.url, &catalog);
    let http = reqwest::Client::new();
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("billsync serve ended while starting: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "soak: {SOAK_TENANTS} tenants, a sum and a unique_count meter ({SOAK_USERS} distinct values), \
         {rate} events/s and 200 checks/s for {minutes} min, PostgreSQL, release binary"
    );
    let (accepted, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = tokio::spawn(soak_usage(base.clone(), rate, accepted.clone()));
    let checks = tokio::spawn(soak_checks(base.clone(), answered.clone()));
    let pid = child.id().to_string();
    let mut peaks = vec![0f64; minutes as usize];
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    for sample in 1..=minutes * 6 {
        tick.tick().await;
        let rss = tenants::process_status_mib(&pid, "VmRSS:");
        let minute = ((sample - 1) / 6) as usize;
        peaks[minute] = peaks[minute].max(rss);
        println!(
            "{:>5.0} s  resident {rss:>6.1} MiB  events accepted {:>9}  checks {:>7}",
            started.elapsed().as_secs_f64(),
            accepted.load(Ordering::Relaxed),
            answered.load(Ordering::Relaxed)
        );
    }
    load.abort();
    checks.abort();
    println!("| minute | peak resident MiB |\n|---|---|");
    for (minute, peak) in peaks.iter().enumerate() {
        println!("| {} | {peak:.1} |", minute + 1);
    }
    let (second, last) = (peaks[1], peaks[peaks.len() - 1]);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "events accepted {:.0}/s, checks {:.0}/s; last minute's peak {last:.1} MiB is {:+.1}% of the second's {second:.1} MiB (target within 20%)",
        accepted.load(Ordering::Relaxed) as f64 / secs,
        answered.load(Ordering::Relaxed) as f64 / secs,
        (last / second - 1.0) * 100.0
    );
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = child.wait();
    db.drop_now().await;
}
