//! openapi.yaml is the contract: it and the router must agree on which routes exist.

use std::collections::BTreeSet;

use crate::helpers::{Backend, TestApp};

fn documented_routes() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml");
    let spec: serde_yaml::Value = serde_yaml::from_str(&text).expect("openapi.yaml is YAML");
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "OpenAPI 3.1"
    );
    let paths = spec["paths"].as_mapping().expect("paths");
    let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
    paths
        .iter()
        .flat_map(|(path, item)| {
            let path = path.as_str().expect("path").to_owned();
            let item = item.as_mapping().expect("path item");
            methods
                .iter()
                .filter(|m| item.contains_key(**m))
                .map(move |m| (m.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_router_and_openapi_yaml_list_the_same_routes() {
    let served: BTreeSet<(String, String)> = billsync::api::route_list()
        .into_iter()
        .map(|(method, path)| (method.to_string(), path.to_owned()))
        .collect();
    let documented = documented_routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but missing from openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.yaml but not served: {unserved:?}"
    );
}

#[tokio::test]
async fn every_documented_route_is_answered_by_a_handler() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for (method, path) in documented_routes() {
        let concrete = path.replace("{tenant_id}", "contract-check");
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = app
            .client
            .request(method.clone(), app.url(&concrete))
            .bearer_auth(crate::helpers::API_KEY)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(
            !body.contains("route_not_found") && !body.contains("method_not_allowed"),
            "{method} {path} is documented but the router does not serve it ({status}): {body}"
        );
    }
    app.stop().await;
}
