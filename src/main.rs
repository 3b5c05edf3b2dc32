use std::process::ExitCode;

use billsync::app;
use billsync::config::Settings;
use billsync::state::{self, AppState};
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
    /// Reconcile usage, pushes, invoices and payments over a window, print the report, and exit
    /// 1 when anything does not match.
    Reconcile {
        /// Start of the window (RFC 3339 or YYYY-MM-DD, UTC), included.
        #[arg(long)]
        from: String,
        /// End of the window, excluded.
        #[arg(long)]
        to: String,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Report drift without repairing it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print recognised and deferred revenue per day or month, from the mirrored invoices.
    Revenue {
        /// First day (YYYY-MM-DD or RFC 3339, UTC), included.
        #[arg(long)]
        from: String,
        /// Last day, excluded.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "month")]
        group_by: String,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this currency (ISO code).
        #[arg(long)]
        currency: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Rebuild the mirror from the stored events alone (no vendor calls) and report what differs.
    Replay {
        /// Only report; leave the mirror as it is.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
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
    // serve logs to stdout; the other commands print their report there and log to stderr.
    billsync::telemetry::init_to(&settings.log, !matches!(cli.command, Command::Serve));
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
            Command::Reconcile {
                from,
                to,
                tenant,
                format,
                dry_run,
            } => reconcile(settings, &from, &to, tenant, format, dry_run).await,
            Command::Revenue {
                from,
                to,
                group_by,
                tenant,
                currency,
                format,
            } => {
                let mut query = std::collections::HashMap::from([
                    ("from".to_owned(), from),
                    ("to".to_owned(), to),
                    ("group_by".to_owned(), group_by),
                ]);
                query.extend(currency.map(|c| ("currency".to_owned(), c)));
                revenue(settings, query, tenant, format).await
            }
            Command::Serve => serve(settings).await,
            Command::Migrate => migrate(settings).await,
            Command::Backfill => backfill(settings).await,
            Command::Replay { dry_run } => replay(settings, dry_run).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) if message == FINDINGS => ExitCode::from(1),
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
    let db = state::open_database(&settings)
        .await
        .map_err(|e| e.to_string())?;
    db.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

async fn backfill(settings: Settings) -> Result<(), String> {
    let state = AppState::build(settings).await.map_err(|e| e.to_string())?;
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

/// The outcome of a reconciliation that found differences: exit code 1, nothing more to say.
const FINDINGS: &str = "reconciliation found differences";

async fn reconcile(
    settings: Settings,
    from: &str,
    to: &str,
    tenant: Option<String>,
    format: Format,
    dry_run: bool,
) -> Result<(), String> {
    use billsync::domain::parse_time;
    let time = |name: &str, text: &str| {
        parse_time(text).ok_or_else(|| format!("--{name} must be an RFC 3339 time or YYYY-MM-DD"))
    };
    let params = billsync::reconcile::Params {
        from_ms: time("from", from)?,
        to_ms: time("to", to)?,
        tenant,
        dry_run,
    };
    if params.to_ms <= params.from_ms {
        return Err("--to must be after --from".to_owned());
    }
    let state = AppState::build(settings).await.map_err(|e| e.to_string())?;
    let (run_id, report) = state
        .reconciler()
        .run(&params, "cli")
        .await
        .map_err(|e| e.to_string())?;
    state.db.close().await;
    let items: Vec<serde_json::Value> = report.items.iter().map(|i| i.to_json()).collect();
    match format {
        Format::Json => {
            let out = serde_json::json!({"id": run_id, "summary": report.summary, "items": items});
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Format::Csv => {
            println!("area,finding,tenant_id,subject,cause,detail");
            for item in &items {
                println!(
                    "{},{},{},{},{},{}",
                    csv(&item["area"]),
                    csv(&item["finding"]),
                    csv(&item["tenant_id"]),
                    csv(&subject(item)),
                    csv(&item["cause"]),
                    csv(&serde_json::Value::String(item.to_string()))
                );
            }
        }
        Format::Table => {
            println!("reconciliation {run_id}: {} finding(s)", items.len());
            println!(
                "{:<8} {:<22} {:<20} {:<40} cause",
                "area", "finding", "tenant", "subject"
            );
            for item in &items {
                println!(
                    "{:<8} {:<22} {:<20} {:<40} {}",
                    item["area"].as_str().unwrap_or_default(),
                    item["finding"].as_str().unwrap_or_default(),
                    item["tenant_id"].as_str().unwrap_or("-"),
                    subject(item).as_str().unwrap_or_default(),
                    item["cause"].as_str().unwrap_or_default()
                );
            }
        }
    }
    if items.is_empty() {
        Ok(())
    } else {
        Err(FINDINGS.to_owned())
    }
}

/// What an item is about, in a word: the invoice, the meter and period, or the object.
fn subject(item: &serde_json::Value) -> serde_json::Value {
    let text = match item["area"].as_str() {
        Some("money") => item["invoice"].as_str().unwrap_or_default().to_owned(),
        Some("usage") => format!(
            "{} {}..{}",
            item["meter"].as_str().unwrap_or_default(),
            item["period_start"].as_str().unwrap_or_default(),
            item["period_end"].as_str().unwrap_or_default()
        ),
        _ => item["object_id"].as_str().unwrap_or_default().to_owned(),
    };
    serde_json::Value::String(text)
}

/// One CSV field, quoted when it needs to be.
fn csv(value: &serde_json::Value) -> String {
    let text = match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

async fn revenue(
    settings: Settings,
    query: std::collections::HashMap<String, String>,
    tenant: Option<String>,
    format: Format,
) -> Result<(), String> {
    use billsync::api::revenue::{Window, render};
    let window = Window::from_query(&query).map_err(|e| {
        format!(
            "--{}: {}",
            e.field.unwrap_or_default().replace('_', "-"),
            e.message
        )
    })?;
    let state = AppState::build(settings).await.map_err(|e| e.to_string())?;
    let schedule = billsync::revenue::load(&state.db, &state.metering.catalog, tenant.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    state.db.close().await;
    let out = render(&schedule, &window, tenant.as_deref());
    let periods = out["periods"].as_array().cloned().unwrap_or_default();
    let kinds = ["subscription", "usage", "one_off", "reversal", "total"];
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Format::Csv => {
            println!(
                "currency,start,end,subscription,usage,one_off,reversal,recognised,billed,deferred,uncollectible"
            );
            for p in &periods {
                let recognised: Vec<String> = kinds
                    .iter()
                    .map(|k| p["recognised"][k].to_string())
                    .collect();
                println!(
                    "{},{},{},{},{},{},{}",
                    p["currency"].as_str().unwrap_or_default(),
                    p["start"].as_str().unwrap_or_default(),
                    p["end"].as_str().unwrap_or_default(),
                    recognised.join(","),
                    p["billed"],
                    p["deferred"],
                    p["uncollectible"]
                );
            }
        }
        Format::Table => {
            println!(
                "{:<4} {:<10} {:<10} {:>14} {:>14} {:>14} {:>14} {:>14}",
                "cur",
                "start",
                "end",
                "recognised",
                "of which usage",
                "billed",
                "deferred",
                "uncollectible"
            );
            for p in &periods {
                println!(
                    "{:<4} {:<10} {:<10} {:>14} {:>14} {:>14} {:>14} {:>14}",
                    p["currency"].as_str().unwrap_or_default(),
                    p["start"].as_str().unwrap_or_default(),
                    p["end"].as_str().unwrap_or_default(),
                    p["recognised"]["total"],
                    p["recognised"]["usage"],
                    p["billed"],
                    p["deferred"],
                    p["uncollectible"]
                );
            }
        }
    }
    Ok(())
}

async fn replay(settings: Settings, dry_run: bool) -> Result<(), String> {
    let state = AppState::build(settings).await.map_err(|e| e.to_string())?;
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
