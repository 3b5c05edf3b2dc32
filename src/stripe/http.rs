//! The Stripe client every worker shares: pinned API version, timeouts, a client-side rate
//! limit, and retries with exponential backoff and jitter on 429, 5xx and connection errors.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Mutex;

use super::form::{self, urlencode};
use super::limiter::RateLimiter;
use super::objects;
use super::{
    BillingVendor, CreditTransaction, CustomerWrite, Fetched, ListFilter, MeterEvent, ObjectKind,
    Page, PreviewRequest, SubscriptionWrite, TopUpWrite, VendorError,
};
use crate::config::{Secret, StripeSettings};
use crate::metrics::Metrics;

/// A successful answer, or a 404 with its body.
enum Answer {
    Found(Value),
    NotFound(String),
}

/// Longest wait between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

pub struct StripeHttp {
    http: reqwest::Client,
    base: String,
    key: Secret,
    version: String,
    max_retries: u32,
    retry_base: Duration,
    limiter: RateLimiter,
    metrics: Arc<Metrics>,
    legacy_plans: bool,
    tenant_key: String,
    /// The vendor's meters by event name, listed once.
    meters: Mutex<Option<std::collections::HashMap<String, String>>>,
}

impl StripeHttp {
    /// `None` when no API key is configured.
    pub fn from_settings(
        settings: &StripeSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Self>, VendorError> {
        let Some(key) = settings.api_key.clone() else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| VendorError::Unavailable(format!("cannot build HTTP client: {e}")))?;
        Ok(Some(Self {
            http,
            base: settings.api_base.clone(),
            key,
            version: settings.api_version.clone(),
            max_retries: settings.max_retries,
            retry_base: settings.retry_base_delay,
            limiter: RateLimiter::per_second(settings.rate_limit),
            metrics,
            legacy_plans: settings.legacy_plans,
            tenant_key: settings.tenant_metadata_key.clone(),
            meters: Mutex::new(None),
        }))
    }

    /// GETs `path`; `Ok(None)` on 404. `endpoint` labels the call in metrics.
    pub(super) async fn get(
        &self,
        endpoint: &'static str,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Option<Value>, VendorError> {
        match self
            .call(endpoint, reqwest::Method::GET, path, query, &[], None)
            .await?
        {
            Answer::Found(value) => Ok(Some(value)),
            Answer::NotFound(_) => Ok(None),
        }
    }

    /// POSTs (or DELETEs) a write with its idempotency key; a 404 is the vendor's refusal.
    pub(super) async fn write(
        &self,
        endpoint: &'static str,
        method: reqwest::Method,
        path: &str,
        form: &[(String, String)],
        idempotency_key: &str,
    ) -> Result<Value, VendorError> {
        match self
            .call(endpoint, method, path, &[], form, Some(idempotency_key))
            .await?
        {
            Answer::Found(value) => Ok(value),
            Answer::NotFound(body) => Err(rejected(StatusCode::NOT_FOUND, &body)),
        }
    }

    /// One call with the pinned version, the rate limit and retries. A POST carries
    /// `idempotency_key`, the same on every retry, so that Stripe applies it once.
    async fn call(
        &self,
        endpoint: &'static str,
        method: reqwest::Method,
        path: &str,
        query: &[(String, String)],
        form: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<Answer, VendorError> {
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        loop {
            self.limiter.acquire().await;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .query(query)
                .bearer_auth(self.key.expose())
                .header("Stripe-Version", &self.version);
            if !form.is_empty() {
                request = request.form(form);
            }
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            let retry_reason = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    self.count(endpoint, status.as_str());
                    let should_retry = response
                        .headers()
                        .get("stripe-should-retry")
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.eq_ignore_ascii_case("true"));
                    if status.is_success() {
                        return response
                            .json::<Value>()
                            .await
                            .map(Answer::Found)
                            .map_err(|e| VendorError::Malformed(format!("{endpoint}: {e}")));
                    }
                    let body = response.text().await.unwrap_or_default();
                    if status == StatusCode::NOT_FOUND && should_retry != Some(true) {
                        return Ok(Answer::NotFound(body));
                    }
                    let retryable = should_retry.unwrap_or(
                        status == StatusCode::TOO_MANY_REQUESTS
                            || status.is_server_error()
                            || status == StatusCode::CONFLICT,
                    );
                    if !retryable {
                        return Err(rejected(status, &body));
                    }
                    format!("{endpoint}: HTTP {status}")
                }
                Err(error) => {
                    self.count(endpoint, "error");
                    format!("{endpoint}: {}", without_url(error))
                }
            };
            if attempt >= self.max_retries {
                return Err(VendorError::Unavailable(format!(
                    "{retry_reason} (gave up after {} attempts)",
                    attempt + 1
                )));
            }
            let delay = crate::retry::backoff(self.retry_base, attempt, MAX_BACKOFF);
            tracing::debug!(reason = %retry_reason, delay_ms = delay.as_millis() as u64, "retrying Stripe call");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// GETs one object; its absence is the vendor's refusal.
    pub(super) async fn fetch_value(
        &self,
        endpoint: &'static str,
        path: &str,
    ) -> Result<Value, VendorError> {
        match self
            .call(endpoint, reqwest::Method::GET, path, &[], &[], None)
            .await?
        {
            Answer::Found(value) => Ok(value),
            Answer::NotFound(body) => Err(rejected(StatusCode::NOT_FOUND, &body)),
        }
    }

    /// One page (100 at most) of a list narrowed to `customer`, after `starting_after`.
    pub(super) async fn customer_page(
        &self,
        endpoint: &'static str,
        path: &str,
        customer: &str,
        starting_after: Option<&str>,
    ) -> Result<Page, VendorError> {
        let mut query = vec![
            ("customer".to_owned(), customer.to_owned()),
            ("limit".to_owned(), "100".to_owned()),
        ];
        if let Some(after) = starting_after {
            query.push(("starting_after".to_owned(), after.to_owned()));
        }
        self.page(endpoint, path, query).await
    }

    fn count(&self, endpoint: &str, status: &str) {
        self.metrics.inc(
            "billsync_vendor_requests_total",
            "Calls to the vendor by endpoint and HTTP status (\"error\": no response).",
            &[("endpoint", endpoint), ("status", status)],
        );
    }

    pub(super) async fn page(
        &self,
        endpoint: &'static str,
        path: &str,
        query: Vec<(String, String)>,
    ) -> Result<Page, VendorError> {
        let body = self
            .get(endpoint, path, &query)
            .await?
            .ok_or_else(|| VendorError::Malformed(format!("{endpoint}: list answered 404")))?;
        objects::page(body).ok_or_else(|| VendorError::Malformed(format!("{endpoint}: not a list")))
    }
}

fn without_url(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{kind}: {}", error.without_url())
}

fn rejected(status: StatusCode, body: &str) -> VendorError {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let error = &parsed["error"];
    VendorError::Rejected {
        status: status.as_u16(),
        code: error["code"].as_str().map(str::to_owned),
        message: error["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status}")),
    }
}

#[async_trait]
impl BillingVendor for StripeHttp {
    async fn fetch(&self, kind: ObjectKind, id: &str) -> Result<Fetched, VendorError> {
        if kind == ObjectKind::ActiveEntitlements {
            return self.fetch_active_entitlements(id).await;
        }
        let path = format!("/v1/{}/{}", objects::collection(kind), urlencode(id));
        match self.get(objects::collection(kind), &path, &[]).await? {
            Some(object) if object["deleted"] == Value::Bool(true) => Ok(Fetched::Gone),
            Some(object) => Ok(Fetched::Found(object)),
            None => Ok(Fetched::Gone),
        }
    }

    async fn list(
        &self,
        kind: ObjectKind,
        filter: &ListFilter,
        starting_after: Option<&str>,
    ) -> Result<Page, VendorError> {
        let mut query = vec![("limit".to_owned(), "100".to_owned())];
        if let Some(customer) = &filter.customer {
            query.push(("customer".to_owned(), customer.clone()));
        }
        if filter.all_statuses && kind == ObjectKind::Subscription {
            query.push(("status".to_owned(), "all".to_owned()));
        }
        if let Some(after) = starting_after {
            query.push(("starting_after".to_owned(), after.to_owned()));
        }
        let collection = objects::collection(kind);
        self.page(collection, &format!("/v1/{collection}"), query)
            .await
    }

    async fn report_usage(&self, event: &MeterEvent) -> Result<(), VendorError> {
        let form = vec![
            ("event_name".to_owned(), event.event_name.clone()),
            (
                "payload[stripe_customer_id]".to_owned(),
                event.customer_id.clone(),
            ),
            ("payload[value]".to_owned(), event.value.clone()),
            ("timestamp".to_owned(), event.timestamp.to_string()),
            ("identifier".to_owned(), event.identifier.clone()),
        ];
        self.write(
            "billing/meter_events",
            reqwest::Method::POST,
            "/v1/billing/meter_events",
            &form,
            &event.identifier,
        )
        .await?;
        Ok(())
    }

    async fn list_events_since(
        &self,
        created_gte: i64,
        starting_after: Option<&str>,
    ) -> Result<Page, VendorError> {
        let mut query = vec![
            ("limit".to_owned(), "100".to_owned()),
            ("created[gte]".to_owned(), created_gte.to_string()),
        ];
        if let Some(after) = starting_after {
            query.push(("starting_after".to_owned(), after.to_owned()));
        }
        self.page("events", "/v1/events", query).await
    }

    async fn write_customer(
        &self,
        existing: Option<&str>,
        customer: &CustomerWrite<'_>,
        idempotency_key: &str,
    ) -> Result<Value, VendorError> {
        let form = form::customer(&self.tenant_key, customer);
        let path = match existing {
            Some(id) => format!("/v1/customers/{}", form::urlencode(id)),
            None => "/v1/customers".to_owned(),
        };
        let method = reqwest::Method::POST;
        (self.write("customers", method, &path, &form.0, idempotency_key)).await
    }

    async fn write_subscription(
        &self,
        write: &SubscriptionWrite<'_>,
        idempotency_key: &str,
    ) -> Result<Value, VendorError> {
        let (method, path, form) = form::subscription(write, self.legacy_plans);
        (self.write("subscriptions", method, &path, &form.0, idempotency_key)).await
    }

    async fn preview(&self, request: &PreviewRequest<'_>) -> Result<Value, VendorError> {
        let form = form::preview(request, self.legacy_plans);
        let path = "/v1/invoices/create_preview";
        let method = reqwest::Method::POST;
        // A preview changes nothing; no idempotency key is needed, but `call` retries it safely.
        match (self.call("invoices/create_preview", method, path, &[], &form.0, None)).await? {
            Answer::Found(value) => Ok(value),
            Answer::NotFound(body) => Err(rejected(StatusCode::NOT_FOUND, &body)),
        }
    }

    async fn meter_usage(
        &self,
        event_name: &str,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<Option<rust_decimal::Decimal>, VendorError> {
        let Some(meter) = self.meter_id(event_name).await? else {
            return Ok(None);
        };
        // Stripe takes summary bounds on minute boundaries.
        let query = vec![
            ("customer".to_owned(), customer.to_owned()),
            (
                "start_time".to_owned(),
                (start - start.rem_euclid(60)).to_string(),
            ),
            (
                "end_time".to_owned(),
                (end - end.rem_euclid(60)).to_string(),
            ),
            ("limit".to_owned(), "100".to_owned()),
        ];
        let path = format!("/v1/billing/meters/{}/event_summaries", urlencode(&meter));
        let page = self
            .page("billing/meters/event_summaries", &path, query)
            .await?;
        let total = page
            .data
            .iter()
            .filter_map(|s| {
                let value = &s["aggregated_value"];
                value
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| value.as_number().map(|n| n.to_string()))
            })
            .filter_map(|v| {
                <rust_decimal::Decimal as std::str::FromStr>::from_str(&v)
                    .ok()
                    .or_else(|| rust_decimal::Decimal::from_scientific(&v).ok())
            })
            .sum();
        Ok(Some(total))
    }

    fn credits(&self) -> Option<&dyn super::CreditVendor> {
        Some(self)
    }
}

#[async_trait]
impl super::CreditVendor for StripeHttp {
    async fn top_up(&self, top_up: &TopUpWrite<'_>, key: &str) -> Result<Value, VendorError> {
        self.top_up_calls(top_up, key).await
    }

    async fn credit_transactions(
        &self,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<Option<Vec<CreditTransaction>>, VendorError> {
        StripeHttp::credit_transactions(self, customer, start, end).await
    }
}

impl StripeHttp {
    /// The id of the meter with this event name (the meters are listed once per process).
    async fn meter_id(&self, event_name: &str) -> Result<Option<String>, VendorError> {
        let mut meters = self.meters.lock().await;
        if meters.is_none() {
            let mut found = std::collections::HashMap::new();
            let mut after: Option<String> = None;
            loop {
                let mut query = vec![("limit".to_owned(), "100".to_owned())];
                if let Some(after) = &after {
                    query.push(("starting_after".to_owned(), after.clone()));
                }
                let page = self
                    .page("billing/meters", "/v1/billing/meters", query)
                    .await?;
                after = page.data.last().and_then(|m| objects::id_of(&m["id"]));
                for meter in &page.data {
                    if let (Some(name), Some(id)) =
                        (meter["event_name"].as_str(), objects::id_of(&meter["id"]))
                    {
                        found.insert(name.to_owned(), id);
                    }
                }
                if !page.has_more || after.is_none() {
                    break;
                }
            }
            *meters = Some(found);
        }
        Ok(meters.as_ref().and_then(|m| m.get(event_name).cloned()))
    }
}

impl StripeHttp {
    /// Stripe lists a customer's active entitlements; billsync keeps them as one summary object,
    /// the shape of the `entitlements.active_entitlement_summary.updated` event.
    async fn fetch_active_entitlements(&self, customer: &str) -> Result<Fetched, VendorError> {
        let mut entitlements = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .customer_page(
                    "entitlements/active_entitlements",
                    "/v1/entitlements/active_entitlements",
                    customer,
                    after.as_deref(),
                )
                .await?;
            after = page
                .data
                .last()
                .and_then(|e| e["id"].as_str())
                .map(str::to_owned);
            entitlements.extend(page.data);
            if !page.has_more || after.is_none() {
                break;
            }
        }
        Ok(Fetched::Found(objects::entitlement_summary(
            customer,
            entitlements,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let base = Duration::from_millis(100);
        for attempt in 0..10 {
            let d = crate::retry::backoff(base, attempt, MAX_BACKOFF);
            let full = base.saturating_mul(2u32.pow(attempt)).min(MAX_BACKOFF);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
    }
}
