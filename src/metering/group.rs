//! SQLite's group commit: usage batches that arrive while another is being stored wait, and
//! the next to take the writer stores all of them in one transaction and answers each.
//!
//! SQLite has one writer, and a batch's cost is mostly the index pages it dirties (one or two
//! per tenant in each of the two tenant-keyed indexes, written to the log at the commit) and
//! the commit's `fsync`: four batches over the same tenants cost about what one does, so
//! storing them together multiplies the rate under load. Each caller still answers only once
//! its batch is durable.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::Metering;
use crate::store::{Inserted, StoreError, UsageRow};

/// Most events stored in one transaction (`metering.max_batch`'s default): the writer's
/// cache holds the pages they dirty.
const GROUP_EVENTS: usize = 10_000;

/// A waiting batch and where its answer goes.
type Waiting = (Vec<UsageRow>, oneshot::Sender<Result<Inserted, StoreError>>);

/// The usage batches waiting for the SQLite writer.
#[derive(Default)]
pub struct WaitingBatches(Mutex<Vec<Waiting>>);

impl WaitingBatches {
    /// How many batches are waiting.
    pub fn len(&self) -> usize {
        self.0.lock().expect("waiting batches").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest waiting batches, up to [`GROUP_EVENTS`] events (at least one batch).
    fn next_group(&self) -> Vec<Waiting> {
        let mut waiting = self.0.lock().expect("waiting batches");
        let (mut taken, mut events) = (0, 0);
        while taken < waiting.len()
            && (taken == 0 || events + waiting[taken].0.len() <= GROUP_EVENTS)
        {
            events += waiting[taken].0.len();
            taken += 1;
        }
        waiting.drain(..taken).collect()
    }
}

impl Metering {
    /// Stores `rows` on SQLite with the batches waiting beside it (see the module's doc).
    pub(super) async fn store_in_a_group(&self, rows: &[UsageRow]) -> Result<Inserted, StoreError> {
        let (reply, mut answer) = oneshot::channel();
        self.waiting
            .0
            .lock()
            .expect("waiting batches")
            .push((rows.to_vec(), reply));
        loop {
            tokio::select! {
                biased;
                answer = &mut answer => return answer.unwrap_or_else(|_| {
                    Err(StoreError::Setup("the group storing this batch stopped".to_owned()))
                }),
                writer = self.writer.clone().lock_owned() => {
                    let group = self.waiting.next_group();
                    if group.is_empty() {
                        // Stored by the writer before: its answer is there.
                        continue;
                    }
                    // A task of its own: the group holds other requests' batches, and this
                    // request may be dropped (its client gone) before they are answered.
                    let (db, metrics, book) =
                        (self.db.clone(), self.metrics.clone(), self.credits.clone());
                    let stored = tokio::spawn(async move {
                        store_group(writer, (&db, &book), &metrics, group).await;
                    });
                    let _ = stored.await;
                }
            }
        }
    }
}

/// Stores a group in one transaction on the writer and answers each of its batches.
async fn store_group(
    mut writer: tokio::sync::OwnedMutexGuard<crate::store::UsageWriter>,
    (db, book): (&crate::store::Db, &crate::credits::book::CreditBook),
    metrics: &Arc<crate::metrics::Metrics>,
    group: Vec<Waiting>,
) {
    let batches: Vec<&[UsageRow]> = group.iter().map(|(rows, _)| rows.as_slice()).collect();
    let stored = writer.insert_group(db, book, &batches).await;
    metrics.add(
        "billsync_usage_commits_total",
        "Transactions that stored usage batches on SQLite (the batches waiting at once share one).",
        &[],
        1,
    );
    match stored {
        Ok(inserted) => {
            for ((_, reply), inserted) in group.into_iter().zip(inserted) {
                let _ = reply.send(Ok(inserted));
            }
        }
        Err(error) => {
            tracing::warn!(error = %error, batches = group.len(), "storing a group of usage batches failed");
            for (_, reply) in group {
                let _ = reply.send(Err(error.shared()));
            }
        }
    }
}
