//! What the drift sweep's budget buys: how many known tenants one pass checks, and so the
//! longest a known tenant goes unchecked. One function, used by the sweep, the status route,
//! the metric and the figures in docs/benchmarks.md.

use std::time::Duration;

/// Stripe calls one tenant's check costs: its customer, and one page of its live subscriptions.
/// A mirrored live subscription the list no longer shows costs one fetch more, and a tenant
/// with more than 100 live subscriptions a page more.
pub const CALLS_PER_TENANT: u64 = 2;

/// The sweep's plan for its budget, interval and tenant count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPlan {
    /// Calls a pass may spend: the budget's share of one interval, never below one tenant's.
    pub calls_per_pass: u64,
    /// Tenants a pass checks.
    pub tenants_per_pass: u64,
    /// Of those, how many may be tenants with recent activity ahead of their turn (a quarter);
    /// the rest go strictly to the least recently checked.
    pub active_per_pass: u64,
    /// The longest a known tenant waits between two checks: the passes the least recently
    /// checked lane needs to go round every tenant, times the interval.
    pub longest_unchecked: Duration,
}

/// The plan for `budget_per_minute` calls, a pass every `interval`, and `known_tenants`.
pub fn plan(budget_per_minute: u32, interval: Duration, known_tenants: u64) -> SweepPlan {
    let share = u128::from(budget_per_minute) * interval.as_millis() / 60_000;
    let calls_per_pass = u64::try_from(share)
        .unwrap_or(u64::MAX)
        .max(CALLS_PER_TENANT);
    let tenants_per_pass = calls_per_pass / CALLS_PER_TENANT;
    let active_per_pass = tenants_per_pass / 4;
    let in_turn = tenants_per_pass - active_per_pass;
    let passes = known_tenants.div_ceil(in_turn);
    SweepPlan {
        calls_per_pass,
        tenants_per_pass,
        active_per_pass,
        longest_unchecked: interval.saturating_mul(u32::try_from(passes).unwrap_or(u32::MAX)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_checks_37_tenants_every_30_seconds() {
        let p = plan(150, Duration::from_secs(30), 10_000);
        assert_eq!(p.calls_per_pass, 75);
        assert_eq!(p.tenants_per_pass, 37);
        assert_eq!(p.active_per_pass, 9);
        // 10,000 tenants, 28 in turn per pass: 358 passes.
        assert_eq!(p.longest_unchecked, Duration::from_secs(358 * 30));
    }

    #[test]
    fn a_pass_always_checks_one_tenant() {
        let p = plan(1, Duration::from_secs(1), 3);
        assert_eq!((p.calls_per_pass, p.tenants_per_pass), (2, 1));
        assert_eq!(p.longest_unchecked, Duration::from_secs(3));
        assert_eq!(
            plan(150, Duration::from_secs(30), 0).longest_unchecked,
            Duration::ZERO
        );
    }

    /// The figures in docs/benchmarks.md ("Drift sweep"): `cargo test --lib sweep_plan --
    /// --nocapture` prints them.
    #[test]
    fn the_figures_for_10_000_and_100_000_tenants() {
        let mut rows = Vec::new();
        for budget in [150, 600, 1500] {
            for tenants in [10_000, 100_000] {
                let p = plan(budget, Duration::from_secs(30), tenants);
                // A pass every 30 s: two a minute.
                let calls_per_minute = p.calls_per_pass * 2;
                let longest = p.longest_unchecked.as_secs();
                println!(
                    "| {budget} | {tenants} | {calls_per_minute} | {} | {longest} s ({} h {} min) |",
                    p.tenants_per_pass,
                    longest / 3600,
                    longest % 3600 / 60
                );
                rows.push(longest);
            }
        }
        assert_eq!(rows, [10_740, 107_160, 2_670, 26_550, 1_080, 10_650]);
    }
}
