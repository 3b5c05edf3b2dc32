//! Billing credit grants (`billing.credit_grant`), read tolerantly: an amount in a currency
//! (`monetary`, integer minor units) or in a custom pricing unit (a decimal), and the dates that
//! bound when it may be used.

use rust_decimal::Decimal;
use serde_json::Value;

use super::{id_of, int, quantity};
use crate::credits::grants::{CREDITS, CreditGrant};

/// A credit grant as billsync uses it, or `None` when it names no amount billsync can read
/// (kept in the mirror all the same, with its raw payload).
pub fn credit_grant(object: &Value) -> Option<CreditGrant> {
    let (unit, amount) = amount(&object["amount"])?;
    let ms = |field: &str| int(&object[field]).map(|s| s * 1000);
    let scope = &object["applicability_config"]["scope"];
    let prices = scope["prices"].as_array().map(|prices| {
        prices
            .iter()
            .filter_map(|p| id_of(&p["id"]).or_else(|| id_of(p)))
            .collect()
    });
    Some(CreditGrant {
        id: id_of(&object["id"])?,
        customer: id_of(&object["customer"]),
        unit,
        amount,
        priority: int(&object["priority"]).unwrap_or(50),
        created_ms: ms("created").unwrap_or(0),
        // Stripe defaults `effective_at` to creation.
        effective_ms: ms("effective_at").or_else(|| ms("created")).unwrap_or(0),
        expires_ms: ms("expires_at"),
        voided_ms: ms("voided_at"),
        category: object["category"].as_str().map(str::to_owned),
        name: object["name"].as_str().map(str::to_owned),
        prices,
    })
}

/// `(unit, amount)`: the lowercase currency and minor units of a monetary amount, or the
/// custom pricing unit's id (`credits` when it has none) and its decimal value.
fn amount(amount: &Value) -> Option<(String, Decimal)> {
    let monetary = &amount["monetary"];
    let custom = &amount["custom_pricing_unit"];
    let is = |kind: &str| amount["type"].as_str() == Some(kind);
    if is("monetary") || (!is("custom_pricing_unit") && monetary.is_object()) {
        let currency = monetary["currency"].as_str()?.to_ascii_lowercase();
        return Some((currency, quantity(&monetary["value"])?));
    }
    if custom.is_object() {
        let unit = id_of(&custom["id"])
            .or_else(|| id_of(&custom["custom_pricing_unit"]))
            .unwrap_or_else(|| CREDITS.to_owned());
        return Some((unit, quantity(&custom["value"])?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn monetary_and_custom_unit_grants_are_read_with_their_dates() {
        let grant = json!({"id": "credgr_1", "object": "billing.credit_grant", "customer": "cus_1",
            "amount": {"type": "monetary", "monetary": {"currency": "USD", "value": 10000}},
            "applicability_config": {"scope": {"price_type": "metered"}}, "category": "paid",
            "created": 100, "effective_at": 200, "expires_at": null, "voided_at": 300, "priority": 10,
            "some_new_field": {"x": 1}});
        let g = credit_grant(&grant).unwrap();
        assert_eq!((g.unit.as_str(), g.amount), ("usd", Decimal::from(10000)));
        assert_eq!(
            (g.priority, g.effective_ms, g.expires_ms, g.voided_ms),
            (10, 200_000, None, Some(300_000))
        );
        assert_eq!(g.prices, None);
        let custom = json!({"id": "credgr_2", "customer": {"id": "cus_1"}, "created": 100,
            "amount": {"type": "custom_pricing_unit", "custom_pricing_unit": {"id": "cpu_gpu", "value": "1000.5"}},
            "applicability_config": {"scope": {"prices": [{"id": "price_1"}]}}});
        let g = credit_grant(&custom).unwrap();
        assert_eq!(
            (g.unit.as_str(), g.amount),
            ("cpu_gpu", Decimal::new(10005, 1))
        );
        assert_eq!(
            (g.priority, g.effective_ms),
            (50, 100_000),
            "Stripe's defaults"
        );
        assert_eq!(g.prices, Some(vec!["price_1".to_owned()]));
        assert!(credit_grant(&json!({"id": "credgr_3", "amount": {"type": "other"}})).is_none());
    }
}
