//! Low balance and auto top-up (issue 20, must-have 4).
//!
//! Each tenant may keep, per credit unit, a threshold, a top-up amount and auto top-up on or
//! off (`credit_settings`, `GET|PUT /v1/tenants/{t}/credits/settings`). Whatever changes a
//! balance (a burn, an applied grant) calls [`balance_changed!`](crate::store::balance_changed)
//! inside its own transaction with the balance before and after. When the balance falls from at
//! or above the threshold to below it (a *crossing*), that same transaction
//! - disarms the tenant's alarm for the unit and numbers the crossing (`credit_crossings`, one
//!   row per crossing: a replayed change finds the alarm disarmed and does nothing);
//! - records a `credits.balance_low` notification for the product ([`crate::notify`] delivers
//!   it, signed, at least once, under a stable event id);
//! - with auto top-up on, stores a `credits.top_up` command in the outbox, keyed by the
//!   crossing, which creates the top-up at Stripe exactly once ([`TopUpRequest`]).
//!
//! The alarm re-arms when the balance is at or above the threshold again (the top-up's grant
//! arriving, or any other grant).
//!
//! A top-up that fails for good (its command ends `failed`) records a `credits.top_up_failed`
//! notification in the transaction that ends the command ([`top_up_failed`]).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::outbound::CommandKind;
use crate::store::{NewCommand, NewNotification};

/// A change of one tenant's available balance in one unit, as the transaction that makes it
/// sees it.
#[derive(Debug, Clone, Copy)]
pub struct BalanceChange<'a> {
    pub tenant_id: &'a str,
    /// A lowercase ISO currency (amounts in minor units), or a credit unit.
    pub unit: &'a str,
    pub available_before: Decimal,
    pub available_after: Decimal,
}

/// A tenant's settings for one unit, with its alarm's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditSettings {
    pub threshold: Decimal,
    /// Minor units of the unit's currency.
    pub top_up_amount: Option<i64>,
    pub auto_top_up: bool,
    /// False from a crossing until the balance is at or above the threshold again.
    pub armed: bool,
    /// Crossings so far; the next one is numbered `crossings + 1`.
    pub crossings: i64,
}

/// What a balance change does to the alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alarm {
    /// From at or above the threshold to below it, while armed.
    Cross,
    /// At or above the threshold again, while disarmed.
    Rearm,
    Stay,
}

/// How a change moves the alarm. `armed` means the last balance billsync saw was at or above
/// the threshold; a change that starts at or above it re-arms the alarm on its way (a grant
/// raised the balance since the last crossing). A crossing is an armed alarm meeting a balance
/// below the threshold: from `>= threshold` to `< threshold`. A disarmed alarm re-arms once
/// the balance is `>= threshold`.
pub fn alarm(settings: &CreditSettings, change: &BalanceChange<'_>) -> Alarm {
    let t = settings.threshold;
    let armed = settings.armed || change.available_before >= t;
    if armed && change.available_after < t {
        Alarm::Cross
    } else if !settings.armed && change.available_after >= t {
        Alarm::Rearm
    } else {
        Alarm::Stay
    }
}

/// Whether `unit` names a currency (three lowercase ASCII letters): only those can be topped
/// up, Stripe's billing credits being monetary.
pub fn is_currency(unit: &str) -> bool {
    unit.len() == 3 && unit.bytes().all(|b| b.is_ascii_lowercase())
}

/// The parameters of a `credits.top_up` command: invoice `amount` minor units of `currency`,
/// paid from the customer's default payment method, then grant the same amount as credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpRequest {
    pub currency: String,
    pub amount: i64,
    /// The crossing that asked for it.
    pub crossing: i64,
}

/// The rows a crossing writes, besides the settings' update.
#[derive(Debug, Clone)]
pub struct CrossingRows {
    pub seq: i64,
    pub notification: NewNotification,
    pub command: Option<NewCommand>,
}

/// The notification and (with auto top-up on a currency) the command of crossing number `seq`.
pub fn crossing_rows(
    settings: &CreditSettings,
    change: &BalanceChange<'_>,
    seq: i64,
    now_ms: i64,
) -> CrossingRows {
    let command = match settings.top_up_amount {
        Some(amount) if settings.auto_top_up && is_currency(change.unit) && amount > 0 => {
            let request = TopUpRequest {
                currency: change.unit.to_owned(),
                amount,
                crossing: seq,
            };
            let request = serde_json::to_string(&request).expect("plain struct");
            Some(NewCommand {
                command_id: format!("cmd_{}", uuid::Uuid::now_v7().simple()),
                kind: CommandKind::CreditsTopUp.as_str().to_owned(),
                request_digest: crate::notify::hex_sha256(request.as_bytes()),
                request,
                // One top-up per crossing: the outbox's (tenant, client key) is unique.
                client_key: Some(format!("credits.top_up:{}:{seq}", change.unit)),
                base: None,
            })
        }
        _ => None,
    };
    let event_id = format!("evt_bs_{}", uuid::Uuid::now_v7().simple());
    let top_up = command.as_ref().map(|c| {
        json!({"command_id": c.command_id, "currency": change.unit,
               "amount": settings.top_up_amount})
    });
    let payload = json!({
        "id": event_id,
        "object": "event",
        "type": "credits.balance_low",
        "created": now_ms / 1000,
        "tenant_id": change.tenant_id,
        "data": {
            "unit": change.unit,
            "threshold": settings.threshold.normalize().to_string(),
            "available_before": change.available_before.normalize().to_string(),
            "available_after": change.available_after.normalize().to_string(),
            "crossing": seq,
            "top_up": top_up,
        }
    });
    CrossingRows {
        seq,
        notification: NewNotification {
            event_id,
            tenant_id: change.tenant_id.to_owned(),
            kind: "credits.balance_low".to_owned(),
            payload: payload.to_string(),
        },
        command,
    }
}

/// The notification kind of a top-up that failed for good.
pub const TOP_UP_FAILED: &str = "credits.top_up_failed";

/// The `credits.top_up_failed` notification of a `credits.top_up` command ending `failed`
/// (Stripe refused it: a declined card, another 4xx; or it did not take it within
/// `outbox.give_up_after`); `None` for any other command or ending. Written by the
/// transaction that ends the command ([`settle_command!`](crate::store)), so exactly once.
pub fn top_up_failed(
    command: &crate::store::CommandRow,
    settlement: &crate::store::Settlement<'_>,
    now_ms: i64,
) -> Option<NewNotification> {
    if command.kind != CommandKind::CreditsTopUp.as_str() || settlement.status != "failed" {
        return None;
    }
    // A request that does not parse failed the command too: still told, with what is known.
    let request = serde_json::from_str::<TopUpRequest>(&command.request).ok();
    let event_id = format!("evt_bs_{}", uuid::Uuid::now_v7().simple());
    let payload = json!({
        "id": event_id,
        "object": "event",
        "type": TOP_UP_FAILED,
        "created": now_ms / 1000,
        "tenant_id": command.tenant_id,
        "data": {
            "command_id": command.command_id,
            "currency": request.as_ref().map(|r| &r.currency),
            "amount": request.as_ref().map(|r| r.amount),
            "crossing": request.as_ref().map(|r| r.crossing),
            "attempts": command.attempts + 1,
            "error": {"code": settlement.error_code, "message": settlement.message},
        }
    });
    Some(NewNotification {
        event_id,
        tenant_id: command.tenant_id.clone(),
        kind: TOP_UP_FAILED.to_owned(),
        payload: payload.to_string(),
    })
}

/// After grants were applied to the mirror (created, voided, expired): the tenants' balances
/// as they stand now, seen by the alarm (`before` = `after`: re-arms at or above the
/// threshold; an armed alarm below it, after a void, crosses). Not in the apply's transaction:
/// if this process dies in between, the tenant's next burn sees the same balance (its `before`)
/// and does the same. Failures are logged; the next change retries them.
pub async fn grants_applied(
    db: &crate::store::Db,
    features: &std::collections::BTreeMap<String, crate::credits::CreditFeature>,
    tenants: &std::collections::BTreeSet<String>,
) {
    let now = crate::store::now_ms();
    for tenant in tenants {
        let balances = match crate::credits::balance_of(db, features, tenant, now).await {
            Ok(balances) => balances,
            Err(error) => {
                tracing::warn!(tenant_id = %tenant, error = %error, "cannot read the balance after a grant");
                continue;
            }
        };
        for allocation in balances {
            let balance = &allocation.balance;
            let change = BalanceChange {
                tenant_id: tenant,
                unit: &balance.unit,
                available_before: balance.available,
                available_after: balance.available,
            };
            if let Err(error) = db.credit_alerts().balance_changed(&change, now).await {
                tracing::warn!(tenant_id = %tenant, error = %error, "cannot check the low-balance alarm after a grant");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(threshold: &str, armed: bool) -> CreditSettings {
        CreditSettings {
            threshold: threshold.parse().unwrap(),
            top_up_amount: Some(2000),
            auto_top_up: true,
            armed,
            crossings: 0,
        }
    }

    fn change(before: &str, after: &str) -> BalanceChange<'static> {
        BalanceChange {
            tenant_id: "t",
            unit: "usd",
            available_before: before.parse().unwrap(),
            available_after: after.parse().unwrap(),
        }
    }

    #[test]
    fn a_crossing_is_a_fall_below_the_threshold_from_at_or_above_it() {
        let s = settings("10", true);
        assert_eq!(alarm(&s, &change("10", "9.9999")), Alarm::Cross);
        assert_eq!(alarm(&s, &change("10.0000", "10")), Alarm::Stay);
        // Disarmed, but the change starts above: a grant raised it since the last crossing.
        assert_eq!(
            alarm(&settings("10", false), &change("11", "9")),
            Alarm::Cross
        );
        // Armed and seen below (a grant voided): a crossing.
        assert_eq!(alarm(&s, &change("9", "9")), Alarm::Cross);
        assert_eq!(
            alarm(&settings("10", false), &change("9", "10")),
            Alarm::Rearm
        );
        assert_eq!(
            alarm(&settings("10", false), &change("9", "9.99")),
            Alarm::Stay
        );
    }

    fn command(kind: &str, request: &str) -> crate::store::CommandRow {
        crate::store::CommandRow {
            command_id: "cmd_1".to_owned(),
            tenant_id: "t".to_owned(),
            kind: kind.to_owned(),
            request: request.to_owned(),
            client_key: None,
            request_digest: String::new(),
            base: None,
            status: "pending".to_owned(),
            attempts: 2,
            next_attempt_at: 0,
            last_error: None,
            error_code: None,
            result: None,
            created_at: 0,
            updated_at: 0,
            completed_at: None,
        }
    }

    #[test]
    fn only_a_top_up_that_failed_makes_a_failure_notification() {
        let ending = |status| crate::store::Settlement {
            status,
            result: None,
            error_code: Some("card_declined".to_owned()),
            message: Some("Your card was declined.".to_owned()),
            rebase: None,
        };
        let top_up = command(
            "credits.top_up",
            r#"{"currency":"usd","amount":2000,"crossing":3}"#,
        );
        let note = top_up_failed(&top_up, &ending("failed"), 5_000).unwrap();
        assert_eq!(
            (note.kind.as_str(), note.tenant_id.as_str()),
            (TOP_UP_FAILED, "t")
        );
        let body: serde_json::Value = serde_json::from_str(&note.payload).unwrap();
        assert_eq!(body["id"].as_str(), Some(note.event_id.as_str()));
        assert_eq!(body["created"], 5);
        let data = &body["data"];
        assert_eq!(
            (data["amount"].as_i64(), data["crossing"].as_i64()),
            (Some(2000), Some(3))
        );
        assert_eq!(
            (data["attempts"].as_i64(), &data["error"]["code"]),
            (Some(3), &json!("card_declined"))
        );
        assert!(top_up_failed(&top_up, &ending("succeeded"), 0).is_none());
        let other = command("subscription.set", "{}");
        assert!(top_up_failed(&other, &ending("failed"), 0).is_none());
        // A request that does not parse is still told, with what is known.
        let odd = command("credits.top_up", "not json");
        let note = top_up_failed(&odd, &ending("failed"), 0).unwrap();
        assert!(
            note.payload.contains(r#""amount":null"#),
            "{}",
            note.payload
        );
    }

    #[test]
    fn only_currencies_are_topped_up_and_the_key_names_the_crossing() {
        let rows = crossing_rows(&settings("10", true), &change("10", "9"), 3, 1_000);
        let command = rows.command.unwrap();
        assert_eq!(command.client_key.as_deref(), Some("credits.top_up:usd:3"));
        let request: TopUpRequest = serde_json::from_str(&command.request).unwrap();
        assert_eq!(request.amount, 2000);
        let credits = BalanceChange {
            unit: "credits",
            ..change("10", "9")
        };
        assert!(
            crossing_rows(&settings("10", true), &credits, 1, 0)
                .command
                .is_none()
        );
        assert!(is_currency("eur") && !is_currency("EUR") && !is_currency("credits"));
    }
}
