//! What the benchmarks share: a database of their own, and percentiles.
#![allow(dead_code)]

use std::time::Duration;

/// The allocator the `billsync` binary runs with (src/main.rs), so that the service measured in
/// process allocates as it does in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sqlx::Connection;

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database, dropped by [`Database::drop_now`] (PostgreSQL) or with its directory.
pub struct Database {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl Database {
    pub async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                Self {
                    url,
                    _dir: Some(dir),
                    postgres: None,
                }
            }
            Backend::Postgres => {
                let admin = std::env::var("BILLSYNC_BENCH_DATABASE_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
                let name = format!("billsync_bench_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("PostgreSQL for the benchmark");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let mut url = reqwest::Url::parse(&admin).unwrap();
                url.set_path(&name);
                Self {
                    url: url.to_string(),
                    _dir: None,
                    postgres: Some((admin, name)),
                }
            }
        }
    }

    pub async fn drop_now(self) {
        if let Some((admin, name)) = &self.postgres {
            let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// The samples' value at each quantile, in the samples' unit (sorts them).
pub fn quantiles(samples: &mut [Duration], qs: &[f64]) -> Vec<Duration> {
    samples.sort();
    qs.iter()
        .map(|q| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i]
        })
        .collect()
}

/// p50 and p99 in milliseconds.
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    let q = quantiles(samples, &[0.50, 0.99]);
    (q[0].as_secs_f64() * 1000.0, q[1].as_secs_f64() * 1000.0)
}
