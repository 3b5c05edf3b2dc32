//! Starting and stopping the real service for a test.

use std::net::SocketAddr;

use billsync::app;
use billsync::config::{Secret, Settings, key_digest};
use billsync::state::{self, AppError};
use reqwest::{Client, RequestBuilder, Response};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The bearer key every test service accepts.
pub const API_KEY: &str = "test-api-key-0123456789";

/// An HTTP client; rustls needs its crypto provider installed before any client is built.
pub fn http_client() -> Client {
    state::init_crypto();
    Client::new()
}

/// Where PostgreSQL tests make their databases; an admin URL.
pub fn postgres_admin_url() -> String {
    std::env::var("BILLSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Runs each named `async fn name(backend: Backend)` once on SQLite and once on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database of the test's own, removed when dropped.
pub enum TestDatabase {
    /// The directory holding the database file; removed on drop.
    Sqlite {
        _dir: tempfile::TempDir,
    },
    Postgres {
        admin_url: String,
        name: String,
    },
    /// Another replica's database: its owner removes it.
    Shared,
}

impl TestDatabase {
    /// [`Self::create`], with SQLite in memory-backed storage where the machine has it
    /// (`/dev/shm`): for tests that commit thousands of times.
    pub async fn create_fast(backend: Backend) -> (Self, String) {
        let shm = std::path::Path::new("/dev/shm");
        if backend == Backend::Postgres || !shm.is_dir() {
            return Self::create(backend).await;
        }
        let dir = tempfile::tempdir_in(shm).expect("temp dir in /dev/shm");
        let url = format!("sqlite://{}", dir.path().join("billsync.db").display());
        (Self::Sqlite { _dir: dir }, url)
    }

    pub async fn create(backend: Backend) -> (Self, String) {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("billsync.db").display());
                (Self::Sqlite { _dir: dir }, url)
            }
            Backend::Postgres => {
                use sqlx::Connection;
                let admin_url = postgres_admin_url();
                let name = format!("billsync_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL tests need a server at {admin_url} (set BILLSYNC_TEST_DATABASE_URL): {e}"
                    )
                });
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                let mut url = reqwest::Url::parse(&admin_url).expect("admin URL");
                url.set_path(&name);
                (Self::Postgres { admin_url, name }, url.to_string())
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Self::Postgres { admin_url, name } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime; a thread of its own may block.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(drop_postgres_database(&admin_url, &name))
            })
            .join();
        }
    }
}

pub async fn drop_postgres_database(admin_url: &str, name: &str) -> std::io::Result<()> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(std::io::Error::other)?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .map_err(std::io::Error::other)?;
    Ok(())
}

/// The real service, started on 127.0.0.1:0 with a database of its own.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: Client,
    pub db: TestDatabase,
    pub settings: Settings,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), AppError>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    /// Starts the service after `adjust` has changed the test settings.
    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> Self {
        let (db, url) = TestDatabase::create(backend).await;
        let mut settings = Settings::from_toml("").expect("default settings");
        settings.database.url = Secret::new(url);
        settings.api.key_digests = vec![key_digest(API_KEY).unwrap()];
        adjust(&mut settings);
        Self::start(settings, db).await
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// A second `serve` on the same (PostgreSQL) database, with the same settings.
    pub async fn replica(&self) -> Self {
        Self::start(self.settings.clone(), TestDatabase::Shared).await
    }

    /// Ends the service's workers without any shutdown, as `kill -9` would (their database
    /// sessions end, releasing their leases); returns the database to keep it alive.
    pub fn crash(self) -> TestDatabase {
        self.server.abort();
        self.db
    }

    /// A service on the database a [`TestApp::crash`] left, with these settings.
    pub async fn after_crash(settings: Settings, db: TestDatabase) -> Self {
        Self::start(settings, db).await
    }

    /// Stops the service and starts it again on the same database, as after a crash or deploy.
    pub async fn restart(self) -> Self {
        self.shutdown.cancel();
        let Self {
            server,
            db,
            settings,
            ..
        } = self;
        server.await.expect("server task").expect("clean shutdown");
        Self::start(settings, db).await
    }

    async fn start(settings: Settings, db: TestDatabase) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app::run(settings.clone(), listener, shutdown.clone()));
        let mut app = Self {
            addr,
            client: http_client(),
            db,
            settings,
            shutdown,
            server,
        };
        app.wait_until_serving().await;
        app
    }

    /// Migrations run before the listener is served; wait for the first answer.
    async fn wait_until_serving(&mut self) {
        for _ in 0..600 {
            if self.client.get(self.url("/healthz")).send().await.is_ok() {
                return;
            }
            if self.server.is_finished() {
                let ended = (&mut self.server).await;
                panic!("the service stopped while starting: {ended:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the service did not start within 15 s");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request to `/v1/...` carrying the test API key.
    pub fn v1(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(API_KEY)
    }

    pub async fn put_tenant(&self, tenant_id: &str, body: Value) -> Response {
        self.v1(reqwest::Method::PUT, &format!("/v1/tenants/{tenant_id}"))
            .json(&body)
            .send()
            .await
            .expect("PUT tenant")
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> Response {
        self.v1(reqwest::Method::GET, &format!("/v1/tenants/{tenant_id}"))
            .send()
            .await
            .expect("GET tenant")
    }

    /// Stops the service as SIGTERM would, and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let Self { server, db, .. } = self;
        server.await.expect("server task").expect("clean shutdown");
        drop(db);
    }
}

/// Whether the response is a stream of Server-Sent Events (its body never ends).
pub fn is_event_stream(response: &Response) -> bool {
    (response.headers().get("content-type"))
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The JSON error body's `(status, code, field)`, for compact assertions.
pub async fn error_of(response: Response) -> (u16, String, Option<String>) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error body");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (
        status,
        error["code"].as_str().expect("error.code").to_owned(),
        error["field"].as_str().map(str::to_owned),
    )
}

/// The webhook signing secret of test services that take webhooks.
pub const WEBHOOK_SECRET: &str = "whsec_test_secret_one";

/// Points the service at a fake vendor, with quick retries and workers that stay quiet unless a
/// test asks for them.
pub fn use_vendor(settings: &mut Settings, api_base: &str) {
    settings.stripe.api_key = Some(Secret::new("sk_test_billsync"));
    settings.stripe.api_base = api_base.trim_end_matches('/').to_owned();
    settings.stripe.retry_base_delay = std::time::Duration::from_millis(5);
    settings.stripe.rate_limit = 1000;
    settings.sync.poll_interval = std::time::Duration::from_secs(3600);
    settings.sync.sweep_interval = std::time::Duration::from_secs(3600);
    settings.sync.max_retry_delay = std::time::Duration::from_millis(100);
}

/// Accepts webhooks signed with [`WEBHOOK_SECRET`].
pub fn take_webhooks(settings: &mut Settings) {
    settings.stripe.webhook_secrets = vec![Secret::new(WEBHOOK_SECRET)];
}

impl TestApp {
    /// POSTs a webhook body with the given `Stripe-Signature` (none when `None`).
    pub async fn post_webhook(&self, body: &str, signature: Option<String>) -> Response {
        let mut request = self
            .client
            .post(self.url("/webhooks/stripe"))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send().await.expect("POST webhook")
    }

    /// POSTs a webhook signed now with [`WEBHOOK_SECRET`]; asserts it was taken.
    pub async fn deliver(&self, event: &Value) -> Value {
        let body = event.to_string();
        let response = self.post_webhook(&body, Some(sign_now(&body))).await;
        assert_eq!(response.status(), 200, "webhook refused");
        response.json().await.unwrap()
    }

    /// POSTs an entitlement check for the tenant; asserts it was answered.
    pub async fn check_body(&self, tenant: &str, body: Value) -> Value {
        let response = self
            .v1(
                reqwest::Method::POST,
                &format!("/v1/tenants/{tenant}/entitlements/check"),
            )
            .json(&body)
            .send()
            .await
            .expect("POST check");
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Checks one unit of `feature` for the tenant.
    pub async fn check(&self, tenant: &str, feature: &str) -> Value {
        self.check_body(tenant, serde_json::json!({ "feature": feature }))
            .await
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .v1(reqwest::Method::GET, path)
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }
}

pub fn sign_now(body: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    billsync::webhook::signature::header(WEBHOOK_SECRET, now, body.as_bytes())
}

/// Polls `check` until it holds (at most 20 s): background work is observed, never slept on.
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A Stripe event around `object`, created at `created` (Unix seconds).
pub fn event(id: &str, event_type: &str, created: i64, object: Value) -> Value {
    serde_json::json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": created,
        "type": event_type,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "data": {"object": object},
    })
}

/// A customer naming its tenant in metadata.
pub fn customer(id: &str, tenant: &str) -> Value {
    serde_json::json!({
        "id": id, "object": "customer", "created": 1_700_000_000, "email": format!("{tenant}@example.test"),
        "name": format!("Tenant {tenant}"), "metadata": {"tenant_id": tenant}, "livemode": false
    })
}

/// A current-API subscription on one price, period on the item.
pub fn subscription(id: &str, customer: &str, price: &str, status: &str, quantity: i64) -> Value {
    serde_json::json!({
        "id": id, "object": "subscription", "customer": customer, "status": status, "created": 1_700_000_100,
        "cancel_at_period_end": false, "cancel_at": null, "trial_end": null, "pause_collection": null,
        "items": {"object": "list", "has_more": false, "data": [{
            "id": format!("si_{id}"), "object": "subscription_item", "quantity": quantity,
            "price": {"id": price, "object": "price"},
            "current_period_start": 1_700_000_000, "current_period_end": 1_702_592_000
        }]}
    })
}

/// Where the end-to-end tools live: `.venv` made by `scripts/test`, or BILLSYNC_TEST_VENV.
pub fn venv_bin(tool: &str) -> std::path::PathBuf {
    let venv = std::env::var("BILLSYNC_TEST_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let path = venv.join("bin").join(tool);
    assert!(
        path.exists(),
        "{} is missing: run scripts/test, which installs localstripe and stripe into .venv",
        path.display()
    );
    path
}

/// A catalog with one meter of every aggregation (written once to the temp directory).
pub fn use_test_catalog(settings: &mut Settings) {
    const CATALOG: &str = r#"
[meters.calls]
aggregation = "sum"
stripe_event_name = "calls"
late_window = "60d"

[meters.builds]
aggregation = "count"
stripe_event_name = "builds"

[meters.storage]
aggregation = "max"
stripe_event_name = "storage"

[meters.seats]
aggregation = "last"
stripe_event_name = "seats"

[meters.users]
aggregation = "unique_count"
property = "user_id"
stripe_event_name = "users"

[meters.credits]
aggregation = "sum"
allow_negative = true

[meters.gpu_seconds]
aggregation = "sum"
late_window = "60d"

[meters.tokens]
aggregation = "sum"
late_window = "60d"

[features.api_calls]
meter = "calls"

[features.gpu_minutes]
meter = "gpu_seconds"
credits_per_unit = "0.0167"
credit_unit = "usd"

[features.ai_tokens]
meter = "tokens"
credits_per_unit = "1"
credit_unit = "credits"

[features.beta]
fail_open = true

[plans.free]
features = { api_calls = 10 }

[plans.price_pro]
features = { api_calls = 1000, sso = true }

[plans.plan_basic]
features = { api_calls = 100 }

[plans.plan_pro]
features = { api_calls = 1000, sso = true }
"#;
    // Named by its content too: a file left by an earlier run whose process had this id (another
    // checkout, an older catalog) is not taken for this one.
    let digest = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        CATALOG.hash(&mut hasher);
        hasher.finish()
    };
    let name = format!(
        "billsync-test-catalog-{}-{digest:016x}.toml",
        std::process::id()
    );
    let path = std::env::temp_dir().join(name);
    if !path.exists() {
        let partial = path.with_extension(format!("{}.part", uuid::Uuid::new_v4().simple()));
        std::fs::write(&partial, CATALOG).unwrap();
        std::fs::rename(partial, &path).unwrap();
    }
    settings.catalog.path = path;
    settings.catalog.required = true;
}

/// The service's state without its HTTP server: for stepping workers by hand.
pub async fn state(
    backend: Backend,
    adjust: impl FnOnce(&mut Settings),
) -> (billsync::state::AppState, TestDatabase) {
    state::init_crypto();
    let (db, url) = TestDatabase::create(backend).await;
    let mut settings = Settings::from_toml("").unwrap();
    settings.database.url = Secret::new(url);
    settings.api.key_digests = vec![key_digest(API_KEY).unwrap()];
    adjust(&mut settings);
    (
        billsync::state::AppState::build(settings)
            .await
            .expect("state"),
        db,
    )
}
