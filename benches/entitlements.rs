//! Entitlement figures: HTTP checks under wrk (8 and 64 connections, 10,000 tenants), the
//! in-process check's latency distribution, check-and-record over HTTP (64 connections over
//! 1,000 tenants, on PostgreSQL and on SQLite), and resident memory with 100,000 tenants.
//!
//!     cargo bench --bench entitlements           # needs wrk (apt-get install wrk)
//!     cargo bench --bench entitlements -- quick
//!     cargo bench --bench entitlements -- record [postgres|sqlite]  # check-and-record alone
//!     cargo bench --bench entitlements -- credits [postgres|sqlite] # credit-priced, beside it
//!
//! The service runs in this process, in release mode, on loopback; wrk shares the 2 cores.

use std::process::Command;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;
#[path = "entitlements/credits.rs"]
mod credits;
#[path = "common/tenants.rs"]
mod tenants;

use common::{Backend, Database, quantiles};

const WRK_SCRIPT: &str = r#"
local n = tonumber(os.getenv("TENANTS"))
local i = 0
request = function()
  i = (i + 7919) % n
  return wrk.format("POST", "/v1/tenants/t" .. i .. "/entitlements/check",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. os.getenv("KEY")},
    '{"feature":"api_calls","quantity":1}')
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %f %d %d %d %d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), summary.errors.status))
end
"#;

/// Check-and-record: every request records one unit under an id of its own (thread, count).
pub(crate) const WRK_RECORD_SCRIPT: &str = r#"
local n = tonumber(os.getenv("TENANTS"))
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local i = 0
request = function()
  i = i + 1
  local t = (i * 7919 + tid * 104729) % n
  return wrk.format("POST", "/v1/tenants/t" .. t .. "/entitlements/check",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. os.getenv("KEY")},
    '{"feature":"' .. os.getenv("FEATURE") .. '","quantity":1,"record":{"id":"' .. os.getenv("RUN") .. '-' .. tid .. '-' .. i .. '"}}')
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %f %d %d %d %d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), summary.errors.status))
end
"#;

struct WrkRun {
    requests_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    non_2xx: u64,
}

impl WrkRun {
    /// `rate; p50 / p99 / p99.9 µs`, and the non-2xx answers if there were any.
    fn figures(&self) -> String {
        let errors = match self.non_2xx {
            0 => String::new(),
            n => format!(" ({n} non-2xx!)"),
        };
        format!(
            "{:.0}; {} / {} / {} µs{errors}",
            self.requests_per_sec, self.p50_us, self.p99_us, self.p999_us
        )
    }
}

fn wrk(
    address: &str,
    threads: u32,
    connections: u32,
    seconds: u32,
    tenants: usize,
    script: &std::path::Path,
) -> WrkRun {
    wrk_feature(
        address,
        (threads, connections, seconds),
        tenants,
        script,
        "api_calls",
    )
}

/// [`wrk`] with the feature a record script checks.
pub(crate) fn wrk_feature(
    address: &str,
    (threads, connections, seconds): (u32, u32, u32),
    tenants: usize,
    script: &std::path::Path,
    feature: &str,
) -> WrkRun {
    let output = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
        ])
        .arg(script)
        .arg(format!("http://{address}"))
        .env("TENANTS", tenants.to_string())
        .env("KEY", tenants::API_KEY)
        .env("RUN", uuid::Uuid::new_v4().simple().to_string())
        .env("FEATURE", feature)
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("wrk printed: {text}"));
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    WrkRun {
        requests_per_sec: f[0] / f[1],
        p50_us: f[2] as u64,
        p99_us: f[3] as u64,
        p999_us: f[4] as u64,
        non_2xx: f[5] as u64,
    }
}

fn healthy(address: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return false;
    };
    let mut answer = String::new();
    stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.split_whitespace().nth(1) == Some("200")
}

/// `billsync::app::run` on a runtime of its own, built the way `billsync serve` builds it.
pub(crate) struct Server {
    address: String,
    shutdown: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    fn start(settings: billsync::config::Settings) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let address = std_listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let thread = std::thread::spawn({
            let shutdown = shutdown.clone();
            move || {
                // As `billsync serve` runs: with its log subscriber (default level: info).
                billsync::telemetry::init(&settings.log);
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                if let Some(threads) = settings.runtime.worker_threads {
                    builder.worker_threads(threads);
                }
                let runtime = builder.enable_all().build().unwrap();
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    billsync::app::run(settings, listener, shutdown)
                        .await
                        .unwrap();
                });
            }
        });
        while !healthy(&address) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            address,
            shutdown,
            thread,
        }
    }

    fn stop(self) {
        self.shutdown.cancel();
        self.thread.join().unwrap();
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let with_credits = std::env::args().any(|a| a == "credits");
    if with_credits || std::env::args().any(|a| a == "record") {
        println!("| measure | figure |");
        println!("|---|---|");
        let only = |name: &str| std::env::args().any(|a| a == name);
        for backend in [Backend::Postgres, Backend::Sqlite] {
            let named = format!("{backend:?}").to_lowercase();
            if only(&named) || !(only("postgres") || only("sqlite")) {
                let seconds = if quick { 3 } else { 10 };
                // With credits, the hard-limit figure is the peer in the same run.
                check_and_record(backend, seconds).await;
                if with_credits {
                    credits::check_and_record(backend, seconds).await;
                }
            }
        }
        return;
    }
    let (count, seconds) = if quick { (2_000, 3) } else { (10_000, 10) };
    let dir = tempfile::tempdir().unwrap();
    let state = tenants::warm_state(dir.path(), count).await;

    // In process: one million warm checks, timed one by one.
    let names: Vec<String> = (0..count).map(|i| format!("t{i}")).collect();
    let now = billsync::store::now_ms();
    let mut samples = Vec::with_capacity(1_000_000);
    for n in 0..1_000_000usize {
        let name = &names[(n * 7919) % count];
        let started = Instant::now();
        let decision = state
            .entitlements
            .check_warm(name, "api_calls", Decimal::ONE, now);
        samples.push(started.elapsed());
        assert!(decision.is_some_and(|d| d.allowed));
    }
    let q = quantiles(&mut samples, &[0.5, 0.99, 0.999]);
    println!("billsync entitlement benchmark ({count} tenants)");
    println!("| measure | figure |");
    println!("|---|---|");
    println!(
        "| in-process warm check p50 / p99 / p99.9 (1,000,000 checks) | {} / {} / {} ns |",
        q[0].as_nanos(),
        q[1].as_nanos(),
        q[2].as_nanos()
    );

    // Over HTTP, with wrk on the same machine: the service on its own runtime, first with the
    // defaults (one worker per core, wrk on two threads), then with `runtime.worker_threads = 1`
    // and wrk on one thread, so that each has a core of its own.
    let script = dir.path().join("check.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();
    for (threads, wrk_threads) in [(None, 2), (Some(1), 1)] {
        let mut settings = (*state.settings).clone();
        settings.runtime.worker_threads = threads;
        let server = Server::start(settings);
        // Warm the server's own models (a new state), then measure.
        let _ = wrk(&server.address, wrk_threads, 8, 2, count, &script);
        let label = match threads {
            None => format!("default workers (one per core), wrk -t{wrk_threads}"),
            Some(n) => format!("runtime.worker_threads = {n}, wrk -t{wrk_threads}"),
        };
        for connections in [8, 64] {
            let run = wrk(
                &server.address,
                wrk_threads,
                connections,
                seconds,
                count,
                &script,
            );
            println!(
                "| HTTP checks, {label}, {connections} connections, {seconds} s: requests/s; p50 / p99 / p99.9 | {} |",
                run.figures()
            );
        }
        server.stop();
    }
    drop(state);

    for backend in [Backend::Postgres, Backend::Sqlite] {
        check_and_record(backend, if quick { 3 } else { 10 }).await;
    }

    // Memory: 100,000 tenants' models loaded.
    let big = if quick { 20_000 } else { 100_000 };
    let dir = tempfile::tempdir().unwrap();
    let before = tenants::resident_mib();
    let state = tenants::warm_state(dir.path(), big).await;
    let after = tenants::resident_mib();
    println!(
        "| resident memory with {big} tenants loaded (process total; growth) | {after:.0} MiB; +{:.0} MiB |",
        after - before
    );
    drop(state);
}

/// The settings and a state for a check-and-record run on `database` with `catalog`, its log
/// quiet: wrk stops mid-request, and the requests still queued when the server stops are not
/// news.
async fn record_state(
    database: &Database,
    dir: &std::path::Path,
    catalog: &str,
) -> (billsync::config::Settings, billsync::state::AppState) {
    let path = dir.join("plans.toml");
    std::fs::write(&path, catalog).unwrap();
    let mut settings = tenants::settings(&database.url, &path);
    settings.log.level = "error".to_owned();
    let state = billsync::state::AppState::build(settings.clone())
        .await
        .unwrap();
    (settings, state)
}

/// Check-and-record over HTTP: 64 connections over 1,000 tenants, every request recording one
/// unit (the database lock, the count over the usage log and the insert, per request).
async fn check_and_record(backend: Backend, seconds: u32) {
    const TENANTS: usize = 1_000;
    let database = Database::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let (settings, state) = record_state(&database, dir.path(), tenants::CATALOG).await;
    tenants::create_tenants(&state.db, TENANTS).await;
    drop(state);
    let script = dir.path().join("record.lua");
    std::fs::write(&script, WRK_RECORD_SCRIPT).unwrap();
    let server = Server::start(settings);
    let _ = wrk(&server.address, 2, 64, 2, TENANTS, &script);
    let run = wrk(&server.address, 2, 64, seconds, TENANTS, &script);
    println!(
        "| HTTP check-and-record, {backend:?}, default pool (10), 64 connections over {TENANTS} tenants, {seconds} s: records/s; p50 / p99 / p99.9 | {} |",
        run.figures()
    );
    server.stop();
    database.drop_now().await;
}
