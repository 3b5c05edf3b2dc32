//! Builds the application state, serves HTTP, runs the sync workers, and shuts down cleanly.

use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::catalog::{Catalog, CatalogError};
use crate::config::Settings;
use crate::entitlements::{Entitlements, PlanCatalog, Policy, SyncHealth};
use crate::metering::Metering;
use crate::metering::counters::Counters;
use crate::metering::pusher::Pusher;
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::store::{Db, StoreError};
use crate::sync::Applier;
use crate::sync::outbox::Outbox;
use crate::sync::poller::Poller;
use crate::sync::sweep::Sweep;
use crate::vendor::stripe::StripeHttp;
use crate::vendor::{BillingVendor, VendorError};

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
    /// Wakes the outbox worker when a command is accepted.
    pub outbox_wake: Arc<Notify>,
    pub metering: Metering,
    pub entitlements: Entitlements,
    /// Per-key request budgets (`api.rate_limit`).
    pub key_limiter: crate::api::auth::KeyLimiter,
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
        let metrics = Arc::new(Metrics::default());
        let vendor = StripeHttp::from_settings(&settings.stripe, metrics.clone())?
            .map(|client| Arc::new(client) as Arc<dyn BillingVendor>);
        let catalog = Catalog::load(&settings.catalog.path, settings.catalog.required)?;
        let metering = Metering {
            db: db.clone(),
            catalog: Arc::new(catalog),
            counters: Arc::new(Counters::default()),
            metrics: metrics.clone(),
            writer: Arc::default(),
            gate: Arc::default(),
            origin: crate::cluster::replica_id().into(),
            record_locks: Arc::default(),
            record_queue: Arc::default(),
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
        Ok(Self(Arc::new(Services {
            settings: Arc::new(settings),
            db,
            metrics,
            vendor,
            wake: Arc::new(Notify::new()),
            outbox_wake: Arc::new(Notify::new()),
            metering,
            entitlements,
            key_limiter: Default::default(),
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
            drift_sample: settings.drift_sample,
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
            tenant_key: self.settings.stripe.tenant_metadata_key.clone(),
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            health: self.entitlements.health.clone(),
        }
    }
}

/// Sets the gauges that describe the shared database rather than this process (backlogs, sync
/// lag, findings), so that every replica's `/metrics` tells the same; called on each scrape.
/// A database that does not answer within a second leaves the previous values.
pub async fn refresh_gauges(state: &AppState) {
    let refresh = async {
        let metrics = &state.metrics;
        let now = crate::store::now_ms();
        let age = |at: Option<i64>| at.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        let inbox = state.db.inbox().stats().await?;
        metrics.set(
            "billsync_inbox_backlog",
            "Vendor events stored and not applied yet (pending or failed, to be retried).",
            &[],
            (inbox.pending + inbox.failed) as f64,
        );
        metrics.set(
            "billsync_inbox_oldest_waiting_seconds",
            "Age (by vendor creation time) of the oldest vendor event not applied yet.",
            &[],
            age(inbox.oldest_waiting),
        );
        if let Some(newest) = inbox.newest_applied_event {
            metrics.set(
                "billsync_sync_lag_seconds",
                "Now minus the creation time of the newest applied vendor event.",
                &[],
                age(Some(newest)),
            );
        }
        let (commands, oldest) = state.db.commands().backlog().await?;
        metrics.set(
            "billsync_outbox_backlog",
            "Self-serve commands accepted and not finished yet.",
            &[],
            commands as f64,
        );
        metrics.set(
            "billsync_outbox_oldest_seconds",
            "Age of the oldest unfinished self-serve command.",
            &[],
            age(oldest),
        );
        if let Some(vendor) = &state.vendor {
            state.pusher(vendor.clone()).record_backlog().await?;
        }
        let (pushes, oldest) = state.db.usage().pending_pushes().await?;
        metrics.set(
            "billsync_usage_pushes_pending",
            "Meter events planned and not yet taken by the vendor (first send or a retry).",
            &[],
            pushes as f64,
        );
        metrics.set(
            "billsync_usage_oldest_pending_push_seconds",
            "Age of the oldest meter event not yet taken by the vendor.",
            &[],
            age(oldest),
        );
        if let Some(findings) = state.db.reconciliations().latest_findings().await? {
            metrics.set(
                "billsync_reconciliation_open_findings",
                "Findings of the latest reconciliation run.",
                &[],
                findings as f64,
            );
        }
        Ok::<_, StoreError>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(1), refresh).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(error = %error, "gauges not refreshed"),
        Err(_) => tracing::debug!("gauges not refreshed: the database is slow"),
    }
}

/// On SIGHUP, reads the catalog file again: features and plans take effect at once (every
/// read model is recomputed); meter changes need a restart.
#[cfg(unix)]
async fn reload_on_sighup(state: AppState, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the catalog reloads only at start");
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = hangup.recv() => {}
        }
        let settings = &state.settings.catalog;
        let reloaded = Catalog::load(&settings.path, settings.required)
            .map_err(|e| e.to_string())
            .and_then(|catalog| {
                if catalog.meters != state.metering.catalog.meters {
                    tracing::warn!(
                        "the catalog's meters changed: they take effect at the next restart"
                    );
                }
                state.entitlements.reload(&catalog)
            });
        match reloaded {
            Ok(()) => tracing::info!(path = %settings.path.display(), "catalog reloaded"),
            Err(error) => {
                tracing::error!(error = %error, "catalog reload failed; the previous catalog stays")
            }
        }
    }
}

/// Runs the singleton job `job` on whichever replica holds the lease `name`.
fn spawn_singleton<F, Fut>(
    workers: &mut JoinSet<()>,
    state: &AppState,
    shutdown: &CancellationToken,
    name: &'static str,
    job: F,
) where
    F: Fn(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    workers.spawn(crate::cluster::with_lease(
        state.db.clone(),
        name,
        state.metrics.clone(),
        shutdown.clone(),
        job,
    ));
}

/// Checkpoints the SQLite write-ahead log every second, off the request path.
async fn checkpoints(db: Db, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        if let Err(error) = db.checkpoint().await {
            tracing::warn!(error = %error, "SQLite checkpoint failed");
        }
    }
}

/// Runs the service on `listener` until `shutdown` is cancelled, then stops accepting, lets
/// in-flight requests and worker passes finish (at most `shutdown.grace`), and closes the pool.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    // Held until `run` returns.
    let _serving = crate::store::lock_sqlite_for_serving(&settings.database)?;
    let state = AppState::build(settings).await?;
    let settings = state.settings.clone();
    let db = state.db.clone();

    let now = crate::store::now_ms();
    // SQLite has one process: whatever is running was this file's last process. On PostgreSQL
    // a run is another replica's until it stops beating.
    let silent_since = match db.backend() {
        crate::store::Backend::Sqlite => now,
        crate::store::Backend::Postgres => now - 30_000,
    };
    let interrupted = db
        .reconciliations()
        .fail_interrupted(now, silent_since)
        .await?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "reconciliation runs left running by an earlier process marked failed"
        );
    }

    if let Some(at) = db
        .sync_state()
        .get(crate::cluster::CONFIRMED_AT)
        .await?
        .and_then(|v| v.parse().ok())
    {
        state.entitlements.health.confirmed(at);
    }

    crate::sync::seed_billing_periods(&db).await?;

    // Listen first, then read: no other replica's change falls between the two.
    let feed = crate::cluster::ChangeFeed::open(&db).await?;
    let (replayed, seen) = state.metering.rebuild().await?;
    tracing::info!(
        replica = %state.metering.origin,
        replayed,
        "usage counters rebuilt from the snapshot and the events after it"
    );

    let mut workers = JoinSet::new();
    if let Some(feed) = feed {
        workers.spawn(crate::cluster::follow_changes(
            feed,
            seen,
            state.entitlements.clone(),
            state.metering.clone(),
            state.metrics.clone(),
            shutdown.clone(),
        ));
    }
    // Inbox rows and commands are claimed row by row: every replica works on them.
    workers.spawn(state.applier().run(shutdown.clone()));
    workers.spawn(checkpoints(db.clone(), shutdown.clone()));
    let metering = state.metering.clone();
    let snapshot_interval = settings.metering.snapshot_interval;
    spawn_singleton(&mut workers, &state, &shutdown, "snapshot", move |token| {
        metering.clone().run_snapshots(snapshot_interval, token)
    });
    match &state.vendor {
        Some(vendor) => {
            tracing::info!(api_base = %settings.stripe.api_base, "Stripe API key configured: vendor sync is on");
            let (job_state, job_vendor) = (state.clone(), vendor.clone());
            spawn_singleton(&mut workers, &state, &shutdown, "poller", move |token| {
                job_state.poller(job_vendor.clone()).run(token)
            });
            let (job_state, job_vendor) = (state.clone(), vendor.clone());
            spawn_singleton(&mut workers, &state, &shutdown, "sweep", move |token| {
                job_state.sweep(job_vendor.clone()).run(token)
            });
            let (job_state, job_vendor) = (state.clone(), vendor.clone());
            spawn_singleton(&mut workers, &state, &shutdown, "pusher", move |token| {
                job_state.pusher(job_vendor.clone()).run(token)
            });
            workers.spawn(state.outbox(vendor.clone()).run(shutdown.clone()));
        }
        None => tracing::warn!("no Stripe API key configured (stripe.api_key): vendor sync is off"),
    }
    if settings.api.key_digests.is_empty() && settings.api.tenant_keys.is_empty() {
        tracing::warn!("no API keys configured (api.keys): every /v1 request is refused with 401");
    }
    if settings.stripe.webhook_secrets.is_empty() {
        tracing::warn!(
            "no webhook secrets configured (stripe.webhook_secrets): every webhook is refused"
        );
    }

    if let Some(interval) = settings.reconcile.interval {
        let (job_state, window) = (state.clone(), settings.reconcile.window);
        spawn_singleton(&mut workers, &state, &shutdown, "reconcile", move |token| {
            job_state
                .reconciler()
                .run_scheduled(interval, window, token)
        });
    }

    #[cfg(unix)]
    workers.spawn(reload_on_sighup(state.clone(), shutdown.clone()));

    let grace = settings.shutdown.grace;
    let router = api::router(state);
    tracing::info!(address = %listener.local_addr()?, backend = ?db.backend(), "billsync listening");

    let server = axum::serve(
        // Small JSON answers go out at once, not held back by Nagle's algorithm.
        listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(error = %error, "cannot set TCP_NODELAY");
            }
        }),
        router,
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let mut server = tokio::spawn(server.into_future());
    let drained = async {
        let served = (&mut server)
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        while workers.join_next().await.is_some() {}
        served
    };
    let result = tokio::select! {
        served = drained => served,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight work did not finish in time");
            server.abort();
            Ok(())
        }
    };
    db.close().await;
    tracing::info!("billsync stopped");
    Ok(result?)
}
