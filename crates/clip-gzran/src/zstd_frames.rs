//! zstd layers: checkpoints at frame boundaries, where decoding restarts
//! with no history. A single-frame layer has one checkpoint at its start.

use std::io::Read;

use zstd::zstd_safe::{get_error_name, DCtx, InBuffer, OutBuffer};

use sha2::{Digest, Sha256};

use crate::gzip::read_some;
use crate::span::SpanHasher;
use crate::{BuiltCheckpoint, Checkpoint, Compression, Error, LayerMap, Piece, Result};

const IN_BUF: usize = 128 * 1024;
const OUT_BUF: usize = 256 * 1024;

pub(crate) struct Builder {
    dctx: DCtx<'static>,
    spacing: u64,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    outbuf: Box<[u8]>,
    rpos: usize,
    wpos: usize,
    out_total: u64,
    hasher: SpanHasher,
    checkpoints: Vec<BuiltCheckpoint>,
    /// Between two frames (or before the first).
    at_boundary: bool,
    eof: bool,
    pieces: PieceHasher,
}

/// Cuts each span's output into pieces of `spacing` bytes with their
/// digests; keeps them only for spans longer than twice the spacing.
struct PieceHasher {
    spacing: u64,
    span_start: u64,
    piece_start: u64,
    pos: u64,
    hash: Sha256,
    current: Vec<(u64, [u8; 32])>,
    kept: Vec<Piece>,
}

impl PieceHasher {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let boundary = self.piece_start + self.spacing;
            let n = ((boundary - self.pos) as usize).min(data.len());
            self.hash.update(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
            if self.pos == boundary {
                self.current.push((self.piece_start, self.hash.finalize_reset().into()));
                self.piece_start = self.pos;
            }
        }
    }

    /// Ends the current span (its index `span`) at the current position.
    fn close_span(&mut self, span: usize) {
        if self.pos > self.piece_start {
            self.current.push((self.piece_start, self.hash.finalize_reset().into()));
        }
        if self.pos - self.span_start > 2 * self.spacing {
            self.kept
                .extend(self.current.iter().map(|&(out, digest)| Piece { span, out, digest }));
        }
        self.current.clear();
        self.hash = Sha256::new();
        self.span_start = self.pos;
        self.piece_start = self.pos;
    }
}

impl Builder {
    pub(crate) fn new(spacing: u64) -> Self {
        Self {
            dctx: DCtx::create(),
            spacing,
            inbuf: vec![0; IN_BUF].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            outbuf: vec![0; OUT_BUF].into_boxed_slice(),
            rpos: 0,
            wpos: 0,
            out_total: 0,
            hasher: SpanHasher::new(),
            checkpoints: Vec::new(),
            at_boundary: true,
            eof: false,
            pieces: PieceHasher {
                spacing,
                span_start: 0,
                piece_start: 0,
                pos: 0,
                hash: Sha256::new(),
                current: Vec::new(),
                kept: Vec::new(),
            },
        }
    }

    pub(crate) fn fill_buf<R: Read>(&mut self, input: &mut R) -> Result<&[u8]> {
        loop {
            if self.rpos < self.wpos {
                return Ok(&self.outbuf[self.rpos..self.wpos]);
            }
            if self.eof {
                return Ok(&[]);
            }
            self.rpos = 0;
            self.wpos = 0;
            if self.in_start == self.in_end {
                let n = read_some(input, &mut self.inbuf)?;
                if n == 0 {
                    if self.at_boundary && !self.checkpoints.is_empty() {
                        self.eof = true;
                        continue;
                    }
                    return Err(Error::Truncated(self.hasher.position()));
                }
                self.in_start = 0;
                self.in_end = n;
            }
            if self.at_boundary {
                let due = match self.checkpoints.last() {
                    None => true,
                    Some(last) => self.out_total - last.point.out >= self.spacing,
                };
                if due {
                    if let Some(span) = self.checkpoints.len().checked_sub(1) {
                        self.pieces.close_span(span);
                    }
                    let pos = self.hasher.position();
                    self.hasher
                        .split(pos * 8)
                        .map_err(|msg| Error::Zstd { offset: pos, msg })?;
                    self.checkpoints.push(BuiltCheckpoint {
                        point: Checkpoint {
                            in_bits: pos * 8,
                            out: self.out_total,
                        },
                        window: Vec::new(),
                    });
                }
                self.at_boundary = false;
            }
            let mut inb = InBuffer::around(&self.inbuf[self.in_start..self.in_end]);
            let mut outb = OutBuffer::around(&mut self.outbuf[..]);
            let r = self.dctx.decompress_stream(&mut outb, &mut inb);
            let (consumed, produced) = (inb.pos(), outb.pos());
            let hint = r.map_err(|code| Error::Zstd {
                offset: self.hasher.position() + consumed as u64,
                msg: get_error_name(code).to_string(),
            })?;
            self.hasher.feed(&self.inbuf[self.in_start..self.in_start + consumed]);
            self.pieces.feed(&self.outbuf[..produced]);
            self.in_start += consumed;
            self.wpos = produced;
            self.out_total += produced as u64;
            // zstd stops at the end of each frame and returns 0 there.
            if hint == 0 {
                self.at_boundary = true;
            }
        }
    }

    /// Output produced but not yet consumed.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.outbuf[self.rpos..self.wpos]
    }

    pub(crate) fn consume(&mut self, amt: usize) {
        self.rpos = (self.rpos + amt).min(self.wpos);
    }

    pub(crate) fn finish<R: Read>(mut self, _input: &mut R) -> Result<LayerMap> {
        if !self.eof {
            return Err(Error::Truncated(self.hasher.position()));
        }
        if let Some(span) = self.checkpoints.len().checked_sub(1) {
            self.pieces.close_span(span);
        }
        let (span_digests, digest, size) = self.hasher.finish();
        Ok(LayerMap {
            compression: Compression::Zstd,
            compressed_size: size,
            uncompressed_size: self.out_total,
            checkpoints: self.checkpoints,
            span_digests,
            pieces: self.pieces.kept,
            digest,
            uncompressed_digest: [0; 32],
        })
    }
}

/// Decodes from a frame boundary. `compressed` starts at `cp.in_byte()`.
pub(crate) fn resume(cp: Checkpoint, compressed: &[u8], skip: u64, len: u64, out: &mut Vec<u8>) -> Result<()> {
    let mut dctx = DCtx::create();
    let mut pos = 0usize;
    let mut skip_left = skip;
    let mut remaining = len;
    let mut buf = vec![0u8; OUT_BUF];
    while remaining > 0 && pos < compressed.len() {
        let mut inb = InBuffer::around(&compressed[pos..]);
        let mut outb = OutBuffer::around(&mut buf[..]);
        let r = dctx.decompress_stream(&mut outb, &mut inb);
        let (consumed, produced) = (inb.pos(), outb.pos());
        r.map_err(|code| Error::Zstd {
            offset: cp.in_byte() + (pos + consumed) as u64,
            msg: get_error_name(code).to_string(),
        })?;
        pos += consumed;
        let mut chunk = &buf[..produced];
        let s = skip_left.min(chunk.len() as u64) as usize;
        skip_left -= s as u64;
        chunk = &chunk[s..];
        let take = remaining.min(chunk.len() as u64) as usize;
        out.extend_from_slice(&chunk[..take]);
        remaining -= take as u64;
        if consumed == 0 && produced == 0 {
            break;
        }
    }
    Ok(())
}

/// Decodes a long zstd span from a stream of its compressed bytes (which
/// start at the span's checkpoint), piece by piece, each checked against
/// its digest before it is handed out: memory stays bounded by one piece
/// and the decoder's window, whatever the frame's size.
pub struct PieceDecoder<R: Read> {
    decoder: zstd::stream::read::Decoder<'static, std::io::BufReader<R>>,
    span: usize,
    next: usize,
}

impl<R: Read> PieceDecoder<R> {
    pub fn new(input: R, span: usize) -> Result<Self> {
        Ok(Self {
            decoder: zstd::stream::read::Decoder::new(input)?,
            span,
            next: 0,
        })
    }

    /// The next piece's bytes: `len` of them, which must have `digest`.
    pub fn next_piece(&mut self, len: u64, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        self.decoder.read_exact(&mut out)?;
        if Sha256::digest(&out).as_slice() != digest {
            return Err(Error::PieceDigest {
                span: self.span,
                piece: self.next,
            });
        }
        self.next += 1;
        Ok(out)
    }

    /// The input, with whatever the decoder did not read of it.
    pub fn into_inner(self) -> R {
        self.decoder.finish().into_inner()
    }
}
