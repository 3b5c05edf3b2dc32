//! The continuous check of open periods: between scheduled runs, the open period of each tenant
//! and meter whose pushes have settled since the last pass is compared with the vendor's meter,
//! as a run compares it, within a budget of vendor calls per window. Its findings are logged and
//! counted in `billsync_reconcile_open_findings`; no run is stored. With `reconcile.repair` on,
//! what Stripe lost is pushed again (see `usage::repair`).
//!
//! Draft invoices come first: each is checked once, as soon as the applier records it (it wakes
//! the check) or the next pass sees it, as a stored run (trigger `draft_invoice`) over its
//! metered lines, and repaired while Stripe still holds it as a draft (about an hour).
//!
//! Its state (the watermark, the pairs carried over, the budget spent and the current findings)
//! is one `sync_state` row, so that a replica taking the lease over goes on where it stopped.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Finding, Item, Params, Reconciler};
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::store::{Db, StoreError, now_ms};

/// The `sync_state` row holding the check's [`State`].
pub const STATE: &str = "open_check.state";

const GAUGE: &str = "billsync_reconcile_open_findings";
const GAUGE_HELP: &str = "Tenant and meter open periods in this state as of their last check.";

/// What a pass leaves for the next, whichever replica runs it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Pushes sent from here on (Unix ms) have not been looked at yet.
    pub watermark: i64,
    /// (tenant, meter) pairs due for a check that the budget left for later, oldest first.
    pub pending: VecDeque<(String, String)>,
    /// The budget's current window: its start (Unix ms) and the calls spent in it.
    pub window_start: i64,
    pub spent: usize,
    /// (tenant, meter) → its open finding, as of its last check.
    pub findings: BTreeMap<String, BTreeMap<String, Finding>>,
    /// The draft invoices checked, with their runs; forgotten once they are final.
    #[serde(default)]
    pub drafts: BTreeMap<String, String>,
}

impl State {
    pub async fn load(db: &Db) -> Result<Self, StoreError> {
        let stored = db.sync_state().get(STATE).await?;
        Ok(stored
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default())
    }

    pub async fn save(&self, db: &Db) -> Result<(), StoreError> {
        let stored = serde_json::to_string(self).expect("the open check's state serializes");
        db.sync_state().set(STATE, &stored, now_ms()).await
    }

    /// How many open periods are in each finding.
    pub fn counts(&self) -> [(Finding, usize); 2] {
        [Finding::VendorMissing, Finding::VendorExtra].map(|kind| {
            let n = (self.findings.values().flat_map(|m| m.values()))
                .filter(|f| **f == kind)
                .count();
            (kind, n)
        })
    }

    /// Sets `billsync_reconcile_open_findings` from the findings.
    pub fn export(&self, metrics: &Metrics) {
        for (finding, n) in self.counts() {
            metrics.set(
                GAUGE,
                GAUGE_HELP,
                &[("finding", finding.as_str())],
                n as f64,
            );
        }
    }
}

/// The job: a pass every `interval`, at most `budget` vendor calls per `window`.
pub struct OpenCheck {
    pub reconciler: Reconciler,
    pub interval: Duration,
    pub budget: usize,
    pub window: Duration,
    /// Woken when a draft invoice is applied.
    pub drafts: Arc<Notify>,
}

impl OpenCheck {
    /// Runs a pass every `interval` until `shutdown` (the lease's token).
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
                () = self.drafts.notified() => {}
            }
            if let Err(error) = self.pass(&shutdown).await {
                tracing::warn!(error = %error, "open period check failed; retrying next interval");
            }
        }
    }

    /// One pass: the pairs whose pushes settled since the watermark join those carried over,
    /// and as many as the budget allows are checked; returns how many were checked.
    pub async fn pass(&self, shutdown: &CancellationToken) -> Result<usize, WorkError> {
        let db = &self.reconciler.db;
        let mut state = State::load(db).await?;
        let now = now_ms();
        // A push sent before the settle point (on the minute, as the open units end) is in the
        // vendor's summaries: its pair is due.
        let settle = now - self.reconciler.settle_delay.as_millis() as i64;
        let settle = settle - settle.rem_euclid(60_000);
        if settle > state.watermark {
            let mut due: HashSet<(String, String)> = state.pending.iter().cloned().collect();
            for pair in db.usage().sent_between(state.watermark, settle).await? {
                if due.insert(pair.clone()) {
                    state.pending.push_back(pair);
                }
            }
            state.watermark = settle;
        }
        if now >= state.window_start + self.window.as_millis() as i64 {
            state.window_start = now;
            state.spent = 0;
        }
        let mut checked = self.check_drafts(&mut state, shutdown).await?;
        while let Some((tenant, _)) = state.pending.front().cloned() {
            if shutdown.is_cancelled() {
                break;
            }
            // A tenant's due meters are checked together: one call per open unit.
            let meters: Vec<String> = (state.pending.iter())
                .filter(|(t, _)| *t == tenant)
                .map(|(_, m)| m.clone())
                .collect();
            let (mut units, open_from) =
                self.reconciler.open_units_of(&tenant, &meters, now).await?;
            // One call per open unit; a tenant with more than the budget is checked in parts.
            let affordable = self.budget.saturating_sub(state.spent);
            if affordable == 0 && !units.is_empty() {
                break;
            }
            let later: Vec<String> = (units.split_off(units.len().min(affordable)).into_iter())
                .map(|u| u.meter)
                .collect();
            state.spent += units.len();
            let items = self
                .reconciler
                .open_items(&tenant, units, &open_from)
                .await?;
            let now_checked: Vec<String> = (meters.into_iter())
                .filter(|m| !later.contains(m))
                .collect();
            state
                .pending
                .retain(|(t, m)| *t != tenant || later.contains(m));
            record(&mut state, &tenant, &now_checked, &items);
            checked += now_checked.len();
        }
        if shutdown.is_cancelled() {
            // The lease may be another replica's now: it goes on from the stored state.
            return Ok(checked);
        }
        state.save(db).await?;
        state.export(&self.reconciler.metrics);
        if !state.pending.is_empty() {
            tracing::debug!(
                checked,
                left = state.pending.len(),
                "open period check: the budget is spent, the rest waits"
            );
        }
        Ok(checked)
    }
}

impl OpenCheck {
    /// Checks each draft invoice not checked yet (oldest first, within the budget: one call per
    /// metered meter), as a stored run; returns how many it checked.
    async fn check_drafts(
        &self,
        state: &mut State,
        shutdown: &CancellationToken,
    ) -> Result<usize, WorkError> {
        let drafts = self.reconciler.db.periods().drafts().await?;
        let current: HashSet<&str> = drafts.iter().map(|(_, i)| i.as_str()).collect();
        state
            .drafts
            .retain(|invoice, _| current.contains(invoice.as_str()));
        let meters = self.reconciler.catalog.meters.values();
        let cost = meters.filter(|m| m.stripe_event_name.is_some()).count();
        let mut checked = 0;
        for (tenant, invoice) in drafts {
            if state.drafts.contains_key(&invoice) {
                continue;
            }
            if shutdown.is_cancelled() || state.spent + cost > self.budget {
                break;
            }
            let params = Params {
                from_ms: 0,
                to_ms: now_ms(),
                tenant: Some(tenant),
                dry_run: false,
                invoice: Some(invoice.clone()),
            };
            state.spent += cost;
            let (run_id, report) = self.reconciler.run(&params, "draft_invoice").await?;
            tracing::info!(
                invoice = invoice.as_str(),
                run_id = run_id.as_str(),
                findings = report.items.len(),
                "draft invoice checked against billsync's usage"
            );
            state.drafts.insert(invoice, run_id);
            checked += 1;
        }
        Ok(checked)
    }
}

/// Keeps the findings of one tenant's checked `meters` (a meter without an item is fine now),
/// and logs what changed.
fn record(state: &mut State, tenant: &str, meters: &[String], items: &[Item]) {
    let current = state.findings.entry(tenant.to_owned()).or_default();
    for meter in meters {
        let item = items.iter().find(|i| i.detail["meter"] == meter.as_str());
        let before = current.get(meter).copied();
        match item {
            Some(item) => {
                if before != Some(item.finding) {
                    tracing::warn!(
                        tenant,
                        meter = meter.as_str(),
                        finding = item.finding.as_str(),
                        pushed = %item.detail["pushed"],
                        vendor = %item.detail["vendor"],
                        period_start = %item.detail["period_start"],
                        "open period differs from the vendor's meter"
                    );
                }
                current.insert(meter.clone(), item.finding);
            }
            None => {
                if let Some(before) = current.remove(meter) {
                    tracing::info!(
                        tenant,
                        meter = meter.as_str(),
                        was = before.as_str(),
                        "open period agrees with the vendor's meter again"
                    );
                }
            }
        }
    }
    if current.is_empty() {
        state.findings.remove(tenant);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn item(finding: Finding, meter: &str) -> Item {
        Item {
            repair: None,
            area: "usage",
            finding,
            tenant_id: Some("acme".to_owned()),
            detail: json!({"meter": meter}),
        }
    }

    #[test]
    fn a_check_keeps_what_it_finds_and_forgets_what_agrees_again() {
        let mut state = State::default();
        let meters = ["calls".to_owned(), "seats".to_owned()];
        let found = [
            item(Finding::VendorMissing, "calls"),
            item(Finding::VendorExtra, "seats"),
        ];
        record(&mut state, "acme", &meters, &found);
        record(&mut state, "globex", &meters[..1], &found[..1]);
        assert_eq!(
            state.counts(),
            [(Finding::VendorMissing, 2), (Finding::VendorExtra, 1)]
        );

        // Only the checked meters change: `seats` of acme stays as last checked.
        record(&mut state, "acme", &meters[..1], &[]);
        record(&mut state, "globex", &meters[..1], &[]);
        assert_eq!(
            state.counts(),
            [(Finding::VendorMissing, 0), (Finding::VendorExtra, 1)]
        );
        assert!(!state.findings.contains_key("globex"));

        let stored = serde_json::to_string(&state).unwrap();
        let loaded: State = serde_json::from_str(&stored).unwrap();
        assert_eq!(loaded.counts(), state.counts());
    }
}
