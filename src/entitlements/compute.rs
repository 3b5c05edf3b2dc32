//! A tenant's read model, computed from the catalog and the mirror. Features come from, later
//! winning: the free plan (without a granting subscription); for each price of a granting
//! subscription, the catalog's plan for its product, lookup key or id, then the product's and the
//! price's metadata; the customer's metadata; the customer's active Stripe entitlements.

use std::collections::BTreeMap;

use super::model::{self, FeatureValue, Features, metadata_features};
use super::{Entitlements, Standing, TenantModel};
use crate::domain::{Subscription, TenantId};
use crate::metering::calendar_month;
use crate::store::{StoreError, now_ms};
use crate::stripe::{ObjectKind, objects};

impl Entitlements {
    /// Computes a tenant's model from the catalog and the mirror.
    pub async fn compute(&self, tenant_id: &str) -> Result<Option<TenantModel>, StoreError> {
        let Ok(id) = TenantId::parse(tenant_id) else {
            return Ok(None);
        };
        let Some(tenant) = self.db.tenants().get(&id).await? else {
            return Ok(None);
        };
        let now = now_ms();
        let mut model = TenantModel {
            tenant_id: tenant.tenant_id.clone(),
            plan: None,
            status: None,
            standing: Standing::NoSubscription,
            features: BTreeMap::new(),
            period: calendar_month(now),
            as_of: None,
            invalid: Vec::new(),
            expires_at: i64::MAX,
        };
        let mut sources: Vec<Features> = Vec::new();
        let mut customer_metadata = None;
        if let Some(customer_id) = &tenant.customer_id {
            customer_metadata = self.customer(customer_id, &mut model).await?;
            let subscription = crate::mirror::current_subscription(&self.db, customer_id).await?;
            if let Some((row, sub)) = &subscription {
                model.as_of = model.as_of.max(Some(row.synced_at));
                self.subscription_sources(sub, now, &mut model, &mut sources)
                    .await?;
            }
        }
        let plans = self.plans();
        let free = plans.plans.get("free");
        if let Some(free) = free.filter(|_| model.standing != Standing::Subscribed) {
            model.standing = Standing::Free;
            model.plan = Some("free".to_owned());
            sources.insert(0, free.clone());
        }
        if let Some(metadata) = &customer_metadata {
            let (features, invalid) = metadata_features(metadata);
            model.invalid.extend(invalid);
            sources.push(features);
        }
        if let Some(customer_id) = &tenant.customer_id {
            sources.extend(self.active_entitlements(customer_id).await?);
        }
        if matches!(
            model.standing,
            Standing::Inactive | Standing::NoSubscription
        ) {
            // No plan: a customer override alone does not open a plan's features.
            sources.clear();
        }
        self.note_invalid(&model);
        model.features = model::grants(&sources, |f| plans.meter_of(f));
        model.expires_at = model.expires_at.min(model.period.1);
        Ok(Some(model))
    }

    /// The customer's metadata, and when its state was confirmed (into `model.as_of`).
    async fn customer(
        &self,
        customer_id: &str,
        model: &mut TenantModel,
    ) -> Result<Option<Vec<(String, String)>>, StoreError> {
        let kind = ObjectKind::Customer.as_str();
        let Some(row) = self.db.mirror().get(kind, customer_id).await? else {
            return Ok(None);
        };
        model.as_of = Some(row.synced_at);
        let object = serde_json::from_str(&row.payload).ok();
        Ok(object.map(|customer| objects::metadata(&customer)))
    }

    /// The subscription's status, period and standing into `model`; when it grants access, the
    /// features of each of its prices into `sources`.
    async fn subscription_sources(
        &self,
        sub: &Subscription,
        now: i64,
        model: &mut TenantModel,
        sources: &mut Vec<Features>,
    ) -> Result<(), StoreError> {
        model.status = Some(sub.status.clone());
        if let (Some(start), Some(end)) = (sub.current_period_start, sub.current_period_end) {
            model.period = (start * 1000, end * 1000);
        }
        if let (Some(start), "past_due") = (sub.current_period_start, sub.status.as_str()) {
            let grace_end = start * 1000 + self.policy.past_due_grace.as_millis() as i64;
            if grace_end > now {
                model.expires_at = grace_end;
            }
        }
        if !self.grants_access(&sub.status, sub.current_period_start, now) {
            model.standing = Standing::Inactive;
            return Ok(());
        }
        model.standing = Standing::Subscribed;
        for price_id in sub.items.iter().filter_map(|item| item.price.as_deref()) {
            self.price_sources(price_id, sources, model).await?;
        }
        Ok(())
    }

    /// Catalog entries for the price (by id, lookup key or product), then product and price
    /// metadata.
    async fn price_sources(
        &self,
        price_id: &str,
        sources: &mut Vec<Features>,
        model: &mut TenantModel,
    ) -> Result<(), StoreError> {
        let mirror = self.db.mirror();
        let price = match mirror.get(ObjectKind::Price.as_str(), price_id).await? {
            Some(row) => Some(row),
            None => mirror.get(ObjectKind::Plan.as_str(), price_id).await?,
        };
        let price: Option<serde_json::Value> =
            price.and_then(|row| serde_json::from_str(&row.payload).ok());
        let (product_id, lookup_key) = price.as_ref().map(objects::price_links).unwrap_or_default();
        for key in [product_id.clone(), lookup_key, Some(price_id.to_owned())]
            .into_iter()
            .flatten()
        {
            if let Some(plan) = self.plans().plans.get(&key) {
                model.plan.get_or_insert(key.clone());
                sources.push(plan.clone());
            }
        }
        model.plan.get_or_insert(price_id.to_owned());
        let product = match product_id {
            Some(id) => mirror.get(ObjectKind::Product.as_str(), &id).await?,
            None => None,
        };
        let product = product.and_then(|row| serde_json::from_str(&row.payload).ok());
        for object in [product, price].into_iter().flatten() {
            let (features, invalid) = metadata_features(&objects::metadata(&object));
            model.invalid.extend(invalid);
            sources.push(features);
        }
        Ok(())
    }

    /// The customer's active Stripe entitlements, as boolean features.
    async fn active_entitlements(&self, customer_id: &str) -> Result<Option<Features>, StoreError> {
        let kind = ObjectKind::ActiveEntitlements.as_str();
        let Some(row) = self.db.mirror().get(kind, customer_id).await? else {
            return Ok(None);
        };
        let summary = serde_json::from_str(&row.payload).unwrap_or_default();
        let keys = objects::active_entitlement_keys(&summary);
        Ok(Some(
            keys.into_iter()
                .map(|key| (key, FeatureValue::Enabled(true)))
                .collect(),
        ))
    }

    /// Logs the model's ignored metadata values and keeps them for `/v1/sync/status`.
    fn note_invalid(&self, model: &TenantModel) {
        for problem in &model.invalid {
            tracing::warn!(tenant = %model.tenant_id, problem = %problem, "invalid entitlement metadata ignored");
        }
        let mut invalid = self.invalid.lock().expect("invalid lock");
        if model.invalid.is_empty() {
            invalid.remove(&model.tenant_id);
        } else {
            invalid.insert(model.tenant_id.clone(), model.invalid.clone());
        }
    }
}
