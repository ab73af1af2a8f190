//! Prometheus metrics: each scrape gathers a snapshot ([`Exposition`]) that
//! `prometheus-client` encodes in the OpenMetrics text format.
//!
//! # Design constraints
//! - The services keep their figures where they live (atomics, caches, journals) and read
//!   them at scrape time, so a metric never drifts from what `status` prints; a snapshot
//!   is a [`Collector`] registered for the one scrape.
//! - Every label value is escaped here ([`Escaped`]): `prometheus-client` 0.24 writes label
//!   values as given, and a value a peer supplied (a VM id, a master target's address) must
//!   never end a label, forge a sample or split a line.
//! - Counters are named without `_total` (OpenMetrics adds it to the sample), gauges with
//!   their unit, so names stay what dashboards and alerts already use.

use std::fmt::Write;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows (named without `_total`; the sample carries it).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// A sample's value: integers print as integers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count or a size.
    Int(u64),
    /// A gauge that may be negative (a zstd level).
    Signed(i64),
    /// A ratio or a time in seconds.
    Float(f64),
}

/// One metric family drawn from rows of `T`.
pub struct Series<T> {
    /// Metric name (a counter's without `_total`).
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Help text.
    pub help: &'static str,
    /// The value of a row.
    pub value: fn(&T) -> Value,
}

/// Label names and values of one sample.
pub type Labels = Vec<(&'static str, Escaped)>;

/// A label value, escaped as the exposition format requires (backslash, quote, newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escaped(String);

impl Escaped {
    /// Escapes `v`.
    pub fn new(v: &str) -> Self {
        Escaped(
            v.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n"),
        )
    }
}

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Labels, Value)>,
}

/// The figures of one scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// Adds a family with one sample per `(labels, value)`.
    pub fn family(
        &mut self,
        name: &'static str,
        kind: Kind,
        help: &'static str,
        samples: Vec<(Labels, Value)>,
    ) {
        self.families.push(Family {
            name,
            help,
            kind,
            samples,
        });
    }

    /// Adds a family of one sample without labels.
    pub fn single(&mut self, name: &'static str, kind: Kind, help: &'static str, value: Value) {
        self.family(name, kind, help, vec![(Vec::new(), value)]);
    }

    /// Adds each series, one sample per row with its labels.
    pub fn rows<T>(&mut self, series: &[Series<T>], rows: &[(Labels, T)]) {
        for s in series {
            let samples = rows
                .iter()
                .map(|(labels, row)| (labels.clone(), (s.value)(row)))
                .collect();
            self.family(s.name, s.kind, s.help, samples);
        }
    }

    /// The OpenMetrics text of every family, ending with `# EOF`.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// The samples of `refusals`, one per reason.
pub fn refusal_samples(refusals: &crate::net::Refusals) -> Vec<(Labels, Value)> {
    refusals
        .counts()
        .into_iter()
        .map(|(reason, n)| (vec![("reason", Escaped::new(reason))], Value::Int(n)))
        .collect()
}

fn encode_value(kind: Kind, value: Value, m: MetricEncoder) -> std::fmt::Result {
    match (kind, value) {
        (Kind::Counter, Value::Int(v)) => ConstCounter::new(v).encode(m),
        (Kind::Counter, Value::Float(v)) => ConstCounter::new(v).encode(m),
        // prometheus-client writes u64 gauges as i64 and fails past i64::MAX (an LSN or a
        // rate a peer or an operator set that high): those go out as floats.
        (Kind::Gauge, Value::Int(v)) => match i64::try_from(v) {
            Ok(v) => ConstGauge::new(v).encode(m),
            Err(_) => ConstGauge::new(v as f64).encode(m),
        },
        (Kind::Gauge, Value::Signed(v)) => ConstGauge::new(v).encode(m),
        (Kind::Counter, Value::Signed(v)) => {
            unreachable!("a counter never goes negative: {v}")
        }
        (Kind::Gauge, Value::Float(v)) => ConstGauge::new(v).encode(m),
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for f in &self.families {
            let metric_type = match f.kind {
                Kind::Counter => ConstCounter::<u64>::new(0).metric_type(),
                Kind::Gauge => ConstGauge::<u64>::new(0).metric_type(),
            };
            let mut m = encoder.encode_descriptor(f.name, f.help, None, metric_type)?;
            match f.samples.as_slice() {
                // A sample without labels is written bare (`name value`, no braces).
                [(labels, value)] if labels.is_empty() => encode_value(f.kind, *value, m)?,
                samples => {
                    for (labels, value) in samples {
                        debug_assert!(
                            !labels.is_empty(),
                            "{}: samples of a family have labels",
                            f.name
                        );
                        encode_value(f.kind, *value, m.encode_family(labels)?)?;
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

    #[test]
    fn families_render_as_openmetrics_with_escaped_labels() {
        let mut e = Exposition::default();
        e.single(
            "t_limit_bytes",
            Kind::Gauge,
            "A limit.",
            Value::Int(1_000_000),
        );
        e.family(
            "t_bytes",
            Kind::Counter,
            "Bytes.",
            vec![(
                vec![
                    ("vm", Escaped::new("a\"b\\c\nd")),
                    ("disk", Escaped::new("1")),
                ],
                Value::Int(7),
            )],
        );
        e.single("t_ratio", Kind::Gauge, "A ratio.", Value::Float(0.5));
        e.single("t_huge", Kind::Gauge, "Past i64.", Value::Int(u64::MAX));
        let text = e.render();
        assert!(
            text.contains("# TYPE t_limit_bytes gauge\nt_limit_bytes 1000000\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE t_bytes counter\n"), "{text}");
        assert!(
            text.contains("t_bytes_total{vm=\"a\\\"b\\\\c\\nd\",disk=\"1\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("t_ratio 0.5\n"), "{text}");
        let huge: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("t_huge "))
            .and_then(|v| v.parse().ok())
            .expect("a number");
        assert!(huge >= u64::MAX as f64 * 0.999, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        // No sample line was split or forged by the hostile label.
        assert_eq!(text.lines().filter(|l| l.starts_with("t_bytes")).count(), 1);
    }
}
