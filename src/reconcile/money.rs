//! Money: each finalized invoice of the window against the payments the mirror holds for it
//! (charges, payment intents, credit notes), in integer minor units.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{Finding, Item};
use crate::domain::{Invoice, Payment, rfc3339_secs};

/// An invoice with the tenant it bills.
pub struct Billed {
    pub tenant_id: String,
    pub invoice: Invoice,
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

/// An invoice's payments as the mirror holds them, and what they add up to.
struct Paid<'a> {
    charges: Vec<&'a Payment>,
    succeeded: Vec<&'a Payment>,
    /// Succeeded payment intents whose charges the mirror does not hold (some sources send only
    /// the intent's events): they count by their `amount_received`.
    intents_alone: Vec<&'a Payment>,
    credit_notes: Vec<&'a Payment>,
    received: i64,
    refunded: i64,
    credited: i64,
}

impl<'a> Paid<'a> {
    fn of(invoice: &Invoice, payments: &'a [Payment], intents: &HashMap<&str, &Payment>) -> Self {
        let named = &invoice.payment_intents;
        let id = Some(invoice.id.as_str());
        let belongs = |p: &Payment| {
            p.invoice.as_deref() == id
                || p.payment_intent.as_deref().is_some_and(|pi| {
                    named.iter().any(|n| n == pi)
                        || (intents.get(pi)).is_some_and(|intent| intent.invoice.as_deref() == id)
                })
        };
        let of_kind = |kind: &'static str| payments.iter().filter(move |p| p.kind == kind);
        let charges: Vec<&Payment> = of_kind("charge").filter(|p| belongs(p)).collect();
        let credit_notes: Vec<&Payment> = of_kind("credit_note")
            .filter(|p| p.invoice.as_deref() == id)
            .collect();
        let succeeded: Vec<&Payment> = (charges.iter().copied())
            .filter(|c| c.status.as_deref() == Some("succeeded"))
            .collect();
        let intents_alone: Vec<&Payment> = of_kind("payment_intent")
            .filter(|p| {
                p.status.as_deref() == Some("succeeded")
                    && (p.invoice.as_deref() == id || named.contains(&p.id))
                    && !(charges.iter()).any(|c| c.payment_intent.as_deref() == Some(&p.id))
            })
            .collect();
        let received = succeeded.iter().filter_map(|c| c.amount).sum::<i64>()
            + (intents_alone.iter())
                .filter_map(|p| p.amount_received.or(p.amount))
                .sum::<i64>();
        let refunded = succeeded.iter().filter_map(|c| c.amount_refunded).sum();
        let credited = (credit_notes.iter())
            .filter(|c| c.status.as_deref() != Some("void"))
            .filter_map(|c| c.amount)
            .sum();
        Paid {
            charges,
            succeeded,
            intents_alone,
            credit_notes,
            received,
            refunded,
            credited,
        }
    }
}

/// One invoice against its payments.
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
    let paid = Paid::of(invoice, payments, intents);
    let make = |finding: Finding, cause: String| Item {
        repair: None,
        area: "money",
        finding,
        tenant_id: Some(billed.tenant_id.clone()),
        detail: detail(invoice, &paid, cause),
    };
    let currency = invoice.currency.clone().unwrap_or_default();
    let foreign: Vec<&str> = (paid.succeeded.iter())
        .filter(|c| (c.currency.as_deref()).is_some_and(|c| !c.eq_ignore_ascii_case(&currency)))
        .map(|c| c.id.as_str())
        .collect();
    let mut found: Vec<Item> = flags(status, &paid, &foreign)
        .into_iter()
        .map(|(finding, cause)| make(finding, cause))
        .collect();
    if matches!(status, "void" | "uncollectible") || !foreign.is_empty() {
        return found;
    }
    if let Some((finding, cause)) = amount_finding(invoice, &paid, now_s) {
        found.push(make(finding, cause));
    }
    found
}

/// What an item says about an invoice and its payments.
fn detail(invoice: &Invoice, paid: &Paid, cause: String) -> Value {
    let total = invoice.total.unwrap_or(0);
    json!({
        "invoice": invoice.id,
        "number": invoice.number,
        "status": invoice.status.as_deref().unwrap_or(""),
        "currency": invoice.currency.clone().unwrap_or_default(),
        "total": total,
        "amount_due": invoice.amount_due.unwrap_or(total),
        "amount_paid": invoice.amount_paid.unwrap_or(0),
        "received": paid.received,
        "refunded": paid.refunded,
        "credited": paid.credited,
        "due_date": invoice.due_date.map(rfc3339_secs),
        "cause": cause,
        "evidence": {
            "invoice": invoice.id,
            "charges": paid.charges.iter().map(|c| &c.id).collect::<Vec<_>>(),
            "payment_intents": paid.intents_alone.iter().map(|p| &p.id).collect::<Vec<_>>(),
            "credit_notes": paid.credit_notes.iter().map(|c| &c.id).collect::<Vec<_>>(),
        },
    })
}

/// Findings that hold whatever the amounts: void, uncollectible, foreign currency, refunds,
/// disputes.
fn flags(status: &str, paid: &Paid, foreign: &[&str]) -> Vec<(Finding, String)> {
    let mut found = Vec::new();
    match status {
        "void" => found.push((Finding::Void, "the invoice was voided".into())),
        "uncollectible" => found.push((
            Finding::Uncollectible,
            "the invoice was marked uncollectible".into(),
        )),
        _ => {}
    }
    if !foreign.is_empty() {
        let cause = format!(
            "payments in another currency than the invoice's: {}",
            foreign.join(", ")
        );
        found.push((Finding::CurrencyMismatch, cause));
    }
    if paid.refunded > 0 {
        found.push((Finding::Refunded, format!("{} refunded", paid.refunded)));
    }
    if paid.charges.iter().any(|c| c.disputed) {
        found.push((Finding::Disputed, "a payment is disputed".into()));
    }
    found
}

/// Whether what was received fits what the invoice asks: overpaid, a paid invoice whose
/// payments add up to another amount, an open one partially paid or unpaid past its due date.
fn amount_finding(invoice: &Invoice, paid: &Paid, now_s: i64) -> Option<(Finding, String)> {
    let total = invoice.total.unwrap_or(0);
    let due = invoice.amount_due.unwrap_or(total);
    let amount_paid = invoice.amount_paid.unwrap_or(0);
    let received = paid.received;
    let owed = due - paid.credited.min(due);
    let status = invoice.status.as_deref().unwrap_or("");
    if received > total.max(due) {
        let cause = format!(
            "received {received}, more than the invoice's {}",
            total.max(due)
        );
        return Some((Finding::Overpaid, cause));
    }
    match status {
        "paid" if received != amount_paid && !(received == 0 && amount_paid == 0) => {
            let cause =
                format!("the invoice says {amount_paid} paid; its payments add up to {received}");
            Some((Finding::AmountMismatch, cause))
        }
        "open" if received > 0 && received < owed => Some((
            Finding::PartiallyPaid,
            format!("received {received} of {owed}"),
        )),
        "open" if received == 0 && owed > 0 => {
            let past_due =
                (invoice.due_date.or(invoice.next_payment_attempt)).is_some_and(|d| d < now_s);
            past_due.then(|| {
                let cause = "open past its due date with no payment".to_owned();
                (Finding::MissingPayment, cause)
            })
        }
        _ => None,
    }
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
        // Newer API versions name the intent in the invoice's `payments` list only.
        let raw = json!({"id": "in_1", "object": "invoice", "status": "paid", "currency": "eur",
            "total": 1000, "amount_due": 1000, "amount_paid": 1000, "lines": {"data": []},
            "payments": {"data": [{"payment": {"payment_intent": "pi_1"}}]}});
        let invoice = Billed {
            tenant_id: "t".into(),
            invoice: objects::invoice(&raw),
        };
        let charge = objects::payment(
            "charge",
            &json!({"id": "ch_2", "payment_intent": "pi_1", "amount": 1000, "currency": "eur", "status": "succeeded"}),
        );
        let outcome = reconcile(&[invoice], &[charge], NOW);
        assert!(outcome.items.is_empty());
        assert_eq!(outcome.matched, 1);
    }
}
