//! clip's metrics.
//!
//! Each clip process records into one process-wide [`Registry`] through the
//! typed definitions in [`defs`]: a counter or histogram is looked up once
//! by its labels and then updated with atomics. A [`Snapshot`] is a plain
//! copy of the values that can be merged with others, written as JSON, and
//! encoded in the Prometheus/OpenMetrics text format by `prometheus-client`.
//!
//! One process records everything of a host: clipd, which serves the
//! snapshot to `clipctl metrics` and to Prometheus.

pub mod defs;
mod snapshot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use snapshot::{Family, Kind, Sample, Snapshot, Value};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A distribution over fixed buckets (upper bounds, ascending).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is +Inf.
    counts: Vec<AtomicU64>,
    /// The sum, as f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
            Some((f64::from_bits(s) + v).to_bits())
        });
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    fn value(&self) -> Value {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        Value::Histogram {
            sum: f64::from_bits(self.sum.load(Ordering::Relaxed)),
            count: cumulative,
            buckets,
        }
    }
}

/// Label pairs, sorted by name.
type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    let mut v: Labels = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    v.sort();
    v
}

#[derive(Debug)]
enum Series {
    /// With the factor that turns the stored integer into the exposed
    /// value (nanoseconds to seconds).
    Counter(Arc<Counter>, f64),
    Histogram(Arc<Histogram>),
}

#[derive(Debug)]
struct FamilyState {
    help: &'static str,
    series: BTreeMap<Labels, Series>,
}

/// The metrics of this process.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<&'static str, FamilyState>>,
}

/// This process's registry.
pub fn global() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

impl Registry {
    fn series<T>(
        &self,
        name: &'static str,
        help: &'static str,
        pairs: &[(&str, &str)],
        make: impl FnOnce() -> Series,
        pick: impl Fn(&Series) -> Option<Arc<T>>,
    ) -> Arc<T> {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name).or_insert_with(|| FamilyState {
            help,
            series: BTreeMap::new(),
        });
        let series = family.series.entry(labels(pairs)).or_insert_with(make);
        // A name is defined once, in `defs`, so its kind never changes.
        pick(series).expect("one kind per metric name")
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Snapshot {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Snapshot::default();
        for (name, f) in families.iter() {
            let mut kind = Kind::Counter;
            let samples = f
                .series
                .iter()
                .map(|(labels, s)| {
                    let value = match s {
                        Series::Counter(c, scale) => Value::Number(c.get() as f64 * scale),
                        Series::Histogram(h) => {
                            kind = Kind::Histogram;
                            h.value()
                        }
                    };
                    Sample {
                        labels: labels.iter().cloned().collect(),
                        value,
                    }
                })
                .collect();
            out.families.insert(
                name.to_string(),
                Family {
                    help: f.help.to_string(),
                    kind,
                    samples,
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        static B: &[f64] = &[0.1, 1.0];
        let h = Histogram::new(B);
        for v in [0.05, 0.1, 0.5, 2.0, 3.0] {
            h.observe(v);
        }
        let Value::Histogram { sum, count, buckets } = h.value() else {
            panic!("not a histogram")
        };
        assert_eq!(count, 5);
        assert!((sum - 5.65).abs() < 1e-9);
        // le is inclusive: 0.1 falls in the 0.1 bucket.
        assert_eq!(buckets, vec![(0.1, 2), (1.0, 3)]);
    }

    #[test]
    fn snapshot_merges_and_encodes() {
        const C: defs::CounterDef = defs::CounterDef {
            name: "test_things",
            help: "Things.",
            scale: 1.0,
        };
        const H: defs::HistogramDef = defs::HistogramDef {
            name: "test_seconds",
            help: "Times.",
            buckets: &[0.5],
        };
        C.with(&[("layer", "sha256:ab"), ("status", "206")]).inc_by(3);
        H.with(&[("op", "read")]).observe(0.25);
        let mut s = global().snapshot();
        assert_eq!(
            s.value("test_things", &[("status", "206"), ("layer", "sha256:ab")]),
            Some(&Value::Number(3.0))
        );
        let copy = s.clone();
        s.merge(&copy);
        assert_eq!(s.sum("test_things", &[("layer", "sha256:ab")]), 6.0);
        let json = serde_json::to_string(&s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let text = s.encode_text();
        assert!(text.contains("# TYPE test_things counter\n"), "{text}");
        assert!(
            text.contains("test_things_total{layer=\"sha256:ab\",status=\"206\"} 6\n"),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_bucket{le=\"0.5\",op=\"read\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_bucket{le=\"+Inf\",op=\"read\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("test_seconds_count{op=\"read\"} 2\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        let mut g = Snapshot::default();
        g.set_gauge("test_gauge", "A gauge.", 2.0);
        assert!(g.encode_text().contains("\ntest_gauge 2\n"), "{}", g.encode_text());
    }
}
