//! Reads file bytes through an index: finds the spans that hold them, and
//! gets each span from memory, from the disk cache, or by fetching its
//! compressed bytes with one range request, checking them against the
//! span's digest and inflating them from the checkpoint. Concurrent readers
//! of one span share one fetch; a sequential reader gets the next span
//! fetched ahead.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use clip_format::{Compression, Data, IndexFile, Node};
use clip_gzran::{Checkpoint, Layout};
use clip_metrics::{defs, Counter};
use clip_registry::{Descriptor, ImageSource};

use crate::cache::DiskCache;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("fetching layer {layer} span {span}: {msg}")]
    Fetch { layer: usize, span: usize, msg: String },
    #[error("layer {layer} span {span} failed verification twice: {msg}")]
    Verify { layer: usize, span: usize, msg: String },
    #[error("index: {0}")]
    Index(String),
}

/// This reader's series in the process's metrics, looked up once.
struct Metrics {
    mem_hits: Arc<Counter>,
    mem_hit_bytes: Arc<Counter>,
    disk_hits: Arc<Counter>,
    disk_hit_bytes: Arc<Counter>,
    misses: Arc<Counter>,
    prefetches: Arc<Counter>,
}

impl Metrics {
    fn new() -> Self {
        Self {
            mem_hits: defs::CACHE_HITS.with(&[("tier", "memory")]),
            mem_hit_bytes: defs::CACHE_HIT_BYTES.with(&[("tier", "memory")]),
            disk_hits: defs::CACHE_HITS.with(&[("tier", "disk")]),
            disk_hit_bytes: defs::CACHE_HIT_BYTES.with(&[("tier", "disk")]),
            misses: defs::CACHE_MISSES.get(),
            prefetches: defs::PREFETCHES.get(),
        }
    }
}

struct LayerInfo {
    points: Vec<Checkpoint>,
    desc: Descriptor,
    hex: String,
    compression: clip_gzran::Compression,
    uncompressed: u64,
    inflate_cpu: Arc<Counter>,
    inflate_bytes: Arc<Counter>,
    verify_failures: Arc<Counter>,
}

impl LayerInfo {
    fn layout(&self) -> Layout<'_> {
        Layout {
            compression: self.compression,
            checkpoints: &self.points,
            compressed_size: self.desc.size,
            uncompressed_size: self.uncompressed,
        }
    }
}

type SpanResult = Result<Arc<Vec<u8>>, ReadError>;

/// How long a failed fetch is remembered.
const FAILURE_MEMO: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Default)]
struct Flight {
    result: Mutex<Option<SpanResult>>,
    done: Condvar,
}

/// A small LRU of decompressed spans, bounded in bytes.
struct MemCache {
    map: HashMap<(usize, usize), Arc<Vec<u8>>>,
    order: VecDeque<(usize, usize)>,
    bytes: usize,
    max: usize,
}

impl MemCache {
    fn get(&mut self, key: (usize, usize)) -> Option<Arc<Vec<u8>>> {
        let v = self.map.get(&key)?.clone();
        if let Some(pos) = self.order.iter().position(|k| *k == key) {
            self.order.remove(pos);
        }
        self.order.push_back(key);
        Some(v)
    }

    fn put(&mut self, key: (usize, usize), v: Arc<Vec<u8>>) {
        if self.map.contains_key(&key) {
            return;
        }
        self.bytes += v.len();
        self.map.insert(key, v);
        self.order.push_back(key);
        while self.bytes > self.max {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(v) = self.map.remove(&old) {
                self.bytes -= v.len();
            }
        }
    }
}

pub struct ReaderOptions {
    /// Decompressed spans kept in memory.
    pub mem_bytes: usize,
    /// Spans fetched ahead of a sequential reader.
    pub readahead_spans: usize,
    pub prefetch_threads: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            mem_bytes: 256 << 20,
            readahead_spans: 2,
            prefetch_threads: 2,
        }
    }
}

pub struct SpanReader {
    index: Arc<IndexFile>,
    source: Arc<dyn ImageSource>,
    layers: Vec<LayerInfo>,
    mem: Mutex<MemCache>,
    inflight: Mutex<HashMap<(usize, usize), Arc<Flight>>>,
    /// Spans whose fetch just failed: the kernel's readahead and the read
    /// that follows it get the same answer at once instead of waiting out
    /// another deadline.
    failed: Mutex<HashMap<(usize, usize), (std::time::Instant, ReadError)>>,
    disk: Option<DiskCache>,
    prefetch: Mutex<Option<SyncSender<(usize, usize)>>>,
    readahead_spans: usize,
    metrics: Metrics,
}

impl SpanReader {
    pub fn new(
        index: Arc<IndexFile>,
        source: Arc<dyn ImageSource>,
        disk: Option<DiskCache>,
        opts: ReaderOptions,
    ) -> Arc<Self> {
        let layers = index
            .index
            .layers
            .iter()
            .map(|l| LayerInfo {
                points: l
                    .checkpoints
                    .iter()
                    .map(|c| Checkpoint {
                        in_bits: c.in_bits,
                        out: c.out,
                    })
                    .collect(),
                desc: Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.compressed_size,
                },
                hex: l.digest.trim_start_matches("sha256:").to_string(),
                compression: match l.compression {
                    Compression::Gzip => clip_gzran::Compression::Gzip,
                    Compression::Zstd => clip_gzran::Compression::Zstd,
                    Compression::None => clip_gzran::Compression::None,
                },
                uncompressed: l.uncompressed_size,
                inflate_cpu: defs::INFLATE_SECONDS.with(&[("layer", &l.digest)]),
                inflate_bytes: defs::INFLATE_BYTES.with(&[("layer", &l.digest)]),
                verify_failures: defs::VERIFY_FAILURES.with(&[("layer", &l.digest)]),
            })
            .collect();
        let reader = Arc::new(Self {
            index,
            source,
            layers,
            mem: Mutex::new(MemCache {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                max: opts.mem_bytes,
            }),
            inflight: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            disk,
            prefetch: Mutex::new(None),
            readahead_spans: opts.readahead_spans,
            metrics: Metrics::new(),
        });
        if opts.prefetch_threads > 0 && opts.readahead_spans > 0 {
            let (tx, rx) = sync_channel::<(usize, usize)>(64);
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..opts.prefetch_threads {
                let (rx, weak) = (rx.clone(), Arc::downgrade(&reader));
                std::thread::Builder::new()
                    .name("clip-prefetch".into())
                    .spawn(move || loop {
                        let Ok((layer, span)) = rx.lock().expect("not poisoned").recv() else {
                            return;
                        };
                        let Some(reader) = weak.upgrade() else { return };
                        reader.metrics.prefetches.inc();
                        let _ = reader.span(layer, span);
                    })
                    .expect("spawn prefetch thread");
            }
            *reader.prefetch.lock().expect("not poisoned") = Some(tx);
        }
        reader
    }

    pub fn index(&self) -> &IndexFile {
        &self.index
    }

    pub fn disk_cache(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }

    /// One span's decompressed bytes.
    pub fn span(&self, layer: usize, k: usize) -> SpanResult {
        let key = (layer, k);
        if let Some(v) = self.mem.lock().expect("not poisoned").get(key) {
            self.metrics.mem_hits.inc();
            self.metrics.mem_hit_bytes.inc_by(v.len() as u64);
            return Ok(v);
        }
        if let Some((when, e)) = self.failed.lock().expect("not poisoned").get(&key) {
            if when.elapsed() < FAILURE_MEMO {
                return Err(e.clone());
            }
        }
        // Single flight: the first reader of a span fetches it, the others
        // wait for its result.
        let (flight, leader) = {
            let mut inflight = self.inflight.lock().expect("not poisoned");
            match inflight.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    inflight.insert(key, f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut r = flight.result.lock().expect("not poisoned");
            while r.is_none() {
                r = flight.done.wait(r).expect("not poisoned");
            }
            return r.clone().expect("set");
        }
        let result = self.load(layer, k).map(Arc::new);
        match &result {
            Ok(v) => {
                self.mem.lock().expect("not poisoned").put(key, v.clone());
                self.failed.lock().expect("not poisoned").remove(&key);
            }
            Err(e) => {
                self.failed
                    .lock()
                    .expect("not poisoned")
                    .insert(key, (std::time::Instant::now(), e.clone()));
            }
        }
        *flight.result.lock().expect("not poisoned") = Some(result.clone());
        flight.done.notify_all();
        self.inflight.lock().expect("not poisoned").remove(&key);
        result
    }

    fn load(&self, layer: usize, k: usize) -> Result<Vec<u8>, ReadError> {
        let info = self
            .layers
            .get(layer)
            .ok_or_else(|| ReadError::Index(format!("no layer {layer}")))?;
        let layout = info.layout();
        if k >= info.points.len() {
            return Err(ReadError::Index(format!("layer {layer} has no span {k}")));
        }
        let (out_start, out_end) = layout.span_out(k);
        if let Some(disk) = &self.disk {
            if let Some(v) = disk.get(&info.hex, out_start, out_end - out_start) {
                self.metrics.disk_hits.inc();
                self.metrics.disk_hit_bytes.inc_by(v.len() as u64);
                return Ok(v);
            }
        }
        let (start, end) = clip_gzran::span_range(&info.points, k, info.desc.size)
            .ok_or_else(|| ReadError::Index(format!("layer {layer} span {k} out of range")))?;
        let window = self
            .index
            .window(layer, k)
            .map_err(|e| ReadError::Index(e.to_string()))?;
        let digest = self.index.index.layers[layer].span_digests[k];
        self.metrics.misses.inc();
        let mut last = String::new();
        // A span that fails its digest is fetched once more: a flipped bit
        // in flight should not fail a read, a bad registry must.
        for attempt in 0..2 {
            let bytes = self
                .source
                .read_range(&info.desc, start, end - start)
                .map_err(|e| ReadError::Fetch {
                    layer,
                    span: k,
                    msg: e.to_string(),
                })?;
            let inflated = defs::with_cpu_time(&info.inflate_cpu, || {
                clip_gzran::decompress_span(&layout, k, &window, &digest, &bytes)
            });
            match inflated {
                Ok(out) => {
                    info.inflate_bytes.inc_by(out.len() as u64);
                    if let Some(disk) = &self.disk {
                        disk.put(&info.hex, out_start, &out);
                    }
                    return Ok(out);
                }
                Err(e) => {
                    info.verify_failures.inc();
                    tracing::warn!(layer = %info.desc.digest, span = k, attempt, error = %e, "span failed verification");
                    last = e.to_string();
                }
            }
        }
        Err(ReadError::Verify {
            layer,
            span: k,
            msg: last,
        })
    }

    /// Reads up to `size` bytes of a regular file at `offset`.
    pub fn read(&self, node: &Node, offset: u64, size: u32, sequential: bool) -> Result<Vec<u8>, ReadError> {
        if offset >= node.size {
            return Ok(Vec::new());
        }
        let end = node.size.min(offset + u64::from(size));
        let mut out = Vec::with_capacity((end - offset) as usize);
        match &node.data {
            Data::None => out.resize((end - offset) as usize, 0),
            Data::Contiguous { layer, offset: base } => {
                self.copy_stream(*layer as usize, base + offset, end - offset, &mut out)?;
                if sequential {
                    self.read_ahead(*layer as usize, base + end, base + node.size);
                }
            }
            Data::Sparse { layer, segments } => {
                let mut pos = offset;
                for s in segments {
                    if pos >= end {
                        break;
                    }
                    let seg_end = s.logical + s.len;
                    if seg_end <= pos {
                        continue;
                    }
                    if s.logical > pos {
                        let zeros = s.logical.min(end) - pos;
                        out.resize(out.len() + zeros as usize, 0);
                        pos += zeros;
                    }
                    if pos < end && pos >= s.logical {
                        let n = seg_end.min(end) - pos;
                        self.copy_stream(*layer as usize, s.offset + (pos - s.logical), n, &mut out)?;
                        pos += n;
                    }
                }
                out.resize((end - offset) as usize, 0);
            }
        }
        Ok(out)
    }

    /// Writes a whole regular file (holes of sparse files as zeros), for
    /// tools that read outside a mount (`clipctl cat`, `inspect --hash`).
    pub fn copy_file(&self, node: &Node, out: &mut dyn std::io::Write) -> Result<(), ReadError> {
        const CHUNK: u32 = 1 << 20;
        let mut pos = 0;
        while pos < node.size {
            let data = self.read(node, pos, CHUNK, false)?;
            out.write_all(&data)
                .map_err(|e| ReadError::Index(format!("writing: {e}")))?;
            pos += data.len() as u64;
        }
        Ok(())
    }

    fn copy_stream(&self, layer: usize, mut pos: u64, len: u64, out: &mut Vec<u8>) -> Result<(), ReadError> {
        let info = self
            .layers
            .get(layer)
            .ok_or_else(|| ReadError::Index(format!("no layer {layer}")))?;
        let end = pos + len;
        while pos < end {
            let k = info.layout().span_of(pos);
            let span = self.span(layer, k)?;
            let base = info.points[k].out;
            let from = (pos - base) as usize;
            let to = ((end - base).min(span.len() as u64)) as usize;
            if from >= to {
                return Err(ReadError::Index(format!(
                    "layer {layer} span {k} is shorter than the index says"
                )));
            }
            out.extend_from_slice(&span[from..to]);
            pos += (to - from) as u64;
        }
        Ok(())
    }

    /// Queues the spans after `pos` (up to `limit`) for prefetching.
    fn read_ahead(&self, layer: usize, pos: u64, limit: u64) {
        if pos >= limit {
            return;
        }
        let Some(info) = self.layers.get(layer) else { return };
        let first = info.layout().span_of(pos);
        let last = info.layout().span_of(limit - 1);
        let guard = self.prefetch.lock().expect("not poisoned");
        let Some(tx) = guard.as_ref() else { return };
        for k in first..=last.min(first + self.readahead_spans) {
            if !self.mem.lock().expect("not poisoned").map.contains_key(&(layer, k)) {
                let _ = tx.try_send((layer, k));
            }
        }
    }
}
