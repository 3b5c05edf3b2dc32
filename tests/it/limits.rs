//! Bounded requests: how many reconciliations the API computes at once.

use reqwest::Method;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{Backend, TestApp, on_both_backends, wait_for};
use crate::reconcile::{Seed, service, window};

on_both_backends!(reconciliations_past_the_limit_are_refused_and_every_accepted_one_ends,);

/// Starts a run of the tenant's window; answers the status, the body and `Retry-After`.
async fn start_run(app: &TestApp) -> (u16, Value, Option<String>) {
    let mut body = window();
    body["tenant"] = json!("slow");
    let response = app
        .v1(Method::POST, "/v1/reconciliations")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.json().await.unwrap(), retry_after)
}

/// Five runs asked for at once with two slots, each kept busy by a slow vendor: two are
/// accepted and three refused with 429 `too_many_runs` (nothing stored); the accepted ones end,
/// and their slots serve the next call.
async fn reconciliations_past_the_limit_are_refused_and_every_accepted_one_ends(backend: Backend) {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"object": "list", "has_more": false, "data": []}))
                .set_delay(std::time::Duration::from_secs(3)),
        )
        .mount(&vendor)
        .await;
    let app = service(backend, &vendor, |s| s.reconcile.max_concurrent_runs = 2).await;
    Seed { app: &app, n: 0 }.tenant("slow").await;

    let answers = futures_util::future::join_all((0..5).map(|_| start_run(&app))).await;
    let accepted: Vec<String> = answers
        .iter()
        .filter(|(status, ..)| *status == 202)
        .map(|(_, run, _)| run["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(accepted.len(), 2, "{answers:?}");
    for (status, body, retry_after) in answers.iter().filter(|(s, ..)| *s != 202) {
        assert_eq!(*status, 429);
        assert_eq!(body["error"]["code"], "too_many_runs");
        assert_eq!(retry_after.as_deref(), Some("5"));
    }
    let running = app.get_json("/v1/reconciliations?status=running").await;
    assert!(running["data"].as_array().unwrap().len() <= 2, "{running}");

    let done = || async {
        let runs = app.get_json("/v1/reconciliations").await;
        runs["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "done")
    };
    wait_for("every accepted run to end", done).await;
    let stored = app.get_json("/v1/reconciliations").await;
    assert_eq!(
        stored["data"].as_array().unwrap().len(),
        2,
        "refusals store nothing"
    );

    let (status, run, _) = start_run(&app).await;
    assert_eq!(status, 202, "a freed slot takes the next run");
    let id = run["id"].as_str().unwrap().to_owned();
    wait_for("the next run to end", || async {
        app.get_json(&format!("/v1/reconciliations/{id}")).await["status"] == "done"
    })
    .await;
    app.stop().await;
}
