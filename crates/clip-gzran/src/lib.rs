//! Random access into compressed image layers.
//!
//! A layer is read once, front to back, through an [`IndexingReader`]. While
//! the caller (the tar walker) pulls uncompressed bytes out of it, the reader
//! records *checkpoints*: places where decompression can later be resumed
//! without reading anything before them. Between two checkpoints lies a
//! *span*; each span's compressed bytes get a SHA-256 digest so that a later
//! read can check what it fetched before inflating it.
//!
//! * gzip: a checkpoint sits on a deflate block boundary and holds the
//!   compressed bit offset, the uncompressed offset and the 32 KiB of output
//!   before it (the inflate window). This is zlib's `zran` technique, done with
//!   the raw zlib API of `libz-rs-sys` (`Z_BLOCK`, `inflatePrime`,
//!   `inflateSetDictionary`), which flate2 does not expose.
//! * zstd: a checkpoint sits at a frame boundary and needs no window. A
//!   single-frame layer has one checkpoint, so reads decode from its start.
//! * uncompressed tar: a checkpoint every spacing, trivially.
//!
//! This crate knows nothing of tar or registries: bytes in, bytes out.

mod gzip;
mod plain;
mod span;
mod zstd_frames;

pub use zstd_frames::PieceDecoder;

use std::io::{self, BufRead, Read};

pub use span::span_range;

/// Size of a deflate window: the most a deflate stream can reach back.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

/// Where decompression can resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Position in the compressed stream, in bits. Only gzip checkpoints can
    /// fall inside a byte.
    pub in_bits: u64,
    /// Position in the uncompressed stream, in bytes.
    pub out: u64,
}

impl Checkpoint {
    /// First compressed byte a resume from here needs.
    pub fn in_byte(&self) -> u64 {
        self.in_bits / 8
    }
}

/// A checkpoint as built during indexing, with its (uncompressed) window.
#[derive(Debug, Clone)]
pub struct BuiltCheckpoint {
    pub point: Checkpoint,
    /// Up to 32 KiB of output preceding the checkpoint; empty for zstd and
    /// plain layers.
    pub window: Vec<u8>,
}

/// A piece of a long zstd span: decoding one means decoding its frame from
/// the start, so pieces are not resume points, but each is checked on its
/// own (SHA-256 of its uncompressed bytes) as a stream of the frame passes,
/// so a read need neither hold nor wait for the whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The span (checkpoint) it belongs to.
    pub span: usize,
    /// Its first uncompressed byte; it ends where the next piece of its
    /// span starts, or with the span.
    pub out: u64,
    pub digest: [u8; 32],
}

/// Everything learnt about one layer by reading it once.
#[derive(Debug, Clone)]
pub struct LayerMap {
    pub compression: Compression,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub checkpoints: Vec<BuiltCheckpoint>,
    /// SHA-256 of each span's compressed bytes, see [`span_range`].
    pub span_digests: Vec<[u8; 32]>,
    /// Pieces of the spans longer than twice the spacing (zstd frames too
    /// long to decode whole for every read), in order.
    pub pieces: Vec<Piece>,
    /// SHA-256 of the whole compressed stream, to compare with the layer's
    /// descriptor digest.
    pub digest: [u8; 32],
    /// SHA-256 of the whole uncompressed stream, to compare with the image
    /// config's `rootfs.diff_ids`.
    pub uncompressed_digest: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the compressed stream")]
    Io(#[from] io::Error),
    #[error("corrupt gzip stream near compressed byte {offset}: {msg}")]
    Gzip { offset: u64, msg: String },
    #[error("corrupt zstd stream near compressed byte {offset}: {msg}")]
    Zstd { offset: u64, msg: String },
    #[error("compressed stream is truncated: it ends after {0} bytes in the middle of the data")]
    Truncated(u64),
    #[error("unexpected data after the end of the compressed stream at byte {0}")]
    TrailingData(u64),
    #[error("span {span} does not exist (the layer has {spans})")]
    NoSuchSpan { span: usize, spans: usize },
    #[error("span {span}: expected {expected} compressed bytes, got {got}")]
    SpanLength { span: usize, expected: u64, got: u64 },
    #[error("span {span}: compressed bytes do not match the recorded digest")]
    SpanDigest { span: usize },
    #[error("span {span} piece {piece}: decompressed bytes do not match the recorded digest")]
    PieceDigest { span: usize, piece: usize },
    #[error("span {span}: decompressed to {got} bytes, expected {expected}")]
    SpanOutput { span: usize, expected: u64, got: u64 },
    #[error("zlib: {0}")]
    Zlib(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Recovers a crate error that went through `io::Error` (the `Read` trait).
pub fn unwrap_io(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        *e.into_inner()
            .expect("checked above")
            .downcast::<Error>()
            .expect("checked above")
    } else {
        Error::Io(e)
    }
}

enum Engine {
    Gzip(Box<gzip::Builder>),
    Zstd(Box<zstd_frames::Builder>),
    Plain(Box<plain::Builder>),
}

/// Decompresses a layer while recording checkpoints and span digests.
///
/// Pull uncompressed bytes with `Read`/`BufRead`; when the stream is fully
/// consumed, call [`IndexingReader::finish`].
pub struct IndexingReader<R: Read> {
    engine: Engine,
    input: R,
    /// Hashes the uncompressed bytes as they are consumed.
    out_hash: sha2::Sha256,
}

impl<R: Read> IndexingReader<R> {
    /// `spacing` is the uncompressed distance to aim for between checkpoints.
    pub fn new(input: R, compression: Compression, spacing: u64) -> Result<Self> {
        let spacing = spacing.max(64 * 1024);
        let engine = match compression {
            Compression::Gzip => Engine::Gzip(Box::new(gzip::Builder::new(spacing)?)),
            Compression::Zstd => Engine::Zstd(Box::new(zstd_frames::Builder::new(spacing))),
            Compression::None => Engine::Plain(Box::new(plain::Builder::new(spacing))),
        };
        Ok(Self {
            engine,
            input,
            out_hash: sha2::Digest::new(),
        })
    }

    /// Reads the rest of the stream (checking it to the end) and returns the
    /// layer's map.
    pub fn finish(mut self) -> Result<LayerMap> {
        io::copy(&mut self, &mut io::sink()).map_err(unwrap_io)?;
        let mut map = match self.engine {
            Engine::Gzip(b) => b.finish(&mut self.input),
            Engine::Zstd(b) => b.finish(&mut self.input),
            Engine::Plain(b) => b.finish(),
        }?;
        map.uncompressed_digest = sha2::Digest::finalize(self.out_hash).into();
        Ok(map)
    }
}

impl<R: Read> BufRead for IndexingReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let r = match &mut self.engine {
            Engine::Gzip(b) => b.fill_buf(&mut self.input),
            Engine::Zstd(b) => b.fill_buf(&mut self.input),
            Engine::Plain(b) => b.fill_buf(&mut self.input),
        };
        r.map_err(io::Error::from)
    }

    fn consume(&mut self, amt: usize) {
        let pending = match &self.engine {
            Engine::Gzip(b) => b.pending(),
            Engine::Zstd(b) => b.pending(),
            Engine::Plain(b) => b.pending(),
        };
        sha2::Digest::update(&mut self.out_hash, &pending[..amt.min(pending.len())]);
        match &mut self.engine {
            Engine::Gzip(b) => b.consume(amt),
            Engine::Zstd(b) => b.consume(amt),
            Engine::Plain(b) => b.consume(amt),
        }
    }
}

impl<R: Read> Read for IndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// What reading any span of a layer needs to know about the layer.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    pub compression: Compression,
    pub checkpoints: &'a [Checkpoint],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

impl Layout<'_> {
    /// The span holding uncompressed offset `pos`.
    pub fn span_of(&self, pos: u64) -> usize {
        self.checkpoints.partition_point(|c| c.out <= pos).saturating_sub(1)
    }

    /// Uncompressed range `[start, end)` of span `k`.
    pub fn span_out(&self, k: usize) -> (u64, u64) {
        let end = self.checkpoints.get(k + 1).map_or(self.uncompressed_size, |c| c.out);
        (self.checkpoints[k].out, end)
    }
}

/// Decompresses one span: `compressed` must be exactly the bytes of
/// [`span_range`] for span `k`, and is checked against `digest` first.
/// Returns the span's uncompressed bytes (`out(k)..out(k+1)`).
pub fn decompress_span(
    layout: &Layout<'_>,
    k: usize,
    window: &[u8],
    digest: &[u8; 32],
    compressed: &[u8],
) -> Result<Vec<u8>> {
    decompress_span_prefix(layout, k, window, digest, compressed, u64::MAX)
}

/// [`decompress_span`], stopping after the span's first `limit` bytes:
/// the digest covers the compressed bytes, so a prefix is as verified as
/// the whole, and inflating costs in proportion to what it produces.
pub fn decompress_span_prefix(
    layout: &Layout<'_>,
    k: usize,
    window: &[u8],
    digest: &[u8; 32],
    compressed: &[u8],
    limit: u64,
) -> Result<Vec<u8>> {
    let Layout {
        compression,
        checkpoints,
        compressed_size,
        uncompressed_size,
    } = *layout;
    let (start, end) = span_range(checkpoints, k, compressed_size).ok_or(Error::NoSuchSpan {
        span: k,
        spans: checkpoints.len(),
    })?;
    if compressed.len() as u64 != end - start {
        return Err(Error::SpanLength {
            span: k,
            expected: end - start,
            got: compressed.len() as u64,
        });
    }
    let got: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(compressed).into();
    if &got != digest {
        return Err(Error::SpanDigest { span: k });
    }
    let cp = checkpoints[k];
    let out_end = checkpoints.get(k + 1).map_or(uncompressed_size, |c| c.out);
    let want = (out_end - cp.out).min(limit);
    let mut out = Vec::with_capacity(want as usize);
    resume(compression, cp, window, compressed, 0, want, &mut out)?;
    if out.len() as u64 != want {
        return Err(Error::SpanOutput {
            span: k,
            expected: want,
            got: out.len() as u64,
        });
    }
    Ok(out)
}

/// Resumes decompression at checkpoint `cp` over `compressed` (which starts
/// at byte `cp.in_byte()` of the layer), discards `skip` bytes and appends up
/// to `len` bytes to `out`. Stops early only at the end of the input.
pub fn resume(
    compression: Compression,
    cp: Checkpoint,
    window: &[u8],
    compressed: &[u8],
    skip: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    match compression {
        Compression::Gzip => gzip::resume(cp, window, compressed, skip, len, out),
        Compression::Zstd => zstd_frames::resume(cp, compressed, skip, len, out),
        Compression::None => {
            let from = (skip as usize).min(compressed.len());
            let to = from.saturating_add(len as usize).min(compressed.len());
            out.extend_from_slice(&compressed[from..to]);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
