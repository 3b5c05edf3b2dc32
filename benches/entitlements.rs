//! Entitlement figures: HTTP checks under wrk (8 and 64 connections, 10,000 tenants), the
//! in-process check's latency distribution, and resident memory with 100,000 tenants.
//!
//!     cargo bench --bench entitlements           # needs wrk (apt-get install wrk)
//!     cargo bench --bench entitlements -- quick
//!
//! The service runs in this process, in release mode, on loopback; wrk shares the 2 cores.

use std::process::Command;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;
#[path = "common/tenants.rs"]
mod tenants;

use common::quantiles;

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

struct WrkRun {
    requests_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    non_2xx: u64,
}

fn wrk(
    address: &str,
    connections: u32,
    seconds: u32,
    tenants: usize,
    script: &std::path::Path,
) -> WrkRun {
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
        ])
        .arg(script)
        .arg(format!("http://{address}"))
        .env("TENANTS", tenants.to_string())
        .env("KEY", tenants::API_KEY)
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

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "quick");
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

    // Over HTTP, with wrk on the same machine.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let settings = (*state.settings).clone();
    let server = tokio::spawn(billsync::app::run(settings, listener, shutdown.clone()));
    let client = reqwest::Client::new();
    while client
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let script = dir.path().join("check.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();
    // Warm the server's own models (a new process), then measure.
    let _ = tokio::task::spawn_blocking({
        let (address, script) = (address.clone(), script.clone());
        move || wrk(&address, 8, 2, count, &script)
    })
    .await;
    for connections in [8, 64] {
        let (address, script) = (address.clone(), script.clone());
        let run = tokio::task::spawn_blocking(move || {
            wrk(&address, connections, seconds, count, &script)
        })
        .await
        .unwrap();
        println!(
            "| HTTP checks, {connections} connections, {seconds} s: requests/s; p50 / p99 / p99.9 | {:.0}; {} / {} / {} µs{} |",
            run.requests_per_sec,
            run.p50_us,
            run.p99_us,
            run.p999_us,
            if run.non_2xx > 0 {
                format!(" ({} non-2xx!)", run.non_2xx)
            } else {
                String::new()
            }
        );
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
    drop(state);

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
