use std::process::ExitCode;

use billsync::app;
use billsync::config::Settings;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// billsync keeps a SaaS product's billing state two-way synced with Stripe.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (applies pending migrations first).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// List every customer, product, price, plan, subscription, invoice, payment and credit note
    /// from Stripe and bring the mirror up to date. Resumes where an interrupted run stopped.
    Backfill,
    /// Rebuild the mirror from the stored events alone (no vendor calls) and report what differs.
    Replay {
        /// Only report; leave the mirror as it is.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("billsync: {error}");
            return ExitCode::from(2);
        }
    };
    billsync::telemetry::init(&settings.log);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = settings.runtime.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("billsync: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Serve => serve(settings).await,
            Command::Migrate => migrate(settings).await,
            Command::Backfill => backfill(settings).await,
            Command::Replay { dry_run } => replay(settings, dry_run).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!(error = %message, "billsync failed");
            eprintln!("billsync: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (listen): {e}", settings.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    app::run(settings, listener, shutdown)
        .await
        .map_err(|e| e.to_string())
}

async fn migrate(settings: Settings) -> Result<(), String> {
    let db = app::open_database(&settings)
        .await
        .map_err(|e| e.to_string())?;
    db.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

async fn backfill(settings: Settings) -> Result<(), String> {
    let state = app::AppState::build(settings)
        .await
        .map_err(|e| e.to_string())?;
    let vendor = state
        .vendor
        .clone()
        .ok_or("backfill needs the Stripe API key (stripe.api_key / BILLSYNC_STRIPE__API_KEY)")?;
    let report = billsync::sync::backfill::run(&state.db, vendor, &state.applier())
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

async fn replay(settings: Settings, dry_run: bool) -> Result<(), String> {
    let state = app::AppState::build(settings)
        .await
        .map_err(|e| e.to_string())?;
    let report = billsync::sync::replay::run(&state.db, !dry_run)
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
