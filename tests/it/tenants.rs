//! `PUT` and `GET /v1/tenants/{tenant_id}`.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, error_of, on_both_backends};

on_both_backends!(
    a_new_tenant_is_created_with_201_and_replaced_with_200,
    an_identical_put_changes_nothing,
    an_unknown_tenant_is_a_json_404,
    bad_tenant_ids_are_refused_naming_the_field,
    bad_bodies_get_the_right_4xx_and_store_nothing,
    concurrent_puts_create_the_tenant_exactly_once,
);

async fn a_new_tenant_is_created_with_201_and_replaced_with_200(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    let created = app
        .put_tenant(
            "acme-co",
            json!({"name": "Acme", "email": "billing@acme.test"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["tenant_id"], "acme-co");
    assert_eq!(created["name"], "Acme");
    assert_eq!(created["email"], "billing@acme.test");
    assert_eq!(created["customer_id"], Value::Null);
    assert_eq!(created["subscription"], Value::Null);
    assert_eq!(created["pending"], json!([]));

    let replaced = app
        .put_tenant("acme-co", json!({"name": "Acme Inc."}))
        .await;
    assert_eq!(replaced.status(), 200);

    let fetched = app.get_tenant("acme-co").await;
    assert_eq!(fetched.status(), 200);
    let fetched: Value = fetched.json().await.unwrap();
    assert_eq!(fetched["name"], "Acme Inc.");
    assert_eq!(
        fetched["email"],
        Value::Null,
        "PUT replaces: an absent email is cleared"
    );
    assert_eq!(fetched["created_at"], created["created_at"]);
    app.stop().await;
}

async fn an_identical_put_changes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let body = json!({"name": "Same", "email": "same@example.test"});
    let first: Value = app
        .put_tenant("same", body.clone())
        .await
        .json()
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let again = app.put_tenant("same", body).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        again, first,
        "an idempotent PUT leaves every field, updated_at included"
    );
    app.stop().await;
}

async fn an_unknown_tenant_is_a_json_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, code, _) = error_of(app.get_tenant("nobody").await).await;
    assert_eq!((status, code.as_str()), (404, "tenant_not_found"));
    app.stop().await;
}

async fn bad_tenant_ids_are_refused_naming_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let too_long = "t".repeat(65);
    for bad in ["has%20space", "semi%3Bcolon", "%C3%BCml", too_long.as_str()] {
        let (status, code, field) = error_of(app.put_tenant(bad, json!({"name": "x"})).await).await;
        assert_eq!(
            (status, code.as_str(), field.as_deref()),
            (400, "invalid_value", Some("tenant_id")),
            "{bad}"
        );
        let (status, _, field) = error_of(app.get_tenant(bad).await).await;
        assert_eq!(
            (status, field.as_deref()),
            (400, Some("tenant_id")),
            "{bad}"
        );
    }
    let longest = "t".repeat(64);
    assert_eq!(app.put_tenant(&longest, json!({})).await.status(), 201);
    app.stop().await;
}

async fn bad_bodies_get_the_right_4xx_and_store_nothing(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.api.max_body_bytes = 4096).await;
    let put = |body: Vec<u8>, content_type: &'static str| {
        app.v1(Method::PUT, "/v1/tenants/victim")
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    // (body, content type, status, code, field)
    type Case = (
        Vec<u8>,
        &'static str,
        u16,
        &'static str,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            b"{\"name\": ".to_vec(),
            "application/json",
            400,
            "invalid_json",
            None,
        ),
        (b"".to_vec(), "application/json", 400, "invalid_json", None),
        (
            b"[1, 2]".to_vec(),
            "application/json",
            400,
            "invalid_json",
            None,
        ),
        (
            b"{\"name\":\"A\"}".to_vec(),
            "text/plain",
            415,
            "unsupported_media_type",
            None,
        ),
        (
            b"{\"name\":\"A\",\"plan\":\"gold\"}".to_vec(),
            "application/json",
            400,
            "unknown_field",
            Some("plan"),
        ),
        (
            b"{\"name\":42}".to_vec(),
            "application/json",
            400,
            "invalid_value",
            Some("name"),
        ),
        (
            b"{\"name\":\"   \"}".to_vec(),
            "application/json",
            400,
            "invalid_value",
            Some("name"),
        ),
        (
            b"{\"email\":\"not-an-email\"}".to_vec(),
            "application/json",
            400,
            "invalid_value",
            Some("email"),
        ),
        (
            format!("{{\"name\":\"{}\"}}", "x".repeat(5000)).into_bytes(),
            "application/json",
            413,
            "payload_too_large",
            None,
        ),
    ];
    for (body, content_type, want_status, want_code, want_field) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        let (status, code, field) = error_of(put(body, content_type).await.unwrap()).await;
        assert_eq!(
            (status, code.as_str(), field.as_deref()),
            (want_status, want_code, want_field),
            "{content_type} {shown}"
        );
    }
    let (status, _, _) = error_of(app.get_tenant("victim").await).await;
    assert_eq!(status, 404, "no bad request may leave a tenant behind");
    app.stop().await;
}

async fn concurrent_puts_create_the_tenant_exactly_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..12 {
        let request = app
            .v1(Method::PUT, "/v1/tenants/racy")
            .json(&json!({"name": format!("Racer {i}")}));
        puts.spawn(async move { request.send().await.expect("PUT").status().as_u16() });
    }
    let statuses = puts.join_all().await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        11,
        "{statuses:?}"
    );
    app.stop().await;
}
