//! Invoices, payments, credit notes and refunds.

use serde_json::Value;

use super::{id_of, int, price_of, quantity, string};
use crate::domain::{CreditNote, CreditNoteLine, Invoice, InvoiceLine, Payment, Refund};

/// The payment intents an invoice names: `payment_intent` in older versions, the `payments`
/// list in newer ones.
pub fn invoice_payment_intents(invoice: &Value) -> Vec<String> {
    let listed = invoice["payments"]["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| id_of(&p["payment"]["payment_intent"]));
    id_of(&invoice["payment_intent"])
        .into_iter()
        .chain(listed)
        .collect()
}

pub fn invoice(object: &Value) -> Invoice {
    let lines = object["lines"]["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    Invoice {
        id: id_of(&object["id"]).unwrap_or_default(),
        number: string(&object["number"]),
        status: string(&object["status"]),
        currency: string(&object["currency"]),
        total: int(&object["total"]),
        amount_due: int(&object["amount_due"]),
        amount_paid: int(&object["amount_paid"]),
        amount_remaining: int(&object["amount_remaining"]),
        subscription: id_of(&object["subscription"])
            .or_else(|| id_of(&object["parent"]["subscription_details"]["subscription"])),
        created: int(&object["created"]),
        due_date: int(&object["due_date"]),
        period_start: int(&object["period_start"]),
        period_end: int(&object["period_end"]),
        finalized_at: int(&object["status_transitions"]["finalized_at"]),
        voided_at: int(&object["status_transitions"]["voided_at"]),
        next_payment_attempt: int(&object["next_payment_attempt"]),
        payment_intents: invoice_payment_intents(object),
        lines: lines
            .iter()
            .map(|line| InvoiceLine {
                id: id_of(&line["id"]),
                amount: int(&line["amount"]),
                currency: string(&line["currency"]),
                quantity: quantity(&line["quantity_decimal"])
                    .or_else(|| quantity(&line["quantity"])),
                price: price_of(line),
                period_start: int(&line["period"]["start"]),
                period_end: int(&line["period"]["end"]),
                description: string(&line["description"]),
                // Older versions flag the line; newer ones its parent's details.
                proration: line["proration"].as_bool().unwrap_or(false)
                    || line["parent"]["subscription_item_details"]["proration"] == true
                    || line["parent"]["invoice_item_details"]["proration"] == true,
                discounts: sum_of(&line["discount_amounts"], "amount"),
                inclusive_tax: inclusive_tax(line),
                recurring: line["price"]["recurring"].is_object() || line["plan"].is_object(),
                metered: line["price"]["recurring"]["usage_type"] == "metered"
                    || line["plan"]["usage_type"] == "metered",
                of_subscription: line["type"] == "subscription"
                    || line["parent"]["type"] == "subscription_item_details"
                    || line["proration"] == true
                    || line["parent"]["subscription_item_details"]["proration"] == true,
            })
            .collect(),
    }
}

pub fn payment(kind: &str, object: &Value) -> Payment {
    let amount = if kind == "credit_note" {
        int(&object["total"]).or_else(|| int(&object["amount"]))
    } else {
        int(&object["amount"])
    };
    Payment {
        id: id_of(&object["id"]).unwrap_or_default(),
        kind: kind.to_owned(),
        status: string(&object["status"]),
        currency: string(&object["currency"]),
        amount,
        amount_received: int(&object["amount_received"]),
        amount_refunded: int(&object["amount_refunded"]),
        refunded: object["refunded"].as_bool().unwrap_or(false),
        disputed: object["disputed"].as_bool().unwrap_or(false),
        invoice: id_of(&object["invoice"]),
        payment_intent: id_of(&object["payment_intent"]),
        created: int(&object["created"]),
    }
}

/// A credit note. Its lines' amounts are net of tax included in the price and of discounts,
/// like invoice lines' revenue.
pub fn credit_note(object: &Value) -> CreditNote {
    let listed_refunds = object["refunds"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let refunds = id_of(&object["refund"])
        .into_iter()
        .chain(listed_refunds.iter().filter_map(|r| id_of(&r["refund"])))
        .collect();
    let lines = object["lines"]["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    CreditNote {
        id: id_of(&object["id"]).unwrap_or_default(),
        voided: object["status"].as_str() == Some("void"),
        invoice: id_of(&object["invoice"]),
        created: int(&object["created"]).unwrap_or(0),
        total: int(&object["total"]).unwrap_or(0),
        refunds_money: !object["refund"].is_null() || !listed_refunds.is_empty(),
        refunds,
        lines: lines
            .iter()
            .map(|credit| CreditNoteLine {
                invoice_line_item: id_of(&credit["invoice_line_item"]),
                amount: int(&credit["amount_excluding_tax"])
                    .unwrap_or_else(|| int(&credit["amount"]).unwrap_or(0) - inclusive_tax(credit))
                    - sum_of(&credit["discount_amounts"], "amount"),
            })
            .collect(),
        subtotal: int(&object["subtotal_excluding_tax"])
            .or_else(|| int(&object["subtotal"]))
            .or_else(|| int(&object["amount"]))
            .unwrap_or(0),
    }
}

/// A charge's refunds that did not fail, when Stripe listed them (it leaves them out unless
/// asked): `None` when the list is absent or empty.
pub fn charge_refunds(object: &Value) -> Option<Vec<Refund>> {
    let listed = object["refunds"]["data"]
        .as_array()
        .filter(|l| !l.is_empty())?;
    Some(
        listed
            .iter()
            .filter(|r| r["status"].as_str() != Some("failed"))
            .map(|r| Refund {
                id: id_of(&r["id"]).unwrap_or_default(),
                amount: int(&r["amount"]).unwrap_or(0),
                created: int(&r["created"]).unwrap_or(0),
            })
            .collect(),
    )
}

fn sum_of(list: &Value, field: &str) -> i64 {
    list.as_array()
        .map(|items| items.iter().filter_map(|i| int(&i[field])).sum())
        .unwrap_or(0)
}

/// Tax included in a line's amount (older `tax_amounts[].inclusive`, newer
/// `taxes[].tax_behavior = inclusive`).
fn inclusive_tax(line: &Value) -> i64 {
    let included = |list: &Value, flag: &str, value: Value| -> i64 {
        list.as_array()
            .map(|t| {
                t.iter()
                    .filter(|t| t[flag] == value)
                    .filter_map(|t| int(&t["amount"]))
                    .sum()
            })
            .unwrap_or(0)
    };
    included(&line["tax_amounts"], "inclusive", Value::Bool(true))
        + included(&line["taxes"], "tax_behavior", Value::from("inclusive"))
}
