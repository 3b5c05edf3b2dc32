//! Bearer-key authentication for the product-facing API (`/v1/...`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use crate::state::AppState;

/// Which tenants the request's key may ask about; added to every authorised request.
#[derive(Debug, Clone, Default)]
pub struct KeyScope {
    /// `None`: every tenant.
    tenants: Option<Arc<Vec<String>>>,
    /// Names the key in logs without revealing it: the start of its SHA-256 digest.
    key_id: String,
}

impl KeyScope {
    /// The key in logs: `sha256:` and the first 12 hex digits of its digest, as `api.keys`
    /// may be written (`sha256:<hex>`), so an operator can tell which configured key acted.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Whether the key is limited to some tenants.
    pub fn is_limited(&self) -> bool {
        self.tenants.is_some()
    }

    /// The tenants a limited key may see; `None`: every tenant.
    pub fn only(&self) -> Option<&[String]> {
        self.tenants.as_deref().map(Vec::as_slice)
    }

    pub fn allows(&self, tenant_id: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == tenant_id))
    }
}

/// Lets the request through only with `Authorization: Bearer <key>` for a configured key.
pub async fn require_api_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let api = &state.settings.api;
    if api.key_digests.is_empty() && api.tenant_keys.is_empty() {
        return ApiError::unauthorized("no API keys are configured: set api.keys to open /v1")
            .into_response();
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented.filter(|k| !k.is_empty()) else {
        return ApiError::unauthorized("missing bearer key: send Authorization: Bearer <key>")
            .into_response();
    };
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let key_id = format!("sha256:{}", &hex::encode(digest)[..12]);
    let scope = if key_matches(&digest, api.key_digests.iter()) {
        KeyScope {
            tenants: None,
            key_id,
        }
    } else if let Some((_, tenants)) = api
        .tenant_keys
        .iter()
        .find(|(d, _)| key_matches(&digest, std::iter::once(d)))
    {
        KeyScope {
            tenants: Some(Arc::new(tenants.clone())),
            key_id,
        }
    } else {
        return ApiError::unauthorized("the bearer key is not valid").into_response();
    };
    if api.rate_limit > 0
        && let Err(wait_secs) = state.key_limiter.take(&digest, api.rate_limit)
    {
        let mut response = ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this key may make {} requests a second (api.rate_limit); retry after {wait_secs} s",
                api.rate_limit
            ),
        )
        .into_response();
        response.headers_mut().insert(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from(wait_secs),
        );
        return response;
    }
    // A key scoped to some tenants learns nothing of the others on any tenant route, before
    // the request's body is even read.
    if scope.is_limited() {
        use axum::extract::FromRequestParts;
        let (mut parts, body) = request.into_parts();
        if let Ok(params) = axum::extract::RawPathParams::from_request_parts(&mut parts, &()).await
            && let Some((_, tenant)) = params.iter().find(|(name, _)| *name == "tenant_id")
            && !scope.allows(tenant)
        {
            return ApiError::not_found("tenant_not_found", format!("no tenant `{tenant}`"))
                .into_response();
        }
        request = Request::from_parts(parts, body);
    }
    request.extensions_mut().insert(scope);
    next.run(request).await
}

/// A token bucket per API key: `rate` tokens a second, at most `rate` saved up.
#[derive(Debug, Default)]
pub struct KeyLimiter {
    buckets: std::sync::Mutex<std::collections::HashMap<[u8; 32], (f64, std::time::Instant)>>,
}

impl KeyLimiter {
    /// Takes a token for the key, or says how many whole seconds until there is one.
    pub fn take(&self, key: &[u8; 32], rate: u32) -> Result<(), u64> {
        let rate = f64::from(rate);
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = buckets.entry(*key).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// Compares the digest with every given digest, in constant time, without stopping early.
fn key_matches<'a>(digest: &[u8; 32], known: impl Iterator<Item = &'a [u8; 32]>) -> bool {
    let mut matched = Choice::from(0);
    for known in known {
        matched |= digest.ct_eq(known);
    }
    matched.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::key_digest;

    #[test]
    fn only_configured_keys_match() {
        let digests = [
            key_digest("first-key-0123456789").unwrap(),
            key_digest("second-key-0123456789").unwrap(),
        ];
        let of = |k: &str| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
        assert!(key_matches(&of("second-key-0123456789"), digests.iter()));
        assert!(!key_matches(&of("second-key-012345678"), digests.iter()));
        assert!(!key_matches(&of(""), digests.iter()));
    }
}
