//! From the raw layers to [`Settings`]: one validator per section, each naming the key it
//! rejects. The first invalid value stops loading.

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::file::{
    Raw, RawApi, RawClaims, RawDatabase, RawEntitlements, RawLog, RawMetering, RawNotify,
    RawOutbox, RawReconcile, RawRuntime, RawStripe, RawSync,
};
use super::{
    ApiSettings, CatalogSettings, ClaimSettings, ConfigError, ConsoleSettings, DEFAULT_CATALOG,
    DatabaseSettings, EntitlementSettings, LogSettings, MeteringSettings, NotifySettings,
    OutboxSettings, ReconcileSettings, RuntimeSettings, Secret, Settings, ShutdownSettings,
    StripeSettings, SyncSettings,
};

impl Raw {
    pub(super) fn validate(self) -> Result<Settings, ConfigError> {
        let listen = self.listen.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("`{}` is not an address like 127.0.0.1:8080", self.listen),
            )
        })?;
        let stripe_rate_limit = self.stripe.rate_limit;
        Ok(Settings {
            listen,
            database: database(self.database)?,
            api: api(self.api)?,
            stripe: stripe(self.stripe)?,
            sync: sync(self.sync, stripe_rate_limit)?,
            catalog: CatalogSettings {
                required: self.catalog.path != DEFAULT_CATALOG,
                path: PathBuf::from(self.catalog.path),
            },
            metering: metering(self.metering)?,
            entitlements: entitlements(self.entitlements)?,
            runtime: runtime(self.runtime)?,
            outbox: outbox(self.outbox)?,
            notify: notify(self.notify)?,
            claims: claims(self.claims)?,
            reconcile: reconcile(self.reconcile)?,
            console: ConsoleSettings {
                enabled: self.console.enabled,
            },
            log: log(self.log)?,
            shutdown: ShutdownSettings {
                grace: duration("shutdown.grace", &self.shutdown.grace)?,
            },
        })
    }
}

fn database(raw: RawDatabase) -> Result<DatabaseSettings, ConfigError> {
    let url = raw.url.trim().to_owned();
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(ConfigError::new(
            "database.url",
            "must start with sqlite:, postgres:// or postgresql://",
        ));
    }
    if raw.max_connections == 0 {
        return Err(ConfigError::new(
            "database.max_connections",
            "must be at least 1",
        ));
    }
    Ok(DatabaseSettings {
        url: Secret::new(url),
        max_connections: raw.max_connections,
        connect_timeout: duration("database.connect_timeout", &raw.connect_timeout)?,
    })
}

fn api(raw: RawApi) -> Result<ApiSettings, ConfigError> {
    let key_digests = raw
        .keys
        .iter()
        .map(|key| key_digest(key).map_err(|message| ConfigError::new("api.keys", message)))
        .collect::<Result<Vec<_>, _>>()?;
    let tenant_keys = raw
        .tenant_keys
        .iter()
        .map(|entry| tenant_key(entry))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    if raw.max_body_bytes < 1024 {
        return Err(ConfigError::new(
            "api.max_body_bytes",
            "must be at least 1024",
        ));
    }
    Ok(ApiSettings {
        key_digests,
        tenant_keys,
        max_body_bytes: raw.max_body_bytes,
        rate_limit: raw.rate_limit,
    })
}

/// One `api.tenant_keys` entry: `<key>=<tenant>|<tenant>...`.
fn tenant_key(entry: &str) -> Result<([u8; 32], Vec<String>), ConfigError> {
    let bad = |m: &str| ConfigError::new("api.tenant_keys", m.to_owned());
    let (key, tenants) = entry
        .rsplit_once('=')
        .ok_or_else(|| bad("each entry is <key>=<tenant>|<tenant>..."))?;
    let digest = key_digest(key).map_err(|m| bad(&m))?;
    let tenants = tenants
        .split('|')
        .map(|t| crate::domain::TenantId::parse(t.trim()).map(|t| t.as_str().to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e.message))?;
    Ok((digest, tenants))
}

fn stripe(raw: RawStripe) -> Result<StripeSettings, ConfigError> {
    let api_key = raw.api_key.trim();
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
    let api_base = raw.api_base.trim().trim_end_matches('/').to_owned();
    if reqwest::Url::parse(&api_base).is_err() || !api_base.starts_with("http") {
        return Err(ConfigError::new(
            "stripe.api_base",
            "must be an http(s) URL",
        ));
    }
    if raw.rate_limit == 0 {
        return Err(ConfigError::new(
            "stripe.rate_limit",
            "must be at least 1 request per second",
        ));
    }
    if raw.tenant_metadata_key.trim().is_empty() {
        return Err(ConfigError::new(
            "stripe.tenant_metadata_key",
            "must not be empty",
        ));
    }
    Ok(StripeSettings {
        api_key,
        api_base,
        webhook_secrets: raw.webhook_secrets.into_iter().map(Secret::new).collect(),
        legacy_plans: raw.legacy_plans,
        api_version: raw.api_version.trim().to_owned(),
        webhook_tolerance: positive("stripe.webhook_tolerance", &raw.webhook_tolerance)?,
        tenant_metadata_key: raw.tenant_metadata_key.trim().to_owned(),
        refetch: raw.refetch,
        rate_limit: raw.rate_limit,
        max_retries: raw.max_retries,
        retry_base_delay: positive("stripe.retry_base_delay", &raw.retry_base_delay)?,
        timeout: positive("stripe.timeout", &raw.timeout)?,
    })
}

fn sync(raw: RawSync, stripe_rate_limit: u32) -> Result<SyncSettings, ConfigError> {
    if !(1..=10_000).contains(&raw.apply_batch) {
        return Err(ConfigError::new(
            "sync.apply_batch",
            "must be between 1 and 10000",
        ));
    }
    Ok(SyncSettings {
        poll_interval: positive("sync.poll_interval", &raw.poll_interval)?,
        poll_overlap: duration("sync.poll_overlap", &raw.poll_overlap)?,
        sweep_interval: positive("sync.sweep_interval", &raw.sweep_interval)?,
        sweep_budget: sweep_budget(raw.sweep_budget, stripe_rate_limit)?,
        apply_batch: raw.apply_batch,
        max_retry_delay: positive("sync.max_retry_delay", &raw.max_retry_delay)?,
    })
}

/// 0 means a tenth of what `stripe.rate_limit` allows in a minute; more than all of it is refused.
fn sweep_budget(budget: u32, stripe_rate_limit: u32) -> Result<u32, ConfigError> {
    let per_minute = stripe_rate_limit.max(1).saturating_mul(60);
    match budget {
        0 => Ok((per_minute / 10).max(1)),
        b if b > per_minute => Err(ConfigError::new(
            "sync.sweep_budget",
            format!("{b} calls a minute is more than stripe.rate_limit allows ({per_minute})"),
        )),
        b => Ok(b),
    }
}

fn metering(raw: RawMetering) -> Result<MeteringSettings, ConfigError> {
    let push_window = positive("metering.push_window", &raw.push_window)?;
    if push_window < Duration::from_secs(60) || push_window > Duration::from_secs(86_400) {
        return Err(ConfigError::new(
            "metering.push_window",
            "must be between 1m and 24h",
        ));
    }
    if !(1..=100_000).contains(&raw.max_batch) {
        return Err(ConfigError::new(
            "metering.max_batch",
            "must be between 1 and 100000",
        ));
    }
    Ok(MeteringSettings {
        push_interval: positive("metering.push_interval", &raw.push_interval)?,
        push_window,
        snapshot_interval: positive("metering.snapshot_interval", &raw.snapshot_interval)?,
        max_batch: raw.max_batch,
    })
}

fn entitlements(raw: RawEntitlements) -> Result<EntitlementSettings, ConfigError> {
    Ok(EntitlementSettings {
        granting_statuses: raw.granting_statuses,
        past_due_grace: duration("entitlements.past_due_grace", &raw.past_due_grace)?,
        stale_after: positive("entitlements.stale_after", &raw.stale_after)?,
        stream_coalesce: positive("entitlements.stream_coalesce", &raw.stream_coalesce)?,
        stream_heartbeat: positive("entitlements.stream_heartbeat", &raw.stream_heartbeat)?,
        stream_retention: positive("entitlements.stream_retention", &raw.stream_retention)?,
        stream_buffer: match raw.stream_buffer {
            16..=65_536 => raw.stream_buffer,
            _ => {
                return Err(ConfigError::new(
                    "entitlements.stream_buffer",
                    "must be between 16 and 65536",
                ));
            }
        },
    })
}

fn runtime(raw: RawRuntime) -> Result<RuntimeSettings, ConfigError> {
    if raw.worker_threads > 1024 {
        return Err(ConfigError::new(
            "runtime.worker_threads",
            "must be between 0 (one per core) and 1024",
        ));
    }
    Ok(RuntimeSettings {
        worker_threads: (raw.worker_threads > 0).then_some(raw.worker_threads),
    })
}

fn outbox(raw: RawOutbox) -> Result<OutboxSettings, ConfigError> {
    if !(1..=256).contains(&raw.concurrency) {
        return Err(ConfigError::new(
            "outbox.concurrency",
            "must be between 1 and 256",
        ));
    }
    Ok(OutboxSettings {
        concurrency: raw.concurrency,
        give_up_after: positive("outbox.give_up_after", &raw.give_up_after)?,
    })
}

fn notify(raw: RawNotify) -> Result<NotifySettings, ConfigError> {
    let url = Some(raw.url.trim().to_owned()).filter(|u| !u.is_empty());
    if let Some(url) = &url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(ConfigError::new(
            "notify.url",
            "must start with http:// or https://",
        ));
    }
    let secret = Some(raw.secret).filter(|s| !s.is_empty()).map(Secret::new);
    if url.is_some() && secret.is_none() {
        return Err(ConfigError::new(
            "notify.secret",
            "is required when notify.url is set (the receiver checks the signature with it)",
        ));
    }
    Ok(NotifySettings {
        url,
        secret,
        timeout: positive("notify.timeout", &raw.timeout)?,
        max_retry_delay: positive("notify.max_retry_delay", &raw.max_retry_delay)?,
        give_up_after: positive("notify.give_up_after", &raw.give_up_after)?,
    })
}

fn claims(raw: RawClaims) -> Result<ClaimSettings, ConfigError> {
    Ok(ClaimSettings {
        inbox: claim("claims.inbox", &raw.inbox)?,
        commands: claim("claims.commands", &raw.commands)?,
        pushes: claim("claims.pushes", &raw.pushes)?,
    })
}

fn reconcile(raw: RawReconcile) -> Result<ReconcileSettings, ConfigError> {
    let interval = duration("reconcile.interval", &raw.interval)?;
    let open_check_interval = duration("reconcile.open_check_interval", &raw.open_check_interval)?;
    if raw.max_concurrent_runs == 0 {
        return Err(ConfigError::new(
            "reconcile.max_concurrent_runs",
            "must be at least 1",
        ));
    }
    if raw.open_check_budget == 0 {
        return Err(ConfigError::new(
            "reconcile.open_check_budget",
            "must be at least 1 (turn the check off with open_check_interval = \"0s\")",
        ));
    }
    Ok(ReconcileSettings {
        interval: (!interval.is_zero()).then_some(interval),
        window: positive("reconcile.window", &raw.window)?,
        vendor_usage: raw.vendor_usage,
        settle_delay: duration("reconcile.settle_delay", &raw.settle_delay)?,
        drift_sample: raw.drift_sample,
        max_concurrent_runs: raw.max_concurrent_runs,
        open_check_interval: (!open_check_interval.is_zero()).then_some(open_check_interval),
        open_check_budget: raw.open_check_budget,
        repair: raw.repair,
        open_check_window: Duration::from_secs(60),
    })
}

fn log(raw: RawLog) -> Result<LogSettings, ConfigError> {
    let level = raw.level.trim().to_owned();
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(ConfigError::new(
            "log.level",
            format!("`{level}` is not a log filter"),
        ));
    }
    Ok(LogSettings {
        level,
        format: raw.format,
    })
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
