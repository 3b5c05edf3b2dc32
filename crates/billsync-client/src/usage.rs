//! Recorded usage: a bounded buffer, and the task that sends it to `POST /v1/usage` in batches,
//! again after network errors and 5xx (event ids make that exactly-once on the server).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::options::backoff;
use crate::{Error, Shared};

/// One usage event, as `POST /v1/usage` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    /// With the tenant, the key that makes the event count once.
    pub id: String,
    pub tenant_id: String,
    pub meter: String,
    pub quantity: Decimal,
    /// When it happened (RFC 3339, UTC, milliseconds): when it was recorded.
    pub timestamp: String,
}

impl UsageEvent {
    pub(crate) fn now(id: &str, tenant: &str, meter: &str, quantity: Decimal) -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Self {
            id: id.to_owned(),
            tenant_id: tenant.to_owned(),
            meter: meter.to_owned(),
            quantity,
            timestamp: rfc3339(ms),
        }
    }

    fn json(&self) -> Value {
        json!({"id": self.id, "tenant_id": self.tenant_id, "meter": self.meter,
            "quantity": self.quantity.to_string(), "timestamp": self.timestamp})
    }
}

/// Unix milliseconds as `2026-12-07T06:14:16.577Z`.
pub(crate) fn rfc3339(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// Events waiting, and how many are being sent.
#[derive(Debug, Default)]
pub(crate) struct Buffer {
    queue: VecDeque<UsageEvent>,
    in_flight: usize,
}

/// Events waiting or in flight.
pub(crate) fn buffered(shared: &Shared) -> usize {
    let buffer = shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
    buffer.queue.len() + buffer.in_flight
}

/// Takes an event into the buffer, or refuses it: the buffer is full, or the client shut down.
pub(crate) fn record(shared: &Shared, event: UsageEvent) -> Result<(), Error> {
    if shared.closed.load(Ordering::SeqCst) {
        return Err(Error::Closed);
    }
    let capacity = shared.options.buffer_capacity;
    let mut buffer = shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
    let held = buffer.queue.len() + buffer.in_flight;
    if held >= capacity {
        return Err(Error::BufferFull { capacity });
    }
    // Counted before the flusher can see it, so that its answer always finds it counted.
    if shared.options.local_usage.applies(&event.meter) {
        let mut replica = shared.replica_write();
        replica.add_pending(&event.tenant_id, &event.meter, event.quantity);
    }
    buffer.queue.push_back(event);
    let full_batch = buffer.queue.len() >= shared.options.batch_size.max(1);
    drop(buffer);
    shared.options.metrics.buffered(held + 1);
    if full_batch {
        shared.flush_now.notify_one();
    }
    Ok(())
}

/// Sends the buffer every `flush_interval` (or when a batch is full) until the client stops;
/// then sends what is left, for as long as shutdown waits.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    loop {
        let stopping = *stop.borrow();
        if !stopping {
            tokio::select! {
                () = tokio::time::sleep(shared.options.flush_interval) => {}
                () = shared.flush_now.notified() => {}
                _ = stop.changed() => {}
            }
        }
        shared.options.metrics.replica_age(shared.replica_age());
        flush(&shared).await;
        if stopping {
            return;
        }
    }
}

/// Sends batches until the buffer is empty.
async fn flush(shared: &Shared) {
    loop {
        let batch: Vec<UsageEvent> = {
            let mut buffer = shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
            let n = buffer.queue.len().min(shared.options.batch_size.max(1));
            let batch: Vec<UsageEvent> = buffer.queue.drain(..n).collect();
            buffer.in_flight += batch.len();
            batch
        };
        if batch.is_empty() {
            return;
        }
        let span = tracing::info_span!("billsync_flush", events = batch.len());
        let outcome = send(shared, &batch).instrument(span).await;
        settle(shared, &batch, &outcome);
        let left = {
            let mut buffer = shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
            buffer.in_flight -= batch.len();
            buffer.queue.len() + buffer.in_flight
        };
        shared.options.metrics.buffered(left);
    }
}

/// The server's answer to a batch.
#[derive(Deserialize)]
struct Ingested {
    #[serde(default)]
    rejected: Vec<Rejection>,
}

#[derive(Deserialize)]
struct Rejection {
    index: usize,
    code: String,
    message: String,
}

/// The server's verdict on a batch.
enum Outcome {
    /// Taken, but for these events (by index), with why.
    Answered(Vec<(usize, Error)>),
    /// Refused whole (a 4xx).
    Refused(Error),
}

/// Sends one batch until the server answers it.
async fn send(shared: &Shared, batch: &[UsageEvent]) -> Outcome {
    let body = json!({"events": batch.iter().map(UsageEvent::json).collect::<Vec<_>>()});
    let body = body.to_string();
    let url = crate::http::url(shared, &["v1", "usage"]);
    let mut failures = 0u32;
    loop {
        let attempt = async {
            let response = (shared.http.post(url.clone()))
                .bearer_auth(&shared.api_key)
                .timeout(shared.options.request_timeout)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await?;
            if status != 200 {
                return Err(Error::from_answer(status, &bytes));
            }
            serde_json::from_slice::<Ingested>(&bytes)
                .map_err(|e| Error::Protocol(format!("a usage answer that is not valid: {e}")))
        };
        let error = match attempt.await {
            Ok(ingested) => {
                let refused = (ingested.rejected.into_iter())
                    .map(|r| {
                        let why = Error::Status {
                            status: 200,
                            code: r.code,
                            message: r.message,
                        };
                        (r.index, why)
                    })
                    .collect();
                return Outcome::Answered(refused);
            }
            Err(error) if error.is_retryable() => error,
            Err(error) => return Outcome::Refused(error),
        };
        let wait = backoff(&shared.options, failures);
        failures = failures.saturating_add(1);
        tracing::warn!(%error, events = batch.len(), retry_in_ms = wait.as_millis() as u64,
            "billsync: sending usage failed; trying again");
        tokio::time::sleep(wait).await;
    }
}

/// Moves the batch's quantities from pending to accepted in the replica, drops the refused
/// ones, and reports those.
fn settle(shared: &Shared, batch: &[UsageEvent], outcome: &Outcome) {
    let refused_at: HashSet<usize> = match outcome {
        Outcome::Answered(refused) => refused.iter().map(|(i, _)| *i).collect(),
        Outcome::Refused(_) => (0..batch.len()).collect(),
    };
    {
        let mut replica = shared.replica_write();
        for (i, event) in batch.iter().enumerate() {
            if shared.options.local_usage.applies(&event.meter) {
                let accepted = !refused_at.contains(&i);
                replica.settle(&event.tenant_id, &event.meter, event.quantity, accepted);
            }
        }
    }
    match outcome {
        Outcome::Refused(error) => {
            tracing::error!(%error, events = batch.len(),
                "billsync: the server refused a usage batch; its events are dropped");
            shared.options.metrics.dropped(batch, error);
        }
        Outcome::Answered(refused) => {
            for (i, why) in refused {
                let Some(event) = batch.get(*i) else { continue };
                tracing::error!(error = %why, id = %event.id, tenant = %event.tenant_id,
                    "billsync: the server refused a usage event; it is dropped");
                shared
                    .options
                    .metrics
                    .dropped(std::slice::from_ref(event), why);
            }
        }
    }
    let dropped = refused_at.iter().filter(|i| **i < batch.len()).count();
    let sent = batch.len() - dropped;
    let mut stats = shared.lock_stats();
    stats.sent += sent as u64;
    stats.dropped += dropped as u64;
    drop(stats);
    shared.options.metrics.flushed(sent);
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_in_utc_with_milliseconds() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339(1_796_624_401_250),
            "2026-12-07T06:20:01.250Z"
        );
        assert_eq!(super::rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
