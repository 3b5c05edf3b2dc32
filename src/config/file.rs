//! The layers in their raw shape: the embedded defaults, the optional file and the `BILLSYNC_*`
//! environment, merged by figment into [`Raw`] before validation.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;

use super::{CONFIG_FILE_ENV, CONFIG_FILE_FLAG, ConfigError, DEFAULT_TOML, LogFormat, Settings};

/// The merged layers, not yet validated, and the file among them with the flag or variable that
/// named it.
pub(super) struct Layers(Figment, Option<(PathBuf, &'static str)>);

impl Layers {
    /// The defaults overridden by a TOML string.
    pub(super) fn with_toml(overrides: &str) -> Self {
        Self(
            Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(overrides)),
            None,
        )
    }

    /// The typed, validated settings.
    pub(super) fn extract(&self) -> Result<Settings, ConfigError> {
        let raw: Raw = self.0.extract().map_err(figment_error)?;
        raw.validate()
    }

    pub(super) fn figment(&self) -> &Figment {
        &self.0
    }

    pub(super) fn file(&self) -> Option<&(PathBuf, &'static str)> {
        self.1.as_ref()
    }
}

/// Defaults < the file (`file`, the `--config` flag, else the one `BILLSYNC_CONFIG` names) <
/// the environment.
pub(super) fn layers(
    file: Option<&Path>,
    vars: &[(String, String)],
) -> Result<Layers, ConfigError> {
    let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
    let named = match file {
        Some(path) => Some((path.to_path_buf(), CONFIG_FILE_FLAG)),
        None => vars
            .iter()
            .find(|(k, _)| k == CONFIG_FILE_ENV)
            .map(|(_, path)| (PathBuf::from(path), CONFIG_FILE_ENV)),
    };
    if let Some((path, origin)) = &named {
        if !path.is_file() {
            return Err(ConfigError::new(
                origin,
                format!("{} is not a readable file", path.display()),
            ));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    Ok(Layers(figment.merge(EnvLayer::new(vars)), named))
}

/// The shape of the TOML and environment layers before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    pub(super) listen: String,
    pub(super) database: RawDatabase,
    pub(super) api: RawApi,
    pub(super) stripe: RawStripe,
    pub(super) sync: RawSync,
    pub(super) catalog: RawCatalog,
    pub(super) metering: RawMetering,
    pub(super) entitlements: RawEntitlements,
    pub(super) log: RawLog,
    pub(super) shutdown: RawShutdown,
    pub(super) runtime: RawRuntime,
    pub(super) outbox: RawOutbox,
    pub(super) notify: RawNotify,
    pub(super) claims: RawClaims,
    pub(super) reconcile: RawReconcile,
    pub(super) console: RawConsole,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    pub(super) enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) url: String,
    pub(super) max_connections: u32,
    pub(super) connect_timeout: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    #[serde(deserialize_with = "list_or_csv")]
    pub(super) keys: Vec<String>,
    #[serde(deserialize_with = "list_or_csv")]
    pub(super) tenant_keys: Vec<String>,
    pub(super) max_body_bytes: usize,
    pub(super) rate_limit: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStripe {
    pub(super) api_key: String,
    pub(super) api_base: String,
    #[serde(deserialize_with = "list_or_csv")]
    pub(super) webhook_secrets: Vec<String>,
    pub(super) legacy_plans: bool,
    pub(super) api_version: String,
    pub(super) webhook_tolerance: String,
    pub(super) tenant_metadata_key: String,
    pub(super) refetch: bool,
    pub(super) rate_limit: u32,
    pub(super) max_retries: u32,
    pub(super) retry_base_delay: String,
    pub(super) timeout: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSync {
    pub(super) poll_interval: String,
    pub(super) poll_overlap: String,
    pub(super) sweep_interval: String,
    pub(super) sweep_budget: u32,
    pub(super) apply_batch: u32,
    pub(super) max_retry_delay: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCatalog {
    pub(super) path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetering {
    pub(super) push_interval: String,
    pub(super) push_window: String,
    pub(super) snapshot_interval: String,
    pub(super) max_batch: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEntitlements {
    #[serde(deserialize_with = "list_or_csv")]
    pub(super) granting_statuses: Vec<String>,
    pub(super) past_due_grace: String,
    pub(super) stale_after: String,
    pub(super) stream_coalesce: String,
    pub(super) stream_heartbeat: String,
    pub(super) stream_retention: String,
    pub(super) stream_buffer: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: String,
    pub(super) format: LogFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) grace: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReconcile {
    pub(super) interval: String,
    pub(super) window: String,
    pub(super) vendor_usage: bool,
    pub(super) settle_delay: String,
    pub(super) drift_sample: usize,
    pub(super) max_concurrent_runs: usize,
    pub(super) open_check_interval: String,
    pub(super) open_check_budget: usize,
    pub(super) repair: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    pub(super) concurrency: usize,
    pub(super) give_up_after: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNotify {
    pub(super) url: String,
    pub(super) secret: String,
    pub(super) timeout: String,
    pub(super) max_retry_delay: String,
    pub(super) give_up_after: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClaims {
    pub(super) inbox: String,
    pub(super) commands: String,
    pub(super) pushes: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) worker_threads: usize,
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
pub(super) fn figment_error(error: figment::Error) -> ConfigError {
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
