//! Fuzz target: the `Stripe-Signature` header parser and verifier,
//! `billsync::webhook::signature::verify` (what `POST /webhooks/stripe` runs first).
//!
//! Each input is used twice:
//!
//! 1. As a raw request: the bytes up to the first `\n` are the header (lossily UTF-8), the rest
//!    is the body. It is verified against fixed secrets on a grid of clocks and tolerances,
//!    extremes included, and with no header and with no secret.
//! 2. Through `arbitrary`, as a structured case: secrets, which one signs, a body, a timestamp,
//!    a clock skew, extra header parts, whitespace and a tampering.
//!
//! Properties checked (a violation aborts with a crash artifact, see docs/fuzzing.md):
//!
//! - `verify` never panics, whatever the header, body, secrets, tolerance and clock.
//! - It is deterministic, and its refusals are classified: `NoSecrets` exactly when no secret is
//!   configured, else `Missing` exactly when there is no header.
//! - Soundness: an `Ok` hands back the body it was given, its timestamp is one of the header's
//!   `t` values and within the tolerance of the clock, and one of the header's `v1` values is the
//!   HMAC-SHA256 of that timestamp and body under one of the configured secrets.
//! - Completeness: a header made by `signature::header(secret, t, body)` verifies, with `t`,
//!   whenever that secret is among those configured and the clock is within the tolerance, even
//!   with other `v1`, `v0`, unknown or bare parts and whitespace around the parts.
//! - Integrity: that header no longer verifies (`Mismatch`) once a byte of the body is changed,
//!   inserted or removed, once its `t` is changed, or under secrets none of which is the signer;
//!   and it is `Stale` once the clock is past the tolerance.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use billsync::config::Secret;
use billsync::webhook::signature::{self, SignatureError, verify};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// The secret the seed corpus is signed with (see fuzz/corpus/stripe_signature/).
const SEED_SECRET: &str = "whsec_billsync_fuzz";
/// The clock the seed corpus is signed for.
const SEED_NOW: i64 = 1_700_000_000;

const CLOCKS: [i64; 6] = [SEED_NOW, 0, -1, 1, i64::MIN, i64::MAX];
const TOLERANCES: [i64; 6] = [300, 0, -1, 1, i64::MIN, i64::MAX];

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &data[data.len()..]),
    };
    let header = String::from_utf8_lossy(header);

    // 1. The raw request against fixed secrets (the seeds' signer among them, a rotated one, an
    //    empty one, and one longer than the HMAC block).
    let fixed = [
        Secret::new("whsec_rotated_old"),
        Secret::new(SEED_SECRET),
        Secret::new(""),
        Secret::new("k".repeat(100)),
    ];
    for now in CLOCKS {
        for tolerance in TOLERANCES {
            let _ = check(Some(&header), body, &fixed, tolerance, now);
        }
    }
    let _ = check(None, body, &fixed, 300, SEED_NOW);
    let _ = check(Some(&header), body, &[], 300, SEED_NOW);

    // 2. The structured case.
    if let Ok(case) = Case::arbitrary(&mut Unstructured::new(data)) {
        // The raw header under the case's own secrets and clock.
        let secrets: Vec<Secret> = case
            .secrets
            .iter()
            .map(|s| Secret::new(s.as_str()))
            .collect();
        let _ = check(Some(&header), body, &secrets, case.tolerance, case.now);
        round_trip(&case);
    }
});

#[derive(Arbitrary, Debug)]
struct Case {
    secrets: Vec<String>,
    signer: u8,
    body: Vec<u8>,
    timestamp: i64,
    skew: i64,
    tolerance: i64,
    now: i64,
    extras: Vec<(u8, Extra)>,
    pad: (Pad, Pad),
    tamper: Tamper,
    stale_by: u32,
}

/// A header part other than the genuine `t` and `v1`.
#[derive(Arbitrary, Debug)]
enum Extra {
    /// Another `v1`: another secret's, or a stale one.
    V1([u8; 32]),
    /// The legacy scheme, ignored.
    V0([u8; 32]),
    /// A `v1` that is not 32 bytes of hex.
    V1Text(String),
    /// A future scheme or unknown key (never `t` or `v1`).
    Other(String, String),
    /// A part with no `=`.
    Bare(String),
    Empty,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pad {
    None,
    Space,
    Tab,
    Spaces,
}

impl Pad {
    fn as_str(self) -> &'static str {
        match self {
            Pad::None => "",
            Pad::Space => " ",
            Pad::Tab => "\t",
            Pad::Spaces => "  ",
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Tamper {
    Flip { index: usize, mask: u8 },
    Insert { index: usize, byte: u8 },
    Remove { index: usize },
}

impl Tamper {
    /// The body changed by one byte, or `None` when there is no byte to change.
    fn apply(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut out = body.to_vec();
        match *self {
            Tamper::Flip { index, mask } => {
                let len = out.len();
                if len == 0 {
                    return None;
                }
                out[index % len] ^= mask.max(1);
            }
            Tamper::Insert { index, byte } => out.insert(index % (body.len() + 1), byte),
            Tamper::Remove { index } => {
                if out.is_empty() {
                    return None;
                }
                let len = out.len();
                out.remove(index % len);
            }
        }
        Some(out)
    }
}

fn round_trip(case: &Case) {
    let mut secrets: Vec<Secret> = case
        .secrets
        .iter()
        .map(|s| Secret::new(s.as_str()))
        .collect();
    if secrets.is_empty() {
        secrets.push(Secret::new(SEED_SECRET));
    }
    let signer = secrets[usize::from(case.signer) % secrets.len()]
        .expose()
        .to_owned();
    let body = case.body.as_slice();
    let t = case.timestamp;
    let tolerance = case.tolerance.saturating_abs();
    let now = t.saturating_add(case.skew.clamp(-tolerance, tolerance));

    let genuine = signature::header(&signer, t, body);
    let v1 = hex::encode(signature::sign(&signer, t, body));
    assert_eq!(
        genuine,
        format!("t={t},v1={v1}"),
        "header() is `t=<t>,v1=<hex>`"
    );
    let header = with_extras(&genuine, case);

    // Completeness.
    assert_eq!(
        check(Some(&header), body, &secrets, tolerance, now),
        Ok(t),
        "a header signed with a configured secret must verify: {header:?} {case:?}"
    );

    // Integrity: the body.
    if let Some(tampered) = case.tamper.apply(body) {
        assert_ne!(tampered, body);
        let result = check(Some(&header), &tampered, &secrets, tolerance, now);
        if !has_genuine_v1(&header, &tampered, &secrets, t) {
            assert_eq!(
                result,
                Err(SignatureError::Mismatch),
                "a changed body must not verify: {tampered:?} {case:?}"
            );
        }
    }

    // Integrity: the timestamp.
    let other_t = if t == i64::MAX { t - 1 } else { t + 1 };
    let moved = with_extras(&format!("t={other_t},v1={v1}"), case);
    let result = check(Some(&moved), body, &secrets, tolerance, now);
    if !within(now, other_t, tolerance) {
        assert_eq!(result, Err(SignatureError::Stale), "{case:?}");
    } else if !has_genuine_v1(&moved, body, &secrets, other_t) {
        assert_eq!(
            result,
            Err(SignatureError::Mismatch),
            "a changed timestamp must not verify: {case:?}"
        );
    }

    // Integrity: the secret. Secrets that are the same HMAC key as the signer's (HMAC pads keys
    // with zeros and hashes keys longer than its block) are not "other" secrets.
    let others: Vec<Secret> = secrets
        .iter()
        .filter(|s| hmac_key(s.expose()) != hmac_key(&signer))
        .cloned()
        .collect();
    if !others.is_empty() {
        let result = check(Some(&header), body, &others, tolerance, now);
        if !has_genuine_v1(&header, body, &others, t) {
            assert_eq!(
                result,
                Err(SignatureError::Mismatch),
                "another secret must not verify: {case:?}"
            );
        }
    }

    // Staleness, both ways, where the clock is representable.
    let past = i128::from(tolerance) + 1 + i128::from(case.stale_by);
    for late in [i128::from(t) + past, i128::from(t) - past] {
        if let Ok(late) = i64::try_from(late) {
            assert_eq!(
                check(Some(&header), body, &secrets, tolerance, late),
                Err(SignatureError::Stale),
                "a clock past the tolerance must refuse: {case:?}"
            );
        }
    }
}

/// The genuine `t=..,v1=..` header with the case's extra parts spliced in and padded.
fn with_extras(genuine: &str, case: &Case) -> String {
    let mut parts: Vec<String> = genuine.split(',').map(str::to_owned).collect();
    for (position, extra) in &case.extras {
        let part = match extra {
            Extra::V1(bytes) => format!("v1={}", hex::encode(bytes)),
            Extra::V0(bytes) => format!("v0={}", hex::encode(bytes)),
            Extra::V1Text(text) => format!("v1={}", text.replace(',', "")),
            Extra::Other(key, value) => {
                format!("x{}={}", key.replace(',', ""), value.replace(',', ""))
            }
            Extra::Bare(text) => text.replace([',', '='], ""),
            Extra::Empty => String::new(),
        };
        let at = usize::from(*position) % (parts.len() + 1);
        parts.insert(at, part);
    }
    let (before, after) = (case.pad.0.as_str(), case.pad.1.as_str());
    parts
        .iter()
        .map(|p| format!("{before}{p}{after}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `verify` and checks what must hold for any input; returns the verified timestamp.
fn check(
    header: Option<&str>,
    body: &[u8],
    secrets: &[Secret],
    tolerance: i64,
    now: i64,
) -> Result<i64, SignatureError> {
    let first = verify(header, body, secrets, tolerance, now).map(|v| {
        assert!(
            std::ptr::eq(v.body, body),
            "Verified must carry the body it was given"
        );
        v.timestamp
    });
    let second = verify(header, body, secrets, tolerance, now).map(|v| v.timestamp);
    assert_eq!(first, second, "verify is not deterministic");

    if secrets.is_empty() {
        assert_eq!(first, Err(SignatureError::NoSecrets));
    } else if header.is_none() {
        assert_eq!(first, Err(SignatureError::Missing));
    } else {
        assert!(!matches!(
            first,
            Err(SignatureError::NoSecrets | SignatureError::Missing)
        ));
    }

    if let (Ok(t), Some(header)) = (first, header) {
        assert!(
            within(now, t, tolerance),
            "accepted a timestamp {t} outside {tolerance}s of {now}"
        );
        assert!(
            parts(header).any(|(k, v)| k == "t" && v.parse::<i64>() == Ok(t)),
            "accepted timestamp {t} is not the header's"
        );
        assert!(
            has_genuine_v1(header, body, secrets, t),
            "accepted a header with no genuine v1: {header:?}"
        );
    }
    first
}

/// `|now - t| <= tolerance`, computed without overflow.
fn within(now: i64, t: i64, tolerance: i64) -> bool {
    (i128::from(now) - i128::from(t)).abs() <= i128::from(tolerance)
}

/// The header's `key=value` parts, as Stripe's format has them (parts are trimmed).
fn parts(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split(',').filter_map(|p| p.trim().split_once('='))
}

/// Whether one of the header's `v1` values really signs `t.body` under one of the secrets.
fn has_genuine_v1(header: &str, body: &[u8], secrets: &[Secret], t: i64) -> bool {
    let expected: Vec<[u8; 32]> = secrets
        .iter()
        .map(|s| signature::sign(s.expose(), t, body))
        .collect();
    parts(header)
        .filter(|(k, _)| *k == "v1")
        .filter_map(|(_, v)| hex::decode(v).ok())
        .any(|sig| expected.iter().any(|e| e.as_slice() == sig.as_slice()))
}

/// The key HMAC-SHA256 really uses: keys longer than the 64-byte block are hashed, shorter
/// ones padded with zeros (so "k" and "k\0" are the same key).
fn hmac_key(secret: &str) -> Vec<u8> {
    let mut key = if secret.len() > 64 {
        Sha256::digest(secret.as_bytes()).to_vec()
    } else {
        secret.as_bytes().to_vec()
    };
    while key.last() == Some(&0) {
        key.pop();
    }
    key
}
