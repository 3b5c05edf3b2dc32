//! Credit grants as billsync uses them (read from the mirror's `credit_grant` rows by
//! `stripe::objects::credit_grant`), and the order Stripe consumes them in.

use std::cmp::Ordering;

use rust_decimal::Decimal;

/// The unit of a grant in a custom pricing unit that names none, and of credit-priced features
/// that burn plain credits.
pub const CREDITS: &str = "credits";

/// One billing credit grant. Times are Unix ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditGrant {
    pub id: String,
    pub customer: Option<String>,
    /// A lowercase currency (`usd`: the amount is in minor units), or a custom pricing unit.
    pub unit: String,
    pub amount: Decimal,
    /// Lower is consumed first (Stripe's default is 50).
    pub priority: i64,
    pub created_ms: i64,
    /// From when the credits may be used.
    pub effective_ms: i64,
    pub expires_ms: Option<i64>,
    pub voided_ms: Option<i64>,
    /// `paid` or `promotional`.
    pub category: Option<String>,
    pub name: Option<String>,
    /// The prices the grant is limited to (`applicability_config.scope.prices`); `None`: every
    /// metered price.
    pub prices: Option<Vec<String>>,
}

impl CreditGrant {
    /// When the credits stop being usable: the earlier of expiry and voiding.
    pub fn ends_ms(&self) -> Option<i64> {
        match (self.expires_ms, self.voided_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether usage at `at` may burn it.
    pub fn usable_at(&self, at: i64) -> bool {
        self.effective_ms <= at && self.ends_ms().is_none_or(|end| at < end)
    }

    /// `voided`, `expired`, `scheduled` (not effective yet) or `active`, at `now`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.voided_ms.is_some_and(|v| v <= now) {
            "voided"
        } else if self.expires_ms.is_some_and(|e| e <= now) {
            "expired"
        } else if now < self.effective_ms {
            "scheduled"
        } else {
            "active"
        }
    }

    /// Whether usage of a meter billed by `meter_prices` may burn it.
    pub fn applies_to(&self, meter_prices: &[String]) -> bool {
        self.prices
            .as_ref()
            .is_none_or(|prices| prices.iter().any(|p| meter_prices.contains(p)))
    }

    /// Stripe's order of consumption: priority, then the earliest expiry (none last), then the
    /// oldest; the id breaks ties so the order is total.
    pub fn consumption_order(&self, other: &Self) -> Ordering {
        let key = |g: &Self| (g.priority, g.expires_ms.unwrap_or(i64::MAX), g.created_ms);
        key(self)
            .cmp(&key(other))
            .then_with(|| self.id.cmp(&other.id))
    }
}
