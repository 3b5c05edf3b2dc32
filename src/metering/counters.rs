//! Usage counters in memory: per tenant and meter, one bucket per hour, folded exactly
//! (`Decimal`). Any range of hours (a billing period, a day) is the fold of its buckets, and
//! folding is associative, so snapshots of buckets merge with later events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::RwLock;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::catalog::Aggregation;

pub const HOUR_MS: i64 = 3_600_000;

/// The start of the hour holding `at_ms`.
pub fn hour_of(at_ms: i64) -> i64 {
    at_ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// One meter's usage in one span of time, as its aggregation folds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Bucket {
    Sum {
        total: Decimal,
    },
    Count {
        events: u64,
    },
    Max {
        max: Decimal,
    },
    /// The latest event's value; ties on time go to the greater event id.
    Last {
        value: Decimal,
        at: i64,
        event_id: String,
    },
    /// Distinct values held as a set: a request's own fold of events (the usage ledger).
    Unique {
        values: BTreeSet<String>,
    },
    /// Distinct values held as counts, as the counters keep them: for each (value, hour) the
    /// database has seen, one count in that hour's bucket keyed by the value's previous hour
    /// (`NO_PREVIOUS` for none). The distinct values of hours `[from, to)` are the counts of
    /// those hours keyed below `from`: each value once, at its first hour in the range. Counts
    /// come as signed deltas from the usage log (`usage_distinct`) and merge by adding, so the
    /// state is bounded by hours, whatever the number of values or events.
    Distinct {
        #[serde(with = "as_pairs")]
        by_previous: BTreeMap<i64, i64>,
    },
}

/// `by_previous` as a list of `[previous, count]` pairs: an internally tagged enum cannot read
/// a map with number keys back.
mod as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<i64, i64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<i64, i64>, D::Error> {
        Ok(Vec::<(i64, i64)>::deserialize(d)?.into_iter().collect())
    }
}

/// The `by_previous` key of a value's first hour ever.
pub const NO_PREVIOUS: i64 = crate::store::distinct::NO_PREVIOUS;

/// One event, as the counters need it.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub quantity: Decimal,
    pub at_ms: i64,
    pub event_id: &'a str,
    pub unique_value: Option<&'a str>,
}

impl Bucket {
    pub fn of(aggregation: Aggregation, sample: Sample<'_>) -> Self {
        match aggregation {
            Aggregation::Sum => Self::Sum {
                total: sample.quantity,
            },
            Aggregation::Count => Self::Count { events: 1 },
            Aggregation::Max => Self::Max {
                max: sample.quantity,
            },
            Aggregation::Last => Self::Last {
                value: sample.quantity,
                at: sample.at_ms,
                event_id: sample.event_id.to_owned(),
            },
            Aggregation::UniqueCount => Self::Unique {
                values: sample.unique_value.map(str::to_owned).into_iter().collect(),
            },
        }
    }

    /// Folds `other` into `self`; buckets of different kinds leave `self` as it is.
    pub fn merge(&mut self, other: &Bucket) {
        match (self, other) {
            (Self::Sum { total }, Self::Sum { total: more }) => *total += *more,
            (Self::Count { events }, Self::Count { events: more }) => *events += *more,
            (Self::Max { max }, Self::Max { max: other }) => *max = (*max).max(*other),
            (
                Self::Last {
                    value,
                    at,
                    event_id,
                },
                Self::Last {
                    value: v2,
                    at: a2,
                    event_id: e2,
                },
            ) if (*a2, e2.as_str()) > (*at, event_id.as_str()) => {
                (*value, *at, *event_id) = (*v2, *a2, e2.clone());
            }
            (Self::Unique { values }, Self::Unique { values: more }) => {
                values.extend(more.iter().cloned())
            }
            (Self::Distinct { by_previous }, Self::Distinct { by_previous: more }) => {
                for (previous, count) in more {
                    let held = by_previous.entry(*previous).or_default();
                    *held += count;
                    if *held == 0 {
                        by_previous.remove(previous);
                    }
                }
            }
            _ => {}
        }
    }

    /// The figure of a fold of the hours from `from_ms` on: [`Self::value`], except that
    /// distinct counts take only the values not seen in an hour before `from_ms`'s.
    pub fn value_from(&self, from_ms: i64) -> Decimal {
        match self {
            Self::Distinct { by_previous } => Decimal::from(
                by_previous
                    .range(..hour_of(from_ms))
                    .map(|(_, c)| c)
                    .sum::<i64>(),
            ),
            other => other.value(),
        }
    }

    /// The figure: total, event count, maximum, last value or number of distinct values.
    pub fn value(&self) -> Decimal {
        match self {
            Self::Sum { total } => *total,
            Self::Count { events } => Decimal::from(*events),
            Self::Max { max } => *max,
            Self::Last { value, .. } => *value,
            Self::Unique { values } => Decimal::from(values.len()),
            // Without a start: the values whose first hour ever is in the fold.
            Self::Distinct { by_previous } => {
                Decimal::from(by_previous.get(&NO_PREVIOUS).copied().unwrap_or(0))
            }
        }
    }
}

/// One tenant's and meter's buckets, and the running total of the period last asked for, so
/// that the entitlement check reads one figure instead of folding a month of hours.
#[derive(Debug, Default)]
struct Series {
    hours: BTreeMap<i64, Bucket>,
    period: Option<PeriodTotal>,
}

#[derive(Debug)]
struct PeriodTotal {
    from: i64,
    to: i64,
    total: Option<Bucket>,
}

impl Series {
    fn fold(&self, from_ms: i64, to_ms: i64) -> Option<Bucket> {
        let mut folded: Option<Bucket> = None;
        for (_, bucket) in self.hours.range(hour_of(from_ms)..to_ms) {
            match &mut folded {
                Some(f) => f.merge(bucket),
                None => folded = Some(bucket.clone()),
            }
        }
        folded
    }
}

/// Every tenant's and meter's hourly buckets.
#[derive(Debug, Default)]
pub struct Counters {
    series: RwLock<HashMap<String, HashMap<String, Series>>>,
    /// Once someone watches (the entitlement stream), which tenants' meters changed since it
    /// last looked.
    watching: std::sync::atomic::AtomicBool,
    touched: std::sync::Mutex<Touched>,
}

/// The tenants' meters whose counts changed since [`Counters::take_touched`] was last called;
/// `all`: every count may have (the counters were rebuilt).
#[derive(Debug, Default)]
pub struct Touched {
    pub meters: HashMap<String, std::collections::HashSet<String>>,
    pub all: bool,
}

impl Counters {
    pub fn record(&self, tenant: &str, meter: &str, aggregation: Aggregation, sample: Sample<'_>) {
        let bucket = Bucket::of(aggregation, sample);
        self.merge(tenant, meter, hour_of(sample.at_ms), &bucket);
    }

    pub fn merge(&self, tenant: &str, meter: &str, hour: i64, bucket: &Bucket) {
        if self.watching.load(std::sync::atomic::Ordering::Relaxed) {
            self.touch(tenant, meter);
        }
        let mut all = self.series.write().expect("counters lock");
        if !all.contains_key(tenant) {
            all.insert(tenant.to_owned(), HashMap::new());
        }
        let meters = all.get_mut(tenant).expect("inserted above");
        if !meters.contains_key(meter) {
            meters.insert(meter.to_owned(), Series::default());
        }
        let series = meters.get_mut(meter).expect("inserted above");
        match series.hours.get_mut(&hour) {
            Some(held) => held.merge(bucket),
            None => {
                series.hours.insert(hour, bucket.clone());
            }
        }
        let covering = series
            .period
            .as_mut()
            .filter(|p| (hour_of(p.from)..p.to).contains(&hour));
        if let Some(period) = covering {
            match &mut period.total {
                Some(total) => total.merge(bucket),
                None => period.total = Some(bucket.clone()),
            }
        }
    }

    /// Counts the changes storing usage made to the distinct values of `unique_count` meters.
    pub fn merge_distinct(&self, deltas: &[crate::store::DistinctDelta]) {
        for (tenant, meter, hour, bucket) in distinct_buckets(deltas) {
            self.merge(tenant, meter, hour, &bucket);
        }
    }

    /// The fold of the buckets of hours in `[from_ms, to_ms)`; `None` when there is no usage.
    pub fn fold(&self, tenant: &str, meter: &str, from_ms: i64, to_ms: i64) -> Option<Bucket> {
        let all = self.series.read().expect("counters lock");
        all.get(tenant)?.get(meter)?.fold(from_ms, to_ms)
    }

    /// The figure for `[from_ms, to_ms)`, kept as a running total after the first call for the
    /// same period: the entitlement check's path, with no allocation when warm.
    pub fn period_value(
        &self,
        tenant: &str,
        meter: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Option<Decimal> {
        {
            let all = self.series.read().expect("counters lock");
            let series = all.get(tenant)?.get(meter)?;
            if let Some(p) = series
                .period
                .as_ref()
                .filter(|p| (p.from, p.to) == (from_ms, to_ms))
            {
                return p.total.as_ref().map(|t| t.value_from(from_ms));
            }
        }
        let mut all = self.series.write().expect("counters lock");
        let series = all.get_mut(tenant)?.get_mut(meter)?;
        let total = series.fold(from_ms, to_ms);
        let value = total.as_ref().map(|t| t.value_from(from_ms));
        series.period = Some(PeriodTotal {
            from: from_ms,
            to: to_ms,
            total,
        });
        value
    }

    /// Takes `other`'s buckets in place of these, at once.
    pub fn replace_with(&self, other: Counters) {
        let fresh = other.series.into_inner().expect("counters lock");
        *self.series.write().expect("counters lock") = fresh;
        self.touch_all();
    }

    pub fn clear(&self) {
        self.series.write().expect("counters lock").clear();
        self.touch_all();
    }

    fn touch_all(&self) {
        if self.watching.load(std::sync::atomic::Ordering::Relaxed) {
            self.touched.lock().expect("touched lock").all = true;
        }
    }

    fn touch(&self, tenant: &str, meter: &str) {
        let mut touched = self.touched.lock().expect("touched lock");
        match touched.meters.get_mut(tenant) {
            Some(meters) if meters.contains(meter) => {}
            Some(meters) => {
                meters.insert(meter.to_owned());
            }
            None => {
                let meters = std::collections::HashSet::from([meter.to_owned()]);
                touched.meters.insert(tenant.to_owned(), meters);
            }
        }
    }

    /// From now on, keeps which tenants' meters change, for [`Self::take_touched`].
    pub fn watch(&self) {
        (self.watching).store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// What changed since the last call (nothing before [`Self::watch`]).
    pub fn take_touched(&self) -> Touched {
        std::mem::take(&mut *self.touched.lock().expect("touched lock"))
    }
}

/// The distinct deltas as buckets, one per tenant, meter and hour.
pub fn distinct_buckets(
    deltas: &[crate::store::DistinctDelta],
) -> impl Iterator<Item = (&str, &str, i64, Bucket)> {
    let mut buckets: HashMap<(&str, &str, i64), BTreeMap<i64, i64>> = HashMap::new();
    for d in deltas {
        let key = (d.tenant_id.as_str(), d.meter.as_str(), d.hour);
        *buckets
            .entry(key)
            .or_default()
            .entry(d.previous)
            .or_default() += d.count;
    }
    buckets
        .into_iter()
        .map(|((tenant, meter, hour), by_previous)| {
            (tenant, meter, hour, Bucket::Distinct { by_previous })
        })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn sample(
        q: &str,
        at_ms: i64,
        id: &'static str,
        unique: Option<&'static str>,
    ) -> Sample<'static> {
        Sample {
            quantity: Decimal::from_str(q).unwrap(),
            at_ms,
            event_id: id,
            unique_value: unique,
        }
    }

    #[test]
    fn sums_are_exact() {
        let c = Counters::default();
        c.record("t", "m", Aggregation::Sum, sample("0.1", 0, "a", None));
        c.record("t", "m", Aggregation::Sum, sample("0.2", 10, "b", None));
        assert_eq!(
            c.fold("t", "m", 0, HOUR_MS).unwrap().value(),
            Decimal::from_str("0.3").unwrap()
        );
    }

    #[test]
    fn every_aggregation_folds_across_hours() {
        let c = Counters::default();
        let at = [0, HOUR_MS + 1, 2 * HOUR_MS + 5];
        for (agg, name) in [
            (Aggregation::Sum, "sum"),
            (Aggregation::Count, "count"),
            (Aggregation::Max, "max"),
            (Aggregation::Last, "last"),
            (Aggregation::UniqueCount, "unique"),
        ] {
            c.record("t", name, agg, sample("5", at[0], "e1", Some("u1")));
            c.record("t", name, agg, sample("2", at[2], "e3", Some("u2")));
            c.record("t", name, agg, sample("7", at[1], "e2", Some("u1")));
        }
        let value = |m: &str| c.fold("t", m, 0, 3 * HOUR_MS).unwrap().value();
        assert_eq!(value("sum"), Decimal::from(14));
        assert_eq!(value("count"), Decimal::from(3));
        assert_eq!(value("max"), Decimal::from(7));
        assert_eq!(
            value("last"),
            Decimal::from(2),
            "the latest by time, not by arrival"
        );
        assert_eq!(value("unique"), Decimal::from(2));
        assert_eq!(
            c.fold("t", "sum", HOUR_MS, 2 * HOUR_MS).unwrap().value(),
            Decimal::from(7)
        );
        assert!(c.fold("t", "sum", 5 * HOUR_MS, 6 * HOUR_MS).is_none());
        assert!(c.fold("other", "sum", 0, 3 * HOUR_MS).is_none());
    }

    #[test]
    fn the_period_total_follows_later_events() {
        let c = Counters::default();
        let period = (HOUR_MS, 5 * HOUR_MS);
        c.record("t", "m", Aggregation::Sum, sample("1", 0, "before", None));
        c.record(
            "t",
            "m",
            Aggregation::Sum,
            sample("2", 2 * HOUR_MS, "a", None),
        );
        assert_eq!(
            c.period_value("t", "m", period.0, period.1),
            Some(Decimal::from(2))
        );
        c.record(
            "t",
            "m",
            Aggregation::Sum,
            sample("3", 4 * HOUR_MS, "b", None),
        );
        c.record(
            "t",
            "m",
            Aggregation::Sum,
            sample("9", 6 * HOUR_MS, "after", None),
        );
        assert_eq!(
            c.period_value("t", "m", period.0, period.1),
            Some(Decimal::from(5))
        );
        assert_eq!(
            c.period_value("t", "m", 0, 7 * HOUR_MS),
            Some(Decimal::from(15)),
            "another period is folded anew"
        );
        assert_eq!(c.period_value("t", "other", 0, 1), None);
    }

    #[test]
    fn distinct_counts_survive_an_announcement() {
        let bucket = Bucket::Distinct {
            by_previous: [(NO_PREVIOUS, 3), (HOUR_MS, -1)].into(),
        };
        let text = serde_json::to_string(&("t", "m", 0, &bucket)).unwrap();
        let read: (String, String, i64, Bucket) = serde_json::from_str(&text).unwrap();
        assert_eq!(read.3, bucket);
    }

    #[test]
    fn distinct_counts_take_each_value_once_from_the_start() {
        // Value a in hours 0 and 2, b in hours 1 and 2: as the database's deltas give them.
        let c = Counters::default();
        let add = |hour: i64, previous: i64| {
            let by_previous = [(previous, 1)].into();
            c.merge("t", "m", hour * HOUR_MS, &Bucket::Distinct { by_previous });
        };
        add(0, NO_PREVIOUS);
        add(2, 0);
        add(1, NO_PREVIOUS);
        add(2, HOUR_MS);
        let figure = |from: i64, to: i64| {
            let folded = c.fold("t", "m", from * HOUR_MS, to * HOUR_MS).unwrap();
            folded.value_from(from * HOUR_MS)
        };
        assert_eq!(figure(0, 3), Decimal::from(2));
        assert_eq!(figure(1, 3), Decimal::from(2));
        assert_eq!(figure(2, 3), Decimal::from(2));
        assert_eq!(figure(0, 1), Decimal::from(1));
        assert_eq!(
            c.period_value("t", "m", HOUR_MS, 3 * HOUR_MS),
            Some(Decimal::from(2))
        );
    }

    #[test]
    fn buckets_survive_a_snapshot() {
        let bucket = Bucket::Last {
            value: Decimal::new(15, 1),
            at: 3,
            event_id: "x".into(),
        };
        let text = serde_json::to_string(&bucket).unwrap();
        assert_eq!(serde_json::from_str::<Bucket>(&text).unwrap(), bucket);
    }
}
