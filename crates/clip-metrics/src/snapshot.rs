//! Plain copies of metric values: mergeable, serialisable, and encoded in
//! the Prometheus/OpenMetrics text format by `prometheus-client`.

use std::collections::BTreeMap;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Number(f64),
    /// `buckets` holds (upper bound, cumulative count) for the finite
    /// bounds; `count` is the +Inf bucket.
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

impl Value {
    fn add(&mut self, other: &Value) {
        match (self, other) {
            (Value::Number(a), Value::Number(b)) => *a += b,
            (
                Value::Histogram { sum, count, buckets },
                Value::Histogram {
                    sum: s2,
                    count: c2,
                    buckets: b2,
                },
            ) => {
                *sum += s2;
                *count += c2;
                if buckets.len() == b2.len() && buckets.iter().zip(b2).all(|(a, b)| a.0 == b.0) {
                    for (a, b) in buckets.iter_mut().zip(b2) {
                        a.1 += b.1;
                    }
                } else {
                    // Bounds changed between versions: the buckets can't be
                    // added, so they are dropped; sum and count stay right.
                    buckets.clear();
                }
            }
            // One name has one kind; a mismatch is a damaged totals file.
            _ => {}
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Family {
    pub help: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

/// Metric families by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(flatten)]
    pub families: BTreeMap<String, Family>,
}

impl Snapshot {
    /// Adds `other`'s values to these, series by series.
    pub fn merge(&mut self, other: &Snapshot) {
        for (name, f) in &other.families {
            let mine = self.families.entry(name.clone()).or_insert_with(|| Family {
                help: f.help.clone(),
                kind: f.kind,
                samples: Vec::new(),
            });
            if mine.kind != f.kind {
                continue;
            }
            for s in &f.samples {
                match mine.samples.iter_mut().find(|m| m.labels == s.labels) {
                    Some(m) => m.value.add(&s.value),
                    None => mine.samples.push(s.clone()),
                }
            }
        }
    }

    /// What `self` has beyond `earlier` (an earlier snapshot of the same
    /// process): the series that grew, by how much.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let mut out = Snapshot::default();
        for (name, f) in &self.families {
            let samples: Vec<Sample> = f
                .samples
                .iter()
                .filter_map(|s| {
                    let before = earlier
                        .families
                        .get(name)
                        .and_then(|e| e.samples.iter().find(|x| x.labels == s.labels));
                    let value = match (before.map(|b| &b.value), &s.value) {
                        (None, v) => v.clone(),
                        (Some(Value::Number(a)), Value::Number(b)) => Value::Number(b - a),
                        (
                            Some(Value::Histogram {
                                sum: s0,
                                count: c0,
                                buckets: b0,
                            }),
                            Value::Histogram { sum, count, buckets },
                        ) => Value::Histogram {
                            sum: sum - s0,
                            count: count - c0,
                            buckets: buckets.iter().zip(b0).map(|(b, a)| (b.0, b.1 - a.1)).collect(),
                        },
                        _ => return None,
                    };
                    let grew = match &value {
                        Value::Number(n) => *n != 0.0,
                        Value::Histogram { count, .. } => *count != 0,
                    };
                    grew.then(|| Sample {
                        labels: s.labels.clone(),
                        value,
                    })
                })
                .collect();
            if !samples.is_empty() {
                out.families.insert(
                    name.clone(),
                    Family {
                        help: f.help.clone(),
                        kind: f.kind,
                        samples,
                    },
                );
            }
        }
        out
    }

    /// Sets a gauge without labels.
    pub fn set_gauge(&mut self, name: &str, help: &str, v: f64) {
        self.families.insert(
            name.to_string(),
            Family {
                help: help.to_string(),
                kind: Kind::Gauge,
                samples: vec![Sample {
                    labels: BTreeMap::new(),
                    value: Value::Number(v),
                }],
            },
        );
    }

    /// The value of the series `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<&Value> {
        let f = self.families.get(name)?;
        f.samples
            .iter()
            .find(|s| {
                s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| &s.value)
    }

    /// The sum of the numeric series of `name` whose labels include these.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let Some(f) = self.families.get(name) else { return 0.0 };
        f.samples
            .iter()
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| match &s.value {
                Value::Number(n) => *n,
                Value::Histogram { count, .. } => *count as f64,
            })
            .sum()
    }

    /// The OpenMetrics text exposition (which Prometheus scrapes).
    pub fn encode_text(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Collector(self.clone())));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Debug)]
struct Collector(Snapshot);

/// One series' value, encodable by prometheus-client.
struct Encoded<'a>(Kind, &'a Value);

fn whole(v: f64) -> Option<u64> {
    (v >= 0.0 && v.fract() == 0.0 && v < 9.007_199_254_740_992e15).then_some(v as u64)
}

impl EncodeMetric for Encoded<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match (self.0, self.1) {
            // Whole numbers (counts, bytes) print as integers.
            (Kind::Counter, Value::Number(v)) => match whole(*v) {
                Some(n) => encoder.encode_counter::<NoLabelSet, _, f64>(&n, None),
                None => encoder.encode_counter::<NoLabelSet, _, f64>(v, None),
            },
            (Kind::Gauge, Value::Number(v)) => match whole(*v) {
                Some(n) => encoder.encode_gauge(&n),
                None => encoder.encode_gauge(v),
            },
            (Kind::Histogram, Value::Histogram { sum, count, buckets }) => {
                let mut b = buckets.clone();
                b.push((f64::INFINITY, *count));
                // prometheus-client takes per-bucket counts and sums them.
                let mut prev = 0;
                for (_, c) in b.iter_mut() {
                    let cumulative = *c;
                    *c = cumulative.saturating_sub(prev);
                    prev = cumulative;
                }
                encoder.encode_histogram::<NoLabelSet>(*sum, *count, &b, None)
            }
            _ => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        match self.0 {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        }
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, f) in &self.0.families {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut family = encoder.encode_descriptor(name, &f.help, None, kind)?;
            match f.samples.as_slice() {
                // A family without labels has one series: no `{}`.
                [s] if s.labels.is_empty() => Encoded(f.kind, &s.value).encode(family)?,
                samples => {
                    for s in samples {
                        let labels: Vec<(&str, &str)> =
                            s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        let series = family.encode_family(&labels)?;
                        Encoded(f.kind, &s.value).encode(series)?;
                    }
                }
            }
        }
        Ok(())
    }
}
