//! Uncompressed tar layers: the compressed and uncompressed positions are the
//! same, so a checkpoint is just an offset.

use std::io::Read;

use crate::gzip::read_some;
use crate::span::SpanHasher;
use crate::{BuiltCheckpoint, Checkpoint, Compression, Error, LayerMap, Result};

pub(crate) struct Builder {
    spacing: u64,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    hasher: SpanHasher,
    checkpoints: Vec<BuiltCheckpoint>,
}

impl Builder {
    pub(crate) fn new(spacing: u64) -> Self {
        Self {
            spacing,
            buf: vec![0; 256 * 1024].into_boxed_slice(),
            start: 0,
            end: 0,
            hasher: SpanHasher::new(),
            checkpoints: Vec::new(),
        }
    }

    pub(crate) fn fill_buf<R: Read>(&mut self, input: &mut R) -> Result<&[u8]> {
        if self.start == self.end {
            let pos = self.hasher.position();
            let last = self.checkpoints.last().map(|c| c.point.out);
            let need_checkpoint = last.is_none_or(|l| pos - l >= self.spacing);
            // Never read past the next checkpoint so that spans split exactly.
            let next = if need_checkpoint { pos } else { last.unwrap_or(0) } + self.spacing;
            let room = ((next - pos) as usize).min(self.buf.len());
            let n = read_some(input, &mut self.buf[..room])?;
            if n > 0 && need_checkpoint {
                self.hasher
                    .split(pos * 8)
                    .map_err(|msg| Error::Gzip { offset: pos, msg })?;
                self.checkpoints.push(BuiltCheckpoint {
                    point: Checkpoint {
                        in_bits: pos * 8,
                        out: pos,
                    },
                    window: Vec::new(),
                });
            }
            self.hasher.feed(&self.buf[..n]);
            self.start = 0;
            self.end = n;
        }
        Ok(&self.buf[self.start..self.end])
    }

    /// Output produced but not yet consumed.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, amt: usize) {
        self.start = (self.start + amt).min(self.end);
    }

    pub(crate) fn finish(mut self) -> Result<LayerMap> {
        if self.checkpoints.is_empty() {
            // An empty layer still gets one (empty) span.
            self.hasher.split(0).map_err(|msg| Error::Gzip { offset: 0, msg })?;
            self.checkpoints.push(BuiltCheckpoint {
                point: Checkpoint { in_bits: 0, out: 0 },
                window: Vec::new(),
            });
        }
        let (span_digests, digest, size) = self.hasher.finish();
        Ok(LayerMap {
            compression: Compression::None,
            compressed_size: size,
            uncompressed_size: size,
            checkpoints: self.checkpoints,
            span_digests,
            pieces: Vec::new(),
            digest,
            uncompressed_digest: [0; 32],
        })
    }
}
