//! In-process metrics in Prometheus' text format: counters, gauges and latency histograms,
//! each a family of series told apart by labels.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of every latency histogram, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0, 60.0,
];

#[derive(Default)]
struct Histogram {
    count: u64,
    sum: f64,
    /// Not cumulative: `buckets[i]` counts observations that fell in bucket `i` only.
    buckets: [u64; BUCKETS.len()],
}

/// A metric family: its help text, its kind, and its series by rendered label set.
struct Family<T> {
    help: &'static str,
    series: BTreeMap<String, T>,
}

#[derive(Default)]
struct Families {
    counters: BTreeMap<&'static str, Family<u64>>,
    gauges: BTreeMap<&'static str, Family<f64>>,
    histograms: BTreeMap<&'static str, Family<Histogram>>,
}

/// The process's metrics; cheap to update from any task.
#[derive(Default)]
pub struct Metrics {
    families: Mutex<Families>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let value = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{key}=\"{value}\"");
    }
    out
}

fn family<'a, T>(
    map: &'a mut BTreeMap<&'static str, Family<T>>,
    name: &'static str,
    help: &'static str,
) -> &'a mut Family<T> {
    map.entry(name).or_insert_with(|| Family {
        help,
        series: BTreeMap::new(),
    })
}

impl Metrics {
    pub fn inc(&self, name: &'static str, help: &'static str, pairs: &[(&str, &str)]) {
        self.add(name, help, pairs, 1);
    }

    pub fn add(&self, name: &'static str, help: &'static str, pairs: &[(&str, &str)], n: u64) {
        let mut families = self.families.lock().expect("metrics lock");
        *family(&mut families.counters, name, help)
            .series
            .entry(labels(pairs))
            .or_default() += n;
    }

    pub fn set(&self, name: &'static str, help: &'static str, pairs: &[(&str, &str)], value: f64) {
        let mut families = self.families.lock().expect("metrics lock");
        family(&mut families.gauges, name, help)
            .series
            .insert(labels(pairs), value);
    }

    pub fn observe(
        &self,
        name: &'static str,
        help: &'static str,
        pairs: &[(&str, &str)],
        seconds: f64,
    ) {
        let mut families = self.families.lock().expect("metrics lock");
        let histogram = family(&mut families.histograms, name, help)
            .series
            .entry(labels(pairs))
            .or_default();
        histogram.count += 1;
        histogram.sum += seconds;
        if let Some(i) = BUCKETS.iter().position(|&le| seconds <= le) {
            histogram.buckets[i] += 1;
        }
    }

    /// The Prometheus text exposition of everything recorded so far.
    pub fn render(&self) -> String {
        let families = self.families.lock().expect("metrics lock");
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP billsync_build_info Build information.\n# TYPE billsync_build_info gauge"
        );
        let _ = writeln!(
            out,
            "billsync_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        for (name, family) in &families.counters {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", family.help);
            for (labels, value) in &family.series {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        for (name, family) in &families.gauges {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} gauge", family.help);
            for (labels, value) in &family.series {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        for (name, family) in &families.histograms {
            let _ = writeln!(
                out,
                "# HELP {name} {}\n# TYPE {name} histogram",
                family.help
            );
            for (labels, h) in &family.series {
                let sep = if labels.is_empty() { "" } else { "," };
                let mut cumulative = 0;
                for (le, n) in BUCKETS.iter().zip(h.buckets) {
                    cumulative += n;
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
                    );
                }
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.inc("t_total", "help", &[("a", "x\"y")]);
        m.inc("t_total", "help", &[("a", "x\"y")]);
        m.set("g", "gauge", &[], 2.5);
        m.observe("h_seconds", "hist", &[("r", "/")], 0.0003);
        m.observe("h_seconds", "hist", &[("r", "/")], 5.0);
        let text = m.render();
        assert!(text.contains("t_total{a=\"x\\\"y\"} 2"), "{text}");
        assert!(text.contains("g{} 2.5"), "{text}");
        assert!(
            text.contains("h_seconds_bucket{r=\"/\",le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{r=\"/\",le=\"10\"} 2"),
            "{text}"
        );
        assert!(text.contains("h_seconds_count{r=\"/\"} 2"), "{text}");
    }
}
