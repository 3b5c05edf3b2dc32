//! Backoff between attempts: one rule for every retry billsync makes (a Stripe call inside
//! the client, an inbox row, a command, a push).

use std::time::Duration;

/// The first delay of a worker's retries (inbox rows, commands, pushes).
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The delay before retry `attempt` (0-based): `base` doubled per attempt, capped at `max`, with
/// jitter in [½, 1] of it.
pub fn backoff(base: Duration, attempt: u32, max: Duration) -> Duration {
    base.saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(max)
        .mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// A worker's delay after `attempts` failed attempts: 1 s, 2 s, 4 s … capped at `max`.
pub fn after_failures(attempts: i32, max: Duration) -> Duration {
    backoff(FIRST_RETRY, u32::try_from(attempts).unwrap_or(0), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(8);
        for attempt in 0..30 {
            let d = backoff(base, attempt, max);
            let full = base
                .saturating_mul(2u32.saturating_pow(attempt.min(20)))
                .min(max);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
        assert!(after_failures(0, Duration::from_secs(60)) <= Duration::from_secs(1));
        assert!(after_failures(3, Duration::from_secs(60)) >= Duration::from_secs(4));
        assert!(after_failures(-1, Duration::from_secs(60)) <= Duration::from_secs(1));
    }
}
