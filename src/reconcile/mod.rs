//! Reconciliation: every difference between what billsync metered, what it pushed, what the
//! vendor holds and invoiced, and what was paid, itemised with its evidence.
//!
//! A run reads the usage log, the push ledger and the mirror (and asks the vendor for its meter
//! totals and, for drift, its current subscriptions). It writes only its report, and, unless it
//! is a dry run, the vendor states that repair drift (as inbox rows, source `reconcile`, which
//! the applier applies like any other). The same inputs give the same report.

pub mod credits;
pub mod drift;
mod inputs;
pub mod money;
mod open_check;
pub mod usage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::domain::rfc3339;
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::store::{Db, RunRow, StoreError, now_ms};
use crate::stripe::BillingVendor;
use inputs::Scope;
pub use open_check::{OpenCheck, State as OpenCheckState};

/// How often a running reconciliation records that it is still at work.
const RUN_BEAT: Duration = Duration::from_secs(5);
/// A run silent for this long was interrupted (its process stopped).
const RUN_SILENCE: Duration = Duration::from_secs(30);

/// What a reconciliation can find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    // usage
    NotYetPushed,
    RejectedByVendor,
    OutsideVendorWindow,
    ArrivedAfterInvoice,
    InvoiceMissing,
    VendorMismatch,
    VendorMissing,
    VendorExtra,
    InvoiceMismatch,
    Unexplained,
    // money
    MissingPayment,
    PartiallyPaid,
    Overpaid,
    AmountMismatch,
    Refunded,
    Disputed,
    Void,
    Uncollectible,
    CurrencyMismatch,
    // drift
    Drift,
    // credits
    CreditMismatch,
}

impl Finding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotYetPushed => "not_yet_pushed",
            Self::RejectedByVendor => "rejected_by_vendor",
            Self::OutsideVendorWindow => "outside_vendor_window",
            Self::ArrivedAfterInvoice => "arrived_after_invoice",
            Self::InvoiceMissing => "invoice_missing",
            Self::VendorMismatch => "vendor_mismatch",
            Self::VendorMissing => "vendor_missing",
            Self::VendorExtra => "vendor_extra",
            Self::InvoiceMismatch => "invoice_mismatch",
            Self::Unexplained => "unexplained",
            Self::MissingPayment => "missing_payment",
            Self::PartiallyPaid => "partially_paid",
            Self::Overpaid => "overpaid",
            Self::AmountMismatch => "amount_mismatch",
            Self::Refunded => "refunded",
            Self::Disputed => "disputed",
            Self::Void => "void",
            Self::Uncollectible => "uncollectible",
            Self::CurrencyMismatch => "currency_mismatch",
            Self::Drift => "drift",
            Self::CreditMismatch => "credit_mismatch",
        }
    }
}

/// One finding: its area (`usage`, `money`, `drift`), its kind, the tenant, and the figures,
/// cause and evidence.
#[derive(Debug, Clone)]
pub struct Item {
    pub area: &'static str,
    pub finding: Finding,
    pub tenant_id: Option<String>,
    pub detail: Value,
    /// A usage finding's proposed repair, until it is carried out (see [`usage::Repairs`]).
    pub repair: Option<usage::Repair>,
}

impl Item {
    /// The item as the report shows it.
    pub fn to_json(&self) -> Value {
        let mut out = json!({
            "area": self.area,
            "finding": self.finding.as_str(),
            "tenant_id": self.tenant_id,
        });
        if let (Value::Object(out), Value::Object(detail)) = (&mut out, &self.detail) {
            out.extend(detail.clone());
        }
        out
    }
}

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Params {
    /// Unix ms, `[from, to)`.
    pub from_ms: i64,
    pub to_ms: i64,
    pub tenant: Option<String>,
    /// Report drift and lost usage without repairing them.
    pub dry_run: bool,
    /// Only this invoice's metered lines (a draft's check): no payments, no drift.
    pub invoice: Option<String>,
}

/// A finished report: the summary and the items, in report order.
#[derive(Debug, Clone)]
pub struct Report {
    pub summary: Value,
    pub items: Vec<Item>,
}

#[derive(Clone)]
pub struct Reconciler {
    pub db: Db,
    pub vendor: Option<Arc<dyn BillingVendor>>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    /// Wakes the applier after drift repairs are queued.
    pub wake: Arc<Notify>,
    /// Ask the vendor for its meter totals (one call per tenant, meter and period).
    pub vendor_usage: bool,
    /// The open period is compared with the vendor's meter totals up to this long before now.
    pub settle_delay: Duration,
    /// How many tenants (in tenant order) a run over every tenant checks for drift.
    pub drift_sample: usize,
    /// Push usage Stripe lost again (`reconcile.repair`; see [`usage::Repairs`]).
    pub repair: bool,
    /// The longest a repair the vendor did not take waits before it is retried.
    pub max_retry_delay: Duration,
}

impl Reconciler {
    /// Computes the report. Drift repairs are queued unless `params.dry_run`.
    pub async fn report(&self, params: &Params) -> Result<Report, WorkError> {
        let db = &self.db;
        let scope = Scope::of(db, params.tenant.as_deref()).await?;
        if let Some(invoice) = &params.invoice {
            return self.invoice_report(params, &scope, invoice).await;
        }
        // Invoices created in the window, and the payments of the same customers since then.
        let from_s = params.from_ms.div_euclid(1000);
        let to_s = params.to_ms.div_euclid(1000);
        let invoices = scope.invoices(db, from_s, to_s).await?;
        let payments = scope.payments(db, from_s).await?;

        let mut items = self.usage_items(params, &scope, &invoices).await?;
        let usage_items = items.len();
        let money = money::reconcile(&invoices, &payments, now_ms() / 1000);
        items.extend(money.items);
        let (drift, drift_checked) = self.drift_items(params, &scope).await?;
        items.extend(drift);
        items.extend(self.credit_items(params, &scope).await?);

        items
            .sort_by_cached_key(|i| (i.area, i.tenant_id.clone(), i.finding, i.detail.to_string()));
        let summary = summarize(
            params,
            &items,
            usage_items,
            money.matched,
            invoices.len(),
            drift_checked,
            self.vendor.is_some() && self.vendor_usage,
        );
        Ok(Report { summary, items })
    }

    /// Drift: one tenant, or a sample of every tenant, when the vendor can be asked; repairs
    /// are queued unless it is a dry run. Returns the items and how many tenants were checked.
    async fn drift_items(
        &self,
        params: &Params,
        scope: &Scope,
    ) -> Result<(Vec<Item>, usize), WorkError> {
        let Some(vendor) = &self.vendor else {
            return Ok((Vec::new(), 0));
        };
        let sample: Vec<(String, String)> = match &params.tenant {
            Some(_) => scope.linked.clone(),
            None => scope
                .linked
                .iter()
                .take(self.drift_sample)
                .cloned()
                .collect(),
        };
        let (drift, repairs) = drift::check(&self.db, vendor.as_ref(), &sample).await?;
        if !params.dry_run && !repairs.is_empty() {
            self.db.inbox().insert(&repairs, now_ms()).await?;
            tracing::warn!(
                repaired = repairs.len(),
                "reconciliation: drift repaired by applying the vendor's state"
            );
            self.wake.notify_one();
        }
        let items = drift.into_iter().map(|mut item| {
            item.detail["repaired"] = json!(!params.dry_run);
            item
        });
        Ok((items.collect(), sample.len()))
    }

    /// Credits: each linked tenant's burns against Stripe's credit balance transactions, when
    /// the catalog has credit-priced features and the vendor has billing credits.
    async fn credit_items(&self, params: &Params, scope: &Scope) -> Result<Vec<Item>, WorkError> {
        let Some(credits) = self.vendor.as_deref().and_then(|v| v.credits()) else {
            return Ok(Vec::new());
        };
        if self.catalog.credits.is_empty() {
            return Ok(Vec::new());
        }
        let mut items = Vec::new();
        for (tenant, customer) in &scope.linked {
            let found = credits::items(
                &self.db,
                credits,
                &self.catalog.credits,
                (tenant, customer),
                (params.from_ms, params.to_ms),
            )
            .await?;
            items.extend(found);
        }
        Ok(items)
    }

    /// Runs a reconciliation to the end and stores it; returns the run id.
    pub async fn run(&self, params: &Params, trigger: &str) -> Result<(String, Report), WorkError> {
        let run_id = self.begin(params, trigger).await?;
        let report = self.finish(&run_id, params).await?;
        Ok((run_id, report))
    }

    /// Stores a new run as `running`; [`Reconciler::finish`] completes it.
    pub async fn begin(&self, params: &Params, trigger: &str) -> Result<String, StoreError> {
        let run_id = format!("rec_{}", uuid::Uuid::now_v7().simple());
        self.db
            .reconciliations()
            .start(&RunRow {
                run_id: run_id.clone(),
                period_from: params.from_ms,
                period_to: params.to_ms,
                tenant_id: params.tenant.clone(),
                dry_run: params.dry_run,
                trigger: trigger.to_owned(),
                status: "running".to_owned(),
                summary: None,
                error: None,
                started_at: now_ms(),
                finished_at: None,
            })
            .await?;
        Ok(run_id)
    }

    /// Computes the report of a begun run and stores it (or the failure).
    pub async fn finish(&self, run_id: &str, params: &Params) -> Result<Report, WorkError> {
        let started = std::time::Instant::now();
        // The run beats while it works: a run that stops beating was interrupted, whichever
        // replica or command ran it.
        let work = self.report(params);
        tokio::pin!(work);
        let computed = loop {
            tokio::select! {
                computed = &mut work => break computed,
                () = tokio::time::sleep(RUN_BEAT) => {
                    if let Err(error) = self.db.reconciliations().beat(run_id, now_ms()).await {
                        tracing::warn!(run_id, error = %error, "reconciliation heartbeat failed");
                    }
                }
            }
        };
        let report = match computed {
            Ok(report) => report,
            Err(error) => {
                self.db
                    .reconciliations()
                    .fail(run_id, &error.to_string(), now_ms())
                    .await?;
                return Err(error);
            }
        };
        let rows: Vec<(String, String, Option<String>, String)> = report
            .items
            .iter()
            .map(|i| {
                (
                    i.area.to_owned(),
                    i.finding.as_str().to_owned(),
                    i.tenant_id.clone(),
                    i.to_json().to_string(),
                )
            })
            .collect();
        if let Err(error) = self
            .db
            .reconciliations()
            .finish(run_id, &report.summary.to_string(), &rows, now_ms())
            .await
        {
            let message = format!("the report could not be stored: {error}");
            let _ = self
                .db
                .reconciliations()
                .fail(run_id, &message, now_ms())
                .await;
            return Err(error.into());
        }
        self.metrics.set(
            "billsync_reconciliation_open_findings",
            "Findings of the latest reconciliation run.",
            &[],
            report.items.len() as f64,
        );
        self.metrics.observe(
            "billsync_reconciliation_seconds",
            "Time to compute and store one reconciliation report.",
            &[],
            started.elapsed().as_secs_f64(),
        );
        tracing::info!(run_id, findings = report.items.len(), "reconciliation done");
        Ok(report)
    }

    /// Every `interval` (counted from the last scheduled run's start, whichever replica ran
    /// it), reconciles the last `window` for every tenant; meanwhile, marks runs whose runner
    /// stopped beating as failed. Runs on the replica holding the `reconcile` lease.
    pub async fn run_scheduled(
        self,
        interval: Duration,
        window: Duration,
        shutdown: CancellationToken,
    ) {
        let mut first_due = None;
        loop {
            let now = now_ms();
            match self
                .db
                .reconciliations()
                .fail_interrupted(now, now - RUN_SILENCE.as_millis() as i64)
                .await
            {
                Ok(0) => {}
                Ok(failed) => tracing::warn!(
                    failed,
                    "reconciliation runs whose runner stopped marked failed"
                ),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot check for interrupted reconciliation runs")
                }
            }
            let due_at = match self.db.reconciliations().last_started("schedule").await {
                Ok(Some(last)) => last + interval.as_millis() as i64,
                Ok(None) => *first_due.get_or_insert(now + interval.as_millis() as i64),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the last scheduled reconciliation");
                    now + RUN_SILENCE.as_millis() as i64
                }
            };
            if due_at > now {
                let wait = Duration::from_millis((due_at - now) as u64).min(RUN_SILENCE);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let to_ms = now_ms();
            let params = Params {
                from_ms: to_ms - window.as_millis() as i64,
                to_ms,
                tenant: None,
                dry_run: false,
                invoice: None,
            };
            if let Err(error) = self.run(&params, "schedule").await {
                tracing::warn!(error = %error, "scheduled reconciliation failed");
            }
        }
    }
}

fn summarize(
    params: &Params,
    items: &[Item],
    usage_items: usize,
    matched_invoices: usize,
    invoices: usize,
    drift_checked: usize,
    vendor_usage: bool,
) -> Value {
    let mut findings: BTreeMap<&str, (u64, BTreeMap<String, i64>)> = BTreeMap::new();
    let mut repairs: BTreeMap<&str, u64> = BTreeMap::new();
    for item in items {
        if let Some(status) = item.detail["repair"]["status"].as_str() {
            *repairs.entry(status).or_default() += 1;
        }
        let entry = findings.entry(item.finding.as_str()).or_default();
        entry.0 += 1;
        if item.area == "money"
            && let (Some(currency), Some(amount)) = (
                item.detail["currency"].as_str(),
                item.detail["amount_due"].as_i64(),
            )
        {
            *entry.1.entry(currency.to_owned()).or_default() += amount;
        }
    }
    let by_finding: serde_json::Map<String, Value> = findings
        .into_iter()
        .map(|(finding, (count, amounts))| {
            (
                finding.to_owned(),
                json!({"count": count, "amount_due": amounts}),
            )
        })
        .collect();
    json!({
        "from": rfc3339(params.from_ms),
        "to": rfc3339(params.to_ms),
        "tenant_id": params.tenant,
        "dry_run": params.dry_run,
        "items": items.len(),
        "usage_items": usage_items,
        "invoices": invoices,
        "matched_invoices": matched_invoices,
        "drift_checked_tenants": drift_checked,
        "vendor_usage_asked": vendor_usage,
        "findings": by_finding,
        "repairs": repairs,
    })
}
