//! The change stream and the in-process client (`crates/billsync-client`), against the real
//! `billsync serve` binary in a process of its own (so that its memory and CPU are its own):
//!
//! - `check`: the client's local `check` p50/p99 over 100,000 tenants, the client's memory for
//!   them, and how long the first snapshot took;
//! - `change`: a subscription change delivered by webhook to a changed answer in the client;
//! - `usage`: usage recorded in client A to `used` in client B;
//! - `streams`: 1,000 concurrent streams on one server, its memory and CPU at rest and while
//!   1,000 tenants' usage changes every second.
//!
//! ```sh
//! cargo bench --bench stream                  # everything, on PostgreSQL
//! cargo bench --bench stream -- change usage  # some sections
//! BILLSYNC_BENCH_BACKEND=sqlite cargo bench --bench stream
//! ```
//!
//! Needs PostgreSQL (BILLSYNC_BENCH_DATABASE_URL, an admin URL; default
//! postgres://postgres@127.0.0.1:5432/postgres) unless the backend is SQLite.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use billsync_client::{Client, Options};
use rust_decimal::Decimal;
use serde_json::json;

mod common;
#[path = "common/tenants.rs"]
mod tenants;

use common::{Backend, Database, quantiles};

const API_KEY: &str = tenants::API_KEY;
const SECRET: &str = "whsec_bench";
const CATALOG: &str = "[meters.calls]\naggregation = \"sum\"\n\n[features.api_calls]\nmeter = \"calls\"\n\n\
[plans.free]\nfeatures = { api_calls = 10 }\n\n[plans.price_pro]\nfeatures = { api_calls = 1000, sso = true }\n";

/// `billsync serve` on a database of its own, in a child process.
struct Server {
    child: Child,
    base: String,
    db: Database,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A database with `count` tenants (the first `linked` linked to customers), then the
    /// binary serving it.
    async fn start(backend: Backend, count: usize, linked: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("plans.toml");
        std::fs::write(&catalog, CATALOG).unwrap();
        let db = Database::create(backend).await;
        seed(&db.url, &catalog, count, linked).await;
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
        let mut child = command
            .arg("serve")
            .env("BILLSYNC_LISTEN", format!("127.0.0.1:{port}"))
            .env("BILLSYNC_DATABASE__URL", &db.url)
            .env("BILLSYNC_API__KEYS", API_KEY)
            .env("BILLSYNC_STRIPE__WEBHOOK_SECRETS", SECRET)
            .env("BILLSYNC_STRIPE__REFETCH", "false")
            .env("BILLSYNC_CATALOG__PATH", &catalog)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the billsync binary");
        let http = reqwest::Client::new();
        while http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_err()
        {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("billsync serve ended while starting: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            db,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's resident memory (MiB) and CPU time so far (seconds).
    fn usage(&self) -> (f64, f64) {
        process_usage(&self.child.id().to_string())
    }

    /// `perf record` of the server while `during` runs, when BILLSYNC_BENCH_PERF names the
    /// file to write (`perf report -i FILE` reads it).
    async fn profiled<T>(&self, during: impl Future<Output = T>) -> T {
        let Ok(file) = std::env::var("BILLSYNC_BENCH_PERF") else {
            return during.await;
        };
        let pid = self.child.id().to_string();
        let mut perf = Command::new("perf")
            .args(["record", "-F", "999", "-o", &file, "-p", &pid])
            .stderr(Stdio::null())
            .spawn()
            .expect("perf");
        let result = during.await;
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
        result
    }

    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.db.drop_now().await;
    }
}

/// A process's resident memory (MiB) and CPU time so far (seconds), from /proc (`pid` may be
/// `self`).
fn process_usage(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = (after.split_whitespace().skip(11).take(2))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    (tenants::process_status_mib(pid, "VmRSS:"), ticks / 100.0)
}

/// Migrates the database and inserts the tenants, with the service's own code.
async fn seed(url: &str, catalog: &std::path::Path, count: usize, linked: usize) {
    billsync::state::init_crypto();
    let state = billsync::state::AppState::build(tenants::settings(url, catalog))
        .await
        .unwrap();
    tenants::create_tenants(&state.db, count).await;
    tenants::link_customers(&state.db, linked).await;
    state.db.close().await;
}

fn options() -> Options {
    Options {
        connect_timeout: Duration::from_secs(300),
        ..Options::default()
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Local checks over 100,000 tenants: p50/p99 of single calls, and the client's memory.
async fn check(backend: Backend) {
    const TENANTS: usize = 100_000;
    let server = Server::start(backend, TENANTS, 0).await;
    let before = tenants::resident_mib();
    let started = Instant::now();
    let url = server.url("");
    let connecting = Client::connect(&url, API_KEY, options());
    let client = server.profiled(connecting).await.unwrap();
    let snapshot = started.elapsed();
    assert_eq!(client.stats().tenants, TENANTS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let holding = tenants::resident_mib();
    let names: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();
    // Three rounds of a million checks; the round with the median p99 is shown.
    let mut rounds: Vec<_> = (0..3)
        .map(|_| time_checks(&client, &names, 1_000_000))
        .collect();
    rounds.sort_by_key(|(q, _)| q[1]);
    let (checks, timer) = rounds.swap_remove(1);
    client.shutdown().await.unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = tenants::resident_mib();
    println!(
        "check ({backend:?}): {TENANTS} tenants; first snapshot {:.2} s; this process resident \
         {before:.0} MiB before the client, {holding:.0} MiB with its replica, {after:.0} MiB once \
         it is dropped",
        snapshot.as_secs_f64(),
    );
    println!(
        "  local check (quota), median of three rounds of 1,000,000: p50 {:.3} µs  p99 {:.3} µs  p99.9 {:.3} µs  (timer alone: {:.3} µs)",
        micros(checks[0]),
        micros(checks[1]),
        micros(checks[2]),
        micros(timer)
    );
    server.stop().await;
}

/// `n` single checks, each timed; returns p50, p99, p99.9 and the timer's own median cost.
fn time_checks(client: &Client, names: &[String], n: usize) -> (Vec<Duration>, Duration) {
    let mut samples = Vec::with_capacity(n);
    let mut empty = Vec::with_capacity(n);
    let mut i = 0;
    for _ in 0..n {
        i = (i + 7919) % names.len();
        // A caller's tenant id is in its cache (it just read it from the request).
        let tenant = std::hint::black_box(names[i].as_str());
        std::hint::black_box(tenant.as_bytes().last());
        let started = Instant::now();
        let answer = client.check_in_memory(tenant, "api_calls", Decimal::ONE);
        samples.push(started.elapsed());
        std::hint::black_box(answer);
        let started = Instant::now();
        empty.push(started.elapsed());
    }
    let timer = quantiles(&mut empty, &[0.5])[0];
    (quantiles(&mut samples, &[0.50, 0.99, 0.999]), timer)
}

/// A subscription to the pro plan delivered by webhook, to the client's changed answer.
async fn change(backend: Backend) {
    const SAMPLES: usize = 200;
    let server = Server::start(backend, 1_000, SAMPLES).await;
    let client = Client::connect(&server.url(""), API_KEY, options())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let (mut from_send, mut from_ack) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let tenant = format!("t{i}");
        let body = subscription_event(i).to_string();
        let now = chrono::Utc::now().timestamp();
        let signature = billsync::webhook::signature::header(SECRET, now, body.as_bytes());
        let sent = Instant::now();
        let response = (http.post(server.url("/webhooks/stripe")))
            .header("stripe-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let acked = Instant::now();
        while !client.check_in_memory(&tenant, "sso", Decimal::ONE).allowed {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        from_send.push(sent.elapsed());
        from_ack.push(acked.elapsed());
    }
    let send = quantiles(&mut from_send, &[0.5, 0.99]);
    let ack = quantiles(&mut from_ack, &[0.5, 0.99]);
    println!(
        "change ({backend:?}): webhook sent → client answer p50 {:.1} ms  p99 {:.1} ms; \
         after the webhook's 200: p50 {:.1} ms  p99 {:.1} ms  ({SAMPLES} changes)",
        millis(send[0]),
        millis(send[1]),
        millis(ack[0]),
        millis(ack[1])
    );
    client.shutdown().await.unwrap();
    server.stop().await;
}

fn subscription_event(i: usize) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    let subscription = json!({"id": format!("sub_{i}"), "object": "subscription",
        "customer": format!("cus_{i}"), "status": "active", "created": now - 86_400,
        "cancel_at_period_end": false, "items": {"data": [{"id": format!("si_{i}"),
        "quantity": 1, "price": {"id": "price_pro", "object": "price"},
        "current_period_start": now - 86_400, "current_period_end": now + 29 * 86_400}]}});
    json!({"id": format!("evt_bench_{i}"), "object": "event",
        "type": "customer.subscription.updated", "created": now,
        "data": {"object": subscription}})
}

/// Usage recorded in client A (default options: batches flushed every second) to `used` in
/// client B, for samples started every 25 ms.
async fn usage(backend: Backend) {
    const SAMPLES: usize = 400;
    let server = Server::start(backend, SAMPLES, 0).await;
    let a = Client::connect(&server.url(""), API_KEY, options())
        .await
        .unwrap();
    let b = Client::connect(&server.url(""), API_KEY, options())
        .await
        .unwrap();
    let mut waits = tokio::task::JoinSet::new();
    for i in 0..SAMPLES {
        let tenant = format!("t{i}");
        let started = Instant::now();
        a.record(&tenant, "calls", Decimal::ONE, &format!("u-{i}"))
            .unwrap();
        let b = b.clone();
        waits.spawn(async move {
            while b.check_in_memory(&tenant, "api_calls", Decimal::ZERO).used != Some(Decimal::ONE)
            {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            started.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut samples = waits.join_all().await;
    let q = quantiles(&mut samples, &[0.5, 0.99]);
    println!(
        "usage ({backend:?}): recorded in A → `used` in B p50 {:.0} ms  p99 {:.0} ms  \
         ({SAMPLES} records; A flushes every {:?})",
        millis(q[0]),
        millis(q[1]),
        options().flush_interval
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    server.stop().await;
}

/// 1,000 streams on one server: its memory and CPU at rest, then while 1,000 tenants' usage
/// changes every second.
async fn streams(backend: Backend) {
    const STREAMS: usize = 1_000;
    const TENANTS: usize = 1_000;
    let server = Server::start(backend, TENANTS, 0).await;
    let (idle_rss, _) = server.usage();
    let events = Arc::new(AtomicU64::new(0));
    let (ready, ended) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    for _ in 0..STREAMS {
        let counters = (events.clone(), ready.clone(), ended.clone());
        let request = (http.get(server.url("/v1/entitlements/stream"))).bearer_auth(API_KEY);
        tokio::spawn(consume(request, counters));
    }
    while ready.load(Ordering::Relaxed) < STREAMS as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snapshots = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rest = measure(&server, Duration::from_secs(10), &events).await;
    let accepted = Arc::new(AtomicU64::new(0));
    let load = usage_load(server.url("/v1/usage"), TENANTS, accepted.clone());
    let load = tokio::spawn(load);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let accepted_before = accepted.load(Ordering::Relaxed);
    let busy = measure(&server, Duration::from_secs(20), &events).await;
    let accepted = (accepted.load(Ordering::Relaxed) - accepted_before) as f64 / 20.0;
    load.abort();
    println!(
        "streams ({backend:?}): {STREAMS} streams, {TENANTS} tenants; server resident {idle_rss:.0} MiB \
         before the streams; every stream ready (snapshot sent) after {:.1} s",
        snapshots.as_secs_f64()
    );
    for (what, w) in [
        ("at rest", rest),
        ("1,000 tenants' usage changing every second", busy),
    ] {
        println!(
            "  {what}: server {:.0} MiB resident, CPU {:.1}% of one core; {:.0} frames/s received \
             (the consumers and the load: CPU {:.1}%)",
            w.rss, w.cpu, w.frames, w.own_cpu
        );
    }
    println!(
        "  usage events accepted under load: {accepted:.0}/s; streams ended: {}",
        ended.load(Ordering::Relaxed)
    );
    server.stop().await;
}

/// Reads one stream to its end, counting its frames and its `ready`.
async fn consume(
    request: reqwest::RequestBuilder,
    (events, ready, ended): (Counter, Counter, Counter),
) {
    if let Ok(mut response) = request.send().await {
        // The stream's last bytes, kept until its `ready` has been seen.
        let (mut last, mut tail) = (0u8, Some(Vec::new()));
        while let Ok(Some(chunk)) = response.chunk().await {
            events.fetch_add(frame_ends(last, &chunk), Ordering::Relaxed);
            last = chunk.last().copied().unwrap_or(last);
            if let Some(seen) = &mut tail {
                seen.extend_from_slice(&chunk);
                if seen.windows(12).any(|w| w == b"event: ready") {
                    ready.fetch_add(1, Ordering::Relaxed);
                    tail = None;
                } else {
                    seen.drain(..seen.len().saturating_sub(12));
                }
            }
        }
    }
    ended.fetch_add(1, Ordering::Relaxed);
}

type Counter = Arc<AtomicU64>;

/// The blank lines that end SSE frames in `chunk`, `last` being the byte before it.
fn frame_ends(last: u8, chunk: &[u8]) -> u64 {
    let starts = (chunk.first() == Some(&b'\n') && last == b'\n') as u64;
    starts + chunk.windows(2).filter(|w| w == b"\n\n").count() as u64
}

/// What [`measure`] saw over its window.
struct Window {
    /// The server's resident memory at the end, MiB.
    rss: f64,
    /// The server's CPU, % of one core.
    cpu: f64,
    /// This process's CPU (the streams' consumer and the load), % of one core.
    own_cpu: f64,
    /// Frames the streams received per second.
    frames: f64,
}

async fn measure(server: &Server, window: Duration, events: &AtomicU64) -> Window {
    let ((_, cpu_before), (_, own_before)) = (server.usage(), process_usage("self"));
    let events_before = events.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    let ((rss, cpu_after), (_, own_after)) = (server.usage(), process_usage("self"));
    let frames = events.load(Ordering::Relaxed) - events_before;
    let secs = window.as_secs_f64();
    Window {
        rss,
        cpu: (cpu_after - cpu_before) / secs * 100.0,
        own_cpu: (own_after - own_before) / secs * 100.0,
        frames: frames as f64 / secs,
    }
}

/// One usage event per tenant every second, in ten batches spread over the second; counts the
/// events the server accepted.
async fn usage_load(url: String, tenants: usize, accepted: Arc<AtomicU64>) {
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for round in 0u64.. {
        tick.tick().await;
        let slice =
            (round % 10) as usize * tenants / 10..((round % 10) as usize + 1) * tenants / 10;
        let events: Vec<_> = slice
            .map(|t| {
                json!({"id": format!("load-{round}-{t}"), "tenant_id": format!("t{t}"),
                "meter": "calls", "quantity": 1})
            })
            .collect();
        // Each batch on its own: a slow answer does not hold back the next batches.
        let request = (http.post(&url))
            .bearer_auth(API_KEY)
            .json(&json!({"events": events}));
        let accepted = accepted.clone();
        tokio::spawn(async move {
            match request.send().await.and_then(|r| r.error_for_status()) {
                Ok(answer) => {
                    let answer: serde_json::Value = answer.json().await.unwrap_or_default();
                    let count = answer["accepted"].as_u64().unwrap_or(0);
                    accepted.fetch_add(count, Ordering::Relaxed);
                }
                Err(error) => eprintln!("usage load: {error}"),
            }
        });
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let backend = match std::env::var("BILLSYNC_BENCH_BACKEND").as_deref() {
        Ok("sqlite") => Backend::Sqlite,
        _ => Backend::Postgres,
    };
    if wants("check") {
        check(backend).await;
    }
    if wants("change") {
        change(backend).await;
    }
    if wants("usage") {
        usage(backend).await;
    }
    if wants("streams") {
        streams(backend).await;
    }
}
