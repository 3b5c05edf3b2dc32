//! The in-memory copy of every tenant's entitlements, kept by the stream's events, and the
//! usage this process recorded that the copy has not seen yet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use billsync_rules::{Grant, Standing, TenantRules};
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::Check;
use crate::credits::CreditPrice;

/// One tenant as the stream sent it, compact: a check over many tenants reads memory no
/// other tenant shares, so the fewer places it reads, the faster it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantState {
    pub standing: Standing,
    pub synced: bool,
    pub stale: bool,
    pub as_of: Option<Arc<str>>,
    /// The tenant's features, in one allocation.
    pub grants: Grants,
}

/// A tenant id, inside the map's own memory when it is short (most are): finding a tenant
/// then reads no allocation of its own.
#[derive(Debug, Clone)]
enum TenantKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

const INLINE: usize = 30;

impl TenantKey {
    fn new(id: String) -> Self {
        let mut bytes = [0; INLINE];
        match bytes.get_mut(..id.len()) {
            Some(start) => {
                start.copy_from_slice(id.as_bytes());
                Self::Inline {
                    len: id.len() as u8,
                    bytes,
                }
            }
            None => Self::Heap(id.into_bytes().into_boxed_slice()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..*len as usize],
            Self::Heap(bytes) => bytes,
        }
    }
}

// Hashed and compared as its bytes, so that the map is searched with a `&[u8]`.
impl PartialEq for TenantKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for TenantKey {}

impl std::hash::Hash for TenantKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for TenantKey {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

/// A tenant's features with, for quotas, the server's usage of their meter in the period.
#[derive(Debug, Clone, PartialEq)]
pub struct Grants(Box<[Slot]>);

#[derive(Debug, Clone, PartialEq)]
struct Slot {
    /// Interned: every tenant's slot for a feature shares one name, which stays in cache.
    feature: Arc<str>,
    grant: Grant,
    used: Decimal,
}

impl billsync_rules::Grants for Grants {
    fn grant(&self, feature: &str) -> Option<&Grant> {
        self.slot(feature).map(|slot| &slot.grant)
    }
}

impl Grants {
    fn slot(&self, feature: &str) -> Option<&Slot> {
        self.0.iter().find(|slot| &*slot.feature == feature)
    }

    /// The server's figure for a quota's meter (zero when no quota uses it).
    fn used(&self, feature: &str) -> Decimal {
        self.slot(feature).map_or(Decimal::ZERO, |slot| slot.used)
    }

    /// A new figure for `meter`, in every quota it counts for.
    fn set_used(&mut self, meter: &str, used: Decimal) {
        for slot in self.0.iter_mut() {
            if matches!(&slot.grant, Grant::Quota { meter: m, .. } if m == meter) {
                slot.used = used;
            }
        }
    }

    /// The meter of `feature`, if it is a quota.
    pub fn meter(&self, feature: &str) -> Option<&str> {
        match self.slot(feature).map(|slot| &slot.grant) {
            Some(Grant::Quota { meter, .. }) => Some(meter),
            _ => None,
        }
    }
}

/// How long usage the server accepted is still added to its figure, when no newer figure came
/// (a repeated id changes nothing, so no figure follows it): longer than the stream's
/// coalescing (100 ms by default) and its delivery.
const ACCEPTED_GRACE: Duration = Duration::from_secs(5);

/// This process's usage of one tenant's meter that the server's figures may not hold yet.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Local {
    /// Recorded, not yet accepted by the server.
    pending: Decimal,
    /// Accepted by the server, not yet in a figure the stream sent.
    accepted: Decimal,
    /// When usage was last accepted.
    accepted_at: Option<Instant>,
}

impl Local {
    fn counted(&self) -> Decimal {
        let recent = self
            .accepted_at
            .is_some_and(|at| at.elapsed() < ACCEPTED_GRACE);
        self.pending + if recent { self.accepted } else { Decimal::ZERO }
    }
}

/// What an event did, for the stream's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Nothing,
    /// `hello`: the server's heartbeat interval.
    Hello {
        heartbeat: Duration,
    },
    /// `ready`: the copy is complete.
    Ready {
        resumed: bool,
    },
    /// `bye`: the server lets the stream go.
    Bye {
        reason: String,
    },
}

#[derive(Debug, Default)]
pub struct Replica {
    tenants: HashMap<TenantKey, TenantState>,
    /// A snapshot being received (after `reset`, or on a stream opened without a cursor): it
    /// replaces `tenants` at `ready`, so checks meanwhile answer from the previous copy.
    staging: Option<HashMap<TenantKey, TenantState>>,
    fail_open: HashSet<String>,
    /// Credit-priced features (`hello`): never decided from the copy.
    credit_features: HashMap<String, CreditPrice>,
    /// Feature names, one allocation each for every tenant.
    names: HashSet<Arc<str>>,
    /// The server's `stale_after_ms`.
    pub stale_after: Option<Duration>,
    local: HashMap<(String, String), Local>,
}

#[derive(Deserialize)]
struct HelloIn {
    #[serde(default)]
    fail_open: Vec<String>,
    /// Absent from servers before credits: none then.
    #[serde(default)]
    credit_features: HashMap<String, CreditPrice>,
    stale_after_ms: Option<u64>,
    heartbeat_ms: Option<u64>,
}

#[derive(Deserialize)]
struct TenantIn {
    tenant_id: String,
    standing: String,
    synced: bool,
    features: BTreeMap<String, FeatureIn>,
    as_of: Option<String>,
    #[serde(default)]
    stale: bool,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum FeatureIn {
    Boolean {
        enabled: bool,
    },
    Quota {
        limit: Option<i64>,
        meter: String,
        used: Option<String>,
    },
}

#[derive(Deserialize)]
struct UsageIn {
    tenant_id: String,
    meter: String,
    used: String,
}

#[derive(Deserialize)]
struct TenantIdIn {
    tenant_id: String,
}

#[derive(Deserialize)]
struct ReadyIn {
    #[serde(default)]
    resumed: bool,
}

#[derive(Deserialize)]
struct ByeIn {
    reason: String,
}

fn standing(name: &str) -> Standing {
    match name {
        "subscribed" => Standing::Subscribed,
        "free" => Standing::Free,
        "inactive" => Standing::Inactive,
        // `no_subscription`, and any standing a newer server may add: fail closed.
        _ => Standing::NoSubscription,
    }
}

fn decimal(text: &str) -> Result<Decimal, String> {
    Decimal::from_str(text).map_err(|e| format!("`{text}` is not a decimal: {e}"))
}

fn parse<'a, T: Deserialize<'a>>(kind: &str, data: &'a str) -> Result<T, String> {
    serde_json::from_str(data).map_err(|e| format!("a `{kind}` event that is not valid: {e}"))
}

impl TenantIn {
    fn into_state(self, names: &mut HashSet<Arc<str>>) -> Result<(String, TenantState), String> {
        let mut slots = Vec::with_capacity(self.features.len());
        for (name, feature) in self.features {
            let (grant, used) = match feature {
                FeatureIn::Boolean { enabled } => (Grant::Boolean { enabled }, Decimal::ZERO),
                FeatureIn::Quota {
                    limit,
                    meter,
                    used: figure,
                } => {
                    let figure = figure.as_deref().map(decimal).transpose()?;
                    (Grant::Quota { limit, meter }, figure.unwrap_or_default())
                }
            };
            let feature = intern(names, name);
            slots.push(Slot {
                feature,
                grant,
                used,
            });
        }
        let state = TenantState {
            standing: standing(&self.standing),
            synced: self.synced,
            stale: self.stale,
            as_of: self.as_of.map(Arc::from),
            grants: Grants(slots.into_boxed_slice()),
        };
        Ok((self.tenant_id, state))
    }
}

fn intern(names: &mut HashSet<Arc<str>>, name: String) -> Arc<str> {
    if let Some(known) = names.get(name.as_str()) {
        return known.clone();
    }
    let name: Arc<str> = Arc::from(name);
    names.insert(name.clone());
    name
}

impl Replica {
    /// Applies one event of the stream. An event that cannot be read is an error: the stream
    /// is then read again from the last cursor rather than kept half-applied.
    pub fn apply(&mut self, event: &str, data: &str) -> Result<Applied, String> {
        match event {
            "hello" => {
                let hello: HelloIn = parse(event, data)?;
                self.fail_open = hello.fail_open.into_iter().collect();
                self.credit_features = hello.credit_features;
                self.stale_after = hello.stale_after_ms.map(Duration::from_millis);
                let heartbeat = Duration::from_millis(hello.heartbeat_ms.unwrap_or(15_000));
                return Ok(Applied::Hello { heartbeat });
            }
            "reset" => self.staging = Some(HashMap::new()),
            "tenant" => {
                let tenant = parse::<TenantIn>(event, data)?;
                let (tenant, state) = tenant.into_state(&mut self.names)?;
                self.forget_accepted(&tenant);
                let key = TenantKey::new(tenant);
                match &mut self.staging {
                    Some(staging) => staging.insert(key, state),
                    None => self.tenants.insert(key, state),
                };
            }
            "removed" => {
                let TenantIdIn { tenant_id } = parse(event, data)?;
                self.tenants.remove(tenant_id.as_bytes());
                if let Some(staging) = &mut self.staging {
                    staging.remove(tenant_id.as_bytes());
                }
            }
            "usage" => {
                let usage: UsageIn = parse(event, data)?;
                let used = decimal(&usage.used)?;
                let key = (usage.tenant_id, usage.meter);
                if let Some(local) = self.local.get_mut(&key) {
                    local.accepted = Decimal::ZERO;
                }
                if let Some(state) = self.tenants.get_mut(key.0.as_bytes()) {
                    state.grants.set_used(&key.1, used);
                }
            }
            "ready" => {
                let ReadyIn { resumed } = parse(event, data)?;
                if let Some(staging) = self.staging.take() {
                    self.tenants = staging;
                }
                return Ok(Applied::Ready { resumed });
            }
            "bye" => {
                let ByeIn { reason } = parse(event, data)?;
                return Ok(Applied::Bye { reason });
            }
            _ => {} // newer servers may send more: tolerated
        }
        Ok(Applied::Nothing)
    }

    /// A stream begins: one opened without a cursor sends a whole snapshot, which replaces
    /// the copy at `ready`; one that resumes applies in place.
    pub fn begin(&mut self, snapshot: bool) {
        self.staging = snapshot.then(HashMap::new);
    }

    /// A figure sent by the server counts everything it accepted before: what this process
    /// sent is no longer added on top.
    fn forget_accepted(&mut self, tenant: &str) {
        for ((t, _), local) in self.local.iter_mut() {
            if t == tenant {
                local.accepted = Decimal::ZERO;
            }
        }
    }

    /// Usage recorded here, counted at once (until the server has it).
    pub fn add_pending(&mut self, tenant: &str, meter: &str, quantity: Decimal) {
        let key = (tenant.to_owned(), meter.to_owned());
        self.local.entry(key).or_default().pending += quantity;
    }

    /// The server answered a batch: `accepted` usage moves from pending to accepted (counted
    /// until the stream's next figure), refused usage is no longer counted.
    pub fn settle(&mut self, tenant: &str, meter: &str, quantity: Decimal, accepted: bool) {
        let key = (tenant.to_owned(), meter.to_owned());
        let Some(local) = self.local.get_mut(&key) else {
            return;
        };
        local.pending -= quantity;
        if accepted {
            local.accepted += quantity;
            local.accepted_at = Some(Instant::now());
        }
        if local.pending.is_zero() && local.accepted.is_zero() {
            self.local.remove(&key);
        }
    }

    /// The server's own figure after a check-and-record: it holds everything accepted so far.
    pub fn set_used(&mut self, tenant: &str, meter: &str, used: Decimal) {
        if let Some(state) = self.tenants.get_mut(tenant.as_bytes()) {
            state.grants.set_used(meter, used);
            if let Some(local) = self.local.get_mut(&(tenant.to_owned(), meter.to_owned())) {
                local.accepted = Decimal::ZERO;
            }
        }
    }

    pub fn tenant(&self, tenant: &str) -> Option<&TenantState> {
        self.tenants.get(tenant.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    /// How `feature` burns credits, if it is credit-priced.
    pub fn credit_price(&self, feature: &str) -> Option<&CreditPrice> {
        self.credit_features.get(feature)
    }

    /// The check answered from the copy; `None` for a tenant it does not hold. A
    /// credit-priced feature is not allowed, [`reason::NEEDS_SERVER`](crate::reason): the copy
    /// has no live balance, and an answer from it could spend credits the tenant no longer has.
    pub fn check(&self, tenant: &str, feature: &str, quantity: Decimal) -> Option<Check> {
        let state = self.tenants.get(tenant.as_bytes())?;
        if self.credit_features.contains_key(feature) {
            return Some(Check {
                allowed: false,
                reason: crate::reason::NEEDS_SERVER.into(),
                limit: None,
                used: None,
                remaining: None,
                as_of: state.as_of.clone(),
                stale: state.stale,
                recorded: None,
                credits: None,
            });
        }
        let rules = TenantRules {
            standing: state.standing,
            synced: state.synced,
            features: &state.grants,
        };
        let verdict = rules.decide(
            feature,
            quantity,
            || self.fail_open.contains(feature),
            |meter| self.used(tenant, state.grants.used(feature), meter),
        );
        Some(Check {
            allowed: verdict.allowed,
            reason: verdict.reason.into(),
            limit: verdict.limit,
            used: verdict.used,
            remaining: verdict.remaining,
            as_of: state.as_of.clone(),
            stale: state.stale,
            recorded: None,
            credits: None,
        })
    }

    /// The server's figure plus what this process recorded that the figure may lack.
    fn used(&self, tenant: &str, server: Decimal, meter: &str) -> Decimal {
        if self.local.is_empty() {
            return server;
        }
        let key = (tenant.to_owned(), meter.to_owned());
        server + self.local.get(&key).map_or(Decimal::ZERO, Local::counted)
    }
}

#[cfg(test)]
mod tests;
