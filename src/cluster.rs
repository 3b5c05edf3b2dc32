//! Several replicas on one PostgreSQL.
//!
//! - Singleton jobs (events poller, drift sweep, pusher, usage snapshot, scheduled
//!   reconciliation, open period check) each run on the one replica holding their lease
//!   ([`with_lease`]); when it dies, its leases are free at once and another replica takes each
//!   at its next try (every [`LEASE_RETRY`]).
//! - Work queues (inbox, outbox, pushes) are claimed row by row with `FOR UPDATE SKIP LOCKED`
//!   (see the stores), and the claim is renewed while the work runs ([`ClaimRenewal`]): a
//!   healthy replica's work is never taken over, a dead one's is once its claim runs out.
//! - Every replica follows the others' changes through `LISTEN/NOTIFY` ([`follow_changes`]):
//!   `billsync_entitlements` (sent by database triggers whenever a tenant or a mirrored object
//!   changes) drops entitlement models; `billsync_usage` (sent with every usage insert) carries
//!   the new usage into the counters.
//!
//! On SQLite there is one process: it holds every lease and needs no notifications.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::entitlements::Entitlements;
use crate::metering::{Heard, Metering};
use crate::metrics::Metrics;
use crate::store::{Db, LeaseSeat, Queue, StoreError, TxSnapshot, now_ms};

/// Every singleton job's lease name (`spawn_singleton` in app.rs).
pub const SINGLETON_JOBS: &[&str] = &[
    "notify",
    "open_check",
    "poller",
    "pusher",
    "reconcile",
    "snapshot",
    "sweep",
];

/// How often a replica without a lease tries to take it, and how often a holder checks that
/// it still holds it.
pub const LEASE_RETRY: Duration = Duration::from_secs(2);

/// The channels every replica listens on.
pub const ENTITLEMENTS_CHANNEL: &str = "billsync_entitlements";
pub const USAGE_CHANNEL: &str = "billsync_usage";
/// Vendor sync's health, from the replica running the sweep and the poller: `ok <ms>` (a
/// sweep confirmed the vendor's state then) or `failed`.
pub const HEALTH_CHANNEL: &str = "billsync_health";
/// The sync_state row holding when the last sweep confirmed the vendor's state (for replicas
/// that start later).
pub const CONFIRMED_AT: &str = "sweep.confirmed_at";

/// Tells every replica how vendor sync is doing: confirmed at `Some(ms)`, or failing.
pub async fn tell_health(db: &Db, confirmed_at: Option<i64>) {
    let payload = confirmed_at.map_or_else(|| "failed".to_owned(), |at| format!("ok {at}"));
    if let Err(error) = db.notify(HEALTH_CHANNEL, &payload).await {
        tracing::debug!(error = %error, "cannot tell the other replicas about sync health");
    }
}

/// An id for this process, unique among replicas: host, process id and start time.
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{host}-{}-{}",
        std::process::id(),
        crate::store::now_ms() % 1_000_000
    )
}

/// Runs the singleton job `job` whenever this replica holds the lease `name`, until
/// `shutdown`. A holder that loses its lease (its database connection failed) stops the job
/// (the token `job` gets is cancelled) and tries again like any other replica.
pub async fn with_lease<F, Fut>(
    db: Db,
    name: &'static str,
    holder: Arc<str>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    job: F,
) where
    F: Fn(CancellationToken) -> Fut + Send,
    Fut: Future<Output = ()> + Send,
{
    let held = |value: f64| {
        metrics.set(
            "billsync_lease_held",
            "1 while this replica holds the lease and runs its singleton job, else 0.",
            &[("lease", name)],
            value,
        )
    };
    held(0.0);
    let mut seat = LeaseSeat::new(&db, name, &holder);
    let mut standing_by = false;
    while !shutdown.is_cancelled() {
        match seat.try_take().await {
            Ok(true) => {
                tracing::info!(lease = name, "lease taken: this replica runs the job");
                standing_by = false;
                held(1.0);
                let token = shutdown.child_token();
                let mut running = std::pin::pin!(job(token.clone()));
                loop {
                    tokio::select! {
                        () = &mut running => break,
                        () = tokio::time::sleep(LEASE_RETRY) => {
                            if !seat.still_held().await {
                                tracing::warn!(lease = name, "lease lost (its database connection failed): stopping the job");
                                token.cancel();
                                (&mut running).await;
                                break;
                            }
                        }
                    }
                }
                held(0.0);
                seat.release().await;
            }
            Ok(false) => {
                if !standing_by {
                    tracing::info!(lease = name, "lease held by another replica: standing by");
                    standing_by = true;
                }
            }
            Err(error) => {
                tracing::warn!(lease = name, error = %error, "cannot try the lease; trying again")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(LEASE_RETRY) => {}
        }
    }
}

/// Keeps a claim on queued rows while the work on them runs: every third of the claim time it
/// moves the claim on, on the rows still held (see [`crate::store::Claims::renew`]). A row
/// this replica no longer holds although it did not let go of it was claimed by another
/// replica after a renewal came too late (a stalled database): that is logged and counted, and
/// the work goes on (the same idempotency keys make a repeat harmless). Renewal stops with
/// [`ClaimRenewal::finish`], or when the guard is dropped.
pub struct ClaimRenewal {
    held: Arc<Mutex<HashSet<String>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ClaimRenewal {
    /// Starts renewing the claim on `ids` of `queue`, which runs until `until` (Unix ms).
    pub fn start(
        db: Db,
        queue: Queue,
        ids: Vec<String>,
        until: i64,
        claim: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let held = Arc::new(Mutex::new(ids.into_iter().collect()));
        let stop = CancellationToken::new();
        let renewer = Renewer {
            db,
            queue,
            held: held.clone(),
            claim,
            metrics,
        };
        let task = tokio::spawn(renewer.run(until, stop.clone()));
        Self { held, stop, task }
    }

    /// The work is done with `id` and is about to settle it: it is no longer renewed.
    pub fn let_go(&self, id: &str) {
        self.held.lock().expect("claim set").remove(id);
    }

    /// Stops renewing; once this returns, no renewal touches the rows again.
    pub async fn finish(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for ClaimRenewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Renewer {
    db: Db,
    queue: Queue,
    held: Arc<Mutex<HashSet<String>>>,
    claim: Duration,
    metrics: Arc<Metrics>,
}

impl Renewer {
    async fn run(self, mut until: i64, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.claim / 3) => {}
            }
            let ids: Vec<String> = self
                .held
                .lock()
                .expect("claim set")
                .iter()
                .cloned()
                .collect();
            if ids.is_empty() {
                break;
            }
            let next = now_ms() + self.claim.as_millis() as i64;
            match self.db.claims().renew(self.queue, &ids, until, next).await {
                Ok(renewed) => {
                    until = next;
                    self.keep(renewed);
                }
                // The claim still runs until `until`: try again at the next tick.
                Err(error) => {
                    tracing::warn!(queue = self.queue.as_str(), error = %error, "cannot renew a claim; trying again")
                }
            }
        }
    }

    /// Keeps holding the rows renewed; the others still held were lost.
    fn keep(&self, renewed: Vec<String>) {
        let renewed: HashSet<String> = renewed.into_iter().collect();
        let mut held = self.held.lock().expect("claim set");
        let lost: Vec<String> = held.difference(&renewed).cloned().collect();
        held.retain(|id| renewed.contains(id));
        drop(held);
        if lost.is_empty() {
            return;
        }
        tracing::warn!(
            queue = self.queue.as_str(),
            rows = ?lost,
            "claim lost: another replica may repeat this work (safely: same idempotency keys)"
        );
        self.metrics.add(
            "billsync_claims_lost_total",
            "Queued rows whose claim another replica took while this one was still working on them.",
            &[("queue", self.queue.as_str())],
            lost.len() as u64,
        );
    }
}

/// A `LISTEN` connection on both channels, opened before the counters are first built so
/// that no change falls between the two.
pub struct ChangeFeed {
    listener: PgListener,
    pool: sqlx::PgPool,
}

impl ChangeFeed {
    /// `None` on SQLite.
    pub async fn open(db: &Db) -> Result<Option<Self>, StoreError> {
        let Db::Postgres(pool) = db else {
            return Ok(None);
        };
        Ok(Some(Self {
            listener: Self::listen(pool).await?,
            pool: pool.clone(),
        }))
    }

    async fn listen(pool: &sqlx::PgPool) -> Result<PgListener, StoreError> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener
            .listen_all([ENTITLEMENTS_CHANNEL, USAGE_CHANNEL, HEALTH_CHANNEL])
            .await?;
        Ok(listener)
    }

    /// A new `LISTEN` connection, listening before anything is read again.
    async fn reopen(&mut self) -> Result<(), StoreError> {
        self.listener = Self::listen(&self.pool).await?;
        Ok(())
    }
}

/// Applies the other replicas' changes to this one's entitlement models and usage counters,
/// until `shutdown`. `seen`: the transactions the counters' last rebuild read. After the
/// connection drops (notifications may have been missed), every model is dropped and the
/// counters are rebuilt.
pub async fn follow_changes(
    mut feed: ChangeFeed,
    mut seen: Option<TxSnapshot>,
    entitlements: Entitlements,
    metering: Metering,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut resync = false;
    while !shutdown.is_cancelled() {
        if resync {
            // Listen again first, then read: nothing another replica commits falls in between.
            // Models are dropped only once the database answers again: while it is down nothing
            // can change, and warm tenants keep being answered from memory.
            let rebuilt = match feed.reopen().await {
                Ok(()) => metering.rebuild().await,
                Err(error) => Err(error),
            };
            match rebuilt {
                Ok((replayed, snapshot)) => {
                    entitlements.invalidate_all();
                    metering.revenue.changed();
                    tracing::info!(
                        replayed,
                        "usage counters rebuilt after a missed notification"
                    );
                    seen = snapshot;
                    resync = false;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot rebuild the usage counters; trying again");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(LEASE_RETRY) => {}
                    }
                    continue;
                }
            }
        }
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            received = feed.listener.try_recv() => received,
        };
        match received {
            Ok(Some(notification)) => {
                let payload = notification.payload();
                match notification.channel() {
                    // A tenant or a mirrored object changed on another replica.
                    ENTITLEMENTS_CHANNEL if payload == "*" => {
                        entitlements.invalidate_all();
                        metering.revenue.changed();
                    }
                    ENTITLEMENTS_CHANNEL => {
                        entitlements.invalidate(payload);
                        metering.revenue.changed();
                    }
                    HEALTH_CHANNEL => match payload.strip_prefix("ok ").map(str::parse::<i64>) {
                        Some(Ok(at)) => entitlements.health.confirmed(at),
                        _ => entitlements.health.failed(),
                    },
                    USAGE_CHANNEL => match metering.hear(payload, seen.as_ref()) {
                        Heard::Counted => metrics.inc(
                            "billsync_usage_notifications_total",
                            "Usage announcements from other replicas counted here.",
                            &[],
                        ),
                        Heard::Known => {}
                        Heard::Resync => resync = true,
                    },
                    _ => {}
                }
            }
            // The connection dropped and was opened again: what was sent meanwhile is lost.
            Ok(None) => {
                tracing::warn!("change notifications interrupted: resynchronising");
                resync = true;
            }
            Err(error) => {
                tracing::warn!(error = %error, "change notifications failed; reconnecting");
                resync = true;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(LEASE_RETRY) => {}
                }
            }
        }
    }
}
