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

/// An RFC 3339 time or a date (`YYYY-MM-DD`, midnight UTC) as Unix milliseconds.
pub fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.timestamp_millis());
    }
    let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_dates_parse() {
        assert_eq!(parse_time("1970-01-02"), Some(86_400_000));
        assert_eq!(parse_time("1970-01-01T00:00:01.500Z"), Some(1_500));
        assert_eq!(parse_time("yesterday"), None);
    }
}
