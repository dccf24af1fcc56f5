//! Span bookkeeping shared by all engines: which compressed bytes belong to
//! which span, and their digests.

use sha2::{Digest, Sha256};

use crate::Checkpoint;

/// The compressed byte range `[start, end)` that span `k` needs: from the
/// byte holding its checkpoint's first bit to the byte holding the next
/// checkpoint's last bit (or the end of the stream). Neighbouring spans of a
/// gzip layer may share one byte.
pub fn span_range(checkpoints: &[Checkpoint], k: usize, compressed_size: u64) -> Option<(u64, u64)> {
    let cp = checkpoints.get(k)?;
    let end = match checkpoints.get(k + 1) {
        Some(next) => next.in_bits.div_ceil(8),
        None => compressed_size,
    };
    (cp.in_byte() <= end && end <= compressed_size).then_some((cp.in_byte(), end))
}

/// Hashes the compressed stream as a whole and span by span.
pub(crate) struct SpanHasher {
    whole: Sha256,
    /// Bytes fed so far (the compressed position).
    fed: u64,
    current: Option<Sha256>,
    last_byte: Option<u8>,
    pub(crate) digests: Vec<[u8; 32]>,
}

impl SpanHasher {
    pub(crate) fn new() -> Self {
        Self {
            whole: Sha256::new(),
            fed: 0,
            current: None,
            last_byte: None,
            digests: Vec::new(),
        }
    }

    pub(crate) fn position(&self) -> u64 {
        self.fed
    }

    /// Feeds the next consumed compressed bytes.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.whole.update(bytes);
        if let Some(h) = &mut self.current {
            h.update(bytes);
        }
        self.fed += bytes.len() as u64;
        self.last_byte = bytes.last().copied();
    }

    /// Starts a new span at `in_bits`. Everything up to the byte holding
    /// `in_bits - 1` must have been fed, and nothing past it.
    pub(crate) fn split(&mut self, in_bits: u64) -> Result<(), String> {
        if in_bits.div_ceil(8) != self.fed {
            return Err(format!(
                "checkpoint at bit {in_bits} but {} bytes consumed (internal error)",
                self.fed
            ));
        }
        if let Some(h) = self.current.take() {
            self.digests.push(h.finalize().into());
        }
        let mut h = Sha256::new();
        if !in_bits.is_multiple_of(8) {
            h.update([self.last_byte.unwrap_or(0)]);
        }
        self.current = Some(h);
        Ok(())
    }

    /// Closes the last span at the end of the stream.
    pub(crate) fn finish(mut self) -> (Vec<[u8; 32]>, [u8; 32], u64) {
        if let Some(h) = self.current.take() {
            self.digests.push(h.finalize().into());
        }
        (self.digests, self.whole.finalize().into(), self.fed)
    }
}
