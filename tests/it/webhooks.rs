//! `POST /webhooks/stripe`: signatures, the inbox, duplicates, and events billsync does not know.

use serde_json::{Value, json};

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
