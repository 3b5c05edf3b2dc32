//! Keys scoped to tenants, and body limits, on every route of the route table.

use serde_json::json;

use crate::helpers::*;

/// Routes whose handlers read no body.
const TAKE_NO_BODY: &[&str] = &[
    "/v1/tenants/{tenant_id}/subscription/resume",
    "/v1/sync/events/{event_id}/retry",
];

const SCOPED_KEY: &str = "scoped-key-for-alpha";

async fn scoped_service(backend: Backend) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        s.api.tenant_keys = vec![(
            billsync::config::key_digest(SCOPED_KEY).unwrap(),
            vec!["alpha".to_owned()],
        )];
        s.api.max_body_bytes = 4096;
    })
    .await
}

async fn a_key_scoped_to_one_tenant_gets_404_for_another_on_every_tenant_route(backend: Backend) {
    let app = scoped_service(backend).await;
    for tenant in ["alpha", "beta"] {
        assert!(
            app.put_tenant(tenant, json!({}))
                .await
                .status()
                .is_success()
        );
    }
    let tenant_routes: Vec<_> = billsync::api::route_list()
        .into_iter()
        .filter(|(_, path)| path.contains("{tenant_id}"))
        .collect();
    assert!(tenant_routes.len() >= 10, "{tenant_routes:?}");
    for (method, path) in tenant_routes {
        let request = |tenant: &str| {
            app.client
                .request(
                    method.clone(),
                    app.url(&path.replace("{tenant_id}", tenant)),
                )
                .bearer_auth(SCOPED_KEY)
                .json(&json!({}))
        };
        let other = request("beta").send().await.unwrap();
        let (status, code, _) = error_of(other).await;
        assert_eq!(
            (status, code.as_str()),
            (404, "tenant_not_found"),
            "{method} {path} for another tenant"
        );
        let own = request("alpha").send().await.unwrap();
        let status = own.status().as_u16();
        if status == 404 {
            let (_, code, _) = error_of(own).await;
            assert_ne!(
                code, "tenant_not_found",
                "{method} {path} for its own tenant"
            );
        }
    }
    app.stop().await;
}

async fn every_route_refuses_a_body_over_the_limit(backend: Backend) {
    let app = scoped_service(backend).await;
    assert!(
        app.put_tenant("alpha", json!({}))
            .await
            .status()
            .is_success()
    );
    // api.max_body_bytes (4096 here), but larger fixed limits for usage batches and webhooks.
    let limit = |path: &str| match path {
        "/v1/usage" => 32 * 1024 * 1024,
        "/webhooks/stripe" => 1024 * 1024,
        _ => 4096,
    };
    let mut checked = 0;
    for (method, path) in billsync::api::route_list() {
        if !matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
            continue;
        }
        let request = app
            .client
            .request(
                method.clone(),
                app.url(&path.replace("{tenant_id}", "alpha")),
            )
            .header("content-type", "application/json")
            .body(format!(
                "{{\"padding\": \"{}\"}}",
                "x".repeat(limit(path) + 1)
            ));
        let request = if path.starts_with("/v1/") {
            request.bearer_auth(API_KEY)
        } else {
            request
        };
        let response = request.send().await.unwrap();
        if TAKE_NO_BODY.contains(&path) {
            // The body is never read (nor buffered): whatever its size, it changes nothing.
            assert!(response.status().as_u16() < 500, "{method} {path}");
            continue;
        }
        let (status, code, _) = error_of(response).await;
        assert_eq!(
            (status, code.as_str()),
            (413, "payload_too_large"),
            "{method} {path}"
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} routes take a body");
    app.stop().await;
}

on_both_backends!(
    a_key_scoped_to_one_tenant_gets_404_for_another_on_every_tenant_route,
    every_route_refuses_a_body_over_the_limit,
);
