//! Indexing benchmark (issue 2). Run: `cargo bench --bench index`.
//!
//! All ratios are against baselines measured in the same run:
//! * per layer and for the image: index time ÷ one `gzip -dc LAYER > /dev/null`
//!   (GNU gzip) over the same bytes, each the best of three runs, page cache
//!   warm for both;
//! * index bytes ÷ compressed image bytes, for checkpoint spacings of 1, 2,
//!   4 and 8 MiB;
//! * CPU time (this thread's, `CLOCK_THREAD_CPUTIME_ID`) of a random 4 KiB
//!   read from the nearest checkpoint: window decompression plus inflate,
//!   compressed bytes already in memory;
//! * load time of an index with 100,000 files.
//!
//! The image is the test suite's `debian` image (debootstrap minbase plus a
//! umoci layer), built with tests/fixtures/build-images.sh if missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clip_format::{Data, DirEntry, Image, Index, IndexFile, Kind, Node, WindowWriter};
use clip_registry::{ImageRef, Platform, Registries, RegistryOptions};

fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        last = Some(v);
    }
    (best, last.expect("n > 0"))
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn fixtures() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/tmp/clip-fixtures");
    if !out.join(".done").exists() {
        let ok = Command::new("bash")
            .arg(root.join("tests/fixtures/build-images.sh"))
            .arg(&out)
            .status()
            .unwrap();
        assert!(ok.success(), "building fixtures failed");
    }
    out.join("oci")
}

fn gzip_dc(path: &Path) {
    let ok = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
}

fn synthetic_index(files: usize) -> Vec<u8> {
    let node = |kind, entries| Node {
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        size: 1234,
        nlink: 1,
        rdev: 0,
        parent: 1,
        target: Vec::new(),
        xattrs: Vec::new(),
        data: Data::None,
        entries,
    };
    // 1,000 directories of 100 files, names like a real tree's.
    let dirs = files / 100;
    let mut nodes = vec![node(
        Kind::Dir,
        (0..dirs)
            .map(|d| DirEntry {
                name: format!("dir-{d:05}").into_bytes(),
                ino: d as u64 + 2,
            })
            .collect(),
    )];
    for d in 0..dirs {
        let first = 2 + dirs + d * 100;
        nodes.push(node(
            Kind::Dir,
            (0..100)
                .map(|f| DirEntry {
                    name: format!("lib-module-{f:03}.so").into_bytes(),
                    ino: (first + f) as u64,
                })
                .collect(),
        ));
    }
    for d in 0..dirs {
        for f in 0..100 {
            let mut n = node(Kind::File, Vec::new());
            n.parent = d as u64 + 2;
            n.data = Data::Contiguous {
                layer: 0,
                offset: ((d * 100 + f) * 2048) as u64,
            };
            nodes.push(n);
        }
    }
    let image = Image {
        reference: "bench".into(),
        manifest_digest: "sha256:00".into(),
        manifest_media_type: String::new(),
        platform: "linux/amd64".into(),
        config_digest: "sha256:00".into(),
        config: b"{}".to_vec(),
    };
    let layer = clip_format::Layer {
        digest: "sha256:00".into(),
        media_type: String::new(),
        compression: clip_format::Compression::None,
        compressed_size: 1 << 40,
        uncompressed_size: 1 << 40,
        checkpoints: vec![clip_format::Checkpoint {
            in_bits: 0,
            out: 0,
            window_offset: 0,
            window_len: 0,
            window_digest: [0; 32],
        }],
        span_digests: vec![[0; 32]],
        pieces: Vec::new(),
    };
    IndexFile::new(
        Index {
            image,
            spacing: 2 << 20,
            layers: vec![layer],
            nodes,
        },
        WindowWriter::default(),
    )
    .encode()
    .unwrap()
}

fn main() {
    let layout = fixtures();
    let reference = ImageRef::parse(&format!("oci:{}:debian", layout.display())).unwrap();
    let registries = Registries::new(RegistryOptions::default()).unwrap();
    let source = clip_registry::open(
        &reference,
        &registries,
        std::sync::Arc::new(clip_registry::auth::Anonymous),
    )
    .unwrap();
    let image = source.resolve(&Platform::default()).unwrap();
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let compressed: u64 = image.layers.iter().map(|l| l.size).sum();

    println!(
        "# clip index benchmark: image {} ({} layers, {compressed} compressed bytes)",
        reference.canonical(),
        image.layers.len()
    );
    println!();
    println!("## Index time vs one `gzip -dc` pass (best of 3, warm cache)");
    println!();
    println!("| layer | compressed MB | uncompressed MB | gzip -dc s | clip index s | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut gzip_total = Duration::ZERO;
    for (i, l) in image.layers.iter().enumerate() {
        let path = blob(&l.digest);
        let (g, _) = best_of(3, || gzip_dc(&path));
        let (t, (_, map)) = best_of(3, || {
            let f = std::io::BufReader::with_capacity(256 << 10, std::fs::File::open(&path).unwrap());
            clip_index::index_layer(f, clip_format::Compression::Gzip, 2 << 20).unwrap()
        });
        gzip_total += g;
        println!(
            "| {i} | {:.1} | {:.1} | {:.3} | {:.3} | {:.2} |",
            l.size as f64 / 1e6,
            map.uncompressed_size as f64 / 1e6,
            g.as_secs_f64(),
            t.as_secs_f64(),
            t.as_secs_f64() / g.as_secs_f64()
        );
    }
    let opts = clip_index::Options::default();
    let (t, _) = best_of(3, || {
        clip_index::build(source.as_ref(), "bench", &image, &opts).unwrap()
    });
    println!(
        "| image ({} jobs) | {:.1} | | {:.3} (sum) | {:.3} | **{:.2}** |",
        opts.jobs,
        compressed as f64 / 1e6,
        gzip_total.as_secs_f64(),
        t.as_secs_f64(),
        t.as_secs_f64() / gzip_total.as_secs_f64()
    );

    println!();
    println!("## Checkpoint spacing: index size and random 4 KiB read cost");
    println!();
    println!(
        "| spacing MiB | checkpoints | index bytes | index ÷ compressed | 4 KiB read CPU ms (mean) | p99 ms | max ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let big = image.layers.iter().max_by_key(|l| l.size).unwrap();
    let big_bytes = std::fs::read(blob(&big.digest)).unwrap();
    let big_index = image.layers.iter().position(|l| l.digest == big.digest).unwrap();
    for mib in [1u64, 2, 4, 8] {
        let opts = clip_index::Options {
            spacing: mib << 20,
            ..Default::default()
        };
        let (file, stats) = clip_index::build(source.as_ref(), "bench", &image, &opts).unwrap();
        let bytes = file.encode().unwrap().len();
        let layer = &file.index.layers[big_index];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut samples = Vec::new();
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % (layer.uncompressed_size - 4096);
            let k = layer.checkpoints.partition_point(|c| c.out <= off) - 1;
            let cp = layer.checkpoints[k];
            let start = Instant::now();
            let cpu = thread_cpu();
            let window = file.window(big_index, k).unwrap();
            let mut out = Vec::with_capacity(4096);
            clip_gzran::resume(
                clip_gzran::Compression::Gzip,
                clip_gzran::Checkpoint {
                    in_bits: cp.in_bits,
                    out: cp.out,
                },
                &window,
                &big_bytes[(cp.in_bits / 8) as usize..],
                off - cp.out,
                4096,
                &mut out,
            )
            .unwrap();
            let spent = thread_cpu() - cpu;
            assert_eq!(out.len(), 4096);
            let _ = start;
            samples.push(spent.as_secs_f64() * 1e3);
        }
        samples.sort_by(f64::total_cmp);
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        println!(
            "| {mib} | {} | {bytes} | {:.2}% | {:.3} | {:.3} | {:.3} |",
            stats.checkpoints,
            100.0 * bytes as f64 / compressed as f64,
            mean,
            samples[samples.len() * 99 / 100],
            samples[samples.len() - 1]
        );
    }

    println!();
    println!("## Loading an index of 100,000 files");
    println!();
    let bytes = synthetic_index(100_000);
    let (t, f) = best_of(10, || IndexFile::decode(&bytes).unwrap());
    let (median, _) = {
        let mut v: Vec<Duration> = (0..10)
            .map(|_| {
                let s = Instant::now();
                IndexFile::decode(&bytes).unwrap();
                s.elapsed()
            })
            .collect();
        v.sort();
        (v[5], ())
    };
    println!(
        "{} inodes, {} bytes: decode + checksum + validation best {:.1} ms, median {:.1} ms",
        f.index.nodes.len(),
        bytes.len(),
        t.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3
    );
}
