//! The counters' snapshot: folded into `usage_buckets` every so often by one replica (a lease),
//! read back with the events above its watermark when a replica starts or resynchronises.
//! `unique_count` meters have no snapshot: their counts are read from `usage_distinct`.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::counters::{Bucket, Counters, NO_PREVIOUS, hour_of};
use super::{Metering, sample_of};
use crate::catalog::{Aggregation, Meter};
use crate::store::{BucketState, Positioned, StoreError, TxSnapshot, now_ms};

/// Events per page of a snapshot's read: its memory is a page and the folded buckets.
const SNAPSHOT_PAGE: u32 = 2_000;

impl Metering {
    /// Rebuilds the counters: the stored snapshot, the distinct counts, then every event above
    /// its watermark, read at one instant (streamed) and swapped in whole. Returns how many
    /// events it replayed and, on PostgreSQL, which transactions the read saw (their
    /// notifications are not counted again).
    pub async fn rebuild(&self) -> Result<(usize, Option<TxSnapshot>), StoreError> {
        let _gate = self.gate.write().await;
        let fresh = Counters::default();
        let state = self
            .db
            .usage()
            .counter_state(|row| {
                if let Some(meter) = self.folded_meter(&row.meter) {
                    fresh.record(
                        &row.tenant_id,
                        &meter.name,
                        meter.aggregation,
                        sample_of(&row),
                    );
                }
            })
            .await?;
        for (tenant, meter, hour, bucket) in &state.buckets {
            match serde_json::from_str::<Bucket>(bucket) {
                Ok(bucket) => fresh.merge(tenant, meter, *hour, &bucket),
                Err(error) => {
                    tracing::error!(tenant, meter, hour, error = %error, "unreadable usage snapshot bucket")
                }
            }
        }
        for (tenant, meter, hour, previous, count) in state.distinct {
            let previous = previous.unwrap_or(NO_PREVIOUS);
            let by_previous = [(previous, count)].into();
            fresh.merge(&tenant, &meter, hour, &Bucket::Distinct { by_previous });
        }
        self.counters.replace_with(fresh);
        Ok((state.replayed, state.seen))
    }

    /// The catalog meter whose events the counters fold one by one: every meter but
    /// `unique_count` ones, whose counts come from the database's distinct values.
    pub(super) fn folded_meter(&self, name: &str) -> Option<&Meter> {
        let meter = self.catalog.meters.get(name)?;
        (meter.aggregation != Aggregation::UniqueCount).then_some(meter)
    }

    /// Folds the events committed since the last snapshot into the stored buckets, read a page
    /// at a time (its memory: a page and one bucket per tenant, meter and hour); returns how
    /// many events it read. Two snapshots that overlap (a replica that lost its lease) cannot
    /// both fold the same events: the second finds the watermark moved and writes nothing.
    pub async fn snapshot(&self, now: i64) -> Result<usize, StoreError> {
        let usage = self.db.usage();
        let source = usage.snapshot_source().await?;
        if source.to <= source.from {
            return Ok(0);
        }
        let mut folded: HashMap<(String, String, i64), Bucket> = HashMap::new();
        let (mut read, mut cursor) = (0, None);
        loop {
            let page = usage
                .snapshot_page(source, cursor.as_ref(), SNAPSHOT_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            cursor = Some((
                last.position,
                last.row.tenant_id.clone(),
                last.row.event_id.clone(),
            ));
            read += page.len();
            for Positioned { row, .. } in &page {
                let Some(meter) = self.folded_meter(&row.meter) else {
                    continue;
                };
                let bucket = Bucket::of(meter.aggregation, sample_of(row));
                let key = (
                    row.tenant_id.clone(),
                    row.meter.clone(),
                    hour_of(row.occurred_at),
                );
                match folded.get_mut(&key) {
                    Some(held) => held.merge(&bucket),
                    None => {
                        folded.insert(key, bucket);
                    }
                }
            }
        }
        let states: Vec<BucketState> = folded
            .into_iter()
            .map(|((tenant, meter, hour), bucket)| {
                let state = serde_json::to_string(&bucket).expect("buckets serialise");
                (tenant, meter, hour, state)
            })
            .collect();
        let merge = |stored: &str, new: &str| match (
            serde_json::from_str::<Bucket>(stored),
            serde_json::from_str::<Bucket>(new),
        ) {
            (Ok(mut stored), Ok(new)) => {
                stored.merge(&new);
                serde_json::to_string(&stored).expect("buckets serialise")
            }
            _ => new.to_owned(),
        };
        let window = (source.from, source.to);
        if !usage.save_snapshot(window, &states, &merge, now).await? {
            tracing::warn!("usage snapshot not saved: another snapshot folded these events first");
            return Ok(0);
        }
        Ok(read)
    }

    /// Snapshots at once (a replica that has just taken the lease may follow one that was
    /// killed before its snapshot), then every `interval`, until `shutdown`.
    pub async fn run_snapshots(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.snapshot(now_ms()).await {
                tracing::warn!(error = %error, "usage snapshot failed; retrying next interval");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}
