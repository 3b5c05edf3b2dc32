//! Revenue recognition: each finalized invoice line becomes a schedule of daily amounts (what
//! was earned when), and credit notes, refunds and voids take revenue back from their own date
//! on. Everything is integer minor units per currency, and a line's days add up to the line
//! exactly. The schedule is built from the mirror (and the usage log, for metered lines) and
//! kept until they change ([`cache`]): the same invoices give the same schedule.

mod adjustments;
pub mod cache;
mod lines;
mod load;
pub mod report;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

use crate::stripe::objects;

pub use cache::RevenueCache;
pub use load::load;
pub use report::{Group, Report, report};

/// A day: days since 1970-01-01, UTC.
pub type Day = i64;

const SECONDS_PER_DAY: i64 = 86_400;

pub fn day_of(unix_secs: i64) -> Day {
    unix_secs.div_euclid(SECONDS_PER_DAY)
}

/// How a line's revenue is earned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Ratably per day over the line's service period (licensed prices, prorations).
    Subscription,
    /// On the days the usage happened (metered prices).
    Usage,
    /// On the invoice's finalization day.
    OneOff,
    /// Revenue taken back by a credit note, a refund or a void.
    Reversal,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Self::Subscription,
        Self::Usage,
        Self::OneOff,
        Self::Reversal,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscription => "subscription",
            Self::Usage => "usage",
            Self::OneOff => "one_off",
            Self::Reversal => "reversal",
        }
    }
}

/// One invoice line's revenue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRevenue {
    pub tenant_id: String,
    pub invoice_id: String,
    pub line_id: String,
    pub currency: String,
    pub kind: Kind,
    /// Net of discounts and of tax included in the price; what the line bills as revenue.
    pub amount: i64,
    /// The invoice's finalization day: when the amount is billed.
    pub billed_day: Day,
    pub service_start: Option<Day>,
    pub service_end: Option<Day>,
    /// The invoice is uncollectible: still recognised, flagged.
    pub uncollectible: bool,
    /// `(day, amount)`, ascending, adding up to `amount`.
    pub entries: Vec<(Day, i64)>,
}

/// Revenue taken back from one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    pub tenant_id: String,
    pub invoice_id: String,
    pub line_id: String,
    pub currency: String,
    /// The credit note, refund or invoice (void) behind it.
    pub source: String,
    /// `credit_note`, `refund` or `void`.
    pub cause: &'static str,
    pub day: Day,
    /// Taken back (positive for a credit on a positive line).
    pub amount: i64,
    /// `(day, amount)`, every day at or after `day`, adding up to `-amount`.
    pub entries: Vec<(Day, i64)>,
}

/// The whole schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    pub lines: Vec<LineRevenue>,
    pub adjustments: Vec<Adjustment>,
}

/// What the schedule is built from.
#[derive(Default)]
pub struct Inputs {
    /// `(tenant, invoice)` as mirrored.
    pub invoices: Vec<(String, Value)>,
    pub credit_notes: Vec<Value>,
    pub charges: Vec<Value>,
    /// Price (or plan) id → meter, for metered lines.
    pub price_meter: HashMap<String, String>,
    /// `(tenant, meter)` → usage per day.
    pub usage: HashMap<(String, String), BTreeMap<Day, Decimal>>,
}

/// Splits `total` in proportion to `weights` (non-negative), exactly: each share is rounded
/// toward zero and what is left goes one unit at a time to the first shares.
pub fn split(total: i64, weights: &[i128]) -> Vec<i64> {
    let sum: i128 = weights.iter().sum();
    if weights.is_empty() {
        return Vec::new();
    }
    if sum <= 0 {
        let mut shares = vec![0; weights.len()];
        shares[0] = total;
        return shares;
    }
    let sign = if total < 0 { -1 } else { 1 };
    let magnitude = i128::from(total).abs();
    let mut shares: Vec<i128> = weights.iter().map(|w| magnitude * w / sum).collect();
    let mut left = magnitude - shares.iter().sum::<i128>();
    for share in shares.iter_mut() {
        if left == 0 {
            break;
        }
        *share += 1;
        left -= 1;
    }
    shares.into_iter().map(|s| (s as i64) * sign).collect()
}

/// Builds the schedule. Lines of draft invoices are left out; a void invoice's lines are taken
/// back in full on the day it was voided.
pub fn build(inputs: &Inputs) -> Schedule {
    let mut builder = Builder::default();
    for (tenant, raw) in &inputs.invoices {
        builder.invoice(inputs, tenant, &objects::invoice(raw));
    }
    builder.finish(&inputs.credit_notes, &inputs.charges)
}

/// Builds a schedule an invoice at a time (so that invoices can stream past), then applies the
/// credit notes and refunds.
#[derive(Default)]
pub struct Builder {
    schedule: Schedule,
    /// Lines by invoice, for credit notes and refunds.
    by_invoice: HashMap<String, Vec<usize>>,
    /// Each invoice's total (tax included): refunds are of money, and only the revenue share of
    /// them comes off the lines.
    totals: HashMap<String, i64>,
    /// Payment intent → invoice, for charges that do not name their invoice (newer versions).
    intents: HashMap<String, String>,
}
