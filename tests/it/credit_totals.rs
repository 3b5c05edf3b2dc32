//! The running credit totals against a full recompute from the usage log: a seeded random walk
//! of grants (new, effective earlier, scheduled, expiring, expired, voided, rewritten as they
//! were) and usage (check-and-record, plain `POST /v1/usage`, batches with other meters and
//! repeated ids), checked after every step: the balances and the ledger's grants equal what
//! the grants and the usage rows themselves give. Grants are written to the mirror directly,
//! as any writer may, so that the service learns of them only from the rows. The seed is
//! printed; `BILLSYNC_CREDITS_SEED=s` replays one.

use std::collections::BTreeMap;

use billsync::credits::balance::{allocate, breakpoints};
use billsync::credits::{CreditFeature, grants_of, units};
use billsync::store::{Apply, Db, ObjectState};
use serde_json::{Value, json};

use crate::entitlements::{onboard, service};
use crate::helpers::{Backend, TestApp, on_both_backends};

on_both_backends!(
    running_totals_always_equal_a_full_recompute_from_the_log,
    plain_usage_crossing_the_threshold_is_seen_in_its_own_transaction,
    a_grant_voided_by_another_writer_refuses_the_next_burn_at_once,
);

const TENANT: &str = "walk";
const CUSTOMER: &str = "cus_walk";
const STEPS: usize = 45;
const HOUR: i64 = 3600;

struct Walk {
    rng: fastrand::Rng,
    /// Each grant's current payload and mirror version.
    grants: Vec<(Value, i64)>,
    events: usize,
    log: Vec<String>,
}

async fn running_totals_always_equal_a_full_recompute_from_the_log(backend: Backend) {
    let seed = match std::env::var("BILLSYNC_CREDITS_SEED") {
        Ok(seed) => seed.parse().expect("BILLSYNC_CREDITS_SEED is a number"),
        Err(_) => fastrand::u64(..),
    };
    println!("credit totals walk: seed {seed} (replay with BILLSYNC_CREDITS_SEED={seed})");
    let app = service(backend).await;
    onboard(&app, TENANT, CUSTOMER, json!({})).await;
    let db = Db::connect(&app.settings.database).await.unwrap();
    let catalog = billsync::catalog::Catalog::load(&app.settings.catalog.path, true).unwrap();
    let mut walk = Walk {
        rng: fastrand::Rng::with_seed(seed),
        grants: Vec::new(),
        events: 0,
        log: Vec::new(),
    };
    for step in 0..STEPS {
        walk.step(&app, &db).await;
        if let Err(failure) = agrees(&app, &db, &catalog.credits).await {
            panic!(
                "seed {seed} ({backend:?}), step {step}: {failure}\nreplay with \
                 BILLSYNC_CREDITS_SEED={seed}; steps:\n  {}",
                walk.log.join("\n  ")
            );
        }
    }
    app.stop().await;
}

impl Walk {
    async fn step(&mut self, app: &TestApp, db: &Db) {
        match self.rng.u8(0..10) {
            0 | 1 => self.new_grant(db).await,
            2 => self.void_grant(db).await,
            3 => self.rewrite_grant(db).await,
            4..=5 => self.check_and_record(app).await,
            6..=7 => self.plain_usage(app).await,
            _ => self.batch_usage(app).await,
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    async fn new_grant(&mut self, db: &Db) {
        let now = Self::now();
        let id = format!("credgr_{}", self.grants.len());
        let amount = match self.rng.bool() {
            true => json!({"type": "monetary",
                "monetary": {"currency": "usd", "value": self.rng.i64(1..400)}}),
            false => json!({"type": "custom_pricing_unit",
                "custom_pricing_unit": {"value": format!("{}.{}", self.rng.u32(0..200), self.rng.u32(0..100))}}),
        };
        // Mostly effective in the past (earlier than usage already burned), sometimes scheduled.
        let effective = match self.rng.u8(0..6) {
            0 => now + self.rng.i64(2..24) * HOUR,
            _ => now - self.rng.i64(HOUR..72 * HOUR),
        };
        let expires = match self.rng.u8(0..4) {
            0 => Value::Null,
            1 => json!(effective + self.rng.i64(1..30) * HOUR),
            _ => json!(now + self.rng.i64(2..48) * HOUR),
        };
        let expires = match expires.as_i64() {
            Some(at) if (at - now).abs() < HOUR => json!(now + 2 * HOUR),
            _ => expires,
        };
        let grant = json!({"id": id, "object": "billing.credit_grant", "customer": CUSTOMER,
            "amount": amount, "applicability_config": {"scope": {"price_type": "metered"}},
            "category": "paid", "created": effective, "effective_at": effective,
            "expires_at": expires, "voided_at": null, "priority": self.rng.i64(10..60)});
        self.log.push(format!("grant {grant}"));
        self.grants.push((grant, 1));
        self.write_grant(db, self.grants.len() - 1).await;
    }

    async fn void_grant(&mut self, db: &Db) {
        let open: Vec<usize> = (0..self.grants.len())
            .filter(|&i| self.grants[i].0["voided_at"].is_null())
            .collect();
        let Some(&i) = open.get(self.rng.usize(0..open.len().max(1))) else {
            return self.new_grant(db).await;
        };
        let voided = Self::now() - self.rng.i64(60..24 * HOUR);
        self.grants[i].0["voided_at"] = json!(voided);
        self.grants[i].1 += 1;
        self.log
            .push(format!("void {} at {voided}", self.grants[i].0["id"]));
        self.write_grant(db, i).await;
    }

    /// The same grant again at a later version: the grants' version moves, their cuts do not.
    async fn rewrite_grant(&mut self, db: &Db) {
        if self.grants.is_empty() {
            return self.new_grant(db).await;
        }
        let i = self.rng.usize(0..self.grants.len());
        self.grants[i].1 += 1;
        self.log.push(format!("rewrite {}", self.grants[i].0["id"]));
        self.write_grant(db, i).await;
    }

    async fn write_grant(&self, db: &Db, i: usize) {
        let (payload, version) = &self.grants[i];
        let state = ObjectState {
            object_type: "credit_grant".into(),
            object_id: payload["id"].as_str().unwrap().to_owned(),
            customer_id: Some(CUSTOMER.into()),
            status: None,
            created: payload["created"].as_i64(),
            version: *version,
            deleted: false,
            payload: payload.to_string(),
            periods: Vec::new(),
        };
        let apply = Apply {
            state,
            claim: None,
            event_ids: Vec::new(),
            refetched: false,
        };
        db.mirror().apply(&[apply], 0).await.unwrap();
    }

    /// A usage event of a random meter (mostly credit-priced ones) some time in the last days.
    fn event(&mut self) -> Value {
        self.events += 1;
        let meter = ["gpu_seconds", "tokens", "calls"][self.rng.usize(0..3)];
        let quantity = match self.rng.bool() {
            true => json!(self.rng.i64(1..40)),
            false => json!(format!("{}.{}", self.rng.u32(0..20), self.rng.u32(1..1000))),
        };
        let at = Self::now() - self.rng.i64(1..80 * HOUR);
        json!({"id": format!("e{}", self.events), "tenant_id": TENANT, "meter": meter,
            "quantity": quantity, "timestamp": rfc3339(at)})
    }

    async fn check_and_record(&mut self, app: &TestApp) {
        let feature = ["gpu_minutes", "ai_tokens"][self.rng.usize(0..2)];
        let event = self.event();
        let body = json!({"feature": feature, "quantity": event["quantity"],
            "record": {"id": event["id"], "timestamp": event["timestamp"]}});
        let answer = app.check_body(TENANT, body.clone()).await;
        self.log
            .push(format!("check-and-record {body}: {}", answer["allowed"]));
    }

    async fn plain_usage(&mut self, app: &TestApp) {
        let event = self.event();
        self.log.push(format!("usage {event}"));
        post_usage(app, json!([event])).await;
    }

    async fn batch_usage(&mut self, app: &TestApp) {
        let mut events: Vec<Value> = (0..self.rng.usize(2..9)).map(|_| self.event()).collect();
        if self.events > 3 {
            // An id stored before: a duplicate, burned once.
            let mut again = self.event();
            again["id"] = json!(format!("e{}", self.rng.usize(1..self.events - 1)));
            events.push(again);
        }
        self.log
            .push(format!("batch {}", Value::from(events.clone())));
        post_usage(app, Value::from(events)).await;
    }
}

fn rfc3339(at: i64) -> String {
    chrono::DateTime::from_timestamp(at, 0)
        .unwrap()
        .to_rfc3339()
}

async fn post_usage(app: &TestApp, events: Value) {
    let response = app
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Whether the service's balances and ledger grants equal a recompute from the mirror's grants
/// and the usage rows of the log.
async fn agrees(
    app: &TestApp,
    db: &Db,
    features: &BTreeMap<String, CreditFeature>,
) -> Result<(), String> {
    let view = app
        .get_json(&format!("/v1/tenants/{TENANT}/credits?limit=100"))
        .await;
    let now = billsync::store::now_ms();
    let credits = db.credits();
    let grants = grants_of(&credits.grant_payloads(TENANT).await.unwrap());
    let mut balances = Vec::new();
    let mut burned: BTreeMap<String, String> = BTreeMap::new();
    for (unit, unit_features) in units(features) {
        let of_unit: Vec<_> = grants.iter().filter(|g| g.unit == unit).cloned().collect();
        let points = breakpoints(&of_unit);
        let meters: Vec<String> = unit_features.iter().map(|f| f.meter.clone()).collect();
        let usage = credits
            .usage_by_segment(TENANT, &meters, &points)
            .await
            .unwrap();
        let allocation = allocate(unit, &of_unit, &unit_features, &points, &usage, now);
        balances.push(serde_json::to_value(&allocation.balance).unwrap());
        for used in allocation.grants {
            burned.insert(used.grant.id, used.burned.normalize().to_string());
        }
    }
    if view["balances"] != Value::from(balances.clone()) {
        return Err(format!(
            "balances {} but the log gives {}",
            view["balances"],
            Value::from(balances)
        ));
    }
    let shown: BTreeMap<String, String> = (view["data"].as_array().unwrap().iter())
        .filter(|e| e["type"] == "grant")
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                e["burned"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    if shown != burned {
        return Err(format!(
            "the ledger's grants burned {shown:?} but the log gives {burned:?}"
        ));
    }
    Ok(())
}

/// A plain `POST /v1/usage` of a credit-priced meter (no check) that takes the balance below
/// the tenant's threshold records the crossing itself, once; a batch further below adds none.
async fn plain_usage_crossing_the_threshold_is_seen_in_its_own_transaction(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, TENANT, CUSTOMER, json!({})).await;
    let db = Db::connect(&app.settings.database).await.unwrap();
    let at = Walk::now() - HOUR;
    let grant = json!({"id": "credgr_low", "object": "billing.credit_grant", "customer": CUSTOMER,
        "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": 1000}},
        "created": at, "effective_at": at, "expires_at": null, "voided_at": null, "priority": 50});
    let walk = Walk {
        rng: fastrand::Rng::new(),
        grants: vec![(grant, 1)],
        events: 0,
        log: Vec::new(),
    };
    walk.write_grant(&db, 0).await;
    let settings = app
        .v1(
            reqwest::Method::PUT,
            &format!("/v1/tenants/{TENANT}/credits/settings/usd"),
        )
        .json(&json!({"threshold": 500, "auto_top_up": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(settings.status(), 200);
    let usage = |id: &str, seconds: i64| json!({"id": id, "tenant_id": TENANT, "meter": "gpu_seconds", "quantity": seconds});
    // 20,000 s at 0.0167 cents: 334 cents, 666 left. Then 10,000 s: 167 cents, 499 left.
    post_usage(&app, json!([usage("u1", 20_000)])).await;
    let alerts = db.credit_alerts();
    assert!(alerts.crossings(TENANT, "usd").await.unwrap().is_empty());
    post_usage(&app, json!([usage("u2", 10_000)])).await;
    post_usage(&app, json!([usage("u3", 100), usage("u4", 100)])).await;
    let crossings = alerts.crossings(TENANT, "usd").await.unwrap();
    let seen: Vec<(&str, &str)> = (crossings.iter())
        .map(|c| (c.available_before.as_str(), c.available_after.as_str()))
        .collect();
    assert_eq!(seen, [("666", "499")]);
    app.stop().await;
}

/// The grants a replica keeps in memory are never used once another writer (another replica's
/// applier, here the mirror directly) has changed them: the first burn after a void is refused.
async fn a_grant_voided_by_another_writer_refuses_the_next_burn_at_once(backend: Backend) {
    let app = service(backend).await;
    onboard(&app, TENANT, CUSTOMER, json!({})).await;
    let db = Db::connect(&app.settings.database).await.unwrap();
    let at = Walk::now() - HOUR;
    let grant = json!({"id": "credgr_void", "object": "billing.credit_grant", "customer": CUSTOMER,
        "amount": {"type": "custom_pricing_unit", "custom_pricing_unit": {"value": "100"}},
        "created": at, "effective_at": at, "expires_at": null, "voided_at": null, "priority": 50});
    let mut walk = Walk {
        rng: fastrand::Rng::new(),
        grants: vec![(grant, 1)],
        events: 0,
        log: Vec::new(),
    };
    walk.write_grant(&db, 0).await;
    let burn = |id: &str| json!({"feature": "ai_tokens", "quantity": 10, "record": {"id": id}});
    let first = app.check_body(TENANT, burn("b1")).await;
    assert_eq!(first["allowed"], true, "{first}");
    assert_eq!(first["credits"]["balance"]["available"], "90");
    walk.grants[0].0["voided_at"] = json!(Walk::now() - 60);
    walk.grants[0].1 += 1;
    walk.write_grant(&db, 0).await;
    let second = app.check_body(TENANT, burn("b2")).await;
    assert_eq!(second["reason"], "insufficient_credits", "{second}");
    assert_eq!(second["recorded"], false);
    app.stop().await;
}
