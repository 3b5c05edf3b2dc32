//! Bearer-key authentication for the product-facing API (`/v1/...`).

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use crate::app::AppState;

/// Lets the request through only with `Authorization: Bearer <key>` for a configured key.
pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let digests = &state.settings.api.key_digests;
    if digests.is_empty() {
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
    if !key_matches(presented, digests) {
        return ApiError::unauthorized("the bearer key is not valid").into_response();
    }
    next.run(request).await
}

/// Compares the key's digest with every configured digest, in constant time, without stopping early.
fn key_matches(presented: &str, digests: &[[u8; 32]]) -> bool {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut matched = Choice::from(0);
    for known in digests {
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
        let digests = vec![
            key_digest("first-key-0123456789").unwrap(),
            key_digest("second-key-0123456789").unwrap(),
        ];
        assert!(key_matches("second-key-0123456789", &digests));
        assert!(!key_matches("second-key-012345678", &digests));
        assert!(!key_matches("", &digests));
    }
}
