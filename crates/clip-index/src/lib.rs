//! Builds a clip index: reads each layer of an image once (layers in
//! parallel), records random-access checkpoints into its compressed stream
//! and where each file's bytes lie in its tar stream, then merges the layers'
//! entries into one tree with overlay semantics. Reading files back goes
//! through `clip_fs::SpanReader`.

pub mod tar;
pub mod tree;

use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clip_format::{Checkpoint, Compression, Image, Index, IndexFile, Kind, Layer, WindowWriter};
use clip_gzran::{IndexingReader, LayerMap};
use clip_metrics::defs;
use clip_registry::{Descriptor, ImageSource, ResolvedImage};

pub use tree::Skipped;

/// Default distance between checkpoints, in MiB of uncompressed data.
pub const DEFAULT_CHECKPOINT_MIB: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer {index} ({digest}): unsupported media type {media_type:?}")]
    MediaType {
        index: usize,
        digest: String,
        media_type: String,
    },
    #[error("layer {index} ({digest})")]
    Layer {
        index: usize,
        digest: String,
        #[source]
        source: Box<LayerError>,
    },
    #[error("layer {index} ({digest}): merging it into the tree")]
    Tree {
        index: usize,
        digest: String,
        #[source]
        source: tree::TreeError,
    },
    #[error(
        "layer {index} ({digest}): its uncompressed content has digest {actual}, but the image config's \
         rootfs.diff_ids names {expected}: the config does not describe this image"
    )]
    DiffId {
        index: usize,
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("the image config lists {diff_ids} rootfs.diff_ids for {layers} layers")]
    DiffIdCount { diff_ids: usize, layers: usize },
    #[error(transparent)]
    Source(#[from] clip_registry::Error),
    #[error(transparent)]
    Format(#[from] clip_format::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Source(#[from] clip_registry::Error),
    #[error(transparent)]
    Compression(#[from] clip_gzran::Error),
    #[error(transparent)]
    Tar(tar::TarError),
    #[error("content has digest {actual}, not the one in the manifest")]
    Digest { actual: String },
    #[error("content is {actual} bytes, the manifest says {expected}")]
    Size { expected: u64, actual: u64 },
}

impl From<tar::TarError> for LayerError {
    fn from(e: tar::TarError) -> Self {
        match e {
            // Errors from below the tar reader (decompression, network)
            // come through io::Error; report them as what they are.
            tar::TarError::Io(io) => LayerError::Compression(clip_gzran::unwrap_io(io)),
            other => LayerError::Tar(other),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct Options {
    /// Uncompressed bytes between checkpoints.
    pub spacing: u64,
    /// Layers indexed at once.
    pub jobs: usize,
    /// Compressed bytes read so far, over all layers (for progress bars).
    pub progress: Option<Arc<AtomicU64>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            spacing: DEFAULT_CHECKPOINT_MIB << 20,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            progress: None,
        }
    }
}

/// What an index run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub layers: usize,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub other: u64,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
    pub checkpoints: u64,
    pub skipped: Skipped,
}

/// The compression a layer media type implies.
pub fn compression_of(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        _ => None,
    }
}

fn gz_compression(c: Compression) -> clip_gzran::Compression {
    match c {
        Compression::Gzip => clip_gzran::Compression::Gzip,
        Compression::Zstd => clip_gzran::Compression::Zstd,
        Compression::None => clip_gzran::Compression::None,
    }
}

/// Counts compressed bytes as they are read.
struct Counting<R> {
    inner: R,
    counter: Option<Arc<AtomicU64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = &self.counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// Reads one layer stream: its tar entries and its random-access map.
pub fn index_layer<R: Read>(
    input: R,
    compression: Compression,
    spacing: u64,
) -> Result<(Vec<tar::Entry>, LayerMap), LayerError> {
    index_layer_facts(input, compression, spacing, false).map(|(e, m, _)| (e, m))
}

type Facts = Vec<(u64, clip_guess::Fact)>;

/// [`index_layer`], and with `facts` what its files say about the start
/// of a process (`clip_guess`).
fn index_layer_facts<R: Read>(
    input: R,
    compression: Compression,
    spacing: u64,
    facts: bool,
) -> Result<(Vec<tar::Entry>, LayerMap, Facts), LayerError> {
    let mut reader = IndexingReader::new(input, gz_compression(compression), spacing)?;
    let mut entries = Vec::new();
    let found = {
        let mut walker = tar::Walker::new(&mut reader);
        if facts {
            walker = walker.with_facts();
        }
        while let Some(e) = walker.next_entry()? {
            entries.push(e);
        }
        walker.take_facts()
    };
    // Reads (and checks) whatever follows the end of the archive.
    Ok((entries, reader.finish()?, found))
}

fn index_one(
    source: &dyn ImageSource,
    desc: &Descriptor,
    compression: Compression,
    opts: &Options,
    facts: bool,
) -> Result<(Vec<tar::Entry>, LayerMap, Facts), LayerError> {
    let blob = source.open_blob(desc)?;
    let input = Counting {
        inner: blob,
        counter: opts.progress.clone(),
    };
    let (entries, map, found) = index_layer_facts(input, compression, opts.spacing, facts)?;
    if map.compressed_size != desc.size {
        return Err(LayerError::Size {
            expected: desc.size,
            actual: map.compressed_size,
        });
    }
    let actual = format!("sha256:{}", hex::encode(map.digest));
    if actual != desc.digest {
        return Err(LayerError::Digest { actual });
    }
    Ok((entries, map, found))
}

/// The config's `rootfs.diff_ids`.
fn diff_ids(config: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(config).map_err(|e| clip_registry::Error::Manifest {
        digest: "config".into(),
        msg: e.to_string(),
    })?;
    Ok(v["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| a.iter().map(|d| d.as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default())
}

/// Indexes a resolved image: every layer read once, in parallel.
pub fn build(
    source: &dyn ImageSource,
    reference: &str,
    image: &ResolvedImage,
    opts: &Options,
) -> Result<(IndexFile, Stats)> {
    build_inner(source, reference, image, opts, false).map(|(f, s, _)| (f, s))
}

/// [`build`], and what the image's files say about the start of a process
/// (`clip_guess`), learnt from the same read of each layer.
pub fn build_with_hints(
    source: &dyn ImageSource,
    reference: &str,
    image: &ResolvedImage,
    opts: &Options,
) -> Result<(IndexFile, Stats, clip_guess::Hints)> {
    build_inner(source, reference, image, opts, true)
}

fn build_inner(
    source: &dyn ImageSource,
    reference: &str,
    image: &ResolvedImage,
    opts: &Options,
    facts: bool,
) -> Result<(IndexFile, Stats, clip_guess::Hints)> {
    let started = Instant::now();
    let result = build_image(source, reference, image, opts, facts);
    defs::INDEX_BUILDS
        .with(&[("result", if result.is_ok() { "ok" } else { "error" })])
        .inc();
    defs::INDEX_BUILD_SECONDS.get().observe_duration(started.elapsed());
    if let Ok((_, stats, _)) = &result {
        defs::INDEX_BUILD_BYTES
            .with(&[("kind", "compressed")])
            .inc_by(stats.compressed_bytes);
        defs::INDEX_BUILD_BYTES
            .with(&[("kind", "uncompressed")])
            .inc_by(stats.uncompressed_bytes);
    }
    result
}

fn build_image(
    source: &dyn ImageSource,
    reference: &str,
    image: &ResolvedImage,
    opts: &Options,
    facts: bool,
) -> Result<(IndexFile, Stats, clip_guess::Hints)> {
    let started = Instant::now();
    let mut compressions = Vec::with_capacity(image.layers.len());
    for (index, l) in image.layers.iter().enumerate() {
        let c = compression_of(&l.media_type).ok_or_else(|| Error::MediaType {
            index,
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
        })?;
        compressions.push(c);
    }
    let n = image.layers.len();
    let diff_ids = diff_ids(&image.config)?;
    if diff_ids.len() != n {
        return Err(Error::DiffIdCount {
            diff_ids: diff_ids.len(),
            layers: n,
        });
    }
    let results: Vec<std::sync::Mutex<Option<Result<_, LayerError>>>> = (0..n).map(|_| Default::default()).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = index_one(source, &image.layers[i], compressions[i], opts, facts);
                let failed = r.is_err();
                *results[i].lock().expect("not poisoned") = Some(r);
                if failed {
                    // Stop handing out layers; running ones finish.
                    next.store(n, Ordering::Relaxed);
                }
            });
        }
    });
    let mut tree = tree::TreeBuilder::new();
    let mut windows = WindowWriter::default();
    let mut layers = Vec::with_capacity(n);
    let mut hints = clip_guess::Hints::new();
    let mut stats = Stats {
        layers: n,
        ..Stats::default()
    };
    for (i, slot) in results.into_iter().enumerate() {
        let desc = &image.layers[i];
        let layer_err = |source| Error::Layer {
            index: i,
            digest: desc.digest.clone(),
            source: Box::new(source),
        };
        let (entries, map, found) = match slot.into_inner().expect("not poisoned") {
            Some(r) => r.map_err(layer_err)?,
            None => continue, // not started because another layer failed; that error is reported
        };
        // An index may only describe the image its config names (as umoci
        // checks when unpacking): each layer's uncompressed stream must
        // have the config's diff_id.
        let actual = format!("sha256:{}", hex::encode(map.uncompressed_digest));
        if actual != diff_ids[i] {
            return Err(Error::DiffId {
                index: i,
                digest: desc.digest.clone(),
                expected: diff_ids[i].clone(),
                actual,
            });
        }
        hints.extend(i as u32, found);
        tree.apply_layer(i as u32, &entries).map_err(|source| Error::Tree {
            index: i,
            digest: desc.digest.clone(),
            source,
        })?;
        let mut checkpoints = Vec::with_capacity(map.checkpoints.len());
        for c in &map.checkpoints {
            let (window_offset, window_len) = windows.add(&c.window)?;
            checkpoints.push(Checkpoint {
                in_bits: c.point.in_bits,
                out: c.point.out,
                window_offset,
                window_len,
                window_digest: [0; 32],
            });
        }
        stats.compressed_bytes += map.compressed_size;
        stats.uncompressed_bytes += map.uncompressed_size;
        stats.checkpoints += checkpoints.len() as u64;
        layers.push(Layer {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            compression: compressions[i],
            compressed_size: map.compressed_size,
            uncompressed_size: map.uncompressed_size,
            checkpoints,
            span_digests: map.span_digests,
            pieces: map
                .pieces
                .iter()
                .map(|p| clip_format::Piece {
                    span: p.span as u32,
                    out: p.out,
                    digest: p.digest,
                })
                .collect(),
        });
    }
    stats.skipped = tree.skipped;
    let nodes = tree.finish();
    // Facts of files a later layer replaced or removed are of no use.
    let live: std::collections::HashSet<(u32, u64)> = nodes
        .iter()
        .filter_map(|n| match n.data {
            clip_format::Data::Contiguous { layer, offset } => Some((layer, offset)),
            _ => None,
        })
        .collect();
    hints.files.retain(|k, _| live.contains(k));
    for node in &nodes {
        match node.kind {
            Kind::File => stats.files += 1,
            Kind::Dir => stats.directories += 1,
            Kind::Symlink => stats.symlinks += 1,
            _ => stats.other += 1,
        }
    }
    let index = Index {
        image: Image {
            reference: reference.to_string(),
            manifest_digest: image.manifest_digest.clone(),
            manifest_media_type: image.manifest_media_type.clone(),
            platform: image.platform.clone(),
            config_digest: image.config_digest.clone(),
            config: image.config.clone(),
        },
        spacing: opts.spacing,
        layers,
        nodes,
    };
    index.validate(windows.len())?;
    hints.prune_names(&index);
    tracing::info!(
        layers = n,
        files = stats.files,
        seconds = started.elapsed().as_secs_f64(),
        "indexed image"
    );
    Ok((IndexFile::new(index, windows), stats, hints))
}
