//! A layer as an index lays it out: its spans (resume points) and the
//! units the store caches, each with an identity.
//!
//! A unit is a whole span, or a piece of a long zstd span (read as a
//! stream). Its identity is a SHA-256 over everything that determines its
//! bytes: for a span, the layer digest, compression, compressed range, the
//! digest its compressed bytes must have and the stored window it resumes
//! with; for a piece, the digest its own bytes must have. So a cache entry
//! can only ever be served to an index that asks for exactly those bytes:
//! an index that names a layer digest but lies about the rest gets entries
//! of its own and poisons nobody else's.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use clip_format::{Compression, IndexFile};
use clip_registry::Descriptor;
use sha2::{Digest, Sha256};

use crate::{ReadError, UnitId};

/// A run of decompressed bytes the store caches as one.
#[derive(Debug, Clone)]
pub struct Unit {
    /// First uncompressed byte in the layer's stream.
    pub out: u64,
    pub len: u64,
    pub span: usize,
    /// The digest of a piece's own bytes; None for a whole span.
    pub piece: Option<[u8; 32]>,
    pub id: UnitId,
}

#[derive(Debug, Clone)]
pub struct Span {
    /// Compressed bytes `[start, end)` it needs.
    pub comp: (u64, u64),
    pub out: (u64, u64),
    pub digest: [u8; 32],
    pub units: Range<usize>,
    /// Read as a stream, piece by piece (no resume point inside).
    pub streamed: bool,
}

pub struct LayerLayout {
    pub desc: Descriptor,
    /// A short form of the digest, for messages and metrics.
    pub short: String,
    pub(crate) compression: clip_gzran::Compression,
    pub(crate) points: Vec<clip_gzran::Checkpoint>,
    pub uncompressed_size: u64,
    pub spans: Vec<Span>,
    pub units: Vec<Unit>,
    index: Arc<IndexFile>,
    layer: usize,
    /// The layout's own identity (of all its units), for whole-layer work.
    pub key: UnitId,
    /// The source answered a range request with the whole blob: read this
    /// layer as one stream from now on.
    pub(crate) range_ignored: AtomicBool,
    /// The span of the layer's last demand miss (`usize::MAX`: none yet),
    /// to tell a reader going backwards.
    pub(crate) last_miss: AtomicUsize,
}

impl std::fmt::Debug for LayerLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerLayout({}, {} units)", self.short, self.units.len())
    }
}

pub(crate) fn short(digest: &str) -> String {
    digest.trim_start_matches("sha256:").chars().take(12).collect()
}

impl LayerLayout {
    /// The layout of layer `layer` of a loaded (validated) index.
    pub fn new(index: &Arc<IndexFile>, layer: usize) -> Result<Arc<Self>, ReadError> {
        let l = index
            .index
            .layers
            .get(layer)
            .ok_or_else(|| ReadError::Index(format!("no layer {layer}")))?;
        let compression = match l.compression {
            Compression::Gzip => clip_gzran::Compression::Gzip,
            Compression::Zstd => clip_gzran::Compression::Zstd,
            Compression::None => clip_gzran::Compression::None,
        };
        let points: Vec<clip_gzran::Checkpoint> = l
            .checkpoints
            .iter()
            .map(|c| clip_gzran::Checkpoint {
                in_bits: c.in_bits,
                out: c.out,
            })
            .collect();
        let tag = match compression {
            clip_gzran::Compression::Gzip => 1u8,
            clip_gzran::Compression::Zstd => 2,
            clip_gzran::Compression::None => 3,
        };
        let mut spans = Vec::with_capacity(points.len());
        let mut units = Vec::with_capacity(points.len());
        let mut key = Sha256::new();
        key.update(l.digest.as_bytes());
        for (k, cp) in points.iter().enumerate() {
            let comp = clip_gzran::span_range(&points, k, l.compressed_size)
                .ok_or_else(|| ReadError::Index(format!("layer {layer} span {k} out of range")))?;
            let out_end = points.get(k + 1).map_or(l.uncompressed_size, |c| c.out);
            let digest = l.span_digests[k];
            let pieces: Vec<&clip_format::Piece> = l.pieces.iter().filter(|p| p.span as usize == k).collect();
            let first = units.len();
            if pieces.is_empty() {
                let mut h = Sha256::new();
                h.update(b"clip-span-v1\0");
                h.update(l.digest.as_bytes());
                h.update([tag]);
                for v in [cp.in_bits, comp.1, cp.out, out_end] {
                    h.update(v.to_le_bytes());
                }
                h.update(digest);
                h.update(index.window_digest(layer, k).copied().unwrap_or_default());
                let id: UnitId = h.finalize().into();
                key.update(id);
                units.push(Unit {
                    out: cp.out,
                    len: out_end - cp.out,
                    span: k,
                    piece: None,
                    id,
                });
            } else {
                for (i, p) in pieces.iter().enumerate() {
                    let end = pieces.get(i + 1).map_or(out_end, |q| q.out);
                    let mut h = Sha256::new();
                    h.update(b"clip-piece-v1\0");
                    h.update(l.digest.as_bytes());
                    for v in [cp.in_bits, comp.1, p.out, end] {
                        h.update(v.to_le_bytes());
                    }
                    h.update(p.digest);
                    let id: UnitId = h.finalize().into();
                    key.update(id);
                    units.push(Unit {
                        out: p.out,
                        len: end - p.out,
                        span: k,
                        piece: Some(p.digest),
                        id,
                    });
                }
            }
            spans.push(Span {
                comp,
                out: (cp.out, out_end),
                digest,
                units: first..units.len(),
                streamed: !pieces.is_empty(),
            });
        }
        Ok(Arc::new(Self {
            desc: Descriptor {
                media_type: l.media_type.clone(),
                digest: l.digest.clone(),
                size: l.compressed_size,
            },
            short: short(&l.digest),
            compression,
            points,
            uncompressed_size: l.uncompressed_size,
            spans,
            units,
            index: index.clone(),
            layer,
            key: key.finalize().into(),
            range_ignored: AtomicBool::new(false),
            last_miss: AtomicUsize::new(usize::MAX),
        }))
    }

    /// Every layer of an index.
    pub fn all(index: &Arc<IndexFile>) -> Result<Vec<Arc<Self>>, ReadError> {
        (0..index.index.layers.len()).map(|i| Self::new(index, i)).collect()
    }

    /// The unit holding uncompressed offset `pos`.
    pub fn unit_at(&self, pos: u64) -> usize {
        self.units.partition_point(|u| u.out <= pos).saturating_sub(1)
    }

    pub(crate) fn gz(&self) -> clip_gzran::Layout<'_> {
        clip_gzran::Layout {
            compression: self.compression,
            checkpoints: &self.points,
            compressed_size: self.desc.size,
            uncompressed_size: self.uncompressed_size,
        }
    }

    pub(crate) fn window(&self, k: usize) -> Result<Vec<u8>, ReadError> {
        self.index
            .window(self.layer, k)
            .map_err(|e| ReadError::Index(e.to_string()))
    }
}
