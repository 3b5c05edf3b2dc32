//! Usage announcements between replicas (PostgreSQL `LISTEN/NOTIFY`): each usage insert tells
//! the other replicas which buckets it changed, in the same transaction, so that their counters
//! count it too.

use std::collections::HashMap;

use super::Metering;
use super::counters::{Bucket, distinct_buckets, hour_of};
use super::sample_of;
use crate::store::{DistinctDelta, TxSnapshot, UsageRow};

/// Largest `billsync_usage` notification payload (PostgreSQL's limit is 8000 bytes).
const NOTIFY_MAX_BYTES: usize = 7000;

/// What a usage notification from another replica did to the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Counted.
    Counted,
    /// Sent by this replica (already counted) or by a transaction the last rebuild read.
    Known,
    /// Too large to carry its usage, or unreadable: the counters must be rebuilt.
    Resync,
}

impl Metering {
    /// The `billsync_usage` notifications announcing `rows` and the `distinct` counts' changes
    /// they made to the other replicas: their buckets per tenant, meter and hour, as
    /// `<origin> <JSON>` payloads small enough to send.
    pub(super) fn notifications(
        &self,
        rows: &[&UsageRow],
        distinct: &[DistinctDelta],
    ) -> Vec<String> {
        let mut buckets: HashMap<(&str, &str, i64), Bucket> = HashMap::new();
        for row in rows {
            let Some(meter) = self.folded_meter(&row.meter) else {
                continue;
            };
            let bucket = Bucket::of(meter.aggregation, sample_of(row));
            buckets
                .entry((&row.tenant_id, &row.meter, hour_of(row.occurred_at)))
                .and_modify(|b| b.merge(&bucket))
                .or_insert(bucket);
        }
        let pieces = buckets
            .into_iter()
            .chain(distinct_buckets(distinct).map(|(t, m, h, b)| ((t, m, h), b)));
        let mut payloads = Vec::new();
        let mut entries: Vec<String> = Vec::new();
        let mut size = 0;
        for ((tenant, meter, hour), bucket) in pieces {
            let entry = serde_json::to_string(&(tenant, meter, hour, &bucket)).expect("serialises");
            if entry.len() > NOTIFY_MAX_BYTES {
                // Too large to announce (a huge property value): every replica rebuilds.
                payloads.push(format!("{} resync", self.origin));
                continue;
            }
            if size + entry.len() > NOTIFY_MAX_BYTES {
                payloads.push(format!("{} [{}]", self.origin, entries.join(",")));
                entries.clear();
                size = 0;
            }
            size += entry.len() + 1;
            entries.push(entry);
        }
        if !entries.is_empty() {
            payloads.push(format!("{} [{}]", self.origin, entries.join(",")));
        }
        payloads
    }

    /// Counts the usage another replica announced (`<xid> <origin> <JSON>`), unless this
    /// replica sent it or its transaction was read by the last rebuild (`seen`).
    pub fn hear(&self, payload: &str, seen: Option<&TxSnapshot>) -> Heard {
        let mut parts = payload.splitn(3, ' ');
        let (Some(xid), Some(origin), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Heard::Resync;
        };
        if origin == &*self.origin {
            return Heard::Known;
        }
        if let (Some(seen), Ok(xid)) = (seen, xid.parse::<u64>())
            && seen.saw(xid)
        {
            return Heard::Known;
        }
        let Ok(entries) = serde_json::from_str::<Vec<(String, String, i64, Bucket)>>(body) else {
            return Heard::Resync;
        };
        for (tenant, meter, hour, bucket) in &entries {
            self.counters.merge(tenant, meter, *hour, bucket);
        }
        if let Some(earliest) = entries.iter().map(|(_, _, hour, _)| *hour).min() {
            self.revenue.usage_arrived(earliest);
        }
        Heard::Counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::store::Db;
    use rust_decimal::Decimal;
    use std::sync::Arc;
    use std::time::Duration;

    async fn replica(origin: &str) -> Metering {
        let settings = crate::config::DatabaseSettings {
            url: crate::config::Secret::new("sqlite::memory:"),
            max_connections: 1,
            connect_timeout: Duration::from_secs(5),
        };
        let catalog = Catalog::parse(
            "[meters.calls]\naggregation = \"sum\"\n\
             [meters.users]\naggregation = \"unique_count\"\nproperty = \"user_id\"\n",
        )
        .unwrap();
        Metering {
            db: Db::connect(&settings).await.unwrap(),
            catalog: Arc::new(catalog),
            counters: Arc::default(),
            metrics: Arc::default(),
            writer: Arc::default(),
            waiting: Arc::default(),
            gate: Arc::default(),
            origin: origin.into(),
            record_locks: Arc::default(),
            record_queue: Arc::default(),
            revenue: Arc::default(),
            credits: Arc::default(),
        }
    }

    fn row(id: usize, meter: &str, quantity: &str, user: Option<String>) -> UsageRow {
        UsageRow {
            tenant_id: "acme".to_owned(),
            event_id: format!("e{id}"),
            meter: meter.to_owned(),
            quantity: quantity.to_owned(),
            occurred_at: 1_764_000_000_000 + id as i64 * 1000,
            unique_value: user,
            properties: None,
            received_at: 1_764_000_000_000,
            push_id: None,
        }
    }

    #[tokio::test]
    async fn another_replica_counts_what_one_announces_once() {
        let (sender, listener) = (replica("a").await, replica("b").await);
        // 500 distinct users, announced as counts (a few numbers per hour), not as values.
        let rows: Vec<UsageRow> = (0..500)
            .map(|i| row(i, "users", "1", Some(format!("user-{i:05}"))))
            .chain((500..1000).map(|i| row(i, "calls", "0.5", None)))
            .collect();
        sender.db.migrate().await.unwrap();
        let inserted = sender.db.usage().insert(&rows).await.unwrap();
        let refs: Vec<&UsageRow> = rows.iter().collect();
        let payloads = sender.notifications(&refs, &inserted.distinct);
        assert!(
            !payloads.iter().any(|p| p.contains("user-")),
            "{payloads:?}"
        );
        for (xid, payload) in payloads.iter().enumerate() {
            assert!(payload.len() <= NOTIFY_MAX_BYTES + 64, "{}", payload.len());
            let notified = format!("{} {payload}", 1000 + xid);
            assert_eq!(sender.hear(&notified, None), Heard::Known, "its own");
            assert_eq!(listener.hear(&notified, None), Heard::Counted);
        }
        let period = (0, i64::MAX);
        let figure = |m: &Metering, meter: &str| {
            m.counters
                .fold("acme", meter, period.0, period.1)
                .map(|b| b.value())
        };
        assert_eq!(figure(&listener, "users"), Some(Decimal::from(500)));
        assert_eq!(figure(&listener, "calls"), Some(Decimal::from(250)));
        // A transaction the last rebuild saw is not counted again.
        let seen = TxSnapshot::parse("5000:5000:").unwrap();
        let again = format!("1000 {}", payloads[0]);
        assert_eq!(listener.hear(&again, Some(&seen)), Heard::Known);
        assert_eq!(figure(&listener, "calls"), Some(Decimal::from(250)));
        assert_eq!(listener.hear("1 b garbage", None), Heard::Known);
        assert_eq!(listener.hear("1 c garbage", None), Heard::Resync);
    }
}
