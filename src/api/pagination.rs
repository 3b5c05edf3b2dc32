//! Cursor pagination: `?limit=1..100&cursor=<opaque>`, newest first.

use std::collections::HashMap;

use super::error::ApiError;

pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;

/// A page request: how many, and the position after which to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u32,
    /// `(created, id)` of the last item of the previous page.
    pub before: Option<(i64, String)>,
}

/// The `limit` query parameter: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
pub fn limit_from_query(query: &HashMap<String, String>) -> Result<u32, ApiError> {
    let Some(raw) = query.get("limit") else {
        return Ok(DEFAULT_LIMIT);
    };
    raw.parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request("invalid_value", format!("limit must be 1 to {MAX_LIMIT}"))
                .with_field("limit")
        })
}

impl PageRequest {
    pub fn from_query(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let limit = limit_from_query(query)?;
        let before = match query.get("cursor") {
            None => None,
            Some(raw) => Some(decode(raw).ok_or_else(|| {
                ApiError::bad_request("invalid_value", "cursor is not one this API gave out")
                    .with_field("cursor")
            })?),
        };
        Ok(Self { limit, before })
    }

    /// Fetch one more than asked, to know whether another page follows.
    pub fn fetch_limit(&self) -> u32 {
        self.limit + 1
    }

    /// Trims the extra item and returns the cursor of the next page, if there is one.
    pub fn finish<T>(
        &self,
        items: &mut Vec<T>,
        key: impl Fn(&T) -> (i64, String),
    ) -> Option<String> {
        if items.len() <= self.limit as usize {
            return None;
        }
        items.truncate(self.limit as usize);
        items.last().map(|last| encode(&key(last)))
    }
}

pub fn encode((created, id): &(i64, String)) -> String {
    format!("{created}_{id}")
}

fn decode(raw: &str) -> Option<(i64, String)> {
    let (created, id) = raw.split_once('_')?;
    Some((created.parse().ok()?, id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_limits_are_bounded() {
        let key = (1_700_000_000, "in_1_x".to_owned());
        assert_eq!(decode(&encode(&key)), Some(key));
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            PageRequest::from_query(&q(&[])).unwrap().limit,
            DEFAULT_LIMIT
        );
        assert_eq!(
            PageRequest::from_query(&q(&[("limit", "0")]))
                .unwrap_err()
                .field
                .as_deref(),
            Some("limit")
        );
        assert_eq!(
            PageRequest::from_query(&q(&[("limit", "101")]))
                .unwrap_err()
                .field
                .as_deref(),
            Some("limit")
        );
        assert_eq!(
            PageRequest::from_query(&q(&[("cursor", "zzz")]))
                .unwrap_err()
                .field
                .as_deref(),
            Some("cursor")
        );
    }
}
