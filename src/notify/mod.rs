//! Notifications to the product: signed JSON webhooks to `notify.url`.
//!
//! Each notification is a row ([`crate::store::Notifications`]) written in the transaction of
//! what causes it (a low-balance crossing), so none is lost and none is made twice. One replica
//! delivers them, under the `notify` lease ([`Notifier::run`]), oldest first, until the
//! receiver answers 2xx; other answers and failures are retried with backoff up to
//! `notify.give_up_after`. A receiver may see a notification more than once (a crash between
//! its 2xx and the record of it): it dedupes on the event's `id`, the same on every delivery.
//!
//! Signature, like Stripe's: the header `Billsync-Signature: t=<unix seconds>,v1=<hex>` where
//! `<hex>` is HMAC-SHA256 with `notify.secret` as key over `<t>.<raw body>`.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::{NotifySettings, Secret};
use crate::store::{Db, Delivery, NotificationRow, StoreError, now_ms};

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Billsync-Signature";
/// The header carrying the event id (also the body's `id`).
pub const EVENT_ID_HEADER: &str = "Billsync-Event-Id";

/// How long the deliverer idles when nothing is due.
const IDLE: Duration = Duration::from_secs(1);
/// Notifications read per pass.
const BATCH: u32 = 50;

/// Hex SHA-256 of `bytes`.
pub fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The `Billsync-Signature` value of `body` sent at `timestamp` (Unix seconds).
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Delivers notifications; runs on the replica holding the `notify` lease.
#[derive(Clone)]
pub struct Notifier {
    pub db: Db,
    pub http: reqwest::Client,
    pub url: String,
    pub secret: Secret,
    pub max_retry_delay: Duration,
    pub give_up_after: Duration,
}

impl Notifier {
    /// `None` unless `notify.url` is set.
    pub fn from_settings(db: &Db, settings: &NotifySettings) -> Option<Self> {
        let (url, secret) = (settings.url.clone()?, settings.secret.clone()?);
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .ok()?;
        Some(Self {
            db: db.clone(),
            http,
            url,
            secret,
            max_retry_delay: settings.max_retry_delay,
            give_up_after: settings.give_up_after,
        })
    }

    /// Delivers until `shutdown` (or the lease is lost): it stops between deliveries, so it
    /// writes nothing once the token is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.pass(&shutdown).await {
                tracing::warn!(error = %error, "notifications: cannot read or record deliveries");
            }
            let idle = match self.db.notifications().next_attempt(now_ms()).await {
                Ok(Some(at)) => {
                    Duration::from_millis((at - now_ms()).clamp(1, IDLE.as_millis() as i64) as u64)
                }
                _ => IDLE,
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(idle) => {}
            }
        }
    }

    /// One attempt at every notification due now; how many were delivered.
    pub async fn pass(&self, shutdown: &CancellationToken) -> Result<usize, StoreError> {
        let mut delivered = 0;
        for row in self.db.notifications().due(now_ms(), BATCH).await? {
            if shutdown.is_cancelled() {
                break;
            }
            delivered += usize::from(self.deliver(&row).await?);
        }
        Ok(delivered)
    }

    /// One attempt at one notification, recorded.
    async fn deliver(&self, row: &NotificationRow) -> Result<bool, StoreError> {
        let timestamp = now_ms() / 1000;
        let signed = signature(self.secret.expose(), timestamp, row.payload.as_bytes());
        let sent = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signed)
            .header(EVENT_ID_HEADER, &row.event_id)
            .body(row.payload.clone())
            .send()
            .await;
        let (status, error) = match sent {
            Ok(response) if response.status().is_success() => {
                let status = i32::from(response.status().as_u16());
                let notifications = self.db.notifications();
                (notifications.record(&row.event_id, &Delivery::Delivered { status }, now_ms()))
                    .await?;
                tracing::info!(event_id = %row.event_id, kind = %row.kind, "notification delivered");
                return Ok(true);
            }
            Ok(response) => (
                Some(i32::from(response.status().as_u16())),
                format!("the receiver answered HTTP {}", response.status()),
            ),
            Err(error) => (
                None,
                format!("cannot reach the receiver: {}", error.without_url()),
            ),
        };
        let age = Duration::from_millis((now_ms() - row.created_at).max(0) as u64);
        let delivery = if age >= self.give_up_after {
            Delivery::Failed {
                status,
                error: &error,
            }
        } else {
            let delay = crate::retry::after_failures(row.attempts, self.max_retry_delay);
            Delivery::Retry {
                status,
                error: &error,
                next_attempt_at: now_ms() + delay.as_millis() as i64,
            }
        };
        tracing::warn!(event_id = %row.event_id, attempts = row.attempts + 1, error, "notification not delivered");
        self.db
            .notifications()
            .record(&row.event_id, &delivery, now_ms())
            .await?;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_test
        let signed = signature("whsec_test", 1_700_000_000, b"{}");
        assert_eq!(
            signed,
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
        assert_ne!(signed, signature("whsec_other", 1_700_000_000, b"{}"));
    }
}
