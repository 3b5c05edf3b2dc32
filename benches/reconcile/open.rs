//! The open-period check (`cargo bench --bench reconcile -- open`): one pass of
//! `OpenCheck::pass` over 10,000 tenants whose pushes settled in the last hour, against a fake
//! Stripe that counts its calls: at the default budget (60 summary calls a minute), then with
//! the budget lifted so that one pass checks every tenant. `-- open quick` uses 1,000 tenants;
//! add `sqlite` or `postgres` for one backend.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use billsync::config::{Secret, Settings};
use billsync::reconcile::{OpenCheck, OpenCheckState};
use billsync::state::AppState;
use billsync::store::{Apply, Db};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::common::{Backend, Database};
use super::{CATALOG, DAY, bulk, object, tenants};

/// Calls per tenant in the last hour, pushed to Stripe in one meter event.
const EVENTS: usize = 10;
/// The `sync_state` row the check keeps its state in (cleared before each pass).
const STATE_KEY: &str = "open_check.state";
/// Passes whose median is reported, where a pass is cheap (see [`LIFTED_REPEAT_UNDER`]).
const RUNS: usize = 3;
/// A lifted-budget pass slower than this is run once.
const LIFTED_REPEAT_UNDER: Duration = Duration::from_secs(30);
/// The client-side Stripe rate limit when it is lifted, so that a pass measures billsync.
const UNLIMITED: u32 = 1_000_000;

/// Every hundredth tenant's meter on Stripe holds one call less than billsync pushed.
fn short(tenant: usize) -> bool {
    tenant.is_multiple_of(100)
}

/// The calls the fake Stripe answered, by kind.
#[derive(Clone, Default)]
struct Calls {
    summaries: Arc<AtomicUsize>,
    other: Arc<AtomicUsize>,
}

impl Calls {
    fn now(&self) -> (usize, usize) {
        let summaries = self.summaries.load(Ordering::Relaxed);
        (summaries, summaries + self.other.load(Ordering::Relaxed))
    }
}

/// A fake Stripe in this process, on port 0, that counts its calls; returns its base URL. Not
/// wiremock: a mock there keeps every request it matches (about 9 KB each), which would count
/// in the memory of a pass of 10,000 calls.
async fn fake_stripe() -> (String, Calls, tokio::task::JoinHandle<()>) {
    let calls = Calls::default();
    let app = Router::new()
        .route("/v1/billing/meters", get(meters))
        .route(
            "/v1/billing/meters/mtr_calls/event_summaries",
            get(summaries),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls, server)
}

/// Lists the one meter, `calls` (`mtr_calls`).
async fn meters(State(calls): State<Calls>) -> Json<Value> {
    calls.other.fetch_add(1, Ordering::Relaxed);
    Json(json!({"object": "list", "has_more": false,
        "data": [{"id": "mtr_calls", "object": "billing.meter", "event_name": "calls"}]}))
}

/// A customer's meter event summaries: what billsync pushed for it ([`EVENTS`]), one short for
/// the [`short`] tenants.
async fn summaries(
    State(calls): State<Calls>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Value> {
    calls.summaries.fetch_add(1, Ordering::Relaxed);
    let tenant = (query.get("customer"))
        .and_then(|c| c.strip_prefix("cus_")?.parse::<usize>().ok())
        .expect("a summary call names a bench customer");
    let total = EVENTS - usize::from(short(tenant));
    Json(json!({"object": "list", "has_more": false,
        "data": [{"object": "billing.meter_event_summary", "aggregated_value": total}]}))
}

/// A tenant's active subscription, its current period started 10 days ago (on the minute).
fn subscription(t: usize, now: i64) -> Apply {
    let (start, end) = (now / 60 * 60 - 10 * DAY, now / 60 * 60 + 20 * DAY);
    let (id, customer) = (format!("sub_{t}"), format!("cus_{t}"));
    object(
        "subscription",
        &id,
        &customer,
        start,
        json!({
            "id": id, "object": "subscription", "customer": customer, "status": "active",
            "created": start, "cancel_at_period_end": false, "cancel_at": null, "trial_end": null,
            "pause_collection": null,
            "items": {"object": "list", "has_more": false, "data": [{
                "id": format!("si_{t}"), "object": "subscription_item", "quantity": 1,
                "price": {"id": "price_calls", "object": "price"},
                "current_period_start": start, "current_period_end": end}]}
        }),
    )
}

/// Seeds `count` tenants linked to customers, each with a current period that started 10 days
/// ago and [`EVENTS`] calls 59 minutes ago, pushed in one meter event sent 7 to 56 minutes ago
/// (before the settle point, 5 minutes).
async fn seed(db: &Db, count: usize) {
    let now = chrono::Utc::now().timestamp();
    tenants::link_customers(db, count).await;
    let subscriptions: Vec<Apply> = (0..count).map(|t| subscription(t, now)).collect();
    for chunk in subscriptions.chunks(2000) {
        db.mirror().apply(chunk, 0).await.unwrap();
    }
    let window = (now - 59 * 60) / 60 * 60;
    let events: Vec<(usize, usize)> = (0..count)
        .flat_map(|t| (0..EVENTS).map(move |e| (t, e)))
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
                    .push_bind((window + e as i64) * 1000)
                    .push_bind(Option::<String>::None)
                    .push_bind(Option::<String>::None)
                    .push_bind((window + e as i64) * 1000)
                    .push_bind(format!("push_t{t}"));
            }
        );
    }
    seed_pushes(db, count, now, window).await;
}

/// One sent push per tenant of its [`EVENTS`] calls in the minute starting at `window`.
async fn seed_pushes(db: &Db, count: usize, now: i64, window: i64) {
    let (start, end) = (now / 60 * 60 - 10 * DAY, now / 60 * 60 + 20 * DAY);
    let pushes: Vec<usize> = (0..count).collect();
    for chunk in pushes.chunks(2000) {
        bulk!(
            db,
            "INSERT INTO usage_pushes (push_id, tenant_id, meter, customer_id, event_name, window_start, value, timestamp, event_count, status, attempts, next_attempt_at, created_at, sent_at, period_start, period_end) ",
            chunk,
            |b, t| {
                let sent = now - 7 * 60 - (*t as i64 % 50) * 60;
                b.push_bind(format!("push_t{t}"))
                    .push_bind(format!("t{t}"))
                    .push_bind("calls")
                    .push_bind(format!("cus_{t}"))
                    .push_bind("calls")
                    .push_bind(window * 1000)
                    .push_bind(EVENTS.to_string())
                    .push_bind(window + EVENTS as i64)
                    .push_bind(EVENTS as i32)
                    .push_bind("sent")
                    .push_bind(1)
                    .push_bind(0_i64)
                    .push_bind((window + 60) * 1000)
                    .push_bind(Some(sent * 1000))
                    .push_bind(Some(start * 1000))
                    .push_bind(Some(end * 1000));
            }
        );
    }
}

/// What one pass did.
#[derive(Clone, Copy)]
struct Pass {
    seconds: f64,
    summaries: usize,
    calls: usize,
    checked: usize,
    pending: usize,
    findings: usize,
    peak_mib: f64,
}

/// One pass from a fresh state (watermark 0: every push of the last hour is due) with `budget`
/// calls per window; asserts that the calls stayed within it.
async fn pass(state: &AppState, budget: usize, calls: &Calls) -> Pass {
    let db = &state.db;
    db.sync_state().remove(STATE_KEY).await.unwrap();
    let settings = &state.settings.reconcile;
    let check = OpenCheck {
        reconciler: state.reconciler(),
        interval: settings
            .open_check_interval
            .unwrap_or(settings.open_check_window),
        budget,
        window: settings.open_check_window,
        drafts: state.drafts_wake.clone(),
    };
    let (summaries, total) = calls.now();
    // Reset the peak so that it measures the pass alone (Linux: "5" clears VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let checked = check.pass(&CancellationToken::new()).await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let peak_mib = tenants::peak_mib();
    let (summaries_after, total_after) = calls.now();
    let left = OpenCheckState::load(db).await.unwrap();
    let summaries = summaries_after - summaries;
    assert!(
        summaries <= budget,
        "{summaries} summary calls, budget {budget}"
    );
    Pass {
        seconds,
        summaries,
        calls: total_after - total,
        checked,
        pending: left.pending.len(),
        findings: left.findings.len(),
        peak_mib,
    }
}

/// `runs` passes (one if the first is slower than `repeat_under`); the one of median time.
async fn median_pass(
    state: &AppState,
    budget: usize,
    calls: &Calls,
    repeat_under: Duration,
) -> (Pass, Vec<f64>) {
    let mut passes = vec![pass(state, budget, calls).await];
    if passes[0].seconds < repeat_under.as_secs_f64() {
        for _ in 1..RUNS {
            passes.push(pass(state, budget, calls).await);
        }
    }
    let times: Vec<f64> = passes.iter().map(|p| p.seconds).collect();
    passes.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    (passes[passes.len() / 2], times)
}

/// The findings a pass that checks the first `checked` tenants (in tenant order) keeps.
fn expected_findings(count: usize, checked: usize) -> usize {
    let mut names: Vec<(String, usize)> = (0..count).map(|t| (format!("t{t}"), t)).collect();
    names.sort();
    names
        .iter()
        .take(checked)
        .filter(|(_, t)| short(*t))
        .count()
}

/// The benchmark's settings with the fake Stripe as the vendor and its workers quiet.
fn settings(db_url: &str, catalog: &std::path::Path, vendor: &str, rate_limit: u32) -> Settings {
    let mut s = tenants::settings(db_url, catalog);
    s.stripe.api_key = Some(Secret::new("sk_test_bench"));
    s.stripe.api_base = vendor.to_owned();
    s.stripe.rate_limit = rate_limit;
    s.sync.poll_interval = Duration::from_secs(3600);
    s.sync.sweep_interval = Duration::from_secs(3600);
    s
}

/// The figures of one backend: a pass at the default budget with the default Stripe rate
/// limit, the same with the rate limit lifted, and a pass with budget and rate limit lifted.
async fn run(backend: Backend, count: usize) -> [(Pass, Vec<f64>); 3] {
    let (vendor, calls, server) = fake_stripe().await;
    let db = Database::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    let defaults = Settings::from_toml("").unwrap();
    let budget = defaults.reconcile.open_check_budget;
    let limited = settings(&db.url, &catalog, &vendor, defaults.stripe.rate_limit);
    let state = AppState::build(limited.clone()).await.unwrap();
    let seeding = Instant::now();
    seed(&state.db, count).await;
    println!(
        "(seeded {count} tenants in {:.0} s)",
        seeding.elapsed().as_secs_f64()
    );
    let at_defaults = median_pass(&state, budget, &calls, Duration::MAX).await;
    let mut unlimited = limited;
    unlimited.stripe.rate_limit = UNLIMITED;
    let fast = AppState::build(unlimited).await.unwrap();
    let unlimited_default = median_pass(&fast, budget, &calls, Duration::MAX).await;
    let lifted = median_pass(&fast, count, &calls, LIFTED_REPEAT_UNDER).await;
    for (p, b) in [
        (&at_defaults.0, budget),
        (&unlimited_default.0, budget),
        (&lifted.0, count),
    ] {
        assert_eq!(p.checked, b.min(count));
        assert_eq!(p.pending, count - p.checked);
        assert_eq!(p.findings, expected_findings(count, p.checked));
    }
    state.db.close().await;
    fast.db.close().await;
    db.drop_now().await;
    server.abort();
    [at_defaults, unlimited_default, lifted]
}

/// One table row: the median pass, the time of each pass, and the time per tenant checked.
fn row(label: &str, pass: &str, (p, times): &(Pass, Vec<f64>)) {
    let times: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
    println!(
        "| {label} | {pass} | {:.3} s ({}) | {} ({}) | {} | {} | {} | {:.0} MiB | {:.2} ms |",
        p.seconds,
        times.join(" · "),
        p.summaries,
        p.calls,
        p.checked,
        p.pending,
        p.findings,
        p.peak_mib,
        p.seconds * 1000.0 / p.checked.max(1) as f64,
    );
}

/// `cargo bench --bench reconcile -- open [quick] [sqlite|postgres]`.
pub async fn main(quick: bool, args: &[String]) {
    let count = if quick { 1_000 } else { 10_000 };
    let defaults = Settings::from_toml("").unwrap();
    let (budget, window) = (
        defaults.reconcile.open_check_budget,
        defaults.reconcile.open_check_window,
    );
    println!(
        "billsync open-period check benchmark: {count} tenants with pushes settled in the last hour, \
         {EVENTS} calls each, 1% short on Stripe; default budget {budget} calls per {}s, \
         stripe.rate_limit {}/s",
        window.as_secs(),
        defaults.stripe.rate_limit
    );
    println!(
        "| database | pass | wall time, median (runs) | Stripe summary calls (all calls) | tenants checked | left pending | findings | peak RSS during it | per tenant checked |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let only = |name: &str| {
        !args.iter().any(|a| a == "sqlite" || a == "postgres") || args.iter().any(|a| a == name)
    };
    for (label, name, backend) in [
        ("SQLite", "sqlite", Backend::Sqlite),
        ("PostgreSQL", "postgres", Backend::Postgres),
    ] {
        if !only(name) {
            continue;
        }
        let [at_defaults, unlimited, lifted] = run(backend, count).await;
        row(
            label,
            &format!(
                "budget {budget}, rate limit {}/s",
                defaults.stripe.rate_limit
            ),
            &at_defaults,
        );
        row(
            label,
            &format!("budget {budget}, rate limit lifted"),
            &unlimited,
        );
        row(
            label,
            &format!("budget {count}, rate limit lifted"),
            &lifted,
        );
    }
    let passes = count.div_ceil(budget);
    let minutes = passes as f64 * window.as_secs_f64() / 60.0;
    println!(
        "time to check all {count} tenants at the default budget: {passes} windows of {}s, {minutes:.0} min ({:.1} h)",
        window.as_secs(),
        minutes / 60.0
    );
}
