//! The console in a real browser: headless Chromium driven over WebDriver (chromedriver, started
//! here) against the real service with seeded data. One browser session walks every page, and
//! a screenshot of each is saved under `target/console-screenshots/`.
//!
//! Without chromedriver the test passes doing nothing and leaves `SKIPPED` in that folder, which
//! `.ci/run` (which installs Chromium) treats as a failure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    API_KEY, Backend, TestApp, customer, event, take_webhooks, use_test_catalog, use_vendor,
    wait_for,
};

mod credits;

const SCOPED_KEY: &str = "scoped-browser-key-0123456789";

pub(crate) fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
}

/// `BILLSYNC_TEST_CHROMEDRIVER` if set (a path that does not exist: skip), else `chromedriver`
/// on the PATH, else Debian's `/usr/bin/chromedriver`.
pub(crate) fn chromedriver() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BILLSYNC_TEST_CHROMEDRIVER") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromedriver"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from("/usr/bin/chromedriver")).filter(|p| p.is_file()))
}

/// chromedriver on a free port, killed when dropped.
pub(crate) struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    pub(crate) async fn start(binary: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = crate::helpers::http_client();
        wait_for("chromedriver to answer", || async {
            http.get(format!("{url}/status")).send().await.is_ok()
        })
        .await;
        Self { child, url }
    }

    pub(crate) async fn session(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({"args": ["--headless", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The browser, with the waits and screenshots the steps share.
pub(crate) struct Browser {
    pub(crate) client: Client,
    pub(crate) base: String,
}

impl Browser {
    pub(crate) async fn open(&self, hash: &str) {
        let url = format!("{}/console{hash}", self.base);
        self.client.goto(&url).await.expect("navigate");
    }

    /// The element's text once `ok` holds for it (at most 20 s).
    pub(crate) async fn text_until(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await
                && let Ok(text) = el.text().await
                && ok(&text)
            {
                return text;
            }
            if Instant::now() > deadline {
                self.screenshot("timed-out").await;
                let message = match self.client.find(Locator::Css("#message")).await {
                    Ok(el) => el.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                panic!("timed out waiting for `{css}`; the page says: {message}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn text(&self, css: &str) -> String {
        self.text_until(css, |_| true).await
    }

    /// Runs `act` on the element, again while it fails (not there yet, or replaced by the
    /// overview's refresh in between), for at most 20 s.
    async fn on<T, F>(&self, css: &str, act: impl Fn(fantoccini::elements::Element) -> F) -> T
    where
        F: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let error = match self.client.find(Locator::Css(css)).await {
                Ok(el) => match act(el).await {
                    Ok(value) => return value,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if Instant::now() > deadline {
                self.screenshot("timed-out").await;
                panic!("`{css}`: {error}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.on(css, |el| async move { el.attr(name).await }).await
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.on(css, |el| async move {
            el.clear().await?;
            el.send_keys(text).await
        })
        .await
    }

    async fn click(&self, css: &str) {
        self.on(css, |el| async move { el.click().await }).await
    }

    /// Accepts the page's confirm dialog, once it shows.
    async fn confirm(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = self.client.get_alert_text().await {
                self.client.accept_alert().await.expect("accept");
                return text;
            }
            assert!(Instant::now() < deadline, "no confirm dialog");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn sign_in(&self, key: &str) {
        self.type_into("#key", key).await;
        self.click("#login-submit").await;
    }

    pub(crate) async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(screenshots().join(format!("{name}.png")), png).expect("save screenshot");
    }
}

/// A vendor that knows acme's customer and refuses to show `cus_broken` (a failed event).
async fn vendor() -> MockServer {
    let vendor = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer("cus_acme", "acme")))
        .mount(&vendor)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/customers/cus_broken"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&vendor)
        .await;
    // The drift check lists the live subscriptions: there are none.
    Mock::given(method("GET"))
        .and(path("/v1/subscriptions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"object": "list", "data": [], "has_more": false, "url": "/v1/subscriptions"}),
        ))
        .mount(&vendor)
        .await;
    vendor
}

async fn seeded_app(vendor: &MockServer) -> TestApp {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        use_test_catalog(s);
        s.stripe.max_retries = 0;
        s.sync.max_retry_delay = Duration::from_secs(3600);
        s.metering.push_interval = Duration::from_secs(3600);
        s.reconcile.vendor_usage = false;
        s.api.tenant_keys = vec![(
            billsync::config::key_digest(SCOPED_KEY).unwrap(),
            vec!["globex".to_owned()],
        )];
    })
    .await;
    let created = event(
        "evt_acme",
        "customer.created",
        1_700_000_000,
        customer("cus_acme", "acme"),
    );
    app.deliver(&created).await;
    wait_for("acme", || async {
        app.get_tenant("acme").await.status() == 200
    })
    .await;
    let globex = json!({"name": "Globex", "email": "ap@globex.example"});
    assert!(app.put_tenant("globex", globex).await.status().is_success());
    let usage = json!({"events": [
        {"id": "u1", "tenant_id": "acme", "meter": "calls", "quantity": "3"},
        {"id": "u2", "tenant_id": "acme", "meter": "calls", "quantity": "4"},
    ]});
    let accepted: Value = app
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(&usage)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(accepted["accepted"], 2, "{accepted}");
    let broken = event(
        "evt_broken",
        "customer.updated",
        1_700_000_100,
        customer("cus_broken", "broken"),
    );
    app.deliver(&broken).await;
    // globex's customer command ends (the fake vendor refuses it) before the overview is read.
    wait_for("the failed event and no pending command", || async {
        let status = app.get_json("/v1/sync/status").await;
        status["inbox"]["failed"] == 1 && status["outbox"]["pending"] == 0
    })
    .await;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_shows_what_the_api_says_and_acts() {
    std::fs::create_dir_all(screenshots()).expect("screenshot folder");
    let skipped = screenshots().join("SKIPPED");
    let Some(binary) = chromedriver() else {
        std::fs::write(
            &skipped,
            "chromedriver not found: the browser tests did not run\n",
        )
        .expect("skip marker");
        eprintln!("SKIPPED: chromedriver not found; the console's browser tests did not run");
        return;
    };
    let _ = std::fs::remove_file(&skipped);
    let vendor = vendor().await;
    let app = seeded_app(&vendor).await;
    let driver = Driver::start(&binary).await;
    let browser = Browser {
        client: driver.session().await,
        base: app.url(""),
    };
    a_wrong_key_gets_a_clear_message(&browser).await;
    the_overview_shows_the_apis_figures(&browser, &app).await;
    a_tenant_found_by_email_shows_its_quota_and_usage(&browser).await;
    a_failed_event_is_retried_from_the_overview(&browser, &app).await;
    a_reconciliation_is_started_and_its_findings_shown(&browser).await;
    the_revenue_page_draws_and_offers_a_csv(&browser).await;
    a_scoped_key_sees_only_its_tenants(&browser).await;
    browser.client.close().await.expect("end the session");
    app.stop().await;
}

async fn a_wrong_key_gets_a_clear_message(browser: &Browser) {
    browser.open("").await;
    browser.sign_in("not-a-key-0123456789").await;
    let message = browser
        .text_until("#message", |t| t.contains("refused"))
        .await;
    assert!(message.contains("401"), "{message}");
    assert!(message.contains("the bearer key is not valid"), "{message}");
    browser.screenshot("01-wrong-key").await;
}

async fn the_overview_shows_the_apis_figures(browser: &Browser, app: &TestApp) {
    browser.sign_in(API_KEY).await;
    browser.text("#sync-cards").await;
    let status = app.get_json("/v1/sync/status").await;
    let figure = |v: &Value| v.as_i64().expect("a count").to_string();
    for (css, value) in [
        ("#inbox-failed", &status["inbox"]["failed"]),
        ("#inbox-pending", &status["inbox"]["pending"]),
        ("#outbox-pending", &status["outbox"]["pending"]),
        ("#outbox-failed", &status["outbox"]["failed"]),
        ("#pusher-pending", &status["usage_pusher"]["pending"]),
        ("#sweep-known", &status["sweep"]["known_tenants"]),
        ("#sweep-never", &status["sweep"]["never_swept"]),
    ] {
        assert_eq!(browser.text(css).await, figure(value), "{css}");
    }
    // One tenant and a sweep every hour: it is checked at least hourly.
    assert_eq!(status["sweep"]["longest_unchecked_seconds"], 3600.0);
    assert_eq!(browser.text("#sweep-bound").await, "1 h 0 min");
    let jobs = browser.text("#jobs").await;
    let id = status["this_replica"]["id"].as_str().expect("replica id");
    assert!(jobs.contains(id) && jobs.contains("snapshot"), "{jobs}");
    let failed = browser.text("#failed-events").await;
    assert!(
        failed.contains("evt_broken") && failed.contains("500"),
        "{failed}"
    );
    browser.screenshot("02-overview").await;
}

async fn a_tenant_found_by_email_shows_its_quota_and_usage(browser: &Browser) {
    browser.open("#/tenants").await;
    browser.type_into("#q", "ACME@example").await;
    browser.click("#search-form button").await;
    browser
        .text_until("#tenant-list tbody", |t| t.contains("acme@example.test"))
        .await;
    browser.screenshot("03-tenant-search").await;
    browser.click("#tenant-list a.tenant-link").await;
    browser
        .text_until("#tenant-title", |t| t.contains("acme"))
        .await;
    let bar = "svg.bar[data-feature='api_calls']";
    assert_eq!(browser.attr(bar, "data-used").await.as_deref(), Some("7"));
    assert_eq!(browser.attr(bar, "data-limit").await.as_deref(), Some("10"));
    let chart = "svg.usage-chart[data-meter='calls']";
    assert_eq!(
        browser.attr(chart, "data-total").await.as_deref(),
        Some("7")
    );
    let drawn = browser
        .client
        .execute(
            "return [...document.querySelectorAll(arguments[0] + ' g.bucket')]
               .map(g => g.dataset.quantity).filter(q => q !== '0');",
            vec![json!(chart)],
        )
        .await
        .expect("chart bars");
    assert_eq!(drawn, json!(["7"]), "one bar of 7 (unpushed) today");
    browser.screenshot("04-tenant").await;
}

async fn a_failed_event_is_retried_from_the_overview(browser: &Browser, app: &TestApp) {
    let attempts = || async {
        app.get_json("/v1/sync/status").await["failed_events"][0]["attempts"]
            .as_i64()
            .unwrap_or(0)
    };
    let before = attempts().await;
    browser.open("#/overview").await;
    browser.click("button.retry[data-event='evt_broken']").await;
    let asked = browser.confirm().await;
    assert!(asked.contains("evt_broken"), "{asked}");
    let done = browser
        .text_until("#notice", |t| t.contains("evt_broken"))
        .await;
    assert!(done.contains("due now"), "{done}");
    wait_for("the retried attempt", || async {
        attempts().await > before
    })
    .await;
    browser.screenshot("05-retried").await;
}

async fn a_reconciliation_is_started_and_its_findings_shown(browser: &Browser) {
    browser.open("#/reconciliation").await;
    browser.text("#reconcile-form").await;
    browser.screenshot("06-reconciliation").await;
    browser.click("#rc-start").await;
    let asked = browser.confirm().await;
    assert!(asked.contains("reconciliation"), "{asked}");
    browser
        .text_until("#run-status", |t| t.contains("Status: done"))
        .await;
    let findings = browser.text("#findings tbody").await;
    assert!(findings.contains("acme"), "{findings}");
    browser.screenshot("07-findings").await;
}

async fn the_revenue_page_draws_and_offers_a_csv(browser: &Browser) {
    browser.open("#/revenue").await;
    let link = browser
        .attr("#revenue-csv", "href")
        .await
        .unwrap_or_default();
    assert!(link.starts_with("blob:"), "{link}");
    browser.text("#revenue-table").await;
    browser.screenshot("08-revenue").await;
}

async fn a_scoped_key_sees_only_its_tenants(browser: &Browser) {
    browser.click("#signout").await;
    browser.sign_in(SCOPED_KEY).await;
    browser.open("#/overview").await;
    browser
        .text_until("#scoped-note", |t| t.contains("scoped"))
        .await;
    browser.open("#/tenants").await;
    let list = browser
        .text_until("#tenant-list tbody", |t| t.contains("globex"))
        .await;
    assert!(!list.contains("acme"), "{list}");
    browser.screenshot("09-scoped-key").await;
}
