//! The usage ledger's findings, one case at a time.

use super::*;
use crate::catalog::Catalog;

const START: i64 = 1_700_000_000_000;
const END: i64 = START + 10 * 86_400_000;
const BILLED: i64 = END + 3_600_000;

fn meters() -> BTreeMap<String, Meter> {
    Catalog::parse("[meters.calls]\naggregation = \"sum\"\nstripe_event_name = \"calls\"\n")
        .unwrap()
        .meters
}

/// The invoice line billing the period, if there is one (units come from invoice lines).
fn unit(invoiced: Option<i64>) -> Vec<Unit> {
    let Some(invoiced) = invoiced else {
        return Vec::new();
    };
    vec![Unit {
        tenant_id: "t".into(),
        customer_id: "cus".into(),
        meter: "calls".into(),
        start: START,
        end: END,
        invoice: Some(InvoiceLine {
            invoice_id: "in_1".into(),
            line_id: Some("il_1".into()),
            quantity: Some(Decimal::from(invoiced)),
            billed_at: BILLED,
        }),
    }]
}

fn event(id: &str, quantity: i64, push: Option<&str>) -> UsageRow {
    UsageRow {
        tenant_id: "t".into(),
        event_id: id.into(),
        meter: "calls".into(),
        quantity: quantity.to_string(),
        occurred_at: START + 1000,
        unique_value: None,
        properties: None,
        received_at: START + 2000,
        push_id: push.map(str::to_owned),
    }
}

fn push(id: &str, value: i64, status: &str, sent_at: Option<i64>) -> PushRow {
    PushRow {
        push_id: id.into(),
        tenant_id: "t".into(),
        meter: "calls".into(),
        customer_id: "cus".into(),
        event_name: "calls".into(),
        window_start: START,
        value: value.to_string(),
        timestamp: (START + 1000) / 1000,
        event_count: 1,
        status: status.into(),
        attempts: 1,
        last_error: None,
        next_attempt_at: 0,
        created_at: START,
        sent_at,
        period_start: None,
        period_end: None,
    }
}

/// The findings of one tenant's period.
fn run(
    invoiced: Option<i64>,
    events: Vec<UsageRow>,
    pushes: Vec<PushRow>,
    vendor: Option<i64>,
) -> Vec<&'static str> {
    let meters = meters();
    let open = HashMap::new();
    let mut ledger = Ledger::new(&meters, unit(invoiced), &open);
    for e in events {
        ledger.add_event(e);
    }
    for p in pushes {
        ledger.add_push(p);
    }
    let vendor: HashMap<(String, String, i64), Decimal> = vendor
        .map(|v| {
            (
                ("t".to_owned(), "calls".to_owned(), START),
                Decimal::from(v),
            )
        })
        .into_iter()
        .collect();
    ledger
        .finish(&vendor)
        .into_iter()
        .map(|i| i.finding.as_str())
        .collect()
}

#[test]
fn each_usage_finding_alone() {
    let sent = Some(START + 5000);
    let late = Some(BILLED + 1);
    // All four agree.
    assert!(
        run(
            Some(5),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "sent", sent)],
            Some(5)
        )
        .is_empty()
    );
    assert_eq!(
        run(Some(5), vec![event("a", 5, None)], vec![], None),
        ["not_yet_pushed"]
    );
    assert_eq!(
        run(
            Some(5),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "pending", None)],
            None
        ),
        ["not_yet_pushed"]
    );
    assert_eq!(
        run(
            Some(5),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "rejected", None)],
            None
        ),
        ["rejected_by_vendor"]
    );
    assert_eq!(
        run(
            Some(5),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "expired", None)],
            None
        ),
        ["outside_vendor_window"]
    );
    assert_eq!(
        run(
            Some(5),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "invoice_final", None)],
            None
        ),
        ["arrived_after_invoice"]
    );
    assert_eq!(
        run(
            Some(5),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "sent", sent)],
            Some(4)
        ),
        ["vendor_mismatch"]
    );
    assert_eq!(
        run(
            Some(3),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "sent", late)],
            None
        ),
        ["arrived_after_invoice"]
    );
    assert_eq!(
        run(
            Some(3),
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "sent", sent)],
            None
        ),
        ["invoice_mismatch"]
    );
    assert_eq!(
        run(
            None,
            vec![event("a", 5, Some("p"))],
            vec![push("p", 5, "sent", sent)],
            None
        ),
        ["invoice_missing"]
    );
    // Usage without an invoice that never reached Stripe says so first.
    assert_eq!(
        run(None, vec![event("a", 5, None)], vec![], None),
        ["not_yet_pushed"]
    );
    // An invoice line with nothing behind it.
    assert_eq!(run(Some(2), vec![], vec![], None), ["invoice_mismatch"]);
}

#[test]
fn evidence_lists_the_smallest_unpushed_ids_whatever_the_order() {
    let meters = meters();
    let open = HashMap::new();
    let mut ledger = Ledger::new(&meters, unit(Some(0)), &open);
    for i in (0..150).rev() {
        ledger.add_event(event(&format!("e{i:03}"), 1, None));
    }
    let items = ledger.finish(&HashMap::new());
    let ids = items[0].detail["evidence"]["unpushed_event_ids"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(ids.len(), MAX_EVENT_IDS);
    assert_eq!(ids[0], "e000");
    assert_eq!(items[0].detail["evidence"]["unpushed_events"], 150);
}
