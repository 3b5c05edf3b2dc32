//! The `billsync` binary itself: zero set-up start, configuration errors, signals, `migrate`,
//! commands that need a prepared database, `--config`, `config check`, `healthcheck`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::binary::{Running, billsync};
use crate::helpers::{Backend, TestApp, TestDatabase};

/// `billsync serve` in `dir` with nothing set but a free port; the child, the address it
/// listens on, and the log lines read until it said so.
fn serve_on_port_0(dir: &std::path::Path) -> (Running, String, Vec<String>) {
    let mut child = billsync(dir, &["serve"], &[("BILLSYNC_LISTEN", "127.0.0.1:0")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    let mut seen = Vec::new();
    let address = listening_address(&mut child, &mut seen);
    (child, address, seen)
}

/// Reads JSON log lines until the "billsync listening" one and returns its address.
fn listening_address(child: &mut Child, seen: &mut Vec<String>) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    while let Some(Ok(line)) = lines.next() {
        seen.push(line.clone());
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if entry["message"] == "billsync listening" {
            let address = entry["address"].as_str().expect("address field").to_owned();
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return address;
        }
    }
    panic!("billsync exited before listening; output: {seen:#?}");
}

fn terminate_and_wait(child: &mut Child) -> (std::process::ExitStatus, Duration) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "billsync ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn serve_starts_with_zero_set_up_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Only the port is chosen, so that tests never collide on 8080.
    let (mut child, address, seen) = serve_on_port_0(dir.path());
    assert!(
        seen.iter().any(|l| l.contains("vendor sync is off")),
        "the missing Stripe key is said at start: {seen:#?}"
    );

    let client = crate::helpers::http_client();
    let ready: Value = client
        .get(format!("http://{address}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["database"]["backend"], "sqlite");
    assert_eq!(ready["vendor"]["configured"], false);
    assert!(
        dir.path().join("data/billsync.db").is_file(),
        "SQLite database created under data/"
    );

    let (status, elapsed) = terminate_and_wait(&mut child);
    assert_eq!(status.code(), Some(0), "exit 0 after SIGTERM");
    assert!(elapsed < Duration::from_secs(10), "stopped in {elapsed:?}");
}

#[test]
fn an_invalid_setting_stops_start_up_with_exit_code_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("BILLSYNC_DATABASE__MAX_CONNECTIONS", "lots")],
            "database.max_connections",
        ),
        (&[("BILLSYNC_LISTEN", "not-an-address")], "listen"),
        (
            &[("BILLSYNC_STRIPE__API_KEY", "pk_live_publishable")],
            "stripe.api_key",
        ),
        (&[("BILLSYNC_API__KEYS", "short")], "api.keys"),
    ];
    for (env, key) in cases {
        let output = billsync(dir.path(), &["serve"], env).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(&format!("`{key}`")),
            "{env:?} should name {key}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr}");
        assert!(
            !stderr.contains("pk_live_publishable"),
            "values of secret keys are not echoed"
        );
    }
    assert!(
        !dir.path().join("data").exists(),
        "nothing is created when configuration is invalid"
    );
}

#[test]
fn a_config_file_is_layered_between_defaults_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("billsync.toml");
    std::fs::write(&file, "[database]\nmax_connections = \"oops\"\n").unwrap();
    let file = file.to_str().unwrap();

    let output = billsync(dir.path(), &["migrate"], &[("BILLSYNC_CONFIG", file)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("database.max_connections") && stderr.contains("billsync.toml"),
        "{stderr}"
    );

    let fixed = billsync(
        dir.path(),
        &["migrate"],
        &[
            ("BILLSYNC_CONFIG", file),
            ("BILLSYNC_DATABASE__MAX_CONNECTIONS", "2"),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(
        fixed.status.code(),
        Some(0),
        "the environment wins over the file"
    );

    let missing = billsync(
        dir.path(),
        &["migrate"],
        &[("BILLSYNC_CONFIG", "/no/such.toml")],
    )
    .output()
    .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("BILLSYNC_CONFIG"));
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        ("BILLSYNC_STRIPE__API_KEY", "sk_test_do_not_print_me"),
        (
            "BILLSYNC_STRIPE__WEBHOOK_SECRETS",
            "whsec_do_not_print_me_either",
        ),
        ("BILLSYNC_API__KEYS", "api-key-do-not-print-me"),
    ];
    let mut env = secrets.to_vec();
    env.extend([
        ("BILLSYNC_LISTEN", "127.0.0.1:0"),
        ("BILLSYNC_LOG__LEVEL", "trace"),
    ]);
    let mut child = billsync(dir.path(), &["serve"], &env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    let mut seen = Vec::new();
    let address = listening_address(&mut child, &mut seen);
    crate::helpers::http_client()
        .get(format!("http://{address}/v1/tenants/x"))
        .bearer_auth("api-key-do-not-print-me")
        .send()
        .await
        .unwrap();
    let (status, _) = terminate_and_wait(&mut child);
    assert_eq!(status.code(), Some(0));
    for (_, secret) in secrets {
        assert!(
            !seen.iter().any(|l| l.contains(secret)),
            "{secret} was logged"
        );
    }
}

#[tokio::test]
async fn migrate_prepares_either_database_and_is_repeatable() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let (db, url) = TestDatabase::create(backend).await;
        let dir = tempfile::tempdir().unwrap();
        for run in 0..2 {
            let output = billsync(
                dir.path(),
                &["migrate"],
                &[("BILLSYNC_DATABASE__URL", &url)],
            )
            .output()
            .unwrap();
            assert_eq!(
                output.status.code(),
                Some(0),
                "{backend:?} run {run}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let settings = {
            let mut s = billsync::config::Settings::from_toml("").unwrap();
            s.database.url = billsync::config::Secret::new(url);
            s
        };
        let store = billsync::store::Db::connect(&settings.database)
            .await
            .unwrap();
        let tenant = billsync::domain::TenantId::parse("after-migrate").unwrap();
        assert!(
            store.tenants().get(&tenant).await.unwrap().is_none(),
            "{backend:?}: the tenants table exists"
        );
        store.close().await;
        drop(db);
    }
}

#[test]
fn replay_and_backfill_are_commands_of_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let migrate = billsync(dir.path(), &["migrate"], &[]).output().unwrap();
    assert_eq!(migrate.status.code(), Some(0));
    let replay = billsync(dir.path(), &["replay", "--dry-run"], &[])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(
        stdout.contains("the mirror matches the stored events"),
        "{stdout}"
    );

    let backfill = billsync(dir.path(), &["backfill"], &[]).output().unwrap();
    assert_eq!(backfill.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&backfill.stderr).contains("stripe.api_key"),
        "backfill says what it needs"
    );
}

#[tokio::test]
async fn sighup_reloads_the_catalog_and_the_answers_follow() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("plans.toml");
    let write = |limit: u32| {
        let text = format!(
            "[meters.calls]\naggregation = \"sum\"\n\n[features.api_calls]\nmeter = \"calls\"\n\n[plans.free]\nfeatures = {{ api_calls = {limit} }}\n"
        );
        std::fs::write(&catalog, text).unwrap();
    };
    write(10);
    let key = "reload-test-key-0123456789";
    let env = [
        ("BILLSYNC_LISTEN", "127.0.0.1:0"),
        ("BILLSYNC_API__KEYS", key),
        ("BILLSYNC_CATALOG__PATH", catalog.to_str().unwrap()),
    ];
    let mut child = billsync(dir.path(), &["serve"], &env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    let mut seen = Vec::new();
    let address = listening_address(&mut child, &mut seen);
    let client = crate::helpers::http_client();
    let put = client
        .put(format!("http://{address}/v1/tenants/reload"))
        .bearer_auth(key)
        .json(&serde_json::json!({}));
    assert_eq!(put.send().await.unwrap().status(), 201);
    let limit = || async {
        let answer: Value = client
            .post(format!(
                "http://{address}/v1/tenants/reload/entitlements/check"
            ))
            .bearer_auth(key)
            .json(&serde_json::json!({"feature": "api_calls"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["limit"].clone()
    };
    assert_eq!(limit().await, 10);
    write(20);
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    crate::helpers::wait_for("the reloaded limit", || async { limit().await == 20 }).await;
    let (status, _) = terminate_and_wait(&mut child);
    assert_eq!(status.code(), Some(0));
}

/// The commands other than `serve` and `migrate`, as an operator runs them.
const NEEDS_DATABASE: [&[&str]; 4] = [
    &["revenue", "--from", "2026-01-01", "--to", "2026-02-01"],
    &[
        "reconcile",
        "--from",
        "2026-01-01",
        "--to",
        "2026-02-01",
        "--dry-run",
    ],
    &["replay", "--dry-run"],
    &["replay"],
];

/// The exit code of a command that could not run: 3 for `reconcile`, whose 1 means "found
/// differences"; 1 for the others.
fn could_not_run(args: &[&str]) -> i32 {
    if args[0] == "reconcile" { 3 } else { 1 }
}

#[test]
fn reports_from_the_wrong_directory_fail_and_create_no_database() {
    let dir = tempfile::tempdir().unwrap();
    for args in NEEDS_DATABASE {
        let output = billsync(dir.path(), args, &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(could_not_run(args)),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("data/billsync.db") && stderr.contains("does not exist"),
            "{args:?} names the missing database: {stderr}"
        );
        assert!(
            stderr.contains("billsync migrate"),
            "{args:?} says how to create it: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?} printed no empty report");
        assert!(
            !dir.path().join("data").exists(),
            "{args:?} created nothing"
        );
    }
}

#[tokio::test]
async fn reports_refuse_an_unmigrated_database_until_migrate_has_run() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let (db, url) = TestDatabase::create(backend).await;
        if backend == Backend::Sqlite {
            // An empty file, as a stray earlier run would leave.
            let path = url.strip_prefix("sqlite://").unwrap();
            std::fs::write(path, b"").unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let env = [("BILLSYNC_DATABASE__URL", url.as_str())];
        for args in NEEDS_DATABASE {
            let output = billsync(dir.path(), args, &env).output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(could_not_run(args)),
                "{backend:?} {args:?}: {stderr}"
            );
            assert!(
                stderr.contains("is not migrated") && stderr.contains("billsync migrate"),
                "{backend:?} {args:?}: {stderr}"
            );
        }
        let migrate = billsync(dir.path(), &["migrate"], &env).output().unwrap();
        assert_eq!(migrate.status.code(), Some(0));
        for args in NEEDS_DATABASE {
            let output = billsync(dir.path(), args, &env).output().unwrap();
            assert_eq!(
                output.status.code(),
                Some(0),
                "{backend:?} {args:?} after migrate: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        drop(db);
    }
}

#[test]
fn the_config_flag_names_the_file_and_wins_over_billsync_config() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "listen = \"127.0.0.1:9123\"\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"nowhere\"\n").unwrap();
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());

    let by_env = billsync(
        dir.path(),
        &["config", "check"],
        &[("BILLSYNC_CONFIG", bad)],
    )
    .output()
    .unwrap();
    assert_eq!(by_env.status.code(), Some(2));

    let flag_wins = billsync(
        dir.path(),
        &["--config", good, "config", "check"],
        &[("BILLSYNC_CONFIG", bad)],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&flag_wins.stdout);
    assert_eq!(
        flag_wins.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&flag_wins.stderr)
    );
    assert!(stdout.contains("listen = \"127.0.0.1:9123\""), "{stdout}");
    assert!(stdout.contains("good.toml (--config)"), "{stdout}");

    // After the command too (a global flag), and the environment still wins over the file.
    let env_wins = billsync(
        dir.path(),
        &["config", "check", "--config", bad],
        &[("BILLSYNC_LISTEN", "127.0.0.1:9124")],
    )
    .output()
    .unwrap();
    assert_eq!(env_wins.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&env_wins.stdout).contains("127.0.0.1:9124"));

    let missing = billsync(dir.path(), &["--config", "/no/such.toml", "migrate"], &[])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--config"));
    assert!(!dir.path().join("data").exists());
}

#[test]
fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = [
        ("BILLSYNC_STRIPE__API_KEY", "sk_test_do_not_print_me"),
        (
            "BILLSYNC_STRIPE__WEBHOOK_SECRETS",
            "whsec_do_not_print_me_either",
        ),
        ("BILLSYNC_API__KEYS", "api-key-do-not-print-me"),
        ("BILLSYNC_API__TENANT_KEYS", "tenant-key-do-not-print=acme"),
        (
            "BILLSYNC_DATABASE__URL",
            "postgres://billsync:db-password-do-not-print@db:5432/billing",
        ),
    ];
    let output = billsync(dir.path(), &["config", "check"], &secrets)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "sync",
        "poll_interval = \"10s\"",
        "postgres://billsync:[redacted]@db:5432/billing",
        "sk_test_[redacted]",
        "[redacted]=acme",
    ] {
        assert!(stdout.contains(expected), "{expected}: {stdout}");
    }
    assert!(!stdout.contains("do-not-print") && !stdout.contains("do_not_print"));
    assert!(!dir.path().join("data").exists(), "no database touched");

    let invalid = billsync(
        dir.path(),
        &["config", "check"],
        &[("BILLSYNC_SYNC__POLL_INTERVAL", "often")],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert_eq!(invalid.status.code(), Some(2));
    assert!(stderr.contains("`sync.poll_interval`"), "{stderr}");
    assert!(invalid.stdout.is_empty());

    let catalog = dir.path().join("plans.toml");
    std::fs::write(&catalog, "[meters.calls]\naggregation = \"sometimes\"\n").unwrap();
    let bad_catalog = billsync(
        dir.path(),
        &["config", "check"],
        &[("BILLSYNC_CATALOG__PATH", catalog.to_str().unwrap())],
    )
    .output()
    .unwrap();
    assert_eq!(bad_catalog.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_catalog.stderr).contains("plans.toml"));
}

#[test]
fn healthcheck_exits_0_only_while_readyz_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, address, _) = serve_on_port_0(dir.path());

    // The address from the configuration, as the Docker HEALTHCHECK runs it.
    let by_listen = billsync(
        dir.path(),
        &["healthcheck"],
        &[("BILLSYNC_LISTEN", &address)],
    )
    .output()
    .unwrap();
    assert_eq!(
        by_listen.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&by_listen.stderr)
    );
    let url = format!("http://{address}/readyz");
    let by_url = billsync(dir.path(), &["healthcheck", "--url", &url], &[])
        .output()
        .unwrap();
    assert_eq!(by_url.status.code(), Some(0));
    let not_found = format!("http://{address}/no-such-route");
    let non_2xx = billsync(dir.path(), &["healthcheck", "--url", &not_found], &[])
        .output()
        .unwrap();
    assert_eq!(non_2xx.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&non_2xx.stderr).contains("404"));

    let (status, _) = terminate_and_wait(&mut child);
    assert_eq!(status.code(), Some(0));
    let started = Instant::now();
    let down = billsync(
        dir.path(),
        &["healthcheck", "--url", &url, "--timeout", "1s"],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(
        !String::from_utf8_lossy(&down.stderr).is_empty(),
        "says why"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a small timeout"
    );
}

/// `billsync reconcile` exits 0 when everything matches, 1 when it found differences, 2 for bad
/// arguments (its own, and clap's usage errors) or configuration, 3 when it could not run: no
/// database, an unreachable one, a vendor that fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_exit_codes_tell_matched_found_invalid_and_could_not_run_apart() {
    use crate::helpers::{customer, event, take_webhooks, use_test_catalog, wait_for};
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        take_webhooks(s);
        use_test_catalog(s);
    })
    .await;
    app.deliver(&event(
        "evt_acme",
        "customer.created",
        1_700_000_000,
        customer("cus_acme", "acme"),
    ))
    .await;
    wait_for("acme", || async {
        app.get_tenant("acme").await.status() == 200
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let at = |offset: i64| (chrono::Utc::now() + chrono::Duration::seconds(offset)).to_rfc3339();
    let (from, to) = (at(-86_400), at(3600));
    let database = app.settings.database.url.expose().to_owned();
    let catalog = app.settings.catalog.path.display().to_string();
    let env = [
        ("BILLSYNC_DATABASE__URL", database.as_str()),
        ("BILLSYNC_CATALOG__PATH", catalog.as_str()),
    ];
    let reconcile = |extra: &[&str], more_env: &[(&str, &str)]| {
        let mut args = vec!["reconcile", "--from", &from, "--to", &to];
        args.extend_from_slice(extra);
        let env: Vec<(&str, &str)> = env.iter().chain(more_env).copied().collect();
        let output = billsync(dir.path(), &args, &env).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), stderr)
    };

    let (code, stderr) = reconcile(&[], &[]);
    assert_eq!(code, Some(0), "nothing to reconcile: {stderr}");

    // The vendor fails: drift asks it for acme's subscriptions, and nothing listens.
    let vendor = [
        ("BILLSYNC_STRIPE__API_KEY", "sk_test_billsync"),
        ("BILLSYNC_STRIPE__API_BASE", "http://127.0.0.1:1"),
        ("BILLSYNC_STRIPE__MAX_RETRIES", "0"),
    ];
    let (code, stderr) = reconcile(&[], &vendor);
    assert_eq!(code, Some(3), "a failing vendor: {stderr}");
    assert!(stderr.contains("vendor"), "{stderr}");

    // Usage that never reached Stripe: a finding.
    let usage = app
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(
            &serde_json::json!({"events": [{"id": "u1", "tenant_id": "acme", "meter": "calls",
            "quantity": 3, "timestamp": at(-3600)}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(usage.status(), 200);
    let (code, stderr) = reconcile(&[], &[]);
    assert_eq!(code, Some(1), "a finding: {stderr}");
    assert!(
        !stderr.contains("billsync failed"),
        "findings are no error: {stderr}"
    );

    for (extra, what) in [
        (&["--tenant", "bad id!"][..], "an invalid tenant"),
        (&["--format", "xml"][..], "clap: an unknown format"),
        (&["--nonsense"][..], "clap: an unknown flag"),
    ] {
        let (code, stderr) = reconcile(extra, &[]);
        assert_eq!(code, Some(2), "{what}: {stderr}");
    }
    for args in [
        &["reconcile", "--from", "soon", "--to", "2026-02-01"][..],
        &["reconcile", "--from", "2026-02-01", "--to", "2026-01-01"][..],
        &["reconcile", "--from", "2026-01-01"][..],
    ] {
        let output = billsync(dir.path(), args, &env).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    }
    let bad_catalog = dir.path().join("plans.toml");
    std::fs::write(&bad_catalog, "[meters.calls]\naggregation = 7\n").unwrap();
    let bad_catalog = bad_catalog.display().to_string();
    let (code, stderr) = reconcile(&[], &[("BILLSYNC_CATALOG__PATH", bad_catalog.as_str())]);
    assert_eq!(code, Some(2), "an invalid catalog: {stderr}");
    assert!(stderr.contains("plans.toml"), "{stderr}");
    let (code, stderr) = reconcile(&[], &[("BILLSYNC_LISTEN", "nowhere")]);
    assert_eq!(code, Some(2), "an invalid setting: {stderr}");

    let missing = format!("sqlite://{}/missing.db", dir.path().display());
    let (code, stderr) = reconcile(&[], &[("BILLSYNC_DATABASE__URL", missing.as_str())]);
    assert_eq!(code, Some(3), "no database: {stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    let (code, stderr) = reconcile(
        &[],
        &[
            (
                "BILLSYNC_DATABASE__URL",
                "postgres://postgres@127.0.0.1:1/billsync",
            ),
            ("BILLSYNC_DATABASE__CONNECT_TIMEOUT", "1s"),
        ],
    );
    assert_eq!(code, Some(3), "an unreachable database: {stderr}");
    app.stop().await;
}
