//! Entitlements: "may tenant T do this?" answered from memory. A read model per tenant (plan,
//! status, grants) is computed from the catalog and the mirror by the code that changes them,
//! and usage comes from the metering counters, so a warm check touches neither the vendor nor
//! the database.

mod compute;
pub mod model;
pub mod stream;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rust_decimal::Decimal;

use crate::catalog::Catalog;
use crate::metering::Metering;
use crate::store::{Db, StoreError, now_ms};
use model::{FeatureValue, Features, Grant};

// The decision itself lives in its own crate, shared with the client.
pub use billsync_rules::Standing;
use billsync_rules::{Ceiling, TenantRules, Verdict, reason};

/// The plan catalog's features and plans, typed.
#[derive(Debug, Clone, Default)]
pub struct PlanCatalog {
    /// Quota features and the meter each counts (default: the meter of the same name).
    pub meters: BTreeMap<String, String>,
    /// Features that fail open while the tenant's vendor state is unknown.
    pub fail_open: Vec<String>,
    /// Plans by key: a price, plan or product id, a lookup key, or `free`.
    pub plans: BTreeMap<String, Features>,
    /// Credit-priced features, by name (see `crate::credits`).
    pub credits: BTreeMap<String, crate::credits::CreditFeature>,
}

impl PlanCatalog {
    pub fn from_catalog(catalog: &Catalog) -> Result<Self, String> {
        let mut parsed = Self {
            credits: catalog.credits.clone(),
            ..Self::default()
        };
        for (name, def) in &catalog.features {
            let table = def
                .as_table()
                .ok_or_else(|| format!("features.{name} must be a table"))?;
            if let Some(meter) = table.get("meter") {
                let meter = meter
                    .as_str()
                    .ok_or_else(|| format!("features.{name}.meter must be a string"))?;
                parsed.meters.insert(name.clone(), meter.to_owned());
            }
            match table.get("fail_open").map(toml::Value::as_bool) {
                None | Some(Some(false)) => {}
                Some(Some(true)) => parsed.fail_open.push(name.clone()),
                Some(None) => {
                    return Err(format!("features.{name}.fail_open must be true or false"));
                }
            }
        }
        for (key, plan) in &catalog.plans {
            let features = plan
                .get("features")
                .and_then(toml::Value::as_table)
                .ok_or_else(|| format!("plans.{key} needs a `features` table"))?;
            let mut typed = Features::new();
            for (feature, value) in features {
                let value = FeatureValue::from_toml(value)
                    .map_err(|e| format!("plans.{key}.features.{feature}: {e}"))?;
                typed.insert(feature.clone(), value);
            }
            parsed.plans.insert(key.clone(), typed);
        }
        Ok(parsed)
    }

    fn meter_of(&self, feature: &str) -> String {
        self.meters
            .get(feature)
            .cloned()
            .unwrap_or_else(|| feature.to_owned())
    }
}

/// How entitlements treat subscription states and staleness.
#[derive(Debug, Clone)]
pub struct Policy {
    pub granting_statuses: Vec<String>,
    pub past_due_grace: Duration,
    pub stale_after: Duration,
}

/// One tenant's read model.
#[derive(Debug, Clone)]
pub struct TenantModel {
    pub tenant_id: String,
    /// The catalog plan key or price id that set the features (`free`, or none).
    pub plan: Option<String>,
    pub status: Option<String>,
    pub standing: Standing,
    pub features: BTreeMap<String, Grant>,
    /// The billing period quotas count, `[start, end)` in Unix ms.
    pub period: (i64, i64),
    /// When the vendor state was last confirmed (Unix ms); `None`: never synced.
    pub as_of: Option<i64>,
    /// Metadata values that were not understood (reported, ignored).
    pub invalid: Vec<String>,
    /// When time alone changes the answer (the period ends, a past_due grace runs out): the
    /// model is recomputed on the first check after it.
    pub expires_at: i64,
}

impl TenantModel {
    /// What the shared rules need of this model.
    pub fn rules(&self) -> TenantRules<'_> {
        TenantRules {
            standing: self.standing,
            synced: self.as_of.is_some(),
            features: &self.features,
        }
    }
}

/// Shared signal of whether vendor sync is working, set by the sync workers.
#[derive(Debug, Default)]
pub struct SyncHealth {
    failing: AtomicBool,
    confirmed_at: AtomicI64,
}

impl SyncHealth {
    /// A pass that read the vendor's full state (a sweep) succeeded now.
    pub fn confirmed(&self, at_ms: i64) {
        self.confirmed_at.fetch_max(at_ms, Ordering::Relaxed);
        self.failing.store(false, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failing.store(true, Ordering::Relaxed);
    }

    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    pub fn confirmed_at(&self) -> Option<i64> {
        Some(self.confirmed_at.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }
}

/// A check's answer. Built without allocating; formatted only when serialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// `ok`, `unknown_tenant`, `no_subscription`, `subscription_inactive`, `feature_not_in_plan`,
    /// or `limit_exceeded`. A tenant never synced fails closed as `no_subscription` (with
    /// `stale: true`) unless the feature fails open.
    pub reason: &'static str,
    /// `null`: unlimited, or not a quota.
    pub limit: Option<i64>,
    /// Exact decimals, serialised as strings.
    pub used: Option<Decimal>,
    pub remaining: Option<Decimal>,
    #[serde(serialize_with = "rfc3339_ms")]
    pub as_of: Option<i64>,
    pub stale: bool,
}

fn rfc3339_ms<S: serde::Serializer>(at: &Option<i64>, serializer: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(ms) => serializer.serialize_str(&crate::domain::rfc3339(*ms)),
        None => serializer.serialize_none(),
    }
}

impl Decision {
    pub const UNKNOWN_TENANT: Decision = Decision {
        allowed: false,
        reason: reason::UNKNOWN_TENANT,
        limit: None,
        used: None,
        remaining: None,
        as_of: None,
        stale: false,
    };

    /// The rules' verdict, with how fresh the data it was decided on is.
    pub fn new(verdict: Verdict, as_of: Option<i64>, stale: bool) -> Self {
        let Verdict {
            allowed,
            reason,
            limit,
            used,
            remaining,
        } = verdict;
        Self {
            allowed,
            reason,
            limit,
            used,
            remaining,
            as_of,
            stale,
        }
    }
}

#[derive(Clone)]
pub struct Entitlements {
    pub db: Db,
    /// Swapped whole by a catalog reload.
    plans: Arc<RwLock<Arc<PlanCatalog>>>,
    pub metering: Metering,
    pub policy: Policy,
    pub health: Arc<SyncHealth>,
    /// Whether a vendor is configured at all (without one, nothing is ever confirmed).
    pub vendor_configured: bool,
    models: Arc<RwLock<HashMap<String, Arc<TenantModel>>>>,
    /// The latest metadata values that could not be read, by tenant (for `/v1/sync/status`).
    invalid: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    /// Counts invalidations: a model computed while one happened may predate it and is not
    /// kept.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Entitlements {
    pub fn new(
        db: Db,
        plans: PlanCatalog,
        metering: Metering,
        policy: Policy,
        health: Arc<SyncHealth>,
        vendor_configured: bool,
    ) -> Self {
        Self {
            db,
            plans: Arc::new(RwLock::new(Arc::new(plans))),
            metering,
            policy,
            health,
            vendor_configured,
            models: Arc::default(),
            invalid: Arc::default(),
            generation: Arc::default(),
        }
    }

    /// Tenants whose vendor metadata holds values that were ignored, with the problems.
    pub fn invalid_metadata(&self) -> BTreeMap<String, Vec<String>> {
        self.invalid.lock().expect("invalid lock").clone()
    }

    pub fn plans(&self) -> Arc<PlanCatalog> {
        self.plans.read().expect("plans lock").clone()
    }

    /// Takes a new catalog's features and plans; every model is recomputed on its next check.
    pub fn reload(&self, catalog: &Catalog) -> Result<(), String> {
        let plans = PlanCatalog::from_catalog(catalog)?;
        *self.plans.write().expect("plans lock") = Arc::new(plans);
        self.invalidate_all();
        Ok(())
    }

    /// Forgets one tenant's model; the next check recomputes it.
    pub fn invalidate(&self, tenant_id: &str) {
        let mut models = self.models.write().expect("models lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        models.remove(tenant_id);
    }

    /// Forgets every model (a product or price changed, or the catalog was reloaded).
    pub fn invalidate_all(&self) {
        let mut models = self.models.write().expect("models lock");
        self.generation.fetch_add(1, Ordering::AcqRel);
        models.clear();
    }

    /// The tenant's model from memory, or computed from the database (a cold tenant).
    pub async fn model(&self, tenant_id: &str) -> Result<Option<Arc<TenantModel>>, StoreError> {
        let now = now_ms();
        let warm = {
            let models = self.models.read().expect("models lock");
            models
                .get(tenant_id)
                .filter(|m| now < m.expires_at)
                .cloned()
        };
        if warm.is_some() {
            return Ok(warm);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some(model) = self.compute(tenant_id).await? else {
            return Ok(None);
        };
        let model = Arc::new(model);
        let mut models = self.models.write().expect("models lock");
        // A change announced while it was computed may be missing from it: answer with it,
        // but compute again next time.
        if self.generation.load(Ordering::Acquire) == generation {
            models.insert(tenant_id.to_owned(), model.clone());
        }
        Ok(Some(model))
    }

    fn grants_access(&self, status: &str, period_start: Option<i64>, now: i64) -> bool {
        if self.policy.granting_statuses.iter().any(|s| s == status) {
            return true;
        }
        // past_due keeps access for a grace period, counted from the period's start (when the
        // renewal payment was attempted).
        status == "past_due"
            && period_start.is_some_and(|start| {
                now < start * 1000 + self.policy.past_due_grace.as_millis() as i64
            })
    }

    /// When the answer was last confirmed with the vendor, and whether that is too long ago.
    pub fn freshness(&self, model: &TenantModel, now: i64) -> (Option<i64>, bool) {
        let as_of = model
            .as_of
            .map(|t| t.max(self.health.confirmed_at().unwrap_or(0)));
        let stale = match as_of {
            None => true,
            Some(t) => now - t > self.policy.stale_after.as_millis() as i64,
        } || self.health.is_failing()
            || !self.vendor_configured;
        (as_of, stale)
    }

    /// The used amount of a quota in the model's period.
    pub fn used(&self, model: &TenantModel, meter: &str) -> Decimal {
        let (from, to) = model.period;
        self.metering
            .counters
            .period_value(&model.tenant_id, meter, from, to)
            .unwrap_or(Decimal::ZERO)
    }

    /// Decides one check, without recording anything.
    pub fn decide(
        &self,
        model: &TenantModel,
        feature: &str,
        quantity: Decimal,
        now: i64,
    ) -> Decision {
        self.decide_with_used(model, feature, quantity, now, None)
    }

    /// [`Self::decide`] with the quota's `used` given (read from the database when several
    /// replicas record usage) instead of taken from this process's counters.
    pub fn decide_with_used(
        &self,
        model: &TenantModel,
        feature: &str,
        quantity: Decimal,
        now: i64,
        used: Option<Decimal>,
    ) -> Decision {
        let (as_of, stale) = self.freshness(model, now);
        let verdict = model.rules().decide(
            feature,
            quantity,
            || self.fails_open(feature),
            |meter| used.unwrap_or_else(|| self.used(model, meter)),
        );
        Decision::new(verdict, as_of, stale)
    }

    /// The most the feature's meter figure may be for `quantity` more to be allowed, by the
    /// same rules as [`Self::decide_with_used`] (which allows exactly when the ceiling admits
    /// `used`): what check-and-record compares the usage log with, under its lock.
    pub fn ceiling(&self, model: &TenantModel, feature: &str, quantity: Decimal) -> Ceiling {
        model
            .rules()
            .ceiling(feature, quantity, || self.fails_open(feature))
    }

    /// Whether the catalog lets `feature` fail open while a tenant's vendor state is unknown.
    fn fails_open(&self, feature: &str) -> bool {
        self.plans().fail_open.iter().any(|f| f == feature)
    }

    /// A check from memory alone: `None` when the tenant's model is not loaded (cold).
    pub fn check_warm(
        &self,
        tenant: &str,
        feature: &str,
        quantity: Decimal,
        now: i64,
    ) -> Option<Decision> {
        let models = self.models.read().expect("models lock");
        let model = models.get(tenant).filter(|m| now < m.expires_at)?;
        Some(self.decide(model, feature, quantity, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_open_must_be_a_boolean() {
        let parse = |value: &str| {
            let text = format!("[features.api_calls]\nfail_open = {value}\n");
            PlanCatalog::from_catalog(&Catalog::parse(&text).unwrap())
        };
        assert_eq!(parse("true").unwrap().fail_open, ["api_calls"]);
        assert!(parse("false").unwrap().fail_open.is_empty());
        let refused = parse("\"true\"").unwrap_err();
        assert_eq!(
            refused,
            "features.api_calls.fail_open must be true or false"
        );
    }
}
