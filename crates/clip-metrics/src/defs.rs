//! Every metric clip records, defined once: name, help, and for histograms
//! the buckets. Names follow Prometheus conventions (base units, `_total`
//! added to counters by the encoder).

use std::sync::Arc;
use std::time::Duration;

use crate::{global, Counter, Histogram, Series};

/// A counter family.
pub struct CounterDef {
    pub name: &'static str,
    pub help: &'static str,
    /// Exposed value = stored integer × scale.
    pub scale: f64,
}

impl CounterDef {
    /// The series with these labels, in this process's registry.
    pub fn with(&self, labels: &[(&str, &str)]) -> Arc<Counter> {
        global().series(
            self.name,
            self.help,
            labels,
            || Series::Counter(Arc::default(), self.scale),
            |s| match s {
                Series::Counter(c, _) => Some(c.clone()),
                Series::Histogram(_) => None,
            },
        )
    }

    pub fn get(&self) -> Arc<Counter> {
        self.with(&[])
    }
}

/// A histogram family.
pub struct HistogramDef {
    pub name: &'static str,
    pub help: &'static str,
    pub buckets: &'static [f64],
}

impl HistogramDef {
    pub fn with(&self, labels: &[(&str, &str)]) -> Arc<Histogram> {
        global().series(
            self.name,
            self.help,
            labels,
            || Series::Histogram(Arc::new(Histogram::new(self.buckets))),
            |s| match s {
                Series::Histogram(h) => Some(h.clone()),
                Series::Counter(..) => None,
            },
        )
    }

    pub fn get(&self) -> Arc<Histogram> {
        self.with(&[])
    }
}

const fn counter(name: &'static str, help: &'static str) -> CounterDef {
    CounterDef { name, help, scale: 1.0 }
}

/// A counter of seconds, recorded in nanoseconds.
const fn seconds(name: &'static str, help: &'static str) -> CounterDef {
    CounterDef {
        name,
        help,
        scale: 1e-9,
    }
}

/// Latencies from 100 µs to 30 s.
pub const LATENCY: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Whole-operation times (index builds, container starts): 10 ms to 10 min.
pub const LONG: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

// Registry range reads.
pub const RANGE_GET_REQUESTS: CounterDef = counter(
    "clip_range_get_requests",
    "HTTP range GETs sent to a registry (one per attempt), by layer digest and HTTP status ('error' when no status arrived).",
);
pub const RANGE_GET_BYTES: CounterDef = counter(
    "clip_range_get_bytes",
    "Compressed bytes received by range GETs, by layer digest and status.",
);
pub const RANGE_GET_SECONDS: HistogramDef = HistogramDef {
    name: "clip_range_get_seconds",
    help: "Latency of range GETs, request to last byte, by layer digest and status.",
    buckets: LATENCY,
};
pub const REGISTRY_RETRIES: CounterDef = counter(
    "clip_registry_retries",
    "Registry requests retried after a transient failure, by operation.",
);

// Inflation and verification.
pub const INFLATE_SECONDS: CounterDef = seconds(
    "clip_inflate_cpu_seconds",
    "CPU time spent verifying and decompressing fetched spans, by layer digest.",
);
pub const INFLATE_BYTES: CounterDef = counter(
    "clip_inflate_bytes",
    "Uncompressed bytes produced from fetched spans, by layer digest.",
);
pub const VERIFY_FAILURES: CounterDef = counter(
    "clip_verify_failures",
    "Fetched spans that failed their digest check, by layer digest.",
);
pub const PREFETCHES: CounterDef = counter("clip_prefetches", "Spans fetched ahead of a sequential reader.");

// The span cache.
pub const CACHE_HITS: CounterDef = counter(
    "clip_cache_hits",
    "Span reads served from a cache, by tier (memory, disk).",
);
pub const CACHE_HIT_BYTES: CounterDef = counter(
    "clip_cache_hit_bytes",
    "Uncompressed bytes served from a cache, by tier.",
);
pub const PANICS: CounterDef = counter(
    "clip_panics",
    "Requests whose handler panicked (answered with an error; the daemon goes on).",
);
pub const CACHE_MISSES: CounterDef = counter(
    "clip_cache_misses",
    "Units (spans, or pieces of long spans) fetched because neither cache had them.",
);
pub const DEMAND_WAITS: CounterDef = counter(
    "clip_demand_waits",
    "Reads that found their unit in no cache and waited for it: fetched by the read itself, or by a fetch already under way.",
);
pub const DEMAND_WAIT_SECONDS: CounterDef = seconds(
    "clip_demand_wait_seconds",
    "Time reads spent waiting for units no cache held (see clip_demand_waits).",
);
pub const CACHE_WRITTEN_BYTES: CounterDef = counter(
    "clip_cache_written_bytes",
    "Uncompressed bytes written to the disk cache.",
);
pub const CACHE_EVICTIONS: CounterDef = counter("clip_cache_evictions", "Files evicted from the disk cache.");
pub const CACHE_WARMED: CounterDef = counter(
    "clip_cache_warmed",
    "Disk cache files read ahead into the page cache because a prefetch asked for them.",
);
pub const PREFIX_SAVED_BYTES: CounterDef = counter(
    "clip_prefix_saved_bytes",
    "Uncompressed bytes a replay left uninflated: its profile saw no read reach them.",
);
pub const PREFIX_MISSES: CounterDef = counter(
    "clip_prefix_misses",
    "Reads past the prefix of a unit a replay inflated, which then fetched the whole unit.",
);

// FUSE.
pub const FUSE_OPS: CounterDef = counter("clip_fuse_ops", "FUSE requests answered, by operation.");
pub const FUSE_ERRORS: CounterDef = counter(
    "clip_fuse_errors",
    "FUSE requests that failed with EIO (a span could not be fetched or verified), by operation.",
);
pub const PAGE_CACHE_PUSHES: CounterDef = counter(
    "clip_page_cache_pushes",
    "Pieces of a profile's recorded reads handed to the kernel's page cache at a fresh mount, by result (stored, unknown_inode, not_held).",
);
pub const PAGE_CACHE_PUSHED_BYTES: CounterDef = counter(
    "clip_page_cache_pushed_bytes",
    "Bytes the kernel's page cache took from profile pushes (reads of them need no FUSE request).",
);
pub const FUSE_BYTES: CounterDef = counter("clip_fuse_bytes", "Bytes returned by FUSE reads, by operation.");
pub const FUSE_SECONDS: HistogramDef = HistogramDef {
    name: "clip_fuse_op_seconds",
    help: "Time to answer a FUSE request, by operation.",
    buckets: LATENCY,
};

// Index builds.
pub const INDEX_BUILDS: CounterDef = counter("clip_index_builds", "Indexes built, by result (ok, error).");
pub const INDEX_BUILD_SECONDS: HistogramDef = HistogramDef {
    name: "clip_index_build_seconds",
    help: "Wall time of index builds.",
    buckets: LONG,
};
pub const INDEX_BUILD_BYTES: CounterDef = counter(
    "clip_index_build_bytes",
    "Layer bytes read by index builds, by kind (compressed, uncompressed).",
);

// Containers.
pub const FIRST_EXEC_SECONDS: HistogramDef = HistogramDef {
    name: "clip_first_exec_seconds",
    help: "From the start of `clipctl run` to the container process's first exec, by runtime.",
    buckets: LONG,
};

/// Gauges computed when metrics are collected, not recorded by processes.
pub const MOUNTS: (&str, &str) = ("clip_mounts", "Image mounts whose server answered this collection.");
pub const CACHE_SIZE: (&str, &str) = ("clip_cache_size_bytes", "Bytes in the disk span cache.");

/// Runs `f`, adding the calling thread's CPU time to `c` (in nanoseconds).
pub fn with_cpu_time<T>(c: &Counter, f: impl FnOnce() -> T) -> T {
    let start = thread_cpu();
    let out = f();
    c.inc_by(thread_cpu().saturating_sub(start).as_nanos() as u64);
    out
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}
