//! A top-up that fails for good tells the product: a `credits.top_up_failed` notification,
//! signed and delivered like `credits.balance_low`, written by the transaction that ends the
//! command, once. Stripe (the wiremock fake of `topup.rs`) declines the card, or never takes
//! the command until `outbox.give_up_after`.

use std::time::Duration;

use billsync::store::{Settlement, now_ms};
use serde_json::Value;

use crate::helpers::{Backend, on_both_backends, wait_for};
use crate::topup::{World, auto_top_up, command_status, crossed, verify, world_with};

on_both_backends!(
    a_declined_top_up_notifies_the_product_once,
    a_top_up_stripe_never_takes_fails_when_given_up_and_notifies,
);

/// The tenant's notifications of `kind`, once `count` of them are delivered.
async fn delivered(w: &World, kind: &str, count: usize) -> Vec<Value> {
    let of_kind = || async {
        let page = w.app.get_json("/v1/notifications?tenant_id=acme").await;
        let all = page["data"].as_array().unwrap().clone();
        all.into_iter()
            .filter(|n| n["type"] == kind && n["status"] == "delivered")
            .collect::<Vec<_>>()
    };
    wait_for("the notifications delivered", || async {
        of_kind().await.len() >= count
    })
    .await;
    of_kind().await
}

/// Crosses acme's threshold with auto top-up on, waits for the top-up to fail; its command.
async fn top_up_fails(w: &World) -> Value {
    auto_top_up(&w.app).await;
    assert_eq!(crossed(&w.db, 600, 400).await, Some(1));
    let crossings = w.db.credit_alerts().crossings("acme", "usd").await.unwrap();
    let id = crossings[0].command_id.clone().unwrap();
    wait_for("the top-up failed", || async {
        command_status(&w.app, &id).await == "failed"
    })
    .await;
    w.app.get_json(&format!("/v1/commands/{id}")).await
}

async fn a_declined_top_up_notifies_the_product_once(backend: Backend) {
    let w = world_with(backend, 0, &[], |_| {}).await;
    w.stripe.lock().unwrap().decline = true;
    let command = top_up_fails(&w).await;
    assert_eq!(command["error"]["code"], "card_declined", "{command}");
    let failed = delivered(&w, "credits.top_up_failed", 1).await;
    assert_eq!(failed.len(), 1);
    let data = &failed[0]["payload"]["data"];
    assert_eq!(data["command_id"], command["id"]);
    assert_eq!(
        (data["currency"].as_str(), data["amount"].as_i64()),
        (Some("usd"), Some(2000))
    );
    assert_eq!(
        (data["crossing"].as_i64(), data["attempts"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(data["error"]["code"], "card_declined");
    assert_eq!(data["error"]["message"], "Your card was declined.");
    // The low-balance notice went out too; no credits were granted.
    delivered(&w, "credits.balance_low", 1).await;
    let created = w.stripe.lock().unwrap().created.clone();
    assert_eq!(
        (created.get("declined"), created.get("grant")),
        (Some(&1), None)
    );
    // Received signed, under the event id the API lists.
    let got = w.receiver.lock().unwrap().got.clone();
    let sent: Vec<_> = (got.iter())
        .filter(|(_, body)| body.contains("credits.top_up_failed"))
        .collect();
    assert_eq!(sent.len(), 1);
    assert!(verify(&sent[0].0, &sent[0].1));
    assert_eq!(
        sent[0].0["billsync-event-id"],
        failed[0]["id"].as_str().unwrap()
    );
    // Ending the command again (a late attempt, another replica) changes nothing.
    let id = command["id"].as_str().unwrap();
    let row = w.db.commands().get(id).await.unwrap().unwrap();
    let again = Settlement {
        status: "failed",
        result: None,
        error_code: Some("card_declined".to_owned()),
        message: None,
        rebase: None,
    };
    let settled =
        w.db.commands()
            .settle(&row, &again, now_ms())
            .await
            .unwrap();
    assert!(!settled);
    let page = w.app.get_json("/v1/notifications?tenant_id=acme").await;
    let kinds: Vec<&str> = (page["data"].as_array().unwrap().iter())
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
}

async fn a_top_up_stripe_never_takes_fails_when_given_up_and_notifies(backend: Backend) {
    let w = world_with(backend, 0, &[], |s| {
        s.outbox.give_up_after = Duration::from_secs(2);
        s.sync.max_retry_delay = Duration::from_millis(200);
    })
    .await;
    w.stripe.lock().unwrap().unavailable = true;
    let command = top_up_fails(&w).await;
    assert_eq!(command["error"]["code"], "vendor_unavailable", "{command}");
    let failed = delivered(&w, "credits.top_up_failed", 1).await;
    let data = &failed[0]["payload"]["data"];
    assert_eq!(data["command_id"], command["id"]);
    assert_eq!(data["error"]["code"], "vendor_unavailable");
    assert!(data["attempts"].as_i64().unwrap() >= 2, "{data}");
    assert_eq!(w.stripe.lock().unwrap().created.get("grant"), None);
}
