#![doc = include_str!("../README.md")]

mod credits;
mod error;
mod http;
mod options;
mod replica;
mod sse;
mod stream;
mod usage;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

pub use billsync_rules::reason;
pub use credits::{
    Balance, BurnEntry, CreditCheck, CreditPrice, CreditSettings, CreditSettingsUpdate,
    CreditsPage, GrantEntry, LedgerEntry, Notification, NotificationQuery, NotificationsPage, Page,
};
pub use error::Error;
pub use options::{LocalUsage, Metrics, NoMetrics, Options, Staleness};
pub use usage::UsageEvent;

use replica::Replica;
use usage::Buffer;

/// A check's answer, as `POST /v1/tenants/{t}/entitlements/check` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub allowed: bool,
    /// One of [`reason`]'s constants (`ok`, `unknown_tenant`, `limit_exceeded`,
    /// `insufficient_credits`, `needs_server`, ...).
    pub reason: Cow<'static, str>,
    /// The quota's limit; `None`: unlimited, or not a quota.
    pub limit: Option<i64>,
    /// The quota's usage in the period, this process's recorded usage included.
    pub used: Option<Decimal>,
    /// `limit - used`, never below zero; `None` if unlimited or not a quota.
    pub remaining: Option<Decimal>,
    /// When the tenant's vendor state was last confirmed (RFC 3339), as the server said.
    pub as_of: Option<Arc<str>>,
    /// The server said the tenant's state is stale, or the replica is (the stream has been
    /// down longer than the staleness allowed).
    pub stale: bool,
    /// Only from `check_and_record`: whether the usage was recorded.
    pub recorded: Option<bool>,
    /// Only from the server, for a credit-priced feature: the unit, the cost, the balance.
    /// There, `used` is the balance's `burned` and `remaining` its `available`.
    pub credits: Option<CreditCheck>,
}

impl Check {
    /// The server's answer for a tenant that does not exist.
    fn unknown_tenant(stale: bool) -> Self {
        Self {
            allowed: false,
            reason: Cow::Borrowed(reason::UNKNOWN_TENANT),
            limit: None,
            used: None,
            remaining: None,
            as_of: None,
            stale,
            recorded: None,
            credits: None,
        }
    }
}

/// What the client has done so far, for tests and dashboards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whether the stream is live (its `ready` arrived and it has not ended since).
    pub connected: bool,
    /// Streams that reached `ready`.
    pub readies: u64,
    /// Of those, streams that resumed from the client's cursor (`ready` with `resumed: true`).
    pub resumes: u64,
    /// Times the client connected again after a stream ended or failed.
    pub reconnects: u64,
    /// The last cursor seen.
    pub cursor: Option<String>,
    /// Tenants in the replica.
    pub tenants: usize,
    /// Usage events waiting or in flight.
    pub buffered: usize,
    /// Usage events the server accepted (or had already).
    pub sent: u64,
    /// Usage events the server refused: dropped.
    pub dropped: u64,
}

/// An in-process billsync client: entitlement checks answered from a replica kept current by
/// the server's change stream, and usage recorded into a buffer sent in batches.
///
/// Cheap to clone; the tasks stop when [`Client::shutdown`] is called or the last clone is
/// dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        for task in self.tasks.get_mut().map(std::mem::take).unwrap_or_default() {
            task.abort();
        }
    }
}

/// What the tasks and the handle share.
pub(crate) struct Shared {
    pub base: reqwest::Url,
    pub api_key: String,
    pub http: reqwest::Client,
    pub options: Options,
    pub replica: RwLock<Replica>,
    pub buffer: Mutex<Buffer>,
    /// A full batch is waiting.
    pub flush_now: Notify,
    /// `true`: stop (shutdown, or the handle dropped).
    pub stop: watch::Sender<bool>,
    /// `record` refuses once shutdown began.
    pub closed: AtomicBool,
    pub started: Instant,
    /// Milliseconds after `started` since when the stream has been down; `u64::MAX`: live.
    pub down_since: AtomicU64,
    pub stats: Mutex<Stats>,
}

impl Shared {
    pub fn lock_stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn replica_read(&self) -> std::sync::RwLockReadGuard<'_, Replica> {
        self.replica.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn replica_write(&self) -> std::sync::RwLockWriteGuard<'_, Replica> {
        self.replica.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream went down now (if it was live).
    pub fn mark_down(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let _ =
            (self.down_since).compare_exchange(u64::MAX, now, Ordering::Relaxed, Ordering::Relaxed);
        self.lock_stats().connected = false;
    }

    pub fn mark_live(&self) {
        self.down_since.store(u64::MAX, Ordering::Relaxed);
        self.lock_stats().connected = true;
    }

    /// How long the replica has not been known current.
    pub fn replica_age(&self) -> Duration {
        match self.down_since.load(Ordering::Relaxed) {
            u64::MAX => Duration::ZERO,
            since => self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(since)),
        }
    }

    fn replica_stale(&self, replica: &Replica) -> bool {
        let allowed = (self.options.max_staleness)
            .or(replica.stale_after)
            .unwrap_or(Duration::from_secs(600));
        self.replica_age() > allowed
    }
}

impl Client {
    /// Connects to the billsync server at `url` (`http://host:port`) with an API key, and
    /// returns once the replica is complete (the stream's first `ready`), or with an error:
    /// an error answer from the server (a bad key: 401), or [`Error::Timeout`].
    ///
    /// Needs a tokio runtime. Installs rustls' ring provider if none is installed.
    pub async fn connect(url: &str, api_key: &str, options: Options) -> Result<Self, Error> {
        let mut base = reqwest::Url::parse(url).map_err(|_| Error::InvalidUrl(url.to_owned()))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(Error::InvalidUrl(url.to_owned()));
        }
        base.path_segments_mut()
            .map_err(|()| Error::InvalidUrl(url.to_owned()))?
            .pop_if_empty();
        // "Already installed" is fine: the embedding service may have done it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(options.request_timeout)
            .build()?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            base,
            api_key: api_key.to_owned(),
            http,
            replica: RwLock::new(Replica::default()),
            buffer: Mutex::new(Buffer::default()),
            flush_now: Notify::new(),
            stop,
            closed: AtomicBool::new(false),
            started: Instant::now(),
            down_since: AtomicU64::new(0),
            stats: Mutex::new(Stats::default()),
            options,
        });
        let (first_tx, first_rx) = oneshot::channel();
        let tasks = vec![
            tokio::spawn(stream::run(shared.clone(), first_tx)),
            tokio::spawn(usage::run(shared.clone())),
        ];
        let client = Self {
            inner: Arc::new(Inner {
                shared: shared.clone(),
                tasks: Mutex::new(tasks),
            }),
        };
        let timeout = shared.options.connect_timeout;
        match tokio::time::timeout(timeout, first_rx).await {
            Ok(Ok(Ok(()))) => Ok(client),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Whether `quantity` more of `feature` is allowed for `tenant`, from memory, by the same
    /// rules as the server. When the replica is stale and `Options::staleness` is
    /// [`Staleness::AskServer`], the server is asked instead (falling back to memory).
    ///
    /// A credit-priced feature is always asked of the server (its balance is live); if the
    /// server cannot be reached, the answer is not allowed, [`reason::NEEDS_SERVER`].
    pub async fn check(&self, tenant: &str, feature: &str, quantity: Decimal) -> Check {
        let (answer, replica_stale) = self.check_memory(tenant, feature, quantity);
        let needs_server = answer.reason == reason::NEEDS_SERVER;
        let ask_when_stale = self.shared().options.staleness == Staleness::AskServer;
        let ask = needs_server || (replica_stale && ask_when_stale);
        if !ask {
            return answer;
        }
        match http::check(self.shared(), tenant, feature, quantity, None).await {
            Ok(from_server) => from_server,
            Err(error) => {
                tracing::warn!(%error, tenant, feature, "billsync: the server could not be asked; answering from memory");
                answer
            }
        }
    }

    /// [`Self::check`] from memory only, whatever the staleness: never waits. A credit-priced
    /// feature is answered not allowed, [`reason::NEEDS_SERVER`]: memory holds no live
    /// balance. Ask the server ([`Self::check`], [`Self::check_and_record`]) for those.
    pub fn check_in_memory(&self, tenant: &str, feature: &str, quantity: Decimal) -> Check {
        self.check_memory(tenant, feature, quantity).0
    }

    /// The memory answer, and whether the replica itself is stale.
    fn check_memory(&self, tenant: &str, feature: &str, quantity: Decimal) -> (Check, bool) {
        let shared = self.shared();
        let replica = shared.replica_read();
        let replica_stale = shared.replica_stale(&replica);
        let mut answer = (replica.check(tenant, feature, quantity))
            .unwrap_or_else(|| Check::unknown_tenant(false));
        answer.stale |= replica_stale;
        (answer, replica_stale)
    }

    /// Records usage: buffered at once (or refused with [`Error::BufferFull`], never dropped
    /// silently), counted at once in the replica's `used` for sum meters (see
    /// [`LocalUsage`]), and sent to `POST /v1/usage` in the next batch. `id` makes the event
    /// count once, however often a batch is sent again.
    pub fn record(
        &self,
        tenant: &str,
        meter: &str,
        quantity: Decimal,
        id: &str,
    ) -> Result<(), Error> {
        let event = UsageEvent::now(id, tenant, meter, quantity);
        usage::record(self.shared(), event)
    }

    /// Checks and records in one atomic step on the server
    /// (`POST /v1/tenants/{t}/entitlements/check` with `record: {id}`): the last unit of a
    /// quota goes once across every client and replica. Retrying with the same `id` is safe.
    /// For a credit-priced feature the server burns the credits in the same step (refused
    /// with [`reason::INSUFFICIENT_CREDITS`] when the balance cannot cover the cost) and
    /// [`Check::credits`] holds the balance after it.
    pub async fn check_and_record(
        &self,
        tenant: &str,
        feature: &str,
        quantity: Decimal,
        id: &str,
    ) -> Result<Check, Error> {
        let shared = self.shared();
        let answer = http::check(shared, tenant, feature, quantity, Some(id)).await?;
        if answer.recorded == Some(true)
            && let Some(used) = answer.used
        {
            // The server's figure holds this record: the replica need not wait for the stream.
            let mut replica = shared.replica_write();
            let meter = (replica.tenant(tenant))
                .and_then(|state| state.grants.meter(feature))
                .map(str::to_owned);
            if let Some(meter) = meter {
                replica.set_used(tenant, &meter, used);
            }
        }
        Ok(answer)
    }

    /// Whether the replica itself is stale: the stream has been down longer than
    /// `Options::max_staleness` (or the server's `stale_after`). A tenant's state may also be
    /// stale by the server's own account; [`Check::stale`] says either.
    pub fn is_stale(&self) -> bool {
        let shared = self.shared();
        shared.replica_stale(&shared.replica_read())
    }

    /// What the client has done so far.
    pub fn stats(&self) -> Stats {
        let shared = self.shared();
        let tenants = shared.replica_read().len();
        let buffered = usage::buffered(shared);
        let mut stats = shared.lock_stats().clone();
        stats.tenants = tenants;
        stats.buffered = buffered;
        stats
    }

    /// Sends the buffered usage (waiting at most `Options::shutdown_timeout`) and stops the
    /// tasks. Usage recorded afterwards is refused with [`Error::Closed`]; events the server
    /// did not accept in time are reported as [`Error::Unflushed`].
    pub async fn shutdown(&self) -> Result<(), Error> {
        let shared = self.shared();
        shared.closed.store(true, Ordering::SeqCst);
        shared.stop.send_replace(true);
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = tokio::time::Instant::now() + shared.options.shutdown_timeout;
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        match usage::buffered(shared) {
            0 => Ok(()),
            left => {
                tracing::error!(
                    events = left,
                    "billsync: usage not sent before shutdown's deadline"
                );
                Err(Error::Unflushed(left))
            }
        }
    }
}
