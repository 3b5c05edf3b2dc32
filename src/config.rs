//! Layered configuration: embedded `config/default.toml` < the file named by `BILLSYNC_CONFIG`
//! < `BILLSYNC_*` environment variables. Loaded once, validated, and handed out as typed structs.
//! Nothing else in billsync reads environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The defaults, compiled into the binary so that `billsync serve` needs no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Where the plan catalog is looked for when `catalog.path` is not set.
pub const DEFAULT_CATALOG: &str = "config/plans.toml";

/// Environment variable naming an optional TOML file layered over the defaults.
pub const CONFIG_FILE_ENV: &str = "BILLSYNC_CONFIG";

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
    pub claims: ClaimSettings,
    pub reconcile: ReconcileSettings,
}

#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// How often a scheduled run reconciles the last `window`; `None`: never.
    pub interval: Option<Duration>,
    pub window: Duration,
    /// Ask Stripe for its meter totals (a call per tenant, meter and period).
    pub vendor_usage: bool,
    /// Tenants a run over every tenant checks for drift (first in tenant order).
    pub drift_sample: usize,
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Commands sent at once (one tenant's always one at a time).
    pub concurrency: usize,
    /// A command the vendor could not take for this long fails.
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

/// The shape of the TOML and environment layers before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    database: RawDatabase,
    api: RawApi,
    stripe: RawStripe,
    sync: RawSync,
    catalog: RawCatalog,
    metering: RawMetering,
    entitlements: RawEntitlements,
    log: RawLog,
    shutdown: RawShutdown,
    runtime: RawRuntime,
    outbox: RawOutbox,
    claims: RawClaims,
    reconcile: RawReconcile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    max_connections: u32,
    connect_timeout: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    #[serde(deserialize_with = "list_or_csv")]
    keys: Vec<String>,
    #[serde(deserialize_with = "list_or_csv")]
    tenant_keys: Vec<String>,
    max_body_bytes: usize,
    rate_limit: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStripe {
    api_key: String,
    api_base: String,
    #[serde(deserialize_with = "list_or_csv")]
    webhook_secrets: Vec<String>,
    legacy_plans: bool,
    api_version: String,
    webhook_tolerance: String,
    tenant_metadata_key: String,
    refetch: bool,
    rate_limit: u32,
    max_retries: u32,
    retry_base_delay: String,
    timeout: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    poll_interval: String,
    poll_overlap: String,
    sweep_interval: String,
    apply_batch: u32,
    max_retry_delay: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetering {
    push_interval: String,
    push_window: String,
    snapshot_interval: String,
    max_batch: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntitlements {
    #[serde(deserialize_with = "list_or_csv")]
    granting_statuses: Vec<String>,
    past_due_grace: String,
    stale_after: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: String,
    format: LogFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconcile {
    interval: String,
    window: String,
    vendor_usage: bool,
    drift_sample: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    concurrency: usize,
    give_up_after: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaims {
    inbox: String,
    commands: String,
    pushes: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: usize,
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
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some((_, path)) = vars.iter().find(|(k, _)| k == CONFIG_FILE_ENV) {
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(ConfigError::new(
                    CONFIG_FILE_ENV,
                    format!("{} is not a readable file", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvLayer::new(&vars));
        let raw: Raw = figment.extract().map_err(figment_error)?;
        Self::validate(raw)
    }

    /// Loads defaults overridden by a TOML string (used by tests and tools).
    pub fn from_toml(overrides: &str) -> Result<Self, ConfigError> {
        let raw: Raw = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Toml::string(overrides))
            .extract()
            .map_err(figment_error)?;
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Self, ConfigError> {
        let listen = raw.listen.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("`{}` is not an address like 127.0.0.1:8080", raw.listen),
            )
        })?;

        let url = raw.database.url.trim().to_owned();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        if raw.database.max_connections == 0 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 1",
            ));
        }

        let key_digests = raw
            .api
            .keys
            .iter()
            .map(|key| key_digest(key).map_err(|message| ConfigError::new("api.keys", message)))
            .collect::<Result<Vec<_>, _>>()?;
        let tenant_keys = raw
            .api
            .tenant_keys
            .iter()
            .map(|entry| {
                let bad = |m: &str| ConfigError::new("api.tenant_keys", m.to_owned());
                let (key, tenants) = entry
                    .rsplit_once('=')
                    .ok_or_else(|| bad("each entry is <key>=<tenant>|<tenant>..."))?;
                let digest = key_digest(key).map_err(|m| bad(&m))?;
                let tenants = tenants
                    .split('|')
                    .map(|t| {
                        crate::domain::TenantId::parse(t.trim()).map(|t| t.as_str().to_owned())
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&e.message))?;
                Ok((digest, tenants))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        if raw.api.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "api.max_body_bytes",
                "must be at least 1024",
            ));
        }

        let api_key = raw.stripe.api_key.trim();
        let api_key = if api_key.is_empty() {
            None
        } else if !(api_key.starts_with("sk_") || api_key.starts_with("rk_")) {
            return Err(ConfigError::new(
                "stripe.api_key",
                "must be a Stripe secret or restricted key (sk_... or rk_...)",
            ));
        } else {
            Some(Secret::new(api_key))
        };
        let api_base = raw.stripe.api_base.trim().trim_end_matches('/').to_owned();
        if reqwest::Url::parse(&api_base).is_err() || !api_base.starts_with("http") {
            return Err(ConfigError::new(
                "stripe.api_base",
                "must be an http(s) URL",
            ));
        }

        if raw.stripe.rate_limit == 0 {
            return Err(ConfigError::new(
                "stripe.rate_limit",
                "must be at least 1 request per second",
            ));
        }
        if raw.stripe.tenant_metadata_key.trim().is_empty() {
            return Err(ConfigError::new(
                "stripe.tenant_metadata_key",
                "must not be empty",
            ));
        }
        if !(1..=10_000).contains(&raw.sync.apply_batch) {
            return Err(ConfigError::new(
                "sync.apply_batch",
                "must be between 1 and 10000",
            ));
        }
        let sync = SyncSettings {
            poll_interval: positive("sync.poll_interval", &raw.sync.poll_interval)?,
            poll_overlap: duration("sync.poll_overlap", &raw.sync.poll_overlap)?,
            sweep_interval: positive("sync.sweep_interval", &raw.sync.sweep_interval)?,
            apply_batch: raw.sync.apply_batch,
            max_retry_delay: positive("sync.max_retry_delay", &raw.sync.max_retry_delay)?,
        };

        let catalog = CatalogSettings {
            required: raw.catalog.path != DEFAULT_CATALOG,
            path: PathBuf::from(raw.catalog.path),
        };
        let push_window = positive("metering.push_window", &raw.metering.push_window)?;
        if push_window < Duration::from_secs(60) || push_window > Duration::from_secs(86_400) {
            return Err(ConfigError::new(
                "metering.push_window",
                "must be between 1m and 24h",
            ));
        }
        if !(1..=100_000).contains(&raw.metering.max_batch) {
            return Err(ConfigError::new(
                "metering.max_batch",
                "must be between 1 and 100000",
            ));
        }
        let metering = MeteringSettings {
            push_interval: positive("metering.push_interval", &raw.metering.push_interval)?,
            push_window,
            snapshot_interval: positive(
                "metering.snapshot_interval",
                &raw.metering.snapshot_interval,
            )?,
            max_batch: raw.metering.max_batch,
        };

        let entitlements = EntitlementSettings {
            granting_statuses: raw.entitlements.granting_statuses,
            past_due_grace: duration(
                "entitlements.past_due_grace",
                &raw.entitlements.past_due_grace,
            )?,
            stale_after: positive("entitlements.stale_after", &raw.entitlements.stale_after)?,
        };

        if raw.runtime.worker_threads > 1024 {
            return Err(ConfigError::new(
                "runtime.worker_threads",
                "must be between 0 (one per core) and 1024",
            ));
        }
        let runtime = RuntimeSettings {
            worker_threads: (raw.runtime.worker_threads > 0).then_some(raw.runtime.worker_threads),
        };

        if !(1..=256).contains(&raw.outbox.concurrency) {
            return Err(ConfigError::new(
                "outbox.concurrency",
                "must be between 1 and 256",
            ));
        }
        let outbox = OutboxSettings {
            concurrency: raw.outbox.concurrency,
            give_up_after: positive("outbox.give_up_after", &raw.outbox.give_up_after)?,
        };

        let claims = ClaimSettings {
            inbox: claim("claims.inbox", &raw.claims.inbox)?,
            commands: claim("claims.commands", &raw.claims.commands)?,
            pushes: claim("claims.pushes", &raw.claims.pushes)?,
        };

        let interval = duration("reconcile.interval", &raw.reconcile.interval)?;
        let reconcile = ReconcileSettings {
            interval: (!interval.is_zero()).then_some(interval),
            window: positive("reconcile.window", &raw.reconcile.window)?,
            vendor_usage: raw.reconcile.vendor_usage,
            drift_sample: raw.reconcile.drift_sample,
        };

        let level = raw.log.level.trim().to_owned();
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(ConfigError::new(
                "log.level",
                format!("`{level}` is not a log filter"),
            ));
        }

        Ok(Self {
            listen,
            database: DatabaseSettings {
                url: Secret::new(url),
                max_connections: raw.database.max_connections,
                connect_timeout: duration(
                    "database.connect_timeout",
                    &raw.database.connect_timeout,
                )?,
            },
            api: ApiSettings {
                key_digests,
                tenant_keys,
                max_body_bytes: raw.api.max_body_bytes,
                rate_limit: raw.api.rate_limit,
            },
            stripe: StripeSettings {
                api_key,
                api_base,
                webhook_secrets: raw
                    .stripe
                    .webhook_secrets
                    .into_iter()
                    .map(Secret::new)
                    .collect(),
                legacy_plans: raw.stripe.legacy_plans,
                api_version: raw.stripe.api_version.trim().to_owned(),
                webhook_tolerance: positive(
                    "stripe.webhook_tolerance",
                    &raw.stripe.webhook_tolerance,
                )?,
                tenant_metadata_key: raw.stripe.tenant_metadata_key.trim().to_owned(),
                refetch: raw.stripe.refetch,
                rate_limit: raw.stripe.rate_limit,
                max_retries: raw.stripe.max_retries,
                retry_base_delay: positive(
                    "stripe.retry_base_delay",
                    &raw.stripe.retry_base_delay,
                )?,
                timeout: positive("stripe.timeout", &raw.stripe.timeout)?,
            },
            sync,
            catalog,
            metering,
            entitlements,
            log: LogSettings {
                level,
                format: raw.log.format,
            },
            shutdown: ShutdownSettings {
                grace: duration("shutdown.grace", &raw.shutdown.grace)?,
            },
            runtime,
            outbox,
            claims,
            reconcile,
        })
    }
}

/// The `BILLSYNC_*` layer: `BILLSYNC_A__B=v` sets key `a.b`. `BILLSYNC_CONFIG` and the
/// test-only `BILLSYNC_TEST_*` are not keys.
struct EnvLayer(Vec<(String, Value)>);

impl EnvLayer {
    fn new(vars: &[(String, String)]) -> Self {
        let keys = vars
            .iter()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix(ENV_PREFIX)?;
                if rest == "CONFIG" || rest.starts_with("TEST_") || rest.is_empty() {
                    return None;
                }
                let path = rest.to_ascii_lowercase().replace("__", ".");
                let value: Value = value.parse().unwrap_or_else(|never| match never {});
                Some((path, value))
            })
            .collect();
        Self(keys)
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_METADATA)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.0
            .iter()
            .fold(Figment::new(), |figment, (path, value)| {
                figment.merge(Serialized::default(path, value))
            })
            .data()
    }
}

const ENV_PREFIX: &str = "BILLSYNC_";
const ENV_METADATA: &str = "environment";

/// The environment variable that sets `key`.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

/// Turns figment's error into one line naming the key.
fn figment_error(error: figment::Error) -> ConfigError {
    let error = error
        .into_iter()
        .next()
        .expect("figment errors are never empty");
    let key = if error.path.is_empty() {
        "(top level)".to_owned()
    } else {
        error.path.join(".")
    };
    let source = match &error.metadata {
        Some(m) if m.name == ENV_METADATA => format!(" (from {})", env_name(&key)),
        Some(m) => match &m.source {
            Some(figment::Source::File(path)) => format!(" (from {})", path.display()),
            _ => format!(" (from {})", m.name),
        },
        None => String::new(),
    };
    ConfigError::new(&key, format!("{}{source}", error.kind))
}

/// A list given as a TOML array, or as one comma-separated string (the environment's way).
fn list_or_csv<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    let items = match ListOrCsv::deserialize(de)? {
        ListOrCsv::List(items) => items,
        ListOrCsv::Csv(csv) => csv.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

/// The SHA-256 digest of an API key, or the digest itself when written `sha256:<hex>`.
pub fn key_digest(key: &str) -> Result<[u8; 32], String> {
    if let Some(hex_digest) = key.strip_prefix("sha256:") {
        let bytes = hex::decode(hex_digest)
            .map_err(|_| "a sha256: key must be 64 hex digits".to_owned())?;
        return bytes
            .try_into()
            .map_err(|_| "a sha256: key must be 64 hex digits".to_owned());
    }
    if key.len() < 16 {
        return Err("every key must be at least 16 characters".to_owned());
    }
    Ok(Sha256::digest(key.as_bytes()).into())
}

/// Parses "500ms", "10s", "5m", "24h", "7d".
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(number.checked_mul(millis)?))
}

fn positive(key: &str, text: &str) -> Result<Duration, ConfigError> {
    let value = duration(key, text)?;
    if value.is_zero() {
        return Err(ConfigError::new(key, "must be longer than zero"));
    }
    Ok(value)
}

/// A claim time: renewed every third of it, so at least a second, and at most an hour (a dead
/// replica's work waits that long).
fn claim(key: &str, text: &str) -> Result<Duration, ConfigError> {
    let value = duration(key, text)?;
    if value < Duration::from_secs(1) || value > Duration::from_secs(3_600) {
        return Err(ConfigError::new(key, "must be between 1s and 1h"));
    }
    Ok(value)
}

fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).ok_or_else(|| {
        ConfigError::new(
            key,
            format!("`{text}` is not a duration like 500ms, 10s, 5m, 24h"),
        )
    })
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
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
