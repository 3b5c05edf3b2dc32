//! `POST /webhooks/stripe`: signatures, the inbox, duplicates, and events billsync does not know.

use serde_json::{Value, json};

use billsync::store::Db;

use crate::helpers::{
    Backend, TestApp, WEBHOOK_SECRET, customer, error_of, event, on_both_backends, sign_now,
    take_webhooks, venv_bin, wait_for,
};

on_both_backends!(
    a_webhook_signed_by_the_stripe_sdk_is_stored_and_applied,
    bad_signatures_are_refused_and_store_nothing,
    secrets_in_rotation_are_all_accepted,
    a_duplicate_delivery_is_acknowledged_and_applied_once,
    unknown_event_types_and_objects_without_ids_are_stored_and_acknowledged,
    an_oversized_webhook_is_refused_with_413,
    concurrent_deliveries_are_each_stored_once_and_committed_before_their_answer,
    acknowledged_events_survive_a_crash_before_they_are_applied,
    concurrent_updates_of_one_customer_leave_the_newest,
);

/// Signs with the official `stripe` Python package's test helper.
fn sign_with_stripe_sdk(payload: &str, secret: &str) -> String {
    let script = "import sys, stripe; print(stripe.WebhookSignature.generate_signature_header(sys.stdin.read(), sys.argv[1]))";
    let mut child = std::process::Command::new(venv_bin("python"))
        .args(["-c", script, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(payload.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

async fn inbox_counts(app: &TestApp) -> Value {
    app.get_json("/v1/sync/status").await["inbox"].clone()
}

async fn a_webhook_signed_by_the_stripe_sdk_is_stored_and_applied(backend: Backend) {
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    let body = event(
        "evt_sdk_1",
        "customer.created",
        1_700_000_000,
        customer("cus_sdk", "sdk-tenant"),
    )
    .to_string();
    let signature = sign_with_stripe_sdk(&body, WEBHOOK_SECRET);
    let response = app.post_webhook(&body, Some(signature)).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        json!({"received": true, "event_id": "evt_sdk_1", "duplicate": false})
    );

    wait_for("the customer's tenant", || async {
        app.get_tenant("sdk-tenant").await.status() == 200
    })
    .await;
    let tenant = app.get_json("/v1/tenants/sdk-tenant").await;
    assert_eq!(tenant["customer_id"], "cus_sdk");
    assert_eq!(tenant["email"], "sdk-tenant@example.test");
    assert!(tenant["synced_at"].is_string());
    app.stop().await;
}

async fn bad_signatures_are_refused_and_store_nothing(backend: Backend) {
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    let body = event(
        "evt_bad",
        "customer.created",
        1_700_000_000,
        customer("cus_bad", "bad"),
    )
    .to_string();
    let now = chrono::Utc::now().timestamp();
    let sign = |secret: &str, t: i64, b: &str| {
        billsync::webhook::signature::header(secret, t, b.as_bytes())
    };
    let tampered = body.replace("cus_bad", "cus_evil");
    let cases: Vec<(&str, String, Option<String>)> = vec![
        (
            "tampered body",
            tampered.clone(),
            Some(sign(WEBHOOK_SECRET, now, &body)),
        ),
        (
            "wrong secret",
            body.clone(),
            Some(sign("whsec_someone_else", now, &body)),
        ),
        (
            "stale timestamp",
            body.clone(),
            Some(sign(WEBHOOK_SECRET, now - 301, &body)),
        ),
        (
            "future timestamp",
            body.clone(),
            Some(sign(WEBHOOK_SECRET, now + 301, &body)),
        ),
        ("missing header", body.clone(), None),
        ("garbage header", body.clone(), Some("v1=nothex".to_owned())),
    ];
    for (what, payload, signature) in cases {
        let (status, code, _) = error_of(app.post_webhook(&payload, signature).await).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_signature"),
            "{what}"
        );
    }
    let counts = inbox_counts(&app).await;
    assert_eq!(
        counts,
        json!({"pending": 0, "failed": 0, "applied": 0, "skipped": 0, "oldest_waiting_at": null})
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"billsync_webhooks_rejected_total{reason="bad_signature"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"billsync_webhooks_rejected_total{reason="stale_timestamp"} 2"#),
        "{metrics}"
    );
    app.stop().await;
}

async fn secrets_in_rotation_are_all_accepted(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.stripe.webhook_secrets = vec![
            billsync::config::Secret::new("whsec_old_one"),
            billsync::config::Secret::new("whsec_new_one"),
        ];
    })
    .await;
    for (i, secret) in ["whsec_old_one", "whsec_new_one"].into_iter().enumerate() {
        let body = event(
            &format!("evt_rot_{i}"),
            "customer.created",
            1_700_000_000,
            customer("cus_r", "rot"),
        )
        .to_string();
        let signature = sign_with_stripe_sdk(&body, secret);
        assert_eq!(
            app.post_webhook(&body, Some(signature)).await.status(),
            200,
            "{secret}"
        );
    }
    let body = event(
        "evt_rot_x",
        "customer.created",
        1_700_000_000,
        customer("cus_r", "rot"),
    )
    .to_string();
    let retired = sign_with_stripe_sdk(&body, "whsec_retired");
    assert_eq!(app.post_webhook(&body, Some(retired)).await.status(), 400);
    app.stop().await;
}

async fn a_duplicate_delivery_is_acknowledged_and_applied_once(backend: Backend) {
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    let delivery = event(
        "evt_dup",
        "customer.created",
        1_700_000_000,
        customer("cus_dup", "dup"),
    );
    assert_eq!(app.deliver(&delivery).await["duplicate"], false);
    assert_eq!(app.deliver(&delivery).await["duplicate"], true);
    wait_for("the event to be applied", || async {
        inbox_counts(&app).await["applied"] == 1
    })
    .await;
    assert_eq!(app.deliver(&delivery).await["duplicate"], true);
    let events = app.get_json("/v1/tenants/dup/events").await;
    assert_eq!(events["data"].as_array().unwrap().len(), 1, "{events}");
    assert_eq!(events["data"][0]["event_id"], "evt_dup");
    assert_eq!(events["data"][0]["source"], "webhook");
    assert_eq!(events["data"][0]["outcome"], "applied");
    let counts = inbox_counts(&app).await;
    assert_eq!(
        (counts["applied"].as_i64(), counts["pending"].as_i64()),
        (Some(1), Some(0))
    );
    app.stop().await;
}

async fn unknown_event_types_and_objects_without_ids_are_stored_and_acknowledged(backend: Backend) {
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    let unknown = event(
        "evt_unknown",
        "radar.early_fraud_warning.created",
        1_700_000_000,
        json!({"id": "issfr_1", "object": "radar.early_fraud_warning", "some_new_field": {"nested": [1, 2]}}),
    );
    let upcoming = event(
        "evt_upcoming",
        "invoice.upcoming",
        1_700_000_000,
        json!({"object": "invoice", "customer": "cus_x", "total": 500, "lines": {"data": []}}),
    );
    let future_shape = json!({"id": "evt_future", "type": "v2.core.thing", "created": 1_700_000_000, "data": "opaque"});
    // Without a vendor to ask, a refund (which only names its charge) cannot be applied.
    let refund = event(
        "evt_refund",
        "charge.refund.updated",
        1_700_000_000,
        json!({"id": "re_1", "object": "refund", "charge": "ch_1"}),
    );
    for delivery in [&unknown, &upcoming, &future_shape, &refund] {
        assert_eq!(app.deliver(delivery).await["duplicate"], false);
    }
    wait_for("every row settled", || async {
        inbox_counts(&app).await["skipped"] == 4
    })
    .await;
    let counts = inbox_counts(&app).await;
    assert_eq!(
        (counts["pending"].as_i64(), counts["failed"].as_i64()),
        (Some(0), Some(0)),
        "{counts}"
    );

    let (status, code, _) = error_of(
        app.post_webhook(
            r#"{"type":"x","created":1}"#,
            Some(sign_now(r#"{"type":"x","created":1}"#)),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (400, "invalid_payload"),
        "an event needs an id"
    );
    app.stop().await;
}

async fn an_oversized_webhook_is_refused_with_413(backend: Backend) {
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    let body = format!(
        r#"{{"id":"evt_big","type":"x","created":1,"pad":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let (status, code, _) = error_of(app.post_webhook(&body, Some(sign_now(&body))).await).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    assert_eq!(inbox_counts(&app).await["skipped"], 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_503_while_postgres_is_down_so_stripe_retries() {
    let app = TestApp::spawn_with(Backend::Postgres, |s| {
        take_webhooks(s);
        s.database.connect_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    let crate::helpers::TestDatabase::Postgres { admin_url, name } = &app.db else {
        unreachable!()
    };
    crate::helpers::drop_postgres_database(admin_url, name)
        .await
        .unwrap();
    let body = event(
        "evt_down",
        "customer.created",
        1_700_000_000,
        customer("cus_d", "down"),
    )
    .to_string();
    let (status, code, _) = error_of(app.post_webhook(&body, Some(sign_now(&body))).await).await;
    assert_eq!((status, code.as_str()), (503, "database_unavailable"));
    app.stop().await;
}

/// The inbox row's status, read on a connection of its own (`None`: no row).
async fn inbox_status(db: &Db, event_id: &str) -> Option<String> {
    let sql = "SELECT status FROM inbox_events WHERE event_id = $1";
    let status = match db {
        Db::Sqlite(pool) => {
            sqlx::query_scalar(sql)
                .bind(event_id)
                .fetch_optional(pool)
                .await
        }
        Db::Postgres(pool) => {
            sqlx::query_scalar(sql)
                .bind(event_id)
                .fetch_optional(pool)
                .await
        }
    };
    status.unwrap()
}

fn customer_created(prefix: &str, i: usize) -> Value {
    event(
        &format!("evt_{prefix}_{i}"),
        "customer.created",
        1_700_000_000 + i as i64,
        customer(&format!("cus_{prefix}_{i}"), &format!("{prefix}-{i}")),
    )
}

/// Concurrent deliveries share a transaction: each must still be in the inbox when its 200
/// arrives, stored once however often it is delivered, and told truthfully whether it was new.
async fn concurrent_deliveries_are_each_stored_once_and_committed_before_their_answer(
    backend: Backend,
) {
    const EVENTS: usize = 80;
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    let db = Db::connect(&app.settings.database).await.unwrap();
    let deliveries: Vec<Value> = (0..EVENTS).map(|i| customer_created("many", i)).collect();
    // Every event twice, all at once.
    let answers = futures_util::future::join_all(deliveries.iter().chain(&deliveries).map(
        |delivery| async {
            let answer = app.deliver(delivery).await;
            let id = answer["event_id"].as_str().unwrap().to_owned();
            let status = inbox_status(&db, &id).await;
            (id, answer["duplicate"] == false, status)
        },
    ))
    .await;
    let mut new = std::collections::BTreeMap::<String, usize>::new();
    for (id, first, status) in &answers {
        assert!(
            status.is_some(),
            "{id} was answered before its row was committed"
        );
        *new.entry(id.clone()).or_default() += usize::from(*first);
    }
    assert_eq!(new.len(), EVENTS);
    assert!(
        new.values().all(|n| *n == 1),
        "stored (not duplicate) answers: {new:?}"
    );
    wait_for("every event to be applied", || async {
        inbox_counts(&app).await["applied"] == EVENTS
    })
    .await;
    let counts = inbox_counts(&app).await;
    assert_eq!(
        (counts["pending"].as_i64(), counts["failed"].as_i64()),
        (Some(0), Some(0))
    );
    for i in [0, EVENTS - 1] {
        let tenant = app.get_json(&format!("/v1/tenants/many-{i}")).await;
        assert_eq!(tenant["customer_id"], format!("cus_many_{i}"));
    }
    db.close().await;
    app.stop().await;
}

/// Every acknowledged event is applied, even when the process dies before applying it (its
/// claim on a batch runs out and the next process applies it).
async fn acknowledged_events_survive_a_crash_before_they_are_applied(backend: Backend) {
    const EVENTS: usize = 120;
    let adjust = |s: &mut billsync::config::Settings| {
        take_webhooks(s);
        s.claims.inbox = std::time::Duration::from_secs(1);
    };
    let app = TestApp::spawn_with(backend, adjust).await;
    let settings = app.settings.clone();
    let deliveries: Vec<Value> = (0..EVENTS).map(|i| customer_created("crash", i)).collect();
    let answers = futures_util::future::join_all(deliveries.iter().map(|d| app.deliver(d))).await;
    assert!(answers.iter().all(|a| a["duplicate"] == false));
    let database = app.crash();
    let db = Db::connect(&settings.database).await.unwrap();
    for delivery in &deliveries {
        let id = delivery["id"].as_str().unwrap();
        assert!(
            inbox_status(&db, id).await.is_some(),
            "{id} was acknowledged and lost"
        );
    }
    let app = TestApp::after_crash(settings, database).await;
    wait_for("every acknowledged event to be applied", || async {
        inbox_counts(&app).await["applied"] == EVENTS
    })
    .await;
    for i in 0..EVENTS {
        assert_eq!(
            inbox_status(&db, &format!("evt_crash_{i}"))
                .await
                .as_deref(),
            Some("applied")
        );
    }
    let tenant = app
        .get_json(&format!("/v1/tenants/crash-{}", EVENTS - 1))
        .await;
    assert_eq!(tenant["customer_id"], format!("cus_crash_{}", EVENTS - 1));
    db.close().await;
    app.stop().await;
}

/// Updates of one customer delivered all at once, in reverse order, through batched inserts
/// and batched applies: the mirror ends at the newest.
async fn concurrent_updates_of_one_customer_leave_the_newest(backend: Backend) {
    const UPDATES: i64 = 30;
    let app = TestApp::spawn_with(backend, take_webhooks).await;
    let update = |n: i64| {
        let mut object = customer("cus_order", "order");
        object["email"] = json!(format!("v{n}@example.test"));
        event(
            &format!("evt_order_{n}"),
            "customer.updated",
            1_700_000_000 + n,
            object,
        )
    };
    let deliveries: Vec<Value> = (0..UPDATES).rev().map(update).collect();
    futures_util::future::join_all(deliveries.iter().map(|d| app.deliver(d))).await;
    wait_for("every update to be applied", || async {
        inbox_counts(&app).await["applied"] == UPDATES
    })
    .await;
    let db = Db::connect(&app.settings.database).await.unwrap();
    let mirrored = db
        .mirror()
        .get("customer", "cus_order")
        .await
        .unwrap()
        .unwrap();
    let mirrored: Value = serde_json::from_str(&mirrored.payload).unwrap();
    assert_eq!(mirrored["email"], format!("v{}@example.test", UPDATES - 1));
    db.close().await;
    app.stop().await;
}
