//! An image as its files: an index's tree over the host's layer store.
//! Each mount has one; every mount of the host shares the store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clip_format::{Data, IndexFile, Node};
use clip_registry::ImageSource;
use clip_store::{LayerLayout, LayerRef, LayerStore, Priority, ReadError};

pub struct ImageView {
    index: Arc<IndexFile>,
    store: Arc<LayerStore>,
    layers: Vec<LayerRef>,
    /// Units fetched ahead of a sequential reader.
    readahead_units: usize,
    recorder: Recorder,
    /// Whether a file has been read yet, for [`ImageView::first_read`].
    read_yet: AtomicBool,
    first_read: Arc<FirstRead>,
}

/// A view's first read, told to those who wait for it without holding the
/// view: a view that goes unread (its mount ended) wakes them too.
#[derive(Default)]
pub struct FirstRead {
    state: Mutex<Option<FirstReadIs>>,
    cv: Condvar,
}

/// How a wait for a view's first read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstReadIs {
    /// A file was read.
    Read,
    /// The view went, unread.
    Gone,
    /// Neither within the wait.
    Late,
}

impl FirstRead {
    fn set(&self, to: FirstReadIs) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(to);
            self.cv.notify_all();
        }
    }

    /// Waits until a file of the view is first read, the view goes, or
    /// `timeout`. In a container's rootfs the first read is its process's
    /// exec: the runtime's setup before it reads nothing.
    pub fn wait(&self, timeout: Duration) -> FirstReadIs {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.unwrap_or(FirstReadIs::Late)
    }
}

impl Drop for ImageView {
    fn drop(&mut self) {
        self.first_read.set(FirstReadIs::Gone);
    }
}

/// A unit of the image: (layer index, unit index in its layout).
pub type UnitRef = (u32, u32);

/// A unit reads touched, and how far into it they went: the bytes from
/// its start to the end of the furthest read (`u64::MAX`: all of it).
pub type Reach = (UnitRef, u64);

/// Bytes of a layer a read asked for: (layer index, first byte of the
/// layer's uncompressed stream, length). Independent of the index's
/// checkpoints and inode numbers: any index of the image maps it to its
/// files.
pub type LayerRead = (u32, u64, u64);

/// Slack added to a recorded reach when it is replayed: the kernel's
/// read-ahead in a later start may go a little further than in the one
/// recorded, and a read past a prefix fetches its unit again, whole.
const REACH_SLACK: u64 = 128 << 10;

/// Records which units demand reads touch, in first-access order, and how
/// far into each, while a recording window is open (for prefetch
/// profiles).
struct Recorder {
    started: Instant,
    /// Nanoseconds after `started` when the window closes; 0 when closed.
    until: AtomicU64,
    /// Each unit's place in the order, and the order.
    seen: Mutex<(HashMap<UnitRef, usize>, Vec<Reach>)>,
    /// The names the kernel looked up, found or not, as (directory inode,
    /// name), in first-lookup order.
    lookups: Mutex<(HashSet<LookedUp>, Vec<LookedUp>)>,
    /// The layer bytes reads asked for, in first-access order (a read
    /// that continues the last one extends it), and the starts seen.
    reads: Mutex<(HashSet<ReadStart>, Vec<LayerRead>)>,
}

/// Where a recorded read starts: (layer index, byte of its stream).
type ReadStart = (u32, u64);

/// A name looked up in a directory: (the directory's inode, the name).
type LookedUp = (u64, Vec<u8>);

/// Adds the layer's bytes `pos..end` (`end > pos`) to `order`: the units
/// they fall in, in first-access order (`places`: each unit's place in
/// it), each with the furthest byte read into it; at most `max` units.
fn add_reaches(
    places: &mut HashMap<UnitRef, usize>,
    order: &mut Vec<Reach>,
    (layer, l): (u32, &LayerLayout),
    pos: u64,
    end: u64,
    max: usize,
) {
    for u in l.unit_at(pos)..=l.unit_at(end - 1) {
        let unit = &l.units[u];
        let reach = end.min(unit.out + unit.len).saturating_sub(unit.out);
        let key = (layer, u as u32);
        match places.get(&key) {
            Some(&i) => order[i].1 = order[i].1.max(reach),
            None if order.len() < max => {
                places.insert(key, order.len());
                order.push((key, reach));
            }
            None => {}
        }
    }
}

/// A recorder's list, taken, with what it had seen forgotten.
fn drain<S: Default, T>(m: &Mutex<(S, Vec<T>)>) -> Vec<T> {
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    g.0 = S::default();
    std::mem::take(&mut g.1)
}

/// The most units one recording keeps.
const MAX_RECORDED: usize = 1 << 16;
/// The most lookups one recording keeps.
pub const MAX_RECORDED_LOOKUPS: usize = 1 << 15;
/// The most reads one recording keeps.
pub const MAX_RECORDED_READS: usize = 1 << 16;

/// What a recording window saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recording {
    /// Units, in first-access order, each with its reach.
    pub units: Vec<Reach>,
    /// Paths from the image's root (`usr/lib/x`) whose last name the
    /// kernel looked up, in first-lookup order, each with whether the image
    /// has it. Names that are not UTF-8 are left out.
    pub lookups: Vec<(String, bool)>,
    /// The layer bytes reads asked for, in first-access order.
    pub reads: Vec<LayerRead>,
}

impl Recorder {
    fn active(&self) -> bool {
        let until = self.until.load(Ordering::Relaxed);
        until != 0 && (self.started.elapsed().as_nanos() as u64) < until
    }

    /// Notes a read of the layer's bytes `pos..end`.
    fn note(&self, layer: u32, l: &LayerLayout, pos: u64, end: u64) {
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (places, order) = &mut *g;
        add_reaches(places, order, (layer, l), pos, end, MAX_RECORDED);
        drop(g);
        let mut g = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        let (starts, order) = &mut *g;
        if let Some((_, _, n)) = order.last_mut().filter(|(l, p, n)| *l == layer && p + n == pos) {
            *n += end - pos;
        } else if order.len() < MAX_RECORDED_READS && starts.insert((layer, pos)) {
            order.push((layer, pos, end - pos));
        }
    }

    fn note_lookup(&self, dir: u64, name: &[u8]) {
        let mut g = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        let (seen, order) = &mut *g;
        if order.len() < MAX_RECORDED_LOOKUPS && seen.insert((dir, name.to_vec())) {
            order.push((dir, name.to_vec()));
        }
    }
}

impl ImageView {
    /// `source` is where the image's blobs are (the registry and
    /// repository, or the layout, the index names).
    pub fn new(
        index: Arc<IndexFile>,
        store: Arc<LayerStore>,
        source: Arc<dyn ImageSource>,
    ) -> Result<Arc<Self>, ReadError> {
        let layers = LayerLayout::all(&index)?
            .into_iter()
            .map(|layout| LayerRef {
                layout,
                source: source.clone(),
            })
            .collect();
        Ok(Arc::new(Self {
            index,
            store,
            layers,
            readahead_units: 2,
            recorder: Recorder {
                started: Instant::now(),
                until: AtomicU64::new(0),
                seen: Mutex::new((HashMap::new(), Vec::new())),
                lookups: Mutex::new((HashSet::new(), Vec::new())),
                reads: Mutex::new((HashSet::new(), Vec::new())),
            },
            read_yet: AtomicBool::new(false),
            first_read: Arc::default(),
        }))
    }

    /// Opens (or extends) a recording window of `d` from now.
    pub fn record_for(&self, d: Duration) {
        let until = (self.recorder.started.elapsed() + d).as_nanos().min(u64::MAX as u128) as u64;
        self.recorder.until.fetch_max(until.max(1), Ordering::Relaxed);
    }

    /// Closes the recording window and returns what it saw (and forgets
    /// it).
    pub fn take_recording(&self) -> Recording {
        self.recorder.until.store(0, Ordering::Relaxed);
        let (units, reads, looked_up) = (
            drain(&self.recorder.seen),
            drain(&self.recorder.reads),
            drain(&self.recorder.lookups),
        );
        let index = &self.index.index;
        let mut dirs: HashMap<u64, Option<String>> = HashMap::new();
        let lookups = looked_up
            .into_iter()
            .filter_map(|(at, name)| {
                let dir = dirs
                    .entry(at)
                    .or_insert_with(|| String::from_utf8(index.dir_path(at)?).ok())
                    .as_deref()?;
                let found = index.lookup(at, &name).is_some();
                let name = std::str::from_utf8(&name).ok()?;
                let path = if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                };
                Some((path, found))
            })
            .collect();
        Recording { units, lookups, reads }
    }

    /// Notes that the kernel looked `name` up in directory `dir`, while a
    /// recording window is open.
    pub fn note_lookup(&self, dir: u64, name: &[u8]) {
        if self.recorder.active() {
            self.recorder.note_lookup(dir, name);
        }
    }

    /// The signal of this view's first read (see [`FirstRead::wait`]).
    pub fn first_read(&self) -> Arc<FirstRead> {
        self.first_read.clone()
    }

    /// Queues units for prefetching, in the given order (a profile's
    /// replay), each as far as reads went into it (and a little more);
    /// units the index does not have are skipped.
    pub fn replay(&self, units: &[Reach]) -> usize {
        let mut n = 0;
        for &((layer, u), reach) in units {
            if let Some(l) = self.layers.get(layer as usize) {
                if (u as usize) < l.layout.units.len() {
                    let want = reach.saturating_add(REACH_SLACK);
                    self.store
                        .prefetch_prefixes(l, [(u as usize, want, want)], Priority::Replay);
                    n += 1;
                }
            }
        }
        n
    }

    /// Queues the units that hold `reads` (layer bytes, in the order they
    /// are expected), each as far as the reads go into it: a guessed
    /// start, replayed like a profile.
    pub fn replay_reads(&self, reads: &[LayerRead]) -> usize {
        let (mut places, mut order) = (HashMap::new(), Vec::new());
        for &(layer, pos, len) in reads {
            let Some(l) = self.layers.get(layer as usize).map(|l| &l.layout) else {
                continue;
            };
            let end = pos.saturating_add(len).min(l.uncompressed_size);
            if end > pos {
                add_reaches(&mut places, &mut order, (layer, l), pos, end, usize::MAX);
            }
        }
        self.replay(&order)
    }

    /// Reads `len` bytes of layer `layer` at `pos` (recording the units).
    fn read_layer(&self, layer: u32, l: &LayerRef, pos: u64, len: u64, out: &mut Vec<u8>) -> Result<(), ReadError> {
        let end = pos.saturating_add(len).min(l.layout.uncompressed_size);
        if end > pos && self.recorder.active() {
            self.recorder.note(layer, &l.layout, pos, end);
        }
        self.store.read(l, pos, len, out)
    }

    pub fn index(&self) -> &IndexFile {
        &self.index
    }

    pub fn index_arc(&self) -> &Arc<IndexFile> {
        &self.index
    }

    pub fn store(&self) -> &Arc<LayerStore> {
        &self.store
    }

    pub fn layers(&self) -> &[LayerRef] {
        &self.layers
    }

    fn layer(&self, layer: u32) -> Result<&LayerRef, ReadError> {
        self.layers
            .get(layer as usize)
            .ok_or_else(|| ReadError::Index(format!("no layer {layer}")))
    }

    /// Reads up to `size` bytes of a regular file at `offset`;
    /// `sequential` queues the units that follow for prefetching.
    pub fn read(&self, node: &Node, offset: u64, size: u32, sequential: bool) -> Result<Vec<u8>, ReadError> {
        if offset >= node.size {
            return Ok(Vec::new());
        }
        if !self.read_yet.load(Ordering::Relaxed) && !self.read_yet.swap(true, Ordering::Relaxed) {
            self.first_read.set(FirstReadIs::Read);
        }
        let end = node.size.min(offset + u64::from(size));
        let mut out = Vec::with_capacity((end - offset) as usize);
        match &node.data {
            Data::None => out.resize((end - offset) as usize, 0),
            Data::Contiguous { layer, offset: base } => {
                let l = self.layer(*layer)?;
                self.read_layer(*layer, l, base + offset, end - offset, &mut out)?;
                if sequential && end < node.size {
                    let first = l.layout.unit_at(base + end);
                    let last = l.layout.unit_at(base + node.size - 1);
                    let upto = last.min(first + self.readahead_units);
                    self.store.prefetch(l, first..=upto, Priority::Readahead);
                }
            }
            Data::Sparse { layer, segments } => {
                let l = self.layer(*layer)?;
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
                        self.read_layer(*layer, l, s.offset + (pos - s.logical), n, &mut out)?;
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
    pub fn copy_file(&self, node: &Node, out: &mut dyn std::io::Write) -> Result<(), CopyError> {
        const CHUNK: u32 = 1 << 20;
        let mut pos = 0;
        while pos < node.size {
            let data = self.read(node, pos, CHUNK, false)?;
            out.write_all(&data).map_err(CopyError::Write)?;
            pos += data.len() as u64;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("writing the file out")]
    Write(#[source] std::io::Error),
}
