//! Reads file contents back through an index: the spans that hold a file
//! are fetched from the image source, checked against their digests and
//! inflated from their checkpoints. `clipctl cat` and the tests use it; the
//! FUSE filesystem has its own cached reader.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use clip_format::{Data, IndexFile, Node};
use clip_gzran::Checkpoint;
use clip_registry::{Descriptor, ImageSource};

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Source(#[from] clip_registry::Error),
    #[error("layer {layer} span {span}: {source}")]
    Span {
        layer: usize,
        span: usize,
        #[source]
        source: clip_gzran::Error,
    },
    #[error(transparent)]
    Format(#[from] clip_format::Error),
    #[error("writing file content: {0}")]
    Io(#[from] std::io::Error),
}

/// A reader with a small cache of inflated spans.
pub struct Extractor<'a> {
    file: &'a IndexFile,
    source: &'a dyn ImageSource,
    points: Vec<Vec<Checkpoint>>,
    cache: HashMap<(usize, usize), Arc<Vec<u8>>>,
    /// Compressed bytes fetched so far.
    pub fetched: u64,
}

const CACHE_SPANS: usize = 16;

impl<'a> Extractor<'a> {
    pub fn new(file: &'a IndexFile, source: &'a dyn ImageSource) -> Self {
        let points = file
            .index
            .layers
            .iter()
            .map(|l| {
                l.checkpoints
                    .iter()
                    .map(|c| Checkpoint {
                        in_bits: c.in_bits,
                        out: c.out,
                    })
                    .collect()
            })
            .collect();
        Self {
            file,
            source,
            points,
            cache: HashMap::new(),
            fetched: 0,
        }
    }

    fn span(&mut self, layer: usize, k: usize) -> Result<Arc<Vec<u8>>, ExtractError> {
        if let Some(s) = self.cache.get(&(layer, k)) {
            return Ok(s.clone());
        }
        let l = &self.file.index.layers[layer];
        let points = &self.points[layer];
        let (start, end) = clip_gzran::span_range(points, k, l.compressed_size).ok_or(ExtractError::Span {
            layer,
            span: k,
            source: clip_gzran::Error::NoSuchSpan {
                span: k,
                spans: points.len(),
            },
        })?;
        let desc = Descriptor {
            media_type: l.media_type.clone(),
            digest: l.digest.clone(),
            size: l.compressed_size,
        };
        let bytes = self.source.read_range(&desc, start, end - start)?;
        self.fetched += bytes.len() as u64;
        let window = self.file.window(layer, k)?;
        let compression = match l.compression {
            clip_format::Compression::Gzip => clip_gzran::Compression::Gzip,
            clip_format::Compression::Zstd => clip_gzran::Compression::Zstd,
            clip_format::Compression::None => clip_gzran::Compression::None,
        };
        let layout = clip_gzran::Layout {
            compression,
            checkpoints: points,
            compressed_size: l.compressed_size,
            uncompressed_size: l.uncompressed_size,
        };
        let out = clip_gzran::decompress_span(&layout, k, &window, &l.span_digests[k], &bytes)
            .map_err(|source| ExtractError::Span { layer, span: k, source })?;
        if self.cache.len() >= CACHE_SPANS {
            self.cache.clear();
        }
        let out = Arc::new(out);
        self.cache.insert((layer, k), out.clone());
        Ok(out)
    }

    /// Writes `len` bytes of layer `layer`'s uncompressed stream at `pos`.
    fn copy_stream(&mut self, layer: usize, mut pos: u64, len: u64, out: &mut dyn Write) -> Result<(), ExtractError> {
        let end = pos + len;
        while pos < end {
            let k = self.points[layer].partition_point(|c| c.out <= pos) - 1;
            let span = self.span(layer, k)?;
            let base = self.points[layer][k].out;
            let from = (pos - base) as usize;
            let to = ((end - base).min(span.len() as u64)) as usize;
            if from >= to {
                return Err(ExtractError::Span {
                    layer,
                    span: k,
                    source: clip_gzran::Error::SpanOutput {
                        span: k,
                        expected: end - base,
                        got: span.len() as u64,
                    },
                });
            }
            out.write_all(&span[from..to])?;
            pos += (to - from) as u64;
        }
        Ok(())
    }

    /// Writes the whole content of a regular file, holes of sparse files as
    /// zeros.
    pub fn copy_file(&mut self, node: &Node, out: &mut dyn Write) -> Result<(), ExtractError> {
        match &node.data {
            Data::None => {}
            Data::Contiguous { layer, offset } => self.copy_stream(*layer as usize, *offset, node.size, out)?,
            Data::Sparse { layer, segments } => {
                let mut at = 0;
                for s in segments {
                    write_zeros(out, s.logical - at)?;
                    self.copy_stream(*layer as usize, s.offset, s.len, out)?;
                    at = s.logical + s.len;
                }
                write_zeros(out, node.size - at)?;
            }
        }
        Ok(())
    }

    /// The whole content of a regular file, in memory.
    pub fn read_file(&mut self, node: &Node) -> Result<Vec<u8>, ExtractError> {
        let mut out = Vec::with_capacity(node.size.min(1 << 30) as usize);
        self.copy_file(node, &mut out)?;
        Ok(out)
    }
}

fn write_zeros(out: &mut dyn Write, mut n: u64) -> std::io::Result<()> {
    let zeros = [0u8; 64 * 1024];
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..k])?;
        n -= k as u64;
    }
    Ok(())
}
