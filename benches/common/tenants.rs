//! A service state with many tenants on the free plan, their read models loaded.
#![allow(dead_code)]

use billsync::config::{Secret, Settings, key_digest};
use billsync::state::{AppState, init_crypto};
use billsync::store::Db;

pub const API_KEY: &str = "bench-api-key-0123456789";

/// The catalog every entitlement benchmark uses: a quota and a boolean on the free plan.
pub const CATALOG: &str = "[meters.calls]\naggregation = \"sum\"\n\n[features.api_calls]\nmeter = \"calls\"\n\n\
[plans.free]\nfeatures = { api_calls = 1000000, sso = true }\n";

pub fn settings(url: &str, catalog: &std::path::Path) -> Settings {
    let mut s = Settings::from_toml("").unwrap();
    s.database.url = Secret::new(url);
    s.api.key_digests = vec![key_digest(API_KEY).unwrap()];
    s.catalog.path = catalog.to_owned();
    s.catalog.required = true;
    s
}

/// Inserts `count` tenants `t0`… in a few transactions.
pub async fn create_tenants(db: &Db, count: usize) {
    macro_rules! insert {
        ($pool:expr, $chunk:expr) => {{
            let mut query = sqlx::QueryBuilder::new(
                "INSERT INTO tenants (tenant_id, name, email, customer_id, created_at, updated_at) ",
            );
            query.push_values($chunk, |mut b, i| {
                b.push_bind(format!("t{i}"))
                    .push_bind(Option::<String>::None)
                    .push_bind(Option::<String>::None)
                    .push_bind(Option::<String>::None)
                    .push_bind(0_i64)
                    .push_bind(0_i64);
            });
            query.build().execute($pool).await.map(drop)
        }};
    }
    for chunk in (0..count).collect::<Vec<_>>().chunks(5000) {
        match db {
            Db::Sqlite(pool) => insert!(pool, chunk),
            Db::Postgres(pool) => insert!(pool, chunk),
        }
        .unwrap();
    }
}

/// A state on SQLite with `count` tenants whose models are all loaded.
pub async fn warm_state(dir: &std::path::Path, count: usize) -> AppState {
    init_crypto();
    let catalog = dir.join("plans.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    let url = format!("sqlite://{}", dir.join("bench.db").display());
    let state = AppState::build(settings(&url, &catalog)).await.unwrap();
    create_tenants(&state.db, count).await;
    for i in 0..count {
        state
            .entitlements
            .model(&format!("t{i}"))
            .await
            .unwrap()
            .expect("tenant");
    }
    state
}

/// This process's resident memory, in MiB (Linux).
pub fn resident_mib() -> f64 {
    status_mib("VmRSS:")
}

/// Peak resident memory since the last reset (write "5" to /proc/self/clear_refs), in MiB.
pub fn peak_mib() -> f64 {
    status_mib("VmHWM:")
}

fn status_mib(field: &str) -> f64 {
    process_status_mib("self", field)
}

/// A `/proc/<pid>/status` field in kB, as MiB (`pid` may be `self`).
pub fn process_status_mib(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Links tenants `t0`… to customers `cus_0`…, as the applier would from their metadata.
pub async fn link_customers(db: &Db, count: usize) {
    let links: Vec<billsync::store::Apply> = (0..count)
        .map(|t| billsync::store::Apply {
            state: billsync::store::ObjectState {
                object_type: "customer".into(),
                object_id: format!("cus_{t}"),
                customer_id: Some(format!("cus_{t}")),
                status: None,
                created: None,
                version: 1,
                deleted: false,
                payload: serde_json::json!({"id": format!("cus_{t}"), "object": "customer",
                    "metadata": {"tenant_id": format!("t{t}")}})
                .to_string(),
                periods: Vec::new(),
            },
            claim: Some(billsync::store::TenantClaim {
                tenant_id: format!("t{t}"),
                name: None,
                email: None,
            }),
            event_ids: Vec::new(),
            refetched: false,
        })
        .collect();
    for chunk in links.chunks(1000) {
        db.mirror().apply(chunk, 0).await.unwrap();
    }
}
