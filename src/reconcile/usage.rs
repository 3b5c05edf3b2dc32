//! Usage: per tenant, meter and billing period, what billsync accepted, what it pushed and Stripe
//! acknowledged, what Stripe holds, and what the invoice billed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::{Finding, Item};
use crate::catalog::{Aggregation, Meter};
use crate::domain::rfc3339;
use crate::store::{PushRow, UsageFact};

/// Most event ids an item lists as evidence (the count is always given).
const MAX_EVENT_IDS: usize = 100;

/// One billed period of one meter for one tenant: an invoice line, or (for usage no invoice
/// covers) the stretch of closed time it fell in.
#[derive(Debug, Clone)]
pub struct Unit {
    pub tenant_id: String,
    pub customer_id: String,
    pub meter: String,
    /// Unix ms, `[start, end)`.
    pub start: i64,
    pub end: i64,
    pub invoice: Option<InvoiceLine>,
}

#[derive(Debug, Clone)]
pub struct InvoiceLine {
    pub invoice_id: String,
    pub line_id: Option<String>,
    pub quantity: Option<Decimal>,
    /// When the invoice was finalized (or created), Unix ms: usage pushed later missed it.
    pub billed_at: i64,
}

/// What the units add up to, with the evidence.
#[derive(Debug, Default)]
struct Tally {
    events: Vec<UsageFact>,
    pushes: Vec<PushRow>,
}

/// Builds the usage items. `units` are the invoice lines of metered prices in the window;
/// usage in closed time no unit covers becomes `invoice_missing`; usage after `open_from`
/// (per tenant: the current period's start) is not billed yet and is left out.
pub fn reconcile(
    meters: &BTreeMap<String, Meter>,
    units: Vec<Unit>,
    events: Vec<UsageFact>,
    pushes: Vec<PushRow>,
    open_from: &HashMap<String, i64>,
    vendor_usage: &HashMap<(String, String, i64), Decimal>,
) -> Vec<Item> {
    // Units by (tenant, meter), sorted by start, to place each event and push.
    let mut by_key: BTreeMap<(String, String), Vec<(Unit, Tally)>> = BTreeMap::new();
    for unit in units {
        by_key
            .entry((unit.tenant_id.clone(), unit.meter.clone()))
            .or_default()
            .push((unit, Tally::default()));
    }
    for list in by_key.values_mut() {
        list.sort_by_key(|(u, _)| u.start);
    }
    let mut uncovered: BTreeMap<(String, String), Tally> = BTreeMap::new();
    for event in events {
        let Some(meter) = meters.get(&event.meter) else {
            continue;
        };
        if meter.stripe_event_name.is_none() {
            continue;
        }
        let key = (event.tenant_id.clone(), event.meter.clone());
        if let Some(list) = by_key.get_mut(&key)
            && let Some((_, tally)) = list
                .iter_mut()
                .find(|(u, _)| u.start <= event.occurred_at && event.occurred_at < u.end)
        {
            tally.events.push(event);
            continue;
        }
        let open = open_from
            .get(&event.tenant_id)
            .is_some_and(|from| event.occurred_at >= *from);
        if !open {
            uncovered.entry(key).or_default().events.push(event);
        }
    }
    // A push belongs where its events are: by the window it was stamped for.
    for push in pushes {
        let key = (push.tenant_id.clone(), push.meter.clone());
        let at = push.timestamp * 1000;
        if let Some(list) = by_key.get_mut(&key)
            && let Some((_, tally)) = list.iter_mut().find(|(u, _)| u.start <= at && at < u.end)
        {
            tally.pushes.push(push);
            continue;
        }
        if let Some(tally) = uncovered.get_mut(&key) {
            tally.pushes.push(push);
        }
    }

    let mut items = Vec::new();
    for ((tenant, meter_name), list) in by_key {
        let Some(meter) = meters.get(&meter_name) else {
            continue;
        };
        for (unit, tally) in list {
            let vendor = vendor_usage
                .get(&(tenant.clone(), meter_name.clone(), unit.start))
                .copied();
            if let Some(item) = compare(meter, &unit, &tally, vendor) {
                items.push(item);
            }
        }
    }
    for ((tenant, meter_name), tally) in uncovered {
        let Some(meter) = meters.get(&meter_name) else {
            continue;
        };
        let accepted = aggregate(meter, &tally.events);
        if accepted.is_none_or(|a| a.is_zero()) {
            continue;
        }
        let start = tally
            .events
            .iter()
            .map(|e| e.occurred_at)
            .min()
            .unwrap_or(0);
        let end = tally
            .events
            .iter()
            .map(|e| e.occurred_at)
            .max()
            .unwrap_or(0)
            + 1;
        let unit = Unit {
            tenant_id: tenant,
            customer_id: String::new(),
            meter: meter_name,
            start,
            end,
            invoice: None,
        };
        items.push(item(
            Finding::InvoiceMissing,
            &unit,
            &tally,
            accepted,
            pushed(meter, &tally.pushes),
            None,
            "no invoice line bills this usage, though its period has closed",
        ));
    }
    items
}

/// The item for one unit, or `None` when its four figures agree.
fn compare(meter: &Meter, unit: &Unit, tally: &Tally, vendor: Option<Decimal>) -> Option<Item> {
    let accepted = aggregate(meter, &tally.events);
    let pushed = pushed(meter, &tally.pushes);
    let invoiced = unit.invoice.as_ref().and_then(|line| line.quantity);
    let zero = Decimal::ZERO;
    let (a, p) = (accepted.unwrap_or(zero), pushed.unwrap_or(zero));
    if a != p {
        let waiting = tally.events.iter().any(|e| e.push_id.is_none())
            || tally.pushes.iter().any(|p| p.status == "pending");
        let (finding, cause) = if waiting {
            (
                Finding::NotYetPushed,
                "accepted usage has not reached Stripe yet",
            )
        } else if tally.pushes.iter().any(|p| p.status == "rejected") {
            (
                Finding::RejectedByVendor,
                "Stripe refused a push of this usage",
            )
        } else if tally.pushes.iter().any(|p| p.status == "expired") {
            (
                Finding::OutsideVendorWindow,
                "the usage arrived more than 35 days late, outside what Stripe's meters take",
            )
        } else {
            (
                Finding::Unexplained,
                "accepted and pushed differ with every push sent",
            )
        };
        return Some(item(finding, unit, tally, accepted, pushed, vendor, cause));
    }
    if let Some(v) = vendor
        && v != p
    {
        return Some(item(
            Finding::VendorMismatch,
            unit,
            tally,
            accepted,
            pushed,
            vendor,
            "Stripe's meter holds another figure than billsync pushed",
        ));
    }
    let billed = vendor.unwrap_or(p);
    match (&unit.invoice, invoiced) {
        (Some(line), Some(invoiced)) if invoiced != billed => {
            let late = tally
                .pushes
                .iter()
                .any(|p| p.sent_at.is_some_and(|at| at > line.billed_at));
            let (finding, cause) = if late {
                (
                    Finding::ArrivedAfterInvoice,
                    "some of the usage reached Stripe after the invoice was finalized",
                )
            } else {
                (
                    Finding::InvoiceMismatch,
                    "the invoice bills another quantity than Stripe's meter holds",
                )
            };
            Some(item(finding, unit, tally, accepted, pushed, vendor, cause))
        }
        _ => None,
    }
}

fn item(
    finding: Finding,
    unit: &Unit,
    tally: &Tally,
    accepted: Option<Decimal>,
    pushed: Option<Decimal>,
    vendor: Option<Decimal>,
    cause: &str,
) -> Item {
    let fig = |d: Option<Decimal>| d.map(|d| d.normalize().to_string());
    let unpushed: Vec<&str> = tally
        .events
        .iter()
        .filter(|e| e.push_id.is_none())
        .map(|e| e.event_id.as_str())
        .collect();
    let push_ids: BTreeSet<&str> = tally.pushes.iter().map(|p| p.push_id.as_str()).collect();
    let not_sent: Vec<Value> = tally
        .pushes
        .iter()
        .filter(|p| p.status != "sent")
        .map(|p| json!({"push_id": p.push_id, "status": p.status, "last_error": p.last_error}))
        .collect();
    Item {
        area: "usage",
        finding,
        tenant_id: Some(unit.tenant_id.clone()),
        detail: json!({
            "meter": unit.meter,
            "period_start": rfc3339(unit.start),
            "period_end": rfc3339(unit.end),
            "accepted": fig(accepted),
            "pushed": fig(pushed),
            "vendor": fig(vendor),
            "invoiced": fig(unit.invoice.as_ref().and_then(|l| l.quantity)),
            "cause": cause,
            "evidence": {
                "events": tally.events.len(),
                "unpushed_event_ids": unpushed.iter().take(MAX_EVENT_IDS).collect::<Vec<_>>(),
                "unpushed_events": unpushed.len(),
                "push_ids": push_ids,
                "pushes_not_sent": not_sent,
                "invoice": unit.invoice.as_ref().map(|l| l.invoice_id.clone()),
                "invoice_line": unit.invoice.as_ref().and_then(|l| l.line_id.clone()),
            },
        }),
    }
}

/// The meter's figure for the events, as its aggregation folds them; `None` without events.
pub fn aggregate(meter: &Meter, events: &[UsageFact]) -> Option<Decimal> {
    if events.is_empty() {
        return None;
    }
    let quantity = |e: &UsageFact| Decimal::from_str(&e.quantity).unwrap_or_default();
    Some(match meter.aggregation {
        Aggregation::Sum => events.iter().map(quantity).sum(),
        Aggregation::Count => Decimal::from(events.len()),
        Aggregation::Max => events.iter().map(quantity).max().unwrap_or_default(),
        Aggregation::Last => events
            .iter()
            .max_by_key(|e| (e.occurred_at, e.received_at, e.event_id.as_str()))
            .map(quantity)
            .unwrap_or_default(),
        Aggregation::UniqueCount => Decimal::from(
            events
                .iter()
                .filter_map(|e| e.unique_value.as_deref())
                .collect::<BTreeSet<_>>()
                .len(),
        ),
    })
}

/// What Stripe acknowledged: the sum of sent deltas, or for period-value meters the latest
/// sent running value.
fn pushed(meter: &Meter, pushes: &[PushRow]) -> Option<Decimal> {
    let sent: Vec<&PushRow> = pushes.iter().filter(|p| p.status == "sent").collect();
    if sent.is_empty() {
        return None;
    }
    let value = |p: &PushRow| Decimal::from_str(&p.value).unwrap_or_default();
    Some(match meter.aggregation {
        Aggregation::Sum | Aggregation::Count => sent.iter().map(|p| value(p)).sum(),
        _ => sent
            .iter()
            .max_by_key(|p| (p.timestamp, p.created_at, p.push_id.as_str()))
            .map(|p| value(p))
            .unwrap_or_default(),
    })
}
