//! How much usage a quota still lets through: what check-and-record compares the usage log's
//! figure with, under its lock.

use rust_decimal::Decimal;

/// The most a meter's figure may be for a record to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ceiling {
    /// Nothing allows it (no plan, no such feature).
    Never,
    /// Allowed while the figure is at most this (the limit less the quantity asked for).
    AtMost(Decimal),
    /// Anything allows it (an unlimited quota).
    Unlimited,
}

impl Ceiling {
    /// Whether a figure of `used` (`None`: no usage yet) lets the record through.
    pub fn admits(self, used: Option<Decimal>) -> bool {
        match self {
            Self::Never => false,
            Self::Unlimited => true,
            Self::AtMost(most) => used.unwrap_or_default() <= most,
        }
    }
}
