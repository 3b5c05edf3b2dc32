//! Serves HTTP, runs the workers (singleton jobs under leases), and shuts down cleanly.

use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::catalog::Catalog;
use crate::config::Settings;
use crate::metering::Metering;
use crate::state::{AppError, AppState};
use crate::stripe::BillingVendor;

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
                // Named like a load error: the file, then what in it is wrong.
                state.entitlements.reload(&catalog).map_err(|message| {
                    crate::catalog::CatalogError {
                        path: settings.path.display().to_string(),
                        message,
                    }
                    .to_string()
                })
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
        state.metering.origin.clone(),
        state.metrics.clone(),
        shutdown.clone(),
        job,
    ));
}

/// Checkpoints the SQLite write-ahead log every second, off the request path, between two
/// usage batches (see [`Metering::checkpoint`]).
async fn checkpoints(metering: Metering, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        if let Err(error) = metering.checkpoint().await {
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
    let db = state.db.clone();
    recover(&state).await?;
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
    // Before any stream can be opened: the hub follows every change after it.
    let stream_from = db.changes().bounds().await?.1.unwrap_or(0);
    spawn_workers(&mut workers, &state, stream_from, &shutdown);
    warn_about_closed_doors(&state.settings);
    let grace = state.settings.shutdown.grace;
    tracing::info!(address = %listener.local_addr()?, backend = ?db.backend(), "billsync listening");
    let served = serve(listener, api::router(state), workers, grace, shutdown).await;
    db.close().await;
    tracing::info!("billsync stopped");
    Ok(served?)
}

/// What an earlier process left behind: reconciliation runs it did not finish, the last sweep's
/// confirmation, billing periods of a database from a version that kept none.
async fn recover(state: &AppState) -> Result<(), AppError> {
    let db = &state.db;
    let now = crate::store::now_ms();
    // SQLite has one process: whatever is running was this file's last process. On PostgreSQL
    // a run is another replica's until it stops beating.
    let silent_since = match db.backend() {
        crate::store::Backend::Sqlite => i64::MAX,
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
    let confirmed = db.sync_state().get(crate::cluster::CONFIRMED_AT).await?;
    if let Some(at) = confirmed.and_then(|v| v.parse().ok()) {
        state.entitlements.health.confirmed(at);
    }
    crate::sync::seed_billing_periods(db).await?;
    Ok(())
}

/// The workers: the applier and the outbox on every replica (they claim row by row), the
/// singleton jobs under their leases, and the catalog's reload on SIGHUP.
fn spawn_workers(
    workers: &mut JoinSet<()>,
    state: &AppState,
    stream_from: i64,
    shutdown: &CancellationToken,
) {
    let settings = state.settings.clone();
    workers.spawn(state.applier().run(shutdown.clone()));
    workers.spawn(checkpoints(state.metering.clone(), shutdown.clone()));
    let streams = &settings.entitlements;
    state.metering.counters.watch();
    workers.spawn(state.stream.clone().run(
        state.entitlements.clone(),
        stream_from,
        streams.stream_coalesce,
        streams.stream_retention,
        shutdown.clone(),
    ));
    let (metering, interval) = (state.metering.clone(), settings.metering.snapshot_interval);
    spawn_singleton(workers, state, shutdown, "snapshot", move |token| {
        metering.clone().run_snapshots(interval, token)
    });
    match &state.vendor {
        Some(vendor) => spawn_vendor_jobs(workers, state, vendor, shutdown),
        None => tracing::warn!("no Stripe API key configured (stripe.api_key): vendor sync is off"),
    }
    spawn_reconciliation_jobs(workers, state, shutdown);
    // Without notify.url the lease is still held, idle, so that every singleton job has a holder.
    let notifier = crate::notify::Notifier::from_settings(&state.db, &settings.notify);
    if notifier.is_none() {
        tracing::info!("no notify.url configured: notifications are recorded, not sent");
    }
    spawn_singleton(workers, state, shutdown, "notify", move |token| {
        let notifier = notifier.clone();
        async move {
            match notifier {
                Some(notifier) => notifier.run(token).await,
                None => token.cancelled().await,
            }
        }
    });
    #[cfg(unix)]
    workers.spawn(reload_on_sighup(state.clone(), shutdown.clone()));
}

/// The jobs that talk to Stripe: the poller, the sweep and the pusher (one replica each), and
/// the outbox (every replica, each command claimed by one).
fn spawn_vendor_jobs(
    workers: &mut JoinSet<()>,
    state: &AppState,
    vendor: &Arc<dyn BillingVendor>,
    shutdown: &CancellationToken,
) {
    tracing::info!(api_base = %state.settings.stripe.api_base, "Stripe API key configured: vendor sync is on");
    let (job_state, job_vendor) = (state.clone(), vendor.clone());
    spawn_singleton(workers, state, shutdown, "poller", move |token| {
        job_state.poller(job_vendor.clone()).run(token)
    });
    let (job_state, job_vendor) = (state.clone(), vendor.clone());
    spawn_singleton(workers, state, shutdown, "sweep", move |token| {
        job_state.sweep(job_vendor.clone()).run(token)
    });
    let (job_state, job_vendor) = (state.clone(), vendor.clone());
    spawn_singleton(workers, state, shutdown, "pusher", move |token| {
        job_state.pusher(job_vendor.clone()).run(token)
    });
    workers.spawn(state.outbox(vendor.clone()).run(shutdown.clone()));
}

/// The scheduled reconciliation and the open-period check, when configured, one replica each.
fn spawn_reconciliation_jobs(
    workers: &mut JoinSet<()>,
    state: &AppState,
    shutdown: &CancellationToken,
) {
    let settings = &state.settings.reconcile;
    if let Some(interval) = settings.interval {
        let (job_state, window) = (state.clone(), settings.window);
        spawn_singleton(workers, state, shutdown, "reconcile", move |token| {
            job_state
                .reconciler()
                .run_scheduled(interval, window, token)
        });
    }
    match settings.open_check_interval {
        Some(interval) if state.vendor.is_some() && settings.vendor_usage => {
            let (job_state, budget, window) = (
                state.clone(),
                settings.open_check_budget,
                settings.open_check_window,
            );
            spawn_singleton(workers, state, shutdown, "open_check", move |token| {
                let check = crate::reconcile::OpenCheck {
                    reconciler: job_state.reconciler(),
                    interval,
                    budget,
                    window,
                    drafts: job_state.drafts_wake.clone(),
                };
                check.run(token)
            });
        }
        Some(_) => tracing::info!(
            "open period check off: it needs a Stripe key and reconcile.vendor_usage"
        ),
        None => {}
    }
}

/// Says at start what a deployment has left closed.
fn warn_about_closed_doors(settings: &Settings) {
    if settings.api.key_digests.is_empty() && settings.api.tenant_keys.is_empty() {
        tracing::warn!("no API keys configured (api.keys): every /v1 request is refused with 401");
    }
    if settings.stripe.webhook_secrets.is_empty() {
        tracing::warn!(
            "no webhook secrets configured (stripe.webhook_secrets): every webhook is refused"
        );
    }
}

/// Serves `router` until `shutdown`, then waits for the in-flight requests and the workers, at
/// most `grace`.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    mut workers: JoinSet<()>,
    grace: std::time::Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
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
    tokio::select! {
        served = drained => served,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight work did not finish in time");
            server.abort();
            Ok(())
        }
    }
}
