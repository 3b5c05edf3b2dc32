//! `cargo bench --bench console [-- sqlite|postgres]`: with 100,000 tenants, the latency of the
//! tenant search (`GET /v1/tenants?q=`) and of the API calls a tenant page makes, over real
//! HTTP, one request at a time (the tenants have two notifications each); and the bytes the
//! console's first load transfers. Prints the
//! figures quoted in docs/benchmarks.md.

use std::time::{Duration, Instant};

use billsync::app;
use billsync::state::{self, AppState};
use billsync::store::Db;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;
#[path = "common/tenants.rs"]
mod tenants;

use common::{Backend, Database, percentiles};
use tenants::{API_KEY, CATALOG, settings};

const TENANTS: usize = 100_000;
const SAMPLES: usize = 400;

/// A request path made from a sample's index.
type PathOf = fn(usize) -> String;

/// Tenants `t0`… with a name, an email and a customer id each, in a few transactions.
async fn create_tenants(db: &Db) {
    macro_rules! insert {
        ($pool:expr, $chunk:expr) => {{
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO tenants (tenant_id, name, email, customer_id, created_at, updated_at) ",
            );
            query.push_values($chunk, |mut b, i| {
                b.push_bind(format!("t{i}"))
                    .push_bind(format!("Company {i} Ltd"))
                    .push_bind(format!("billing{i}@company{}.example", i % 1000))
                    .push_bind(format!("cus_{i:06}"))
                    .push_bind(0_i64)
                    .push_bind(0_i64);
            });
            query.build().execute($pool).await.map(drop)
        }};
    }
    for chunk in (0..TENANTS).collect::<Vec<_>>().chunks(5000) {
        match db {
            Db::Sqlite(pool) => insert!(pool, chunk),
            Db::Postgres(pool) => insert!(pool, chunk),
        }
        .unwrap();
    }
}

/// Two delivered notifications per tenant, so that a tenant's latest ones are found among
/// many (the tenant page lists them).
async fn create_notifications(db: &Db) {
    macro_rules! insert {
        ($pool:expr, $chunk:expr) => {{
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO notifications (event_id, tenant_id, type, payload, status, attempts, \
                 next_attempt_at, created_at, updated_at, delivered_at) ",
            );
            query.push_values($chunk, |mut b, n: &usize| {
                let (tenant, at) = (n / 2, 1_765_000_000_000 + *n as i64);
                b.push_bind(format!("evt_bs_{n:08}"))
                    .push_bind(format!("t{tenant}"))
                    .push_bind("credits.balance_low")
                    .push_bind(r#"{"data":{}}"#)
                    .push_bind("delivered")
                    .push_bind(1_i32)
                    .push_bind(0_i64)
                    .push_bind(at)
                    .push_bind(at)
                    .push_bind(at);
            });
            query.build().execute($pool).await.map(drop)
        }};
    }
    for chunk in (0..2 * TENANTS).collect::<Vec<_>>().chunks(3000) {
        match db {
            Db::Sqlite(pool) => insert!(pool, chunk),
            Db::Postgres(pool) => insert!(pool, chunk),
        }
        .unwrap();
    }
}

/// p50 and p99 (ms) of `SAMPLES` sequential GETs, the path made from the sample's index.
async fn measure(
    client: &reqwest::Client,
    base: &str,
    path: impl Fn(usize) -> String,
) -> (f64, f64) {
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let url = format!("{base}{}", path(i * 7919 % TENANTS));
        let started = Instant::now();
        let response = client.get(&url).bearer_auth(API_KEY).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        response.bytes().await.unwrap();
        samples.push(started.elapsed());
    }
    percentiles(&mut samples)
}

/// Bytes of the console's own files and of the API answers its overview asks for first.
async fn first_load(client: &reqwest::Client, base: &str) -> (usize, usize) {
    let mut assets = 0;
    for path in ["/console", "/console/console.js", "/console/console.css"] {
        let body = client.get(format!("{base}{path}")).send().await.unwrap();
        assets += body.bytes().await.unwrap().len();
    }
    let mut api = 0;
    for path in [
        "/v1/tenants?limit=1",
        "/v1/sync/status",
        "/v1/reconciliations?status=done&limit=1",
    ] {
        let body = client
            .get(format!("{base}{path}"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        api += body.bytes().await.unwrap().len();
    }
    (assets, api)
}

async fn run(backend: Backend, catalog: &std::path::Path) {
    let db = Database::create(backend).await;
    let settings = settings(&db.url, catalog);
    let state = AppState::build(settings.clone()).await.unwrap();
    let seeding = Instant::now();
    create_tenants(&state.db).await;
    create_notifications(&state.db).await;
    println!(
        "{backend:?}: {TENANTS} tenants and {} notifications stored in {:.1} s",
        2 * TENANTS,
        seeding.elapsed().as_secs_f64()
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app::run(settings, listener, shutdown.clone()));
    let client = reqwest::Client::new();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let searches: [(&str, PathOf); 6] = [
        ("first page, no q", |_| "/v1/tenants?limit=20".to_owned()),
        ("tenant id", |i| format!("/v1/tenants?q=t{i}")),
        ("email", |i| format!("/v1/tenants?q=billing{i}%40")),
        ("name, other case", |i| {
            format!("/v1/tenants?q=COMPANY%20{i}%20")
        }),
        ("customer id", |i| format!("/v1/tenants?q=cus_{i:06}")),
        ("broad (`billing1`: 11,111 match)", |_| {
            "/v1/tenants?q=billing1".to_owned()
        }),
    ];
    for (what, path) in searches {
        let (p50, p99) = measure(&client, &base, path).await;
        println!("{backend:?}: search by {what}: p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
    let page = [
        "",
        "/entitlements",
        "/invoices?limit=20",
        "/payments?limit=20",
        "/events?limit=50",
        "/usage?meter=calls&group_by=day",
        "/credits?limit=10",
        "/credits/settings",
    ];
    for call in page {
        let (p50, p99) = measure(&client, &base, |i| format!("/v1/tenants/t{i}{call}")).await;
        println!(
            "{backend:?}: tenant page GET /v1/tenants/{{t}}{call}: p50 {p50:.2} ms, p99 {p99:.2} ms"
        );
    }
    let notes = |i| format!("/v1/notifications?tenant_id=t{i}&limit=10");
    let (p50, p99) = measure(&client, &base, notes).await;
    println!(
        "{backend:?}: tenant page GET /v1/notifications?tenant_id={{t}}: p50 {p50:.2} ms, p99 {p99:.2} ms"
    );
    let (assets, api) = first_load(&client, &base).await;
    println!(
        "{backend:?}: console first load: {assets} bytes of HTML, JS and CSS, {api} bytes of API answers"
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
    db.drop_now().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    state::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    let only = std::env::args()
        .skip(1)
        .find(|a| a == "sqlite" || a == "postgres");
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let name = format!("{backend:?}").to_lowercase();
        if only.as_ref().is_none_or(|o| *o == name) {
            run(backend, &catalog).await;
        }
    }
}
