//! An invoice's lines become revenue: ratably per day over a subscription line's service
//! period, on the usage's days for a metered line, on the finalization day for the rest.

use super::adjustments::take_back;
use super::{Builder, Day, Inputs, Kind, LineRevenue, SECONDS_PER_DAY, day_of, split};
use crate::domain::{Invoice, InvoiceLine};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

impl Builder {
    /// Adds an invoice's lines (`inputs` gives the meters and usage; its lists are not read).
    pub fn invoice(&mut self, inputs: &Inputs, tenant: &str, invoice: &Invoice) {
        let status = invoice.status.as_deref().unwrap_or("");
        if !matches!(status, "open" | "paid" | "uncollectible" | "void") {
            return;
        }
        let billed_day = day_of(invoice.finalized_at.or(invoice.created).unwrap_or(0));
        let billed = Billed {
            tenant,
            invoice_id: &invoice.id,
            currency: &invoice
                .currency
                .as_deref()
                .unwrap_or("")
                .to_ascii_lowercase(),
            day: billed_day,
        };
        self.totals
            .insert(invoice.id.clone(), invoice.total.unwrap_or(0));
        for intent in &invoice.payment_intents {
            self.intents.insert(intent.clone(), invoice.id.clone());
        }
        let indexes = self.by_invoice.entry(invoice.id.clone()).or_default();
        for (n, line) in invoice.lines.iter().enumerate() {
            let mut revenue = line_revenue(inputs, &billed, n, line);
            revenue.uncollectible = status == "uncollectible";
            indexes.push(self.schedule.lines.len());
            self.schedule.lines.push(revenue);
        }
        if status == "void" {
            let voided = invoice.voided_at.map_or(billed_day, day_of);
            for &i in &self.by_invoice[&invoice.id] {
                let line = &self.schedule.lines[i];
                let adjustment = take_back(line, &invoice.id, "void", voided, line.amount);
                self.schedule.adjustments.push(adjustment);
            }
        }
    }
}

/// Whose line it is and when it was billed.
struct Billed<'a> {
    tenant: &'a str,
    invoice_id: &'a str,
    currency: &'a str,
    day: Day,
}

/// The revenue of the `n`th line of an invoice.
fn line_revenue(inputs: &Inputs, billed: &Billed, n: usize, line: &InvoiceLine) -> LineRevenue {
    let amount = line.net();
    let metered = line
        .price
        .as_deref()
        .and_then(|p| inputs.price_meter.get(p))
        .map(String::as_str)
        .or_else(|| line.metered.then_some(""));
    let ratable = line.of_subscription || line.recurring || metered.is_some();
    let (kind, entries, service) = match (line.period_start, line.period_end) {
        (Some(start), Some(end)) if end > start && ratable => {
            let first = day_of(start);
            let days = ((end - start + SECONDS_PER_DAY / 2) / SECONDS_PER_DAY).max(1);
            let service = (Some(first), Some(first + days - 1));
            match metered {
                Some(meter) => {
                    let usage = (billed.tenant, meter);
                    let entries = usage_entries(inputs, usage, first, days, amount);
                    (Kind::Usage, entries, service)
                }
                None => {
                    let shares = split(amount, &vec![1; days as usize]);
                    let entries = (0..days).map(|i| first + i).zip(shares).collect();
                    (Kind::Subscription, entries, service)
                }
            }
        }
        _ => (Kind::OneOff, vec![(billed.day, amount)], (None, None)),
    };
    LineRevenue {
        tenant_id: billed.tenant.to_owned(),
        invoice_id: billed.invoice_id.to_owned(),
        line_id: (line.id.clone()).unwrap_or_else(|| format!("{}#{n}", billed.invoice_id)),
        currency: billed.currency.to_owned(),
        kind,
        amount,
        billed_day: billed.day,
        service_start: service.0,
        service_end: service.1,
        uncollectible: false,
        entries: entries.into_iter().filter(|(_, a)| *a != 0).collect(),
    }
}

/// A metered line's amount over the days of its period that had usage, in proportion to it;
/// on the period's last day when there was none.
fn usage_entries(
    inputs: &Inputs,
    (tenant, meter): (&str, &str),
    first: Day,
    days: i64,
    amount: i64,
) -> Vec<(Day, i64)> {
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
    if daily.is_empty() {
        return vec![(first + days - 1, amount)];
    }
    let weights: Vec<i128> = daily.iter().map(|(_, w)| *w).collect();
    daily
        .iter()
        .map(|(d, _)| *d)
        .zip(split(amount, &weights))
        .collect()
}
