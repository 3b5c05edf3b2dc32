//! Prepaid credits and notifications, typed: the tenant's balances and ledger
//! (`GET /v1/tenants/{t}/credits`), its low-balance settings
//! (`GET|PUT /v1/tenants/{t}/credits/settings[/{unit}]`), and what billsync told the product
//! (`GET /v1/notifications`).
//!
//! A credit-priced feature is never decided from the replica: its balance is live (other
//! clients and replicas burn it), and the stream carries no balance. The replica knows which
//! features are credit-priced (the stream's `hello`), answers them
//! [`reason::NEEDS_SERVER`](crate::reason::NEEDS_SERVER) from memory, and
//! [`Client::check`](crate::Client::check) asks the server for them.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http::{get, put};
use crate::{Client, Error};

/// How a credit-priced feature burns credits, as the server's catalog says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CreditPrice {
    /// The meter whose usage burns the credits.
    pub meter: String,
    /// A lowercase currency (amounts in minor units), a custom pricing unit, or `credits`.
    pub unit: String,
    /// Credits burned per unit of the meter, exact.
    #[serde(with = "rust_decimal::serde::str")]
    pub credits_per_unit: Decimal,
}

/// A tenant's balance in one unit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Balance {
    pub unit: String,
    /// Unexpired, unvoided grants in effect.
    #[serde(with = "rust_decimal::serde::str")]
    pub granted: Decimal,
    /// What usage burned from them.
    #[serde(with = "rust_decimal::serde::str")]
    pub burned: Decimal,
    /// `granted - burned`: what a check can spend.
    #[serde(with = "rust_decimal::serde::str")]
    pub available: Decimal,
}

/// The credit side of a server check of a credit-priced feature.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CreditCheck {
    pub unit: String,
    /// What the check's quantity costs: quantity × `credits_per_unit`.
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    /// The balance after the answer (with the record, when one was stored).
    pub balance: Balance,
}

/// One entry of the credits ledger, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LedgerEntry {
    Grant(GrantEntry),
    Burn(BurnEntry),
    /// An entry type this client does not know (a newer server).
    #[serde(other)]
    Other,
}

/// A Stripe credit grant and what was burned from it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GrantEntry {
    pub id: String,
    /// When it took effect (RFC 3339).
    pub at: String,
    pub unit: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub burned: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub remaining: Decimal,
    /// `active`, `scheduled`, `expired` or `voided`.
    pub status: String,
    pub priority: i64,
    pub category: Option<String>,
    pub name: Option<String>,
    pub expires_at: Option<String>,
    pub voided_at: Option<String>,
}

/// A usage event of a credit-priced meter, and what it burned.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BurnEntry {
    /// The usage event's id.
    pub id: String,
    pub at: String,
    pub unit: String,
    /// Credits burned.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub feature: String,
    pub meter: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
}

/// One page of `GET /v1/tenants/{t}/credits`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CreditsPage {
    pub tenant_id: String,
    /// Every unit's balance (on every page).
    pub balances: Vec<Balance>,
    /// The ledger's entries on this page, newest first.
    #[serde(rename = "data")]
    pub entries: Vec<LedgerEntry>,
    /// Give it as [`Page::cursor`] for the next page; `None`: the last page.
    pub next_cursor: Option<String>,
}

/// Which page of a list to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// 1 to 100; the server's default when `None`.
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl Page {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &self.cursor {
            query.push(("cursor", cursor.clone()));
        }
        query
    }
}

/// A tenant's low-balance settings for one unit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CreditSettings {
    pub unit: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub threshold: Decimal,
    /// Minor units of the currency.
    pub top_up_amount: Option<i64>,
    pub auto_top_up: bool,
    /// False from a crossing until the balance is at or above the threshold again.
    pub armed: bool,
    pub crossings: i64,
    pub updated_at: String,
}

/// The body of `PUT /v1/tenants/{t}/credits/settings/{unit}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreditSettingsUpdate {
    /// Exact, at least 0; whole minor units for a currency.
    #[serde(with = "rust_decimal::serde::str")]
    pub threshold: Decimal,
    /// Minor units of the currency; needed for auto top-up.
    pub top_up_amount: Option<i64>,
    pub auto_top_up: bool,
}

#[derive(Deserialize)]
struct SettingsList {
    data: Vec<CreditSettings>,
}

/// A notification billsync recorded for the product, with its delivery.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Notification {
    /// The event id the receiver dedupes on.
    pub id: String,
    /// `credits.balance_low` or `credits.top_up_failed`.
    #[serde(rename = "type")]
    pub kind: String,
    pub tenant_id: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub last_status: Option<i64>,
    /// The body as sent to `notify.url`.
    pub payload: Value,
    pub created_at: String,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
}

/// Which notifications to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotificationQuery {
    /// Needed with a tenant-scoped key.
    pub tenant_id: Option<String>,
    /// `pending`, `delivered` or `failed`.
    pub status: Option<String>,
    pub page: Page,
}

/// One page of `GET /v1/notifications`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NotificationsPage {
    pub data: Vec<Notification>,
    pub next_cursor: Option<String>,
}

impl Client {
    /// The tenant's balances and a page of its credits ledger (grants and burns, newest
    /// first). An unknown tenant is `Error::Status { status: 404, .. }`.
    pub async fn credits(&self, tenant: &str, page: &Page) -> Result<CreditsPage, Error> {
        let path = ["v1", "tenants", tenant, "credits"];
        get(self.shared(), &path, &page.query()).await
    }

    /// The tenant's low-balance settings, by unit.
    pub async fn credit_settings(&self, tenant: &str) -> Result<Vec<CreditSettings>, Error> {
        let path = ["v1", "tenants", tenant, "credits", "settings"];
        let list: SettingsList = get(self.shared(), &path, &[]).await?;
        Ok(list.data)
    }

    /// Creates or replaces the tenant's settings for `unit` (the alarm's state stays). A value
    /// the server refuses is `Error::Status { status: 400, code: "invalid_value", .. }`.
    pub async fn put_credit_settings(
        &self,
        tenant: &str,
        unit: &str,
        update: &CreditSettingsUpdate,
    ) -> Result<CreditSettings, Error> {
        let path = ["v1", "tenants", tenant, "credits", "settings", unit];
        put(self.shared(), &path, update).await
    }

    /// A page of the notifications billsync recorded for the product, newest first.
    pub async fn notifications(
        &self,
        query: &NotificationQuery,
    ) -> Result<NotificationsPage, Error> {
        let mut params = query.page.query();
        params.extend(query.tenant_id.clone().map(|t| ("tenant_id", t)));
        params.extend(query.status.clone().map(|s| ("status", s)));
        get(self.shared(), &["v1", "notifications"], &params).await
    }

    /// How `feature` burns credits, if it is credit-priced (as the server's `hello` said).
    pub fn credit_price(&self, feature: &str) -> Option<CreditPrice> {
        self.shared().replica_read().credit_price(feature).cloned()
    }
}
