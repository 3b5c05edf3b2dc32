//! In-process metrics in Prometheus' text format: counters, gauges and latency histograms,
//! each a family of series told apart by labels.

use std::collections::{BTreeMap, HashMap};
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

/// One HTTP series: a method and status on a route.
struct HttpSeries {
    method: String,
    status: u16,
    latency: Histogram,
}

/// The process's metrics; cheap to update from any task.
#[derive(Default)]
pub struct Metrics {
    families: Mutex<Families>,
    /// HTTP requests by route, then method and status: updated on every request, so kept apart
    /// from the general families and looked up without allocating.
    http: Mutex<HashMap<String, Vec<HttpSeries>>>,
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

    /// A gauge's series: each one's label values in order, and its value.
    pub fn gauge(&self, name: &str) -> Vec<(String, f64)> {
        let families = self.families.lock().expect("metrics lock");
        families.gauges.get(name).map_or_else(Vec::new, |family| {
            family
                .series
                .iter()
                .map(|(labels, value)| (labels.clone(), *value))
                .collect()
        })
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
    /// Counts one HTTP request and its latency.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut http = self.http.lock().expect("metrics lock");
        if !http.contains_key(route) {
            http.insert(route.to_owned(), Vec::new());
        }
        let series = http.get_mut(route).expect("inserted above");
        let index = match series
            .iter()
            .position(|s| s.status == status && s.method == method)
        {
            Some(i) => i,
            None => {
                series.push(HttpSeries {
                    method: method.to_owned(),
                    status,
                    latency: Histogram::default(),
                });
                series.len() - 1
            }
        };
        let h = &mut series[index].latency;
        h.count += 1;
        h.sum += seconds;
        if let Some(i) = BUCKETS.iter().position(|&le| seconds <= le) {
            h.buckets[i] += 1;
        }
    }

    fn render_http(&self, out: &mut String) {
        let http = self.http.lock().expect("metrics lock");
        let mut rows: Vec<(&str, &HttpSeries)> = http
            .iter()
            .flat_map(|(route, series)| series.iter().map(move |s| (route.as_str(), s)))
            .collect();
        rows.sort_by(|a, b| (a.0, &a.1.method, a.1.status).cmp(&(b.0, &b.1.method, b.1.status)));
        let label_set = |route: &str, s: &HttpSeries| {
            labels(&[
                ("method", &s.method),
                ("route", route),
                ("status", &s.status.to_string()),
            ])
        };
        out.push_str("# HELP billsync_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE billsync_http_requests_total counter\n");
        for (route, s) in &rows {
            let _ = writeln!(
                out,
                "billsync_http_requests_total{{{}}} {}",
                label_set(route, s),
                s.latency.count
            );
        }
        out.push_str("# HELP billsync_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE billsync_http_request_duration_seconds histogram\n");
        for (route, s) in &rows {
            write_histogram(
                out,
                "billsync_http_request_duration_seconds",
                &label_set(route, s),
                &s.latency,
            );
        }
    }

    /// The Prometheus text exposition of everything recorded so far.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP billsync_build_info Build information.\n# TYPE billsync_build_info gauge\n",
        );
        let _ = writeln!(
            out,
            "billsync_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        self.render_http(&mut out);
        let families = self.families.lock().expect("metrics lock");
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
                write_histogram(&mut out, name, labels, h);
            }
        }
        out
    }
}

fn write_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
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
