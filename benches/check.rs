//! Criterion: the in-process entitlement check, warm, with the read models in billsync's map
//! (what the service uses) and, for comparison, looked up in a moka cache.
//!
//!     cargo bench --bench check

/// The allocator the `billsync` binary runs with (src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rust_decimal::Decimal;

#[path = "common/tenants.rs"]
mod tenants;

const TENANTS: usize = 10_000;

fn checks(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = runtime.block_on(tenants::warm_state(dir.path(), TENANTS));
    let entitlements = state.entitlements.clone();
    let names: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();
    let now = billsync::store::now_ms();

    let mut i = 0;
    c.bench_function("check_warm (quota, map)", |b| {
        b.iter(|| {
            i = (i + 7919) % TENANTS;
            entitlements
                .check_warm(&names[i], "api_calls", Decimal::ONE, now)
                .unwrap()
        })
    });

    let cache: moka::sync::Cache<String, Arc<billsync::entitlements::TenantModel>> =
        moka::sync::Cache::new(1_000_000);
    for name in &names {
        let model = runtime.block_on(entitlements.model(name)).unwrap().unwrap();
        cache.insert(name.clone(), model);
    }
    c.bench_function("check (quota, moka get)", |b| {
        b.iter(|| {
            i = (i + 7919) % TENANTS;
            let model = cache.get(&names[i]).unwrap();
            entitlements.decide(&model, "api_calls", Decimal::ONE, now)
        })
    });
}

criterion_group!(benches, checks);
criterion_main!(benches);
