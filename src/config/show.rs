//! The effective configuration as TOML, every secret redacted: what `billsync config check`
//! prints. Secrets are the database URL's password, API keys, the Stripe key and webhook
//! secrets; everything else is shown as loaded.

use toml::{Table, Value};

use super::ConfigError;
use super::file::{Layers, figment_error};

/// What stands in for a secret.
pub const REDACTED: &str = "[redacted]";

pub(super) fn redacted(layers: &Layers) -> Result<String, ConfigError> {
    let mut table: Table = layers.figment().extract().map_err(figment_error)?;
    if let Some(Value::String(url)) = entry(&mut table, "database", "url") {
        *url = redact_url(url);
    }
    if let Some(keys) = entry(&mut table, "api", "keys") {
        redact_list(keys, |_| REDACTED.to_owned());
    }
    if let Some(keys) = entry(&mut table, "api", "tenant_keys") {
        // The tenants are not secret; the key before `=` is.
        redact_list(keys, |e| match e.rsplit_once('=') {
            Some((_, tenants)) => format!("{REDACTED}={tenants}"),
            None => REDACTED.to_owned(),
        });
    }
    if let Some(Value::String(key)) = entry(&mut table, "stripe", "api_key")
        && !key.trim().is_empty()
    {
        // The mode (sk_test_, rk_live_...) helps and is not secret.
        let mode: String = key.split_inclusive('_').take(2).collect();
        *key = format!("{mode}{REDACTED}");
    }
    if let Some(secrets) = entry(&mut table, "stripe", "webhook_secrets") {
        redact_list(secrets, |_| REDACTED.to_owned());
    }
    if let Some(Value::String(secret)) = entry(&mut table, "notify", "secret")
        && !secret.is_empty()
    {
        *secret = REDACTED.to_owned();
    }
    let text =
        toml::to_string(&table).map_err(|e| ConfigError::new("(top level)", e.to_string()))?;
    let file = match layers.file() {
        Some((path, origin)) => format!("{} ({origin}) < ", path.display()),
        None => String::new(),
    };
    Ok(format!("# layers: defaults < {file}environment\n{text}"))
}

fn entry<'t>(table: &'t mut Table, section: &str, key: &str) -> Option<&'t mut Value> {
    table.get_mut(section)?.as_table_mut()?.get_mut(key)
}

/// A list, or the environment's comma-separated string, with each non-empty entry replaced.
fn redact_list(value: &mut Value, redact: impl Fn(&str) -> String) {
    let entries: Vec<String> = match value {
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect(),
        Value::String(csv) => csv.split(',').map(str::to_owned).collect(),
        _ => return,
    };
    *value = Value::Array(
        entries
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| Value::String(redact(e)))
            .collect(),
    );
}

/// `postgres://user:secret@host/db?password=x` → the password parts redacted.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                        format!("{k}={REDACTED}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted_and_the_rest_kept() {
        assert_eq!(
            redact_url("postgres://u:p%40ss@db:5432/billing?sslmode=require&password=x"),
            "postgres://u:[redacted]@db:5432/billing?sslmode=require&password=[redacted]"
        );
        assert_eq!(
            redact_url("sqlite://data/billsync.db"),
            "sqlite://data/billsync.db"
        );
        assert_eq!(redact_url("postgres://u@db/x"), "postgres://u@db/x");
    }

    #[test]
    fn every_secret_is_redacted() {
        let vars: Vec<(String, String)> = [
            ("BILLSYNC_DATABASE__URL", "postgres://u:dbpassword@h/d"),
            (
                "BILLSYNC_API__KEYS",
                "first-key-0123456789,second-key-0123456789",
            ),
            (
                "BILLSYNC_API__TENANT_KEYS",
                "tenant-key-0123456789=acme|globex",
            ),
            ("BILLSYNC_STRIPE__API_KEY", "sk_test_supersecretvalue"),
            ("BILLSYNC_STRIPE__WEBHOOK_SECRETS", "whsec_alsosecret"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (_, shown) = super::super::Settings::load_shown_from(None, vars).unwrap();
        for secret in [
            "dbpassword",
            "first-key",
            "tenant-key",
            "supersecret",
            "alsosecret",
        ] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        for kept in [
            "acme|globex",
            "sk_test_[redacted]",
            "u:[redacted]@h/d",
            "poll_interval",
        ] {
            assert!(shown.contains(kept), "{kept} missing: {shown}");
        }
    }
}
