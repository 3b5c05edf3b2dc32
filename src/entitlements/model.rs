//! The entitlement read model: what a tenant's plan grants, computed from the catalog and the
//! mirror, later sources overriding earlier ones: catalog plans (by price or plan id, product id
//! or lookup key), product metadata, price (or plan) metadata, customer metadata, and the
//! customer's active entitlements.

use std::collections::BTreeMap;

/// The metadata prefix of feature keys: `billsync.<feature>`.
pub const METADATA_PREFIX: &str = "billsync.";

/// A feature's value in the catalog or in vendor metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureValue {
    Enabled(bool),
    Limit(i64),
    Unlimited,
}

impl FeatureValue {
    /// `true`, `false`, a non-negative integer, or `unlimited`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim() {
            "true" => Ok(Self::Enabled(true)),
            "false" => Ok(Self::Enabled(false)),
            "unlimited" => Ok(Self::Unlimited),
            other => other
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .map(Self::Limit)
                .ok_or_else(|| {
                    format!("`{other}` is not true, false, a non-negative integer or unlimited")
                }),
        }
    }

    /// The same from a TOML value (`true`, `10000`, `"unlimited"`).
    pub fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Boolean(b) => Ok(Self::Enabled(*b)),
            toml::Value::Integer(n) if *n >= 0 => Ok(Self::Limit(*n)),
            toml::Value::String(s) => Self::parse(s),
            other => Err(format!(
                "`{other}` is not true, false, a non-negative integer or unlimited"
            )),
        }
    }
}

pub use billsync_rules::Grant;

/// Features by name, as one source states them.
pub type Features = BTreeMap<String, FeatureValue>;

/// The `billsync.*` keys of a metadata object; invalid values are returned apart, never fatal.
pub fn metadata_features(metadata: &[(String, String)]) -> (Features, Vec<String>) {
    let mut features = Features::new();
    let mut invalid = Vec::new();
    for (key, raw) in metadata {
        let Some(name) = key.strip_prefix(METADATA_PREFIX) else {
            continue;
        };
        match FeatureValue::parse(raw) {
            Ok(v) => {
                features.insert(name.to_owned(), v);
            }
            Err(e) => invalid.push(format!("{key}: {e}")),
        }
    }
    (features, invalid)
}

/// Folds the sources in order (later wins) into grants; `meters` maps quota features to the
/// meter they count (by default, the meter of the same name).
pub fn grants(sources: &[Features], meter_of: impl Fn(&str) -> String) -> BTreeMap<String, Grant> {
    let mut merged = Features::new();
    for source in sources {
        for (name, value) in source {
            merged.insert(name.clone(), *value);
        }
    }
    merged
        .into_iter()
        .map(|(name, value)| {
            let grant = match value {
                FeatureValue::Enabled(enabled) => Grant::Boolean { enabled },
                FeatureValue::Limit(n) => Grant::Quota {
                    limit: Some(n),
                    meter: meter_of(&name),
                },
                FeatureValue::Unlimited => Grant::Quota {
                    limit: None,
                    meter: meter_of(&name),
                },
            };
            (name, grant)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_strictly() {
        assert_eq!(FeatureValue::parse("true"), Ok(FeatureValue::Enabled(true)));
        assert_eq!(FeatureValue::parse(" 5000 "), Ok(FeatureValue::Limit(5000)));
        assert_eq!(
            FeatureValue::parse("unlimited"),
            Ok(FeatureValue::Unlimited)
        );
        assert!(FeatureValue::parse("-1").is_err());
        assert!(FeatureValue::parse("lots").is_err());
    }

    #[test]
    fn metadata_keeps_only_billsync_keys_and_reports_bad_values() {
        let metadata = [
            ("billsync.api_calls", "50000"),
            ("billsync.sso", "true"),
            ("billsync.seats", "many"),
            ("other", "x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let (features, invalid) = metadata_features(&metadata);
        assert_eq!(features["api_calls"], FeatureValue::Limit(50000));
        assert_eq!(features["sso"], FeatureValue::Enabled(true));
        assert_eq!(invalid.len(), 1);
        assert!(invalid[0].contains("billsync.seats"));
    }

    #[test]
    fn later_sources_win() {
        let plan: Features = [
            ("api_calls".into(), FeatureValue::Limit(100)),
            ("sso".into(), FeatureValue::Enabled(false)),
        ]
        .into();
        let customer: Features = [("api_calls".into(), FeatureValue::Unlimited)].into();
        let grants = grants(&[plan, customer], |f| format!("m_{f}"));
        assert_eq!(
            grants["api_calls"],
            Grant::Quota {
                limit: None,
                meter: "m_api_calls".into()
            }
        );
        assert_eq!(grants["sso"], Grant::Boolean { enabled: false });
    }
}
