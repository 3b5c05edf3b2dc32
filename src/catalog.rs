//! The plan catalog file (`catalog.path`, default `config/plans.toml`): meters now; features and
//! plans are read by entitlements.

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
        let raw: RawCatalog = toml::from_str(text).map_err(|e| e.to_string())?;
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
        Ok(Self {
            meters,
            features: raw.features,
            plans: raw.plans,
        })
    }
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
}
