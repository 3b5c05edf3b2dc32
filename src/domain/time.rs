//! Times as the API shows them.

use chrono::{DateTime, SecondsFormat, Utc};

/// Unix milliseconds (billsync's own times) as RFC 3339, to the millisecond, UTC.
pub fn rfc3339(unix_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Unix seconds (the vendor's times) as RFC 3339.
pub fn rfc3339_secs(unix_secs: i64) -> String {
    rfc3339(unix_secs.saturating_mul(1000))
}
