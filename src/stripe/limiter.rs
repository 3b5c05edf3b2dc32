//! A client-side rate limit shared by every task that calls Stripe.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Spaces calls evenly at `n` per second across every task that shares it.
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    pub fn per_second(n: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / n.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_spaces_calls() {
        let limiter = RateLimiter::per_second(10);
        let started = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        assert!(started.elapsed() >= Duration::from_millis(1000));
    }
}
