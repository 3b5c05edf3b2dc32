//! Storage: one schema on two backends, SQLite (the default) and PostgreSQL.
//!
//! Repositories write portable SQL (`$1` placeholders work on both) and run it on whichever
//! pool is configured through [`on_pool!`], which expands the same code once per backend so each
//! keeps its native driver (types, `LISTEN/NOTIFY`, advisory locks).

mod apply;
mod changes;
mod claims;
mod commands;
mod credit_alerts;
pub(crate) mod credit_totals;
mod credits;
pub(crate) mod distinct;
mod inbox;
mod lease;
mod link;
mod mirror;
mod notifications;
pub(crate) mod periods;
mod pushes;
mod reconcile;
mod record;
mod snapshot;
mod tenants;
mod usage;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::DatabaseSettings;

pub use apply::{Apply, ApplyOutcome, Confirmed, TenantClaim};
pub use changes::{ChangeRow, Changes};
pub use claims::{Claims, Queue};
pub(crate) use commands::insert_command;
pub use commands::{CommandRow, Commands, Enqueued, NewCommand, Settlement};
pub use credit_alerts::{CreditAlerts, CreditSettingsRow, CrossingRow};
pub(crate) use credit_alerts::{balance_changed, insert_crossing};
pub use credit_totals::{CreditState, Cuts, GrantRows, Total, credit_lock};
pub use credits::Credits;
pub use inbox::{Inbox, InboxRow, InboxStats, NewEvent, Source};
pub use lease::{LeaseSeat, XactLock, holders as lease_holders, lease_key};
pub use mirror::{Mirror, MirrorRow, ObjectState, PageKinds, SyncState};
pub(crate) use notifications::insert_notification;
pub use notifications::{Delivery, NewNotification, NotificationRow, Notifications};
pub use periods::{PeriodRow, Periods};
pub use pushes::{NewPush, PushRow, UnpushedKey};
pub use reconcile::{ItemRow, Reconciliations, RunRow};
pub use record::{CheckedRecord, RecordCheck};
pub use snapshot::{BucketState, CounterState, PageCursor, Positioned, SnapshotSource, TxSnapshot};
pub use tenants::{TenantRecord, Tenants, Upserted};
pub use usage::{CreditWrite, DistinctDelta, Inserted, Payloads, Usage, UsageRow};
pub use writer::UsageWriter;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Runs `$body` with `$pool` bound to the concrete pool of either backend.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::store::Db::Sqlite($pool) => $body,
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to the configured database.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A storage failure, sorted by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached right now; retrying later may work.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Setup(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(error),
            sqlx::Error::Database(ref db) if is_transient(db.code().as_deref()) => {
                Self::Unavailable(error)
            }
            other => Self::Query(other),
        }
    }
}

impl StoreError {
    /// A copy of this error for each of the callers one failed operation answers (a batch of
    /// check-and-records), in the same class.
    pub fn shared(&self) -> Self {
        let copy = sqlx::Error::Protocol(self.to_string());
        match self {
            Self::Unavailable(_) => Self::Unavailable(copy),
            _ => Self::Query(copy),
        }
    }
}

/// Error codes that mean "the database is not there right now" rather than "this query is wrong":
/// PostgreSQL connection exceptions (08), shutdown (57P0x), insufficient resources (53), a
/// dropped database (3D000); SQLite busy (5) and locked (6).
fn is_transient(code: Option<&str>) -> bool {
    code.is_some_and(|code| {
        code.starts_with("08")
            || code.starts_with("57P0")
            || code.starts_with("53")
            || matches!(code, "3D000" | "5" | "6")
    })
}

/// The error of a command that needs a prepared database and found none.
fn not_prepared(name: &str, what: &str) -> StoreError {
    StoreError::Setup(format!(
        "{name} (database.url) {what}: this command does not create or migrate a database; \
         prepare it with `billsync migrate` (or `billsync serve`), or check database.url and the \
         working directory"
    ))
}

/// SQLite is for one serving process: `serve` holds an exclusive lock on `<database>.serve.lock`
/// for as long as it runs, and a second `serve` on the same file is refused with a message.
/// `None` for PostgreSQL (several replicas share it) and in-memory SQLite.
pub fn lock_sqlite_for_serving(
    settings: &DatabaseSettings,
) -> Result<Option<std::fs::File>, StoreError> {
    let url = settings.url.expose();
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Setup(format!("database.url is not a valid SQLite URL: {e}")))?;
    let file = options.get_filename();
    if file == Path::new(":memory:") {
        return Ok(None);
    }
    let path = std::path::PathBuf::from(format!("{}.serve.lock", file.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Setup(format!(
                "cannot create database directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Setup(format!("cannot open {}: {e}", path.display())))?;
    match lock.try_lock() {
        Ok(()) => Ok(Some(lock)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Setup(format!(
            "another billsync serve is using the SQLite database {} (it holds {}); SQLite is for \
             one serving process: stop the other one, or use PostgreSQL for several replicas",
            file.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Setup(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

impl Db {
    /// Opens the pool; for SQLite, creates the file and its directory and turns on WAL.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let url = settings.url.expose();
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| {
                    StoreError::Setup(format!("database.url is not a valid SQLite URL: {e}"))
                })?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a committed transaction survives power loss, not only a process crash.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
                // Checkpoints run in the background (`checkpoint`), not inside a request's commit.
                .pragma("wal_autocheckpoint", "0")
                // Reads of the database file through a shared mapping rather than `pread`: a
                // connection's page cache is dropped whenever another connection writes, and
                // re-reading the index pages a usage batch touches was a tenth of ingest's CPU.
                // Writes still go through the write-ahead log, `synchronous = FULL`.
                .pragma("mmap_size", "268435456");
            let in_memory = options.get_filename() == Path::new(":memory:");
            if let Some(dir) = options
                .get_filename()
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Setup(format!(
                        "cannot create database directory {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            // Each connection to an in-memory SQLite database sees its own empty database.
            let max = if in_memory {
                1
            } else {
                settings.max_connections
            };
            let pool = SqlitePoolOptions::new()
                .max_connections(max)
                .min_connections(u32::from(in_memory))
                .acquire_timeout(settings.connect_timeout)
                .connect_with(options)
                .await?;
            Ok(Self::Sqlite(pool))
        } else {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| {
                    StoreError::Setup(format!("database.url is not a valid PostgreSQL URL: {e}"))
                })?
                .application_name("billsync");
            let pool = PgPoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(settings.connect_timeout)
                .connect_with(options)
                .await?;
            Ok(Self::Postgres(pool))
        }
    }

    /// Opens a database that `migrate` (or `serve`) prepared, creating and migrating nothing:
    /// for the commands that only read or repair. A missing SQLite file, a missing PostgreSQL
    /// database or a pending migration is an error naming the database and how to prepare it.
    pub async fn connect_existing(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let url = settings.url.expose();
        let (name, db) = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url).map_err(|e| {
                StoreError::Setup(format!("database.url is not a valid SQLite URL: {e}"))
            })?;
            let file = options.get_filename();
            let name = match std::env::current_dir() {
                Ok(dir) if file.is_relative() => format!(
                    "the SQLite database {} (in {})",
                    file.display(),
                    dir.display()
                ),
                _ => format!("the SQLite database {}", file.display()),
            };
            if file != Path::new(":memory:") && !file.is_file() {
                return Err(not_prepared(&name, "does not exist"));
            }
            (name, Self::connect(settings).await?)
        } else {
            let options = PgConnectOptions::from_str(url).map_err(|e| {
                StoreError::Setup(format!("database.url is not a valid PostgreSQL URL: {e}"))
            })?;
            let name = format!(
                "the PostgreSQL database {} on {}:{}",
                options.get_database().unwrap_or("(default)"),
                options.get_host(),
                options.get_port()
            );
            match Self::connect(settings).await {
                Ok(db) => (name, db),
                Err(StoreError::Unavailable(sqlx::Error::Database(e)))
                | Err(StoreError::Query(sqlx::Error::Database(e)))
                    if e.code().as_deref() == Some("3D000") =>
                {
                    return Err(not_prepared(&name, "does not exist"));
                }
                Err(e) => return Err(e),
            }
        };
        let pending = db.pending_migrations().await?;
        if pending > 0 {
            db.close().await;
            let what = format!("is not migrated ({pending} migration(s) pending)");
            return Err(not_prepared(&name, &what));
        }
        Ok(db)
    }

    /// How many of the embedded migrations the database has not applied.
    async fn pending_migrations(&self) -> Result<usize, StoreError> {
        let sql = "SELECT version FROM _sqlx_migrations WHERE success";
        let (migrator, applied) = match self {
            Self::Sqlite(pool) => (
                &SQLITE_MIGRATIONS,
                sqlx::query_scalar::<_, i64>(sql).fetch_all(pool).await,
            ),
            Self::Postgres(pool) => (
                &POSTGRES_MIGRATIONS,
                sqlx::query_scalar::<_, i64>(sql).fetch_all(pool).await,
            ),
        };
        let applied = match applied {
            Ok(applied) => applied,
            // No bookkeeping table: never migrated.
            Err(sqlx::Error::Database(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(migrator
            .iter()
            .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
            .count())
    }

    /// What a work-claiming `SELECT` ends with: on PostgreSQL, where several replicas claim
    /// from the same tables, rows another replica is claiming are skipped, not waited for;
    /// SQLite has one process and needs nothing.
    pub(crate) fn skip_locked(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "",
            Self::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the embedded migrations (PostgreSQL serialises concurrent runs with a lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// Tells every replica listening on `channel` (PostgreSQL `NOTIFY`); nothing on SQLite,
    /// whose one process has no one to tell.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        if let Self::Postgres(pool) = self {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Now by the database's clock, Unix milliseconds: one clock for every replica (SQLite has
    /// one process, and this is its clock). Vendor states are versioned by it, so that two
    /// replicas whose own clocks differ still order what they observed.
    pub async fn clock_ms(&self) -> Result<i64, StoreError> {
        match self {
            Self::Sqlite(_) => Ok(now_ms()),
            Self::Postgres(pool) => {
                let (now,): (i64,) = sqlx::query_as(
                    "SELECT FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
                )
                .fetch_one(pool)
                .await?;
                Ok(now)
            }
        }
    }

    /// One round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))?;
        Ok(())
    }

    /// Copies the SQLite write-ahead log into the database file without blocking writers
    /// (PostgreSQL: nothing to do). `serve` calls it every second.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        if let Self::Sqlite(pool) = self {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await);
    }

    pub fn tenants(&self) -> Tenants<'_> {
        Tenants::new(self)
    }

    pub fn changes(&self) -> Changes<'_> {
        Changes::new(self)
    }

    pub fn claims(&self) -> Claims<'_> {
        Claims::new(self)
    }

    pub fn credit_alerts(&self) -> CreditAlerts<'_> {
        CreditAlerts::new(self)
    }

    pub fn notifications(&self) -> Notifications<'_> {
        Notifications::new(self)
    }

    pub fn credits(&self) -> Credits<'_> {
        Credits { db: self }
    }

    pub fn commands(&self) -> Commands<'_> {
        Commands::new(self)
    }

    pub fn inbox(&self) -> Inbox<'_> {
        Inbox::new(self)
    }

    pub fn mirror(&self) -> Mirror<'_> {
        Mirror::new(self)
    }

    pub fn periods(&self) -> Periods<'_> {
        Periods::new(self)
    }

    pub fn usage(&self) -> Usage<'_> {
        Usage::new(self)
    }

    pub fn reconciliations(&self) -> Reconciliations<'_> {
        Reconciliations::new(self)
    }

    pub fn sync_state(&self) -> SyncState<'_> {
        SyncState::new(self)
    }
}

/// Now, as stored: Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
