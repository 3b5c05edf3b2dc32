//! Reading Stripe's JSON tolerantly: only the fields billsync needs, wherever the API version
//! put them, and never an error for a field that moved or is unknown. The raw object is kept
//! alongside, so nothing read here is the only copy.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::{ObjectKind, Page};
use crate::domain::{BillingPeriod, Subscription, SubscriptionItem};

mod billing;
mod credits;

pub use billing::{charge_refunds, credit_note, invoice, invoice_payment_intents, payment};
pub use credits::credit_grant;

/// The collection path segment of a kind (`/v1/{collection}`).
pub fn collection(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Customer => "customers",
        ObjectKind::Product => "products",
        ObjectKind::Price => "prices",
        ObjectKind::Plan => "plans",
        ObjectKind::Subscription => "subscriptions",
        ObjectKind::SubscriptionSchedule => "subscription_schedules",
        ObjectKind::Invoice => "invoices",
        ObjectKind::PaymentIntent => "payment_intents",
        ObjectKind::Charge => "charges",
        ObjectKind::CreditNote => "credit_notes",
        ObjectKind::ActiveEntitlements => "entitlements/active_entitlements",
        ObjectKind::CreditGrant => "billing/credit_grants",
    }
}

/// A list response (`{"object":"list","data":[...],"has_more":...}`), or `None` if it is not one.
pub fn page(body: Value) -> Option<Page> {
    let has_more = body["has_more"].as_bool().unwrap_or(false);
    match body {
        Value::Object(mut map) => match map.remove("data") {
            Some(Value::Array(data)) => Some(Page { data, has_more }),
            _ => None,
        },
        _ => None,
    }
}

/// The summary object billsync stores for a customer's active entitlements.
pub fn entitlement_summary(customer: &str, entitlements: Vec<Value>) -> Value {
    json!({
        "object": "entitlements.active_entitlement_summary",
        "customer": customer,
        "entitlements": { "object": "list", "data": entitlements, "has_more": false },
    })
}

/// Which mirrored object an event's `data.object` is about: itself for the kinds billsync
/// mirrors; the charge for a refund or a dispute; `None` for anything else (stored, not applied).
pub fn target(object: &Value) -> Option<(ObjectKind, String)> {
    let object_type = object["object"].as_str()?;
    let kind = match object_type {
        "customer" => ObjectKind::Customer,
        "product" => ObjectKind::Product,
        "price" => ObjectKind::Price,
        "plan" => ObjectKind::Plan,
        "subscription" => ObjectKind::Subscription,
        "subscription_schedule" => ObjectKind::SubscriptionSchedule,
        "invoice" => ObjectKind::Invoice,
        "payment_intent" => ObjectKind::PaymentIntent,
        "charge" => ObjectKind::Charge,
        "credit_note" => ObjectKind::CreditNote,
        "billing.credit_grant" => ObjectKind::CreditGrant,
        "entitlements.active_entitlement_summary" => {
            return Some((ObjectKind::ActiveEntitlements, id_of(&object["customer"])?));
        }
        "refund" | "dispute" => return Some((ObjectKind::Charge, id_of(&object["charge"])?)),
        _ => return None,
    };
    Some((kind, id_of(&object["id"])?))
}

/// An id given as a string or as an expanded object with an `id`.
pub fn id_of(value: &Value) -> Option<String> {
    match value {
        Value::String(id) if !id.is_empty() => Some(id.clone()),
        Value::Object(map) => map.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// The customer an object belongs to, if any.
pub fn customer_of(kind: ObjectKind, object: &Value) -> Option<String> {
    match kind {
        ObjectKind::Customer => id_of(&object["id"]),
        ObjectKind::Product | ObjectKind::Price | ObjectKind::Plan => None,
        _ => id_of(&object["customer"]),
    }
}

/// An object's metadata, each value as a string (another JSON value as its JSON text).
pub fn metadata(object: &Value) -> Vec<(String, String)> {
    let Some(map) = object["metadata"].as_object() else {
        return Vec::new();
    };
    map.iter()
        .map(|(key, value)| {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (key.clone(), text)
        })
        .collect()
}

/// A price's (or legacy plan's) product and lookup key.
pub fn price_links(price: &Value) -> (Option<String>, Option<String>) {
    (id_of(&price["product"]), string(&price["lookup_key"]))
}

/// The lookup keys of the features in a customer's active entitlement summary.
pub fn active_entitlement_keys(summary: &Value) -> Vec<String> {
    let entitlements = summary["entitlements"]["data"].as_array();
    entitlements
        .into_iter()
        .flatten()
        .filter_map(|e| string(&e["lookup_key"]))
        .collect()
}

/// The object's status where it has one (subscriptions, invoices, payments, credit notes).
pub fn status_of(object: &Value) -> Option<String> {
    object["status"].as_str().map(str::to_owned)
}

/// Whether Stripe says the object is deleted (`"deleted": true` stubs).
pub fn is_deleted(object: &Value) -> bool {
    object["deleted"] == Value::Bool(true)
}

/// An integer field that may be absent, null, or (in odd fakes) a numeric string.
pub fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A quantity given as an integer, a decimal string (`quantity_decimal`) or absent.
fn quantity(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .map(Decimal::from)
            .or_else(|| Decimal::from_str(&n.to_string()).ok()),
        Value::String(s) => Decimal::from_str(s).ok(),
        _ => None,
    }
}

fn string(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

/// The price (or legacy plan) an item or line is for, wherever this API version put it.
pub fn price_of(item: &Value) -> Option<String> {
    id_of(&item["price"])
        .or_else(|| id_of(&item["pricing"]["price_details"]["price"]))
        .or_else(|| id_of(&item["plan"]))
}

pub fn subscription(object: &Value) -> Subscription {
    let items: Vec<&Value> = object["items"]["data"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    // Older versions keep the period on the subscription; newer ones on each item.
    let period = |field: &str, pick: fn(i64, i64) -> i64| {
        int(&object[field]).or_else(|| items.iter().filter_map(|i| int(&i[field])).reduce(pick))
    };
    Subscription {
        id: id_of(&object["id"]).unwrap_or_default(),
        status: string(&object["status"]).unwrap_or_else(|| "unknown".to_owned()),
        items: items
            .iter()
            .map(|item| SubscriptionItem {
                id: id_of(&item["id"]),
                price: price_of(item),
                quantity: quantity(&item["quantity"]),
            })
            .collect(),
        current_period_start: period("current_period_start", i64::min),
        current_period_end: period("current_period_end", i64::max),
        cancel_at_period_end: object["cancel_at_period_end"].as_bool().unwrap_or(false),
        cancel_at: int(&object["cancel_at"]),
        trial_end: int(&object["trial_end"]),
        pause: string(&object["pause_collection"]["behavior"]),
        created: int(&object["created"]),
    }
}

/// The billing periods an object states: a subscription's current period; for an invoice of a
/// subscription, the usage period it bills (Stripe's `period_start`/`period_end`, which for a
/// renewal invoice are the period that just ended) with the invoice's status.
pub fn billing_periods(kind: ObjectKind, object: &Value, deleted: bool) -> Vec<BillingPeriod> {
    let period = match kind {
        ObjectKind::Subscription => {
            let s = subscription(object);
            s.current_period_start
                .zip(s.current_period_end)
                .map(|(start, end)| BillingPeriod {
                    subscription_id: s.id,
                    start,
                    end,
                    subscription_status: Some(s.status),
                    invoice: None,
                })
        }
        ObjectKind::Invoice => {
            let i = invoice(object);
            let status = if deleted {
                Some("deleted".to_owned())
            } else {
                i.status
            };
            match (i.subscription, i.period_start, i.period_end, status) {
                (Some(subscription_id), Some(start), Some(end), Some(status)) => {
                    Some(BillingPeriod {
                        subscription_id,
                        start,
                        end,
                        subscription_status: None,
                        invoice: Some((i.id, status)),
                    })
                }
                _ => None,
            }
        }
        _ => None,
    };
    // A subscription's first invoice bills no usage: its period is an instant.
    period.filter(|p| p.end > p.start).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_object_or_its_parent() {
        let sub = json!({"object": "subscription", "id": "sub_1", "customer": "cus_1"});
        assert_eq!(
            target(&sub),
            Some((ObjectKind::Subscription, "sub_1".into()))
        );
        let refund = json!({"object": "refund", "id": "re_1", "charge": {"id": "ch_9"}});
        assert_eq!(target(&refund), Some((ObjectKind::Charge, "ch_9".into())));
        let summary =
            json!({"object": "entitlements.active_entitlement_summary", "customer": "cus_2"});
        assert_eq!(
            target(&summary),
            Some((ObjectKind::ActiveEntitlements, "cus_2".into()))
        );
        let upcoming = json!({"object": "invoice", "customer": "cus_1"});
        assert_eq!(target(&upcoming), None, "invoice.upcoming has no id");
        assert_eq!(target(&json!({"object": "card", "id": "card_1"})), None);
        assert_eq!(target(&json!("not an object")), None);
    }

    #[test]
    fn customers_come_as_ids_or_expanded_objects() {
        let a = json!({"customer": "cus_1"});
        let b = json!({"customer": {"id": "cus_1", "object": "customer"}});
        assert_eq!(customer_of(ObjectKind::Invoice, &a), Some("cus_1".into()));
        assert_eq!(customer_of(ObjectKind::Invoice, &b), Some("cus_1".into()));
        assert_eq!(customer_of(ObjectKind::Price, &a), None);
    }

    #[test]
    fn subscriptions_read_current_and_legacy_shapes() {
        let fixtures: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/stripe_subscription_current.json"
        ))
        .unwrap();
        let current = subscription(&fixtures);
        assert_eq!(
            current.items[0].price.as_deref(),
            Some("price_1PgafmB7WZ01zgkW6dKueIc5")
        );
        assert_eq!(
            current.current_period_end,
            Some(976287773),
            "period read from the item"
        );
        let legacy = json!({"id": "sub_9", "status": "active", "current_period_start": 10, "current_period_end": 20,
            "items": {"data": [{"id": "si_1", "plan": {"id": "gold", "object": "plan"}, "quantity": 3}]}});
        let legacy = subscription(&legacy);
        assert_eq!(legacy.items[0].price.as_deref(), Some("gold"));
        assert_eq!(legacy.items[0].quantity, Some(Decimal::from(3)));
        assert_eq!(
            (legacy.current_period_start, legacy.current_period_end),
            (Some(10), Some(20))
        );
    }

    #[test]
    fn billing_periods_come_from_subscriptions_and_renewal_invoices() {
        let sub = json!({"id": "sub_1", "status": "active", "items": {"data": [
            {"id": "si_1", "current_period_start": 100, "current_period_end": 200}]}});
        let periods = billing_periods(ObjectKind::Subscription, &sub, false);
        assert_eq!((periods[0].start, periods[0].end), (100, 200));
        assert_eq!(periods[0].subscription_status.as_deref(), Some("active"));
        let renewal = json!({"id": "in_1", "status": "open", "period_start": 100, "period_end": 200,
            "parent": {"subscription_details": {"subscription": "sub_1"}}});
        let periods = billing_periods(ObjectKind::Invoice, &renewal, false);
        assert_eq!(periods[0].invoice, Some(("in_1".into(), "open".into())));
        assert_eq!(periods[0].subscription_id, "sub_1");
        let deleted = billing_periods(ObjectKind::Invoice, &renewal, true);
        assert_eq!(deleted[0].invoice, Some(("in_1".into(), "deleted".into())));
        let first = json!({"id": "in_0", "status": "paid", "subscription": "sub_1",
            "period_start": 100, "period_end": 100});
        assert!(billing_periods(ObjectKind::Invoice, &first, false).is_empty());
        let manual = json!({"id": "in_2", "status": "open", "period_start": 1, "period_end": 9});
        assert!(billing_periods(ObjectKind::Invoice, &manual, false).is_empty());
    }

    #[test]
    fn invoice_lines_find_their_price_in_any_version() {
        let object = json!({"id": "in_1", "status": "paid", "currency": "eur", "total": 1000,
        "lines": {"data": [
            {"id": "il_1", "amount": 600, "quantity": 2, "price": {"id": "price_a"}, "period": {"start": 1, "end": 2}},
            {"id": "il_2", "amount": 400, "quantity_decimal": "0.25", "pricing": {"price_details": {"price": "price_b"}}},
            {"id": "il_3", "amount": 0, "plan": {"id": "plan_c"}}
        ]}});
        let invoice = invoice(&object);
        let prices: Vec<_> = invoice
            .lines
            .iter()
            .map(|l| l.price.clone().unwrap())
            .collect();
        assert_eq!(prices, ["price_a", "price_b", "plan_c"]);
        assert_eq!(invoice.lines[1].quantity, Some(Decimal::new(25, 2)));
    }
}
