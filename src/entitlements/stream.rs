//! The entitlement change stream's server side: the [`Hub`] follows the change log (written by
//! database triggers, so every replica reads the same cursors) and this process's usage
//! counters, and broadcasts each tenant's new state and its quotas' coalesced usage to the open
//! streams (`api::stream`), which filter them by key.
//!
//! A broadcast receiver that falls behind by more than the channel holds is told so
//! (`Lagged`): its stream is closed with its cursor, so that memory never grows with a slow
//! consumer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::model::Grant;
use super::{Entitlements, PlanCatalog, Standing, TenantModel};
use crate::domain::rfc3339;
use crate::store::{StoreError, now_ms};

/// Changes read from the log per query.
const PAGE: u32 = 1000;
/// How often the change log is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// What the hub tells the open streams.
#[derive(Debug, Clone)]
pub enum Change {
    /// A tenant's state after change `seq`; `None`: it is gone.
    Tenant {
        seq: i64,
        tenant: String,
        state: Option<Arc<Value>>,
    },
    /// Every tenant's state may have changed as of `seq` (a product, price or plan changed, the
    /// catalog was reloaded, the usage counters were rebuilt).
    All { seq: i64 },
    /// A tenant's usage of one meter, at `at` (Unix ms, this server's clock).
    Usage {
        tenant: String,
        meter: String,
        used: String,
        at: i64,
    },
}

/// The broadcaster: one per process.
pub struct Hub {
    tx: broadcast::Sender<Arc<Change>>,
    /// When time alone changes a state sent (its period ends, a grace runs out): the tenant's
    /// state is sent again then.
    expiries: std::sync::Mutex<std::collections::BTreeSet<(i64, String)>>,
    /// Cancelled when the service stops: the streams say goodbye and end.
    closing: CancellationToken,
}

impl Hub {
    /// A hub whose receivers may fall `capacity` changes behind before they are dropped.
    pub fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity).0,
            expiries: Default::default(),
            closing: CancellationToken::new(),
        }
    }

    /// Cancelled when the service stops.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Notes that a state sent changes with time at `expires_at` (Unix ms; `i64::MAX`: never).
    pub fn sent(&self, tenant: &str, expires_at: i64) {
        if expires_at < i64::MAX {
            let mut expiries = self.expiries.lock().expect("expiries lock");
            expiries.insert((expires_at, tenant.to_owned()));
        }
    }

    /// The tenants whose states sent have expired by `now`, each once.
    fn expired(&self, now: i64) -> std::collections::BTreeSet<String> {
        let mut expiries = self.expiries.lock().expect("expiries lock");
        let later = expiries.split_off(&(now, String::new()));
        let due = std::mem::replace(&mut *expiries, later);
        due.into_iter().map(|(_, tenant)| tenant).collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    fn send(&self, change: Change) {
        // No receiver: nobody listens, nothing to do.
        let _ = self.tx.send(Arc::new(change));
    }

    /// Follows the change log after `from` (the newest change before any stream was opened)
    /// and the counters, every `every` until `shutdown`; prunes changes older than
    /// `retention`.
    pub async fn run(
        self: Arc<Self>,
        entitlements: Entitlements,
        from: i64,
        every: Duration,
        retention: Duration,
        shutdown: CancellationToken,
    ) {
        let mut follower = Follower {
            hub: self,
            plans: entitlements.plans(),
            entitlements,
            last: from,
            pruned_at: std::time::Instant::now(),
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    follower.hub.closing.cancel();
                    break;
                }
                () = tokio::time::sleep(every) => {}
            }
            if let Err(error) = follower.step(retention).await {
                tracing::warn!(error = %error, "entitlement stream: cannot read the change log");
            }
        }
    }
}

struct Follower {
    hub: Arc<Hub>,
    entitlements: Entitlements,
    /// The last change read.
    last: i64,
    plans: Arc<PlanCatalog>,
    pruned_at: std::time::Instant,
}

impl Follower {
    async fn step(&mut self, retention: Duration) -> Result<(), StoreError> {
        let db = &self.entitlements.db;
        let mut last = self.last;
        loop {
            let changes = db.changes().after(last, PAGE).await?;
            for change in &changes {
                last = change.seq;
                match &change.tenant_id {
                    None => self.everyone(change.seq),
                    Some(tenant) => self.tenant(change.seq, tenant).await?,
                }
            }
            self.last = last;
            if changes.len() < PAGE as usize {
                break;
            }
        }
        let plans = self.entitlements.plans();
        if !Arc::ptr_eq(&self.plans, &plans) {
            self.plans = plans;
            self.hub.send(Change::All { seq: last });
        }
        self.usage(last).await?;
        for tenant in self.hub.expired(now_ms()) {
            self.tenant(last, &tenant).await?;
        }
        if self.pruned_at.elapsed() >= PRUNE_EVERY {
            self.pruned_at = std::time::Instant::now();
            db.changes()
                .prune(now_ms() - retention.as_millis() as i64)
                .await?;
        }
        Ok(())
    }

    fn everyone(&self, seq: i64) {
        self.entitlements.invalidate_all();
        self.hub.send(Change::All { seq });
    }

    /// The tenant's state as of now, which includes change `seq` (read after it committed).
    async fn tenant(&self, seq: i64, tenant: &str) -> Result<(), StoreError> {
        if self.hub.tx.receiver_count() == 0 {
            return Ok(());
        }
        // Another replica's change may not have reached this one's models yet.
        self.entitlements.invalidate(tenant);
        let model = self.entitlements.model(tenant).await?;
        let state = model.map(|model| {
            self.hub.sent(tenant, model.expires_at);
            Arc::new(self.entitlements.state_of(&model, now_ms()))
        });
        self.hub.send(Change::Tenant {
            seq,
            tenant: tenant.to_owned(),
            state,
        });
        Ok(())
    }

    /// The quotas whose counts changed since the last step, once each.
    async fn usage(&self, seq: i64) -> Result<(), StoreError> {
        let touched = self.entitlements.metering.counters.take_touched();
        if self.hub.tx.receiver_count() == 0 {
            return Ok(());
        }
        if touched.all {
            self.hub.send(Change::All { seq });
            return Ok(());
        }
        let at = now_ms();
        for (tenant, meters) in touched.meters {
            let Some(model) = self.entitlements.model(&tenant).await? else {
                continue;
            };
            for meter in meters {
                let quota = (model.features.values())
                    .any(|g| matches!(g, Grant::Quota { meter: m, .. } if *m == meter));
                if quota {
                    let used = self.entitlements.used(&model, &meter);
                    self.hub.send(Change::Usage {
                        tenant: tenant.clone(),
                        meter,
                        used: used.normalize().to_string(),
                        at,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Entitlements {
    /// A model as the stream sends it: everything a client needs to decide a check as this
    /// server does.
    pub fn state_of(&self, model: &TenantModel, now: i64) -> Value {
        let (as_of, stale) = self.freshness(model, now);
        let features: BTreeMap<&str, Value> = (model.features.iter())
            .map(|(name, grant)| {
                let value = match grant {
                    Grant::Boolean { enabled } => json!({"kind": "boolean", "enabled": enabled}),
                    Grant::Quota { limit, meter } => json!({"kind": "quota", "limit": limit,
                        "meter": meter, "used": self.used(model, meter).normalize().to_string()}),
                };
                (name.as_str(), value)
            })
            .collect();
        json!({
            "tenant_id": model.tenant_id,
            "plan": model.plan,
            "status": model.status,
            "standing": standing_name(model.standing),
            "synced": model.as_of.is_some(),
            "features": features,
            "period_start": rfc3339(model.period.0),
            "period_end": rfc3339(model.period.1),
            "as_of": as_of.map(rfc3339),
            "stale": stale,
            "expires_at": (model.expires_at < i64::MAX).then(|| rfc3339(model.expires_at)),
        })
    }
}

/// The standing's name on the wire.
pub fn standing_name(standing: Standing) -> &'static str {
    match standing {
        Standing::Subscribed => "subscribed",
        Standing::Free => "free",
        Standing::NoSubscription => "no_subscription",
        Standing::Inactive => "inactive",
    }
}
