//! The revenue schedules last built, kept until what they were built from changes: the
//! applier says when it writes an invoice, credit note, charge or customer (and, on PostgreSQL,
//! every replica hears the others' changes), and metering says when usage arrives that a
//! metered line's schedule read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Schedule, load::load_spanned};
use crate::catalog::Catalog;
use crate::metrics::Metrics;
use crate::store::{Db, StoreError};

/// Schedules kept at most: every tenant's is one, and each tenant's own another.
const MAX_ENTRIES: usize = 1024;

#[derive(Default)]
pub struct RevenueCache {
    /// Bumped by every change; a schedule built under an older generation is not used.
    generation: AtomicU64,
    /// Bumped by every usage arrival, so that a build it overlapped is not kept.
    arrivals: AtomicU64,
    /// By tenant (`None`: every tenant).
    entries: Mutex<HashMap<Option<String>, Cached>>,
}

struct Cached {
    generation: u64,
    /// The end (Unix ms) of the usage the schedule's metered lines read; usage that happened
    /// before it changes the schedule. `None`: no metered line.
    usage_until_ms: Option<i64>,
    schedule: Arc<Schedule>,
}

impl RevenueCache {
    /// Invoices, credit notes, charges or tenant links changed: every schedule is stale.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lock().clear();
    }

    /// Usage that happened at `earliest_ms` or later arrived: schedules that read usage past
    /// that point are stale.
    pub fn usage_arrived(&self, earliest_ms: i64) {
        self.arrivals.fetch_add(1, Ordering::SeqCst);
        let mut entries = self.lock();
        if entries.is_empty() {
            return;
        }
        entries.retain(|_, c| c.usage_until_ms.is_none_or(|until| until <= earliest_ms));
    }

    /// The schedule of `tenant` (or every tenant), built again only when something it was
    /// built from changed since; rebuilds are counted in `billsync_revenue_rebuilds_total`.
    pub async fn schedule(
        &self,
        (db, catalog, metrics): (&Db, &Catalog, &Metrics),
        tenant: Option<&str>,
    ) -> Result<Arc<Schedule>, StoreError> {
        let key = tenant.map(str::to_owned);
        let generation = self.generation.load(Ordering::SeqCst);
        let arrivals = self.arrivals.load(Ordering::SeqCst);
        if let Some(cached) = self.lock().get(&key).filter(|c| c.generation == generation) {
            return Ok(cached.schedule.clone());
        }
        // Read after the generation: a change during the build leaves a stale generation on
        // the entry, and the next request builds again.
        let (schedule, usage_until_ms) = load_spanned(db, catalog, tenant).await?;
        metrics.inc(
            "billsync_revenue_rebuilds_total",
            "Revenue schedules built from the mirror (the others were answered from the cache).",
            &[],
        );
        let schedule = Arc::new(schedule);
        let mut entries = self.lock();
        // Usage that arrived while the build read may be missing from it: not kept.
        if usage_until_ms.is_some() && self.arrivals.load(Ordering::SeqCst) != arrivals {
            return Ok(schedule);
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            key,
            Cached {
                generation,
                usage_until_ms,
                schedule: schedule.clone(),
            },
        );
        Ok(schedule)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Option<String>, Cached>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}
