//! The commands that run the service or change its data: `serve`, `migrate`, `backfill`,
//! `replay`. Only `serve` and `migrate` create and migrate the database.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::config::Settings;
use crate::state::{self, AppState};

pub(super) async fn serve(settings: Settings) -> Result<(), String> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (listen): {e}", settings.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    app::run(settings, listener, shutdown)
        .await
        .map_err(|e| e.to_string())
}

pub(super) async fn migrate(settings: Settings) -> Result<(), String> {
    let db = state::open_database(&settings)
        .await
        .map_err(|e| e.to_string())?;
    db.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

pub(super) async fn backfill(settings: Settings) -> Result<(), String> {
    const NEEDS_KEY: &str =
        "backfill needs the Stripe API key (stripe.api_key / BILLSYNC_STRIPE__API_KEY)";
    // Said before the database is opened: the first thing to fix.
    if settings.stripe.api_key.is_none() {
        return Err(NEEDS_KEY.to_owned());
    }
    let state = AppState::open_existing(settings)
        .await
        .map_err(|e| e.to_string())?;
    let vendor = state.vendor.clone().ok_or(NEEDS_KEY)?;
    let report = crate::sync::backfill::run(&state.db, vendor, &state.applier())
        .await
        .map_err(|e| e.to_string())?;
    println!("{:<24} {:>10} {:>10}", "kind", "listed", "changed");
    for (kind, listed, queued) in &report.kinds {
        println!("{:<24} {listed:>10} {queued:>10}", kind.as_str());
    }
    for kind in &report.unsupported {
        println!("{:<24} {:>10}", kind.as_str(), "not listed by the vendor");
    }
    println!("applied {} inbox rows", report.applied);
    state.db.close().await;
    Ok(())
}

pub(super) async fn replay(settings: Settings, dry_run: bool) -> Result<(), String> {
    let state = AppState::open_existing(settings)
        .await
        .map_err(|e| e.to_string())?;
    let report = crate::sync::replay::run(&state.db, !dry_run)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "read {} applied events; rebuilt {} objects; {} could not be replayed without the vendor",
        report.rows_read, report.objects_rebuilt, report.unreplayable
    );
    for d in &report.differences {
        println!("{:<8} {} {}", d.kind, d.object_type, d.object_id);
    }
    match (report.differences.is_empty(), dry_run) {
        (true, _) => println!("the mirror matches the stored events"),
        (false, true) => println!(
            "{} differences (dry run: nothing written)",
            report.differences.len()
        ),
        (false, false) => println!(
            "{} differences; {} objects rewritten",
            report.differences.len(),
            report.written
        ),
    }
    state.db.close().await;
    Ok(())
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(error = %error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received: finishing in-flight requests");
    shutdown.cancel();
}
