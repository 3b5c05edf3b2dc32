//! Reconciliation figures: 1,000,000 usage events over 10,000 tenants, with 10,000 invoices and
//! their payments and 0.1% seeded differences; the time to a full report (computed and stored)
//! and the peak resident memory during it, on SQLite and on PostgreSQL.
//!
//!     cargo bench --bench reconcile
//!     cargo bench --bench reconcile -- quick     # 100,000 events over 1,000 tenants
//!     cargo bench --bench reconcile -- open      # the open-period check (reconcile/open.rs)
//!
//! Needs PostgreSQL (BILLSYNC_BENCH_DATABASE_URL, an admin URL; default
//! postgres://postgres@127.0.0.1:5432/postgres). The vendor is not asked (no Stripe key): the
//! figures are billsync's own work.

use std::time::Instant;

use billsync::reconcile::Params;
use billsync::state::{self, AppState};
use billsync::store::{Apply, Db, ObjectState};
use serde_json::json;

mod common;
#[path = "reconcile/open.rs"]
mod open;
#[path = "common/tenants.rs"]
mod tenants;

use common::{Backend, Database};

const DAY: i64 = 86_400;
const CATALOG: &str = "[meters.calls]\naggregation = \"sum\"\nstripe_event_name = \"calls\"\n\
late_window = \"90d\"\nstripe_prices = [\"price_calls\"]\n";

/// Inserts rows through a multi-row INSERT on either backend.
macro_rules! bulk {
    ($db:expr, $head:expr, $rows:expr, |$b:ident, $row:ident| $push:block) => {
        match $db {
            Db::Sqlite(pool) => {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new($head);
                q.push_values($rows, |mut $b, $row| $push);
                q.build().execute(pool).await.unwrap();
            }
            Db::Postgres(pool) => {
                let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new($head);
                q.push_values($rows, |mut $b, $row| $push);
                q.build().execute(pool).await.unwrap();
            }
        }
    };
}
pub(crate) use bulk;

fn object(kind: &str, id: &str, customer: &str, created: i64, payload: serde_json::Value) -> Apply {
    Apply {
        state: ObjectState {
            object_type: kind.to_owned(),
            object_id: id.to_owned(),
            customer_id: Some(customer.to_owned()),
            status: payload["status"].as_str().map(str::to_owned),
            created: Some(created),
            version: 1,
            deleted: false,
            payload: payload.to_string(),
            periods: Vec::new(),
        },
        claim: None,
        event_ids: Vec::new(),
        refetched: false,
    }
}

/// Seeds the scenario; returns how many differences it planted.
async fn seed(db: &Db, tenants: usize, per_tenant: usize) -> usize {
    let now = chrono::Utc::now().timestamp();
    let (start, end) = (now - 20 * DAY, now - 10 * DAY);
    tenants::link_customers(db, tenants).await;
    // Every tenth-of-a-percent tenant is billed one unit short; as many invoices are short-paid.
    let planted = (tenants / 1000).max(1);
    let events: Vec<(usize, usize)> = (0..tenants)
        .flat_map(|t| (0..per_tenant).map(move |e| (t, e)))
        .collect();
    for chunk in events.chunks(3000) {
        bulk!(
            db,
            "INSERT INTO usage_events (tenant_id, event_id, meter, quantity, occurred_at, unique_value, properties, received_at, push_id) ",
            chunk,
            |b, row| {
                let (t, e) = *row;
                b.push_bind(format!("t{t}"))
                    .push_bind(format!("e{e}"))
                    .push_bind("calls")
                    .push_bind("1")
                    .push_bind((start + 3600 + e as i64) * 1000)
                    .push_bind(Option::<String>::None)
                    .push_bind(Option::<String>::None)
                    .push_bind((start + 3600) * 1000)
                    .push_bind(format!("push_t{t}"));
            }
        );
    }
    let pushes: Vec<usize> = (0..tenants).collect();
    for chunk in pushes.chunks(2000) {
        bulk!(
            db,
            "INSERT INTO usage_pushes (push_id, tenant_id, meter, customer_id, event_name, window_start, value, timestamp, event_count, status, attempts, next_attempt_at, created_at, sent_at) ",
            chunk,
            |b, t| {
                b.push_bind(format!("push_t{t}"))
                    .push_bind(format!("t{t}"))
                    .push_bind("calls")
                    .push_bind(format!("cus_{t}"))
                    .push_bind("calls")
                    .push_bind((start + 3600) * 1000)
                    .push_bind(per_tenant.to_string())
                    .push_bind(start + 3600 + per_tenant as i64)
                    .push_bind(per_tenant as i32)
                    .push_bind("sent")
                    .push_bind(1)
                    .push_bind(0_i64)
                    .push_bind((start + 3700) * 1000)
                    .push_bind(Some((start + 3700) * 1000));
            }
        );
    }
    let mut objects = Vec::with_capacity(2 * tenants);
    for t in 0..tenants {
        let customer = format!("cus_{t}");
        let quantity = per_tenant as i64 - i64::from(t < planted);
        let total = quantity * 10;
        let invoice = format!("in_{t}");
        objects.push(object(
            "invoice",
            &invoice,
            &customer,
            now - 9 * DAY,
            json!({
                "id": invoice, "object": "invoice", "customer": customer, "status": "paid",
                "currency": "eur", "total": total, "amount_due": total, "amount_paid": total,
                "created": now - 9 * DAY, "status_transitions": {"finalized_at": now - 9 * DAY},
                "lines": {"object": "list", "data": [{"id": format!("il_{t}"), "amount": total,
                    "quantity": quantity, "price": {"id": "price_calls"},
                    "period": {"start": start, "end": end}}]}
            }),
        ));
        // The last `planted` tenants' payments are short.
        let paid = if t >= tenants - planted {
            total - 1
        } else {
            total
        };
        objects.push(object("charge", &format!("ch_{t}"), &customer, now - 8 * DAY, json!({
            "id": format!("ch_{t}"), "object": "charge", "customer": customer, "invoice": invoice,
            "amount": paid, "currency": "eur", "status": "succeeded", "amount_refunded": 0,
            "created": now - 8 * DAY
        })));
    }
    for chunk in objects.chunks(2000) {
        db.mirror().apply(chunk, 0).await.unwrap();
    }
    2 * planted
}

async fn run(backend: Backend, tenants: usize, per_tenant: usize) -> (f64, f64, f64, usize, usize) {
    let db = Database::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    let state = AppState::build(tenants::settings(&db.url, &catalog))
        .await
        .unwrap();
    let seeding = Instant::now();
    let planted = seed(&state.db, tenants, per_tenant).await;
    let seeded = seeding.elapsed().as_secs_f64();
    let now_ms = billsync::store::now_ms();
    let params = Params {
        from_ms: now_ms - 30 * DAY * 1000,
        to_ms: now_ms,
        tenant: None,
        dry_run: true,
        invoice: None,
    };
    // Reset the peak so that it measures the run alone (Linux: "5" clears VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let (_, report) = state.reconciler().run(&params, "bench").await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let peak = tenants::peak_mib();
    assert_eq!(report.items.len(), planted, "{:?}", report.summary);
    state.db.close().await;
    db.drop_now().await;
    (seconds, peak, seeded, report.items.len(), planted)
}

#[tokio::main]
async fn main() {
    state::init_crypto();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    if args.iter().any(|a| a == "open") {
        open::main(quick, &args).await;
        return;
    }
    let (tenants, per_tenant) = if quick { (1_000, 100) } else { (10_000, 100) };
    println!(
        "billsync reconciliation benchmark: {} usage events over {tenants} tenants, {tenants} invoices and payments, 0.1% seeded differences",
        tenants * per_tenant
    );
    println!(
        "| database | time to a full report | peak resident memory during it | findings (planted) | seeding time |"
    );
    println!("|---|---|---|---|---|");
    for (label, backend) in [
        ("SQLite", Backend::Sqlite),
        ("PostgreSQL", Backend::Postgres),
    ] {
        let (seconds, peak, seeded, found, planted) = run(backend, tenants, per_tenant).await;
        println!(
            "| {label} | {seconds:.2} s | {peak:.0} MiB | {found} ({planted}) | {seeded:.0} s |"
        );
    }
}
