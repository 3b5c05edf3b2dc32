//! The Stripe client every worker shares: pinned API version, timeouts, a client-side rate
//! limit, and retries with exponential backoff and jitter on 429, 5xx and connection errors.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Mutex;

use super::objects;
use super::{
    BillingVendor, CustomerWrite, Fetched, ListFilter, MeterEvent, ObjectKind, Page,
    PreviewRequest, Proration, SubscriptionWrite, VendorError,
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
    async fn get(
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
    async fn write(
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

    fn count(&self, endpoint: &str, status: &str) {
        self.metrics.inc(
            "billsync_vendor_requests_total",
            "Calls to the vendor by endpoint and HTTP status (\"error\": no response).",
            &[("endpoint", endpoint), ("status", status)],
        );
    }

    async fn page(
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
        let mut form = Form::default();
        // An empty value clears the field at Stripe.
        form.push("name", customer.name.unwrap_or_default());
        form.push("email", customer.email.unwrap_or_default());
        form.push(
            &format!("metadata[{}]", self.tenant_key),
            customer.tenant_id,
        );
        let path = match existing {
            Some(id) => format!("/v1/customers/{}", urlencode(id)),
            None => "/v1/customers".to_owned(),
        };
        self.write(
            "customers",
            reqwest::Method::POST,
            &path,
            &form.0,
            idempotency_key,
        )
        .await
    }

    async fn write_subscription(
        &self,
        write: &SubscriptionWrite<'_>,
        idempotency_key: &str,
    ) -> Result<Value, VendorError> {
        let price_field = if self.legacy_plans { "plan" } else { "price" };
        let mut form = Form::default();
        let (method, path) = match *write {
            SubscriptionWrite::Create {
                customer,
                price,
                quantity,
                trial_days,
                metadata,
            } => {
                form.push("customer", customer);
                form.push(&format!("items[0][{price_field}]"), price);
                form.push("items[0][quantity]", &quantity.to_string());
                // A declined card fails the command instead of leaving an incomplete subscription.
                form.push("payment_behavior", "error_if_incomplete");
                if let Some(days) = trial_days {
                    form.push("trial_period_days", &days.to_string());
                }
                form.metadata(metadata);
                (reqwest::Method::POST, "/v1/subscriptions".to_owned())
            }
            SubscriptionWrite::Change {
                subscription,
                item,
                price,
                quantity,
                proration,
                trial_end,
                metadata,
            } => {
                form.push("items[0][id]", item);
                form.push(&format!("items[0][{price_field}]"), price);
                form.push("items[0][quantity]", &quantity.to_string());
                if self.legacy_plans {
                    // The 2017 API knows only `prorate`.
                    let prorate = proration != Proration::None;
                    form.push("prorate", if prorate { "true" } else { "false" });
                } else {
                    form.push("proration_behavior", proration.as_str());
                    form.push("payment_behavior", "error_if_incomplete");
                }
                if let Some(end) = trial_end {
                    form.push("trial_end", &end.to_string());
                }
                form.metadata(metadata);
                (
                    reqwest::Method::POST,
                    format!("/v1/subscriptions/{}", urlencode(subscription)),
                )
            }
            SubscriptionWrite::CancelAtPeriodEnd {
                subscription,
                cancel,
                metadata,
            } => {
                form.push(
                    "cancel_at_period_end",
                    if cancel { "true" } else { "false" },
                );
                form.metadata(metadata);
                (
                    reqwest::Method::POST,
                    format!("/v1/subscriptions/{}", urlencode(subscription)),
                )
            }
            SubscriptionWrite::CancelNow { subscription } => (
                reqwest::Method::DELETE,
                format!("/v1/subscriptions/{}", urlencode(subscription)),
            ),
        };
        self.write("subscriptions", method, &path, &form.0, idempotency_key)
            .await
    }

    async fn preview(&self, request: &PreviewRequest<'_>) -> Result<Value, VendorError> {
        let price_field = if self.legacy_plans { "plan" } else { "price" };
        let mut form = Form::default();
        form.push("customer", request.customer);
        if let Some((subscription, item)) = request.current {
            form.push("subscription", subscription);
            form.push("subscription_details[items][0][id]", item);
            form.push(
                "subscription_details[proration_behavior]",
                request.proration.as_str(),
            );
        }
        form.push(
            &format!("subscription_details[items][0][{price_field}]"),
            request.price,
        );
        form.push(
            "subscription_details[items][0][quantity]",
            &request.quantity.to_string(),
        );
        // A preview changes nothing; no idempotency key is needed, but `call` retries it safely.
        match self
            .call(
                "invoices/create_preview",
                reqwest::Method::POST,
                "/v1/invoices/create_preview",
                &[],
                &form.0,
                None,
            )
            .await?
        {
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

/// Form fields in the order they are sent.
#[derive(Default)]
struct Form(Vec<(String, String)>);

impl Form {
    fn push(&mut self, key: &str, value: &str) {
        self.0.push((key.to_owned(), value.to_owned()));
    }

    fn metadata(&mut self, pairs: &[(&str, &str)]) {
        for (key, value) in pairs {
            self.push(&format!("metadata[{key}]"), value);
        }
    }
}

impl StripeHttp {
    /// Stripe lists a customer's active entitlements; billsync keeps them as one summary object,
    /// the shape of the `entitlements.active_entitlement_summary.updated` event.
    async fn fetch_active_entitlements(&self, customer: &str) -> Result<Fetched, VendorError> {
        let mut entitlements = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![
                ("customer".to_owned(), customer.to_owned()),
                ("limit".to_owned(), "100".to_owned()),
            ];
            if let Some(after) = &after {
                query.push(("starting_after".to_owned(), after.clone()));
            }
            let page = self
                .page(
                    "entitlements/active_entitlements",
                    "/v1/entitlements/active_entitlements",
                    query,
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

fn urlencode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Spaces calls evenly at `n` per second across every task that shares it.
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    pub fn per_second(n: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / n.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
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

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_spaces_calls() {
        let limiter = RateLimiter::per_second(10);
        let started = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        assert!(started.elapsed() >= Duration::from_millis(1000));
    }

    #[test]
    fn ids_are_path_safe() {
        assert_eq!(urlencode("cus_123"), "cus_123");
        assert_eq!(urlencode("a/b c"), "a%2Fb%20c");
    }
}
