//! Billing objects as billsync reads them from the mirror. Times are Unix seconds; money is
//! integer minor units with its currency; quantities are exact decimals.

use rust_decimal::Decimal;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub status: String,
    pub items: Vec<SubscriptionItem>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<i64>,
    pub trial_end: Option<i64>,
    /// `pause_collection.behavior` while collection is paused.
    pub pause: Option<String>,
    pub created: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionItem {
    pub id: Option<String>,
    /// The price id, or the plan id for legacy plans.
    pub price: Option<String>,
    pub quantity: Option<Decimal>,
}

/// How strongly a subscription status says "this is the tenant's subscription now": 0 for one
/// that has ended.
pub fn liveness_of(status: &str) -> u8 {
    match status {
        "active" | "trialing" | "past_due" => 3,
        "paused" | "unpaid" | "incomplete" => 2,
        "canceled" | "incomplete_expired" => 0,
        _ => 1,
    }
}

impl Subscription {
    /// How strongly its status says "this is the tenant's subscription now", for picking one.
    pub fn liveness(&self) -> u8 {
        liveness_of(&self.status)
    }

    /// Orders subscriptions for picking "the" tenant's one: the liveliest, newest among equals
    /// (the id breaks ties, so the pick is the same every time).
    pub fn precedence(&self) -> (u8, Option<i64>, &str) {
        (self.liveness(), self.created, &self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub id: String,
    pub number: Option<String>,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub total: Option<i64>,
    pub amount_due: Option<i64>,
    pub amount_paid: Option<i64>,
    pub amount_remaining: Option<i64>,
    pub subscription: Option<String>,
    pub created: Option<i64>,
    pub due_date: Option<i64>,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    /// When it was finalized (`status_transitions.finalized_at`), and voided.
    pub finalized_at: Option<i64>,
    pub voided_at: Option<i64>,
    /// When Stripe next tries to collect an open invoice.
    pub next_payment_attempt: Option<i64>,
    /// The payment intents it names (older versions: `payment_intent`; newer: `payments`).
    pub payment_intents: Vec<String>,
    pub lines: Vec<InvoiceLine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceLine {
    pub id: Option<String>,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub quantity: Option<Decimal>,
    /// The price id, or the plan id for legacy plans.
    pub price: Option<String>,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    pub description: Option<String>,
    /// A proration (credit for unused time, or the new price's remainder).
    pub proration: bool,
    /// Discounts on the line, and tax included in its amount (both in `amount`).
    pub discounts: i64,
    pub inclusive_tax: i64,
    /// For a recurring price, and for a metered one (`usage_type = metered`).
    pub recurring: bool,
    pub metered: bool,
    /// A line of a subscription or a proration of one (its `type`, its `proration` flag or its
    /// parent's subscription item details say so).
    pub of_subscription: bool,
}

impl InvoiceLine {
    /// What the line earns: its amount less discounts and the tax included in it.
    pub fn net(&self) -> i64 {
        self.amount.unwrap_or(0) - self.discounts - self.inclusive_tax
    }
}

/// A credit note, as revenue recognition reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditNote {
    pub id: String,
    pub voided: bool,
    pub invoice: Option<String>,
    pub created: i64,
    /// Its total, tax included; money back to the customer when `refunds_money`.
    pub total: i64,
    pub refunds_money: bool,
    /// The refunds it accounts for.
    pub refunds: Vec<String>,
    pub lines: Vec<CreditNoteLine>,
    /// Its amount net of tax, for a note without lines.
    pub subtotal: i64,
}

/// A credited line: the invoice line it credits, if it names one, and the amount net of tax
/// and discounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditNoteLine {
    pub invoice_line_item: Option<String>,
    pub amount: i64,
}

/// A refund of a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: String,
    pub amount: i64,
    pub created: i64,
}

/// A payment intent, a charge or a credit note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: String,
    /// `payment_intent`, `charge` or `credit_note`.
    pub kind: String,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub amount: Option<i64>,
    pub amount_received: Option<i64>,
    pub amount_refunded: Option<i64>,
    pub refunded: bool,
    pub disputed: bool,
    pub invoice: Option<String>,
    pub payment_intent: Option<String>,
    pub created: Option<i64>,
}

/// A billing period as the vendor stated it: a subscription's current period, or the usage
/// period an invoice bills. Kept after the period ends, so that late usage finds its period.
/// Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingPeriod {
    pub subscription_id: String,
    pub start: i64,
    pub end: i64,
    /// The subscription's status, when the period comes from the subscription.
    pub subscription_status: Option<String>,
    /// The invoice billing the period's usage and its status, when it comes from an invoice.
    pub invoice: Option<(String, String)>,
}

/// Whether an invoice in this status can no longer take usage (Stripe finalized it).
pub fn invoice_is_final(status: &str) -> bool {
    matches!(status, "open" | "paid" | "uncollectible" | "void")
}
