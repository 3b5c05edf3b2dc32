//! The usage ledger's findings, one case at a time.

use super::*;
use crate::catalog::Catalog;

const START: i64 = 1_700_000_000_000;
const END: i64 = START + 10 * 86_400_000;
const BILLED: i64 = END + 3_600_000;
/// The open units' period goes on after their settle point (END).
const PERIOD_END: i64 = END + 20 * 86_400_000;
const NOW: i64 = END + 300_000;

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
        period_end: PERIOD_END,
        settle_at: END,
        invoice: Some(InvoiceLine {
            invoice_id: "in_1".into(),
            line_id: Some("il_1".into()),
            quantity: Some(Decimal::from(invoiced)),
            billed_at: BILLED,
            is_final: true,
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
        kind: "usage".to_owned(),
        evidence: None,
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
    let mut ledger = Ledger::new(&meters, unit(invoiced), &open, NOW);
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
    let mut ledger = Ledger::new(&meters, unit(Some(0)), &open, NOW);
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

/// The open period `[START, END)` (END the settle point): only pushed against the vendor.
fn run_open(events: Vec<UsageRow>, pushes: Vec<PushRow>, vendor: i64) -> Vec<Item> {
    let meters = meters();
    let open = HashMap::from([("t".to_owned(), (START, PERIOD_END))]);
    let mut units = unit(Some(0));
    units[0].invoice = None;
    let mut ledger = Ledger::new(&meters, units, &open, NOW);
    for e in events {
        ledger.add_event(e);
    }
    for p in pushes {
        ledger.add_push(p);
    }
    let vendor = HashMap::from([(
        ("t".to_owned(), "calls".to_owned(), START),
        Decimal::from(vendor),
    )]);
    ledger.finish(&vendor)
}

#[test]
fn the_open_period_compares_what_stripe_acknowledged_with_its_meter() {
    let sent = Some(START + 5000);
    let findings = |items: Vec<Item>| -> Vec<&'static str> {
        items.into_iter().map(|i| i.finding.as_str()).collect()
    };
    let pushes = || vec![push("p", 5, "sent", sent), push("q", 2, "pending", None)];
    let events = || vec![event("a", 5, Some("p")), event("b", 2, Some("q"))];
    assert!(findings(run_open(events(), pushes(), 5)).is_empty());
    let missing = run_open(events(), pushes(), 3);
    assert_eq!(findings(missing.clone()), ["vendor_missing"]);
    let evidence = &missing[0].detail["evidence"];
    assert_eq!(evidence["sent_pushes"][0]["push_id"], "p");
    assert_eq!(evidence["sent_pushes"][0]["value"], "5");
    assert_eq!(evidence["sent_push_count"], 1);
    assert_eq!(missing[0].detail["pushed"], "5");
    assert_eq!(missing[0].detail["vendor"], "3");
    assert_eq!(missing[0].detail["invoiced"], Value::Null);
    assert_eq!(findings(run_open(events(), pushes(), 6)), ["vendor_extra"]);
    // Accepted usage not pushed yet is in flight, not a finding, while the period is open.
    assert!(findings(run_open(vec![event("c", 9, None)], vec![], 0)).is_empty());
    // A push sent after the settle point may or may not be in Stripe's summaries yet.
    let in_flight = || {
        vec![
            push("p", 5, "sent", sent),
            push("r", 2, "sent", Some(END + 1)),
        ]
    };
    assert!(findings(run_open(vec![], in_flight(), 5)).is_empty());
    assert!(findings(run_open(vec![], in_flight(), 7)).is_empty());
    assert_eq!(
        findings(run_open(vec![], in_flight(), 4)),
        ["vendor_missing"]
    );
    assert_eq!(findings(run_open(vec![], in_flight(), 8)), ["vendor_extra"]);
}

#[test]
fn period_value_meters_compare_their_latest_sent_value_in_the_open_period() {
    let meters =
        Catalog::parse("[meters.calls]\naggregation = \"max\"\nstripe_event_name = \"calls\"\n")
            .unwrap()
            .meters;
    let open = HashMap::from([("t".to_owned(), (START, PERIOD_END))]);
    let run = |vendor: i64| {
        let mut units = unit(Some(0));
        units[0].invoice = None;
        let mut ledger = Ledger::new(&meters, units, &open, NOW);
        let mut later = push("q", 9, "sent", Some(START + 9000));
        later.timestamp += 60;
        ledger.add_push(push("p", 4, "sent", Some(START + 5000)));
        ledger.add_push(later);
        let vendor = HashMap::from([(
            ("t".to_owned(), "calls".to_owned(), START),
            Decimal::from(vendor),
        )]);
        (ledger.finish(&vendor).into_iter())
            .map(|i| i.finding.as_str())
            .collect::<Vec<_>>()
    };
    assert!(run(9).is_empty());
    assert_eq!(run(4), ["vendor_missing"]);
    assert_eq!(run(13), ["vendor_extra"]);
}

/// The open period's `vendor_missing` proposes the missing difference, stamped just before the
/// settle point, with an identifier that follows the finding; a repair on its way holds back
/// another, and a settled one counts as what Stripe should hold.
#[test]
fn missing_usage_gets_a_repair_derived_from_the_finding() {
    let sent = Some(START + 5000);
    let pushes = || vec![push("p", 5, "sent", sent), push("q", 2, "sent", sent)];
    let missing = run_open(vec![], pushes(), 3);
    let repair = &missing[0].repair.as_ref().expect("a repair").push;
    assert_eq!(repair.kind, "repair");
    assert_eq!(repair.value, "4");
    assert_eq!(repair.timestamp, (END - 1000) / 1000);
    assert_eq!(repair.window_start, START);
    assert!(repair.push_id.starts_with("bsr_") && repair.push_id.len() <= 100);
    let again = run_open(vec![], pushes(), 3);
    assert_eq!(
        again[0].repair.as_ref().unwrap().push.push_id,
        repair.push_id
    );
    let other = run_open(vec![], pushes(), 4);
    assert_ne!(
        other[0].repair.as_ref().unwrap().push.push_id,
        repair.push_id
    );

    let repaired = |status: &str, sent_at: Option<i64>| {
        let mut r = repair.clone();
        r.status = status.to_owned();
        r.sent_at = sent_at;
        let mut all = pushes();
        all.push(r);
        all
    };
    // On its way: pending, or sent after the settle point.
    for (status, at) in [("pending", None), ("sent", Some(END + 1))] {
        let items = run_open(vec![], repaired(status, at), 3);
        assert_eq!(items[0].finding, Finding::VendorMissing);
        assert!(items[0].repair.is_none(), "{status}");
        assert_eq!(items[0].detail["repair"]["status"], "none");
    }
    // Settled and kept by Stripe: nothing is missing; the repair is not usage.
    assert!(run_open(vec![], repaired("sent", Some(END - 1)), 7).is_empty());
    // Settled and lost again: the same finding, the same identifier (a no-op at Stripe).
    let lost = run_open(vec![], repaired("sent", Some(END - 1)), 3);
    assert_eq!(
        lost[0].repair.as_ref().unwrap().push.push_id,
        repair.push_id
    );
    assert_eq!(
        lost[0].detail["evidence"]["repairs"][0]["push_id"],
        repair.push_id.as_str()
    );
}

/// A draft invoice's line is compared and repaired like the open period; a final invoice's is
/// never repaired, only reported with its remedy.
#[test]
fn only_a_draft_invoice_is_repaired() {
    let run = |is_final: bool| {
        let meters = meters();
        let open = HashMap::new();
        let mut units = unit(Some(3));
        let line = units[0].invoice.as_mut().unwrap();
        line.is_final = is_final;
        let mut ledger = Ledger::new(&meters, units, &open, NOW);
        ledger.add_event(event("a", 5, Some("p")));
        ledger.add_push(push("p", 5, "sent", Some(START + 5000)));
        let vendor = HashMap::from([(
            ("t".to_owned(), "calls".to_owned(), START),
            Decimal::from(3),
        )]);
        ledger.finish(&vendor)
    };
    let draft = run(false);
    assert_eq!(draft[0].finding, Finding::VendorMissing);
    assert_eq!(draft[0].repair.as_ref().unwrap().push.value, "2");
    let last = draft[0].repair.as_ref().unwrap().push.timestamp;
    assert_eq!(
        last,
        (END - 1000) / 1000,
        "stamped inside the invoice's period"
    );
    let final_ = run(true);
    assert_eq!(final_[0].finding, Finding::VendorMismatch);
    assert!(final_[0].repair.is_none());
    assert!(
        final_[0].detail["remedy"]
            .as_str()
            .unwrap()
            .contains("never repaired")
    );
}

/// A period-value meter's repair pushes the period's value again, stamped now.
#[test]
fn a_period_value_repair_pushes_the_value_again_after_the_last_push() {
    let meters =
        Catalog::parse("[meters.calls]\naggregation = \"max\"\nstripe_event_name = \"calls\"\n")
            .unwrap()
            .meters;
    let open = HashMap::from([("t".to_owned(), (START, PERIOD_END))]);
    let mut units = unit(Some(0));
    units[0].invoice = None;
    let mut ledger = Ledger::new(&meters, units, &open, NOW);
    let mut latest = push("q", 9, "sent", Some(START + 9000));
    latest.timestamp += 60;
    ledger.add_push(push("p", 4, "sent", Some(START + 5000)));
    ledger.add_push(latest);
    let vendor = HashMap::from([(
        ("t".to_owned(), "calls".to_owned(), START),
        Decimal::from(4),
    )]);
    let items = ledger.finish(&vendor);
    let repair = &items[0].repair.as_ref().unwrap().push;
    assert_eq!(repair.value, "9");
    // As late as now allows: Stripe's `last` takes it over every earlier push.
    assert_eq!(repair.timestamp, NOW / 1000);
}
