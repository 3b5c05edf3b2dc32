//! The distinct values of `unique_count` meters, kept by the database (`usage_distinct`: one row
//! per tenant, meter, value and hour it occurred in) rather than in memory. Storing events adds
//! their (value, hour) pairs in the same transaction and returns what that changed for the
//! counters: for each hour, how many of its values have which previous hour (see
//! `Bucket::Distinct`), as signed deltas.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::UsageRow;

/// The `previous` of a value's first hour ever (as `counters::NO_PREVIOUS`).
pub const NO_PREVIOUS: i64 = i64::MIN;

/// A change to the counters' distinct counts: in `hour`'s bucket, `count` more values whose
/// previous hour is `previous`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistinctDelta {
    pub tenant_id: String,
    pub meter: String,
    pub hour: i64,
    pub previous: i64,
    pub count: i64,
}

/// A (tenant, meter, value, hour) pair of `usage_distinct`.
pub(super) type Pair = (String, String, String, i64);

/// The pairs of the rows that carry a distinct value, each once.
pub(super) fn pairs_of(rows: &[&UsageRow]) -> Vec<Pair> {
    let mut seen = HashSet::new();
    rows.iter()
        .filter_map(|r| {
            let value = r.unique_value.as_ref()?;
            let hour = r.occurred_at.div_euclid(3_600_000) * 3_600_000;
            Some((r.tenant_id.clone(), r.meter.clone(), value.clone(), hour))
        })
        .filter(|pair| seen.insert(pair.clone()))
        .collect()
}

/// The pairs' (tenant, meter, value)s, each once, in byte order: the order in which a
/// PostgreSQL transaction locks them, the same for every transaction, so that two never wait on
/// each other in a cycle.
pub(super) fn values_of(pairs: &[Pair]) -> Vec<(&str, &str, &str)> {
    let mut values: Vec<(&str, &str, &str)> = pairs
        .iter()
        .map(|(t, m, v, _)| (t.as_str(), m.as_str(), v.as_str()))
        .collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// The deltas of new pairs, given for each its previous and next hours of the same value as
/// stored now (new pairs included). A new pair counts in its hour under its previous hour; the
/// first stored hour after a run of new ones moves from the hour before the run to the run's
/// last hour.
pub(super) fn deltas(probed: Vec<(Pair, Option<i64>, Option<i64>)>) -> Vec<DistinctDelta> {
    type Neighbours = BTreeMap<i64, (Option<i64>, Option<i64>)>;
    let mut values: HashMap<(String, String, String), Neighbours> = HashMap::new();
    for ((tenant, meter, value, hour), previous, next) in probed {
        let hours = values.entry((tenant, meter, value)).or_default();
        hours.insert(hour, (previous, next));
    }
    let mut sums: HashMap<(String, String, i64, i64), i64> = HashMap::new();
    for ((tenant, meter, _), new) in &values {
        let mut add = |hour: i64, previous: Option<i64>, count: i64| {
            let key = (tenant.clone(), meter.clone(), hour);
            let previous = previous.unwrap_or(NO_PREVIOUS);
            *sums.entry((key.0, key.1, key.2, previous)).or_default() += count;
        };
        for (&hour, &(previous, next)) in new {
            add(hour, previous, 1);
            let Some(next) = next.filter(|n| !new.contains_key(n)) else {
                continue;
            };
            let mut before_run = previous;
            while let Some(p) = before_run.filter(|p| new.contains_key(p)) {
                before_run = new[&p].0;
            }
            add(next, Some(hour), 1);
            add(next, before_run, -1);
        }
    }
    sums.into_iter()
        .filter(|(_, count)| *count != 0)
        .map(
            |((tenant_id, meter, hour, previous), count)| DistinctDelta {
                tenant_id,
                meter,
                hour,
                previous,
                count,
            },
        )
        .collect()
}

/// Adds the distinct pairs of `$stored` (new usage rows) to `usage_distinct` on a transaction
/// `$tx`, under the values' row locks when `$lock` (PostgreSQL); evaluates to the
/// counters' [`DistinctDelta`]s.
macro_rules! insert_distinct {
    ($tx:expr, $stored:expr, $lock:expr) => {{
        let tx = $tx;
        let pairs = $crate::store::distinct::pairs_of($stored);
        let mut probed = Vec::new();
        if $lock {
            // A row lock per value, held to commit: two transactions adding the same value in
            // different hours take turns, so each reads the other's hours; others do not wait.
            let values = $crate::store::distinct::values_of(&pairs);
            for chunk in values.chunks(CHUNK) {
                let mut lock = sqlx::QueryBuilder::new(
                    "INSERT INTO usage_distinct_values (tenant_id, meter, value) ",
                );
                lock.push_values(chunk, |mut b, (t, m, v)| {
                    b.push_bind(*t).push_bind(*m).push_bind(*v);
                });
                lock.push(
                    " ON CONFLICT (tenant_id, meter, value) DO UPDATE SET value = excluded.value",
                );
                lock.build().execute(&mut *tx).await?;
            }
        }
        for chunk in pairs.chunks(CHUNK) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO usage_distinct (tenant_id, meter, value, hour) ",
            );
            insert.push_values(chunk, |mut b, (t, m, v, h)| {
                b.push_bind(t).push_bind(m).push_bind(v).push_bind(*h);
            });
            insert.push(" ON CONFLICT DO NOTHING RETURNING tenant_id, meter, value, hour");
            let new: Vec<$crate::store::distinct::Pair> =
                insert.build_query_as().fetch_all(&mut *tx).await?;
            if new.is_empty() {
                continue;
            }
            let mut probe = sqlx::QueryBuilder::new("WITH c (tenant_id, meter, value, hour) AS (");
            probe.push_values(&new, |mut b, (t, m, v, h)| {
                b.push_bind(t).push_bind(m).push_bind(v).push_bind(*h);
            });
            probe.push(
                ") SELECT c.tenant_id, c.meter, c.value, c.hour, \
                 (SELECT MAX(d.hour) FROM usage_distinct d WHERE d.tenant_id = c.tenant_id \
                  AND d.meter = c.meter AND d.value = c.value AND d.hour < c.hour), \
                 (SELECT MIN(d.hour) FROM usage_distinct d WHERE d.tenant_id = c.tenant_id \
                  AND d.meter = c.meter AND d.value = c.value AND d.hour > c.hour) FROM c",
            );
            let rows: Vec<(String, String, String, i64, Option<i64>, Option<i64>)> =
                probe.build_query_as().fetch_all(&mut *tx).await?;
            probed.extend(
                rows.into_iter()
                    .map(|(t, m, v, h, p, n)| ((t, m, v, h), p, n)),
            );
        }
        $crate::store::distinct::deltas(probed)
    }};
}

pub(super) use insert_distinct;

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(hour: i64) -> Pair {
        ("t".into(), "m".into(), "v".into(), hour)
    }

    fn sorted(mut d: Vec<DistinctDelta>) -> Vec<(i64, i64, i64)> {
        d.sort_by_key(|d| (d.hour, d.previous));
        d.into_iter()
            .map(|d| (d.hour, d.previous, d.count))
            .collect()
    }

    #[test]
    fn a_run_of_new_hours_moves_the_next_stored_hour() {
        // Stored: hours 1 and 5; new: 3 and 4.
        let probed = vec![(pair(3), Some(1), Some(4)), (pair(4), Some(3), Some(5))];
        assert_eq!(
            sorted(deltas(probed)),
            vec![(3, 1, 1), (4, 3, 1), (5, 1, -1), (5, 4, 1)]
        );
    }

    #[test]
    fn a_first_hour_counts_under_no_previous() {
        let probed = vec![(pair(7), None, Some(9))];
        assert_eq!(
            sorted(deltas(probed)),
            vec![(7, NO_PREVIOUS, 1), (9, NO_PREVIOUS, -1), (9, 7, 1)]
        );
    }
}
