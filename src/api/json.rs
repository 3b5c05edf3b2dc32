//! `ApiJson<T>`: a JSON body extractor whose every rejection is an [`ApiError`] naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A request body parsed as JSON after checking its content type and size.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE)
            } else {
                ApiError::bad_request("invalid_body", rejection.body_text())
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(mime) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses JSON, turning serde's complaint into a 400 that names the offending field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body is empty",
        ));
    }
    // Every body billsync takes is an object; saying so beats serde's view of `[1, 2]`.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    // The common case pays for no path tracking; a failure is parsed again to name the field.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let message = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad_request("invalid_json", format!("malformed JSON: {message}"));
        }
        let quoted = quoted_name(&message);
        let (code, field) = if message.starts_with("unknown field") {
            ("unknown_field", join(&path, quoted))
        } else if message.starts_with("missing field") {
            ("missing_field", join(&path, quoted))
        } else {
            ("invalid_value", (path != ".").then_some(path))
        };
        let error = ApiError::bad_request(code, message);
        match field {
            Some(field) => error.with_field(field),
            None => error,
        }
    })
}

/// The first name serde quotes in backticks: "unknown field `x`, expected ..." → "x".
fn quoted_name(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

fn join(path: &str, name: Option<&str>) -> Option<String> {
    let name = name?;
    Some(if path == "." || path.is_empty() || path.ends_with(name) {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct In {
        name: String,
        count: Option<u32>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse::<In>(br#"{"name":"a","colour":1}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("unknown_field", Some("colour"))
        );
        let e = parse::<In>(br#"{}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("missing_field", Some("name"))
        );
        let e = parse::<In>(br#"{"name":"a","count":"x"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_value", Some("count"))
        );
        let e = parse::<In>(br#"{"name":"#).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse::<In>(b"  ").unwrap_err();
        assert_eq!(e.code, "invalid_json");
    }

    #[test]
    fn json_content_types() {
        let v = |s: &'static str| Some(header::HeaderValue::from_static(s));
        assert!(is_json(v("application/json").as_ref()));
        assert!(is_json(v("application/json; charset=utf-8").as_ref()));
        assert!(is_json(v("application/merge-patch+json").as_ref()));
        assert!(!is_json(v("text/plain").as_ref()));
        assert!(!is_json(None));
    }
}
