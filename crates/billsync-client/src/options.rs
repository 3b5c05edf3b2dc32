//! How a client behaves: timeouts, backoff, staleness, the usage buffer, metrics hooks.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, UsageEvent};

/// What a check does when the replica is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Staleness {
    /// Answer from memory, marked `stale`.
    #[default]
    Answer,
    /// Ask the server (`POST /v1/tenants/{t}/entitlements/check`); if that fails, answer from
    /// memory, marked `stale`.
    AskServer,
}

/// Which meters' recorded usage is added to the replica's `used` at once.
///
/// Only a sum meter's figure grows by the quantity recorded; for other aggregations (count,
/// max, last, unique_count) the figure is updated by the stream only, once the server has the
/// event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalUsage {
    /// Every meter is a sum meter.
    #[default]
    AllSum,
    /// These meters are sum meters; the others wait for the stream.
    SumMeters(HashSet<String>),
    /// Nothing is added locally.
    Off,
}

impl LocalUsage {
    pub(crate) fn applies(&self, meter: &str) -> bool {
        match self {
            Self::AllSum => true,
            Self::SumMeters(meters) => meters.contains(meter),
            Self::Off => false,
        }
    }
}

/// Hooks for the embedding service's metrics. Every method has a no-op default.
pub trait Metrics: Send + Sync {
    /// How long the replica has not been known current (zero while the stream is live);
    /// reported every `flush_interval`.
    fn replica_age(&self, _age: Duration) {}
    /// A stream ended and the client is connecting again.
    fn reconnect(&self) {}
    /// A stream reached `ready`; `resumed` when it resumed from the client's cursor.
    fn ready(&self, _resumed: bool) {}
    /// Usage events waiting in the buffer (or being sent), after a change.
    fn buffered(&self, _events: usize) {}
    /// Usage events the server accepted (or had already).
    fn flushed(&self, _events: usize) {}
    /// Usage events the server refused (a 4xx for the batch, or a per-event rejection): they
    /// are dropped. Also logged with `tracing` at error level.
    fn dropped(&self, _events: &[UsageEvent], _error: &Error) {}
}

/// The default hooks: nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMetrics;

impl Metrics for NoMetrics {}

/// A client's settings; `Options::default()` suits most services.
#[derive(Clone)]
pub struct Options {
    /// How long `Client::connect` waits for the first complete replica (default 10 s).
    pub connect_timeout: Duration,
    /// Timeout of each HTTP request other than the stream (default 5 s).
    pub request_timeout: Duration,
    /// First wait before connecting again, or sending a batch again (default 100 ms); doubled
    /// after each failure up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (default 10 s).
    pub max_backoff: Duration,
    /// How long the stream may be down before the replica is stale; `None` (the default): the
    /// server's `stale_after` from `hello`.
    pub max_staleness: Option<Duration>,
    /// What a check does when the replica is stale.
    pub staleness: Staleness,
    /// Most usage events waiting to be sent, in flight included (default 10,000); beyond it
    /// `record` answers `Error::BufferFull`.
    pub buffer_capacity: usize,
    /// Most events per `POST /v1/usage` (default 1,000; the server's `metering.max_batch` is
    /// 10,000 by default). A full batch is sent at once.
    pub batch_size: usize,
    /// How often buffered usage is sent (default 250 ms: usage reaches other clients within a
    /// second, at four small requests a second from an idle client).
    pub flush_interval: Duration,
    /// How long `shutdown` waits for the buffer to be sent (default 5 s).
    pub shutdown_timeout: Duration,
    /// Which meters' usage counts locally at once.
    pub local_usage: LocalUsage,
    /// Metrics hooks.
    pub metrics: Arc<dyn Metrics>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_staleness: None,
            staleness: Staleness::Answer,
            buffer_capacity: 10_000,
            batch_size: 1_000,
            flush_interval: Duration::from_millis(250),
            shutdown_timeout: Duration::from_secs(5),
            local_usage: LocalUsage::AllSum,
            metrics: Arc::new(NoMetrics),
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_staleness", &self.max_staleness)
            .field("staleness", &self.staleness)
            .field("buffer_capacity", &self.buffer_capacity)
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("local_usage", &self.local_usage)
            .finish_non_exhaustive()
    }
}

/// The wait after `failures` failed attempts: doubling from `initial` up to `max`, less up to
/// a quarter at random so that many clients do not come back at once.
pub(crate) fn backoff(options: &Options, failures: u32) -> Duration {
    let doubled = options
        .initial_backoff
        .saturating_mul(1u32 << failures.min(20));
    let wait = doubled.min(options.max_backoff);
    let jitter = {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(failures) % 1000
    };
    wait.saturating_sub(wait / 4 * jitter as u32 / 1000)
}
