//! gzip checkpoints (zran) over the raw zlib API of `libz-rs-sys`.

use std::ffi::CStr;
use std::io::Read;
use std::mem::size_of;

use libz_rs_sys::{
    inflate, inflateEnd, inflateInit2_, inflatePrime, inflateReset, inflateReset2, inflateSetDictionary, z_stream,
    zlibVersion, Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END,
};

use crate::span::SpanHasher;
use crate::{BuiltCheckpoint, Checkpoint, Compression, Error, LayerMap, Result, WINDOW_SIZE};

const IN_BUF: usize = 128 * 1024;
const RING: usize = 8 * WINDOW_SIZE;
/// `windowBits` for a gzip wrapper (15 + 16) and for raw deflate.
const GZIP_BITS: i32 = 31;
const RAW_BITS: i32 = -15;

/// A z_stream that is boxed (zlib keeps a pointer back to it) and ended on
/// drop.
struct Inflater {
    strm: Box<z_stream>,
}

impl Inflater {
    fn new(window_bits: i32) -> Result<Self> {
        let mut strm = Box::<z_stream>::default();
        // SAFETY: strm is a valid, default-initialised stream at a fixed
        // address; the version and size match the linked library.
        let ret = unsafe { inflateInit2_(&mut *strm, window_bits, zlibVersion(), size_of::<z_stream>() as i32) };
        if ret != Z_OK {
            return Err(Error::Zlib(format!("inflateInit2 failed: {ret}")));
        }
        Ok(Self { strm })
    }

    fn message(&self) -> String {
        if self.strm.msg.is_null() {
            "invalid data".to_string()
        } else {
            // SAFETY: zlib sets msg to a static NUL-terminated string.
            unsafe { CStr::from_ptr(self.strm.msg) }.to_string_lossy().into_owned()
        }
    }

    /// One `inflate` call from `input` into `output`. Returns (zlib result,
    /// bytes consumed, bytes produced).
    ///
    /// # Safety
    /// `output` must be valid for writes of `out_len` bytes.
    unsafe fn step(&mut self, input: &[u8], output: *mut u8, out_len: usize, flush: i32) -> (i32, usize, usize) {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = out_len.min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as u32;
        self.strm.next_out = output;
        self.strm.avail_out = out_len as u32;
        // SAFETY: pointers and lengths set just above; the caller vouches for
        // output.
        let ret = unsafe { inflate(&mut *self.strm, flush) };
        let consumed = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        (ret, consumed, produced)
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised in new().
        unsafe { inflateEnd(&mut *self.strm) };
    }
}

#[derive(PartialEq, Eq)]
enum State {
    InMember,
    BetweenMembers,
    Done,
}

pub(crate) struct Builder {
    z: Inflater,
    spacing: u64,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// Output ring: the last 32 KiB of it are the window at any time.
    ring: Box<[u8]>,
    rpos: usize,
    wpos: usize,
    out_total: u64,
    hasher: SpanHasher,
    checkpoints: Vec<BuiltCheckpoint>,
    state: State,
}

impl Builder {
    pub(crate) fn new(spacing: u64) -> Result<Self> {
        Ok(Self {
            z: Inflater::new(GZIP_BITS)?,
            spacing,
            inbuf: vec![0; IN_BUF].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            ring: vec![0; RING].into_boxed_slice(),
            rpos: 0,
            wpos: 0,
            out_total: 0,
            hasher: SpanHasher::new(),
            checkpoints: Vec::new(),
            state: State::InMember,
        })
    }

    fn window(&self) -> Vec<u8> {
        let len = (self.out_total.min(WINDOW_SIZE as u64)) as usize;
        let mut w = Vec::with_capacity(len);
        if self.wpos >= len {
            w.extend_from_slice(&self.ring[self.wpos - len..self.wpos]);
        } else {
            w.extend_from_slice(&self.ring[RING - (len - self.wpos)..]);
            w.extend_from_slice(&self.ring[..self.wpos]);
        }
        w
    }

    fn corrupt(&self, msg: String) -> Error {
        Error::Gzip {
            offset: self.hasher.position(),
            msg,
        }
    }

    pub(crate) fn fill_buf<R: Read>(&mut self, input: &mut R) -> Result<&[u8]> {
        loop {
            if self.rpos < self.wpos {
                return Ok(&self.ring[self.rpos..self.wpos]);
            }
            if self.state == State::Done {
                return Ok(&[]);
            }
            if self.wpos == RING {
                self.wpos = 0;
                self.rpos = 0;
            }
            if self.in_start == self.in_end {
                let n = read_some(input, &mut self.inbuf)?;
                if n == 0 {
                    if self.state == State::BetweenMembers {
                        self.state = State::Done;
                        continue;
                    }
                    return Err(Error::Truncated(self.hasher.position()));
                }
                self.in_start = 0;
                self.in_end = n;
            }
            if self.state == State::BetweenMembers {
                // Another gzip member follows (pigz --independent, bgzip,
                // concatenated files), or the stream has junk at its end.
                if self.inbuf[self.in_start] != 0x1f {
                    return Err(Error::TrailingData(self.hasher.position()));
                }
                // SAFETY: initialised stream.
                unsafe { inflateReset(&mut *self.z.strm) };
                self.state = State::InMember;
            }
            let out_len = RING - self.wpos;
            // SAFETY: ring[wpos..] is valid for out_len bytes.
            let (ret, consumed, produced) = unsafe {
                let out = self.ring.as_mut_ptr().add(self.wpos);
                self.z
                    .step(&self.inbuf[self.in_start..self.in_end], out, out_len, Z_BLOCK)
            };
            self.hasher.feed(&self.inbuf[self.in_start..self.in_start + consumed]);
            self.in_start += consumed;
            self.wpos += produced;
            self.out_total += produced as u64;
            match ret {
                Z_OK => {}
                Z_STREAM_END => self.state = State::BetweenMembers,
                Z_BUF_ERROR if consumed == 0 && produced == 0 && self.in_start < self.in_end && out_len > 0 => {
                    return Err(self.corrupt("inflate made no progress".into()));
                }
                Z_BUF_ERROR => {}
                _ => return Err(self.corrupt(self.z.message())),
            }
            let dt = self.z.strm.data_type;
            // At a block boundary (or just after the gzip header), and not
            // inside the last block: a place to resume from.
            if ret == Z_OK && dt & 128 != 0 && dt & 64 == 0 {
                let due = match self.checkpoints.last() {
                    None => true,
                    Some(last) => self.out_total - last.point.out >= self.spacing,
                };
                if due {
                    let in_bits = self.hasher.position() * 8 - (dt & 7) as u64;
                    self.hasher.split(in_bits).map_err(|m| self.corrupt(m))?;
                    let window = self.window();
                    self.checkpoints.push(BuiltCheckpoint {
                        point: Checkpoint {
                            in_bits,
                            out: self.out_total,
                        },
                        window,
                    });
                }
            }
        }
    }

    /// Output produced but not yet consumed.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.ring[self.rpos..self.wpos]
    }

    pub(crate) fn consume(&mut self, amt: usize) {
        self.rpos = (self.rpos + amt).min(self.wpos);
    }

    pub(crate) fn finish<R: Read>(self, _input: &mut R) -> Result<LayerMap> {
        if self.state != State::Done || self.checkpoints.is_empty() {
            return Err(Error::Truncated(self.hasher.position()));
        }
        let (span_digests, digest, size) = self.hasher.finish();
        Ok(LayerMap {
            compression: Compression::Gzip,
            compressed_size: size,
            uncompressed_size: self.out_total,
            checkpoints: self.checkpoints,
            span_digests,
            pieces: Vec::new(),
            digest,
            uncompressed_digest: [0; 32],
        })
    }
}

pub(crate) fn read_some<R: Read>(input: &mut R, buf: &mut [u8]) -> Result<usize> {
    loop {
        match input.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Resumes inflation at `cp`. `compressed` starts at byte `cp.in_byte()`.
pub(crate) fn resume(
    cp: Checkpoint,
    window: &[u8],
    compressed: &[u8],
    skip: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut z = Inflater::new(RAW_BITS)?;
    let mut input = compressed;
    // Deflate reads bits from the low end of each byte: a checkpoint `used`
    // bits into a byte resumes with that byte's remaining high bits.
    let used = (cp.in_bits % 8) as i32;
    let fail = |z: &Inflater, input: &[u8]| Error::Gzip {
        offset: cp.in_byte() + (compressed.len() - input.len()) as u64,
        msg: z.message(),
    };
    if used != 0 {
        let Some((&first, rest)) = input.split_first() else {
            return Ok(());
        };
        // The checkpoint starts inside this byte: feed its high bits first.
        // SAFETY: initialised raw stream, before the first inflate call.
        if unsafe { inflatePrime(&mut *z.strm, 8 - used, i32::from(first >> used)) } != Z_OK {
            return Err(Error::Zlib("inflatePrime failed".into()));
        }
        input = rest;
    }
    if !window.is_empty() {
        // SAFETY: window is a valid slice of at most 32 KiB.
        if unsafe { inflateSetDictionary(&mut *z.strm, window.as_ptr(), window.len() as u32) } != Z_OK {
            return Err(Error::Zlib("inflateSetDictionary failed".into()));
        }
    }
    let mut raw = true;
    let mut skip_left = skip;
    let mut remaining = len;
    let mut scratch = Vec::new();
    while remaining > 0 {
        let (ret, consumed, produced) = if skip_left > 0 {
            let n = skip_left.min(256 * 1024) as usize;
            scratch.resize(n, 0);
            // SAFETY: scratch holds n bytes.
            let r = unsafe { z.step(input, scratch.as_mut_ptr(), n, Z_NO_FLUSH) };
            skip_left -= r.2 as u64;
            r
        } else {
            let n = remaining.min(1 << 20) as usize;
            out.reserve(n);
            // SAFETY: reserve made room for n bytes past len; set_len below
            // covers only what inflate wrote.
            let r = unsafe { z.step(input, out.as_mut_ptr().add(out.len()), n, Z_NO_FLUSH) };
            unsafe { out.set_len(out.len() + r.2) };
            remaining -= r.2 as u64;
            r
        };
        input = &input[consumed..];
        match ret {
            Z_OK => {
                if input.is_empty() && produced == 0 {
                    break;
                }
            }
            Z_STREAM_END => {
                if raw {
                    // Raw inflate stops at the byte after the last block;
                    // the 8-byte gzip trailer follows.
                    input = &input[input.len().min(8)..];
                }
                if input.first() != Some(&0x1f) {
                    break;
                }
                // Next member: let zlib parse its header.
                // SAFETY: initialised stream.
                unsafe { inflateReset2(&mut *z.strm, GZIP_BITS) };
                raw = false;
            }
            Z_BUF_ERROR if input.is_empty() => break,
            _ => return Err(fail(&z, input)),
        }
    }
    Ok(())
}
