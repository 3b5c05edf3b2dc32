//! Drift: the mirror's subscriptions against a fresh fetch from the vendor (status, items,
//! quantities, period). A difference is reported and, unless the run is a dry run, repaired by
//! storing the vendor's state in the inbox for the applier.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{Finding, Item};
use crate::domain::{Subscription, rfc3339_secs};
use crate::error::WorkError;
use crate::mirror::observe;
use crate::store::{Db, NewEvent, Source};
use crate::stripe::objects;
use crate::stripe::{BillingVendor, Fetched, ListFilter, ObjectKind};
use crate::sync::events;

/// Compares the subscriptions of each `(tenant, customer)`; returns the items and the inbox
/// rows that repair them.
pub async fn check(
    db: &Db,
    vendor: &dyn BillingVendor,
    customers: &[(String, String)],
) -> Result<(Vec<Item>, Vec<NewEvent>), WorkError> {
    let mut items = Vec::new();
    let mut repairs = Vec::new();
    for (tenant, customer) in customers {
        let filter = ListFilter {
            customer: Some(customer.clone()),
            all_statuses: true,
        };
        // Each state with when the request that returned it was sent: its version.
        let list = vendor.list(ObjectKind::Subscription, &filter, None);
        let (page, listed_at) = observe(db, list).await?;
        let mut at_vendor: Vec<(Value, i64)> =
            page.data.into_iter().map(|s| (s, listed_at)).collect();
        let listed: BTreeSet<String> = at_vendor
            .iter()
            .filter_map(|(s, _)| objects::id_of(&s["id"]))
            .collect();
        let local = db
            .mirror()
            .of_customer(customer, ObjectKind::Subscription.as_str())
            .await?;
        // A mirrored subscription the list leaves out: fetch it by id.
        for row in local.iter().filter(|r| !listed.contains(&r.object_id)) {
            let fetch = vendor.fetch(ObjectKind::Subscription, &row.object_id);
            if let (Fetched::Found(object), at) = observe(db, fetch).await? {
                at_vendor.push((object, at));
            }
        }
        for (object, fetched_at) in at_vendor {
            let Some(id) = objects::id_of(&object["id"]) else {
                continue;
            };
            let mirrored = local
                .iter()
                .find(|r| r.object_id == id && !r.deleted)
                .and_then(|r| serde_json::from_str::<Value>(&r.payload).ok())
                .map(|v| objects::subscription(&v));
            let fresh = objects::subscription(&object);
            let differences = compare(mirrored.as_ref(), &fresh);
            if differences.is_empty() {
                continue;
            }
            items.push(Item {
                repair: None,
                area: "drift",
                finding: Finding::Drift,
                tenant_id: Some(tenant.clone()),
                detail: json!({
                    "object": "subscription",
                    "object_id": id,
                    "customer_id": customer,
                    "differences": differences,
                    "cause": if mirrored.is_none() {
                        "the mirror does not have this subscription"
                    } else {
                        "the mirror differs from the vendor's current state"
                    },
                    "evidence": {"subscription": id},
                }),
            });
            repairs.extend(events::from_fetched_state(
                ObjectKind::Subscription,
                &object,
                Source::Reconcile,
                fetched_at,
            ));
        }
    }
    Ok((items, repairs))
}

/// The fields that differ, as `{field: {"mirror": .., "vendor": ..}}`.
fn compare(mirror: Option<&Subscription>, vendor: &Subscription) -> serde_json::Map<String, Value> {
    let view = |s: &Subscription| {
        let mut items: Vec<String> = s
            .items
            .iter()
            .map(|i| {
                format!(
                    "{} x {}",
                    i.price.as_deref().unwrap_or("?"),
                    i.quantity
                        .map(|q| q.normalize().to_string())
                        .unwrap_or_default()
                )
            })
            .collect();
        items.sort();
        [
            ("status", json!(s.status)),
            ("items", json!(items)),
            (
                "current_period_start",
                json!(s.current_period_start.map(rfc3339_secs)),
            ),
            (
                "current_period_end",
                json!(s.current_period_end.map(rfc3339_secs)),
            ),
            ("cancel_at_period_end", json!(s.cancel_at_period_end)),
        ]
    };
    let fresh = view(vendor);
    let old = mirror.map(view);
    fresh
        .into_iter()
        .enumerate()
        .filter_map(|(i, (field, value))| {
            let before = old.as_ref().map(|o| o[i].1.clone()).unwrap_or(Value::Null);
            (before != value)
                .then(|| (field.to_owned(), json!({"mirror": before, "vendor": value})))
        })
        .collect()
}
