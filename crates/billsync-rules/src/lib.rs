#![doc = include_str!("../README.md")]

use std::collections::BTreeMap;

use rust_decimal::Decimal;

/// The reasons a check is answered with, as the API spells them.
pub mod reason {
    pub const OK: &str = "ok";
    /// No subscription; also a tenant never synced, unless the feature fails open.
    pub const NO_SUBSCRIPTION: &str = "no_subscription";
    /// A subscription that does not grant access (canceled, unpaid, past_due beyond grace).
    pub const SUBSCRIPTION_INACTIVE: &str = "subscription_inactive";
    /// The plan lacks the feature, or turns it off.
    pub const FEATURE_NOT_IN_PLAN: &str = "feature_not_in_plan";
    /// The quota's `used` plus the quantity asked for is over its limit.
    pub const LIMIT_EXCEEDED: &str = "limit_exceeded";
    /// Never given by [`TenantRules::decide`](crate::TenantRules::decide): the caller's answer
    /// for a tenant it does not know.
    pub const UNKNOWN_TENANT: &str = "unknown_tenant";
    /// The server's answer when a tenant's credit balance cannot cover a credit-priced
    /// feature's cost (never given by [`TenantRules::decide`](crate::TenantRules::decide)).
    pub const INSUFFICIENT_CREDITS: &str = "insufficient_credits";
    /// Never given by the server: a copy's answer for a credit-priced feature, which only the
    /// server can decide (the balance is live). Not allowed; ask the server.
    pub const NEEDS_SERVER: &str = "needs_server";
}

/// Why a tenant has what it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// A subscription that grants access.
    Subscribed,
    /// No granting subscription, but a free plan.
    Free,
    NoSubscription,
    /// A subscription that does not grant access, and no free plan.
    Inactive,
}

/// What a tenant gets of one feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Boolean {
        enabled: bool,
    },
    /// `limit: None` is unlimited; `meter` is what counts usage against it.
    Quota {
        limit: Option<i64>,
        meter: String,
    },
}

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

/// A check's answer, before the caller adds how fresh its data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// One of the [`reason`] constants.
    pub reason: &'static str,
    /// The quota's limit; `None`: unlimited, or not a quota.
    pub limit: Option<i64>,
    /// The quota's usage in the period (normalized: `5`, not `5.00`); `None` if not a quota.
    pub used: Option<Decimal>,
    /// `limit - used`, never below zero (normalized); `None` if unlimited or not a quota.
    pub remaining: Option<Decimal>,
}

impl Verdict {
    const fn bare(allowed: bool, reason: &'static str) -> Self {
        Self {
            allowed,
            reason,
            limit: None,
            used: None,
            remaining: None,
        }
    }
}

/// What the rules need to know of one tenant.
#[derive(Debug, Clone, Copy)]
pub struct TenantRules<'a> {
    pub standing: Standing,
    /// Whether the tenant's vendor state was ever confirmed (the server: `as_of.is_some()`).
    pub synced: bool,
    /// The tenant's grants by feature name.
    pub features: &'a dyn Grants,
}

/// A tenant's grants, found by feature name: a map (the server), or any store a client keeps
/// them in.
pub trait Grants: std::fmt::Debug {
    fn grant(&self, feature: &str) -> Option<&Grant>;
}

impl Grants for BTreeMap<String, Grant> {
    fn grant(&self, feature: &str) -> Option<&Grant> {
        self.get(feature)
    }
}

/// What the standing alone decides, before the feature's grant is looked at.
enum Gate {
    Open,
    Closed(&'static str),
    ByGrant,
}

impl TenantRules<'_> {
    /// Whether `quantity` more of `feature` is allowed.
    ///
    /// `fails_open` says whether the feature fails open; it is asked only for a tenant never
    /// synced (and not on the free plan). `used` gives a quota's usage in the period from its
    /// meter's name; it is asked only for a quota.
    pub fn decide(
        &self,
        feature: &str,
        quantity: Decimal,
        fails_open: impl FnOnce() -> bool,
        used: impl FnOnce(&str) -> Decimal,
    ) -> Verdict {
        match self.gate(fails_open) {
            Gate::Open => return Verdict::bare(true, reason::OK),
            Gate::Closed(why) => return Verdict::bare(false, why),
            Gate::ByGrant => {}
        }
        match self.features.grant(feature) {
            None | Some(Grant::Boolean { enabled: false }) => {
                Verdict::bare(false, reason::FEATURE_NOT_IN_PLAN)
            }
            Some(Grant::Boolean { enabled: true }) => Verdict::bare(true, reason::OK),
            Some(Grant::Quota { limit, meter }) => {
                let used = used(meter);
                let Some(limit) = *limit else {
                    return Verdict {
                        used: Some(used.normalize()),
                        ..Verdict::bare(true, reason::OK)
                    };
                };
                let limit_d = Decimal::from(limit);
                let allowed = used + quantity <= limit_d;
                Verdict {
                    allowed,
                    reason: if allowed {
                        reason::OK
                    } else {
                        reason::LIMIT_EXCEEDED
                    },
                    limit: Some(limit),
                    used: Some(used.normalize()),
                    remaining: Some((limit_d - used).max(Decimal::ZERO).normalize()),
                }
            }
        }
    }

    /// The same decision as a bound: the most the feature's meter figure may be for `quantity`
    /// more to be allowed. [`Self::decide`] allows exactly when the ceiling admits `used`.
    pub fn ceiling(
        &self,
        feature: &str,
        quantity: Decimal,
        fails_open: impl FnOnce() -> bool,
    ) -> Ceiling {
        match self.gate(fails_open) {
            Gate::Open => return Ceiling::Unlimited,
            Gate::Closed(_) => return Ceiling::Never,
            Gate::ByGrant => {}
        }
        match self.features.grant(feature) {
            None | Some(Grant::Boolean { enabled: false }) => Ceiling::Never,
            Some(Grant::Boolean { enabled: true }) | Some(Grant::Quota { limit: None, .. }) => {
                Ceiling::Unlimited
            }
            Some(Grant::Quota {
                limit: Some(limit), ..
            }) => Ceiling::AtMost(Decimal::from(*limit) - quantity),
        }
    }

    fn gate(&self, fails_open: impl FnOnce() -> bool) -> Gate {
        // Unknown vendor state: closed unless the catalog says the feature may fail open. The
        // free plan needs no vendor state, so it is decided as usual.
        if !self.synced && self.standing != Standing::Free {
            return if fails_open() {
                Gate::Open
            } else {
                Gate::Closed(reason::NO_SUBSCRIPTION)
            };
        }
        match self.standing {
            Standing::NoSubscription => Gate::Closed(reason::NO_SUBSCRIPTION),
            Standing::Inactive => Gate::Closed(reason::SUBSCRIPTION_INACTIVE),
            Standing::Subscribed | Standing::Free => Gate::ByGrant,
        }
    }
}

#[cfg(test)]
mod tests;
