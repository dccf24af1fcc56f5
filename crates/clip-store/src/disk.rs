//! The disk tier: one file per unit, named by the unit's identity (which
//! binds the layer digest, the unit's place and the digest it was verified
//! against; see `LayerLayout`), holding its decompressed bytes.
//!
//! A unit is verified once, before it is written; the file's header repeats
//! the identity and length, so a hit is checked by reading 48 bytes and
//! then reads only the bytes asked for (`pread`), with no hashing. A file
//! may hold only a unit's first bytes (a replay inflates no further than
//! its profile saw reads go); the whole unit replaces it when fetched. Files are
//! written by a background thread to a temporary name, synced, and renamed
//! into place, so a torn write is never seen. The size is bounded; least
//! recently used files go first. Everything is root-only (0700/0600): the
//! bytes of private images live here.
//!
//! Writes wait for a quiet store ([`DiskCache::set_quiet`]), and while
//! the owner holds them ([`DiskCache::hold_until`]; clipd does while a
//! container starts): during a start, every fetch is on its critical path,
//! and writing (and syncing) the spans it fetched takes CPU and disk from
//! it. Units waiting to be written are served from memory, bounded by
//! [`pending_max`].

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clip_metrics::defs;

use crate::flight::lock;
use crate::UnitId;

const MAGIC: &[u8; 8] = b"CLIPSPN2";
const HEADER: usize = 8 + 32 + 8;
const SUBDIR: &str = "spans-v2";
/// A unit warmed this recently is not warmed again.
const WARM_AGAIN_AFTER: Duration = Duration::from_secs(30);
/// Bytes queued for writing at most, more is dropped (a cache, never a
/// requirement): a sixteenth of the host's memory, from 256 MiB to 1 GiB.
/// Writes stop waiting for quiet past three quarters of it. A cold torch
/// start inflates about 600 MB: with writes pressing at 256 MiB, the
/// writer took 220 ms of CPU (and the disk) during the start; with 1 GiB
/// (pressing at 768 MiB) it took none. torch with a profile: 2.29 s
/// against 2.20 s, without one 3.21 against 3.15 (medians of 20 and 10
/// interleaved runs). The py image (190 MB) reaches neither bound.
fn pending_max() -> u64 {
    // SAFETY: sysinfo is plain data, valid zeroed, and the call only
    // writes the struct it is given.
    let (ok, si) = unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        (libc::sysinfo(&mut si) == 0, si)
    };
    // c_ulong: 32 bits on some targets.
    #[allow(clippy::unnecessary_cast)]
    let total = if ok {
        (si.totalram as u64).saturating_mul(u64::from(si.mem_unit.max(1)))
    } else {
        0
    };
    (total / 16).clamp(256 << 20, 1 << 30)
}

struct State {
    entries: HashMap<UnitId, (u64, u64)>,
    order: BTreeMap<u64, UnitId>,
    tick: u64,
    total: u64,
}

struct Shared {
    root: PathBuf,
    max: u64,
    state: Mutex<State>,
    /// Units queued for writing, served from here until written.
    pending: Mutex<HashMap<UnitId, Arc<Vec<u8>>>>,
    pending_bytes: AtomicU64,
    /// See [`pending_max`].
    pending_max: u64,
    /// Milliseconds since `epoch` of the store's last fetch.
    busy_at: AtomicU64,
    epoch: Instant,
    quiet_ms: AtomicU64,
    /// Milliseconds since `epoch` until which writes wait whatever the
    /// fetches (0: no hold). See [`DiskCache::hold_until`].
    held_until: AtomicU64,
    /// Flushes waiting: writes go at once.
    flushing: AtomicUsize,
}

enum Job {
    /// Writes what `pending` holds for the unit then (a longer prefix, or
    /// the whole unit, may have replaced what was queued).
    Write(UnitId),
    Flush(SyncSender<()>),
}

pub struct DiskCache {
    shared: Arc<Shared>,
    writer: Mutex<Sender<Job>>,
    warmer: Mutex<Sender<Vec<UnitId>>>,
}

/// Creates `dir` (and its parents) for root only.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

impl Shared {
    fn path(&self, id: &UnitId) -> PathBuf {
        let hex = hex::encode(id);
        self.root.join(&hex[..2]).join(hex)
    }

    fn touch(&self, id: &UnitId) {
        let mut g = lock(&self.state);
        let st = &mut *g;
        if let Some((_, t)) = st.entries.get_mut(id) {
            st.order.remove(t);
            st.tick += 1;
            *t = st.tick;
            st.order.insert(st.tick, *id);
        }
    }

    /// Indexes a file of `size` bytes, replacing the entry of a shorter
    /// one (a prefix the whole unit replaced).
    fn insert(&self, id: UnitId, size: u64) {
        let mut g = lock(&self.state);
        let st = &mut *g;
        if let Some((old, t)) = st.entries.remove(&id) {
            st.order.remove(&t);
            st.total -= old;
        }
        st.tick += 1;
        st.entries.insert(id, (size, st.tick));
        st.order.insert(st.tick, id);
        st.total += size;
    }

    /// The bytes of unit `id` its file holds, if indexed.
    fn stored(&self, id: &UnitId) -> Option<u64> {
        lock(&self.state).entries.get(id).map(|(size, _)| size - HEADER as u64)
    }

    fn forget(&self, id: &UnitId) {
        let mut g = lock(&self.state);
        if let Some((size, t)) = g.entries.remove(id) {
            g.order.remove(&t);
            g.total -= size;
        }
    }

    fn write(&self, id: &UnitId, data: &[u8]) -> std::io::Result<()> {
        let path = self.path(id);
        if self.stored(id).is_some_and(|n| n >= data.len() as u64) && path.exists() {
            return Ok(());
        }
        let dir = path.parent().expect("has a parent");
        private_dir(dir)?;
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            let mut header = [0u8; HEADER];
            header[..8].copy_from_slice(MAGIC);
            header[8..40].copy_from_slice(id);
            header[40..].copy_from_slice(&(data.len() as u64).to_le_bytes());
            f.write_all(&header)?;
            f.write_all(data)?;
            // On disk before its name is: a crash leaves no half file.
            f.sync_data()?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        defs::CACHE_WRITTEN_BYTES.get().inc_by(data.len() as u64);
        self.insert(*id, (HEADER + data.len()) as u64);
        self.evict();
        Ok(())
    }

    /// Removes least recently used files until the cache is at 90% of its
    /// bound.
    fn evict(&self) {
        if lock(&self.state).total <= self.max {
            return;
        }
        let target = self.max / 10 * 9;
        let (mut files, mut bytes) = (0u64, 0u64);
        loop {
            let victim = {
                let mut g = lock(&self.state);
                if g.total <= target {
                    break;
                }
                let Some((_, id)) = g.order.pop_first() else { break };
                let (size, _) = g.entries.remove(&id).expect("indexed");
                g.total -= size;
                bytes += size;
                files += 1;
                id
            };
            let _ = fs::remove_file(self.path(&victim));
        }
        if files > 0 {
            defs::CACHE_EVICTIONS.get().inc_by(files);
            tracing::info!(files, bytes, left = lock(&self.state).total, "evicted cached spans");
        }
    }

    /// Waits until the store has fetched nothing for the quiet period and
    /// no hold is on, a flush is asked for, or too much is queued.
    fn wait_quiet(&self) {
        loop {
            let now = self.epoch.elapsed().as_millis() as u64;
            let quiet = self.quiet_ms.load(Ordering::Relaxed);
            let left = quiet.saturating_sub(now.saturating_sub(self.busy_at.load(Ordering::Relaxed)));
            let held = self.held_until.load(Ordering::Relaxed).saturating_sub(now);
            if left.max(held) == 0
                || self.flushing.load(Ordering::SeqCst) > 0
                || self.pending_bytes.load(Ordering::Relaxed) > self.pending_max / 4 * 3
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(left.max(held).min(50)));
        }
    }

    /// The warming thread: asks the kernel to read each file ahead
    /// (`POSIX_FADV_WILLNEED` starts the reads and returns), so the disk
    /// works on many files at once ahead of the container. It runs at the
    /// start's own priority: the container is about to read these bytes.
    fn warm_loop(&self, rx: Receiver<Vec<UnitId>>) {
        use std::os::fd::AsRawFd;
        // A sequential reader asks for the same units again and again;
        // a file warmed a moment ago is still in the page cache.
        let mut recent: HashMap<UnitId, Instant> = HashMap::new();
        for ids in rx {
            if recent.len() > 4096 {
                recent.retain(|_, t| t.elapsed() < WARM_AGAIN_AFTER);
                // Still full: forgetting costs at most a repeated advice.
                if recent.len() > 4096 {
                    recent.clear();
                }
            }
            for id in ids {
                if recent.get(&id).is_some_and(|t| t.elapsed() < WARM_AGAIN_AFTER)
                    || !lock(&self.state).entries.contains_key(&id)
                {
                    continue;
                }
                recent.insert(id, Instant::now());
                let Ok(f) = File::open(self.path(&id)) else { continue };
                // SAFETY: a valid open descriptor; the call only advises
                // the kernel about it.
                let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
                if rc == 0 {
                    defs::CACHE_WARMED.get().inc();
                }
            }
        }
    }

    fn run(&self, rx: Receiver<Job>) {
        // Writes are for later starts; the one under way comes first.
        crate::prio::background(19, true);
        for job in rx {
            match job {
                Job::Write(id) => {
                    self.wait_quiet();
                    let Some(data) = lock(&self.pending).get(&id).cloned() else {
                        continue;
                    };
                    if let Err(e) = self.write(&id, &data) {
                        tracing::warn!(error = %e, "cannot write to the span cache");
                    }
                    // Replaced meanwhile: the later job writes that one.
                    let mut pending = lock(&self.pending);
                    if pending.get(&id).is_some_and(|v| Arc::ptr_eq(v, &data)) {
                        pending.remove(&id);
                        self.pending_bytes.fetch_sub(data.len() as u64, Ordering::Relaxed);
                    }
                }
                Job::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

impl DiskCache {
    /// Opens (creating) the cache under `dir`, bounded to `max` bytes.
    pub fn open(dir: &Path, max: u64) -> std::io::Result<Self> {
        let root = dir.join(SUBDIR);
        private_dir(dir)?;
        private_dir(&root)?;
        let mut found = Vec::new();
        for sub in fs::read_dir(&root)?.flatten() {
            for f in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
                let name = f.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".tmp-") {
                    let _ = fs::remove_file(f.path());
                    continue;
                }
                let Some(id) = hex::decode(name.as_bytes()).ok().and_then(|v| UnitId::try_from(v).ok()) else {
                    continue;
                };
                if let Ok(m) = f.metadata() {
                    found.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), id, m.len()));
                }
            }
        }
        found.sort();
        let shared = Arc::new(Shared {
            root,
            max,
            state: Mutex::new(State {
                entries: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                total: 0,
            }),
            pending: Mutex::new(HashMap::new()),
            pending_bytes: AtomicU64::new(0),
            pending_max: pending_max(),
            busy_at: AtomicU64::new(0),
            epoch: Instant::now(),
            quiet_ms: AtomicU64::new(0),
            held_until: AtomicU64::new(0),
            flushing: AtomicUsize::new(0),
        });
        for (_, id, size) in found {
            shared.insert(id, size);
        }
        shared.evict();
        let (tx, rx) = channel();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("clip-cache-writer".into())
            .spawn(move || s.run(rx))?;
        let (warm_tx, warm_rx) = channel();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("clip-cache-warm".into())
            .spawn(move || s.warm_loop(warm_rx))?;
        Ok(Self {
            shared,
            writer: Mutex::new(tx),
            warmer: Mutex::new(warm_tx),
        })
    }

    /// Appends bytes `off..off + len` of unit `id` (of `unit_len` bytes)
    /// to `out`, if the cache holds them intact. Reads only what is asked.
    pub fn read(&self, id: &UnitId, unit_len: u64, off: u64, len: u64, out: &mut Vec<u8>) -> bool {
        let Some(end) = off.checked_add(len).filter(|&e| e <= unit_len) else {
            return false;
        };
        if let Some(v) = lock(&self.shared.pending).get(id) {
            if end <= v.len() as u64 && v.len() as u64 <= unit_len {
                out.extend_from_slice(&v[off as usize..end as usize]);
                return true;
            }
        }
        let path = self.shared.path(id);
        let Ok(f) = File::open(&path) else {
            return false;
        };
        let mut header = [0u8; HEADER];
        let read = f.read_exact_at(&mut header, 0).is_ok();
        let held = u64::from_le_bytes(header[40..].try_into().expect("8 bytes"));
        let ok = read
            && &header[..8] == MAGIC
            && &header[8..40] == id
            && held > 0
            && held <= unit_len
            && f.metadata().is_ok_and(|m| m.len() == HEADER as u64 + held);
        if !ok {
            tracing::warn!(path = %path.display(), "discarding a damaged or foreign cache file");
            let _ = fs::remove_file(&path);
            self.shared.forget(id);
            return false;
        }
        // A prefix too short for this read is no damage.
        if end > held {
            return false;
        }
        let start = out.len();
        out.resize(start + len as usize, 0);
        if f.read_exact_at(&mut out[start..], HEADER as u64 + off).is_err() {
            out.truncate(start);
            return false;
        }
        self.shared.touch(id);
        true
    }

    /// Whether the cache holds at least the first `need` bytes of unit
    /// `id` (queued for writing counts).
    pub fn contains(&self, id: &UnitId, need: u64) -> bool {
        self.held(id).is_some_and(|n| n >= need)
    }

    /// How many of unit `id`'s first bytes the cache holds (queued for
    /// writing counts).
    pub fn held(&self, id: &UnitId) -> Option<u64> {
        let queued = lock(&self.shared.pending).get(id).map(|v| v.len() as u64);
        queued.max(self.shared.stored(id))
    }

    /// Whether unit `id` is in a file (not only queued for writing).
    pub fn on_disk(&self, id: &UnitId) -> bool {
        lock(&self.shared.state).entries.contains_key(id)
    }

    /// Reads these units' files into the page cache, in this order, on a
    /// thread of its own; returns at once. A fresh mount over a warm span
    /// cache otherwise reads each file from disk when the container first
    /// reads it, one read at a time.
    pub fn warm(&self, ids: Vec<UnitId>) {
        if !ids.is_empty() {
            let _ = lock(&self.warmer).send(ids);
        }
    }

    /// Queues a verified unit (or its first bytes) for writing; dropped
    /// when too much is queued (the cache is an optimisation, never a
    /// requirement), or when as much of it is already held.
    pub fn put(&self, id: UnitId, data: Arc<Vec<u8>>) {
        let len = data.len() as u64;
        if self.shared.stored(&id).is_some_and(|n| n >= len) {
            return;
        }
        {
            let mut pending = lock(&self.shared.pending);
            let queued = pending.get(&id).map_or(0, |v| v.len() as u64);
            if queued >= len
                || self.shared.pending_bytes.load(Ordering::Relaxed) + len - queued > self.shared.pending_max
            {
                return;
            }
            pending.insert(id, data);
            self.shared.pending_bytes.fetch_add(len - queued, Ordering::Relaxed);
        }
        if lock(&self.writer).send(Job::Write(id)).is_err() {
            let mut pending = lock(&self.shared.pending);
            if let Some(v) = pending.remove(&id) {
                self.shared.pending_bytes.fetch_sub(v.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Writes wait until the store has fetched nothing for `quiet` (zero:
    /// at once). See [`DiskCache::busy`].
    pub fn set_quiet(&self, quiet: Duration) {
        self.shared.quiet_ms.store(quiet.as_millis() as u64, Ordering::Relaxed);
    }

    /// The store is fetching: writes wait.
    pub fn busy(&self) {
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        self.shared.busy_at.store(now, Ordering::Relaxed);
    }

    /// Writes wait until `until` (None: no hold), however quiet the
    /// store: its owner knows of work that the fetches do not show, such
    /// as a container starting from the page cache.
    pub fn hold_until(&self, until: Option<Instant>) {
        let ms = until.map_or(0, |t| {
            t.saturating_duration_since(self.shared.epoch).as_millis().max(1) as u64
        });
        self.shared.held_until.store(ms, Ordering::Relaxed);
    }

    /// Waits until everything queued so far is written (at once, not
    /// waiting for quiet).
    pub fn flush(&self) {
        let (tx, rx) = sync_channel(1);
        self.shared.flushing.fetch_add(1, Ordering::SeqCst);
        if lock(&self.writer).send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
        self.shared.flushing.fetch_sub(1, Ordering::SeqCst);
    }

    /// Bytes queued for writing.
    pub fn pending(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }

    /// Bytes in the cache.
    pub fn size(&self) -> u64 {
        lock(&self.shared.state).total
    }

    /// Removes every cached unit.
    pub fn clear(&self) -> std::io::Result<u64> {
        self.flush();
        let ids: Vec<UnitId> = lock(&self.shared.state).entries.keys().copied().collect();
        let mut freed = 0;
        for id in ids {
            let size = lock(&self.shared.state).entries.get(&id).map_or(0, |e| e.0);
            if fs::remove_file(self.shared.path(&id)).is_ok() {
                freed += size;
            }
            self.shared.forget(&id);
        }
        Ok(freed)
    }
}

/// Bytes in the span cache under `cache_dir`, for tools that do not keep
/// one open.
pub fn usage(cache_dir: &Path) -> u64 {
    let mut total = 0;
    for sub in fs::read_dir(cache_dir.join(SUBDIR)).into_iter().flatten().flatten() {
        for f in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            total += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn verified_once_read_in_part_damage_never_served_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        let id = [1u8; 32];
        let mut out = Vec::new();
        assert!(!c.read(&id, 5, 0, 5, &mut out));
        c.put(id, Arc::new(b"hello".to_vec()));
        c.flush();
        assert!(c.read(&id, 5, 1, 3, &mut out));
        assert_eq!(out, b"ell");
        // Root only.
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&c.shared.path(&id)), 0o600);
        // Asked for as another unit, or with another length: not served.
        let other = [2u8; 32];
        fs::create_dir_all(c.shared.path(&other).parent().unwrap()).unwrap();
        fs::copy(c.shared.path(&id), c.shared.path(&other)).unwrap();
        assert!(!c.read(&other, 5, 0, 5, &mut Vec::new()), "header names another unit");
        assert!(!c.shared.path(&other).exists());
        assert!(!c.read(&id, 4, 0, 4, &mut Vec::new()), "longer than its unit");
        assert!(!c.shared.path(&id).exists());
        // A truncated file is discarded.
        c.put(id, Arc::new(b"hello".to_vec()));
        c.flush();
        let p = c.shared.path(&id);
        let raw = fs::read(&p).unwrap();
        fs::write(&p, &raw[..raw.len() - 1]).unwrap();
        assert!(!c.read(&id, 5, 0, 5, &mut Vec::new()));
        // The bound: least recently used first.
        for i in 10..20u8 {
            c.put([i; 32], Arc::new(vec![i; 2000]));
            c.flush();
        }
        assert!(c.size() <= 10_000, "{}", c.size());
        assert!(c.read(&[19; 32], 2000, 0, 1, &mut Vec::new()));
        assert!(!c.read(&[10; 32], 2000, 0, 1, &mut Vec::new()));
        // Reopened, it finds its files.
        drop(c);
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        assert!(c.contains(&[19; 32], 2000));
        assert_eq!(usage(dir.path()), c.size());
    }

    #[test]
    fn writes_wait_for_a_quiet_store_and_are_served_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        c.set_quiet(Duration::from_secs(3600));
        c.busy();
        let id = [7u8; 32];
        c.put(id, Arc::new(b"waiting".to_vec()));
        // Not on disk while the store is busy, but served and counted.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!c.shared.path(&id).exists());
        assert!(c.contains(&id, 7));
        assert_eq!(c.pending(), 7);
        let mut out = Vec::new();
        assert!(c.read(&id, 7, 3, 4, &mut out));
        assert_eq!(out, b"ting");
        assert!(!c.read(&id, 6, 0, 6, &mut Vec::new()), "longer than its unit");
        // A flush does not wait for quiet.
        c.flush();
        assert!(c.shared.path(&id).exists());
        assert_eq!(c.pending(), 0);
        // Quiet again: the next write goes without a flush.
        c.set_quiet(Duration::from_millis(20));
        let id2 = [8u8; 32];
        c.put(id2, Arc::new(b"later".to_vec()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.shared.path(&id2).exists() {
            assert!(Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A hold keeps writes waiting however quiet the store, until it
        // is lifted.
        c.hold_until(Some(Instant::now() + Duration::from_secs(3600)));
        let id3 = [10u8; 32];
        c.put(id3, Arc::new(b"held".to_vec()));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!c.shared.path(&id3).exists(), "written while held");
        assert!(c.read(&id3, 4, 0, 4, &mut Vec::new()));
        c.hold_until(None);
        while !c.shared.path(&id3).exists() {
            assert!(Instant::now() < deadline, "never written once the hold was lifted");
            std::thread::sleep(Duration::from_millis(10));
        }
        // More than the bound is dropped, not queued.
        c.set_quiet(Duration::from_secs(3600));
        c.busy();
        let max = c.shared.pending_max;
        assert!((256 << 20..=1 << 30).contains(&max), "{max}");
        c.put([9u8; 32], Arc::new(vec![0; max as usize + 1]));
        assert!(!c.contains(&[9u8; 32], 1));
    }

    #[test]
    fn a_prefix_serves_what_it_holds_until_the_whole_unit_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let id = [3u8; 32];
        let whole: Vec<u8> = (0..100u8).collect();
        // Queued, then written: the first 40 bytes of a 100-byte unit.
        c.set_quiet(Duration::from_secs(3600));
        c.busy();
        c.put(id, Arc::new(whole[..40].to_vec()));
        assert!(c.contains(&id, 40) && !c.contains(&id, 41));
        c.put(id, Arc::new(whole[..20].to_vec()));
        assert_eq!(c.held(&id), Some(40), "a shorter prefix replaces nothing");
        for _ in 0..2 {
            let mut out = Vec::new();
            assert!(c.read(&id, 100, 10, 30, &mut out));
            assert_eq!(out, &whole[10..40]);
            assert!(!c.read(&id, 100, 10, 31, &mut Vec::new()), "past the prefix");
            c.flush();
        }
        assert!(c.shared.path(&id).exists(), "a short prefix is not damage");
        // A longer prefix queued behind a shorter one is what gets written.
        c.put(id, Arc::new(whole[..60].to_vec()));
        c.put(id, Arc::new(whole[..80].to_vec()));
        assert_eq!(c.pending(), 80);
        c.flush();
        assert_eq!((c.held(&id), c.pending()), (Some(80), 0));
        // The whole unit replaces the prefix, in the file and in the bound.
        c.put(id, Arc::new(whole.clone()));
        c.flush();
        let mut out = Vec::new();
        assert!(c.read(&id, 100, 0, 100, &mut out));
        assert_eq!(out, whole);
        assert_eq!(c.size(), (HEADER + 100) as u64);
        drop(c);
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(c.held(&id), Some(100));
    }
}
