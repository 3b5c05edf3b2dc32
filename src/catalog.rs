//! The plan catalog file (`catalog.path`, default `config/plans.toml`): meters now; features and
//! plans are read by entitlements. Like the configuration, the file is strict: a key billsync
//! does not know, in any table, refuses the whole file (at start and on reload), so that a typo
//! is never a silently missing quota.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::config::parse_duration;

/// How a meter folds its events into one figure per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Sum,
    Count,
    Max,
    /// Distinct values of the meter's `property`.
    UniqueCount,
    /// The value of the latest event.
    Last,
}

impl Aggregation {
    /// Its name in the catalog (and in the database's `billsync_usage_figure`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sum => "sum",
            Self::Count => "count",
            Self::Max => "max",
            Self::UniqueCount => "unique_count",
            Self::Last => "last",
        }
    }

    /// Whether the meter's figure for a period is one value over the whole period (pushed as
    /// the period's running value), rather than a sum of its events' parts (pushed as deltas).
    pub fn is_period_value(self) -> bool {
        matches!(self, Self::Max | Self::UniqueCount | Self::Last)
    }
}

/// A meter: what usage events name in `meter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub name: String,
    pub aggregation: Aggregation,
    /// The Stripe meter's `event_name`; `None`: counted locally, never pushed.
    pub stripe_event_name: Option<String>,
    /// How old an event may be when it arrives.
    pub late_window: Duration,
    /// Whether quantities below zero are accepted (corrections).
    pub allow_negative: bool,
    /// For `unique_count`: the event property whose distinct values are counted.
    pub property: Option<String>,
    /// The Stripe prices (or plans) whose invoice lines bill this meter, for reconciliation.
    pub stripe_prices: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub meters: BTreeMap<String, Meter>,
    /// The file's `[features]` and `[plans]` tables, kept for entitlements.
    pub features: toml::Table,
    /// The credit-priced features (`credits_per_unit`, `credit_unit`), checked against the
    /// meters.
    pub credits: BTreeMap<String, crate::credits::CreditFeature>,
    pub plans: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    meters: BTreeMap<String, RawMeter>,
    #[serde(default)]
    features: toml::Table,
    #[serde(default)]
    plans: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeter {
    aggregation: Aggregation,
    stripe_event_name: Option<String>,
    late_window: Option<String>,
    #[serde(default)]
    allow_negative: bool,
    property: Option<String>,
    #[serde(default)]
    stripe_prices: Vec<String>,
}

/// Why the catalog could not be loaded; names the file and the entry.
#[derive(Debug, thiserror::Error)]
#[error("catalog {path}: {message}")]
pub struct CatalogError {
    pub path: String,
    pub message: String,
}

/// How late an event may arrive when a meter does not say.
pub const DEFAULT_LATE_WINDOW: Duration = Duration::from_secs(24 * 3600);

impl Catalog {
    /// Loads the catalog; a missing file is an empty catalog only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<Self, CatalogError> {
        let error = |message: String| CatalogError {
            path: path.display().to_string(),
            message,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                tracing::warn!(path = %path.display(), "no plan catalog file: no meters are defined");
                return Ok(Self::default());
            }
            Err(e) => return Err(error(format!("cannot read: {e}"))),
        };
        Self::parse(&text).map_err(error)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        check_keys(&table)?;
        let raw = RawCatalog::deserialize(table).map_err(|e| one_line(&e.to_string()))?;
        let mut meters = BTreeMap::new();
        for (name, m) in raw.meters {
            if name.is_empty() || name.len() > 64 {
                return Err(format!("meter name `{name}` must be 1 to 64 characters"));
            }
            let late_window = match &m.late_window {
                Some(text) => parse_duration(text).ok_or_else(|| {
                    format!("meters.{name}.late_window: `{text}` is not a duration")
                })?,
                None => DEFAULT_LATE_WINDOW,
            };
            if m.aggregation == Aggregation::UniqueCount && m.property.is_none() {
                return Err(format!(
                    "meters.{name}: unique_count needs `property`, the event property to count"
                ));
            }
            meters.insert(
                name.clone(),
                Meter {
                    name,
                    aggregation: m.aggregation,
                    stripe_event_name: m.stripe_event_name.filter(|e| !e.is_empty()),
                    late_window,
                    allow_negative: m.allow_negative,
                    property: m.property,
                    stripe_prices: m.stripe_prices,
                },
            );
        }
        let credits = crate::credits::features_of(&raw.features, &meters)?;
        Ok(Self {
            meters,
            credits,
            features: raw.features,
            plans: raw.plans,
        })
    }
}

/// The keys each table of the file may hold.
const TOP_LEVEL_KEYS: &[&str] = &["meters", "features", "plans"];
const METER_KEYS: &[&str] = &[
    "aggregation",
    "stripe_event_name",
    "late_window",
    "allow_negative",
    "property",
    "stripe_prices",
];
const FEATURE_KEYS: &[&str] = &["meter", "fail_open", "credits_per_unit", "credit_unit"];
const PLAN_KEYS: &[&str] = &["features"];

/// Refuses the first key no table may hold, naming the table and the key:
/// `[features.api_calls]: unknown key "metr" (valid keys: meter, fail_open, ...)`.
fn check_keys(file: &toml::Table) -> Result<(), String> {
    fn unknown(table: &str, key: &str, valid: &[&str]) -> String {
        format!(
            "[{table}]: unknown key \"{key}\" (valid keys: {})",
            valid.join(", ")
        )
    }
    for key in file.keys() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "unknown table [{key}] (valid tables: {})",
                TOP_LEVEL_KEYS.join(", ")
            ));
        }
    }
    for (section, valid) in [
        ("meters", METER_KEYS),
        ("features", FEATURE_KEYS),
        ("plans", PLAN_KEYS),
    ] {
        let Some(entries) = file.get(section) else {
            continue;
        };
        let entries = entries
            .as_table()
            .ok_or_else(|| format!("[{section}] must be a table"))?;
        for (name, entry) in entries {
            let table = format!("{section}.{}", key_name(name));
            let entry = entry
                .as_table()
                .ok_or_else(|| format!("[{table}] must be a table"))?;
            if let Some(key) = entry.keys().find(|k| !valid.contains(&k.as_str())) {
                return Err(unknown(&table, key, valid));
            }
        }
    }
    Ok(())
}

/// A table name as the file would write it: bare when it can be, quoted otherwise.
fn key_name(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// The TOML parser's message, which spans lines (a caret under the source), as one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "|" && !l.starts_with('|') && !l.contains(" | "))
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalog_parses() {
        let catalog = Catalog::parse(include_str!("../config/plans.toml")).unwrap();
        assert!(catalog.meters.contains_key("api_calls"));
    }

    #[test]
    fn meters_are_checked() {
        let bad = "[meters.users]\naggregation = \"unique_count\"\n";
        assert!(Catalog::parse(bad).unwrap_err().contains("property"));
        let bad = "[meters.x]\naggregation = \"median\"\n";
        assert!(Catalog::parse(bad).is_err());
        let bad = "[meters.x]\naggregation = \"sum\"\nlate_window = \"soon\"\n";
        assert!(Catalog::parse(bad).unwrap_err().contains("late_window"));
        let ok = Catalog::parse("[meters.x]\naggregation = \"max\"\n").unwrap();
        assert_eq!(ok.meters["x"].late_window, DEFAULT_LATE_WINDOW);
        assert_eq!(ok.meters["x"].stripe_event_name, None);
    }

    /// The message `Catalog::load` gives for a file `plans.toml` holding `text`.
    fn refusal(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plans.toml");
        std::fs::write(&path, text).unwrap();
        let message = Catalog::load(&path, true).unwrap_err().to_string();
        message.replace(&path.display().to_string(), "plans.toml")
    }

    #[test]
    fn an_unknown_key_anywhere_is_refused_naming_the_file_the_table_and_the_key() {
        assert_eq!(
            refusal("[features.api_calls]\nmetr = \"api_calls\"\n"),
            "catalog plans.toml: [features.api_calls]: unknown key \"metr\" \
             (valid keys: meter, fail_open, credits_per_unit, credit_unit)"
        );
        assert_eq!(
            refusal("[plans.free]\nfeatures = { api_calls = 100 }\nprice = \"price_1\"\n"),
            "catalog plans.toml: [plans.free]: unknown key \"price\" (valid keys: features)"
        );
        assert_eq!(
            refusal("[plans.\"price 1\"]\nfeature = { sso = true }\n"),
            "catalog plans.toml: [plans.\"price 1\"]: unknown key \"feature\" \
             (valid keys: features)"
        );
        assert_eq!(
            refusal("[meters.calls]\naggregation = \"sum\"\nlate = \"1h\"\n"),
            "catalog plans.toml: [meters.calls]: unknown key \"late\" (valid keys: aggregation, \
             stripe_event_name, late_window, allow_negative, property, stripe_prices)"
        );
        assert_eq!(
            refusal("[feature.api_calls]\nmeter = \"api_calls\"\n"),
            "catalog plans.toml: unknown table [feature] (valid tables: meters, features, plans)"
        );
        assert_eq!(
            refusal("[features]\napi_calls = 1\n"),
            "catalog plans.toml: [features.api_calls] must be a table"
        );
    }

    #[test]
    fn credit_priced_features_are_exact_and_checked_at_load() {
        let meters =
            "[meters.gpu_seconds]\naggregation = \"sum\"\n[meters.peak]\naggregation = \"max\"\n";
        let with = |feature: &str| Catalog::parse(&format!("{meters}{feature}"));
        let ok = with("[features.gpu]\nmeter = \"gpu_seconds\"\ncredits_per_unit = \"0.0167\"\ncredit_unit = \"usd\"\n").unwrap();
        let gpu = &ok.credits["gpu"];
        assert_eq!(
            (gpu.meter.as_str(), gpu.unit.as_str()),
            ("gpu_seconds", "usd")
        );
        assert_eq!(gpu.per_unit.to_string(), "0.0167");
        for (feature, refusal) in [
            (
                "[features.gpu]\nmeter = \"gpu_seconds\"\ncredits_per_unit = 0.0167\ncredit_unit = \"usd\"\n",
                "so it stays exact",
            ),
            (
                "[features.gpu]\nmeter = \"gpu_seconds\"\ncredits_per_unit = \"-1\"\ncredit_unit = \"usd\"\n",
                "positive decimal",
            ),
            (
                "[features.gpu]\nmeter = \"gpu_seconds\"\ncredits_per_unit = \"1\"\n",
                "needs credit_unit",
            ),
            (
                "[features.gpu]\nmeter = \"gpu_seconds\"\ncredit_unit = \"usd\"\n",
                "needs credits_per_unit",
            ),
            (
                "[features.gpu]\nmeter = \"gpu_seconds\"\ncredits_per_unit = \"1\"\ncredit_unit = \"USD\"\n",
                "lowercase",
            ),
            (
                "[features.gpu]\nmeter = \"peak\"\ncredits_per_unit = \"1\"\ncredit_unit = \"usd\"\n",
                "aggregation = \"sum\"",
            ),
            (
                "[features.gpu]\nmeter = \"nope\"\ncredits_per_unit = \"1\"\ncredit_unit = \"usd\"\n",
                "not in [meters]",
            ),
            (
                "[features.a]\nmeter = \"gpu_seconds\"\ncredits_per_unit = \"1\"\ncredit_unit = \"usd\"\n\
              [features.b]\nmeter = \"gpu_seconds\"\ncredits_per_unit = \"2\"\ncredit_unit = \"usd\"\n",
                "already burns",
            ),
        ] {
            let message = with(feature).unwrap_err();
            assert!(message.contains(refusal), "{message}");
        }
    }

    #[test]
    fn other_errors_stay_on_one_line() {
        let message = refusal("[meters.x]\naggregation = \"median\"\n");
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("median"), "{message}");
        let message = refusal("[meters.x\n");
        assert!(!message.contains('\n'), "{message}");
    }
}
