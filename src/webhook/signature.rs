//! Stripe webhook signatures: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`, each `v1`
//! an HMAC-SHA256 of `"{t}.{raw body}"` under a signing secret. Any configured secret may match
//! (rotation); the comparison takes the same time whether it matches or not.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// A body whose signature checked out. Only [`verify`] makes one.
#[derive(Debug)]
pub struct Verified<'a> {
    pub body: &'a [u8],
    pub timestamp: i64,
}

/// Why a signature was refused; `reason` labels it in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no webhook signing secret is configured")]
    NoSecrets,
    #[error("missing Stripe-Signature header")]
    Missing,
    #[error("malformed Stripe-Signature header")]
    Malformed,
    #[error("signature timestamp is outside the tolerance")]
    Stale,
    #[error("no signature matches a configured secret")]
    Mismatch,
}

impl SignatureError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoSecrets => "no_secrets",
            Self::Missing => "missing_signature",
            Self::Malformed => "malformed_signature",
            Self::Stale => "stale_timestamp",
            Self::Mismatch => "bad_signature",
        }
    }
}

pub fn verify<'a>(
    header: Option<&str>,
    body: &'a [u8],
    secrets: &[Secret],
    tolerance_secs: i64,
    now_secs: i64,
) -> Result<Verified<'a>, SignatureError> {
    if secrets.is_empty() {
        return Err(SignatureError::NoSecrets);
    }
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" => {
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed)?,
                )
            }
            "v1" => signatures.extend(hex::decode(value).ok().filter(|s| s.len() == 32)),
            _ => {} // v0 and future schemes are ignored, as Stripe's libraries do.
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // In i128: `t` is the sender's, and `now - t` can overflow i64.
    if (i128::from(now_secs) - i128::from(timestamp)).abs() > i128::from(tolerance_secs) {
        return Err(SignatureError::Stale);
    }
    let mut matched = subtle::Choice::from(0);
    for secret in secrets {
        let expected = sign(secret.expose(), timestamp, body);
        for signature in &signatures {
            matched |= expected.as_slice().ct_eq(signature.as_slice());
        }
    }
    if bool::from(matched) {
        Ok(Verified { body, timestamp })
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The `v1` signature of `body` at `timestamp` (also used by tests and benchmarks to sign).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// A complete `Stripe-Signature` header value.
pub fn header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(sign(secret, timestamp, body))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn secrets(list: &[&str]) -> Vec<Secret> {
        list.iter().map(|s| Secret::new(*s)).collect()
    }

    #[test]
    fn a_signature_from_any_configured_secret_is_accepted() {
        let body = br#"{"id":"evt_1"}"#;
        let old = header("whsec_old", NOW, body);
        let new = header("whsec_new", NOW, body);
        let both = secrets(&["whsec_old", "whsec_new"]);
        assert!(verify(Some(&old), body, &both, 300, NOW).is_ok());
        assert!(verify(Some(&new), body, &both, 300, NOW).is_ok());
        // Stripe sends one v1 per active secret during its own rotation.
        let two = format!("{old},v1={}", hex::encode(sign("whsec_new", NOW, body)));
        assert!(verify(Some(&two), body, &secrets(&["whsec_new"]), 300, NOW).is_ok());
    }

    #[test]
    fn tampering_staleness_and_garbage_are_refused() {
        let body = br#"{"id":"evt_1"}"#;
        let good = header("whsec_a", NOW, body);
        let s = secrets(&["whsec_a"]);
        assert_eq!(
            verify(Some(&good), b"{\"id\":\"evt_2\"}", &s, 300, NOW).unwrap_err(),
            SignatureError::Mismatch
        );
        assert_eq!(
            verify(Some(&good), body, &secrets(&["whsec_b"]), 300, NOW).unwrap_err(),
            SignatureError::Mismatch
        );
        assert_eq!(
            verify(Some(&good), body, &s, 300, NOW + 301).unwrap_err(),
            SignatureError::Stale
        );
        assert_eq!(
            verify(Some(&good), body, &s, 300, NOW - 301).unwrap_err(),
            SignatureError::Stale
        );
        assert!(verify(Some(&good), body, &s, 300, NOW + 300).is_ok());
        assert_eq!(
            verify(None, body, &s, 300, NOW).unwrap_err(),
            SignatureError::Missing
        );
        assert_eq!(
            verify(Some("v1=abc"), body, &s, 300, NOW).unwrap_err(),
            SignatureError::Malformed
        );
        assert_eq!(
            verify(Some("t=x,v1=00"), body, &s, 300, NOW).unwrap_err(),
            SignatureError::Malformed
        );
        assert_eq!(
            verify(Some(&format!("t={NOW}")), body, &s, 300, NOW).unwrap_err(),
            SignatureError::Malformed
        );
        assert_eq!(
            verify(Some(&good), body, &[], 300, NOW).unwrap_err(),
            SignatureError::NoSecrets
        );
    }

    /// Found by `fuzz/fuzz_targets/stripe_signature.rs`: `now - t` overflowed i64, a panic with
    /// overflow checks; in release `t = now - 2^63` wrapped to `i64::MIN`, whose `abs()` is
    /// negative and so passed the tolerance check.
    #[test]
    fn extreme_timestamps_are_stale_not_an_overflow() {
        let body = br#"{"id":"evt_1"}"#;
        let s = secrets(&["whsec_a"]);
        for t in [i64::MIN, i64::MIN + NOW, i64::MAX] {
            let signed = header("whsec_a", t, body);
            assert_eq!(
                verify(Some(&signed), body, &s, 300, NOW).unwrap_err(),
                SignatureError::Stale,
                "t={t}"
            );
        }
        let good = header("whsec_a", NOW, body);
        for now in [i64::MIN, i64::MAX] {
            assert_eq!(
                verify(Some(&good), body, &s, i64::MAX, now).is_ok(),
                now == i64::MAX,
                "now={now}"
            );
        }
    }
}
