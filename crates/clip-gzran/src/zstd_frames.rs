//! zstd layers: checkpoints at frame boundaries, where decoding restarts
//! with no history. A single-frame layer has one checkpoint at its start.

use std::io::Read;

use zstd::zstd_safe::{get_error_name, DCtx, InBuffer, OutBuffer};

use crate::gzip::read_some;
use crate::span::SpanHasher;
use crate::{BuiltCheckpoint, Checkpoint, Compression, Error, LayerMap, Result};

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

    pub(crate) fn finish<R: Read>(self, _input: &mut R) -> Result<LayerMap> {
        if !self.eof {
            return Err(Error::Truncated(self.hasher.position()));
        }
        let (span_digests, digest, size) = self.hasher.finish();
        Ok(LayerMap {
            compression: Compression::Zstd,
            compressed_size: size,
            uncompressed_size: self.out_total,
            checkpoints: self.checkpoints,
            span_digests,
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
