//! Starting and stopping the real service for a test.

use std::net::SocketAddr;

use billsync::app::{self, AppError};
use billsync::config::{Secret, Settings, key_digest};
use reqwest::{Client, RequestBuilder, Response};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The bearer key every test service accepts.
pub const API_KEY: &str = "test-api-key-0123456789";

/// An HTTP client; rustls needs its crypto provider installed before any client is built.
pub fn http_client() -> Client {
    app::init_crypto();
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
}

impl TestDatabase {
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

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app::run(settings, listener, shutdown.clone()));
        let app = Self {
            addr,
            client: http_client(),
            db,
            shutdown,
            server,
        };
        app.wait_until_serving().await;
        app
    }

    /// Migrations run before the listener is served; wait for the first answer.
    async fn wait_until_serving(&self) {
        for _ in 0..200 {
            if self.client.get(self.url("/healthz")).send().await.is_ok() {
                return;
            }
            assert!(
                !self.server.is_finished(),
                "the service stopped while starting"
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the service did not start within 5 s");
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
