//! A seeded simulation of the metering pipeline, in the style of deterministic simulation: one
//! seed draws every action, input and fault of a run, so a failing seed replays.
//!
//! Several replicas (each its own counters) share one database and a fake Stripe. A run mixes
//! usage batches (duplicates, late events, events of a period whose renewal billsync has not
//! heard of yet), renewals, invoices finalized, tenants linked late, pusher passes with vendor
//! faults (errors before and after Stripe kept the event, refused duplicates, a crash between
//! Stripe's answer and the record), lease moves (a planner that lost its lease writes a stale
//! plan), replica restarts and overlapping snapshots. At the end every period is revealed, the
//! pushers drain, and for every tenant, meter and billing period what Stripe bills equals what
//! billsync accepted, but for usage billsync reported because its period's invoice was final.
//!
//! `BILLSYNC_SIM_SEEDS=n` sets how many seeds a test runs (200 on SQLite, 25 on PostgreSQL by
//! default); `BILLSYNC_SIM_SEED=s` replays one. What the seed does not fix is how the
//! database's own threads interleave with the runtime.

mod fake_stripe;
mod oracle;

use std::sync::Arc;

use billsync::config::{Secret, Settings};
use billsync::metering::pusher::{PlannedChunk, Pusher};
use billsync::state::AppState;
use billsync::store::{Db, Source};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestDatabase, customer, event, subscription};
use fake_stripe::{FakeStripe, Fault};
use oracle::{Accepted, Oracle};

crate::helpers::on_both_backends!(metering_matches_stripe_in_every_period_for_every_seed);

const MINUTE: i64 = 60_000;

const CATALOG: &str = r#"
[meters.calls]
aggregation = "sum"
stripe_event_name = "calls"
late_window = "2d"

[meters.builds]
aggregation = "count"
stripe_event_name = "builds"
late_window = "2d"

[meters.storage]
aggregation = "max"
stripe_event_name = "storage"
late_window = "2d"

[meters.seats]
aggregation = "last"
stripe_event_name = "seats"
late_window = "2d"

[meters.users]
aggregation = "unique_count"
property = "user_id"
stripe_event_name = "users"
late_window = "2d"
"#;

const METERS: [&str; 5] = ["calls", "builds", "storage", "seats", "users"];

async fn metering_matches_stripe_in_every_period_for_every_seed(backend: Backend) {
    let seeds: Vec<u64> = match std::env::var("BILLSYNC_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("BILLSYNC_SIM_SEED is a number")],
        Err(_) => {
            let default = if backend == Backend::Sqlite { 200 } else { 25 };
            let count = std::env::var("BILLSYNC_SIM_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(default);
            let base = std::env::var("BILLSYNC_SIM_BASE")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            (base..base + count).collect()
        }
    };
    let catalog = tempfile::tempdir().unwrap();
    let catalog = catalog.path().join("plans.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    for seed in seeds {
        if let Err(failure) = Sim::run(backend, seed, &catalog).await {
            panic!(
                "simulation failed: replay with BILLSYNC_SIM_SEED={seed} (backend {backend:?})\n{failure}"
            );
        }
    }
}

/// A tenant of the simulation and the billing periods its subscription will go through.
struct Tenant {
    id: String,
    customer: String,
    linked: bool,
    /// Every period of the run, contiguous; the first `known` have reached the mirror.
    periods: Vec<(i64, i64)>,
    known: usize,
}

struct Sim {
    rng: fastrand::Rng,
    settings: Settings,
    _db: TestDatabase,
    replicas: Vec<AppState>,
    /// The replica holding the pusher's lease.
    active: usize,
    stripe: Arc<FakeStripe>,
    tenants: Vec<Tenant>,
    oracle: Oracle,
    /// A plan made by a replica that then lost its lease, written later.
    stale: Option<(usize, PlannedChunk)>,
    /// What happened, for the failure report.
    log: Vec<String>,
}

impl Sim {
    async fn run(backend: Backend, seed: u64, catalog: &std::path::Path) -> Result<(), String> {
        let mut sim = Self::start(backend, seed, catalog).await;
        let steps = 40 + sim.rng.usize(..40);
        for _ in 0..steps {
            sim.step().await;
        }
        sim.drain().await?;
        let checked = sim.check().await;
        checked.map_err(|failure| {
            let tail = sim.log.len().saturating_sub(60);
            format!(
                "{failure}\nlast actions:\n  {}",
                sim.log[tail..].join("\n  ")
            )
        })
    }

    async fn start(backend: Backend, seed: u64, catalog: &std::path::Path) -> Self {
        billsync::state::init_crypto();
        let (db, url) = TestDatabase::create_fast(backend).await;
        let mut settings = Settings::from_toml("").unwrap();
        settings.database.url = Secret::new(url);
        settings.catalog.path = catalog.to_owned();
        settings.catalog.required = true;
        settings.sync.max_retry_delay = std::time::Duration::from_millis(1);
        let first = AppState::build(settings.clone()).await.unwrap();
        let second = AppState::build(settings.clone()).await.unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        let now = billsync::store::now_ms();
        // Periods of 20 to 60 minutes from about eight hours ago until ten minutes ago.
        let tenants = (0..3)
            .map(|t| {
                let mut start = (now - 8 * 60 * MINUTE + rng.i64(0..60) * MINUTE) / 1000 * 1000;
                let mut periods = Vec::new();
                loop {
                    let end = start + rng.i64(20..=60) * MINUTE;
                    if end > now - 10 * MINUTE {
                        break;
                    }
                    periods.push((start, end));
                    start = end;
                }
                Tenant {
                    id: format!("t{t}"),
                    customer: format!("cus_t{t}"),
                    linked: false,
                    periods,
                    known: 1,
                }
            })
            .collect();
        let mut sim = Self {
            rng,
            settings,
            _db: db,
            replicas: vec![first, second],
            active: 0,
            stripe: Arc::default(),
            tenants,
            oracle: Oracle::default(),
            stale: None,
            log: vec![format!("seed {seed}")],
        };
        for t in 0..sim.tenants.len() {
            let id = billsync::domain::TenantId::parse(&sim.tenants[t].id).unwrap();
            let tenants = sim.db().tenants();
            tenants.upsert(&id, None, None, now, None).await.unwrap();
            // The last tenant is linked to its customer only later in the run.
            if t + 1 < sim.tenants.len() {
                sim.link(t).await;
            }
            sim.reveal(t, 1).await;
        }
        sim
    }

    fn db(&self) -> &Db {
        &self.replicas[0].db
    }

    fn pusher(&self, replica: usize) -> Pusher {
        self.replicas[replica].pusher(self.stripe.clone())
    }

    async fn step(&mut self) {
        match self.rng.u32(..100) {
            0..40 => self.ingest().await,
            40..65 => self.push(true).await,
            65..73 => {
                let t = self.rng.usize(..self.tenants.len());
                let known = self.tenants[t].known;
                self.reveal(t, known + 1).await;
            }
            73..77 => self.finalize_invoice().await,
            77..82 => self.move_lease().await,
            82..86 => self.write_stale_plan().await,
            86..89 => self.restart_replica().await,
            89..94 => self.snapshot().await,
            94..96 => {
                let last = self.tenants.len() - 1;
                self.link(last).await;
            }
            _ => self.let_claims_expire().await,
        }
    }

    /// A batch of usage through a random replica: fresh events, repeated ids, late events,
    /// events of a period not known yet.
    async fn ingest(&mut self) {
        let t = self.rng.usize(..self.tenants.len());
        let count = 1 + self.rng.usize(..12);
        let mut events = Vec::with_capacity(count);
        for _ in 0..count {
            let event = self.usage_event(t);
            events.push(event);
        }
        let replica = self.rng.usize(..self.replicas.len());
        let now = billsync::store::now_ms();
        let outcome = self.replicas[replica]
            .metering
            .ingest(&events, now)
            .await
            .unwrap();
        assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
        for event in &events {
            self.oracle.offer(event);
        }
        self.log.push(format!(
            "ingest {} events of {} via replica {replica}: {} accepted",
            events.len(),
            self.tenants[t].id,
            outcome.accepted
        ));
    }

    fn usage_event(&mut self, t: usize) -> Value {
        let (id, periods, known) = {
            let tenant = &self.tenants[t];
            (tenant.id.clone(), tenant.periods.clone(), tenant.known)
        };
        if let Some(previous) = self.oracle.any_of(&id, &mut self.rng)
            && self.rng.u32(..10) == 0
        {
            // The same id again, maybe with another quantity: a duplicate either way.
            let mut again = previous.as_event(&id);
            again["quantity"] = self.quantity();
            return again;
        }
        // Mostly the known periods (late ones too), sometimes the next one or before the first.
        let period = match self.rng.u32(..20) {
            0 => (periods[0].0 - 30 * MINUTE, periods[0].0),
            1 | 2 => periods[known.min(periods.len() - 1)],
            _ => periods[self.rng.usize(..known)],
        };
        let at = self.rng.i64(period.0..period.1);
        let meter = METERS[self.rng.usize(..METERS.len())];
        let event_id = format!("e{}", self.oracle.next_id());
        let user = format!("u{}", self.rng.u32(..6));
        json!({"id": event_id, "tenant_id": id, "meter": meter, "quantity": self.quantity(),
            "timestamp": billsync::domain::rfc3339(at), "properties": {"user_id": user}})
    }

    /// A quantity with up to two decimals, as a string or a JSON number.
    fn quantity(&mut self) -> Value {
        let text = Decimal::new(self.rng.i64(0..10_000), 2)
            .normalize()
            .to_string();
        if self.rng.bool() {
            json!(text)
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// A pass of the lease holder's pusher, with vendor faults; a crash drops the pass between
    /// Stripe's answer and the record.
    async fn push(&mut self, faulty: bool) {
        let faults = if faulty { self.faults() } else { Vec::new() };
        self.stripe.schedule(faults.clone());
        let pusher = self.pusher(self.active);
        let outcome = tokio::select! {
            report = pusher.step() => format!("{:?}", report.unwrap()),
            () = self.stripe.crashed.notified() => "crashed after Stripe kept an event".to_owned(),
        };
        self.log.push(format!(
            "push on replica {} with {faults:?}: {outcome}",
            self.active
        ));
    }

    fn faults(&mut self) -> Vec<Fault> {
        let mut faults = Vec::new();
        for _ in 0..self.rng.usize(..6) {
            faults.push(match self.rng.u32(..10) {
                0..4 => Fault::FailBefore,
                4..7 => Fault::FailAfter,
                7..9 => Fault::RefuseDuplicate,
                _ => Fault::Crash,
            });
        }
        faults
    }

    /// The tenant's subscription renews, period by period, up to its `known`th: each renewal
    /// is the subscription's new period and a draft invoice for the period that ended.
    async fn reveal(&mut self, t: usize, known: usize) {
        let first = if self.tenants[t].known == 1 && known == 1 {
            1
        } else {
            self.tenants[t].known + 1
        };
        for k in first..=known.min(self.tenants[t].periods.len()) {
            self.tenants[t].known = k;
            let tenant = &self.tenants[t];
            let (start, end) = tenant.periods[k - 1];
            let sub_id = format!("sub_{}", tenant.id);
            let mut sub = subscription(&sub_id, &tenant.customer, "price_pro", "active", 1);
            sub["items"]["data"][0]["current_period_start"] = json!(start / 1000);
            sub["items"]["data"][0]["current_period_end"] = json!(end / 1000);
            let ended = (k >= 2).then(|| self.invoice(t, k - 2, "draft"));
            self.apply("customer.subscription.updated", sub).await;
            if let Some(invoice) = ended {
                self.apply("invoice.created", invoice).await;
            }
            self.log
                .push(format!("renewal of {} to period {k}", self.tenants[t].id));
        }
    }

    /// The invoice billing the usage of the tenant's period `k`.
    fn invoice(&self, t: usize, k: usize, status: &str) -> Value {
        let tenant = &self.tenants[t];
        let (start, end) = tenant.periods[k];
        json!({"id": format!("in_{}_{k}", tenant.id), "object": "invoice",
            "customer": tenant.customer, "status": status, "subscription": format!("sub_{}", tenant.id),
            "billing_reason": "subscription_cycle", "period_start": start / 1000,
            "period_end": end / 1000, "created": end / 1000, "currency": "usd", "total": 0,
            "lines": {"object": "list", "data": []}})
    }

    /// Stripe finalizes the invoice of one of a tenant's ended periods.
    async fn finalize_invoice(&mut self) {
        let t = self.rng.usize(..self.tenants.len());
        let tenant = &self.tenants[t];
        if tenant.known < 2 {
            return;
        }
        let k = self.rng.usize(..tenant.known - 1);
        let invoice = self.invoice(t, k, "open");
        let line = format!("invoice of {} period {k} finalized", tenant.id);
        self.apply("invoice.finalized", invoice).await;
        self.log.push(line);
    }

    async fn link(&mut self, t: usize) {
        if self.tenants[t].linked {
            return;
        }
        self.tenants[t].linked = true;
        let object = customer(&self.tenants[t].customer, &self.tenants[t].id);
        self.apply("customer.created", object).await;
        self.log
            .push(format!("{} linked to its customer", self.tenants[t].id));
    }

    /// Applies a vendor state to the mirror as a webhook copy.
    async fn apply(&mut self, kind: &str, object: Value) {
        let id = format!("evt_{}", self.oracle.next_id());
        let event = event(&id, kind, billsync::store::now_ms() / 1000, object);
        let row = billsync::sync::events::from_event(&event.to_string(), &event, Source::Webhook)
            .unwrap();
        let state = &self.replicas[0];
        state
            .db
            .inbox()
            .insert(&[row], billsync::store::now_ms())
            .await
            .unwrap();
        let mut applier = state.applier();
        applier.vendor = None;
        while applier.step().await.unwrap() > 0 {}
    }

    /// The pusher's lease moves to the other replica; half the time the old holder had just
    /// read a plan it will write later.
    async fn move_lease(&mut self) {
        let old = self.active;
        if self.stale.is_none() && self.rng.bool() {
            let plan = self.pusher(old).plan_chunk().await.unwrap();
            self.stale = Some((old, plan));
        }
        self.active = (old + 1) % self.replicas.len();
        self.log
            .push(format!("lease moves from replica {old} to {}", self.active));
    }

    async fn write_stale_plan(&mut self) {
        let Some((replica, plan)) = self.stale.take() else {
            return;
        };
        let written = self.pusher(replica).write_plan(&plan).await.unwrap();
        self.log.push(format!(
            "replica {replica} writes a stale plan: written {written}"
        ));
    }

    async fn restart_replica(&mut self) {
        let replica = self.rng.usize(..self.replicas.len());
        let fresh = AppState::build(self.settings.clone()).await.unwrap();
        fresh.metering.rebuild().await.unwrap();
        self.replicas[replica] = fresh;
        self.log.push(format!("replica {replica} restarted"));
    }

    /// One snapshot, or two at once (the lease holder and one that lost the lease).
    async fn snapshot(&mut self) {
        let now = billsync::store::now_ms();
        if self.rng.bool() {
            let (a, b) = tokio::join!(
                self.replicas[0].metering.snapshot(now),
                self.replicas[1].metering.snapshot(now)
            );
            self.log.push(format!(
                "two snapshots at once: folded {} and {}",
                a.unwrap(),
                b.unwrap()
            ));
        } else {
            let folded = self.replicas[self.active]
                .metering
                .snapshot(now)
                .await
                .unwrap();
            self.log.push(format!("snapshot folded {folded}"));
        }
    }

    /// Time passes: claims of a crashed pusher and retry delays run out.
    async fn let_claims_expire(&mut self) {
        let statement = "UPDATE usage_pushes SET next_attempt_at = 0 WHERE status = 'pending'";
        match self.db() {
            Db::Sqlite(pool) => sqlx::query(statement).execute(pool).await.map(drop),
            Db::Postgres(pool) => sqlx::query(statement).execute(pool).await.map(drop),
        }
        .unwrap();
        self.log.push("claims and retry delays run out".to_owned());
    }

    /// Every period revealed, every tenant linked, the stale plan written, then passes without
    /// faults until nothing waits.
    async fn drain(&mut self) -> Result<(), String> {
        for t in 0..self.tenants.len() {
            self.link(t).await;
            let all = self.tenants[t].periods.len();
            self.reveal(t, all).await;
        }
        self.write_stale_plan().await;
        for _ in 0..20 {
            self.let_claims_expire().await;
            self.push(false).await;
            let usage = self.db().usage();
            let (unpushed, _) = usage.backlog(&METERS.map(str::to_owned)).await.unwrap();
            let (pending, _) = usage.pending_pushes().await.unwrap();
            if unpushed == 0 && pending == 0 {
                return Ok(());
            }
        }
        Err("the pushers did not drain in 20 passes".to_owned())
    }

    /// For every tenant, meter and period: Stripe's figure equals the accepted one, but for
    /// what billsync held back as `invoice_final`; and a rebuilt replica's counters hold every
    /// accepted event once.
    async fn check(&self) -> Result<(), String> {
        for tenant in &self.tenants {
            for meter in METERS {
                let pushes = self
                    .db()
                    .usage()
                    .pushes_of(&tenant.id, meter)
                    .await
                    .unwrap();
                for &period in &tenant.periods {
                    let accepted = self.oracle.figure(&tenant.id, meter, period);
                    let last = !matches!(meter, "calls" | "builds");
                    let billed = self.stripe.billed(meter, &tenant.customer, period, last);
                    let held: Vec<_> = pushes
                        .iter()
                        .filter(|p| p.status == "invoice_final")
                        .filter(|p| (period.0..period.1).contains(&(p.timestamp * 1000)))
                        .collect();
                    let reported = match held.iter().max_by_key(|p| (p.created_at, &p.push_id)) {
                        None => None,
                        Some(latest) if last => Some(latest.value.parse::<Decimal>().unwrap()),
                        Some(_) => Some(
                            billed
                                + held
                                    .iter()
                                    .map(|p| p.value.parse::<Decimal>().unwrap())
                                    .sum::<Decimal>(),
                        ),
                    };
                    let figure = reported.unwrap_or(billed);
                    if figure != accepted {
                        return Err(format!(
                            "{} {meter} in {period:?}: accepted {accepted}, Stripe bills {billed}, \
                             reported {reported:?}; pushes {pushes:#?}",
                            tenant.id
                        ));
                    }
                }
            }
        }
        self.check_counters().await
    }

    async fn check_counters(&self) -> Result<(), String> {
        let fresh = AppState::build(self.settings.clone()).await.unwrap();
        fresh.metering.rebuild().await.unwrap();
        for tenant in &self.tenants {
            for meter in METERS {
                let counted = fresh
                    .metering
                    .counters
                    .fold(&tenant.id, meter, i64::MIN / 2, i64::MAX / 2)
                    .map(|b| b.value())
                    .unwrap_or_default();
                let accepted = self.oracle.figure(&tenant.id, meter, (i64::MIN, i64::MAX));
                if counted != accepted {
                    return Err(format!(
                        "{} {meter}: the rebuilt counters hold {counted}, accepted {accepted}",
                        tenant.id
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Accepted {
    fn as_event(&self, tenant: &str) -> Value {
        json!({"id": self.id, "tenant_id": tenant, "meter": self.meter, "quantity": self.quantity.to_string(),
            "timestamp": billsync::domain::rfc3339(self.at), "properties": {"user_id": self.user}})
    }
}
