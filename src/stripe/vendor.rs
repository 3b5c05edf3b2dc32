//! What billsync needs from a billing vendor, in billsync's own words.

use async_trait::async_trait;
use serde_json::Value;

/// The kinds of vendor object billsync mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Customer,
    Product,
    Price,
    /// A legacy plan (what older accounts and localstripe have instead of prices).
    Plan,
    Subscription,
    SubscriptionSchedule,
    Invoice,
    PaymentIntent,
    Charge,
    CreditNote,
    /// A customer's active entitlements, kept as one object per customer.
    ActiveEntitlements,
    /// A billing credit grant (`billing.credit_grant`): prepaid credits of a customer.
    CreditGrant,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 12] = [
        Self::Product,
        Self::Price,
        Self::Plan,
        Self::Customer,
        Self::Subscription,
        Self::SubscriptionSchedule,
        Self::Invoice,
        Self::PaymentIntent,
        Self::Charge,
        Self::CreditNote,
        Self::ActiveEntitlements,
        Self::CreditGrant,
    ];

    /// The name stored in the mirror and shown in APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Product => "product",
            Self::Price => "price",
            Self::Plan => "plan",
            Self::Subscription => "subscription",
            Self::SubscriptionSchedule => "subscription_schedule",
            Self::Invoice => "invoice",
            Self::PaymentIntent => "payment_intent",
            Self::Charge => "charge",
            Self::CreditNote => "credit_note",
            Self::ActiveEntitlements => "active_entitlements",
            Self::CreditGrant => "credit_grant",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// What a fetch by id found.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    Found(Value),
    /// The vendor no longer has it (404, or a `deleted: true` stub).
    Gone,
}

/// One page of a list.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub data: Vec<Value>,
    pub has_more: bool,
}

/// Narrows a list call.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub customer: Option<String>,
    /// Include canceled subscriptions (Stripe's `status=all`).
    pub all_statuses: bool,
}

/// One meter event for the vendor's usage-based billing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    /// The vendor meter's event name.
    pub event_name: String,
    pub customer_id: String,
    /// Exact decimal as text.
    pub value: String,
    /// Unix seconds; the vendor attributes the usage to the period holding it.
    pub timestamp: i64,
    /// Fixed before the first attempt; the vendor keeps one event per identifier.
    pub identifier: String,
}

/// A vendor customer as billsync writes it: the tenant it belongs to, its name and email.
#[derive(Debug, Clone, Copy)]
pub struct CustomerWrite<'a> {
    pub tenant_id: &'a str,
    pub name: Option<&'a str>,
    pub email: Option<&'a str>,
}

/// How a plan change is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proration {
    /// Credit the unused time and charge the new price on the next invoice.
    #[default]
    CreateProrations,
    /// No proration.
    None,
    /// Prorate and invoice at once.
    AlwaysInvoice,
}

impl Proration {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateProrations => "create_prorations",
            Self::None => "none",
            Self::AlwaysInvoice => "always_invoice",
        }
    }
}

/// One change to a subscription. Writes carry `metadata` naming billsync's command.
#[derive(Debug, Clone, Copy)]
pub enum SubscriptionWrite<'a> {
    Create {
        customer: &'a str,
        price: &'a str,
        quantity: u32,
        trial_days: Option<u32>,
        metadata: &'a [(&'a str, &'a str)],
    },
    /// Swaps the one item's price and quantity.
    Change {
        subscription: &'a str,
        item: &'a str,
        price: &'a str,
        quantity: u32,
        proration: Proration,
        /// Unix seconds; fixed when the command was accepted, so every retry sends the same.
        trial_end: Option<i64>,
        metadata: &'a [(&'a str, &'a str)],
    },
    /// Cancel at the end of the period (`true`) or undo that (`false`).
    CancelAtPeriodEnd {
        subscription: &'a str,
        cancel: bool,
        metadata: &'a [(&'a str, &'a str)],
    },
    /// Cancel now.
    CancelNow { subscription: &'a str },
}

/// What a subscription change would cost, without making it.
#[derive(Debug, Clone, Copy)]
pub struct PreviewRequest<'a> {
    pub customer: &'a str,
    /// The current subscription and its item, when there is one.
    pub current: Option<(&'a str, &'a str)>,
    pub price: &'a str,
    pub quantity: u32,
    pub proration: Proration,
}

#[derive(Debug, thiserror::Error)]
pub enum VendorError {
    /// The vendor refused the request and retrying will not help (a 4xx other than 429).
    #[error("vendor refused the request ({status}{}): {message}", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Rejected {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// The vendor could not be reached or kept failing after every retry.
    #[error("vendor unavailable: {0}")]
    Unavailable(String),
    /// The vendor answered something that is not what its API promises.
    #[error("unexpected vendor response: {0}")]
    Malformed(String),
}

/// What billsync needs from a billing vendor to mirror it.
#[async_trait]
pub trait BillingVendor: Send + Sync {
    /// The object's current state.
    async fn fetch(&self, kind: ObjectKind, id: &str) -> Result<Fetched, VendorError>;

    /// One page of objects of a kind, 100 at most, newest first.
    async fn list(
        &self,
        kind: ObjectKind,
        filter: &ListFilter,
        starting_after: Option<&str>,
    ) -> Result<Page, VendorError>;

    /// Reports usage to a meter; repeating an identifier must not count twice.
    async fn report_usage(&self, event: &MeterEvent) -> Result<(), VendorError>;

    /// One page of events created at or after `created_gte` (Unix seconds).
    async fn list_events_since(
        &self,
        created_gte: i64,
        starting_after: Option<&str>,
    ) -> Result<Page, VendorError>;

    /// Creates the customer (`existing: None`) or updates it; returns the vendor's customer.
    /// Repeating `idempotency_key` must not create a second one.
    async fn write_customer(
        &self,
        existing: Option<&str>,
        customer: &CustomerWrite<'_>,
        idempotency_key: &str,
    ) -> Result<Value, VendorError>;

    /// Makes one subscription change; returns the vendor's subscription after it.
    async fn write_subscription(
        &self,
        write: &SubscriptionWrite<'_>,
        idempotency_key: &str,
    ) -> Result<Value, VendorError>;

    /// The invoice the change would produce (the vendor's upcoming-invoice preview).
    async fn preview(&self, request: &PreviewRequest<'_>) -> Result<Value, VendorError>;

    /// What the vendor's meter named `event_name` holds for the customer between two times
    /// (Unix seconds); `None` when the vendor has no such meter.
    async fn meter_usage(
        &self,
        event_name: &str,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<Option<rust_decimal::Decimal>, VendorError>;

    /// Its prepaid credits side, when it has one.
    fn credits(&self) -> Option<&dyn CreditVendor> {
        None
    }
}

/// A credit top-up: an invoice for `amount` minor units of `currency`, paid from the
/// customer's default payment method, then a billing credit grant of the same amount.
#[derive(Debug, Clone, Copy)]
pub struct TopUpWrite<'a> {
    pub customer: &'a str,
    pub currency: &'a str,
    pub amount: i64,
    /// On the invoice, its item and the grant.
    pub description: &'a str,
    pub metadata: &'a [(&'a str, &'a str)],
}

/// One credit balance transaction of a customer, as billsync reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct CreditTransaction {
    pub id: String,
    /// `credit` or `debit` (as the vendor says; other values kept).
    pub kind: String,
    /// Minor units of `currency`; `None` when the vendor's shape held none billsync can read.
    pub amount: Option<rust_decimal::Decimal>,
    pub currency: Option<String>,
    /// Unix seconds.
    pub effective_at: i64,
    pub credit_grant: Option<String>,
    /// As received.
    pub raw: Value,
}

/// The vendor's prepaid credits side: top-ups and the credit balance transactions that
/// reconciliation compares billsync's burns with. A separate trait so that vendors (and fakes)
/// without credits need not implement it.
#[async_trait]
pub trait CreditVendor: Send + Sync {
    /// Makes the top-up; every call carries `idempotency_key` (with a suffix per step), so
    /// repeating it makes nothing twice. Returns `{"invoice": .., "credit_grant": ..}`.
    async fn top_up(
        &self,
        top_up: &TopUpWrite<'_>,
        idempotency_key: &str,
    ) -> Result<Value, VendorError>;

    /// The customer's credit balance transactions effective in `[start, end)` (Unix seconds);
    /// `None` when the vendor has no such list.
    async fn credit_transactions(
        &self,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<Option<Vec<CreditTransaction>>, VendorError>;
}
