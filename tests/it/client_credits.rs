//! The in-process client and prepaid credits, against the real service over HTTP: a
//! credit-priced feature is never allowed from the replica's memory (it says it needs the
//! server), `check` asks the server for it, `check_and_record` burns exactly once; the typed
//! ledger pages, settings and notifications read what the server holds.

use std::str::FromStr;
use std::time::Duration;

use billsync_client::{
    Client, CreditPrice, CreditSettingsUpdate, Error, LedgerEntry, NotificationQuery, Options,
    Page, reason,
};
use rust_decimal::Decimal;
use serde_json::json;

use crate::credits::{deliver_grant, grant, now, usd};
use crate::entitlements::{onboard, service};
use crate::helpers::{API_KEY, Backend, TestApp, on_both_backends};

on_both_backends!(
    credit_features_are_asked_of_the_server_and_burned_once_by_check_and_record,
    the_ledger_settings_and_notifications_are_typed_and_paged,
);

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// A service with tenant `gpu` (customer `cus_gpu`) and a client connected to it.
async fn gpu_tenant_and_client(backend: Backend) -> (TestApp, Client) {
    let app = service(backend).await;
    onboard(&app, "gpu", "cus_gpu", json!({})).await;
    let options = Options {
        connect_timeout: Duration::from_secs(20),
        flush_interval: Duration::from_millis(50),
        ..Options::default()
    };
    let client = Client::connect(&app.url(""), API_KEY, options)
        .await
        .expect("the client connects");
    (app, client)
}

/// $1.00 of credits for `gpu`: 100 cents, burned at 0.0167 cents per GPU second.
async fn one_dollar(app: &TestApp) {
    let g = grant("credgr_gpu", "cus_gpu", usd(100), json!({}));
    deliver_grant(app, "gpu", "billing.credit_grant.created", now(), g).await;
}

async fn credit_features_are_asked_of_the_server_and_burned_once_by_check_and_record(
    backend: Backend,
) {
    let (app, client) = gpu_tenant_and_client(backend).await;
    let price = client.credit_price("gpu_minutes").expect("credit-priced");
    let expected = CreditPrice {
        meter: "gpu_seconds".to_owned(),
        unit: "usd".to_owned(),
        credits_per_unit: d("0.0167"),
    };
    assert_eq!(price, expected);
    assert_eq!(client.credit_price("api_calls"), None);
    let memory = client.check_in_memory("gpu", "gpu_minutes", Decimal::ONE);
    assert_eq!(
        (memory.allowed, &*memory.reason),
        (false, reason::NEEDS_SERVER)
    );
    // No credits yet: the server says so, with the balance.
    let none = client.check("gpu", "gpu_minutes", Decimal::ONE).await;
    assert_eq!(
        (none.allowed, &*none.reason),
        (false, reason::INSUFFICIENT_CREDITS)
    );
    assert_eq!(none.credits.unwrap().balance.available, Decimal::ZERO);

    one_dollar(&app).await;
    let asked = client.check("gpu", "gpu_minutes", Decimal::ONE).await;
    assert!(asked.allowed, "{asked:?}");
    assert_eq!(asked.credits.as_ref().unwrap().cost, d("0.0167"));
    // Memory still does not decide: a balance it saw would be stale by the next burn.
    let memory = client.check_in_memory("gpu", "gpu_minutes", Decimal::ONE);
    assert_eq!(
        (memory.allowed, &*memory.reason),
        (false, reason::NEEDS_SERVER)
    );

    let burned = client
        .check_and_record("gpu", "gpu_minutes", Decimal::from(3), "r1")
        .await
        .unwrap();
    assert_eq!((burned.allowed, burned.recorded), (true, Some(true)));
    let credit = burned.credits.clone().unwrap();
    assert_eq!((credit.unit.as_str(), credit.cost), ("usd", d("0.0501")));
    assert_eq!(credit.balance.available, d("99.9499"));
    assert_eq!(burned.remaining, Some(d("99.9499")));
    let again = client
        .check_and_record("gpu", "gpu_minutes", Decimal::from(3), "r1")
        .await
        .unwrap();
    assert_eq!(again.recorded, Some(true));
    assert_eq!(
        again.credits.unwrap().balance.available,
        d("99.9499"),
        "burned once"
    );
    let refused = client
        .check_and_record("gpu", "gpu_minutes", Decimal::from(10_000), "r2")
        .await
        .unwrap();
    assert_eq!((refused.allowed, refused.recorded), (false, Some(false)));
    assert_eq!(&*refused.reason, reason::INSUFFICIENT_CREDITS);

    // The server gone: a credit-priced check is not allowed, never answered from memory.
    app.stop().await;
    let down = client.check("gpu", "gpu_minutes", Decimal::ONE).await;
    assert_eq!((down.allowed, &*down.reason), (false, reason::NEEDS_SERVER));
}

async fn the_ledger_settings_and_notifications_are_typed_and_paged(backend: Backend) {
    let (app, client) = gpu_tenant_and_client(backend).await;
    one_dollar(&app).await;
    for id in ["r1", "r2", "r3"] {
        let answer = client
            .check_and_record("gpu", "gpu_minutes", Decimal::ONE, id)
            .await;
        assert_eq!(answer.unwrap().recorded, Some(true));
    }
    let refused = CreditSettingsUpdate {
        threshold: d("5.5"),
        top_up_amount: None,
        auto_top_up: false,
    };
    let error = client.put_credit_settings("gpu", "usd", &refused).await;
    assert!(
        matches!(&error, Err(Error::Status { status: 400, code, .. }) if code == "invalid_value"),
        "{error:?}"
    );
    let update = CreditSettingsUpdate {
        threshold: d("99"),
        top_up_amount: Some(2000),
        auto_top_up: false,
    };
    let stored = client
        .put_credit_settings("gpu", "usd", &update)
        .await
        .unwrap();
    assert_eq!(
        (stored.threshold, stored.top_up_amount, stored.armed),
        (d("99"), Some(2000), true)
    );
    assert_eq!(client.credit_settings("gpu").await.unwrap(), vec![stored]);
    // 60 s burn 1.002 cents: from 99.9499 to 98.9479, below the threshold of 99.
    let crossing = client.check_and_record("gpu", "gpu_minutes", Decimal::from(60), "r4");
    assert_eq!(crossing.await.unwrap().recorded, Some(true));

    let mut entries = Vec::new();
    let mut page = Page {
        limit: Some(2),
        cursor: None,
    };
    loop {
        let credits = client.credits("gpu", &page).await.unwrap();
        // Every unit a feature burns: `usd` (gpu_minutes) and `credits` (ai_tokens, none).
        let units: Vec<&str> = credits.balances.iter().map(|b| b.unit.as_str()).collect();
        assert_eq!(units, ["credits", "usd"]);
        let balance = &credits.balances[1];
        assert_eq!((balance.granted, balance.burned), (d("100"), d("1.0521")));
        assert_eq!(balance.available, d("98.9479"));
        assert!(credits.entries.len() <= 2);
        entries.extend(credits.entries);
        match credits.next_cursor {
            Some(cursor) => page.cursor = Some(cursor),
            None => break,
        }
    }
    let burns: Vec<(&str, Decimal)> = (entries.iter())
        .filter_map(|e| match e {
            LedgerEntry::Burn(b) => Some((b.id.as_str(), b.amount)),
            _ => None,
        })
        .collect();
    assert_eq!(burns.len(), 4, "{entries:?}");
    assert!(burns.contains(&("r4", d("1.002"))), "{burns:?}");
    let Some(LedgerEntry::Grant(oldest)) = entries.last() else {
        panic!("the grant, effective two hours ago, comes last: {entries:?}");
    };
    assert_eq!(
        (oldest.id.as_str(), oldest.amount),
        ("credgr_gpu", d("100"))
    );
    assert_eq!(
        (oldest.burned, oldest.remaining),
        (d("1.0521"), d("98.9479"))
    );
    let missing = client.credits("nobody", &Page::default()).await;
    assert!(
        matches!(missing, Err(Error::Status { status: 404, .. })),
        "{missing:?}"
    );

    // The crossing's notification: recorded, pending (no notify.url here).
    let query = NotificationQuery {
        tenant_id: Some("gpu".to_owned()),
        ..NotificationQuery::default()
    };
    let notes = client.notifications(&query).await.unwrap();
    assert_eq!(notes.data.len(), 1, "{notes:?}");
    let note = &notes.data[0];
    assert_eq!(
        (note.kind.as_str(), note.status.as_str()),
        ("credits.balance_low", "pending")
    );
    assert_eq!(note.payload["data"]["available_after"], "98.9479");
    let delivered = NotificationQuery {
        status: Some("delivered".to_owned()),
        ..query
    };
    assert!(
        client
            .notifications(&delivered)
            .await
            .unwrap()
            .data
            .is_empty()
    );
    client.shutdown().await.unwrap();
    app.stop().await;
}
