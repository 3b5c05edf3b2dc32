//! The counters' snapshot: folded into `usage_buckets` every so often by one replica (a lease),
//! read back with the events above its watermark when a replica starts or resynchronises.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::counters::{Bucket, Counters, hour_of};
use super::{Metering, sample_of};
use crate::store::{BucketState, StoreError, TxSnapshot, now_ms};

impl Metering {
    /// Rebuilds the counters: the stored snapshot, then every event above its watermark, read
    /// at one instant and swapped in whole. Returns how many events it replayed and, on
    /// PostgreSQL, which transactions the read saw (their notifications are not counted again).
    pub async fn rebuild(&self) -> Result<(usize, Option<TxSnapshot>), StoreError> {
        let _gate = self.gate.write().await;
        let state = self.db.usage().counter_state().await?;
        let fresh = Counters::default();
        for (tenant, meter, hour, bucket) in &state.buckets {
            match serde_json::from_str::<Bucket>(bucket) {
                Ok(bucket) => fresh.merge(tenant, meter, *hour, &bucket),
                Err(error) => {
                    tracing::error!(tenant, meter, hour, error = %error, "unreadable usage snapshot bucket")
                }
            }
        }
        for row in &state.rows {
            if let Some(meter) = self.catalog.meters.get(&row.meter) {
                fresh.record(
                    &row.tenant_id,
                    &meter.name,
                    meter.aggregation,
                    sample_of(row),
                );
            }
        }
        self.counters.replace_with(fresh);
        Ok((state.rows.len(), state.seen))
    }

    /// Folds the events committed since the last snapshot into the stored buckets; returns how
    /// many it folded. Two snapshots that overlap (a replica that lost its lease) cannot both
    /// fold the same events: the second finds the watermark moved and writes nothing.
    pub async fn snapshot(&self, now: i64) -> Result<usize, StoreError> {
        let usage = self.db.usage();
        let source = usage.snapshot_source().await?;
        if source.to <= source.from {
            return Ok(0);
        }
        let mut folded: HashMap<(String, String, i64), Bucket> = HashMap::new();
        for row in &source.rows {
            let Some(meter) = self.catalog.meters.get(&row.meter) else {
                continue;
            };
            let bucket = Bucket::of(meter.aggregation, sample_of(row));
            folded
                .entry((
                    row.tenant_id.clone(),
                    row.meter.clone(),
                    hour_of(row.occurred_at),
                ))
                .and_modify(|b| b.merge(&bucket))
                .or_insert(bucket);
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
        Ok(source.rows.len())
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
