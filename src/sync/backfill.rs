//! `billsync backfill`: lists every kind of object the mirror keeps, 100 a page, queues each
//! state the mirror lacks, and applies them. A checkpoint after every page lets an interrupted
//! run resume where it stopped.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use super::{Applier, events, sweep::differs_from_mirror};
use crate::error::WorkError;
use crate::store::{Db, Source, now_ms};
use crate::stripe::objects;
use crate::stripe::{BillingVendor, ListFilter, ObjectKind, VendorError};

/// The kinds backfill lists, parents first.
const KINDS: [ObjectKind; 11] = [
    ObjectKind::Product,
    ObjectKind::Price,
    ObjectKind::Plan,
    ObjectKind::Customer,
    ObjectKind::Subscription,
    ObjectKind::SubscriptionSchedule,
    ObjectKind::Invoice,
    ObjectKind::PaymentIntent,
    ObjectKind::Charge,
    ObjectKind::CreditNote,
    ObjectKind::CreditGrant,
];

/// Per kind: objects listed and states queued.
#[derive(Debug, Default, Clone)]
pub struct BackfillReport {
    pub kinds: Vec<(ObjectKind, u64, u64)>,
    pub applied: usize,
    /// Kinds the vendor does not list (a fake may lack some); skipped, not failed.
    pub unsupported: Vec<ObjectKind>,
}

fn checkpoint(kind: ObjectKind) -> String {
    format!("backfill.{}.after", kind.as_str())
}

fn done(kind: ObjectKind) -> String {
    format!("backfill.{}.done", kind.as_str())
}

pub async fn run(
    db: &Db,
    vendor: Arc<dyn BillingVendor>,
    applier: &Applier,
) -> Result<BackfillReport, WorkError> {
    let progress = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template"),
        );
        bar
    });
    let state = db.sync_state();
    let mut report = BackfillReport::default();
    for kind in KINDS {
        if state.get(&done(kind)).await?.is_some() {
            tracing::info!(
                kind = kind.as_str(),
                "backfill: already done in the interrupted run"
            );
            continue;
        }
        match list_kind(db, vendor.as_ref(), kind, progress.as_ref()).await? {
            Some((listed, queued)) => report.kinds.push((kind, listed, queued)),
            None => report.unsupported.push(kind),
        }
        state.set(&done(kind), "1", now_ms()).await?;
    }

    // Apply everything queued before reporting; failures stay in the inbox for the applier.
    loop {
        let settled = applier.step().await?;
        report.applied += settled;
        if settled == 0 {
            break;
        }
        if let Some(bar) = &progress {
            bar.set_message(format!("applying: {} applied", report.applied));
            bar.tick();
        }
    }
    for kind in KINDS {
        state.remove(&checkpoint(kind)).await?;
        state.remove(&done(kind)).await?;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(report)
}

/// Lists every object of a kind from the checkpoint on, queueing those the mirror lacks or
/// holds otherwise, and moving the checkpoint a page at a time. `(listed, queued)`, or `None`
/// when the vendor does not list this kind.
async fn list_kind(
    db: &Db,
    vendor: &dyn BillingVendor,
    kind: ObjectKind,
    progress: Option<&ProgressBar>,
) -> Result<Option<(u64, u64)>, WorkError> {
    let state = db.sync_state();
    let mut after = state.get(&checkpoint(kind)).await?;
    let (mut listed, mut queued) = (0u64, 0u64);
    let filter = ListFilter {
        all_statuses: true,
        ..ListFilter::default()
    };
    loop {
        // The page's states are versioned by when it was asked for (see `mirror::observe`).
        let fetched_at = db.clock_ms().await?;
        let page = match vendor.list(kind, &filter, after.as_deref()).await {
            Ok(page) => page,
            Err(VendorError::Malformed(message) | VendorError::Rejected { message, .. })
                if listed == 0 =>
            {
                tracing::warn!(kind = kind.as_str(), error = %message, "backfill: the vendor does not list this kind; skipped");
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let mut rows = Vec::new();
        for object in &page.data {
            if differs_from_mirror(db, kind, object).await? {
                let source = Source::Backfill;
                rows.extend(events::from_fetched_state(kind, object, source, fetched_at));
            }
        }
        listed += page.data.len() as u64;
        queued += rows.len() as u64;
        db.inbox().insert(&rows, now_ms()).await?;
        after = page.data.last().and_then(objects::id_of);
        if let Some(after) = &after {
            state.set(&checkpoint(kind), after, now_ms()).await?;
        }
        let message = format!(
            "{}: {listed} listed, {queued} new or changed",
            kind.as_str()
        );
        match progress {
            Some(bar) => {
                bar.set_message(message);
                bar.tick();
            }
            None => tracing::info!(kind = kind.as_str(), listed, queued, "backfill page"),
        }
        if !page.has_more || after.is_none() {
            return Ok(Some((listed, queued)));
        }
    }
}
