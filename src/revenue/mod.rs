//! Revenue recognition: each finalized invoice line becomes a schedule of daily amounts (what
//! was earned when), and credit notes, refunds and voids take revenue back from their own date
//! on. Everything is integer minor units per currency, and a line's days add up to the line
//! exactly. The schedule is rebuilt from the mirror (and the usage log, for metered lines) on
//! every request: the same invoices give the same schedule.

pub mod report;

use std::collections::{BTreeMap, HashMap, HashSet};

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::Serialize;
use serde_json::Value;

use crate::stripe::objects;

pub use report::{Group, Report, report};

/// A day: days since 1970-01-01, UTC.
pub type Day = i64;

const SECONDS_PER_DAY: i64 = 86_400;

pub fn day_of(unix_secs: i64) -> Day {
    unix_secs.div_euclid(SECONDS_PER_DAY)
}

/// How a line's revenue is earned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Ratably per day over the line's service period (licensed prices, prorations).
    Subscription,
    /// On the days the usage happened (metered prices).
    Usage,
    /// On the invoice's finalization day.
    OneOff,
    /// Revenue taken back by a credit note, a refund or a void.
    Reversal,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Self::Subscription,
        Self::Usage,
        Self::OneOff,
        Self::Reversal,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscription => "subscription",
            Self::Usage => "usage",
            Self::OneOff => "one_off",
            Self::Reversal => "reversal",
        }
    }
}

/// One invoice line's revenue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRevenue {
    pub tenant_id: String,
    pub invoice_id: String,
    pub line_id: String,
    pub currency: String,
    pub kind: Kind,
    /// Net of discounts and of tax included in the price; what the line bills as revenue.
    pub amount: i64,
    /// The invoice's finalization day: when the amount is billed.
    pub billed_day: Day,
    pub service_start: Option<Day>,
    pub service_end: Option<Day>,
    /// The invoice is uncollectible: still recognised, flagged.
    pub uncollectible: bool,
    /// `(day, amount)`, ascending, adding up to `amount`.
    pub entries: Vec<(Day, i64)>,
}

/// Revenue taken back from one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    pub tenant_id: String,
    pub invoice_id: String,
    pub line_id: String,
    pub currency: String,
    /// The credit note, refund or invoice (void) behind it.
    pub source: String,
    /// `credit_note`, `refund` or `void`.
    pub cause: &'static str,
    pub day: Day,
    /// Taken back (positive for a credit on a positive line).
    pub amount: i64,
    /// `(day, amount)`, every day at or after `day`, adding up to `-amount`.
    pub entries: Vec<(Day, i64)>,
}

/// The whole schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    pub lines: Vec<LineRevenue>,
    pub adjustments: Vec<Adjustment>,
}

/// What the schedule is built from.
#[derive(Default)]
pub struct Inputs {
    /// `(tenant, invoice)` as mirrored.
    pub invoices: Vec<(String, Value)>,
    pub credit_notes: Vec<Value>,
    pub charges: Vec<Value>,
    /// Price (or plan) id → meter, for metered lines.
    pub price_meter: HashMap<String, String>,
    /// `(tenant, meter)` → usage per day.
    pub usage: HashMap<(String, String), BTreeMap<Day, Decimal>>,
}

/// Splits `total` in proportion to `weights` (non-negative), exactly: each share is rounded
/// toward zero and what is left goes one unit at a time to the first shares.
pub fn split(total: i64, weights: &[i128]) -> Vec<i64> {
    let sum: i128 = weights.iter().sum();
    if weights.is_empty() {
        return Vec::new();
    }
    if sum <= 0 {
        let mut shares = vec![0; weights.len()];
        shares[0] = total;
        return shares;
    }
    let sign = if total < 0 { -1 } else { 1 };
    let magnitude = i128::from(total).abs();
    let mut shares: Vec<i128> = weights.iter().map(|w| magnitude * w / sum).collect();
    let mut left = magnitude - shares.iter().sum::<i128>();
    for share in shares.iter_mut() {
        if left == 0 {
            break;
        }
        *share += 1;
        left -= 1;
    }
    shares.into_iter().map(|s| (s as i64) * sign).collect()
}

/// Builds the schedule. Lines of draft invoices are left out; a void invoice's lines are taken
/// back in full on the day it was voided.
pub fn build(inputs: &Inputs) -> Schedule {
    let mut builder = Builder::default();
    for (tenant, raw) in &inputs.invoices {
        builder.invoice(inputs, tenant, raw);
    }
    builder.finish(&inputs.credit_notes, &inputs.charges)
}

/// Builds a schedule an invoice at a time (so that invoices can stream past), then applies the
/// credit notes and refunds.
#[derive(Default)]
pub struct Builder {
    schedule: Schedule,
    /// Lines by invoice, for credit notes and refunds.
    by_invoice: HashMap<String, Vec<usize>>,
    /// Each invoice's total (tax included): refunds are of money, and only the revenue share of
    /// them comes off the lines.
    totals: HashMap<String, i64>,
    /// Payment intent → invoice, for charges that do not name their invoice (newer versions).
    intents: HashMap<String, String>,
}

impl Builder {
    /// Adds an invoice's lines (`inputs` gives the meters and usage; its lists are not read).
    pub fn invoice(&mut self, inputs: &Inputs, tenant: &str, raw: &Value) {
        let status = raw["status"].as_str().unwrap_or("");
        if !matches!(status, "open" | "paid" | "uncollectible" | "void") {
            return;
        }
        let invoice_id = objects::id_of(&raw["id"]).unwrap_or_default();
        let currency = raw["currency"].as_str().unwrap_or("").to_ascii_lowercase();
        let finalized = raw["status_transitions"]["finalized_at"]
            .as_i64()
            .or_else(|| objects::int(&raw["created"]))
            .unwrap_or(0);
        let billed_day = day_of(finalized);
        self.totals
            .insert(invoice_id.clone(), objects::int(&raw["total"]).unwrap_or(0));
        for intent in objects::invoice_payment_intents(raw) {
            self.intents.insert(intent, invoice_id.clone());
        }
        let lines = raw["lines"]["data"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (n, line) in lines.iter().enumerate() {
            let revenue = line_revenue(inputs, tenant, &invoice_id, &currency, billed_day, n, line);
            let mut revenue = revenue;
            revenue.uncollectible = status == "uncollectible";
            self.by_invoice
                .entry(invoice_id.clone())
                .or_default()
                .push(self.schedule.lines.len());
            self.schedule.lines.push(revenue);
        }
        if status == "void" {
            let voided = raw["status_transitions"]["voided_at"]
                .as_i64()
                .map(day_of)
                .unwrap_or(billed_day);
            for &i in self
                .by_invoice
                .get(&invoice_id)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let line = &self.schedule.lines[i];
                let adjustment = take_back(line, &invoice_id, "void", voided, line.amount);
                self.schedule.adjustments.push(adjustment);
            }
        }
    }

    /// Applies credit notes and refunds, and returns the schedule.
    pub fn finish(mut self, credit_notes: &[Value], charges: &[Value]) -> Schedule {
        // Credit notes: per credited line, or spread over the invoice's lines.
        let mut covered_refunds: HashSet<String> = HashSet::new();
        // Per invoice, money its credit notes refunded: a charge whose refunds are not listed
        // (Stripe leaves them out unless asked) is not counted for it a second time.
        let mut refunded_by_notes: HashMap<String, i64> = HashMap::new();
        for note in credit_notes {
            if note["status"].as_str() == Some("void") {
                continue;
            }
            let refunds_money = !note["refund"].is_null()
                || note["refunds"].as_array().is_some_and(|r| !r.is_empty());
            if refunds_money && let Some(invoice) = objects::id_of(&note["invoice"]) {
                *refunded_by_notes.entry(invoice).or_default() +=
                    objects::int(&note["total"]).unwrap_or(0);
            }
            if let Some(refund) = objects::id_of(&note["refund"]) {
                covered_refunds.insert(refund);
            }
            for refund in note["refunds"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(id) = objects::id_of(&refund["refund"]) {
                    covered_refunds.insert(id);
                }
            }
            let Some(invoice_id) = objects::id_of(&note["invoice"]) else {
                continue;
            };
            let Some(lines) = self.by_invoice.get(&invoice_id) else {
                continue;
            };
            let source = objects::id_of(&note["id"]).unwrap_or_default();
            let day = day_of(objects::int(&note["created"]).unwrap_or(0));
            let mut unassigned = 0;
            for credit in note["lines"]["data"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                // Net of tax included in the price, like the invoice lines.
                let amount = objects::int(&credit["amount_excluding_tax"]).unwrap_or_else(|| {
                    objects::int(&credit["amount"]).unwrap_or(0) - inclusive_tax(credit)
                }) - sum_of(&credit["discount_amounts"], "amount");
                let target = objects::id_of(&credit["invoice_line_item"]).and_then(|id| {
                    lines
                        .iter()
                        .find(|&&i| self.schedule.lines[i].line_id == id)
                });
                match target {
                    Some(&i) => {
                        let adjustment =
                            take_back(&self.schedule.lines[i], &source, "credit_note", day, amount);
                        self.schedule.adjustments.push(adjustment);
                    }
                    None => unassigned += amount,
                }
            }
            if note["lines"]["data"]
                .as_array()
                .is_none_or(|l| l.is_empty())
            {
                unassigned = objects::int(&note["subtotal_excluding_tax"])
                    .or_else(|| objects::int(&note["subtotal"]))
                    .or_else(|| objects::int(&note["amount"]))
                    .unwrap_or(0);
            }
            spread(
                &mut self.schedule,
                lines,
                &source,
                "credit_note",
                day,
                unassigned,
            );
        }

        // Refunds no credit note accounts for: spread over the invoice's lines.
        for charge in charges {
            let Some(invoice_id) = objects::id_of(&charge["invoice"]).or_else(|| {
                objects::id_of(&charge["payment_intent"])
                    .and_then(|pi| self.intents.get(&pi).cloned())
            }) else {
                continue;
            };
            let Some(lines) = self.by_invoice.get(&invoice_id).cloned() else {
                continue;
            };
            let refunds: Vec<(String, i64, i64)> = match charge["refunds"]["data"].as_array() {
                Some(list) if !list.is_empty() => list
                    .iter()
                    .filter(|r| r["status"].as_str() != Some("failed"))
                    .map(|r| {
                        (
                            objects::id_of(&r["id"]).unwrap_or_default(),
                            objects::int(&r["amount"]).unwrap_or(0),
                            objects::int(&r["created"]).unwrap_or(0),
                        )
                    })
                    .collect(),
                // Refunds not listed: their total, less what credit notes refunded; dated on
                // the charge's day, the only date there is.
                _ => match objects::int(&charge["amount_refunded"])
                    .map(|a| a - refunded_by_notes.get(&invoice_id).copied().unwrap_or(0))
                    .filter(|a| *a > 0)
                {
                    Some(amount) => vec![(
                        objects::id_of(&charge["id"]).unwrap_or_default(),
                        amount,
                        objects::int(&charge["created"]).unwrap_or(0),
                    )],
                    None => Vec::new(),
                },
            };
            let total = self.totals.get(&invoice_id).copied().unwrap_or(0);
            let revenue: i64 = lines.iter().map(|&i| self.schedule.lines[i].amount).sum();
            for (id, amount, created) in refunds {
                if covered_refunds.contains(&id) {
                    continue;
                }
                // The revenue share of the money refunded (tax is not revenue).
                let amount = if total > 0 && revenue != total {
                    (i128::from(amount) * i128::from(revenue) / i128::from(total)) as i64
                } else {
                    amount
                };
                spread(
                    &mut self.schedule,
                    &lines,
                    &id,
                    "refund",
                    day_of(created),
                    amount,
                );
            }
        }
        self.schedule
    }
}

/// Takes `amount` back from the invoice's lines in proportion to their amounts.
fn spread(
    schedule: &mut Schedule,
    lines: &[usize],
    source: &str,
    cause: &'static str,
    day: Day,
    amount: i64,
) {
    if amount == 0 || lines.is_empty() {
        return;
    }
    let weights: Vec<i128> = lines
        .iter()
        .map(|&i| i128::from(schedule.lines[i].amount.max(0)))
        .collect();
    for (&i, share) in lines.iter().zip(split(amount, &weights)) {
        if share != 0 {
            let adjustment = take_back(&schedule.lines[i], source, cause, day, share);
            schedule.adjustments.push(adjustment);
        }
    }
}

/// Takes `amount` of a line back from `day` on: what was earned before that day is reversed on
/// that day, in proportion to how much of the line was; the rest comes off the line's days
/// from `day` on, in proportion to them. Closed days are never rewritten.
fn take_back(
    line: &LineRevenue,
    source: &str,
    cause: &'static str,
    day: Day,
    amount: i64,
) -> Adjustment {
    let earned: i64 = line
        .entries
        .iter()
        .filter(|(d, _)| *d < day)
        .map(|(_, a)| a)
        .sum();
    let later: Vec<&(Day, i64)> = line.entries.iter().filter(|(d, _)| *d >= day).collect();
    let past_share = if line.amount == 0 || later.is_empty() {
        amount
    } else {
        (i128::from(amount) * i128::from(earned) / i128::from(line.amount)) as i64
    };
    let mut entries = Vec::new();
    if past_share != 0 {
        entries.push((day, -past_share));
    }
    let weights: Vec<i128> = later
        .iter()
        .map(|(_, a)| i128::from(a.unsigned_abs()))
        .collect();
    for ((d, _), share) in later.iter().zip(split(amount - past_share, &weights)) {
        if share != 0 {
            match entries.last_mut() {
                Some((last, a)) if last == d => *a -= share,
                _ => entries.push((*d, -share)),
            }
        }
    }
    Adjustment {
        tenant_id: line.tenant_id.clone(),
        invoice_id: line.invoice_id.clone(),
        line_id: line.line_id.clone(),
        currency: line.currency.clone(),
        source: source.to_owned(),
        cause,
        day,
        amount,
        entries,
    }
}

fn sum_of(list: &Value, field: &str) -> i64 {
    list.as_array()
        .map(|items| items.iter().filter_map(|i| objects::int(&i[field])).sum())
        .unwrap_or(0)
}

/// Tax included in a line's amount (older `tax_amounts[].inclusive`, newer
/// `taxes[].tax_behavior = inclusive`).
fn inclusive_tax(line: &Value) -> i64 {
    let older: i64 = line["tax_amounts"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|t| t["inclusive"] == true)
                .filter_map(|t| objects::int(&t["amount"]))
                .sum()
        })
        .unwrap_or(0);
    let newer: i64 = line["taxes"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|t| t["tax_behavior"] == "inclusive")
                .filter_map(|t| objects::int(&t["amount"]))
                .sum()
        })
        .unwrap_or(0);
    older + newer
}

fn line_revenue(
    inputs: &Inputs,
    tenant: &str,
    invoice_id: &str,
    currency: &str,
    billed_day: Day,
    n: usize,
    line: &Value,
) -> LineRevenue {
    let amount = objects::int(&line["amount"]).unwrap_or(0)
        - sum_of(&line["discount_amounts"], "amount")
        - inclusive_tax(line);
    let price = objects::price_of(line);
    let period = (
        objects::int(&line["period"]["start"]),
        objects::int(&line["period"]["end"]),
    );
    let recurring = line["price"]["recurring"].is_object() || line["plan"].is_object();
    let metered = price
        .as_deref()
        .and_then(|p| inputs.price_meter.get(p))
        .map(String::as_str)
        .or_else(|| {
            (line["price"]["recurring"]["usage_type"] == "metered"
                || line["plan"]["usage_type"] == "metered")
                .then_some("")
        });
    let subscription = line["type"] == "subscription"
        || line["parent"]["type"] == "subscription_item_details"
        || line["proration"] == true
        || line["parent"]["subscription_item_details"]["proration"] == true
        || recurring;
    let (kind, entries, service) = match period {
        (Some(start), Some(end)) if end > start && (subscription || metered.is_some()) => {
            let first = day_of(start);
            let days = ((end - start + SECONDS_PER_DAY / 2) / SECONDS_PER_DAY).max(1);
            let service = (Some(first), Some(first + days - 1));
            match metered {
                Some(meter) => {
                    let usage = inputs.usage.get(&(tenant.to_owned(), meter.to_owned()));
                    let daily: Vec<(Day, i128)> = usage
                        .map(|u| {
                            u.range(first..first + days)
                                .filter_map(|(d, q)| {
                                    // Weights in millionths of a unit, exact enough to share cents.
                                    let w = (*q * Decimal::from(1_000_000)).trunc().to_i128()?;
                                    (w > 0).then_some((*d, w))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let entries = if daily.is_empty() {
                        vec![(first + days - 1, amount)]
                    } else {
                        let weights: Vec<i128> = daily.iter().map(|(_, w)| *w).collect();
                        daily
                            .iter()
                            .map(|(d, _)| *d)
                            .zip(split(amount, &weights))
                            .collect()
                    };
                    (Kind::Usage, entries, service)
                }
                None => {
                    let shares = split(amount, &vec![1; days as usize]);
                    let entries = (0..days).map(|i| first + i).zip(shares).collect();
                    (Kind::Subscription, entries, service)
                }
            }
        }
        _ => (Kind::OneOff, vec![(billed_day, amount)], (None, None)),
    };
    LineRevenue {
        tenant_id: tenant.to_owned(),
        invoice_id: invoice_id.to_owned(),
        line_id: objects::id_of(&line["id"]).unwrap_or_else(|| format!("{invoice_id}#{n}")),
        currency: currency.to_owned(),
        kind,
        amount,
        billed_day,
        service_start: service.0,
        service_end: service.1,
        uncollectible: false,
        entries: entries.into_iter().filter(|(_, a)| *a != 0).collect(),
    }
}

/// Reads the schedule's inputs from the store (every finalized invoice, credit note and charge
/// of the tenants' customers, and the daily usage of metered lines) and builds it.
pub async fn load(
    db: &crate::store::Db,
    catalog: &crate::catalog::Catalog,
    tenant: Option<&str>,
) -> Result<Schedule, crate::store::StoreError> {
    let linked = db.tenants().linked(tenant).await?;
    let tenant_of: HashMap<&str, &str> = linked
        .iter()
        .map(|(t, c)| (c.as_str(), t.as_str()))
        .collect();
    // One tenant: its customer only ("" when it has none, which matches nothing).
    let customer = tenant.map(|_| linked.first().map_or("", |(_, c)| c.as_str()));
    let mut inputs = Inputs {
        price_meter: catalog
            .meters
            .values()
            .flat_map(|m| m.stripe_prices.iter().map(|p| (p.clone(), m.name.clone())))
            .collect(),
        ..Inputs::default()
    };
    // Invoices stream past and become lines at once, except those with metered lines, kept
    // until the usage of their periods is read; credit notes and refunded charges (fewer) are
    // kept for the end.
    let mut builder = Builder::default();
    let (mut notes, mut charges, mut metered) = (Vec::new(), Vec::new(), Vec::new());
    db.mirror()
        .each(&["invoice", "credit_note", "charge"], customer, |row| {
            let Some(owner) = row.customer_id.as_deref().and_then(|c| tenant_of.get(c)) else {
                return;
            };
            let Ok(raw) = serde_json::from_str::<Value>(&row.payload) else {
                return;
            };
            match row.object_type.as_str() {
                "invoice" => match metered_span(&inputs, &raw) {
                    Some(span) => metered.push((owner.to_string(), raw, span)),
                    None => builder.invoice(&inputs, owner, &raw),
                },
                "credit_note" => notes.push(raw),
                _ if objects::int(&raw["amount_refunded"]).is_some_and(|a| a > 0)
                    || raw["refunds"]["data"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty()) =>
                {
                    charges.push(raw)
                }
                _ => {}
            }
        })
        .await?;
    // Daily usage of the metered lines' meters over their periods: a `sum` meter's days are
    // weighted by quantity, other meters' by their number of events.
    let span = metered
        .iter()
        .map(|(_, _, span)| *span)
        .reduce(|(a, b), (s, e)| (a.min(s), b.max(e)));
    if let Some((start, end)) = span {
        let by_quantity: HashMap<&str, bool> = catalog
            .meters
            .values()
            .map(|m| {
                (
                    m.name.as_str(),
                    m.aggregation == crate::catalog::Aggregation::Sum,
                )
            })
            .collect();
        let usage = &mut inputs.usage;
        db.usage()
            .each_between(start * 1000, end * 1000, tenant, |event| {
                let Some(&sum) = by_quantity.get(event.meter.as_str()) else {
                    return;
                };
                let weight = if sum {
                    event.quantity.parse().unwrap_or_default()
                } else {
                    Decimal::ONE
                };
                *usage
                    .entry((event.tenant_id, event.meter))
                    .or_default()
                    .entry(day_of(event.occurred_at.div_euclid(1000)))
                    .or_default() += weight;
            })
            .await?;
    }
    for (owner, raw, _) in &metered {
        builder.invoice(&inputs, owner, raw);
    }
    Ok(builder.finish(&notes, &charges))
}

/// The span (Unix seconds) of an invoice's lines whose price a catalog meter bills, if any.
fn metered_span(inputs: &Inputs, invoice: &Value) -> Option<(i64, i64)> {
    invoice["lines"]["data"]
        .as_array()?
        .iter()
        .filter(|line| objects::price_of(line).is_some_and(|p| inputs.price_meter.contains_key(&p)))
        .filter_map(|line| {
            Some((
                objects::int(&line["period"]["start"])?,
                objects::int(&line["period"]["end"])?,
            ))
        })
        .reduce(|(a, b), (s, e)| (a.min(s), b.max(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 2024-01-01T00:00:00Z (a leap year).
    const JAN_1: i64 = 1_704_067_200;
    const DAY: i64 = SECONDS_PER_DAY;

    fn line(id: &str, amount: i64, start: i64, end: i64) -> Value {
        json!({"id": id, "amount": amount, "type": "subscription",
            "price": {"id": "price_pro", "recurring": {"interval": "month", "usage_type": "licensed"}},
            "period": {"start": start, "end": end}})
    }

    fn invoice(
        id: &str,
        status: &str,
        currency: &str,
        finalized: i64,
        lines: Vec<Value>,
    ) -> (String, Value) {
        (
            "acme".to_owned(),
            json!({"id": id, "object": "invoice", "status": status, "currency": currency,
                "created": finalized, "status_transitions": {"finalized_at": finalized},
                "lines": {"data": lines}}),
        )
    }

    fn by_day(schedule: &Schedule) -> BTreeMap<Day, i64> {
        let mut days = BTreeMap::new();
        for (d, a) in schedule
            .lines
            .iter()
            .flat_map(|l| l.entries.iter())
            .chain(schedule.adjustments.iter().flat_map(|a| a.entries.iter()))
        {
            *days.entry(*d).or_default() += a;
        }
        days
    }

    #[test]
    fn shares_add_up_exactly_with_the_remainder_first() {
        assert_eq!(split(100, &[1, 1, 1]), vec![34, 33, 33]);
        assert_eq!(split(-100, &[1, 1, 1]), vec![-34, -33, -33]);
        assert_eq!(split(10, &[0, 0]), vec![10, 0]);
        assert_eq!(split(7, &[1, 2, 4]), vec![1, 2, 4]);
        assert_eq!(split(1, &[1, 1]), vec![1, 0]);
    }

    #[test]
    fn a_monthly_plan_is_earned_day_by_day_and_a_leap_february_has_29_days() {
        let feb_1 = JAN_1 + 31 * DAY;
        let mar_1 = feb_1 + 29 * DAY;
        let inputs = Inputs {
            invoices: vec![invoice(
                "in_feb",
                "paid",
                "eur",
                feb_1,
                vec![line("il_1", 2900, feb_1, mar_1)],
            )],
            ..Inputs::default()
        };
        let schedule = build(&inputs);
        let line = &schedule.lines[0];
        assert_eq!(line.kind, Kind::Subscription);
        assert_eq!(line.entries.len(), 29);
        assert!(line.entries.iter().all(|(_, a)| *a == 100));
        assert_eq!(report::date(line.service_end.unwrap()), "2024-02-29");
    }

    #[test]
    fn a_yearly_plan_is_earned_a_day_at_a_time_and_deferred_falls_to_zero() {
        let year_end = JAN_1 + 366 * DAY;
        let inputs = Inputs {
            invoices: vec![invoice(
                "in_y",
                "paid",
                "eur",
                JAN_1,
                vec![line("il_y", 120_000, JAN_1, year_end)],
            )],
            ..Inputs::default()
        };
        let schedule = build(&inputs);
        assert_eq!(schedule.lines[0].entries.len(), 366);
        assert_eq!(
            schedule.lines[0]
                .entries
                .iter()
                .map(|(_, a)| a)
                .sum::<i64>(),
            120_000
        );
        // 120,000 / 366 = 327 rem 318: the first 318 days earn 328.
        assert_eq!(schedule.lines[0].entries[0].1, 328);
        assert_eq!(schedule.lines[0].entries[365].1, 327);
        let r = report(
            &schedule,
            day_of(JAN_1),
            day_of(year_end),
            Group::Month,
            None,
        );
        assert_eq!(r.rows.len(), 12);
        assert_eq!(r.rows[0].billed, 120_000);
        assert_eq!(r.rows[0].recognised[Kind::Subscription.index()], 31 * 328);
        assert_eq!(r.rows[0].deferred, 120_000 - 31 * 328);
        assert_eq!(r.rows[11].deferred, 0);
        assert_eq!(report::date(r.rows[1].start), "2024-02-01");
    }

    #[test]
    fn an_upgrade_mid_period_prorates_and_discounts_and_inclusive_tax_are_not_revenue() {
        let feb_1 = JAN_1 + 31 * DAY;
        let jan_16 = JAN_1 + 15 * DAY;
        let mut credit = line("il_unused", -500, jan_16, feb_1);
        credit["proration"] = json!(true);
        let mut charge = line("il_remaining", 1600, jan_16, feb_1);
        charge["proration"] = json!(true);
        charge["discount_amounts"] = json!([{"amount": 100, "discount": "di_1"}]);
        charge["tax_amounts"] = json!([{"amount": 200, "inclusive": true}]);
        let inputs = Inputs {
            invoices: vec![
                invoice(
                    "in_jan",
                    "paid",
                    "eur",
                    JAN_1,
                    vec![line("il_basic", 3100, JAN_1, feb_1)],
                ),
                invoice("in_up", "paid", "eur", jan_16, vec![credit, charge]),
            ],
            ..Inputs::default()
        };
        let schedule = build(&inputs);
        let amounts: Vec<i64> = schedule.lines.iter().map(|l| l.amount).collect();
        assert_eq!(amounts, [3100, -500, 1300]);
        assert!(schedule.lines.iter().all(|l| l.kind == Kind::Subscription));
        let days = by_day(&schedule);
        assert_eq!(days.values().sum::<i64>(), 3100 - 500 + 1300);
        assert_eq!(days[&day_of(JAN_1)], 100);
        // From the 16th: 100 - 500/16 + 1300/16, the remainders on the first days.
        assert_eq!(days[&day_of(jan_16)], 100 - 32 + 82);
    }

    #[test]
    fn a_credit_note_takes_back_from_its_own_day_on_and_never_rewrites_closed_days() {
        let feb_1 = JAN_1 + 31 * DAY;
        let jan_11 = JAN_1 + 10 * DAY;
        let inputs = Inputs {
            invoices: vec![invoice(
                "in_1",
                "paid",
                "eur",
                JAN_1,
                vec![line("il_1", 3100, JAN_1, feb_1)],
            )],
            credit_notes: vec![json!({"id": "cn_1", "invoice": "in_1", "status": "issued",
                "created": jan_11, "lines": {"data": [{"invoice_line_item": "il_1", "amount": 620}]}})],
            ..Inputs::default()
        };
        let schedule = build(&inputs);
        let adjustment = &schedule.adjustments[0];
        assert_eq!((adjustment.cause, adjustment.amount), ("credit_note", 620));
        assert!(adjustment.entries.iter().all(|(d, _)| *d >= day_of(jan_11)));
        assert_eq!(adjustment.entries.iter().map(|(_, a)| a).sum::<i64>(), -620);
        // 10 of 31 days were earned: 200 of the 620 come back on the 11th, the rest over 21 days.
        assert_eq!(adjustment.entries[0], (day_of(jan_11), -200 - 20));
        let days = by_day(&schedule);
        assert_eq!(days[&day_of(JAN_1)], 100, "a closed day is not rewritten");
        assert_eq!(days.values().sum::<i64>(), 3100 - 620);
    }

    #[test]
    fn a_refund_without_a_credit_note_is_spread_over_the_invoice_and_a_covered_one_is_not_counted_twice()
     {
        let feb_1 = JAN_1 + 31 * DAY;
        let inputs = Inputs {
            invoices: vec![invoice(
                "in_1",
                "paid",
                "eur",
                JAN_1,
                vec![
                    line("il_a", 3100, JAN_1, feb_1),
                    json!({"id": "il_setup", "amount": 1000, "type": "invoiceitem"}),
                ],
            )],
            charges: vec![
                json!({"id": "ch_1", "invoice": "in_1", "amount": 4100, "amount_refunded": 410,
                    "refunds": {"data": [{"id": "re_1", "amount": 410, "created": JAN_1 + 40 * DAY}]}}),
                json!({"id": "ch_2", "invoice": "in_1", "amount": 0,
                    "refunds": {"data": [{"id": "re_covered", "amount": 999, "created": JAN_1}]}}),
            ],
            credit_notes: vec![
                json!({"id": "cn_x", "invoice": "in_other", "refund": "re_covered", "created": JAN_1}),
            ],
            ..Inputs::default()
        };
        let schedule = build(&inputs);
        assert_eq!(schedule.lines[1].kind, Kind::OneOff);
        let taken: Vec<(String, i64)> = schedule
            .adjustments
            .iter()
            .map(|a| (a.line_id.clone(), a.amount))
            .collect();
        assert_eq!(
            taken,
            [("il_a".to_owned(), 310), ("il_setup".to_owned(), 100)]
        );
        // After the period, all of it comes back on the refund's day.
        assert!(
            schedule
                .adjustments
                .iter()
                .all(|a| a.entries == vec![(day_of(JAN_1 + 40 * DAY), -a.amount)])
        );
    }

    #[test]
    fn refunds_come_off_net_of_tax_found_through_the_intent_and_never_twice() {
        let feb_1 = JAN_1 + 31 * DAY;
        let mut inv = invoice(
            "in_t",
            "paid",
            "eur",
            JAN_1,
            vec![line("il_t", 1000, JAN_1, feb_1)],
        );
        inv.1["total"] = json!(1200);
        inv.1["payments"] = json!({"data": [{"payment": {"payment_intent": "pi_t"}}]});
        // Newer versions: the charge names its intent, not the invoice; its refunds unlisted.
        let charge = json!({"id": "ch_t", "payment_intent": "pi_t", "amount": 1200,
            "amount_refunded": 600, "created": feb_1 + DAY});
        let schedule = build(&Inputs {
            invoices: vec![inv.clone()],
            charges: vec![charge.clone()],
            ..Inputs::default()
        });
        assert_eq!(schedule.adjustments.len(), 1);
        assert_eq!(
            schedule.adjustments[0].amount, 500,
            "600 refunded, 100 of it tax"
        );
        // A credit note that refunded the money already takes it back: the charge adds nothing.
        let note = json!({"id": "cn_t", "invoice": "in_t", "created": feb_1 + DAY, "total": 600,
            "refund": "re_unlisted", "subtotal_excluding_tax": 500, "lines": {"data": []}});
        let schedule = build(&Inputs {
            invoices: vec![inv],
            charges: vec![charge],
            credit_notes: vec![note],
            ..Inputs::default()
        });
        let taken: Vec<(&str, i64)> = schedule
            .adjustments
            .iter()
            .map(|a| (a.cause, a.amount))
            .collect();
        assert_eq!(taken, [("credit_note", 500)]);
    }

    #[test]
    fn a_void_takes_everything_back_and_uncollectible_stays_flagged() {
        let feb_1 = JAN_1 + 31 * DAY;
        let mut void = invoice(
            "in_v",
            "void",
            "jpy",
            JAN_1,
            vec![line("il_v", 3100, JAN_1, feb_1)],
        );
        void.1["status_transitions"]["voided_at"] = json!(JAN_1 + 5 * DAY);
        let inputs = Inputs {
            invoices: vec![
                void,
                invoice(
                    "in_u",
                    "uncollectible",
                    "jpy",
                    JAN_1,
                    vec![line("il_u", 310, JAN_1, feb_1)],
                ),
                invoice(
                    "in_d",
                    "draft",
                    "jpy",
                    JAN_1,
                    vec![line("il_d", 999, JAN_1, feb_1)],
                ),
            ],
            ..Inputs::default()
        };
        let schedule = build(&inputs);
        assert_eq!(schedule.lines.len(), 2, "drafts are not revenue");
        let r = report(
            &schedule,
            day_of(JAN_1),
            day_of(feb_1),
            Group::Month,
            Some("JPY"),
        );
        let row = &r.rows[0];
        assert_eq!(row.currency, "jpy");
        assert_eq!(row.billed, 310, "3100 billed and voided, 310 billed");
        assert_eq!(row.recognised_total(), 310);
        assert_eq!(row.uncollectible, 310);
        assert_eq!(row.deferred, 0);
    }

    #[test]
    fn metered_lines_follow_the_usage_days_or_land_on_the_last_day() {
        let feb_1 = JAN_1 + 31 * DAY;
        let usage_line = json!({"id": "il_m", "amount": 1000, "price": {"id": "price_calls"},
            "period": {"start": JAN_1, "end": feb_1}});
        let mut usage = BTreeMap::new();
        usage.insert(day_of(JAN_1 + 2 * DAY), Decimal::from(3));
        usage.insert(day_of(JAN_1 + 9 * DAY), Decimal::from(1));
        let mut inputs = Inputs {
            invoices: vec![invoice("in_m", "paid", "eur", feb_1, vec![usage_line])],
            price_meter: HashMap::from([("price_calls".to_owned(), "calls".to_owned())]),
            usage: HashMap::from([(("acme".to_owned(), "calls".to_owned()), usage)]),
            ..Inputs::default()
        };
        let schedule = build(&inputs);
        assert_eq!(schedule.lines[0].kind, Kind::Usage);
        assert_eq!(
            schedule.lines[0].entries,
            vec![
                (day_of(JAN_1 + 2 * DAY), 750),
                (day_of(JAN_1 + 9 * DAY), 250)
            ]
        );
        inputs.usage.clear();
        let schedule = build(&inputs);
        assert_eq!(schedule.lines[0].entries, vec![(day_of(feb_1) - 1, 1000)]);
    }

    #[test]
    fn billed_is_recognised_plus_deferred_every_day_of_a_generated_year() {
        // A year of monthly invoices with an upgrade (prorations), a refund, a credit note and
        // a void, in two currencies; then the identity is checked from the entries themselves.
        let mut invoices = Vec::new();
        let mut credit_notes = Vec::new();
        let mut charges = Vec::new();
        let mut start = JAN_1;
        for month in 0..12 {
            let end = JAN_1 + report_next_month_secs(month);
            let currency = if month % 2 == 0 { "eur" } else { "jpy" };
            let id = format!("in_{month}");
            let mut lines = vec![line(&format!("il_{month}"), 1000 + month * 37, start, end)];
            if month == 4 {
                let mid = start + 10 * DAY;
                let mut unused = line("il_unused", -333, mid, end);
                unused["proration"] = json!(true);
                let mut more = line("il_more", 777, mid, end);
                more["proration"] = json!(true);
                lines.extend([unused, more]);
            }
            let status = if month == 7 { "void" } else { "paid" };
            let mut inv = invoice(&id, status, currency, start, lines);
            inv.1["status_transitions"]["voided_at"] = json!(start + 3 * DAY);
            invoices.push(inv);
            if month == 2 {
                credit_notes.push(json!({"id": "cn_2", "invoice": id, "created": start + 12 * DAY,
                    "lines": {"data": [{"invoice_line_item": format!("il_{month}"), "amount": 101}]}}));
            }
            if month == 9 {
                charges.push(json!({"id": "ch_9", "invoice": id, "amount": 1333,
                    "refunds": {"data": [{"id": "re_9", "amount": 77, "created": start + 20 * DAY}]}}));
            }
            start = end;
        }
        let schedule = build(&Inputs {
            invoices,
            credit_notes,
            charges,
            ..Inputs::default()
        });
        for currency in ["eur", "jpy"] {
            let lines: Vec<&LineRevenue> = schedule
                .lines
                .iter()
                .filter(|l| l.currency == currency)
                .collect();
            for l in &lines {
                assert_eq!(
                    l.entries.iter().map(|(_, a)| a).sum::<i64>(),
                    l.amount,
                    "{}",
                    l.line_id
                );
            }
            let adjustments: Vec<&Adjustment> = schedule
                .adjustments
                .iter()
                .filter(|a| a.currency == currency)
                .collect();
            for a in &adjustments {
                assert_eq!(
                    a.entries.iter().map(|(_, x)| x).sum::<i64>(),
                    -a.amount,
                    "{}",
                    a.source
                );
                assert!(a.entries.iter().all(|(d, _)| *d >= a.day));
            }
            let r = report(
                &schedule,
                day_of(JAN_1) - 1,
                day_of(JAN_1 + 400 * DAY),
                Group::Day,
                Some(currency),
            );
            for row in &r.rows {
                let d = row.end - 1;
                let billed: i64 = lines
                    .iter()
                    .filter(|l| l.billed_day <= d)
                    .map(|l| l.amount)
                    .sum::<i64>()
                    - adjustments
                        .iter()
                        .filter(|a| a.day <= d)
                        .map(|a| a.amount)
                        .sum::<i64>();
                let recognised: i64 = lines
                    .iter()
                    .flat_map(|l| l.entries.iter())
                    .chain(adjustments.iter().flat_map(|a| a.entries.iter()))
                    .filter(|(day, _)| *day <= d)
                    .map(|(_, a)| a)
                    .sum();
                assert_eq!(
                    row.deferred,
                    billed - recognised,
                    "{currency} {}",
                    report::date(d)
                );
            }
            assert_eq!(
                r.rows.last().unwrap().deferred,
                0,
                "{currency}: all earned by the end"
            );
        }
    }

    /// Seconds from 2024-01-01 to the first of month `m + 1` (2024).
    fn report_next_month_secs(m: i64) -> i64 {
        let days_in = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        days_in[..=(m as usize)].iter().sum::<i64>() * DAY
    }
}
