//! Layered configuration: embedded `config/default.toml` < the file named by `--config` (or,
//! without the flag, by `BILLSYNC_CONFIG`) < `BILLSYNC_*` environment variables. Loaded once,
//! validated, and handed out as typed structs. Nothing else in billsync reads environment
//! variables.
//!
//! The types are here; [`file`] reads the layers into their raw shape, [`validate`] turns that
//! into [`Settings`] section by section, and [`show`] prints it with the secrets redacted.

mod file;
mod show;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use file::env_name;
pub use validate::{key_digest, parse_duration};

/// The defaults, compiled into the binary so that `billsync serve` needs no file at all.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Where the plan catalog is looked for when `catalog.path` is not set.
pub const DEFAULT_CATALOG: &str = "config/plans.toml";

/// Environment variable naming an optional TOML file layered over the defaults.
pub const CONFIG_FILE_ENV: &str = "BILLSYNC_CONFIG";

/// The command-line flag naming that file; it wins over [`CONFIG_FILE_ENV`].
pub const CONFIG_FILE_FLAG: &str = "--config";

/// Everything billsync can be told, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    pub database: DatabaseSettings,
    pub api: ApiSettings,
    pub stripe: StripeSettings,
    pub sync: SyncSettings,
    pub catalog: CatalogSettings,
    pub metering: MeteringSettings,
    pub entitlements: EntitlementSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub runtime: RuntimeSettings,
    pub outbox: OutboxSettings,
    pub notify: NotifySettings,
    pub claims: ClaimSettings,
    pub reconcile: ReconcileSettings,
    pub console: ConsoleSettings,
}

#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// How often a scheduled run reconciles the last `window`; `None`: never.
    pub interval: Option<Duration>,
    pub window: Duration,
    /// Ask Stripe for its meter totals (a call per tenant, meter and period).
    pub vendor_usage: bool,
    /// How far behind now the open period is compared with the vendor: Stripe's meter event
    /// summaries lag, and usage after this point may still be on its way.
    pub settle_delay: Duration,
    /// Tenants a run over every tenant checks for drift (first in tenant order).
    pub drift_sample: usize,
    /// Most runs started through `POST /v1/reconciliations` that this replica computes at
    /// once; past it the call is answered 429 `too_many_runs`.
    pub max_concurrent_runs: usize,
    /// How often the open periods of tenants with newly settled pushes are checked; `None`:
    /// never.
    pub open_check_interval: Option<Duration>,
    /// Most vendor meter-summary calls the open period check makes per `open_check_window`.
    pub open_check_budget: usize,
    /// The window the budget is counted over: one minute (not a configuration key; tests
    /// shorten it).
    pub open_check_window: Duration,
    /// Push usage Stripe acknowledged and lost again, before its invoice is final.
    pub repair: bool,
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Commands sent at once (one tenant's always one at a time).
    pub concurrency: usize,
    /// A command the vendor could not take for this long fails.
    pub give_up_after: Duration,
}

/// Notifications to the product: signed webhooks to one URL.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// Where notifications are posted; `None`: recorded, not sent.
    pub url: Option<String>,
    /// The HMAC-SHA256 key of the `Billsync-Signature` header.
    pub secret: Option<Secret>,
    /// Timeout of one delivery.
    pub timeout: Duration,
    /// Longest wait between two attempts.
    pub max_retry_delay: Duration,
    /// A notification not accepted within this long fails.
    pub give_up_after: Duration,
}

/// How long a replica's claim on queued work lasts unless renewed (renewed every third of it
/// while the work runs): the longest a dead replica's work waits before another takes it.
#[derive(Debug, Clone, Copy)]
pub struct ClaimSettings {
    /// Inbox rows (a batch the applier works on).
    pub inbox: Duration,
    /// A command the outbox worker sends.
    pub commands: Duration,
    /// Usage pushes (a batch the pusher sends).
    pub pushes: Duration,
}

#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Async worker threads; `None` means one per core.
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct EntitlementSettings {
    pub granting_statuses: Vec<String>,
    pub past_due_grace: Duration,
    pub stale_after: Duration,
    /// The entitlement stream sends a tenant's usage at most once per this, per meter.
    pub stream_coalesce: Duration,
    /// An idle stream gets a comment this often.
    pub stream_heartbeat: Duration,
    /// How long the change log keeps changes: a cursor older than this gets a new snapshot.
    pub stream_retention: Duration,
    /// Events a stream may have waiting for its consumer before it is disconnected.
    pub stream_buffer: usize,
}

#[derive(Debug, Clone)]
pub struct CatalogSettings {
    pub path: PathBuf,
    /// False when the path is the default one: a missing file then means an empty catalog.
    pub required: bool,
}

#[derive(Debug, Clone)]
pub struct MeteringSettings {
    pub push_interval: Duration,
    pub push_window: Duration,
    pub snapshot_interval: Duration,
    pub max_batch: usize,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `sqlite://...` or `postgres://...`; may carry a password, so it is a secret.
    pub url: Secret,
    pub max_connections: u32,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// SHA-256 digests of the accepted bearer keys; the keys themselves are not kept.
    pub key_digests: Vec<[u8; 32]>,
    /// Keys limited to some tenants: digest and the tenants it may ask about.
    pub tenant_keys: Vec<([u8; 32], Vec<String>)>,
    pub max_body_bytes: usize,
    /// Requests per second each key may make on `/v1` (a token bucket of one second's worth);
    /// 0: no limit.
    pub rate_limit: u32,
}

#[derive(Debug, Clone)]
pub struct StripeSettings {
    /// `None` when no key is configured: vendor sync is off.
    pub api_key: Option<Secret>,
    pub api_base: String,
    pub webhook_secrets: Vec<Secret>,
    pub legacy_plans: bool,
    pub api_version: String,
    pub webhook_tolerance: Duration,
    pub tenant_metadata_key: String,
    pub refetch: bool,
    pub rate_limit: u32,
    pub max_retries: u32,
    pub retry_base_delay: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub poll_interval: Duration,
    pub poll_overlap: Duration,
    pub sweep_interval: Duration,
    /// Stripe calls the drift sweep may make per minute (each pass spends its share of it,
    /// `sweep_budget × sweep_interval / 1 min`, and always checks at least one tenant).
    pub sweep_budget: u32,
    /// Inbox rows the applier claims and writes in one transaction.
    pub apply_batch: u32,
    pub max_retry_delay: Duration,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

/// The web console at `/console` (`console.*`).
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// Whether billsync serves `/console`; off: those paths answer 404 like any unknown route.
    pub enabled: bool,
}

#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    pub grace: Duration,
}

/// A string that never shows itself in `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Why configuration could not be loaded; `key` names the offending setting.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration for `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl Settings {
    /// Loads the layers from this process's environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::vars())
    }

    /// Loads the layers from the given environment (tests pass their own).
    pub fn load_from(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_with(None, vars)
    }

    /// Loads the layers from this process's environment, with `file` (the `--config` flag) as
    /// the file layer when given.
    pub fn load_file(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, std::env::vars())
    }

    /// Loads the layers with `file` (the `--config` flag) as the file layer when given, else
    /// the file `BILLSYNC_CONFIG` names, if any.
    pub fn load_with(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        file::layers(file, &vars)?.extract()
    }

    /// [`Self::load_file`], and the effective configuration as TOML with every secret redacted,
    /// headed by a comment naming the layers: what `billsync config check` prints.
    pub fn load_shown(file: Option<&Path>) -> Result<(Self, String), ConfigError> {
        Self::load_shown_from(file, std::env::vars())
    }

    /// [`Self::load_shown`] from the given environment.
    pub fn load_shown_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, String), ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let layers = file::layers(file, &vars)?;
        let settings = layers.extract()?;
        Ok((settings, show::redacted(&layers)?))
    }

    /// Loads defaults overridden by a TOML string (used by tests and tools).
    pub fn from_toml(overrides: &str) -> Result<Self, ConfigError> {
        file::Layers::with_toml(overrides).extract()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_nothing() {
        let s = Settings::load_from(Vec::new()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.database.url.expose(), "sqlite://data/billsync.db");
        assert!(s.api.key_digests.is_empty());
        assert!(s.stripe.api_key.is_none());
        assert_eq!(s.stripe.api_base, "https://api.stripe.com");
        assert_eq!(s.runtime.worker_threads, None);
    }

    #[test]
    fn worker_threads_zero_means_one_per_core() {
        let s = Settings::load_from(env(&[("BILLSYNC_RUNTIME__WORKER_THREADS", "1")])).unwrap();
        assert_eq!(s.runtime.worker_threads, Some(1));
        let err =
            Settings::load_from(env(&[("BILLSYNC_RUNTIME__WORKER_THREADS", "5000")])).unwrap_err();
        assert_eq!(err.key, "runtime.worker_threads");
    }

    #[test]
    fn environment_overrides_nested_keys_and_splits_lists() {
        let s = Settings::load_from(env(&[
            ("BILLSYNC_DATABASE__URL", "postgres://db/x"),
            (
                "BILLSYNC_API__KEYS",
                "first-key-0123456789, second-key-0123456789",
            ),
            ("BILLSYNC_STRIPE__LEGACY_PLANS", "true"),
            ("BILLSYNC_TEST_ANYTHING", "ignored"),
        ]))
        .unwrap();
        assert_eq!(s.database.url.expose(), "postgres://db/x");
        assert_eq!(s.api.key_digests.len(), 2);
        assert!(s.stripe.legacy_plans);
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::load_from(env(&[("BILLSYNC_SHUTDOWN__GRACE", "soon")])).unwrap_err();
        assert_eq!(err.key, "shutdown.grace");
        let err = Settings::load_from(env(&[("BILLSYNC_DATABASE__MAX_CONNECTIONS", "many")]))
            .unwrap_err();
        assert_eq!(err.key, "database.max_connections");
        let err = Settings::load_from(env(&[("BILLSYNC_DATABSE__URL", "x")])).unwrap_err();
        assert!(err.to_string().contains("databse"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let s = Settings::load_from(env(&[
            ("BILLSYNC_STRIPE__API_KEY", "sk_test_supersecretvalue"),
            ("BILLSYNC_STRIPE__WEBHOOK_SECRETS", "whsec_alsosecret"),
            ("BILLSYNC_API__KEYS", "an-api-key-that-is-long"),
            ("BILLSYNC_DATABASE__URL", "postgres://u:dbpassword@h/d"),
        ]))
        .unwrap();
        let shown = format!("{s:?}");
        for secret in ["supersecretvalue", "alsosecret", "an-api-key", "dbpassword"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }

    #[test]
    fn claims_keep_their_defaults_and_stay_within_bounds() {
        let s = Settings::load_from(Vec::new()).unwrap();
        assert_eq!(s.claims.inbox, Duration::from_secs(30));
        assert_eq!(s.claims.commands, Duration::from_secs(10));
        assert_eq!(s.claims.pushes, Duration::from_secs(10));
        let s = Settings::load_from(env(&[("BILLSYNC_CLAIMS__COMMANDS", "2s")])).unwrap();
        assert_eq!(s.claims.commands, Duration::from_secs(2));
        for (name, value) in [
            ("BILLSYNC_CLAIMS__INBOX", "500ms"),
            ("BILLSYNC_CLAIMS__PUSHES", "2h"),
        ] {
            let err = Settings::load_from(env(&[(name, value)])).unwrap_err();
            assert!(err.key.starts_with("claims."), "{err}");
        }
    }

    #[test]
    fn the_sweep_budget_defaults_to_a_tenth_of_the_stripe_rate_limit() {
        let s = Settings::load_from(Vec::new()).unwrap();
        assert_eq!(s.sync.sweep_budget, 150);
        let s = Settings::load_from(env(&[("BILLSYNC_STRIPE__RATE_LIMIT", "100")])).unwrap();
        assert_eq!(s.sync.sweep_budget, 600);
        let s = Settings::load_from(env(&[("BILLSYNC_SYNC__SWEEP_BUDGET", "40")])).unwrap();
        assert_eq!(s.sync.sweep_budget, 40);
        let err = Settings::load_from(env(&[("BILLSYNC_SYNC__SWEEP_BUDGET", "1501")])).unwrap_err();
        assert_eq!(err.key, "sync.sweep_budget");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
