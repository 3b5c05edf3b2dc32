//! The revenue report: per currency and per day or month, revenue recognised (by kind), billed,
//! and deferred at the end of the period. At every date, billed to date = recognised to date +
//! deferred; deferred below zero is revenue earned before it was invoiced (usage billed in
//! arrears).

use std::collections::{BTreeMap, HashMap};

use chrono::{Datelike, NaiveDate};
use serde_json::{Value, json};

use super::{Day, Kind, Schedule};

/// How periods are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Day,
    Month,
}

impl Group {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            _ => None,
        }
    }
}

/// What happened on one day in one currency.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    recognised: [i64; 4],
    billed: i64,
    uncollectible: i64,
}

/// One period of one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub currency: String,
    pub start: Day,
    /// Exclusive.
    pub end: Day,
    pub recognised: [i64; 4],
    pub billed: i64,
    pub uncollectible: i64,
    /// Billed minus recognised, everything up to the period's end.
    pub deferred: i64,
}

impl Row {
    pub fn recognised_total(&self) -> i64 {
        self.recognised.iter().sum()
    }

    pub fn to_json(&self) -> Value {
        let mut recognised = serde_json::Map::new();
        for kind in Kind::ALL {
            recognised.insert(
                kind.as_str().to_owned(),
                json!(self.recognised[kind.index()]),
            );
        }
        recognised.insert("total".to_owned(), json!(self.recognised_total()));
        json!({
            "currency": self.currency,
            "start": date(self.start),
            "end": date(self.end),
            "recognised": recognised,
            "billed": self.billed,
            "deferred": self.deferred,
            "uncollectible": self.uncollectible,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub rows: Vec<Row>,
}

/// A day as `YYYY-MM-DD`.
pub fn date(day: Day) -> String {
    NaiveDate::from_num_days_from_ce_opt(day_to_ce(day))
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn day_to_ce(day: Day) -> i32 {
    // 1970-01-01 is day 719,163 counted from 0001-01-01 (day 1).
    (day + 719_163) as i32
}

/// The first day of the month after the one holding `day`.
fn next_month(day: Day) -> Day {
    let Some(d) = NaiveDate::from_num_days_from_ce_opt(day_to_ce(day)) else {
        return day + 31;
    };
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .map(|n| i64::from(n.num_days_from_ce()) - 719_163)
        .unwrap_or(day + 31)
}

/// The report over `[from, to)` (days), per currency (or only `currency`).
pub fn report(
    schedule: &Schedule,
    from: Day,
    to: Day,
    group: Group,
    currency: Option<&str>,
) -> Report {
    let mut days: HashMap<&str, BTreeMap<Day, Acc>> = HashMap::new();
    let wanted = |c: &str| currency.is_none_or(|w| w.eq_ignore_ascii_case(c));
    for line in schedule.lines.iter().filter(|l| wanted(&l.currency)) {
        let per_day = days.entry(line.currency.as_str()).or_default();
        let billed = per_day.entry(line.billed_day).or_default();
        billed.billed += line.amount;
        if line.uncollectible {
            billed.uncollectible += line.amount;
        }
        for (day, amount) in &line.entries {
            per_day.entry(*day).or_default().recognised[line.kind.index()] += amount;
        }
    }
    for adjustment in schedule.adjustments.iter().filter(|a| wanted(&a.currency)) {
        let per_day = days.entry(adjustment.currency.as_str()).or_default();
        per_day.entry(adjustment.day).or_default().billed -= adjustment.amount;
        for (day, amount) in &adjustment.entries {
            per_day.entry(*day).or_default().recognised[Kind::Reversal.index()] += amount;
        }
    }
    let mut currencies: Vec<&str> = days.keys().copied().collect();
    currencies.sort_unstable();
    let mut rows = Vec::new();
    for currency in currencies {
        let per_day = &days[currency];
        // Deferred at `from`: everything billed and recognised before it.
        let mut deferred: i64 = per_day
            .range(..from)
            .map(|(_, a)| a.billed - a.recognised.iter().sum::<i64>())
            .sum();
        let mut start = from;
        while start < to {
            let end = match group {
                Group::Day => start + 1,
                Group::Month => next_month(start),
            }
            .min(to);
            let mut row = Row {
                currency: currency.to_owned(),
                start,
                end,
                recognised: [0; 4],
                billed: 0,
                uncollectible: 0,
                deferred: 0,
            };
            for (_, acc) in per_day.range(start..end) {
                for (total, amount) in row.recognised.iter_mut().zip(acc.recognised) {
                    *total += amount;
                }
                row.billed += acc.billed;
                row.uncollectible += acc.uncollectible;
            }
            deferred += row.billed - row.recognised_total();
            row.deferred = deferred;
            rows.push(row);
            start = end;
        }
    }
    Report { rows }
}
