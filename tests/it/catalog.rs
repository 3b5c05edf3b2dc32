//! The catalog file is as strict as the configuration: a typo refuses it at start, and a reload
//! that meets one keeps the previous catalog and says why.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::binary::{Running, billsync};

const KEY: &str = "catalog-test-key-0123456789";

/// A catalog whose free plan grants `limit` API calls, with `extra` appended to its feature.
fn catalog(limit: u32, extra: &str) -> String {
    format!(
        "[meters.calls]\naggregation = \"sum\"\n\n[features.api_calls]\nmeter = \"calls\"\n{extra}\n\
         [plans.free]\nfeatures = {{ api_calls = {limit} }}\n"
    )
}

/// `billsync serve` in `dir` on port 0 with the catalog at `path`, logs piped.
fn serve(dir: &std::path::Path, path: &std::path::Path) -> Command {
    let path = path.to_str().expect("a UTF-8 path");
    let env = [
        ("BILLSYNC_LISTEN", "127.0.0.1:0"),
        ("BILLSYNC_API__KEYS", KEY),
        ("BILLSYNC_CATALOG__PATH", path),
    ];
    billsync(dir, &["serve"], &env)
}

#[test]
fn a_catalog_with_an_unknown_key_stops_serve_at_start_with_the_file_table_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.toml");
    std::fs::write(&path, catalog(10, "metr = \"calls\"")).unwrap();
    let output = serve(dir.path(), &path).output().unwrap();
    assert_ne!(output.status.code(), Some(0), "serve refused to start");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = format!(
        "catalog {}: [features.api_calls]: unknown key \"metr\" (valid keys: meter, fail_open, credits_per_unit, credit_unit)",
        path.display()
    );
    assert!(
        said.contains(&expected),
        "expected {expected:?} in:\n{said}"
    );
}

#[tokio::test]
async fn a_reload_that_meets_an_unknown_key_keeps_the_previous_catalog_and_logs_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.toml");
    std::fs::write(&path, catalog(10, "")).unwrap();
    let mut child = serve(dir.path(), &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    // The JSON log lines, read on a thread of their own.
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = child.0.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line_with = |needle: &str| -> String {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line with {needle:?} within 20 s"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    let listening: Value = serde_json::from_str(&next_line_with("billsync listening")).unwrap();
    let address = listening["address"].as_str().unwrap().to_owned();

    let client = crate::helpers::http_client();
    let put = client
        .put(format!("http://{address}/v1/tenants/acme"))
        .bearer_auth(KEY)
        .json(&json!({}));
    assert_eq!(put.send().await.unwrap().status(), 201);
    let limit = || async {
        let answer: Value = client
            .post(format!(
                "http://{address}/v1/tenants/acme/entitlements/check"
            ))
            .bearer_auth(KEY)
            .json(&json!({"feature": "api_calls"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["limit"].clone()
    };
    let hangup = |child: &Running| {
        let pid = child.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    assert_eq!(limit().await, 10);

    // A typo: the file is refused, the error names it, and the old limit stands.
    std::fs::write(&path, catalog(20, "metr = \"calls\"")).unwrap();
    hangup(&child);
    let failed: Value =
        serde_json::from_str(&next_line_with("catalog reload failed")).expect("a JSON log line");
    let expected = format!(
        "catalog {}: [features.api_calls]: unknown key \"metr\" (valid keys: meter, fail_open, credits_per_unit, credit_unit)",
        path.display()
    );
    assert!(
        strings(&failed).iter().any(|s| s.contains(&expected)),
        "expected {expected:?} in {failed}"
    );
    assert!(
        strings(&failed)
            .iter()
            .any(|s| s.eq_ignore_ascii_case("error")),
        "logged as an error: {failed}"
    );
    assert_eq!(limit().await, 10, "the previous catalog stays");

    // Fixed, the next reload takes it.
    std::fs::write(&path, catalog(30, "")).unwrap();
    hangup(&child);
    next_line_with("catalog reloaded");
    assert_eq!(limit().await, 30);
}

/// Every string in a JSON value, however nested (log formats place fields differently).
fn strings(value: &Value) -> Vec<&str> {
    match value {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        Value::Object(fields) => fields.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}
