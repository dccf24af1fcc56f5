//! The store against a fake image source that counts, blocks, errors and
//! panics on command, over real compressed layers.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clip_format::{Checkpoint, Compression, Data, Image, Index, IndexFile, Kind, Layer, Node, WindowWriter, ROOT_INO};
use clip_registry::{Descriptor, HttpError, ImageSource, Platform, ResolvedImage};

use super::*;

fn sample(len: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 6] = [b"layer ", b"span ", b"store ", b"\n", b"flight ", b"cache "];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(7) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(words[(x % 6) as usize]);
        }
    }
    out.truncate(len);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("gzip")
        .args(["-c", "-n", "-6"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip is installed");
    let mut stdin = child.stdin.take().unwrap();
    let d = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&d));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    w.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

/// An index of one layer (no files: the store reads layer bytes).
fn index_of(compressed: &[u8], c: Compression, spacing: u64) -> (Arc<IndexFile>, Vec<u8>) {
    let gc = match c {
        Compression::Gzip => clip_gzran::Compression::Gzip,
        Compression::Zstd => clip_gzran::Compression::Zstd,
        Compression::None => clip_gzran::Compression::None,
    };
    let mut r = clip_gzran::IndexingReader::new(compressed, gc, spacing).unwrap();
    let mut data = Vec::new();
    r.read_to_end(&mut data).unwrap();
    let map = r.finish().unwrap();
    let mut windows = WindowWriter::default();
    let checkpoints = map
        .checkpoints
        .iter()
        .map(|cp| {
            let (window_offset, window_len) = windows.add(&cp.window).unwrap();
            Checkpoint {
                in_bits: cp.point.in_bits,
                out: cp.point.out,
                window_offset,
                window_len,
                window_digest: [0; 32],
            }
        })
        .collect();
    let layer = Layer {
        digest: clip_registry::sha256_digest(compressed),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        compression: c,
        compressed_size: map.compressed_size,
        uncompressed_size: map.uncompressed_size,
        checkpoints,
        span_digests: map.span_digests.clone(),
        pieces: map
            .pieces
            .iter()
            .map(|p| clip_format::Piece {
                span: p.span as u32,
                out: p.out,
                digest: p.digest,
            })
            .collect(),
    };
    let root = Node {
        kind: Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        nlink: 2,
        rdev: 0,
        parent: ROOT_INO,
        target: Vec::new(),
        xattrs: Vec::new(),
        data: Data::None,
        entries: Vec::new(),
    };
    let index = Index {
        image: Image {
            reference: "fake".into(),
            manifest_digest: "sha256:aa".into(),
            manifest_media_type: String::new(),
            platform: "linux/amd64".into(),
            config_digest: "sha256:bb".into(),
            config: b"{}".to_vec(),
        },
        spacing,
        layers: vec![layer],
        nodes: vec![root],
    };
    let bytes = IndexFile::new(index, windows).encode().unwrap();
    (Arc::new(IndexFile::decode(&bytes).unwrap()), data)
}

/// Which compressed offsets wait at the gate.
type Gate = Box<dyn Fn(u64) -> bool + Send>;

/// A source over one blob that does what it is told.
#[derive(Default)]
struct Fake {
    blob: Vec<u8>,
    reads: AtomicUsize,
    read_bytes: AtomicUsize,
    streams: AtomicUsize,
    fail: AtomicUsize,
    panic: AtomicUsize,
    ignore_range: AtomicBool,
    /// Reads of these compressed offsets wait until the gate opens.
    gated: Mutex<Option<Gate>>,
    gate: (Mutex<bool>, Condvar),
    /// Streams stop before this compressed offset until it is cleared.
    stall: Arc<(Mutex<Option<u64>>, Condvar)>,
}

/// A response body that stops at the fake's stall offset.
struct Stalling {
    body: std::io::Cursor<Vec<u8>>,
    base: u64,
    stall: Arc<(Mutex<Option<u64>>, Condvar)>,
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let at = self.base + self.body.position();
        let mut stall = self.stall.0.lock().unwrap();
        while stall.is_some_and(|s| at >= s) {
            stall = self.stall.1.wait(stall).unwrap();
        }
        let n = match *stall {
            Some(s) => buf.len().min((s - at) as usize),
            None => buf.len(),
        };
        drop(stall);
        self.body.read(&mut buf[..n])
    }
}

impl Fake {
    fn new(blob: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            blob,
            gate: (Mutex::new(true), Condvar::new()),
            ..Self::default()
        })
    }

    fn close_for(&self, which: impl Fn(u64) -> bool + Send + 'static) {
        *self.gated.lock().unwrap() = Some(Box::new(which));
        *self.gate.0.lock().unwrap() = false;
    }

    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }

    fn pass_gate(&self, offset: u64) {
        if self.gated.lock().unwrap().as_ref().is_some_and(|f| f(offset)) {
            let mut open = self.gate.0.lock().unwrap();
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
        }
    }

    fn http(&self, e: HttpError) -> clip_registry::Error {
        clip_registry::Error::Registry {
            registry: "fake".into(),
            what: "test".into(),
            source: e,
        }
    }
}

impl ImageSource for Fake {
    fn resolve(&self, _: &Platform) -> clip_registry::Result<ResolvedImage> {
        unimplemented!()
    }

    fn open_range(&self, d: &Descriptor, offset: u64, len: Option<u64>) -> clip_registry::Result<Box<dyn Read + Send>> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        if offset > 0 && self.ignore_range.load(Ordering::SeqCst) {
            return Err(self.http(HttpError::RangeIgnored { offset, len: 0 }));
        }
        let end = len.map_or(self.blob.len(), |l| (offset + l) as usize);
        // A part of the blob is a range request, told what to do as one.
        if offset > 0 || end < self.blob.len() {
            return Ok(Box::new(Stalling {
                body: std::io::Cursor::new(self.take_range(d, offset, (end as u64) - offset)?),
                base: offset,
                stall: self.stall.clone(),
            }));
        }
        Ok(Box::new(std::io::Cursor::new(self.blob[offset as usize..end].to_vec())))
    }

    fn read_range(&self, d: &Descriptor, offset: u64, len: u64) -> clip_registry::Result<Vec<u8>> {
        self.read_whole(d, offset, len)
    }

    fn describe(&self) -> String {
        "fake".into()
    }
}

impl Fake {
    /// A range request, told what to do.
    fn take_range(&self, _: &Descriptor, offset: u64, len: u64) -> clip_registry::Result<Vec<u8>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.pass_gate(offset);
        if self
            .panic
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("the fake source panics");
        }
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(self.http(HttpError::NotFound("told to fail".into())));
        }
        if offset > 0 && self.ignore_range.load(Ordering::SeqCst) {
            return Err(self.http(HttpError::RangeIgnored { offset, len }));
        }
        self.read_bytes.fetch_add(len as usize, Ordering::SeqCst);
        Ok(self.blob[offset as usize..(offset + len) as usize].to_vec())
    }

    /// A whole response: none of it until the stall, if any, is behind
    /// its end.
    fn read_whole(&self, d: &Descriptor, offset: u64, len: u64) -> clip_registry::Result<Vec<u8>> {
        let mut stall = self.stall.0.lock().unwrap();
        while stall.is_some_and(|s| offset + len > s) {
            stall = self.stall.1.wait(stall).unwrap();
        }
        drop(stall);
        self.take_range(d, offset, len)
    }
}

struct Setup {
    store: Arc<LayerStore>,
    fake: Arc<Fake>,
    layer: LayerRef,
    data: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn setup(workers: usize) -> Setup {
    setup_with(workers, 8 << 20)
}

fn setup_with(workers: usize, coalesce_bytes: u64) -> Setup {
    // No readahead on misses: these tests count the requests they cause.
    setup_ahead(workers, coalesce_bytes, 0)
}

fn setup_ahead(workers: usize, coalesce_bytes: u64, miss_readahead: usize) -> Setup {
    setup_opts(workers, |o| {
        o.coalesce_bytes = coalesce_bytes;
        o.miss_readahead = miss_readahead;
    })
}

fn setup_opts(workers: usize, tune: impl FnOnce(&mut StoreOptions)) -> Setup {
    let data = sample(3 << 20, 1);
    let gz = gzip(&data);
    let (index, decoded) = index_of(&gz, Compression::Gzip, 256 << 10);
    assert!(decoded == data);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StoreOptions {
        cache_dir: Some(dir.path().into()),
        prefetch_workers: workers,
        wait: Duration::from_secs(20),
        failure_memo: Duration::from_millis(100),
        miss_readahead: 0,
        inflaters: 1,
        ..StoreOptions::default()
    };
    tune(&mut opts);
    let store = LayerStore::new(opts).unwrap();
    let fake = Fake::new(gz);
    let layer = LayerRef {
        layout: LayerLayout::new(&index, 0).unwrap(),
        source: fake.clone(),
    };
    Setup {
        store,
        fake,
        layer,
        data,
        _dir: dir,
    }
}

impl Setup {
    fn read(&self, pos: u64, len: u64) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        self.store.read(&self.layer, pos, len, &mut out)?;
        Ok(out)
    }

    fn expect(&self, pos: u64, len: u64) {
        let got = self.read(pos, len).unwrap();
        assert!(
            got == self.data[pos as usize..(pos + len) as usize],
            "bytes at {pos}+{len}"
        );
    }

    fn unit_range(&self, u: usize) -> (u64, u64) {
        let unit = &self.layer.layout.units[u];
        (unit.out, unit.len)
    }

    fn holders(&self, u: usize) -> usize {
        self.store.flights.holders(&self.layer.layout.units[u].id)
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn concurrent_readers_of_a_unit_share_one_fetch() {
    let s = Arc::new(setup(0));
    let (out, len) = s.unit_range(3);
    s.fake.close_for(|_| true);
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || s.read(out + i * 1000, 5000).unwrap())
        })
        .collect();
    wait_until("the leader and seven waiters", || s.holders(3) == 1 + 8);
    s.fake.open();
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        let at = (out + i as u64 * 1000) as usize;
        assert!(got == s.data[at..at + 5000]);
    }
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "one range GET for all eight");
    assert!(len > 8000);
    // The cache answers from now on, in part and without the source.
    s.expect(out + 10, 100);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_leader_answers_its_waiters_and_the_next_reader_tries_again() {
    let s = Arc::new(setup(0));
    let (out, _) = s.unit_range(2);
    s.fake.panic.store(1, Ordering::SeqCst);
    s.fake.close_for(|_| true);
    let leader = {
        let s = s.clone();
        std::thread::spawn(move || s.read(out, 10))
    };
    wait_until("the leader's fetch", || s.fake.reads.load(Ordering::SeqCst) == 1);
    let waiter = {
        let s = s.clone();
        std::thread::spawn(move || s.read(out, 10))
    };
    wait_until("a waiter", || s.holders(2) == 2 + 1);
    s.fake.open();
    assert!(leader.join().is_err(), "the leader's thread panicked");
    let err = waiter.join().unwrap().unwrap_err();
    assert!(matches!(err, ReadError::Abandoned { .. }), "{err}");
    assert_eq!(s.holders(2), 0, "nothing left in flight");
    s.expect(out, 10);
}

#[test]
fn a_demand_miss_fetches_the_spans_after_it_in_its_own_request_without_waiting_for_them() {
    let s = setup_ahead(1, 8 << 20, 2);
    let l = &s.layer.layout;
    assert!(l.spans.len() > 4, "the sample has spans to read ahead");
    let unit_of = |k: usize| l.spans[k].units.start;
    // The response stops after the missed span's bytes: the reader still
    // gets its answer.
    *s.fake.stall.0.lock().unwrap() = Some(l.spans[1].comp.1);
    let (out, _) = s.unit_range(unit_of(1));
    s.expect(out, 10);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "one request");
    assert!(!s.store.cached(l, unit_of(2)), "the rest of the response is not in yet");
    *s.fake.stall.0.lock().unwrap() = None;
    s.fake.stall.1.notify_all();
    wait_until("the readahead", || {
        s.store.cached(l, unit_of(2)) && s.store.cached(l, unit_of(3))
    });
    assert!(!s.store.cached(l, unit_of(0)), "nothing before the miss");
    assert!(!s.store.cached(l, unit_of(4)), "no further than asked");
    // The spans read ahead came with the miss: no request of their own.
    let (out3, _) = s.unit_range(unit_of(3));
    s.expect(out3, 10);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1);
    assert_eq!(s.store.queued(), 0, "nothing was queued");
}

#[test]
fn past_the_bound_of_miss_runs_a_miss_queues_its_readahead() {
    let s = setup_ahead(1, 8 << 20, 2);
    let l = &s.layer.layout;
    let unit_of = |k: usize| l.spans[k].units.start;
    s.store.miss_runs.store(MAX_MISS_RUNS, Ordering::SeqCst);
    let (out, _) = s.unit_range(unit_of(1));
    s.expect(out, 10);
    wait_until("the queued readahead", || {
        s.store.queued() == 0 && s.store.cached(l, unit_of(2)) && s.store.cached(l, unit_of(3))
    });
    assert_eq!(
        s.fake.reads.load(Ordering::SeqCst),
        2,
        "the miss, then the queued readahead"
    );
    assert_eq!(
        s.store.miss_runs.load(Ordering::SeqCst),
        MAX_MISS_RUNS,
        "the bound is left as it was"
    );
}

#[test]
fn a_miss_just_below_the_last_one_reads_ahead_backwards() {
    // No workers: what is queued stays queued, and can be counted.
    let s = setup_ahead(0, 8 << 20, 2);
    let l = &s.layer.layout;
    assert!(l.spans.len() > 8, "the sample has spans on both sides");
    let unit_of = |k: usize| l.spans[k].units.start;
    let (out, _) = s.unit_range(unit_of(6));
    s.expect(out, 10);
    wait_until("the forward readahead", || {
        s.store.cached(l, unit_of(7)) && s.store.cached(l, unit_of(8))
    });
    assert_eq!(s.store.queued(), 0, "forward, in the miss's own request");
    // The next miss is below: spans 4 and 3 are queued, not 6 and 7.
    let (out, _) = s.unit_range(unit_of(5));
    s.expect(out, 10);
    assert_eq!(s.store.queued(), 2, "the two spans below the miss");
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 2, "the two misses alone");
    // Far from the last miss, a miss reads forward again.
    let (out, _) = s.unit_range(unit_of(0));
    s.expect(out, 10);
    wait_until("the forward readahead", || {
        s.store.cached(l, unit_of(1)) && s.store.cached(l, unit_of(2))
    });
    assert_eq!(s.store.queued(), 2, "nothing more queued");
}

#[test]
fn while_a_replay_is_queued_a_miss_queues_its_readahead_behind_it() {
    // No workers: what is queued stays queued.
    let s = setup_ahead(0, 8 << 20, 2);
    let l = &s.layer.layout;
    let unit_of = |k: usize| l.spans[k].units.start;
    s.store.prefetch(&s.layer, [unit_of(6)], Priority::Replay);
    let (out, _) = s.unit_range(unit_of(1));
    s.expect(out, 10);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "the miss alone");
    assert_eq!(s.store.queued(), 3, "the replay, then the miss's readahead");
    assert!(!s.store.cached(l, unit_of(2)));
}

#[test]
fn a_failed_miss_run_is_the_readers_failure_and_is_not_fetched_twice() {
    let s = setup_ahead(1, 8 << 20, 2);
    let l = &s.layer.layout;
    let (out, _) = s.unit_range(l.spans[1].units.start);
    s.fake.fail.store(100, Ordering::SeqCst);
    assert!(matches!(s.read(out, 10), Err(ReadError::Fetch { .. })));
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "the reader did not fetch again");
    // Remembered, as a demand read's own failure is.
    assert!(s.read(out, 10).is_err());
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "answered from memory");
}

#[test]
fn only_demand_reads_remember_failures() {
    let s = setup(1);
    let (out, _) = s.unit_range(4);
    // A prefetch that fails leaves no trace for the read behind it.
    s.fake.fail.store(1, Ordering::SeqCst);
    s.store.prefetch(&s.layer, [4], Priority::Readahead);
    wait_until("the failed prefetch", || {
        s.fake.reads.load(Ordering::SeqCst) == 1 && s.store.queued() == 0 && s.holders(4) == 0
    });
    s.expect(out, 100);
    // A demand read that fails is remembered briefly: the kernel's
    // readahead and the read behind it get the answer at once.
    let (out5, _) = s.unit_range(5);
    s.fake.fail.store(1, Ordering::SeqCst);
    assert!(matches!(s.read(out5, 10), Err(ReadError::Fetch { .. })));
    let reads = s.fake.reads.load(Ordering::SeqCst);
    assert!(s.read(out5, 10).is_err());
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), reads, "answered from memory");
    std::thread::sleep(Duration::from_millis(150));
    s.expect(out5, 10);
}

#[test]
fn a_demand_read_retries_when_the_prefetch_it_joined_fails() {
    let s = Arc::new(setup(1));
    let (out, _) = s.unit_range(6);
    s.fake.fail.store(1, Ordering::SeqCst);
    s.fake.close_for(|_| true);
    s.store.prefetch(&s.layer, [6], Priority::Readahead);
    wait_until("the prefetch's fetch", || s.fake.reads.load(Ordering::SeqCst) == 1);
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || s.read(out, 64))
    };
    wait_until("the demand read joins", || s.holders(6) == 2 + 1);
    s.fake.open();
    let got = reader.join().unwrap().unwrap();
    assert!(got == s.data[out as usize..out as usize + 64]);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 2);
}

#[test]
fn a_demand_read_overtakes_a_long_replay_queue() {
    // No coalescing: the worker takes one unit at a time.
    let s = Arc::new(setup_with(1, 1));
    let n = s.layer.layout.units.len();
    let (last_out, _) = s.unit_range(n - 1);
    let last_start = s.layer.layout.spans[n - 1].comp.0;
    // Everything but the last unit's bytes waits at the gate.
    s.fake.close_for(move |off| off != last_start);
    s.store.prefetch(&s.layer, 0..n - 1, Priority::Replay);
    wait_until("the worker's first request", || {
        s.fake.reads.load(Ordering::SeqCst) >= 1
    });
    s.expect(last_out, 1000);
    assert!(s.store.queued() > 0, "the replay is still queued behind the worker");
    s.fake.open();
    wait_until("the replay", || {
        s.store.queued() == 0 && (0..n).all(|u| s.store.cached(&s.layer.layout, u))
    });
    for u in 0..n {
        let (o, l) = s.unit_range(u);
        s.expect(o, l);
    }
}

#[test]
fn queued_neighbours_are_fetched_in_one_request() {
    let s = setup(1);
    s.fake.close_for(|_| true);
    s.store.prefetch(&s.layer, [2, 3, 4, 5], Priority::Replay);
    s.fake.open();
    wait_until("the prefetch", || (2..6).all(|u| s.store.cached(&s.layer.layout, u)));
    let spans = &s.layer.layout.spans;
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1);
    assert_eq!(
        s.fake.read_bytes.load(Ordering::SeqCst) as u64,
        spans[5].comp.1 - spans[2].comp.0
    );
    for u in 2..6 {
        let (o, l) = s.unit_range(u);
        s.expect(o, l);
    }
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_run_is_taken_whole_backwards_and_across_small_gaps() {
    for (gap, requests) in [(1 << 20, 1), (0, 2)] {
        let s = setup_opts(4, |o| o.coalesce_gap = gap);
        // Queued in the order a profile might have them: 5, 4, then 2;
        // span 3 nobody asked for.
        s.store.prefetch(&s.layer, [5, 4, 2], Priority::Replay);
        wait_until("the prefetch", || {
            [2, 4, 5].iter().all(|&u| s.store.cached(&s.layer.layout, u))
        });
        let spans = &s.layer.layout.spans;
        assert_eq!(s.fake.reads.load(Ordering::SeqCst), requests, "gap {gap}");
        if requests == 1 {
            // The gap is fetched, but neither inflated nor cached.
            assert_eq!(
                s.fake.read_bytes.load(Ordering::SeqCst) as u64,
                spans[5].comp.1 - spans[2].comp.0
            );
        }
        assert!(!s.store.cached(&s.layer.layout, 3));
        for u in [2, 4, 5] {
            let (o, l) = s.unit_range(u);
            s.expect(o, l);
        }
        assert_eq!(s.fake.reads.load(Ordering::SeqCst), requests);
    }
}

#[test]
fn a_run_hands_out_each_span_once_its_own_bytes_are_in() {
    let s = setup(1);
    let spans = &s.layer.layout.spans;
    // The response stops in the middle of span 4.
    *s.fake.stall.0.lock().unwrap() = Some((spans[4].comp.0 + spans[4].comp.1) / 2);
    s.store.prefetch(&s.layer, [2, 3, 4, 5], Priority::Replay);
    wait_until("spans 2 and 3", || {
        (2..4).all(|u| s.store.mem.contains(&s.layer.layout.units[u].id, 1))
    });
    assert!(!s.store.cached(&s.layer.layout, 4), "its bytes are not all in");
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1);
    *s.fake.stall.0.lock().unwrap() = None;
    s.fake.stall.1.notify_all();
    wait_until("the rest", || (4..6).all(|u| s.store.cached(&s.layer.layout, u)));
    for u in 2..6 {
        let (o, l) = s.unit_range(u);
        s.expect(o, l);
    }
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_coalesced_prefetch_hands_out_each_span_and_refetches_from_a_bad_one() {
    let s = setup(1);
    let (index, _) = index_of(&s.fake.blob, Compression::Gzip, 256 << 10);
    // Span 4 never verifies: 2 and 3 are handed out before it, and the
    // second attempt asks for 4 and 5 only.
    let bad = clone_with(&index, |l| l.span_digests[4][0] ^= 1);
    let layer = LayerRef {
        layout: LayerLayout::new(&Arc::new(bad), 0).unwrap(),
        source: s.fake.clone(),
    };
    s.fake.close_for(|_| true);
    s.store.prefetch(&layer, [2, 3, 4, 5], Priority::Replay);
    s.fake.open();
    wait_until("both attempts", || {
        s.fake.reads.load(Ordering::SeqCst) == 2 && s.store.queued() == 0
    });
    let spans = &layer.layout.spans;
    wait_until("the failed flights", || {
        (4..6).all(|u| s.store.flights.holders(&layer.layout.units[u].id) == 0)
    });
    assert_eq!(
        s.fake.read_bytes.load(Ordering::SeqCst) as u64,
        (spans[5].comp.1 - spans[2].comp.0) + (spans[5].comp.1 - spans[4].comp.0)
    );
    for u in [2, 3] {
        assert!(
            s.store.mem.contains(&layer.layout.units[u].id, 1),
            "span {u} handed out"
        );
    }
    for u in [4, 5] {
        assert!(!s.store.mem.contains(&layer.layout.units[u].id, 1), "span {u}");
    }
    let mut out = Vec::new();
    let (o, _) = s.unit_range(2);
    s.store.read(&layer, o, 100, &mut out).unwrap();
    assert!(out == s.data[o as usize..o as usize + 100]);
}

#[test]
fn a_span_a_reader_waits_for_is_inflated_without_waiting_for_a_permit() {
    let s = setup(1);
    // Every inflating permit taken (by this test): prefetches wait.
    let held = s.store.inflating.acquire_unless(|| false).unwrap();
    s.fake.close_for(|_| true);
    s.store.prefetch(&s.layer, [2], Priority::Replay);
    wait_until("the prefetch's leader", || s.holders(2) == 2);
    s.fake.open();
    wait_until("the fetch", || s.fake.reads.load(Ordering::SeqCst) == 1);
    // The reader joins the prefetch's flight and gets the span while the
    // permits are still held.
    let (o, l) = s.unit_range(2);
    s.expect(o, l);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "it joined the prefetch");
    drop(held);
}

#[test]
fn a_replay_inflates_without_a_permit_while_a_reader_waits_and_readahead_does_not() {
    let s = Arc::new(setup(1));
    let l = &s.layer.layout;
    let unit_of = |k: usize| l.spans[k].units.start;
    // Every inflating permit taken (by this test): prefetches wait.
    let held = s.store.inflating.acquire_unless(|| false).unwrap();
    // A demand reader waits on a fetch of span 5 that does not answer.
    let gated = l.spans[5].comp.0;
    s.fake.close_for(move |off| off == gated);
    let reader = {
        let s = s.clone();
        let (o, n) = s.unit_range(unit_of(5));
        std::thread::spawn(move || s.read(o, n))
    };
    wait_until("the reader's fetch", || s.fake.reads.load(Ordering::SeqCst) == 1);
    // A replay inflates meanwhile: the container waits, its core is idle.
    s.store.prefetch(&s.layer, [unit_of(2)], Priority::Replay);
    let id = |k: usize| l.units[unit_of(k)].id;
    wait_until("the replay", || s.store.mem.contains(&id(2), 1));
    // Read-ahead is a guess: it waits for the permit even so.
    s.store.prefetch(&s.layer, [unit_of(8)], Priority::Readahead);
    wait_until("the read-ahead's fetch", || s.fake.reads.load(Ordering::SeqCst) == 3);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!s.store.mem.contains(&id(8), 1), "read-ahead took no permit");
    drop(held);
    wait_until("the read-ahead, with the permit", || s.store.mem.contains(&id(8), 1));
    s.fake.open();
    let got = reader.join().unwrap().unwrap();
    let (o, n) = s.unit_range(unit_of(5));
    assert!(got == s.data[o as usize..(o + n) as usize]);
}

#[test]
fn cache_entries_serve_only_the_index_that_verified_them() {
    let s = setup(0);
    let all = s.data.len() as u64;
    s.expect(0, all);
    s.store.disk().unwrap().flush();
    let reads = s.fake.reads.load(Ordering::SeqCst);
    // An index that names the same layer digest but other windows (or
    // other span digests) gets no entry of the first.
    let gz = s.fake.blob.clone();
    let (index, _) = index_of(&gz, Compression::Gzip, 256 << 10);
    let evil = clone_with(&index, |l| {
        for d in &mut l.span_digests {
            d[0] ^= 1;
        }
    });
    let evil_layer = LayerRef {
        layout: LayerLayout::new(&Arc::new(evil), 0).unwrap(),
        source: s.fake.clone(),
    };
    assert!(evil_layer
        .layout
        .units
        .iter()
        .zip(&s.layer.layout.units)
        .all(|(a, b)| a.id != b.id));
    let mut out = Vec::new();
    let err = s.store.read(&evil_layer, 0, 100, &mut out).unwrap_err();
    assert!(matches!(err, ReadError::Verify { .. }), "{err}");
    assert!(s.fake.reads.load(Ordering::SeqCst) > reads, "it fetched for itself");
    // The first index still reads its own, verified, bytes.
    s.expect(0, all);
}

#[test]
fn a_registry_that_ignores_range_is_read_once_as_a_stream() {
    let s = setup(0);
    s.fake.ignore_range.store(true, Ordering::SeqCst);
    let n = s.layer.layout.units.len();
    let (o, l) = s.unit_range(n / 2);
    s.expect(o, l);
    assert_eq!(
        s.fake.streams.load(Ordering::SeqCst),
        1,
        "one stream of the whole layer"
    );
    s.store.disk().unwrap().flush();
    for u in 0..n {
        let (o, l) = s.unit_range(u);
        s.expect(o, l);
    }
    assert_eq!(
        s.fake.streams.load(Ordering::SeqCst),
        1,
        "every span came from that stream"
    );
    assert!(
        s.fake.reads.load(Ordering::SeqCst) <= 1,
        "at most the request that found out"
    );
}

#[test]
fn a_long_zstd_frame_is_streamed_piece_by_piece_once() {
    let data = sample(4 << 20, 9);
    let zst = zstd::bulk::compress(&data, 3).unwrap();
    let (index, _) = index_of(&zst, Compression::Zstd, 256 << 10);
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::new(StoreOptions {
        cache_dir: Some(dir.path().into()),
        prefetch_workers: 0,
        ..StoreOptions::default()
    })
    .unwrap();
    let fake = Fake::new(zst);
    let layer = LayerRef {
        layout: LayerLayout::new(&index, 0).unwrap(),
        source: fake.clone(),
    };
    assert_eq!(layer.layout.spans.len(), 1);
    assert!(layer.layout.spans[0].streamed);
    assert_eq!(layer.layout.units.len(), 16);
    let read = |pos: u64, len: u64| {
        let mut out = Vec::new();
        store.read(&layer, pos, len, &mut out).unwrap();
        assert!(out == data[pos as usize..(pos + len) as usize]);
    };
    read(3 << 20, 4096);
    read(0, 4096);
    read(1 << 20, 2 << 20);
    assert_eq!(fake.streams.load(Ordering::SeqCst), 1, "one pass over the frame");
    assert_eq!(fake.reads.load(Ordering::SeqCst), 0);
}

fn clone_with(index: &IndexFile, f: impl FnOnce(&mut Layer)) -> IndexFile {
    let mut copy = IndexFile::decode(&index.encode().unwrap()).unwrap();
    f(&mut copy.index.layers[0]);
    copy
}

/// The cache files under `dir` and whether each is wholly in the page cache.
fn residency(dir: &std::path::Path) -> Vec<(std::path::PathBuf, bool)> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir.join("spans-v2")).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let file = std::fs::File::open(f.path()).unwrap();
            let len = file.metadata().unwrap().len() as usize;
            let pages = len.div_ceil(4096);
            let mut vec = vec![0u8; pages];
            // SAFETY: a read-only shared mapping of an open file, unmapped
            // before the file is closed; mincore writes one byte per page
            // into a buffer of that many bytes.
            let ok = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                let rc = libc::mincore(p, len, vec.as_mut_ptr());
                libc::munmap(p, len);
                rc == 0
            };
            assert!(ok, "mincore");
            out.push((f.path(), vec.iter().all(|b| b & 1 == 1)));
        }
    }
    out
}

#[test]
fn a_replay_of_units_on_disk_reads_their_files_into_the_page_cache_without_fetching() {
    use std::os::fd::AsRawFd;
    let s = setup(1);
    let all = s.data.len() as u64;
    s.expect(0, all);
    s.store.disk().unwrap().flush();
    let fetched = s.fake.reads.load(Ordering::SeqCst);
    // The pages go (the files are synced, so clean): a cache that
    // outlived its mount, or its host's page cache.
    let dir = s._dir.path();
    let files = residency(dir);
    assert_eq!(files.len(), s.layer.layout.units.len());
    for (p, _) in &files {
        let f = std::fs::File::open(p).unwrap();
        // SAFETY: a valid descriptor; the call only advises the kernel.
        assert_eq!(
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
            0
        );
    }
    assert!(
        residency(dir).iter().all(|(_, r)| !r),
        "the page cache kept the files: this test needs its temporary directory on a disk filesystem"
    );
    // A fresh store (nothing in memory) over the same cache replays every
    // unit: none is queued or fetched, and every file is read in.
    let fresh = LayerStore::new(StoreOptions {
        cache_dir: Some(dir.into()),
        prefetch_workers: 1,
        ..StoreOptions::default()
    })
    .unwrap();
    let units = s.layer.layout.units.len();
    fresh.prefetch(&s.layer, 0..units, Priority::Replay);
    assert_eq!(fresh.queued(), 0);
    wait_until("the cache files to be read in", || {
        residency(dir).iter().all(|(_, r)| *r)
    });
    let mut out = Vec::new();
    fresh.read(&s.layer, 0, all, &mut out).unwrap();
    assert!(out == s.data);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), fetched, "nothing fetched");
}

#[test]
fn a_replay_inflates_only_its_prefix_and_a_read_past_it_fetches_the_whole_unit() {
    let s = setup(1);
    let l = &s.layer.layout;
    let (o2, len2) = s.unit_range(2);
    let (o3, len3) = s.unit_range(3);
    let (p2, p3) = (len2 / 4, len3 / 2);
    s.store
        .prefetch_prefixes(&s.layer, [(2, p2, p2), (3, p3, p3)], Priority::Replay);
    wait_until("the replay", || {
        s.store.queued() == 0 && s.store.holds(l, 2, p2) && s.store.holds(l, 3, p3)
    });
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "both in one request");
    assert!(!s.store.cached(l, 2) && !s.store.cached(l, 3), "prefixes only");
    assert_eq!(s.store.mem.get(&l.units[2].id).unwrap().len() as u64, p2);
    // Within the prefixes: served, nothing fetched; the same on disk, for
    // a fresh store over the same cache.
    s.expect(o2, p2);
    s.expect(o3 + p3 - 10, 10);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1);
    s.store.disk().unwrap().flush();
    let fresh = LayerStore::new(s.store.options().clone()).unwrap();
    let mut out = Vec::new();
    fresh.read(&s.layer, o3, p3, &mut out).unwrap();
    assert!(out == s.data[o3 as usize..(o3 + p3) as usize]);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 1, "the prefix was on disk");
    // A replay asking again for no more than is held fetches nothing.
    s.store.prefetch_prefixes(&s.layer, [(2, p2, p2)], Priority::Replay);
    assert_eq!(s.store.queued(), 0);
    // Nor does read-ahead that needs no more than the prefix.
    s.store
        .prefetch_prefixes(&s.layer, [(2, p2, u64::MAX)], Priority::Readahead);
    assert_eq!(s.store.queued(), 0);
    // Past a prefix: the whole unit is fetched, and replaces the prefix.
    s.expect(o2 + p2 - 5, 10);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 2);
    assert!(s.store.cached(l, 2));
    s.expect(o2, len2);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 2);
    s.store.disk().unwrap().flush();
    let fresh = LayerStore::new(s.store.options().clone()).unwrap();
    assert!(fresh.cached(l, 2), "the whole unit replaced the prefix on disk");
    // The same from a fresh store that holds only the prefix on disk.
    let mut out = Vec::new();
    fresh.read(&s.layer, o3, len3, &mut out).unwrap();
    assert!(out == s.data[o3 as usize..(o3 + len3) as usize]);
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 3);
}

#[test]
fn a_demand_read_that_joins_a_replay_of_a_shorter_prefix_gets_its_bytes() {
    let s = Arc::new(setup(1));
    let (o2, len2) = s.unit_range(2);
    let start2 = s.layer.layout.spans[2].comp.0;
    s.fake.close_for(move |off| off == start2);
    s.store.prefetch_prefixes(&s.layer, [(2, 100, 100)], Priority::Replay);
    wait_until("the replay's request", || s.holders(2) >= 2);
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || s.read(o2 + len2 - 100, 100))
    };
    wait_until("the reader to join", || s.holders(2) >= 3);
    s.fake.open();
    let got = reader.join().unwrap().unwrap();
    assert!(got == s.data[(o2 + len2 - 100) as usize..(o2 + len2) as usize]);
    assert_eq!(
        s.fake.reads.load(Ordering::SeqCst),
        2,
        "the prefix, then the whole unit"
    );
}

#[test]
fn read_ahead_behind_a_queued_replay_raises_its_prefix_only_to_what_it_needs() {
    let s = setup(1);
    let l = &s.layer.layout;
    let (_, len2) = s.unit_range(2);
    s.fake.close_for(|_| true);
    // The worker takes unit 0 and waits at the gate; unit 2, queued
    // after, waits in the queue.
    s.store.prefetch_prefixes(&s.layer, [(0, 10, 10)], Priority::Replay);
    wait_until("the worker's request", || s.holders(0) >= 2);
    s.store.prefetch_prefixes(&s.layer, [(2, 100, 100)], Priority::Replay);
    s.store
        .prefetch_prefixes(&s.layer, [(2, 300, u64::MAX)], Priority::Readahead);
    s.fake.open();
    wait_until("the queue", || s.store.queued() == 0 && s.store.holds(l, 2, 300));
    assert!(!s.store.cached(l, 2), "raised to 300 bytes, not made whole");
    assert_eq!(s.store.mem.get(&l.units[2].id).unwrap().len(), 300);
    assert!(len2 > 300);
}

#[test]
fn waiting_for_a_held_unit_follows_its_fetch_and_never_fetches() {
    let s = setup(1);
    let l = &s.layer.layout;
    let far = Instant::now() + Duration::from_secs(30);
    // Nobody fetches unit 2: no wait, no request.
    let t = Instant::now();
    assert!(!s.store.wait_held(l, 2, 1, far, &|| true));
    assert!(t.elapsed() < Duration::from_secs(5), "waited for a unit nobody fetches");
    assert_eq!(s.fake.reads.load(Ordering::SeqCst), 0, "a wait never fetches");
    let mut out = Vec::new();
    assert!(!s.store.read_held(l, l.units[2].out, 10, &mut out) && out.is_empty());
    // Queued behind a stalled fetch: the wait lasts until its bytes are in.
    *s.fake.stall.0.lock().unwrap() = Some(0);
    s.store.prefetch(&s.layer, [2], Priority::Replay);
    let waiter = {
        let (store, layer) = (s.store.clone(), s.layer.clone());
        std::thread::spawn(move || store.wait_held(&layer.layout, 2, layer.layout.units[2].len, far, &|| true))
    };
    wait_until("the fetch to start", || s.holders(2) > 0);
    assert!(!waiter.is_finished(), "gave up on a unit being fetched");
    *s.fake.stall.0.lock().unwrap() = None;
    s.fake.stall.1.notify_all();
    assert!(waiter.join().unwrap());
    let (pos, len) = s.unit_range(2);
    assert!(s.store.read_held(l, pos, len, &mut out));
    assert_eq!(out, s.data[pos as usize..(pos + len) as usize]);
    // A deadline ends a wait for a unit that does not come in time.
    *s.fake.stall.0.lock().unwrap() = Some(0);
    s.store.prefetch(&s.layer, [4], Priority::Replay);
    assert!(!s
        .store
        .wait_held(l, 4, 1, Instant::now() + Duration::from_millis(200), &|| true));
    // So does the waiter's losing interest (its mount ended), long before
    // the deadline, with the fetch still stalled.
    let wanted = Arc::new(AtomicBool::new(true));
    let waiter = {
        let (store, layer, wanted) = (s.store.clone(), s.layer.clone(), wanted.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let held = store.wait_held(&layer.layout, 4, 1, far, &|| wanted.load(Ordering::SeqCst));
            (held, t.elapsed())
        })
    };
    wait_until("the fetch of unit 4", || s.holders(4) > 0);
    assert!(!waiter.is_finished(), "gave up on a unit being fetched");
    wanted.store(false, Ordering::SeqCst);
    let (held, waited) = waiter.join().unwrap();
    assert!(!held);
    assert!(
        waited < Duration::from_secs(5),
        "waited {waited:?} after it was no longer wanted"
    );
    *s.fake.stall.0.lock().unwrap() = None;
    s.fake.stall.1.notify_all();
}
