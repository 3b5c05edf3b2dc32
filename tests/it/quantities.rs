//! Quantities are exact wherever they enter: usage events and checks (single, batch, with
//! `record`) read a JSON number or a string by one rule, store it exactly, and refuse the same
//! bad input with the same code and message. Bodies are sent as raw text, so that no JSON
//! library on the test's side rounds a number before billsync sees it.

use serde_json::{Value, json};

use crate::entitlements::{onboard, service};
use crate::helpers::{Backend, TestApp, on_both_backends};

on_both_backends!(
    a_json_number_quantity_is_stored_and_reported_exactly,
    a_check_weighs_and_records_a_json_number_quantity_exactly,
    a_string_and_a_number_of_the_same_value_are_stored_alike,
    usage_and_checks_refuse_the_same_bad_quantity_with_the_same_error,
);

/// POSTs `body` as written, answering the status and the JSON body.
async fn post_raw(app: &TestApp, path: &str, body: String) -> (u16, Value) {
    let response = app
        .v1(reqwest::Method::POST, path)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Sends one usage event whose `quantity` is the JSON text `quantity`.
async fn post_event(app: &TestApp, id: &str, tenant: &str, meter: &str, quantity: &str) -> Value {
    let body = format!(
        r#"{{"events": [{{"id": "{id}", "tenant_id": "{tenant}", "meter": "{meter}", "quantity": {quantity}}}]}}"#
    );
    let (status, answer) = post_raw(app, "/v1/usage", body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// Checks `api_calls` for `quantity` (JSON text) with `extra` members; answers status and body.
async fn check_raw(app: &TestApp, tenant: &str, quantity: &str, extra: &str) -> (u16, Value) {
    let body = format!(r#"{{"feature": "api_calls", "quantity": {quantity}{extra}}}"#);
    post_raw(
        app,
        &format!("/v1/tenants/{tenant}/entitlements/check"),
        body,
    )
    .await
}

/// An error answer as `(status, field, (code, message))`.
fn refusal((status, body): (u16, Value)) -> (u16, Value, (Value, Value)) {
    let error = &body["error"];
    let said = (error["code"].clone(), error["message"].clone());
    (status, error["field"].clone(), said)
}

async fn total(app: &TestApp, tenant: &str, meter: &str) -> Value {
    app.get_json(&format!("/v1/tenants/{tenant}/usage?meter={meter}"))
        .await["total"]
        .clone()
}

/// 1234567890123456789.25 as an f64 is 1234567890123456768.
const BIG: &str = "1234567890123456789.25";

async fn a_json_number_quantity_is_stored_and_reported_exactly(backend: Backend) {
    let app = TestApp::spawn_with(backend, crate::helpers::use_test_catalog).await;
    app.put_tenant("acme", json!({})).await;
    for (id, meter) in [("sum", "calls"), ("max", "storage"), ("last", "seats")] {
        let answer = post_event(&app, id, "acme", meter, BIG).await;
        assert_eq!(answer["accepted"], 1, "{answer}");
        assert_eq!(total(&app, "acme", meter).await, BIG, "{meter}");
    }
    let view = app.get_json("/v1/tenants/acme/entitlements").await;
    assert_eq!(view["features"]["api_calls"]["used"], BIG);
    // After a restart the figure is rebuilt from what was stored.
    let app = app.restart().await;
    let view = app.get_json("/v1/tenants/acme/entitlements").await;
    assert_eq!(view["features"]["api_calls"]["used"], BIG);
    app.stop().await;
}

async fn a_check_weighs_and_records_a_json_number_quantity_exactly(backend: Backend) {
    let app = service(backend).await;
    // Through an f64 the quantity is 1234567890123457024, printed 1.234567890123457e18: within.
    let (limit, over) = ("1234567890123457100", "1234567890123457100.5");
    let metadata = json!({"billsync.api_calls": limit});
    onboard(&app, "big", "cus_big", metadata).await;
    for quantity in [over.to_owned(), format!("\"{over}\"")] {
        let (status, answer) = check_raw(&app, "big", &quantity, "").await;
        assert_eq!(
            (status, answer["reason"].as_str()),
            (200, Some("limit_exceeded")),
            "{quantity}: {answer}"
        );
        let batch = format!(
            r#"{{"checks": [{{"tenant_id": "big", "feature": "api_calls", "quantity": {quantity}}}]}}"#
        );
        let (_, answer) = post_raw(&app, "/v1/entitlements/check", batch).await;
        assert_eq!(answer["results"][0]["reason"], "limit_exceeded", "{answer}");
    }
    let (_, at_limit) = check_raw(&app, "big", limit, "").await;
    assert_eq!(at_limit["reason"], "ok", "{at_limit}");

    // Recorded through the check, the quantity is stored as sent (through an f64: ...680).
    let record = r#", "record": {"id": "r1"}"#;
    let (status, recorded) = check_raw(&app, "big", "123456789012345678.9", record).await;
    assert_eq!(
        (
            status,
            recorded["recorded"].as_bool(),
            recorded["used"].as_str()
        ),
        (200, Some(true), Some("123456789012345678.9")),
        "{recorded}"
    );
    assert_eq!(total(&app, "big", "calls").await, "123456789012345678.9");
    app.stop().await;
}

async fn a_string_and_a_number_of_the_same_value_are_stored_alike(backend: Backend) {
    let app = TestApp::spawn_with(backend, crate::helpers::use_test_catalog).await;
    for tenant in ["by-number", "by-string"] {
        app.put_tenant(tenant, json!({})).await;
    }
    for (i, value) in ["12345678901234567.8", "2.50", "0.1", "-0"]
        .into_iter()
        .enumerate()
    {
        let meter = ["calls", "storage", "seats"][i % 3];
        let id = format!("e{i}");
        for (tenant, text) in [
            ("by-number", value.to_owned()),
            ("by-string", format!("\"{value}\"")),
        ] {
            let answer = post_event(&app, &id, tenant, meter, &text).await;
            assert_eq!(answer["accepted"], 1, "{text}: {answer}");
        }
    }
    for meter in ["calls", "storage", "seats"] {
        let (number, string) = (
            total(&app, "by-number", meter).await,
            total(&app, "by-string", meter).await,
        );
        assert_eq!(number, string, "{meter}");
    }
    assert_eq!(
        total(&app, "by-number", "calls").await,
        "12345678901234567.8"
    );
    assert_eq!(total(&app, "by-number", "storage").await, "2.5");
    assert_eq!(total(&app, "by-number", "seats").await, "0.1");
    app.stop().await;
}

async fn usage_and_checks_refuse_the_same_bad_quantity_with_the_same_error(backend: Backend) {
    let app = TestApp::spawn_with(backend, crate::helpers::use_test_catalog).await;
    app.put_tenant("acme", json!({})).await;
    let bad = [
        ("1e3", "invalid_quantity"),
        ("\"1e3\"", "invalid_quantity"),
        ("2.5E-1", "invalid_quantity"),
        ("12345678901234567890123456789", "invalid_quantity"),
        ("\"12345678901234567890123456789\"", "invalid_quantity"),
        ("\"0.00000000000000000000000000001\"", "invalid_quantity"),
        ("\"NaN\"", "invalid_quantity"),
        ("\"-Infinity\"", "invalid_quantity"),
        ("\" 5\"", "invalid_quantity"),
        ("\"\"", "invalid_quantity"),
        ("true", "invalid_quantity"),
        ("-1", "negative_quantity"),
        ("\"-0.5\"", "negative_quantity"),
    ];
    for (i, (quantity, code)) in bad.into_iter().enumerate() {
        let answer = post_event(&app, &format!("bad-{i}"), "acme", "calls", quantity).await;
        let rejected = &answer["rejected"][0];
        assert_eq!(rejected["code"], code, "{quantity}: {answer}");
        let by_usage = (rejected["code"].clone(), rejected["message"].clone());
        let expected = |field: &str| (400, json!(field), by_usage.clone());

        let by_check = refusal(check_raw(&app, "acme", quantity, "").await);
        assert_eq!(by_check, expected("quantity"), "{quantity}");
        let batch = format!(
            r#"{{"checks": [{{"tenant_id": "acme", "feature": "api_calls"}}, {{"tenant_id": "acme", "feature": "api_calls", "quantity": {quantity}}}]}}"#
        );
        let by_batch = refusal(post_raw(&app, "/v1/entitlements/check", batch).await);
        assert_eq!(by_batch, expected("checks[1].quantity"), "{quantity}");
    }
    assert_eq!(total(&app, "acme", "calls").await, "0", "nothing stored");
    app.stop().await;
}

#[test]
fn openapi_yaml_documents_the_quantity_errors_as_they_are_given() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml");
    let spec: serde_norway::Value = serde_norway::from_str(&text).expect("openapi.yaml is YAML");
    let schemas = &spec["components"]["schemas"];
    let given = |quantity: Value| {
        let error = billsync::domain::parse_quantity(&quantity, false).unwrap_err();
        (error.code.to_owned(), error.message.to_owned())
    };
    let (negative, exponent) = (given(json!(-3)), given(json!("1e3")));

    let usage_codes = &schemas["UsageRejection"]["properties"]["code"]["enum"];
    let usage = &spec["paths"]["/v1/usage"]["post"]["responses"]["200"]["content"]["application/json"]
        ["example"]["rejected"][0];
    let example = (usage["code"].as_str(), usage["message"].as_str());
    assert_eq!(example, (Some(&*negative.0), Some(&*negative.1)));
    for path in [
        "/v1/tenants/{tenant_id}/entitlements/check",
        "/v1/entitlements/check",
    ] {
        let refused = &spec["paths"][path]["post"]["responses"]["400"];
        let description = refused["description"].as_str().unwrap();
        let error =
            &refused["content"]["application/json"]["examples"]["quantity"]["value"]["error"];
        let example = (
            error["code"].as_str().unwrap().to_owned(),
            error["message"].as_str().unwrap().to_owned(),
        );
        assert!(
            example == negative || example == exponent,
            "{path}: {example:?}"
        );
        for code in ["invalid_quantity", "negative_quantity"] {
            assert!(description.contains(&format!("`{code}`")), "{path}: {code}");
        }
    }
    for code in ["invalid_quantity", "negative_quantity"] {
        assert!(usage_codes.as_sequence().unwrap().iter().any(|c| c == code));
    }
    assert_eq!(
        schemas["UsageEvent"]["properties"]["quantity"]["pattern"],
        schemas["CheckQuantity"]["pattern"],
        "one form for both"
    );
}
