//! Builds the application state, serves HTTP, and shuts down cleanly.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::api::metrics::HttpMetrics;
use crate::config::Settings;
use crate::store::{Db, StoreError};
use crate::vendor;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub metrics: Arc<HttpMetrics>,
    /// The Stripe client; `None` while no API key is configured (vendor sync off).
    pub vendor: Option<::stripe::Client>,
}

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("stripe client: {0}")]
    Vendor(#[from] ::stripe::StripeError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Installs ring as rustls' crypto provider; every TLS client needs one first.
pub fn init_crypto() {
    // "Already installed" is fine: tests start many services in one process.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connects to the database and applies the migrations.
pub async fn open_database(settings: &Settings) -> Result<Db, StoreError> {
    let db = Db::connect(&settings.database).await?;
    db.migrate().await?;
    Ok(db)
}

/// Runs the service on `listener` until `shutdown` is cancelled, then stops accepting, lets
/// in-flight requests finish (at most `shutdown.grace`), and closes the pool.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    init_crypto();
    let db = open_database(&settings).await?;
    let vendor = vendor::stripe::client(&settings.stripe)?;
    match &vendor {
        Some(_) => {
            tracing::info!(api_base = %settings.stripe.api_base, "Stripe API key configured")
        }
        None => tracing::warn!("no Stripe API key configured (stripe.api_key): vendor sync is off"),
    }
    if settings.api.key_digests.is_empty() {
        tracing::warn!("no API keys configured (api.keys): every /v1 request is refused with 401");
    }

    let grace = settings.shutdown.grace;
    let state = AppState {
        settings: Arc::new(settings),
        db: db.clone(),
        metrics: Arc::new(HttpMetrics::default()),
        vendor,
    };
    let router = api::router(state);
    tracing::info!(address = %listener.local_addr()?, backend = ?db.backend(), "billsync listening");

    let server =
        axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let mut server = tokio::spawn(server.into_future());
    let result = tokio::select! {
        joined = &mut server => joined.map_err(std::io::Error::other).and_then(|r| r),
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests did not finish in time");
            server.abort();
            Ok(())
        }
    };
    db.close().await;
    tracing::info!("billsync stopped");
    Ok(result?)
}
