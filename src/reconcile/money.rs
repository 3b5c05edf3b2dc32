//! Money: each finalized invoice of the window against the payments the mirror holds for it
//! (charges, payment intents, credit notes), in integer minor units.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{Finding, Item};
use crate::domain::{Invoice, Payment, rfc3339_secs};
use crate::stripe::objects;

/// An invoice with the tenant it bills and its raw object (for the newer `payments` list).
pub struct Billed {
    pub tenant_id: String,
    pub invoice: Invoice,
    pub raw: Value,
}

/// What the money side found: the items, and how many invoices matched.
pub struct Outcome {
    pub items: Vec<Item>,
    pub matched: usize,
}

/// Compares every invoice with its payments. `payments` are all mirrored payments of the
/// customers concerned; `now_s` decides what is past due.
pub fn reconcile(invoices: &[Billed], payments: &[Payment], now_s: i64) -> Outcome {
    let intents: HashMap<&str, &Payment> = payments
        .iter()
        .filter(|p| p.kind == "payment_intent")
        .map(|p| (p.id.as_str(), p))
        .collect();
    let mut items = Vec::new();
    let mut matched = 0;
    for billed in invoices {
        let found = findings(billed, payments, &intents, now_s);
        if found.is_empty() {
            matched += 1;
        }
        items.extend(found);
    }
    Outcome { items, matched }
}

fn findings(
    billed: &Billed,
    payments: &[Payment],
    intents: &HashMap<&str, &Payment>,
    now_s: i64,
) -> Vec<Item> {
    let invoice = &billed.invoice;
    let status = invoice.status.as_deref().unwrap_or("");
    if status == "draft" || status.is_empty() {
        return Vec::new();
    }
    let named = objects::invoice_payment_intents(&billed.raw);
    let belongs = |p: &Payment| {
        p.invoice.as_deref() == Some(invoice.id.as_str())
            || p.payment_intent.as_deref().is_some_and(|pi| {
                named.iter().any(|n| n == pi)
                    || intents
                        .get(pi)
                        .is_some_and(|intent| intent.invoice.as_deref() == Some(&invoice.id))
            })
    };
    let charges: Vec<&Payment> = payments
        .iter()
        .filter(|p| p.kind == "charge" && belongs(p))
        .collect();
    let credit_notes: Vec<&Payment> = payments
        .iter()
        .filter(|p| p.kind == "credit_note" && p.invoice.as_deref() == Some(invoice.id.as_str()))
        .collect();
    let succeeded: Vec<&&Payment> = charges
        .iter()
        .filter(|c| c.status.as_deref() == Some("succeeded"))
        .collect();
    // A payment intent whose charges the mirror does not hold (some sources send only the
    // intent's events) counts by its `amount_received`.
    let intents_alone: Vec<&Payment> = payments
        .iter()
        .filter(|p| {
            p.kind == "payment_intent"
                && p.status.as_deref() == Some("succeeded")
                && (p.invoice.as_deref() == Some(invoice.id.as_str()) || named.contains(&p.id))
                && !charges
                    .iter()
                    .any(|c| c.payment_intent.as_deref() == Some(p.id.as_str()))
        })
        .collect();
    let received: i64 = succeeded.iter().filter_map(|c| c.amount).sum::<i64>()
        + intents_alone
            .iter()
            .filter_map(|p| p.amount_received.or(p.amount))
            .sum::<i64>();
    let refunded: i64 = succeeded.iter().filter_map(|c| c.amount_refunded).sum();
    let credited: i64 = credit_notes
        .iter()
        .filter(|c| c.status.as_deref() != Some("void"))
        .filter_map(|c| c.amount)
        .sum();
    let total = invoice.total.unwrap_or(0);
    let due = invoice.amount_due.unwrap_or(total);
    let paid = invoice.amount_paid.unwrap_or(0);
    let currency = invoice.currency.clone().unwrap_or_default();

    let evidence = json!({
        "invoice": invoice.id,
        "charges": charges.iter().map(|c| &c.id).collect::<Vec<_>>(),
        "payment_intents": intents_alone.iter().map(|p| &p.id).collect::<Vec<_>>(),
        "credit_notes": credit_notes.iter().map(|c| &c.id).collect::<Vec<_>>(),
    });
    let make = |finding: Finding, cause: String| Item {
        area: "money",
        finding,
        tenant_id: Some(billed.tenant_id.clone()),
        detail: json!({
            "invoice": invoice.id,
            "number": invoice.number,
            "status": status,
            "currency": currency,
            "total": total,
            "amount_due": due,
            "amount_paid": paid,
            "received": received,
            "refunded": refunded,
            "credited": credited,
            "due_date": invoice.due_date.map(rfc3339_secs),
            "cause": cause,
            "evidence": evidence,
        }),
    };

    let mut found = Vec::new();
    match status {
        "void" => found.push(make(Finding::Void, "the invoice was voided".into())),
        "uncollectible" => found.push(make(
            Finding::Uncollectible,
            "the invoice was marked uncollectible".into(),
        )),
        _ => {}
    }
    let foreign: Vec<&str> = succeeded
        .iter()
        .filter(|c| {
            c.currency
                .as_deref()
                .is_some_and(|c| !c.eq_ignore_ascii_case(&currency))
        })
        .map(|c| c.id.as_str())
        .collect();
    if !foreign.is_empty() {
        found.push(make(
            Finding::CurrencyMismatch,
            format!(
                "payments in another currency than the invoice's: {}",
                foreign.join(", ")
            ),
        ));
    }
    if refunded > 0 {
        found.push(make(Finding::Refunded, format!("{refunded} refunded")));
    }
    if charges.iter().any(|c| c.disputed) {
        found.push(make(Finding::Disputed, "a payment is disputed".into()));
    }
    if matches!(status, "void" | "uncollectible") || !foreign.is_empty() {
        return found;
    }
    let owed = due - credited.min(due);
    if received > total.max(due) {
        found.push(make(
            Finding::Overpaid,
            format!(
                "received {received}, more than the invoice's {}",
                total.max(due)
            ),
        ));
    } else if status == "paid" {
        if received != paid && !(received == 0 && paid == 0) {
            found.push(make(
                Finding::AmountMismatch,
                format!("the invoice says {paid} paid; its payments add up to {received}"),
            ));
        }
    } else if status == "open" {
        let past_due = invoice
            .due_date
            .or(billed.raw["next_payment_attempt"].as_i64())
            .is_some_and(|d| d < now_s);
        if received > 0 && received < owed {
            found.push(make(
                Finding::PartiallyPaid,
                format!("received {received} of {owed}"),
            ));
        } else if received == 0 && owed > 0 && past_due {
            found.push(make(
                Finding::MissingPayment,
                "open past its due date with no payment".into(),
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::objects;

    const NOW: i64 = 1_800_000_000;

    fn billed(status: &str, paid: i64, due: Option<i64>) -> Billed {
        let raw = json!({"id": "in_1", "object": "invoice", "customer": "cus_1", "status": status,
            "currency": "eur", "total": 1000, "amount_due": 1000, "amount_paid": paid,
            "due_date": due, "lines": {"data": []}});
        Billed {
            tenant_id: "t".into(),
            invoice: objects::invoice(&raw),
            raw,
        }
    }

    fn charge(amount: i64, extra: Value) -> Payment {
        let mut raw = json!({"id": "ch_1", "object": "charge", "invoice": "in_1", "amount": amount,
            "currency": "eur", "status": "succeeded", "amount_refunded": 0, "disputed": false});
        if let (Value::Object(r), Value::Object(e)) = (&mut raw, extra) {
            r.extend(e);
        }
        objects::payment("charge", &raw)
    }

    fn findings_of(invoice: Billed, payments: Vec<Payment>) -> Vec<&'static str> {
        reconcile(&[invoice], &payments, NOW)
            .items
            .iter()
            .map(|i| i.finding.as_str())
            .collect()
    }

    #[test]
    fn each_kind_is_found_alone() {
        let past = Some(NOW - 1);
        let future = Some(NOW + 86_400);
        let cases: Vec<(Billed, Vec<Payment>, Vec<&str>)> = vec![
            (
                billed("paid", 1000, None),
                vec![charge(1000, json!({}))],
                vec![],
            ),
            (billed("open", 0, future), vec![], vec![]),
            (billed("draft", 0, past), vec![], vec![]),
            (billed("open", 0, past), vec![], vec!["missing_payment"]),
            (
                billed("open", 0, past),
                vec![charge(300, json!({}))],
                vec!["partially_paid"],
            ),
            (
                billed("paid", 1000, None),
                vec![charge(1200, json!({}))],
                vec!["overpaid"],
            ),
            (
                billed("paid", 1000, None),
                vec![charge(999, json!({}))],
                vec!["amount_mismatch"],
            ),
            (
                billed("paid", 1000, None),
                vec![charge(1000, json!({"amount_refunded": 1}))],
                vec!["refunded"],
            ),
            (
                billed("paid", 1000, None),
                vec![charge(1000, json!({"disputed": true}))],
                vec!["disputed"],
            ),
            (billed("void", 0, None), vec![], vec!["void"]),
            (
                billed("uncollectible", 0, past),
                vec![],
                vec!["uncollectible"],
            ),
            (
                billed("paid", 1000, None),
                vec![charge(1000, json!({"currency": "usd"}))],
                vec!["currency_mismatch"],
            ),
            // A failed charge is not money received.
            (
                billed("open", 0, past),
                vec![charge(1000, json!({"status": "failed"}))],
                vec!["missing_payment"],
            ),
        ];
        for (invoice, payments, expected) in cases {
            let status = invoice.invoice.status.clone();
            assert_eq!(findings_of(invoice, payments), expected, "{status:?}");
        }
    }

    #[test]
    fn an_intent_without_mirrored_charges_counts_by_what_it_received() {
        let intent = objects::payment(
            "payment_intent",
            &json!({"id": "pi_9", "invoice": "in_1", "amount": 1000, "amount_received": 1000,
                "currency": "eur", "status": "succeeded"}),
        );
        assert!(findings_of(billed("paid", 1000, None), vec![intent.clone()]).is_empty());
        // With its charge mirrored, the charge counts (once).
        let charge = charge(1000, json!({"payment_intent": "pi_9"}));
        assert!(findings_of(billed("paid", 1000, None), vec![intent, charge]).is_empty());
    }

    #[test]
    fn payments_are_found_through_their_payment_intent() {
        let mut invoice = billed("paid", 1000, None);
        invoice.raw["payments"] = json!({"data": [{"payment": {"payment_intent": "pi_1"}}]});
        let charge = objects::payment(
            "charge",
            &json!({"id": "ch_2", "payment_intent": "pi_1", "amount": 1000, "currency": "eur", "status": "succeeded"}),
        );
        let outcome = reconcile(&[invoice], &[charge], NOW);
        assert!(outcome.items.is_empty());
        assert_eq!(outcome.matched, 1);
    }
}
