//! Prometheus metrics for every lastmile server, through one library (`prometheus-client`).
//!
//! A server keeps what it observes on the request path in [`Histogram`]s (and in its own atomics
//! for plain counts); on each scrape it lays its series out in an [`Exposition`], which the
//! library encodes in the Prometheus text format 0.0.4, served as [`CONTENT_TYPE`]. The library
//! escapes label values (`\`, `"` and newlines) and help text, so a deployment, key, template or
//! worker name can never break the page. Nothing is global: each exposition encodes through its
//! own registry, so several servers in one process (as in the tests) keep their metrics apart,
//! and the texts of several expositions can be concatenated (the 0.0.4 format has no end marker).
//!
//! Names are given as they are exposed: a counter's name ends in `_total` (the library adds the
//! suffix itself, so it is taken off before it is handed over).

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of a `/metrics` answer: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One series' labels, in order: name and (unescaped) value.
pub type Labels = Vec<(&'static str, String)>;

/// A sample's value: integers are written as integers, floats in their shortest form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// A count.
    Int(u64),
    /// A measure (seconds, a share).
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

/// Observations counted into buckets with fixed upper bounds (cumulative on the page, with
/// `+Inf`, `_sum` and `_count`). Clones share their counts.
#[derive(Clone, Debug)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Histogram {
    /// A histogram with these upper bounds, ascending (`+Inf` is implied).
    pub fn new(bounds: &[f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds ascend");
        Self(prometheus_client::metrics::histogram::Histogram::new(
            bounds.iter().copied(),
        ))
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        self.0.observe(v);
    }
}

/// The series of one metric, in the order they are written.
#[derive(Debug)]
enum Series {
    Counters(Vec<(Labels, Value)>),
    Gauges(Vec<(Labels, Value)>),
    Histograms(Vec<(Labels, Histogram)>),
}

#[derive(Debug)]
struct Metric {
    name: String,
    help: String,
    series: Series,
}

/// One scrape's metrics, in the order they are added; [`Exposition::encode`] writes the text.
///
/// A metric added with no series still gets its `# HELP` and `# TYPE` lines.
#[derive(Debug, Default)]
pub struct Exposition {
    metrics: Vec<Metric>,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, name: &str, help: &str, series: Series) -> &mut Self {
        self.metrics.push(Metric {
            name: name.to_string(),
            help: help.to_string(),
            series,
        });
        self
    }

    /// An unlabelled counter; `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, v: impl Into<Value>) -> &mut Self {
        self.counters(name, help, [(Labels::new(), v)])
    }

    /// A counter with one series per label set; `name` ends in `_total`.
    pub fn counters<V: Into<Value>>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, V)>,
    ) -> &mut Self {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let series = series.into_iter().map(|(l, v)| (l, v.into())).collect();
        self.push(name, help, Series::Counters(series))
    }

    /// An unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, v: impl Into<Value>) -> &mut Self {
        self.gauges(name, help, [(Labels::new(), v)])
    }

    /// A gauge with one series per label set.
    pub fn gauges<V: Into<Value>>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, V)>,
    ) -> &mut Self {
        let series = series.into_iter().map(|(l, v)| (l, v.into())).collect();
        self.push(name, help, Series::Gauges(series))
    }

    /// An unlabelled histogram (its current counts).
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.histograms(name, help, [(Labels::new(), h.clone())])
    }

    /// A histogram with one series per label set (each with its `le` buckets).
    pub fn histograms(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, Histogram)>,
    ) -> &mut Self {
        let series = series.into_iter().collect();
        self.push(name, help, Series::Histograms(series))
    }

    /// The page, in the Prometheus text format 0.0.4.
    pub fn encode(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would leave the text cut short.
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
    }
}

fn encode_value(counter: bool, v: Value, e: MetricEncoder) -> fmt::Result {
    match (counter, v) {
        (true, Value::Int(n)) => ConstCounter::new(n).encode(e),
        (true, Value::Float(x)) => ConstCounter::new(x).encode(e),
        (false, Value::Int(n)) => ConstGauge::new(n).encode(e),
        (false, Value::Float(x)) => ConstGauge::new(x).encode(e),
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for m in &self.metrics {
            let (name, kind) = match m.series {
                Series::Counters(_) => (
                    m.name.strip_suffix("_total").unwrap_or(&m.name),
                    MetricType::Counter,
                ),
                Series::Gauges(_) => (m.name.as_str(), MetricType::Gauge),
                Series::Histograms(_) => (m.name.as_str(), MetricType::Histogram),
            };
            let mut e = encoder.encode_descriptor(name, &m.help, None, kind)?;
            match &m.series {
                Series::Counters(s) | Series::Gauges(s) => {
                    let counter = kind == MetricType::Counter;
                    for (labels, v) in s {
                        encode_value(counter, *v, e.encode_family(labels)?)?;
                    }
                }
                Series::Histograms(s) => {
                    for (labels, h) in s {
                        h.0.encode(e.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of a page is a comment or `name{labels} value` with its label values
    /// quoted and escaped; returns the samples as (series, value).
    fn parse(text: &str) -> Vec<(String, f64)> {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("number in {line:?}")),
            };
            if let Some((name, labels)) = series.split_once('{') {
                assert!(!name.is_empty());
                let mut rest = labels.strip_suffix('}').expect("closing brace");
                while !rest.is_empty() {
                    let (_key, after) = rest.split_once("=\"").expect("key=\"");
                    // The value runs to the first quote not escaped by a backslash.
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next().expect("closing quote") {
                            (_, '\\') => {
                                let (_, c) = chars.next().expect("escaped char");
                                assert!(matches!(c, '\\' | '"' | 'n'), "escape \\{c}");
                            }
                            (i, '"') => break i,
                            _ => {}
                        }
                    };
                    rest = after[end + 1..]
                        .strip_prefix(',')
                        .unwrap_or(&after[end + 1..]);
                }
            }
            samples.push((series.to_string(), value));
        }
        samples
    }

    #[test]
    fn label_values_are_escaped_and_lines_parse() {
        let mut page = Exposition::new();
        page.gauges(
            "x_live",
            "Things.",
            [(vec![("name", "a\"b\\c\nd".to_string())], 1u64)],
        );
        let text = page.encode();
        assert!(
            text.contains("x_live{name=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(parse(&text).len(), 1);
    }

    #[test]
    fn names_types_and_values_are_as_given() {
        let h = Histogram::new(&[0.005, 0.1, 1.0, 30.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(50.0);
        let mut page = Exposition::new();
        page.counter("x_requests_total", "Requests.", 3u64)
            .counters(
                "x_cpu_seconds_total",
                "CPU.",
                [(vec![("sandbox", "s".to_string())], 1.5)],
            )
            .gauge("x_up", "Up.", true)
            .gauge("x_rate", "Rate.", 0.25)
            .histogram("x_seconds", "Latency.", &h)
            .histograms(
                "x_cold_seconds",
                "Cold starts.",
                [(vec![("deployment", "d".to_string())], h.clone())],
            )
            .gauges("x_empty", "Nothing yet.", Vec::<(Labels, u64)>::new());
        let text = page.encode();
        let expected = "# HELP x_requests_total Requests.\n\
            # TYPE x_requests_total counter\n\
            x_requests_total 3\n\
            # HELP x_cpu_seconds_total CPU.\n\
            # TYPE x_cpu_seconds_total counter\n\
            x_cpu_seconds_total{sandbox=\"s\"} 1.5\n\
            # HELP x_up Up.\n\
            # TYPE x_up gauge\n\
            x_up 1\n\
            # HELP x_rate Rate.\n\
            # TYPE x_rate gauge\n\
            x_rate 0.25\n\
            # HELP x_seconds Latency.\n\
            # TYPE x_seconds histogram\n\
            x_seconds_bucket{le=\"0.005\"} 0\n\
            x_seconds_bucket{le=\"0.1\"} 1\n\
            x_seconds_bucket{le=\"1\"} 2\n\
            x_seconds_bucket{le=\"30\"} 2\n\
            x_seconds_bucket{le=\"+Inf\"} 3\n\
            x_seconds_sum 50.55\n\
            x_seconds_count 3\n\
            # HELP x_cold_seconds Cold starts.\n\
            # TYPE x_cold_seconds histogram\n\
            x_cold_seconds_bucket{deployment=\"d\",le=\"0.005\"} 0\n\
            x_cold_seconds_bucket{deployment=\"d\",le=\"0.1\"} 1\n\
            x_cold_seconds_bucket{deployment=\"d\",le=\"1\"} 2\n\
            x_cold_seconds_bucket{deployment=\"d\",le=\"30\"} 2\n\
            x_cold_seconds_bucket{deployment=\"d\",le=\"+Inf\"} 3\n\
            x_cold_seconds_sum{deployment=\"d\"} 50.55\n\
            x_cold_seconds_count{deployment=\"d\"} 3\n\
            # HELP x_empty Nothing yet.\n\
            # TYPE x_empty gauge\n";
        assert_eq!(text, expected);
        assert_eq!(parse(&text).len(), 18);
    }

    #[test]
    fn colons_in_names_are_kept() {
        let mut page = Exposition::new();
        page.gauge("vllm:num_requests_waiting", "Waiting.", 2u64);
        assert!(page.encode().contains("\nvllm:num_requests_waiting 2\n"));
    }
}
