//! Unit tests of the schedule: exact shares, periods, credit notes, refunds, voids.

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
            credit_notes.push(
                json!({"id": "cn_2", "invoice": id, "created": start + 12 * DAY,
                "lines": {"data": [{"invoice_line_item": format!("il_{month}"), "amount": 101}]}}),
            );
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
