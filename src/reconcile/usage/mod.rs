//! Usage: per tenant, meter and billing period, what billsync accepted, what it pushed and Stripe
//! acknowledged, what Stripe holds, and what the invoice billed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::{Finding, Item};
use crate::catalog::{Aggregation, Meter};
use crate::domain::rfc3339;
use crate::store::{PushRow, UsageRow};

mod repair;
mod run;
pub use repair::{Repair, Repairs};

/// Most event ids an item lists as evidence (the count is always given).
const MAX_EVENT_IDS: usize = 100;

/// One billed period of one meter for one tenant: an invoice line; or, without one, the open
/// period from its start to the settle point (or, in a finished ledger, the stretch of closed
/// time that usage no invoice covers fell in).
#[derive(Debug, Clone)]
pub struct Unit {
    pub tenant_id: String,
    pub customer_id: String,
    pub meter: String,
    /// Unix ms, `[start, end)`.
    pub start: i64,
    pub end: i64,
    /// The end of the billing period the unit is in (Unix ms): a repair is stamped before it.
    pub period_end: i64,
    /// Pushes sent from here on (Unix ms) may not be in the vendor's totals yet: the open
    /// unit's end; for a draft invoice's line, now less the settle delay.
    pub settle_at: i64,
    /// `None`: the open period, not invoiced yet.
    pub invoice: Option<InvoiceLine>,
}

#[derive(Debug, Clone)]
pub struct InvoiceLine {
    pub invoice_id: String,
    pub line_id: Option<String>,
    pub quantity: Option<Decimal>,
    /// When the invoice was finalized (or created), Unix ms: usage pushed later missed it.
    pub billed_at: i64,
    /// Final (not a draft): what it bills can no longer change, so it is never repaired.
    pub is_final: bool,
}

/// What the events and pushes of one unit add up to, folded as they stream past, with the
/// evidence.
#[derive(Debug, Default)]
struct Tally {
    events: usize,
    sum: Decimal,
    max: Option<Decimal>,
    /// `(occurred_at, received_at, event_id)` and quantity of the latest event.
    last: Option<((i64, i64, String), Decimal)>,
    uniques: BTreeSet<String>,
    first_at: Option<i64>,
    last_at: Option<i64>,
    unpushed: usize,
    /// The smallest unpushed event ids (in id order, whatever order they were read in), as
    /// evidence.
    unpushed_ids: BTreeSet<String>,
    pushes: Vec<PushRow>,
    /// Reconciliation's repairs of the unit (see [`Repair`]): not usage, kept apart.
    repairs: Vec<PushRow>,
}

impl Tally {
    fn add(&mut self, event: UsageRow) {
        let quantity = Decimal::from_str(&event.quantity).unwrap_or_default();
        self.events += 1;
        self.sum += quantity;
        self.max = Some(self.max.map_or(quantity, |m| m.max(quantity)));
        self.first_at = Some(
            self.first_at
                .map_or(event.occurred_at, |f| f.min(event.occurred_at)),
        );
        self.last_at = Some(
            self.last_at
                .map_or(event.occurred_at, |l| l.max(event.occurred_at)),
        );
        if let Some(value) = event.unique_value {
            self.uniques.insert(value);
        }
        if event.push_id.is_none() {
            self.unpushed += 1;
            self.unpushed_ids.insert(event.event_id.clone());
            if self.unpushed_ids.len() > MAX_EVENT_IDS {
                self.unpushed_ids.pop_last();
            }
        }
        let key = (event.occurred_at, event.received_at, event.event_id);
        if self.last.as_ref().is_none_or(|(k, _)| key > *k) {
            self.last = Some((key, quantity));
        }
    }
}

/// The usage side of a run: the units (invoice lines of metered prices in the window), folded
/// with every event and push as they are read, so that memory grows with the units, not with
/// the events.
pub struct Ledger<'a> {
    meters: &'a BTreeMap<String, Meter>,
    /// tenant → meter → units sorted by start, each with its tally.
    units: HashMap<String, HashMap<String, Vec<(Unit, Tally)>>>,
    /// Usage in closed time no unit covers, by (tenant, meter).
    uncovered: BTreeMap<(String, String), Tally>,
    /// Per tenant, its current period: usage after its start is not billed yet.
    open: &'a OpenPeriods,
    /// Now, Unix ms: a period-value repair is stamped after it.
    now: i64,
}

/// Per tenant, the current period of its liveliest subscription, `[start, end)` in Unix ms.
pub type OpenPeriods = HashMap<String, (i64, i64)>;

impl<'a> Ledger<'a> {
    pub fn new(
        meters: &'a BTreeMap<String, Meter>,
        units: Vec<Unit>,
        open: &'a OpenPeriods,
        now: i64,
    ) -> Self {
        let mut by_tenant: HashMap<String, HashMap<String, Vec<(Unit, Tally)>>> = HashMap::new();
        for unit in units {
            by_tenant
                .entry(unit.tenant_id.clone())
                .or_default()
                .entry(unit.meter.clone())
                .or_default()
                .push((unit, Tally::default()));
        }
        for list in by_tenant.values_mut().flat_map(|m| m.values_mut()) {
            list.sort_by_key(|(u, _)| u.start);
        }
        Self {
            meters,
            units: by_tenant,
            uncovered: BTreeMap::new(),
            open,
            now,
        }
    }

    pub fn add_event(&mut self, event: UsageRow) {
        if self
            .meters
            .get(&event.meter)
            .is_none_or(|m| m.stripe_event_name.is_none())
        {
            return;
        }
        if let Some(list) = self
            .units
            .get_mut(&event.tenant_id)
            .and_then(|m| m.get_mut(&event.meter))
            && let Some((_, tally)) = list
                .iter_mut()
                .find(|(u, _)| u.start <= event.occurred_at && event.occurred_at < u.end)
        {
            tally.add(event);
            return;
        }
        let open = (self.open.get(&event.tenant_id)).is_some_and(|p| event.occurred_at >= p.0);
        if !open {
            self.uncovered
                .entry((event.tenant_id.clone(), event.meter.clone()))
                .or_default()
                .add(event);
        }
    }

    /// A push belongs where its events are: by the time it was stamped with. A repair belongs
    /// to the unit it repaired: by the start it names.
    pub fn add_push(&mut self, push: PushRow) {
        if push.kind == "repair" {
            let unit = (self.units.get_mut(&push.tenant_id))
                .and_then(|m| m.get_mut(&push.meter))
                .and_then(|list| list.iter_mut().find(|(u, _)| u.start == push.window_start));
            if let Some((_, tally)) = unit {
                tally.repairs.push(push);
            }
            return;
        }
        let at = push.timestamp * 1000;
        if let Some(list) = self
            .units
            .get_mut(&push.tenant_id)
            .and_then(|m| m.get_mut(&push.meter))
            && let Some((_, tally)) = list.iter_mut().find(|(u, _)| u.start <= at && at < u.end)
        {
            tally.pushes.push(push);
            return;
        }
        // A push in open time carries usage not billed yet, not the closed time's.
        let open = (self.open.get(&push.tenant_id)).is_some_and(|p| at >= p.0);
        if !open
            && let Some(tally) = self
                .uncovered
                .get_mut(&(push.tenant_id.clone(), push.meter.clone()))
        {
            tally.pushes.push(push);
        }
    }

    /// The items, with the vendor's totals by (tenant, meter, unit start) where known.
    pub fn finish(self, vendor_usage: &HashMap<(String, String, i64), Decimal>) -> Vec<Item> {
        let mut items = Vec::new();
        for list in self.units.into_values().flat_map(|m| m.into_values()) {
            for (unit, tally) in list {
                let Some(meter) = self.meters.get(&unit.meter) else {
                    continue;
                };
                let vendor = vendor_usage
                    .get(&(unit.tenant_id.clone(), unit.meter.clone(), unit.start))
                    .copied();
                items.extend(compare(meter, &unit, &tally, vendor, self.now));
            }
        }
        for ((tenant, meter_name), tally) in self.uncovered {
            let Some(meter) = self.meters.get(&meter_name) else {
                continue;
            };
            let accepted = aggregate(meter, &tally);
            if accepted.is_none_or(|a| a.is_zero()) {
                continue;
            }
            let unit = Unit {
                tenant_id: tenant,
                customer_id: String::new(),
                meter: meter_name,
                start: tally.first_at.unwrap_or(0),
                end: tally.last_at.unwrap_or(0) + 1,
                period_end: tally.last_at.unwrap_or(0) + 1,
                settle_at: tally.last_at.unwrap_or(0) + 1,
                invoice: None,
            };
            let pushed = pushed(meter, &tally.pushes);
            // Usage that never reached Stripe says so first; pushed usage lacks its invoice.
            let item = match not_pushed(&tally, accepted, pushed) {
                Some((finding, cause)) => {
                    item(finding, &unit, &tally, accepted, pushed, None, cause)
                }
                None => item(
                    Finding::InvoiceMissing,
                    &unit,
                    &tally,
                    accepted,
                    pushed,
                    None,
                    "no invoice line bills this usage, though its period has closed",
                ),
            };
            items.push(item);
        }
        items
    }
}

/// Why accepted and pushed differ, when they do.
fn not_pushed(
    tally: &Tally,
    accepted: Option<Decimal>,
    pushed: Option<Decimal>,
) -> Option<(Finding, &'static str)> {
    if accepted.unwrap_or_default() == pushed.unwrap_or_default() {
        return None;
    }
    let waiting = tally.unpushed > 0 || tally.pushes.iter().any(|p| p.status == "pending");
    Some(if waiting {
        (
            Finding::NotYetPushed,
            "accepted usage has not reached Stripe yet (a tenant without a Stripe customer waits)",
        )
    } else if tally.pushes.iter().any(|p| p.status == "rejected") {
        (
            Finding::RejectedByVendor,
            "Stripe refused a push of this usage",
        )
    } else if tally.pushes.iter().any(|p| p.status == "invoice_final") {
        (
            Finding::ArrivedAfterInvoice,
            "the usage arrived after its period's invoice was final and was not sent: bill it \
             or credit it by hand",
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
    })
}

/// The meter's figure for the events, as its aggregation folds them; `None` without events.
fn aggregate(meter: &Meter, tally: &Tally) -> Option<Decimal> {
    if tally.events == 0 {
        return None;
    }
    Some(match meter.aggregation {
        Aggregation::Sum => tally.sum,
        Aggregation::Count => Decimal::from(tally.events),
        Aggregation::Max => tally.max.unwrap_or_default(),
        Aggregation::Last => tally.last.as_ref().map(|(_, q)| *q).unwrap_or_default(),
        Aggregation::UniqueCount => Decimal::from(tally.uniques.len()),
    })
}

/// The item for one unit, or `None` when its four figures agree.
fn compare(
    meter: &Meter,
    unit: &Unit,
    tally: &Tally,
    vendor: Option<Decimal>,
    now: i64,
) -> Option<Item> {
    let accepted = aggregate(meter, tally);
    let pushed = pushed(meter, &tally.pushes);
    let invoiced = unit.invoice.as_ref().and_then(|line| line.quantity);
    let p = pushed.unwrap_or_default();
    let line = match &unit.invoice {
        // Not invoiced yet, or a draft whose usage may still change: what Stripe holds is
        // compared first, since it can still be repaired.
        None => return compare_settling(meter, unit, tally, accepted, vendor, now),
        Some(line) if !line.is_final => {
            return compare_settling(meter, unit, tally, accepted, vendor, now).or_else(|| {
                let (finding, cause) = not_pushed(tally, accepted, pushed)?;
                Some(item(finding, unit, tally, accepted, pushed, vendor, cause))
            });
        }
        Some(line) => line,
    };
    if let Some((finding, cause)) = not_pushed(tally, accepted, pushed) {
        return Some(item(finding, unit, tally, accepted, pushed, vendor, cause));
    }
    if vendor_differs(p, p, vendor).is_some() {
        let mut item = item(
            Finding::VendorMismatch,
            unit,
            tally,
            accepted,
            pushed,
            vendor,
            "Stripe's meter holds another figure than billsync pushed",
        );
        item.detail["remedy"] = json!(FINAL_REMEDY);
        return Some(item);
    }
    let billed = vendor.unwrap_or(p);
    match invoiced {
        Some(invoiced) if invoiced != billed => {
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

/// What a final invoice's period gets instead of a repair.
const FINAL_REMEDY: &str = "the period's invoice is final and is never repaired: settle the \
                            difference by hand (a credit note, or an invoice item for usage \
                            Stripe lost)";

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
    let push_ids: BTreeSet<&str> = tally.pushes.iter().map(|p| p.push_id.as_str()).collect();
    let not_sent: Vec<Value> = tally
        .pushes
        .iter()
        // A superseded push's events went out in the newer value that replaced it.
        .filter(|p| p.status != "sent" && p.status != "superseded")
        .map(|p| json!({"push_id": p.push_id, "status": p.status, "last_error": p.last_error}))
        .collect();
    let repairs: Vec<Value> = (tally.repairs.iter())
        .map(|r| {
            let before = unit.invoice.as_ref().map(|line| {
                r.sent_at
                    .is_some_and(|at| at < line.billed_at || !line.is_final)
            });
            json!({"push_id": r.push_id, "value": r.value, "status": r.status,
                   "sent_at": r.sent_at.map(rfc3339), "before_finalization": before})
        })
        .collect();
    Item {
        area: "usage",
        finding,
        tenant_id: Some(unit.tenant_id.clone()),
        repair: None,
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
                "events": tally.events,
                "unpushed_event_ids": tally.unpushed_ids,
                "unpushed_events": tally.unpushed,
                "push_ids": push_ids,
                "pushes_not_sent": not_sent,
                "invoice": unit.invoice.as_ref().map(|l| l.invoice_id.clone()),
                "invoice_line": unit.invoice.as_ref().and_then(|l| l.line_id.clone()),
                "repairs": repairs,
            },
        }),
    }
}

/// The open period, or a draft invoice's line: only what Stripe acknowledged against what its
/// meter holds, since accepted usage may still be on its way (a push after the settle point
/// carries events from before it). A push sent after the settle point may not be in Stripe's
/// summaries yet: its meter may hold what was pushed with or without it. Missing usage gets a
/// proposed [`Repair`].
fn compare_settling(
    meter: &Meter,
    unit: &Unit,
    tally: &Tally,
    accepted: Option<Decimal>,
    vendor: Option<Decimal>,
    now: i64,
) -> Option<Item> {
    let pushed = pushed(meter, &tally.pushes);
    let settled: Vec<PushRow> = (tally.pushes.iter())
        .filter(|p| p.sent_at.is_some_and(|at| at < unit.settle_at))
        .cloned()
        .collect();
    let with = pushed.unwrap_or_default();
    let without = self::pushed(meter, &settled).unwrap_or_default();
    let low = with.min(without);
    let (finding, cause) = vendor_differs(low, with.max(without), vendor)?;
    let mut item = item(finding, unit, tally, accepted, pushed, vendor, cause);
    let mut sent: Vec<&PushRow> = (tally.pushes.iter())
        .filter(|p| p.status == "sent")
        .collect();
    sent.sort_by_key(|p| std::cmp::Reverse((p.timestamp, p.created_at, p.push_id.as_str())));
    let shown: Vec<Value> = (sent.iter().take(MAX_EVENT_IDS))
        .map(|p| {
            json!({
                "push_id": p.push_id,
                "value": p.value,
                "timestamp": rfc3339(p.timestamp * 1000),
                "sent_at": p.sent_at.map(rfc3339),
            })
        })
        .collect();
    item.detail["evidence"]["sent_pushes"] = json!(shown);
    item.detail["evidence"]["sent_push_count"] = json!(sent.len());
    if finding == Finding::VendorMissing
        && let Some(vendor) = vendor
    {
        match repair::proposal(meter, unit, tally, low, vendor, now) {
            Ok(push) => item.repair = Some(Repair { push }),
            Err(why) => item.detail["repair"] = json!({"status": "none", "reason": why}),
        }
    }
    Some(item)
}

/// The one comparison of what Stripe acknowledged with what its meter holds: a vendor figure
/// below `low` is missing usage, above `high` extra usage (for billed periods `low` = `high`,
/// and either is a `vendor_mismatch`).
fn vendor_differs(
    low: Decimal,
    high: Decimal,
    vendor: Option<Decimal>,
) -> Option<(Finding, &'static str)> {
    let v = vendor?;
    if v < low {
        Some((
            Finding::VendorMissing,
            "Stripe's meter holds less than billsync pushed and Stripe acknowledged",
        ))
    } else if v > high {
        Some((
            Finding::VendorExtra,
            "Stripe's meter holds more than billsync pushed",
        ))
    } else {
        None
    }
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

#[cfg(test)]
mod tests;
