//! openapi.yaml is the contract: it and the router must agree on which routes exist.

use std::collections::BTreeSet;

use crate::helpers::{Backend, TestApp};

/// openapi.yaml, parsed.
pub fn spec() -> serde_norway::Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml");
    serde_norway::from_str(&text).expect("openapi.yaml is YAML")
}

fn documented_routes() -> BTreeSet<(String, String)> {
    let spec = spec();
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
        // A stream does not end: that it answers with one is the proof.
        let body = match crate::helpers::is_event_stream(&response) {
            true => String::new(),
            false => response.text().await.unwrap(),
        };
        assert!(
            !body.contains("route_not_found") && !body.contains("method_not_allowed"),
            "{method} {path} is documented but the router does not serve it ({status}): {body}"
        );
    }
    app.stop().await;
}

/// The error codes the source can put in an error body: the literal code of every `ApiError`
/// made with `new`, `bad_request` or `not_found`, the codes chosen in tables (`("code", ...)`) by
/// the JSON extractor and the status fallback, and the quantity parser's.
fn codes_in_source() -> BTreeSet<String> {
    fn rust_files(dir: &std::path::Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                rust_files(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    /// The string literal that starts each `marker ... "x"` before the call's first `)`.
    fn literals_after(text: &str, marker: &str, codes: &mut BTreeSet<String>) {
        for (at, _) in text.match_indices(marker) {
            let rest = &text[at + marker.len()..];
            let close = rest.find(')').unwrap_or(rest.len());
            if let Some(quote) = rest[..close].find('"') {
                let literal = &rest[quote + 1..];
                let end = literal.find('"').expect("closed literal");
                codes.insert(literal[..end].to_owned());
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut codes = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source file");
        for owner in ["ApiError::", "Self::"] {
            for constructor in ["new(", "bad_request(", "not_found("] {
                literals_after(&text, &format!("{owner}{constructor}"), &mut codes);
            }
        }
        let name = file
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if name == "src/api/json.rs" || name == "src/api/error.rs" {
            for (at, _) in text.match_indices("(\"") {
                let rest = &text[at + 2..];
                let end = rest.find('"').expect("closed literal");
                if rest[end..].starts_with("\",")
                    && rest[..end]
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_')
                {
                    codes.insert(rest[..end].to_owned());
                }
            }
        }
        if name == "src/domain/quantity.rs" {
            for (at, _) in text.match_indices("code: \"") {
                let rest = &text[at + 7..];
                codes.insert(rest[..rest.find('"').unwrap()].to_owned());
            }
        }
    }
    codes
}

#[test]
fn the_sync_status_job_enum_lists_every_singleton_job() {
    let spec = spec();
    let job = &spec["components"]["schemas"]["SyncStatus"]["properties"]["jobs"]["items"]["properties"]
        ["job"]["enum"];
    let documented: Vec<&str> = job
        .as_sequence()
        .expect("SyncStatus.jobs[].job has an enum")
        .iter()
        .map(|j| j.as_str().expect("a job"))
        .collect();
    assert_eq!(documented, billsync::cluster::SINGLETON_JOBS);
}

#[test]
fn the_error_code_enum_lists_every_code_the_source_emits_and_no_other() {
    let spec = spec();
    let documented: BTreeSet<String> =
        spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
            .as_sequence()
            .expect("Error.error.code has an enum")
            .iter()
            .map(|c| c.as_str().expect("a code").to_owned())
            .collect();
    let emitted = codes_in_source();
    assert!(emitted.contains("rate_limited") && emitted.contains("unauthorized"));
    let undocumented: Vec<_> = emitted.difference(&documented).collect();
    let unused: Vec<_> = documented.difference(&emitted).collect();
    assert!(
        undocumented.is_empty(),
        "codes the server emits that the Error enum lacks: {undocumented:?}"
    );
    assert!(
        unused.is_empty(),
        "codes in the Error enum that nothing emits: {unused:?}"
    );
}
