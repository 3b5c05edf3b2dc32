//! The service's state: the database, the vendor, the metering and entitlement parts, and the
//! workers built from them. What `serve`, the CLI commands and the tests share.

use std::sync::Arc;

use tokio::sync::{Notify, Semaphore};

use crate::catalog::{Catalog, CatalogError};
use crate::config::Settings;
use crate::entitlements::{Entitlements, PlanCatalog, Policy, SyncHealth};
use crate::metering::Metering;
use crate::metering::counters::Counters;
use crate::metering::pusher::Pusher;
use crate::metrics::Metrics;
use crate::outbound::Outbox;
use crate::reconcile::Reconciler;
use crate::store::{Db, StoreError};
use crate::stripe::StripeHttp;
use crate::stripe::{BillingVendor, VendorError};
use crate::sync::Applier;
use crate::sync::poller::Poller;
use crate::sync::sweep::Sweep;

/// What every handler and worker can reach. Cloned for every request and layer, so it is one
/// `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The parts of the service, shared.
pub struct Services {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    /// The vendor; `None` while no Stripe API key is configured (vendor sync off).
    pub vendor: Option<Arc<dyn BillingVendor>>,
    /// Wakes the applier when new inbox rows arrive.
    pub wake: Arc<Notify>,
    /// Stores webhooks' inbox rows, concurrent deliveries in one transaction.
    pub intake: crate::webhook::intake::Intake,
    /// Wakes the outbox worker when a command is accepted.
    pub outbox_wake: Arc<Notify>,
    /// Wakes the open period check when a draft invoice is applied.
    pub drafts_wake: Arc<Notify>,
    /// Feeds the entitlement streams (`GET /v1/entitlements/stream`).
    pub stream: Arc<crate::entitlements::stream::Hub>,
    pub metering: Metering,
    pub entitlements: Entitlements,
    /// Per-key request budgets (`api.rate_limit`).
    pub key_limiter: crate::api::auth::KeyLimiter,
    /// One permit per reconciliation run the API may compute at once
    /// (`reconcile.max_concurrent_runs`); a run holds its permit until it ends.
    pub run_slots: Arc<Semaphore>,
}

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("stripe client: {0}")]
    Vendor(#[from] VendorError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
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

impl AppState {
    /// Opens the database and builds the vendor client: what `serve` and the CLI commands share.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        init_crypto();
        let db = open_database(&settings).await?;
        Self::on(settings, db)
    }

    /// [`Self::build`] on a database `migrate` prepared, creating and migrating nothing: what
    /// the commands other than `serve` and `migrate` use (see [`Db::connect_existing`]).
    pub async fn open_existing(settings: Settings) -> Result<Self, AppError> {
        init_crypto();
        let db = Db::connect_existing(&settings.database).await?;
        Self::on(settings, db)
    }

    fn on(settings: Settings, db: Db) -> Result<Self, AppError> {
        let metrics = Arc::new(Metrics::default());
        let vendor = StripeHttp::from_settings(&settings.stripe, metrics.clone())?
            .map(|client| Arc::new(client) as Arc<dyn BillingVendor>);
        let catalog = Catalog::load(&settings.catalog.path, settings.catalog.required)?;
        let credits = crate::credits::book::CreditBook::new(catalog.credits.clone());
        let metering = Metering {
            db: db.clone(),
            catalog: Arc::new(catalog),
            counters: Arc::new(Counters::default()),
            metrics: metrics.clone(),
            writer: Arc::default(),
            waiting: Arc::default(),
            gate: Arc::default(),
            origin: crate::cluster::replica_id().into(),
            record_locks: Arc::default(),
            record_queue: Arc::default(),
            revenue: Arc::default(),
            credits: Arc::new(credits),
        };
        let plans =
            PlanCatalog::from_catalog(&metering.catalog).map_err(|message| CatalogError {
                path: settings.catalog.path.display().to_string(),
                message,
            })?;
        let policy = Policy {
            granting_statuses: settings.entitlements.granting_statuses.clone(),
            past_due_grace: settings.entitlements.past_due_grace,
            stale_after: settings.entitlements.stale_after,
        };
        let entitlements = Entitlements::new(
            db.clone(),
            plans,
            metering.clone(),
            policy,
            Arc::new(SyncHealth::default()),
            vendor.is_some(),
        );
        let stream_buffer = settings.entitlements.stream_buffer;
        let run_slots = Arc::new(Semaphore::new(settings.reconcile.max_concurrent_runs));
        let intake = crate::webhook::intake::Intake::new(db.backend());
        Ok(Self(Arc::new(Services {
            settings: Arc::new(settings),
            db,
            metrics,
            vendor,
            wake: Arc::new(Notify::new()),
            intake,
            outbox_wake: Arc::new(Notify::new()),
            drafts_wake: Arc::new(Notify::new()),
            stream: Arc::new(crate::entitlements::stream::Hub::new(stream_buffer)),
            metering,
            entitlements,
            key_limiter: Default::default(),
            run_slots,
        })))
    }

    pub fn applier(&self) -> Applier {
        let stripe = &self.settings.stripe;
        Applier {
            db: self.db.clone(),
            vendor: self.vendor.clone(),
            refetch: stripe.refetch,
            tenant_key: stripe.tenant_metadata_key.clone(),
            batch: self.settings.sync.apply_batch,
            claim: self.settings.claims.inbox,
            max_retry_delay: self.settings.sync.max_retry_delay,
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            entitlements: Some(self.entitlements.clone()),
            drafts: Some(self.drafts_wake.clone()),
            revenue: Some(self.metering.revenue.clone()),
        }
    }

    pub fn poller(&self, vendor: Arc<dyn BillingVendor>) -> Poller {
        Poller {
            db: self.db.clone(),
            vendor,
            interval: self.settings.sync.poll_interval,
            overlap: self.settings.sync.poll_overlap,
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            health: self.entitlements.health.clone(),
        }
    }

    pub fn outbox(&self, vendor: Arc<dyn BillingVendor>) -> Outbox {
        Outbox {
            db: self.db.clone(),
            vendor,
            applier: self.applier(),
            metrics: self.metrics.clone(),
            wake: self.outbox_wake.clone(),
            concurrency: self.settings.outbox.concurrency,
            claim: self.settings.claims.commands,
            give_up_after: self.settings.outbox.give_up_after,
            max_retry_delay: self.settings.sync.max_retry_delay,
        }
    }

    pub fn reconciler(&self) -> Reconciler {
        let settings = &self.settings.reconcile;
        Reconciler {
            db: self.db.clone(),
            vendor: self.vendor.clone(),
            catalog: self.metering.catalog.clone(),
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            vendor_usage: settings.vendor_usage,
            settle_delay: settings.settle_delay,
            drift_sample: settings.drift_sample,
            repair: settings.repair,
            max_retry_delay: self.settings.sync.max_retry_delay,
        }
    }

    pub fn pusher(&self, vendor: Arc<dyn BillingVendor>) -> Pusher {
        Pusher {
            metering: self.metering.clone(),
            vendor,
            interval: self.settings.metering.push_interval,
            window: self.settings.metering.push_window,
            max_retry_delay: self.settings.sync.max_retry_delay,
            claim: self.settings.claims.pushes,
        }
    }

    pub fn sweep(&self, vendor: Arc<dyn BillingVendor>) -> Sweep {
        Sweep {
            db: self.db.clone(),
            vendor,
            interval: self.settings.sync.sweep_interval,
            budget: self.settings.sync.sweep_budget,
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            health: self.entitlements.health.clone(),
        }
    }
}
