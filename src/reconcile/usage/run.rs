//! The usage side of a run and of the continuous check: the units (invoice lines, open
//! periods), the vendor's totals for them, the ledger's comparison, and the repairs.

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde_json::json;

use super::{Ledger, OpenPeriods, Repairs, Unit};
use crate::error::WorkError;
use crate::reconcile::inputs::{self, Scope};
use crate::reconcile::{Finding, Item, Params, Reconciler, Report, money, summarize};
use crate::store::now_ms;

impl Reconciler {
    /// One invoice's metered lines against the usage of their periods, repaired (while it is a
    /// draft) as a run repairs; a repair says whether it landed while the invoice was a draft.
    pub(in crate::reconcile) async fn invoice_report(
        &self,
        params: &Params,
        scope: &Scope,
        invoice_id: &str,
    ) -> Result<Report, WorkError> {
        let db = &self.db;
        let billed = scope.invoice(db, invoice_id).await?;
        let settle = now_ms() - self.settle_delay.as_millis() as i64;
        let units = inputs::usage_units(&self.catalog, scope, &billed, settle);
        let (Some(from), Some(to)) = (
            units.iter().map(|u| u.start).min(),
            units.iter().map(|u| u.end).max(),
        ) else {
            let summary = summarize(params, &[], 0, 0, billed.len(), 0, self.vendor_usage);
            return Ok(Report {
                summary,
                items: Vec::new(),
            });
        };
        let open = scope.open_periods(db).await?;
        let tenant = params.tenant.as_deref();
        let mut items = self.compare_units(from, to, tenant, units, &open).await?;
        self.repairs(params.dry_run).carry_out(&mut items).await?;
        let status = scope.invoice(db, invoice_id).await?;
        let still_draft =
            (status.first()).is_some_and(|b| b.invoice.status.as_deref() == Some("draft"));
        for item in &mut items {
            if item.detail["repair"]["status"] == "sent" {
                item.detail["repair"]["before_finalization"] = json!(still_draft);
            }
        }
        let mut summary = summarize(params, &items, items.len(), 0, billed.len(), 0, true);
        summary["invoice"] = json!(invoice_id);
        Ok(Report { summary, items })
    }

    /// Usage: the usage log and the push ledger of the window against the invoice lines that
    /// bill a meter and the vendor's meter totals; with the vendor's totals, also each tenant's
    /// open period up to the settle point (now less `settle_delay`). Repairs what it may.
    pub(in crate::reconcile) async fn usage_items(
        &self,
        params: &Params,
        scope: &Scope,
        invoices: &[money::Billed],
    ) -> Result<Vec<Item>, WorkError> {
        let db = &self.db;
        let settle = now_ms() - self.settle_delay.as_millis() as i64;
        let mut units = inputs::usage_units(&self.catalog, scope, invoices, settle);
        let open = scope.open_periods(db).await?;
        if self.vendor.is_some() && self.vendor_usage {
            let end = params.to_ms.min(settle);
            units.extend(inputs::open_units(
                &self.catalog,
                scope,
                &open,
                params.from_ms,
                end,
            ));
        }
        let (from, to) = (params.from_ms, params.to_ms);
        let tenant = params.tenant.as_deref();
        let mut items = self.compare_units(from, to, tenant, units, &open).await?;
        self.repairs(params.dry_run).carry_out(&mut items).await?;
        Ok(items)
    }

    /// How this reconciler carries out repairs.
    fn repairs(&self, dry_run: bool) -> Repairs<'_> {
        Repairs {
            db: &self.db,
            vendor: self.vendor.as_ref(),
            metrics: &self.metrics,
            enabled: self.repair,
            dry_run,
            max_retry_delay: self.max_retry_delay,
        }
    }

    /// The open units of one tenant's `meters`, from its current period's start to the settle
    /// point (as of `now_ms`), as a run makes them; empty without a current period.
    pub async fn open_units_of(
        &self,
        tenant: &str,
        meters: &[String],
        now_ms: i64,
    ) -> Result<(Vec<Unit>, OpenPeriods), WorkError> {
        let scope = Scope::of(&self.db, Some(tenant)).await?;
        let open = scope.open_periods(&self.db).await?;
        let settle = now_ms - self.settle_delay.as_millis() as i64;
        let mut units = inputs::open_units(&self.catalog, &scope, &open, i64::MIN, settle);
        units.retain(|u| meters.contains(&u.meter));
        Ok((units, open))
    }

    /// The items of one tenant's open units (from [`Reconciler::open_units_of`]): the same
    /// ledger and comparison as a run's, one vendor call per unit; repaired as a run repairs.
    pub async fn open_items(
        &self,
        tenant: &str,
        units: Vec<Unit>,
        open: &OpenPeriods,
    ) -> Result<Vec<Item>, WorkError> {
        let (Some(from), Some(to)) = (
            units.iter().map(|u| u.start).min(),
            units.iter().map(|u| u.end).max(),
        ) else {
            return Ok(Vec::new());
        };
        let items = self
            .compare_units(from, to, Some(tenant), units, open)
            .await?;
        // Only the open units' own findings: usage outside them is a run's business.
        let mut items: Vec<Item> = (items.into_iter())
            .filter(|i| matches!(i.finding, Finding::VendorMissing | Finding::VendorExtra))
            .collect();
        self.repairs(false).carry_out(&mut items).await?;
        Ok(items)
    }

    /// Folds the events and pushes of `[from, to)` into `units` and compares them with the
    /// vendor's meter totals.
    async fn compare_units(
        &self,
        from: i64,
        to: i64,
        tenant: Option<&str>,
        units: Vec<Unit>,
        open: &OpenPeriods,
    ) -> Result<Vec<Item>, WorkError> {
        let db = &self.db;
        let vendor_usage = self.vendor_usage_of(&units).await?;
        let mut ledger = Ledger::new(&self.catalog.meters, units, open, now_ms());
        db.usage()
            .each_between(from, to, tenant, |event| ledger.add_event(event))
            .await?;
        for push in db.usage().pushes_between(from, to, tenant).await? {
            ledger.add_push(push);
        }
        Ok(ledger.finish(&vendor_usage))
    }

    /// The vendor's meter total for each unit, when asked for and possible.
    async fn vendor_usage_of(
        &self,
        units: &[Unit],
    ) -> Result<HashMap<(String, String, i64), Decimal>, WorkError> {
        let mut totals = HashMap::new();
        let Some(vendor) = self.vendor.as_ref().filter(|_| self.vendor_usage) else {
            return Ok(totals);
        };
        for unit in units {
            let Some(event_name) = self
                .catalog
                .meters
                .get(&unit.meter)
                .and_then(|m| m.stripe_event_name.as_deref())
            else {
                continue;
            };
            if let Some(total) = vendor
                .meter_usage(
                    event_name,
                    &unit.customer_id,
                    unit.start / 1000,
                    unit.end / 1000,
                )
                .await?
            {
                totals.insert(
                    (unit.tenant_id.clone(), unit.meter.clone(), unit.start),
                    total,
                );
            }
        }
        Ok(totals)
    }
}
