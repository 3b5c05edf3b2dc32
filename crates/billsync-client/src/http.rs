//! Requests to the server: checks (`POST /v1/tenants/{t}/entitlements/check`), and the plain
//! JSON reads and writes of [`crate::credits`].

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::credits::CreditCheck;
use crate::{Check, Error, Shared, reason};

/// The server's answer (`CheckOut`); unknown fields are tolerated.
#[derive(Deserialize)]
struct CheckOut {
    allowed: bool,
    reason: String,
    limit: Option<i64>,
    used: Option<String>,
    remaining: Option<String>,
    as_of: Option<String>,
    stale: bool,
    recorded: Option<bool>,
    credits: Option<CreditCheck>,
}

/// A URL under the server's base: `segments` are percent-encoded.
pub(crate) fn url(shared: &Shared, segments: &[&str]) -> reqwest::Url {
    let mut url = shared.base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.extend(segments);
    }
    url
}

/// The reason as one of the known constants, so that the common answers do not allocate.
fn known(text: String) -> Cow<'static, str> {
    const KNOWN: [&str; 7] = [
        reason::OK,
        reason::INSUFFICIENT_CREDITS,
        reason::UNKNOWN_TENANT,
        reason::NO_SUBSCRIPTION,
        reason::SUBSCRIPTION_INACTIVE,
        reason::FEATURE_NOT_IN_PLAN,
        reason::LIMIT_EXCEEDED,
    ];
    match KNOWN.iter().find(|k| **k == text) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(text),
    }
}

fn decimal(text: Option<String>) -> Result<Option<Decimal>, Error> {
    text.map(|t| Decimal::from_str(&t).map_err(|e| Error::Protocol(format!("`{t}`: {e}"))))
        .transpose()
}

/// One check, with `record: {id}` when `record` is given.
pub(crate) async fn check(
    shared: &Shared,
    tenant: &str,
    feature: &str,
    quantity: Decimal,
    record: Option<&str>,
) -> Result<Check, Error> {
    let url = url(shared, &["v1", "tenants", tenant, "entitlements", "check"]);
    let mut body = json!({"feature": feature, "quantity": quantity.to_string()});
    if let Some(id) = record {
        body["record"] = json!({ "id": id });
    }
    let response = (shared.http.post(url))
        .bearer_auth(&shared.api_key)
        .timeout(shared.options.request_timeout)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    if status == 404 {
        // A tenant the key may not see (or that does not exist): the check's own answer.
        return Ok(Check::unknown_tenant(false));
    }
    if status != 200 {
        return Err(Error::from_answer(status, &bytes));
    }
    let out: CheckOut = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Protocol(format!("a check answer that is not valid: {e}")))?;
    Ok(Check {
        allowed: out.allowed,
        reason: known(out.reason),
        limit: out.limit,
        used: decimal(out.used)?,
        remaining: decimal(out.remaining)?,
        as_of: out.as_of.map(Arc::from),
        stale: out.stale,
        recorded: out.recorded,
        credits: out.credits,
    })
}

/// `GET` a JSON answer under the base, with a query.
pub(crate) async fn get<T: DeserializeOwned>(
    shared: &Shared,
    segments: &[&str],
    query: &[(&str, String)],
) -> Result<T, Error> {
    let mut url = url(shared, segments);
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    answer(shared, shared.http.get(url)).await
}

/// `PUT` a JSON body under the base.
pub(crate) async fn put<B: Serialize, T: DeserializeOwned>(
    shared: &Shared,
    segments: &[&str],
    body: &B,
) -> Result<T, Error> {
    let body = serde_json::to_string(body)
        .map_err(|e| Error::Protocol(format!("a body that cannot be sent: {e}")))?;
    let request = (shared.http.put(url(shared, segments)))
        .header("content-type", "application/json")
        .body(body);
    answer(shared, request).await
}

/// Sends with the key and the timeout; a 200 is read as `T`, anything else is the error.
async fn answer<T: DeserializeOwned>(
    shared: &Shared,
    request: reqwest::RequestBuilder,
) -> Result<T, Error> {
    let response = (request.bearer_auth(&shared.api_key))
        .timeout(shared.options.request_timeout)
        .send()
        .await?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    if status != 200 {
        return Err(Error::from_answer(status, &bytes));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Protocol(format!("an answer that is not valid: {e}")))
}
