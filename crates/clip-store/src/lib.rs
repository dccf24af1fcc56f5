//! The layer store: one per host (or per embedding program). It owns the
//! decompressed bytes of every layer any mounted image reads.
//!
//! * Units (spans, or pieces of long zstd spans; see [`LayerLayout`]) are
//!   cached in memory under one bound and on disk ([`DiskCache`]), keyed by
//!   an identity that binds them to the digests they were verified against.
//! * A miss fetches the unit's compressed bytes with one range request,
//!   checks their SHA-256, inflates them from the checkpoint and caches the
//!   result; concurrent readers of one unit, from any image, share that
//!   fetch ([`flight`]), and a leader that panics still answers them.
//! * A span with no resume point inside (a long zstd frame) is read as one
//!   stream, each piece checked and handed out as it passes; so is a whole
//!   layer whose registry ignores Range requests: once, not per span.
//! * Prefetch ([`Priority`]) runs on worker threads, replay before
//!   read-ahead, adjacent spans coalesced into one request; a demand read
//!   never waits behind the queue (it fetches at once, with the spans it
//!   reads ahead in the same request, or joins the fetch in flight). Inflating a prefetch takes a permit, leaving a core to
//!   the container, unless a reader waits for it (or, for a replay, for
//!   anything). Only demand reads remember failures.

mod disk;
mod flight;
mod layout;
mod memory;
mod prefetch;
mod prio;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use clip_metrics::{defs, Counter};
use clip_registry::ImageSource;

pub use disk::{private_dir, usage, DiskCache};
pub use layout::{LayerLayout, Span, Unit};
pub use prefetch::Priority;

use flight::{lock, Claim, Flights};
use memory::MemCache;

/// A unit's identity (see [`LayerLayout`]).
pub type UnitId = [u8; 32];

/// A unit to prefetch, as `(unit, need, upto)`: see
/// [`LayerStore::prefetch_prefixes`].
pub type Want = (usize, u64, u64);

/// Why a read failed. Cloned to every reader that shared the fetch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("layer {layer} span {span}: fetching from {from}")]
    Fetch {
        layer: String,
        span: usize,
        from: String,
        #[source]
        source: Arc<clip_registry::Error>,
    },
    #[error("layer {layer} span {span} failed verification twice")]
    Verify {
        layer: String,
        span: usize,
        #[source]
        source: Arc<clip_gzran::Error>,
    },
    #[error("layer {layer} span {span}: no progress from the fetch in flight for {waited:?}")]
    Stalled {
        layer: String,
        span: usize,
        waited: Duration,
    },
    #[error("layer {layer} span {span}: the fetch was abandoned ({why}); the next read tries again")]
    Abandoned {
        layer: String,
        span: usize,
        why: &'static str,
    },
    #[error("index: {0}")]
    Index(String),
}

/// A layer as one image reads it: its layout, and where its blob is.
#[derive(Clone)]
pub struct LayerRef {
    pub layout: Arc<LayerLayout>,
    pub source: Arc<dyn ImageSource>,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Decompressed units kept in memory, for the whole store.
    pub mem_bytes: usize,
    /// The disk cache directory, None for memory only.
    pub cache_dir: Option<PathBuf>,
    pub cache_max: u64,
    /// Prefetch worker threads (concurrent prefetch requests).
    pub prefetch_workers: usize,
    /// The longest a reader waits on another's fetch without progress.
    pub wait: Duration,
    /// The most compressed bytes one coalesced prefetch request covers.
    /// A run's response is read as a stream, each span handed out once its
    /// own bytes are in: read whole, runs of up to 8 MiB made the first
    /// span wait for the rest (py cold with a profile, medians of 8
    /// interleaved: 0.79 s against 0.69 s). Streamed, 8 MiB took 0.68 s
    /// against 0.73 s for the earlier split runs (medians of 12), with 23
    /// range GETs instead of 41.
    pub coalesce_bytes: u64,
    /// The largest gap of spans nobody asked for that one prefetch request
    /// bridges (fetched, neither inflated nor cached): Debian's registry
    /// spends about 2.8 ms of CPU per request whatever its size (1 KB or
    /// 1 MB alike), a request costs more than a few hundred kilobytes.
    pub coalesce_gap: u64,
    /// Prefetch workers that may inflate at once (a span a reader waits
    /// for is inflated regardless): fetches overlap freely, but inflating
    /// is CPU the container's own process needs, so one core is left to
    /// it. Measured on two cores (median of 4 cold starts with a profile):
    /// `import torch` 3.7 s with 4 inflating at once, 3.5 with 2, 3.1 with
    /// 1; the py image within noise (0.9-1.0 s) for all three.
    ///
    /// A replay also inflates without a permit while any demand reader
    /// waits on the store: the container is then blocked, and the core
    /// kept for it idle. Cold with a profile, interleaved: torch 1.99 →
    /// 1.88 s (medians of 8, faster in all 8 pairs), py 0.653 → 0.650 s
    /// (medians of 10; 0.638 → 0.657 in 8 more). Read-ahead keeps the
    /// permit: it is a guess, and without a profile the same bypass for it
    /// made both images slower (torch 2.87 → 2.94 s, py 1.02 → 1.06 s).
    pub inflaters: usize,
    /// How long a demand read's failure is remembered, so the kernel's
    /// readahead and the read behind it do not both wait it out.
    pub failure_memo: Duration,
    /// On a demand miss, the spans after it fetched too. A package's files
    /// sit together in a tar, so what follows a miss is likely read next;
    /// measured on the py image (median of 5 cold starts without a
    /// profile): 0 → 1.66 s, 2 → 1.50, 4 → 1.47, 8 → 1.43. They come in the
    /// miss's own request ([`LayerStore::miss_run`]), unless a profile is
    /// being replayed: then they are queued behind it. A miss just below
    /// the layer's last one reads ahead backwards instead, queued: on the
    /// torch image without a profile, where the exit's destructors walk
    /// libraries' text downwards, 4.77 → 4.49 s and 4.81 → 4.60 s
    /// (medians of 8 interleaved cold starts, in two runs).
    pub miss_readahead: usize,
    /// Span cache writes wait until the store has fetched nothing for
    /// this long: while a container starts, writing and syncing what it
    /// fetched takes CPU and disk from it (the journal and writeback run
    /// at normal priority whatever the writer's). The fetches of a start
    /// end well before its process does, so the wait must outlast that gap.
    /// Measured on the py image, cold with a profile (medians of 6-8
    /// interleaved runs): 0.77 s writing at once, 0.66 s after 3 s of
    /// quiet, 0.69 s after 1 s and 2 s; 250 ms was no better than at once.
    pub write_quiet: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            mem_bytes: 256 << 20,
            cache_dir: None,
            cache_max: 10 << 30,
            prefetch_workers: 4,
            wait: Duration::from_secs(45),
            coalesce_bytes: 8 << 20,
            coalesce_gap: 1 << 20,
            inflaters: std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            failure_memo: Duration::from_secs(2),
            miss_readahead: 4,
            write_quiet: Duration::from_secs(2),
        }
    }
}

/// Miss runs ([`LayerStore::miss_run`]) at once; past this a reader fetches
/// its unit itself and queues the read-ahead, so a burst of misses does not
/// start a thread each.
const MAX_MISS_RUNS: usize = 8;

/// The reader behind a miss run ([`LayerStore::miss_run`]): told once the
/// run leads its flights; the failure of its unit is the reader's own.
struct MissReader {
    unit: UnitId,
    led: SyncSender<()>,
}

/// One count of a counter, given back when dropped, however its holder
/// ends (a panic included).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn enter(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which cache served a read.
#[derive(Debug, Clone, Copy)]
enum Tier {
    Memory,
    Disk,
}

/// Why a unit is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Demand,
    Prefetch,
}

struct Metrics {
    mem_hits: Arc<Counter>,
    mem_hit_bytes: Arc<Counter>,
    disk_hits: Arc<Counter>,
    disk_hit_bytes: Arc<Counter>,
    misses: Arc<Counter>,
    demand_waits: Arc<Counter>,
    demand_wait_seconds: Arc<Counter>,
    prefetches: Arc<Counter>,
    prefix_saved: Arc<Counter>,
    prefix_misses: Arc<Counter>,
}

/// A stream over a whole layer (its registry ignores Range) or over one
/// long span, whose units readers wait for as it passes.
struct Fill {
    st: Mutex<FillState>,
    cv: Condvar,
}

#[derive(Default)]
struct FillState {
    wanted: HashSet<usize>,
    produced: HashMap<usize, Arc<Vec<u8>>>,
    /// The last units produced, for readers that arrive just after.
    recent: VecDeque<(usize, Arc<Vec<u8>>)>,
    error: Option<ReadError>,
    finished: bool,
    progress: Option<Instant>,
}

type FillKey = (UnitId, Option<usize>);

pub struct LayerStore {
    mem: MemCache,
    disk: Option<DiskCache>,
    /// A flight's error says whether a demand read saw it: a prefetch's
    /// failure does not fail the demand read that joined it.
    flights: Flights<UnitId, Arc<Vec<u8>>, (ReadError, Why)>,
    fills: Mutex<HashMap<FillKey, Arc<Fill>>>,
    failed: Mutex<HashMap<UnitId, (Instant, ReadError)>>,
    queue: prefetch::Queue,
    /// Permits to inflate, for prefetches ([`StoreOptions::inflaters`]).
    inflating: Gate,
    /// Demand readers waiting on a fetch (their own or one they joined):
    /// a replay may inflate without a permit meanwhile.
    waiting: AtomicUsize,
    /// Miss runs under way ([`LayerStore::miss_run`]).
    miss_runs: AtomicUsize,
    /// Replay runs under way.
    replay_runs: AtomicUsize,
    opts: StoreOptions,
    metrics: Metrics,
    me: Weak<LayerStore>,
}

impl std::fmt::Debug for LayerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStore").field("opts", &self.opts).finish()
    }
}

impl LayerStore {
    pub fn new(opts: StoreOptions) -> std::io::Result<Arc<Self>> {
        let disk = match &opts.cache_dir {
            Some(d) => Some(DiskCache::open(d, opts.cache_max)?),
            None => None,
        };
        if let Some(d) = &disk {
            d.set_quiet(opts.write_quiet);
        }
        let store = Arc::new_cyclic(|me| Self {
            mem: MemCache::new(opts.mem_bytes),
            disk,
            flights: Flights::new(),
            fills: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            queue: prefetch::Queue::default(),
            inflating: Gate::new(opts.inflaters),
            waiting: AtomicUsize::new(0),
            miss_runs: AtomicUsize::new(0),
            replay_runs: AtomicUsize::new(0),
            opts: opts.clone(),
            metrics: Metrics {
                mem_hits: defs::CACHE_HITS.with(&[("tier", "memory")]),
                mem_hit_bytes: defs::CACHE_HIT_BYTES.with(&[("tier", "memory")]),
                disk_hits: defs::CACHE_HITS.with(&[("tier", "disk")]),
                disk_hit_bytes: defs::CACHE_HIT_BYTES.with(&[("tier", "disk")]),
                misses: defs::CACHE_MISSES.get(),
                demand_waits: defs::DEMAND_WAITS.get(),
                demand_wait_seconds: defs::DEMAND_WAIT_SECONDS.get(),
                prefetches: defs::PREFETCHES.get(),
                prefix_saved: defs::PREFIX_SAVED_BYTES.get(),
                prefix_misses: defs::PREFIX_MISSES.get(),
            },
            me: me.clone(),
        });
        for _ in 0..opts.prefetch_workers {
            let weak = Arc::downgrade(&store);
            std::thread::Builder::new()
                .name("clip-prefetch".into())
                .spawn(move || prefetch::worker(weak))?;
        }
        Ok(store)
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }

    /// Appends the layer's uncompressed bytes `pos..pos + len` to `out`: a
    /// demand read, which fetches what is missing at once.
    pub fn read(&self, layer: &LayerRef, mut pos: u64, len: u64, out: &mut Vec<u8>) -> Result<(), ReadError> {
        let l = &layer.layout;
        let end = pos.saturating_add(len).min(l.uncompressed_size);
        while pos < end {
            let u = l.unit_at(pos);
            let unit = &l.units[u];
            let off = pos - unit.out;
            let n = (unit.out + unit.len).min(end).saturating_sub(pos);
            if n == 0 {
                return Err(ReadError::Index(format!("layer {} has no unit at byte {pos}", l.short)));
            }
            self.read_unit(layer, u, off, n, out)?;
            pos += n;
        }
        Ok(())
    }

    /// Whether all of unit `u` is cached (memory or disk).
    pub fn cached(&self, layer: &LayerLayout, u: usize) -> bool {
        self.holds(layer, u, layer.units[u].len)
    }

    /// Whether at least the first `need` bytes of unit `u` are cached.
    pub fn holds(&self, layer: &LayerLayout, u: usize, need: u64) -> bool {
        let id = &layer.units[u].id;
        self.mem.contains(id, need) || self.disk.as_ref().is_some_and(|d| d.contains(id, need))
    }

    fn read_unit(&self, layer: &LayerRef, u: usize, off: u64, n: u64, out: &mut Vec<u8>) -> Result<(), ReadError> {
        let unit = &layer.layout.units[u];
        if let Some(tier) = self.read_cached(unit, off, n, out) {
            let (hits, bytes) = match tier {
                Tier::Memory => (&self.metrics.mem_hits, &self.metrics.mem_hit_bytes),
                Tier::Disk => (&self.metrics.disk_hits, &self.metrics.disk_hit_bytes),
            };
            hits.inc();
            bytes.inc_by(n);
            return Ok(());
        }
        if self.mem.contains(&unit.id, 0) || self.disk.as_ref().is_some_and(|d| d.held(&unit.id).is_some()) {
            // A replay inflated less of this unit than is read now.
            self.metrics.prefix_misses.inc();
            tracing::debug!(layer = %layer.layout.short, unit = u, off, n, "a read past a replayed prefix");
        }
        // A failure just seen is the answer, with nothing fetched ahead.
        if let Some(e) = self.remembered_failure(&unit.id) {
            return Err(e);
        }
        // A miss: the spans after it are fetched alongside, not waited for.
        let span = unit.span;
        let ahead = self.opts.miss_readahead;
        let spans = &layer.layout.spans;
        let prev = layer.layout.last_miss.swap(span, Ordering::Relaxed);
        if prev > span && prev - span <= ahead + 1 {
            // Just below the last miss: a reader going backwards, as C++
            // runs a library's static destructors at exit, in reverse
            // order of construction, each in its own part of the text.
            // The spans before it are queued, nearest first.
            let units = (span.saturating_sub(ahead)..span).rev().map(|k| spans[k].units.start);
            self.prefetch(layer, units, Priority::Readahead);
        } else {
            let last = (span + ahead).min(spans.len() - 1);
            if last > span {
                let units: Vec<usize> = (span + 1..=last).map(|k| spans[k].units.start).collect();
                if !self.miss_run(layer, u, &units) {
                    self.prefetch(layer, units, Priority::Readahead);
                }
            }
        }
        let v = {
            let _waiting = Counted::enter(&self.waiting);
            let t0 = Instant::now();
            let v = self.unit(layer, u, Why::Demand, off + n);
            self.metrics.demand_waits.inc();
            self.metrics.demand_wait_seconds.inc_by(t0.elapsed().as_nanos() as u64);
            v?
        };
        let b = v.get(off as usize..(off + n) as usize).ok_or_else(|| {
            ReadError::Index(format!(
                "layer {} unit {u}: {} bytes, read at {off}+{n} (internal error)",
                layer.layout.short,
                v.len()
            ))
        })?;
        out.extend_from_slice(b);
        Ok(())
    }

    /// Appends bytes `off..off + n` of `unit` to `out` from memory or
    /// disk, if either holds them; which one did.
    fn read_cached(&self, unit: &Unit, off: u64, n: u64, out: &mut Vec<u8>) -> Option<Tier> {
        if let Some(b) = self
            .mem
            .get(&unit.id)
            .as_deref()
            .and_then(|v| v.get(off as usize..(off + n) as usize))
        {
            out.extend_from_slice(b);
            return Some(Tier::Memory);
        }
        self.disk
            .as_ref()
            .filter(|d| d.read(&unit.id, unit.len, off, n, out))
            .map(|_| Tier::Disk)
    }

    /// A demand read's recent failure of this unit, if any.
    fn remembered_failure(&self, id: &UnitId) -> Option<ReadError> {
        lock(&self.failed)
            .get(id)
            .filter(|(when, _)| when.elapsed() < self.opts.failure_memo)
            .map(|(_, e)| e.clone())
    }

    /// Unit `u`'s bytes, fetched, joined or taken from the caches: at
    /// least its first `need` (a flight or cache entry of fewer, a
    /// replay's prefix, is not the answer).
    fn unit(&self, layer: &LayerRef, u: usize, why: Why, need: u64) -> Result<Arc<Vec<u8>>, ReadError> {
        let l = &layer.layout;
        let unit = &l.units[u];
        let abandoned = |why_text| ReadError::Abandoned {
            layer: l.short.clone(),
            span: unit.span,
            why: why_text,
        };
        if why == Why::Demand {
            if let Some(e) = self.remembered_failure(&unit.id) {
                return Err(e);
            }
        }
        let mut retried = false;
        loop {
            match self
                .flights
                .claim(unit.id, (abandoned("its leader stopped, likely a panic"), why))
            {
                Claim::Waiter(f) => match f.wait(self.opts.wait) {
                    Some(Ok(v)) if v.len() as u64 >= need => return Ok(v),
                    // A prefix too short: fetched again, whole.
                    Some(Ok(_)) => continue,
                    // A prefetch's failure is not a demand read's: try
                    // again, once, as the leader.
                    Some(Err((_, Why::Prefetch))) if why == Why::Demand && !retried => {
                        retried = true;
                        continue;
                    }
                    Some(Err((e, _))) => return Err(e),
                    None => {
                        return Err(ReadError::Stalled {
                            layer: l.short.clone(),
                            span: unit.span,
                            waited: self.opts.wait,
                        })
                    }
                },
                Claim::Leader(lead) => {
                    let r = self.load(layer, u, need);
                    match &r {
                        Ok(_) => {
                            lock(&self.failed).remove(&unit.id);
                        }
                        Err(e) if why == Why::Demand => {
                            lock(&self.failed).insert(unit.id, (Instant::now(), e.clone()));
                        }
                        Err(_) => {}
                    }
                    lead.complete(r.clone().map_err(|e| (e, why)));
                    return r;
                }
            }
        }
    }

    /// Gets unit `u` as its flight's leader: from the caches if another
    /// leader just finished it (at least `need` bytes of it), else all of
    /// it from the source.
    fn load(&self, layer: &LayerRef, u: usize, need: u64) -> Result<Arc<Vec<u8>>, ReadError> {
        let l = &layer.layout;
        let unit = &l.units[u];
        if let Some(v) = self.mem.get(&unit.id).filter(|v| v.len() as u64 >= need) {
            return Ok(v);
        }
        if let Some(d) = &self.disk {
            if let Some(held) = d.held(&unit.id).filter(|&h| h >= need) {
                let mut v = Vec::with_capacity(held as usize);
                if d.read(&unit.id, unit.len, 0, held, &mut v) {
                    return Ok(Arc::new(v));
                }
            }
        }
        let span = &l.spans[unit.span];
        if span.streamed || l.range_ignored.load(Ordering::Relaxed) {
            return self.wait_for_stream(layer, u);
        }
        let mut got = None;
        match self.fetch_spans(layer, &[(unit.span, u64::MAX)], Why::Demand, false, &mut |data| {
            got = Some(data)
        }) {
            Ok(()) => {
                let data = got.expect("one span delivered");
                self.mem.put(unit.id, data.clone());
                Ok(data)
            }
            Err(ReadError::Fetch { source, .. }) if source.is_range_ignored() => {
                l.range_ignored.store(true, Ordering::Relaxed);
                self.wait_for_stream(layer, u)
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches `spans` (ascending, none streamed; each with the most of it
    /// to inflate) with one range request from the first's start to the
    /// last's end, checks and inflates each and hands it to `deliver` at
    /// once, in order: a reader waiting for the first span of a coalesced
    /// request does not wait for the others to inflate. The bytes between
    /// them are skipped. A span that fails its digest is fetched once more,
    /// with the spans after it: a flipped bit in flight should not fail a
    /// read, a bad registry must.
    fn fetch_spans(
        &self,
        layer: &LayerRef,
        spans: &[(usize, u64)],
        why: Why,
        replay: bool,
        deliver: &mut dyn FnMut(Arc<Vec<u8>>),
    ) -> Result<(), ReadError> {
        let l = &layer.layout;
        let (Some(&(k0, _)), Some(&(k1, _))) = (spans.first(), spans.last()) else {
            return Ok(());
        };
        self.metrics.misses.inc_by(spans.len() as u64);
        self.note_busy();
        let t0 = Instant::now();
        let mut from = 0;
        let mut last = None;
        for attempt in 0..2 {
            let (start, end) = (l.spans[spans[from].0].comp.0, l.spans[k1].comp.1);
            let fetch_err = |span: usize, e: clip_registry::Error| ReadError::Fetch {
                layer: l.short.clone(),
                span,
                from: layer.source.describe(),
                source: Arc::new(e),
            };
            // One span is read whole; a run as a stream, each span handed
            // out once its own bytes are in, not the whole response's.
            let mut body = if spans.len() - from == 1 {
                let bytes = layer
                    .source
                    .read_range(&l.desc, start, end - start)
                    .map_err(|e| fetch_err(spans[from].0, e))?;
                Body::Whole(bytes, start)
            } else {
                let r = layer
                    .source
                    .open_range(&l.desc, start, Some(end - start))
                    .map_err(|e| fetch_err(spans[from].0, e))?;
                Body::Stream(SpanStream::new(r, start))
            };
            let fetch_ms = t0.elapsed().as_millis() as u64;
            let mut failed = None;
            for (i, &(k, limit)) in spans.iter().enumerate().skip(from) {
                let s = &l.spans[k];
                let slice = body.span(s.comp).map_err(|e| fetch_err(k, clip_registry::from_io(e)))?;
                // A demand read inflates at once; a prefetch waits its turn
                // (a core is left to the container), unless a reader waits
                // for this span or one after it. A replay fetches what the
                // container is known to read: while a demand reader waits
                // on the store, the core the permit keeps for it is idle.
                let awaited = || {
                    (replay && self.waiting.load(Ordering::Relaxed) > 0)
                        || spans[i..]
                            .iter()
                            .any(|&(j, _)| self.flights.awaited(&l.units[l.spans[j].units.start].id))
                };
                let _permit = match why {
                    Why::Prefetch => self.inflating.acquire_unless(awaited),
                    Why::Demand => None,
                };
                // A damaged index is not the registry's fault: no retry.
                let window = l.window(k)?;
                match self.inflate(l, k, &window, slice, limit) {
                    Ok(v) => {
                        self.note_busy();
                        deliver(v)
                    }
                    Err(e) => {
                        failed = Some((i, e));
                        break;
                    }
                }
            }
            match failed {
                None => {
                    tracing::debug!(layer = %l.short, ?why, fetch_ms, spans = ?spans, bytes = l.spans[k1].comp.1 - l.spans[k0].comp.0, ms = t0.elapsed().as_millis() as u64, "fetched");
                    return Ok(());
                }
                Some((i, e)) => {
                    defs::VERIFY_FAILURES.with(&[("layer", &l.short)]).inc();
                    tracing::warn!(layer = %l.desc.digest, span = spans[i].0, attempt, error = %e, "span failed verification");
                    from = i;
                    last = Some((spans[i].0, e));
                }
            }
        }
        let (k, e) = last.expect("two failed attempts");
        Err(ReadError::Verify {
            layer: l.short.clone(),
            span: k,
            source: Arc::new(e),
        })
    }

    /// Checks and inflates span `k` from its compressed bytes (its first
    /// `limit` bytes at most), and caches it on disk.
    fn inflate(
        &self,
        l: &LayerLayout,
        k: usize,
        window: &[u8],
        compressed: &[u8],
        limit: u64,
    ) -> Result<Arc<Vec<u8>>, clip_gzran::Error> {
        let cpu = defs::INFLATE_SECONDS.with(&[("layer", &l.short)]);
        let out = defs::with_cpu_time(&cpu, || {
            clip_gzran::decompress_span_prefix(&l.gz(), k, window, &l.spans[k].digest, compressed, limit)
        })?;
        defs::INFLATE_BYTES
            .with(&[("layer", &l.short)])
            .inc_by(out.len() as u64);
        let whole = l.units[l.spans[k].units.start].len;
        if (out.len() as u64) < whole {
            self.metrics.prefix_saved.inc_by(whole - out.len() as u64);
        }
        let out = Arc::new(out);
        if let Some(d) = &self.disk {
            d.put(l.units[l.spans[k].units.start].id, out.clone());
        }
        Ok(out)
    }

    /// Waits for unit `u` from the stream that covers it (its long span's,
    /// or the whole layer's), starting that stream if none runs.
    fn wait_for_stream(&self, layer: &LayerRef, u: usize) -> Result<Arc<Vec<u8>>, ReadError> {
        let l = &layer.layout;
        let unit = &l.units[u];
        let fill = self.start_fill(layer, unit.span);
        let mut st = lock(&fill.st);
        st.wanted.insert(u);
        if let Some((_, v)) = st.recent.iter().find(|(i, _)| *i == u) {
            return Ok(v.clone());
        }
        loop {
            if let Some(v) = st.produced.remove(&u) {
                return Ok(v);
            }
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.finished {
                // Produced before this reader asked, and already gone from
                // the recent list: the caches have it.
                drop(st);
                if let Some(v) = self.mem.get(&unit.id).filter(|v| v.len() as u64 == unit.len) {
                    return Ok(v);
                }
                return Err(ReadError::Abandoned {
                    layer: l.short.clone(),
                    span: unit.span,
                    why: "the stream ended without it",
                });
            }
            let since = st.progress.map_or(Duration::ZERO, |t| t.elapsed());
            if since >= self.opts.wait {
                return Err(ReadError::Stalled {
                    layer: l.short.clone(),
                    span: unit.span,
                    waited: self.opts.wait,
                });
            }
            st = fill
                .cv
                .wait_timeout(st, self.opts.wait - since)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The running stream for span `k`'s scope, started if needed.
    fn start_fill(&self, layer: &LayerRef, k: usize) -> Arc<Fill> {
        let l = &layer.layout;
        let whole = l.range_ignored.load(Ordering::Relaxed);
        let key = (l.key, if whole { None } else { Some(k) });
        let mut fills = lock(&self.fills);
        if let Some(f) = fills.get(&key) {
            return f.clone();
        }
        let fill = Arc::new(Fill {
            st: Mutex::new(FillState {
                progress: Some(Instant::now()),
                ..FillState::default()
            }),
            cv: Condvar::new(),
        });
        fills.insert(key, fill.clone());
        drop(fills);
        let (store, layer2, f2) = (self.me.clone(), layer.clone(), fill.clone());
        let spawned = std::thread::Builder::new().name("clip-stream".into()).spawn(move || {
            let Some(store) = store.upgrade() else { return };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.run_fill(&layer2, key.1, &f2)));
            let err = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(ReadError::Abandoned {
                    layer: layer2.layout.short.clone(),
                    span: key.1.unwrap_or(0),
                    why: "the stream panicked",
                }),
            };
            lock(&store.fills).remove(&key);
            let mut st = lock(&f2.st);
            st.error = err;
            st.finished = true;
            f2.cv.notify_all();
        });
        if spawned.is_err() {
            let mut st = lock(&fill.st);
            st.error = Some(ReadError::Abandoned {
                layer: l.short.clone(),
                span: k,
                why: "no thread for the stream",
            });
            st.finished = true;
            lock(&self.fills).remove(&key);
        }
        fill
    }

    /// The store is fetching: span cache writes wait.
    fn note_busy(&self) {
        if let Some(d) = &self.disk {
            d.busy();
        }
    }

    /// Hands out a unit a stream produced, and caches it.
    fn produce(&self, fill: &Fill, unit: &Unit, u: usize, data: Arc<Vec<u8>>, to_disk: bool) {
        self.metrics.misses.inc();
        self.note_busy();
        if to_disk {
            if let Some(d) = &self.disk {
                d.put(unit.id, data.clone());
            }
        }
        self.mem.put(unit.id, data.clone());
        let mut st = lock(&fill.st);
        if st.wanted.remove(&u) {
            st.produced.insert(u, data.clone());
        }
        st.recent.push_back((u, data));
        if st.recent.len() > 16 {
            st.recent.pop_front();
        }
        st.progress = Some(Instant::now());
        fill.cv.notify_all();
    }

    /// Streams span `scope` (or, for None, the whole layer from its first
    /// byte) and produces every unit in it, in order.
    fn run_fill(&self, layer: &LayerRef, scope: Option<usize>, fill: &Fill) -> Result<(), ReadError> {
        let l = &layer.layout;
        let fetch_err = |span: usize, e: clip_registry::Error| ReadError::Fetch {
            layer: l.short.clone(),
            span,
            from: layer.source.describe(),
            source: Arc::new(e),
        };
        // A stream of one span starts at its first byte; a whole layer is
        // read from the blob's start (the registry ignores Range anyway).
        let open = |scope: Option<usize>| {
            let (start, end) = match scope {
                Some(k) => (l.spans[k].comp.0, l.spans[k].comp.1),
                None => (0, l.desc.size),
            };
            layer
                .source
                .open_range(&l.desc, start, Some(end - start))
                .map(|r| (r, start))
        };
        let (mut input, scope) = match open(scope) {
            Ok((r, start)) => (SpanStream::new(r, start), scope),
            Err(e) if e.is_range_ignored() && scope.is_some() => {
                l.range_ignored.store(true, Ordering::Relaxed);
                let (r, start) = open(None).map_err(|e| fetch_err(0, e))?;
                (SpanStream::new(r, start), None)
            }
            Err(e) => return Err(fetch_err(scope.unwrap_or(0), e)),
        };
        if scope.is_none() {
            tracing::info!(layer = %l.desc.digest, from = %layer.source.describe(), "reading the layer as one stream");
        }
        let spans = match scope {
            Some(k) => k..k + 1,
            None => 0..l.spans.len(),
        };
        for k in spans {
            let s = &l.spans[k];
            let stream_err = |e: std::io::Error| {
                if e.get_ref().is_some_and(|i| i.is::<clip_registry::Error>()) {
                    fetch_err(k, clip_registry::from_io(e))
                } else {
                    verify_err(l, k, clip_gzran::Error::Io(e))
                }
            };
            if s.streamed {
                input.skip_to(s.comp.0).map_err(stream_err)?;
                let mut dec = clip_gzran::PieceDecoder::new((&mut input.r).take(s.comp.1 - s.comp.0), k)
                    .map_err(|e| verify_err(l, k, e))?;
                for u in s.units.clone() {
                    let unit = &l.units[u];
                    let digest = unit.piece.expect("a streamed span's units are pieces");
                    let data = dec.next_piece(unit.len, &digest).map_err(|e| match e {
                        clip_gzran::Error::Io(io) => stream_err(io),
                        other => verify_err(l, k, other),
                    })?;
                    self.produce(fill, unit, u, Arc::new(data), true);
                }
                // What the decoder left of the span (a frame checksum).
                std::io::copy(&mut dec.into_inner(), &mut std::io::sink()).map_err(stream_err)?;
                input.passed(s.comp.1);
                continue;
            }
            let buf = input.span(s.comp).map_err(stream_err)?;
            let window = l.window(k)?;
            let data = self
                .inflate(l, k, &window, buf, u64::MAX)
                .map_err(|e| verify_err(l, k, e))?;
            let u = s.units.start;
            self.produce(fill, &l.units[u], u, data, false);
        }
        Ok(())
    }

    /// Queues units of a layer for prefetching, in the given order. Units
    /// already in a disk cache file are read into the page cache instead
    /// (in the same order): a fresh mount over a warm span cache, as after
    /// a restart or once an image's mount has lingered out.
    ///
    /// A unit that holds a prefix (a replay's) is left as it is: the
    /// profile saw where reads of it end, better than a guess; a read past
    /// it fetches the whole unit. Read-ahead that made such units whole
    /// fetched 28 more units in a cold torch start with a profile.
    pub fn prefetch(&self, layer: &LayerRef, units: impl IntoIterator<Item = usize>, priority: Priority) {
        self.prefetch_prefixes(layer, units.into_iter().map(|u| (u, 1, u64::MAX)), priority)
    }

    /// [`LayerStore::prefetch`], each unit as `(unit, need, upto)`: a unit
    /// that holds its first `need` bytes, or will once the fetch queued for
    /// it is done, is left alone; else its first `upto` bytes are fetched.
    /// A profile knows where the reads of a unit ended, and inflating the
    /// rest is CPU the starting container needs (`need` = `upto` = that
    /// reach); read-ahead is content with any prefix, and fetches a unit
    /// nobody has whole. A read past a prefix fetches the whole unit.
    pub fn prefetch_prefixes(&self, layer: &LayerRef, units: impl IntoIterator<Item = Want>, priority: Priority) {
        let l = &layer.layout;
        let mut warm = Vec::new();
        let items: Vec<_> = units
            .into_iter()
            .filter(|&(u, _, _)| u < l.units.len())
            .map(|(u, need, upto)| {
                let len = l.units[u].len;
                (u, need.clamp(1, len), upto.clamp(need.clamp(1, len), len))
            })
            .filter(|&(u, need, _)| {
                if !self.holds(l, u, need) {
                    return true;
                }
                let id = &l.units[u].id;
                // Only in a file (not in memory, nor only queued for writing).
                if !self.mem.contains(id, need) && self.disk.as_ref().is_some_and(|d| d.on_disk(id)) {
                    warm.push(*id);
                }
                false
            })
            .map(|(u, need, upto)| (layer.clone(), u, need, upto))
            .collect();
        if let Some(d) = &self.disk {
            d.warm(warm);
        }
        self.queue.push(items.into_iter(), priority);
    }

    /// Waits until at least the first `need` bytes of unit `u` are held
    /// (memory or disk), for as long as a fetch of it is queued or under
    /// way, `wanted()` holds, and at most until `deadline`; whether they
    /// are. Never fetches: it is for work that follows a replay and must
    /// not add to it.
    pub fn wait_held(
        &self,
        layer: &LayerLayout,
        u: usize,
        need: u64,
        deadline: Instant,
        wanted: &dyn Fn() -> bool,
    ) -> bool {
        let Some(unit) = layer.units.get(u) else { return false };
        let need = need.min(unit.len);
        loop {
            if self.holds(layer, u, need) {
                return true;
            }
            let now = Instant::now();
            // A unit a worker took off the queue is in no flight until
            // the worker leads it: any run still in hand may be bringing
            // it.
            let coming =
                self.queue.contains(layer.key, u) || self.queue.in_hand() || self.flights.holders(&unit.id) > 0;
            if now >= deadline || !coming || !wanted() {
                // It may have come in since it was last looked for.
                return self.holds(layer, u, need);
            }
            self.mem
                .wait_for(&unit.id, need, (deadline - now).min(Duration::from_millis(20)));
        }
    }

    /// Appends the layer's bytes `pos..pos + len` to `out` if all of them
    /// are held (memory or disk); whether they were. Never fetches.
    pub fn read_held(&self, layer: &LayerLayout, mut pos: u64, len: u64, out: &mut Vec<u8>) -> bool {
        let end = pos.saturating_add(len).min(layer.uncompressed_size);
        let before = out.len();
        while pos < end {
            let unit = &layer.units[layer.unit_at(pos)];
            let n = (unit.out + unit.len).min(end).saturating_sub(pos);
            if n == 0 || self.read_cached(unit, pos - unit.out, n, out).is_none() {
                out.truncate(before);
                return false;
            }
            pos += n;
        }
        true
    }

    /// Units waiting in the prefetch queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Fetches a missed unit and the units read ahead after it with one
    /// request, on a thread of its own, and returns once that thread leads
    /// their flights: the reader then joins its unit's, which is first in
    /// the response, and does not wait for the rest. Two requests per miss
    /// cost the registry more (about 3 ms of CPU each here over a kept-alive
    /// connection, whatever their size): a py cold start without a profile made 43 range GETs instead
    /// of 66 and took 0.956 s instead of 1.004 (medians of 12 interleaved;
    /// torch 2.90 against 2.95 s, medians of 8). False when it did not: a
    /// layer read as a stream, too many runs under way, no thread, or a
    /// profile being replayed. A replay fetches what the container is known
    /// to read, and read-ahead that jumps it took the inflate permit from
    /// it (torch cold with a profile 2.01 → 2.11 s, medians of 6).
    fn miss_run(&self, layer: &LayerRef, u: usize, ahead: &[usize]) -> bool {
        let l = &layer.layout;
        if l.spans[l.units[u].span].streamed || l.range_ignored.load(Ordering::Relaxed) || self.replaying() {
            return false;
        }
        let Some(me) = self.me.upgrade() else { return false };
        if self
            .miss_runs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_MISS_RUNS).then_some(n + 1)
            })
            .is_err()
        {
            return false;
        }
        let (led, leading) = std::sync::mpsc::sync_channel::<()>(1);
        let reader = MissReader {
            unit: l.units[u].id,
            led,
        };
        let layer = layer.clone();
        // The missed unit whole; the guesses after it content with any
        // prefix (see `prefetch`).
        let run: Vec<Want> = std::iter::once((u, l.units[u].len, u64::MAX))
            .chain(ahead.iter().map(|&a| (a, 1, u64::MAX)))
            .collect();
        let spawned = std::thread::Builder::new().name("clip-miss".into()).spawn(move || {
            let _run = Counted(&me.miss_runs);
            me.run_units(&layer, &run, Priority::Readahead, Some(reader));
        });
        match spawned {
            // `recv` fails only when the thread ended before leading (a
            // panic): the reader then leads its unit itself.
            Ok(_) => {
                let _ = leading.recv();
                true
            }
            Err(_) => {
                self.miss_runs.fetch_sub(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// One prefetch job, from a worker: a run of units taken from the
    /// queue together ([`prefetch::Queue::pop_run`]), in one request.
    fn prefetch_run(&self, layer: &LayerRef, run: &[Want], priority: Priority) {
        self.metrics.prefetches.inc();
        let _replay = (priority == Priority::Replay).then(|| Counted::enter(&self.replay_runs));
        self.run_units(layer, run, priority, None);
    }

    /// Whether a profile's replay is queued or under way.
    fn replaying(&self) -> bool {
        self.replay_runs.load(Ordering::Relaxed) > 0 || self.queue.replay_queued()
    }

    /// Fetches the units of `run` (`(unit, need, upto)`, as for
    /// [`LayerStore::prefetch_prefixes`]) nobody has or fetches, in one
    /// request. A span a reader waits for inflates at once; the others by
    /// `priority`.
    fn run_units(&self, layer: &LayerRef, run: &[Want], priority: Priority, miss: Option<MissReader>) {
        let l = &layer.layout;
        let abandoned = |span| {
            (
                ReadError::Abandoned {
                    layer: l.short.clone(),
                    span,
                    why: "the prefetch stopped",
                },
                Why::Prefetch,
            )
        };
        let mut spans = Vec::with_capacity(run.len());
        let mut leaders = std::collections::VecDeque::with_capacity(run.len());
        for &(u, need, upto) in run {
            let unit = &l.units[u];
            if self.holds(l, u, need) {
                continue;
            }
            if l.spans[unit.span].streamed || l.range_ignored.load(Ordering::Relaxed) {
                // Started, not waited for: the stream caches what it passes.
                self.start_fill(layer, unit.span);
                continue;
            }
            // In flight already (a reader fetches it): skipped here.
            if let Some(lead) = self.flights.try_lead(unit.id, abandoned(unit.span)) {
                spans.push((unit.span, upto));
                leaders.push_back(lead);
            }
        }
        let missed = miss.map(|m| {
            let _ = m.led.send(());
            m.unit
        });
        if spans.is_empty() {
            return;
        }
        // Each span's waiters are answered as soon as it is inflated.
        let r = self.fetch_spans(
            layer,
            &spans,
            Why::Prefetch,
            priority == Priority::Replay,
            &mut |data| {
                if let Some(lead) = leaders.pop_front() {
                    self.mem.put(*lead.key(), data.clone());
                    lead.complete(Ok(data));
                }
            },
        );
        match r {
            Ok(()) => {}
            Err(ReadError::Fetch { source, .. }) if source.is_range_ignored() => {
                l.range_ignored.store(true, Ordering::Relaxed);
                drop(leaders);
                self.start_fill(layer, spans[0].0);
            }
            Err(e) => {
                tracing::debug!(layer = %l.desc.digest, spans = ?spans, error = %e, "prefetch failed");
                for lead in leaders {
                    // The missed unit's failure is its reader's: remembered,
                    // and not fetched again by the reader at once.
                    let why = if missed == Some(*lead.key()) {
                        lock(&self.failed).insert(*lead.key(), (Instant::now(), e.clone()));
                        Why::Demand
                    } else {
                        Why::Prefetch
                    };
                    lead.complete(Err((e.clone(), why)));
                }
            }
        }
    }
}

/// A response's body, span by span.
enum Body {
    /// All of it, from compressed byte `.1`.
    Whole(Vec<u8>, u64),
    Stream(SpanStream),
}

impl Body {
    /// The compressed bytes `[a, b)` of the next span, at or after the
    /// previous one's.
    fn span(&mut self, (a, b): (u64, u64)) -> std::io::Result<&[u8]> {
        match self {
            Body::Whole(bytes, start) => {
                let (a, b) = ((a - *start) as usize, (b - *start) as usize);
                bytes
                    .get(a..b)
                    .ok_or_else(|| std::io::Error::other("a span outside the response (internal error)"))
            }
            Body::Stream(st) => st.span((a, b)),
        }
    }
}

/// A stream of a layer's compressed bytes, read span by span in order.
struct SpanStream {
    r: Box<dyn Read + Send>,
    /// The next byte `r` gives.
    pos: u64,
    /// The last byte read: neighbouring gzip spans share the byte that
    /// holds their boundary.
    last: Option<u8>,
    buf: Vec<u8>,
}

impl SpanStream {
    fn new(r: Box<dyn Read + Send>, pos: u64) -> Self {
        Self {
            r,
            pos,
            last: None,
            buf: Vec::new(),
        }
    }

    /// Reads and drops what lies before byte `a`.
    fn skip_to(&mut self, a: u64) -> std::io::Result<()> {
        if a > self.pos {
            std::io::copy(&mut (&mut self.r).take(a - self.pos), &mut std::io::sink())?;
            self.pos = a;
        }
        Ok(())
    }

    /// The compressed bytes `[a, b)` of the next span, at or after the
    /// previous one's (what lies between is read and dropped).
    fn span(&mut self, (a, b): (u64, u64)) -> std::io::Result<&[u8]> {
        self.skip_to(a)?;
        self.buf.clear();
        if a < self.pos {
            self.buf.extend(self.last.take());
        }
        let at = self.buf.len();
        self.buf.resize((b - a) as usize, 0);
        self.r.read_exact(&mut self.buf[at..])?;
        self.pos = b;
        self.last = self.buf.last().copied();
        Ok(&self.buf)
    }

    /// A span read by someone else through `r` ends at byte `b` (zstd
    /// spans start and end on byte boundaries: nothing shared).
    fn passed(&mut self, b: u64) {
        self.pos = b;
        self.last = None;
    }
}

/// A counting semaphore.
struct Gate {
    free: Mutex<usize>,
    cv: Condvar,
}

struct Permit<'a>(&'a Gate);

impl Gate {
    fn new(permits: usize) -> Self {
        Self {
            free: Mutex::new(permits.max(1)),
            cv: Condvar::new(),
        }
    }

    /// A permit, or None at once when `skip` says so (checked while
    /// waiting, every millisecond).
    fn acquire_unless(&self, skip: impl Fn() -> bool) -> Option<Permit<'_>> {
        let mut free = lock(&self.free);
        while *free == 0 {
            if skip() {
                return None;
            }
            free = self
                .cv
                .wait_timeout(free, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= 1;
        Some(Permit(self))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.cv.notify_one();
    }
}

fn verify_err(l: &LayerLayout, k: usize, e: clip_gzran::Error) -> ReadError {
    ReadError::Verify {
        layer: l.short.clone(),
        span: k,
        source: Arc::new(e),
    }
}

/// A size: bytes, or with K, M, G or T (binary, as `10G`,
/// `10GiB`, `500M`).
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = v[digits.len()..].to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sizes {
    #[test]
    fn sizes_with_units() {
        use super::parse_size;
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("10GiB"), Some(10 << 30));
        assert_eq!(parse_size("500M"), Some(500 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("1234"), Some(1234));
        for bad in ["x", "", "10Q", "G", "-1G", "1.5G"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
