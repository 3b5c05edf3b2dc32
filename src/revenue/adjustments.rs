//! Revenue taken back: credit notes per credited line (or spread over the invoice), refunds no
//! credit note accounts for (their revenue share, spread over the invoice), from their own day
//! on; closed days are never rewritten.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::{Adjustment, Builder, Day, LineRevenue, Schedule, day_of, split};
use crate::domain::{CreditNote, Payment, Refund};
use crate::stripe::objects;

/// What the credit notes already account for, so that refunds are not counted twice.
#[derive(Default)]
struct Covered {
    /// Refunds a credit note names.
    refunds: HashSet<String>,
    /// Per invoice, money its credit notes refunded: a charge whose refunds are not listed
    /// (Stripe leaves them out unless asked) is not counted for it a second time.
    by_invoice: HashMap<String, i64>,
}

impl Builder {
    /// Applies credit notes and refunds, and returns the schedule.
    pub fn finish(mut self, credit_notes: &[Value], charges: &[Value]) -> Schedule {
        let mut covered = Covered::default();
        for note in credit_notes.iter().map(objects::credit_note) {
            if !note.voided {
                self.credit(&note, &mut covered);
            }
        }
        for charge in charges {
            let refunds = objects::charge_refunds(charge);
            self.refund(&objects::payment("charge", charge), refunds, &covered);
        }
        self.schedule
    }

    /// A credit note: per credited line, or spread over the invoice's lines.
    fn credit(&mut self, note: &CreditNote, covered: &mut Covered) {
        if note.refunds_money
            && let Some(invoice) = &note.invoice
        {
            *covered.by_invoice.entry(invoice.clone()).or_default() += note.total;
        }
        covered.refunds.extend(note.refunds.iter().cloned());
        let Some(lines) = note.invoice.as_ref().and_then(|i| self.by_invoice.get(i)) else {
            return;
        };
        let day = day_of(note.created);
        let mut unassigned = 0;
        for credit in &note.lines {
            let target = credit.invoice_line_item.as_deref().and_then(|id| {
                lines
                    .iter()
                    .find(|&&i| self.schedule.lines[i].line_id == id)
            });
            match target {
                Some(&i) => {
                    let line = &self.schedule.lines[i];
                    let adjustment = take_back(line, &note.id, "credit_note", day, credit.amount);
                    self.schedule.adjustments.push(adjustment);
                }
                None => unassigned += credit.amount,
            }
        }
        if note.lines.is_empty() {
            unassigned = note.subtotal;
        }
        let lines = lines.clone();
        spread(
            &mut self.schedule,
            &lines,
            &note.id,
            "credit_note",
            day,
            unassigned,
        );
    }

    /// A charge's refunds that no credit note accounts for: their revenue share (tax is not
    /// revenue), spread over the invoice's lines. Refunds not listed count as their total, less
    /// what credit notes refunded, dated on the charge's day, the only date there is.
    fn refund(&mut self, charge: &Payment, listed: Option<Vec<Refund>>, covered: &Covered) {
        let invoice_id = charge.invoice.clone().or_else(|| {
            let intent = charge.payment_intent.as_ref()?;
            self.intents.get(intent).cloned()
        });
        let Some(invoice_id) = invoice_id else {
            return;
        };
        let Some(lines) = self.by_invoice.get(&invoice_id).cloned() else {
            return;
        };
        let refunds = listed.unwrap_or_else(|| {
            let by_notes = covered.by_invoice.get(&invoice_id).copied().unwrap_or(0);
            let unlisted = charge.amount_refunded.map(|a| a - by_notes);
            let unlisted = unlisted.filter(|a| *a > 0).map(|amount| Refund {
                id: charge.id.clone(),
                amount,
                created: charge.created.unwrap_or(0),
            });
            unlisted.into_iter().collect()
        });
        let total = self.totals.get(&invoice_id).copied().unwrap_or(0);
        let revenue: i64 = lines.iter().map(|&i| self.schedule.lines[i].amount).sum();
        for refund in refunds {
            if covered.refunds.contains(&refund.id) {
                continue;
            }
            let amount = if total > 0 && revenue != total {
                (i128::from(refund.amount) * i128::from(revenue) / i128::from(total)) as i64
            } else {
                refund.amount
            };
            let day = day_of(refund.created);
            spread(
                &mut self.schedule,
                &lines,
                &refund.id,
                "refund",
                day,
                amount,
            );
        }
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
pub(super) fn take_back(
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
