//! Revenue-recognition figures: 10,000 tenants with 12 monthly invoices each (120,000 lines);
//! the time to a full rebuild of the schedule and a monthly report over the year, and the peak
//! resident memory during it, on SQLite and on PostgreSQL.
//!
//!     cargo bench --bench revenue
//!     cargo bench --bench revenue -- quick     # 1,000 tenants
//!
//! Needs PostgreSQL (BILLSYNC_BENCH_DATABASE_URL, an admin URL; default
//! postgres://postgres@127.0.0.1:5432/postgres).

use std::time::Instant;

use billsync::revenue::{Group, day_of, report};
use billsync::state::{self, AppState};
use billsync::store::{Apply, ObjectState};
use serde_json::json;

mod common;
#[path = "common/tenants.rs"]
mod tenants;

use common::{Backend, Database};

/// 2025-01-01T00:00:00Z.
const YEAR_START: i64 = 1_735_689_600;
const DAY: i64 = 86_400;
const MONTH_DAYS: [i64; 12] = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

async fn seed(state: &AppState, tenants: usize) {
    tenants::link_customers(&state.db, tenants).await;
    let mut batch = Vec::with_capacity(2000);
    for t in 0..tenants {
        let customer = format!("cus_{t}");
        let mut start = YEAR_START;
        for (m, days) in MONTH_DAYS.iter().enumerate() {
            let end = start + days * DAY;
            let id = format!("in_{t}_{m}");
            let amount = 1000 + (t % 7) as i64 * 100;
            let payload = json!({
                "id": id, "object": "invoice", "customer": customer, "status": "paid",
                "currency": "eur", "total": amount, "amount_due": amount, "amount_paid": amount,
                "created": start, "status_transitions": {"finalized_at": start},
                "lines": {"object": "list", "data": [{"id": format!("il_{t}_{m}"), "object": "line_item",
                    "amount": amount, "currency": "eur", "type": "subscription",
                    "price": {"id": "price_pro", "recurring": {"interval": "month"}},
                    "period": {"start": start, "end": end}}]}
            });
            batch.push(Apply {
                state: ObjectState {
                    object_type: "invoice".into(),
                    object_id: id,
                    customer_id: Some(customer.clone()),
                    status: Some("paid".into()),
                    created: Some(start),
                    version: 1,
                    deleted: false,
                    payload: payload.to_string(),
                    periods: Vec::new(),
                },
                claim: None,
                event_ids: Vec::new(),
                refetched: false,
            });
            if batch.len() == 2000 {
                state.db.mirror().apply(&batch, 0).await.unwrap();
                batch.clear();
            }
            start = end;
        }
    }
    state.db.mirror().apply(&batch, 0).await.unwrap();
}

async fn run(backend: Backend, tenants: usize) -> (f64, f64, usize, i64) {
    let db = Database::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    std::fs::write(&catalog, tenants::CATALOG).unwrap();
    let state = AppState::build(tenants::settings(&db.url, &catalog))
        .await
        .unwrap();
    seed(&state, tenants).await;
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let schedule = billsync::revenue::load(&state.db, &state.metering.catalog, None)
        .await
        .unwrap();
    let from = day_of(YEAR_START);
    let r = report(&schedule, from, from + 365, Group::Month, None);
    let seconds = started.elapsed().as_secs_f64();
    let peak = tenants::peak_mib();
    let lines = schedule.lines.len();
    let recognised: i64 = r.rows.iter().map(|row| row.recognised_total()).sum();
    assert_eq!(r.rows.len(), 12);
    assert_eq!(r.rows[11].deferred, 0);
    state.db.close().await;
    db.drop_now().await;
    (seconds, peak, lines, recognised)
}

#[tokio::main]
async fn main() {
    state::init_crypto();
    let quick = std::env::args().any(|a| a == "quick");
    let tenants = if quick { 1_000 } else { 10_000 };
    println!(
        "billsync revenue benchmark: {tenants} tenants x 12 monthly invoices, full rebuild and a monthly report over the year"
    );
    println!(
        "| database | lines | rebuild + report | peak resident memory during it (whole process) | recognised (minor units) |"
    );
    println!("|---|---|---|---|---|");
    for (label, backend) in [
        ("SQLite", Backend::Sqlite),
        ("PostgreSQL", Backend::Postgres),
    ] {
        let (seconds, peak, lines, recognised) = run(backend, tenants).await;
        println!("| {label} | {lines} | {seconds:.2} s | {peak:.0} MiB | {recognised} |");
    }
}
