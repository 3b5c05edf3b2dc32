//! The `billsync` command line; `main.rs` only calls [`main`].
//!
//! Only `serve` and `migrate` create or migrate a database. The other commands that use one
//! (`backfill`, `replay`, `reconcile`, `revenue`) need a database `migrate` prepared, and say so
//! instead of creating an empty one. `config check` and `healthcheck` use no database.

mod check;
mod commands;
mod reports;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;

/// billsync keeps a SaaS product's billing state two-way synced with Stripe.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file layered over the defaults and under the environment; wins over
    /// BILLSYNC_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (creates the database and applies pending migrations first).
    Serve,
    /// Create the database if needed, apply the migrations, and exit.
    Migrate,
    /// List every customer, product, price, plan, subscription, invoice, payment and credit note
    /// from Stripe and bring the mirror up to date. Resumes where an interrupted run stopped.
    Backfill,
    /// Reconcile usage, pushes, invoices and payments over a window and print the report. Exits 0
    /// when everything matches, 1 when anything does not, 2 for bad arguments or configuration,
    /// 3 when it could not run (database, Stripe).
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
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Ask a running billsync whether it is ready (GET /readyz): exit 0 on a 2xx answer, 1
    /// otherwise.
    Healthcheck {
        /// The URL to ask instead of `/readyz` on the `listen` address.
        #[arg(long)]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = parse_timeout)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration and the plan catalog, and print the effective
    /// configuration with its secrets redacted: exit 0 when valid, 2 when not.
    Check,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

/// Why a command did not succeed, and so its exit code.
#[derive(Debug)]
pub(super) enum Failure {
    /// `reconcile` found differences: 1; the report has said the rest.
    Findings,
    /// The arguments or the configuration are wrong: 2, as clap's own usage errors.
    Invalid(String),
    /// `reconcile` could not run (the database, Stripe, storing the report): 3, so that it is
    /// never taken for "found differences".
    CouldNotRun(String),
    /// Any other command failed: 1.
    Failed(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Findings | Self::Failed(_) => 1,
            Self::Invalid(_) => 2,
            Self::CouldNotRun(_) => 3,
        }
    }

    /// What to say on stderr; findings are the report itself.
    fn message(&self) -> Option<&str> {
        match self {
            Self::Findings => None,
            Self::Invalid(message) | Self::CouldNotRun(message) | Self::Failed(message) => {
                Some(message)
            }
        }
    }
}

fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(text).ok_or_else(|| "a duration like 500ms or 2s".to_owned())
}

/// Parses the command line, runs the command, and gives the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = cli.config.as_deref();
    match &cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => return check::config(file),
        Command::Healthcheck {
            url: Some(url),
            timeout,
        } => return check::health(url, *timeout),
        _ => {}
    }
    let settings = match Settings::load_file(file) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("billsync: {error}");
            return ExitCode::from(2);
        }
    };
    if let Command::Healthcheck { timeout, .. } = cli.command {
        return check::health(&check::readyz_url(settings.listen), timeout);
    }
    // serve logs to stdout; the other commands print their report there and log to stderr.
    crate::telemetry::init_to(&settings.log, !matches!(cli.command, Command::Serve));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = settings.runtime.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            let message = format!("cannot start the async runtime: {error}");
            eprintln!("billsync: {message}");
            let failure = match cli.command {
                Command::Reconcile { .. } => Failure::CouldNotRun(message),
                _ => Failure::Failed(message),
            };
            return ExitCode::from(failure.code());
        }
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if let Some(message) = failure.message() {
                tracing::error!(error = %message, "billsync failed");
                eprintln!("billsync: {message}");
            }
            ExitCode::from(failure.code())
        }
    }
}

async fn run(command: Command, settings: Settings) -> Result<(), Failure> {
    match command {
        Command::Reconcile {
            from,
            to,
            tenant,
            format,
            dry_run,
        } => reports::reconcile(settings, &from, &to, tenant, format, dry_run).await,
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
            reports::revenue(settings, query, tenant, format)
                .await
                .map_err(Failure::Failed)
        }
        Command::Serve => commands::serve(settings).await.map_err(Failure::Failed),
        Command::Migrate => commands::migrate(settings).await.map_err(Failure::Failed),
        Command::Backfill => commands::backfill(settings).await.map_err(Failure::Failed),
        Command::Replay { dry_run } => commands::replay(settings, dry_run)
            .await
            .map_err(Failure::Failed),
        Command::Config { .. } | Command::Healthcheck { .. } => {
            unreachable!("answered before the runtime starts")
        }
    }
}
