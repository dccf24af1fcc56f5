//! The `.clip` index file.
//!
//! An index describes one image: its manifest digest and config, each
//! layer's random-access map (checkpoints, windows, span digests) and the
//! merged file tree. It holds no file contents.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0   magic      8 bytes  "CLIPIDX\0"
//! 8   version    u32
//! 12  flags      u32      (0)
//! 16  meta_len   u64      bytes of the metadata section
//! 24  meta_raw   u64      its size once decompressed
//! 32  win_len    u64      bytes of the window section
//! 40  checksum   32 bytes SHA-256 of bytes 0..40 and of both sections
//! 72  metadata   zstd(postcard(Index))
//! ..  windows    one zstd frame (with content checksum) per window
//! ```
//!
//! The whole file is checked on load; windows are decompressed only when a
//! read needs them.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"CLIPIDX\0";
/// 2: layers carry pieces of long zstd spans.
pub const VERSION: u32 = 2;
const HEADER_LEN: usize = 72;
/// The largest metadata section we will decompress: far above any real
/// image, low enough that a hostile header cannot exhaust memory.
const MAX_META_RAW: u64 = 4 << 30;
/// Inode of the root directory (FUSE's `FUSE_ROOT_ID`).
pub const ROOT_INO: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a clip index (bad magic)")]
    BadMagic,
    #[error("clip index version {0} is not supported (this build reads version {VERSION}): index the image again")]
    Version(u32),
    #[error("clip index is truncated: {expected} bytes expected, {got} present")]
    Truncated { expected: u64, got: u64 },
    #[error("clip index is {got} bytes but its header says {expected}: trailing data")]
    TrailingData { expected: u64, got: u64 },
    #[error("clip index checksum mismatch: the file is corrupted")]
    Checksum,
    #[error("clip index metadata cannot be decoded: {0}")]
    Decode(String),
    #[error("clip index is inconsistent: {0}")]
    Invalid(String),
    #[error("window of layer {layer} checkpoint {checkpoint} is corrupted: {msg}")]
    Window {
        layer: usize,
        checkpoint: usize,
        msg: String,
    },
    #[error("reading the index")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The image an index was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The reference as the user gave it, normalised (no credentials).
    pub reference: String,
    /// Digest of the image manifest (not of a multi-arch index).
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// Platform the manifest was chosen for, as `os/arch[/variant]`.
    pub platform: String,
    pub config_digest: String,
    /// The image config JSON, byte for byte: running the image needs it.
    pub config: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Compressed position in bits.
    pub in_bits: u64,
    /// Uncompressed position in bytes.
    pub out: u64,
    /// The window's place in the window section (empty for zstd and plain).
    pub window_offset: u64,
    pub window_len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub digest: String,
    pub media_type: String,
    pub compression: Compression,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub checkpoints: Vec<Checkpoint>,
    /// SHA-256 of each span's compressed bytes.
    pub span_digests: Vec<[u8; 32]>,
    /// Pieces of long zstd spans, by span then offset (see
    /// `clip_gzran::Piece`): such a span is read as a stream, each piece
    /// checked by the SHA-256 of its uncompressed bytes.
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub span: u32,
    /// First uncompressed byte; the piece ends at the next piece of its
    /// span or with the span.
    pub out: u64,
    pub digest: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// A run of a sparse file's data: `len` bytes at logical offset `logical`
/// are stored at `offset` in the layer's uncompressed stream. Bytes not
/// covered by any segment read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub logical: u64,
    pub len: u64,
    pub offset: u64,
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Data {
    None,
    /// `size` bytes starting at `offset` of layer `layer`'s tar stream.
    Contiguous {
        layer: u32,
        offset: u64,
    },
    Sparse {
        layer: u32,
        segments: Vec<Segment>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
}

/// One inode. `nodes[i]` has inode `i + 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    pub nlink: u32,
    /// Device number (`makedev(major, minor)`) of device nodes.
    pub rdev: u64,
    /// Inode of the directory holding this node's first name.
    pub parent: u64,
    pub target: Vec<u8>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub data: Data,
    /// A directory's entries, sorted by name (no `.` or `..`).
    pub entries: Vec<DirEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub image: Image,
    /// The uncompressed distance aimed at between checkpoints (bytes).
    pub spacing: u64,
    pub layers: Vec<Layer>,
    pub nodes: Vec<Node>,
}

impl Index {
    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    /// Looks `name` up in directory `dir`.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let d = self.node(dir)?;
        d.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| d.entries[i].ino)
    }

    /// Resolves an absolute or relative path, without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Option<u64> {
        let mut ino = ROOT_INO;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".") {
            ino = if comp == b".." {
                self.node(ino)?.parent
            } else {
                self.lookup(ino, comp)?
            };
        }
        Some(ino)
    }

    /// Resolves a path as the kernel would inside the image: symlinks are
    /// followed (absolute targets from the image's root), `..` stops at the
    /// root, and more than 40 links is a loop.
    pub fn resolve_follow(&self, path: &[u8]) -> Option<u64> {
        let split = |p: &[u8]| -> Vec<Vec<u8>> {
            p.split(|&b| b == b'/')
                .filter(|c| !c.is_empty() && *c != b".")
                .map(<[u8]>::to_vec)
                .collect()
        };
        let mut todo: std::collections::VecDeque<Vec<u8>> = split(path).into();
        let mut chain = vec![ROOT_INO];
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c == b".." {
                if chain.len() > 1 {
                    chain.pop();
                }
                continue;
            }
            let child = self.lookup(*chain.last()?, &c)?;
            let node = self.node(child)?;
            if node.kind == Kind::Symlink {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if node.target.first() == Some(&b'/') {
                    chain.truncate(1);
                }
                for t in split(&node.target).into_iter().rev() {
                    todo.push_front(t);
                }
            } else {
                if !todo.is_empty() && node.kind != Kind::Dir {
                    return None;
                }
                chain.push(child);
            }
        }
        chain.last().copied()
    }

    /// Checks the invariants readers rely on, so that no later lookup can
    /// index out of bounds on a crafted file.
    pub fn validate(&self, windows_len: u64) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        let n = self.nodes.len() as u64;
        match self.nodes.first() {
            Some(root) if root.kind == Kind::Dir => {}
            _ => return bad("the root is missing or not a directory".into()),
        }
        for (li, l) in self.layers.iter().enumerate() {
            if l.checkpoints.is_empty() || l.checkpoints.len() != l.span_digests.len() {
                return bad(format!("layer {li}: checkpoints and span digests disagree"));
            }
            let mut prev: Option<&Checkpoint> = None;
            for c in &l.checkpoints {
                if c.window_offset
                    .checked_add(u64::from(c.window_len))
                    .is_none_or(|e| e > windows_len)
                    || c.out > l.uncompressed_size
                    || c.in_bits / 8 > l.compressed_size
                    || prev.is_some_and(|p| p.out >= c.out || p.in_bits >= c.in_bits)
                {
                    return bad(format!("layer {li}: checkpoint out of order or out of range"));
                }
                prev = Some(c);
            }
            let span_out = |k: usize| {
                let end = l.checkpoints.get(k + 1).map_or(l.uncompressed_size, |c| c.out);
                (l.checkpoints[k].out, end)
            };
            let mut prev: Option<&Piece> = None;
            for p in &l.pieces {
                let k = p.span as usize;
                let ok = k < l.checkpoints.len() && {
                    let (start, end) = span_out(k);
                    let first_of_span = prev.is_none_or(|q| q.span != p.span);
                    p.out < end
                        && if first_of_span {
                            p.out == start && prev.is_none_or(|q| q.span < p.span)
                        } else {
                            prev.is_some_and(|q| q.out < p.out)
                        }
                };
                if !ok {
                    return bad(format!("layer {li}: pieces out of order or out of range"));
                }
                prev = Some(p);
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let ino = i as u64 + 1;
            if node.parent == 0 || node.parent > n {
                return bad(format!("inode {ino}: parent {} out of range", node.parent));
            }
            if node.kind != Kind::Dir && !node.entries.is_empty() {
                return bad(format!("inode {ino}: a non-directory with entries"));
            }
            for w in node.entries.windows(2) {
                if w[0].name >= w[1].name {
                    return bad(format!("inode {ino}: entries not sorted or duplicated"));
                }
            }
            for e in &node.entries {
                if e.ino == 0 || e.ino > n || e.ino == ROOT_INO || e.name.is_empty() || e.name.contains(&b'/') {
                    return bad(format!("inode {ino}: bad entry"));
                }
            }
            let layer_of = |layer: u32| self.layers.get(layer as usize);
            match &node.data {
                Data::None => {}
                Data::Contiguous { layer, offset } => match layer_of(*layer) {
                    Some(l) if offset.checked_add(node.size).is_some_and(|e| e <= l.uncompressed_size) => {}
                    _ => return bad(format!("inode {ino}: data out of range")),
                },
                Data::Sparse { layer, segments } => {
                    let Some(l) = layer_of(*layer) else {
                        return bad(format!("inode {ino}: no such layer"));
                    };
                    let mut end = 0;
                    for s in segments {
                        let ok = s.logical >= end
                            && s.logical.checked_add(s.len).is_some_and(|e| e <= node.size)
                            && s.offset.checked_add(s.len).is_some_and(|e| e <= l.uncompressed_size);
                        if !ok {
                            return bad(format!("inode {ino}: sparse map out of range"));
                        }
                        end = s.logical + s.len;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Collects windows into the window section while an index is built.
#[derive(Default)]
pub struct WindowWriter {
    buf: Vec<u8>,
}

impl WindowWriter {
    /// Stores a window; returns its (offset, len) for the checkpoint.
    pub fn add(&mut self, window: &[u8]) -> Result<(u64, u32)> {
        if window.is_empty() {
            return Ok((self.buf.len() as u64, 0));
        }
        let mut enc = zstd::bulk::Compressor::new(3)?;
        enc.include_checksum(true)?;
        let frame = enc.compress(window)?;
        let off = self.buf.len() as u64;
        self.buf.extend_from_slice(&frame);
        Ok((off, frame.len() as u32))
    }

    pub fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// A loaded, checked index with its window section.
#[derive(Debug)]
pub struct IndexFile {
    pub index: Index,
    windows: Vec<u8>,
}

impl IndexFile {
    pub fn new(index: Index, windows: WindowWriter) -> Self {
        Self {
            index,
            windows: windows.buf,
        }
    }

    pub fn windows_len(&self) -> u64 {
        self.windows.len() as u64
    }

    /// Encodes the file.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let raw = postcard::to_stdvec(&self.index).map_err(|e| Error::Decode(e.to_string()))?;
        let meta = zstd::bulk::compress(&raw, 3)?;
        let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + self.windows.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.windows.len() as u64).to_le_bytes());
        let sum = checksum(&out, &meta, &self.windows);
        out.extend_from_slice(&sum);
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.windows);
        Ok(out)
    }

    /// Decodes and checks a file: magic, version, length, checksum, then the
    /// metadata and its invariants.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 8 || bytes[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated {
                expected: HEADER_LEN as u64,
                got: bytes.len() as u64,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let (meta_len, meta_raw, win_len) = (u64_at(16), u64_at(24), u64_at(32));
        let expected = (HEADER_LEN as u64)
            .checked_add(meta_len)
            .and_then(|v| v.checked_add(win_len))
            .ok_or(Error::Invalid("section lengths overflow".into()))?;
        let got = bytes.len() as u64;
        if got < expected {
            return Err(Error::Truncated { expected, got });
        }
        if got > expected {
            return Err(Error::TrailingData { expected, got });
        }
        let meta = &bytes[HEADER_LEN..HEADER_LEN + meta_len as usize];
        let windows = &bytes[HEADER_LEN + meta_len as usize..];
        if checksum(&bytes[..40], meta, windows) != bytes[40..72] {
            return Err(Error::Checksum);
        }
        if meta_raw > MAX_META_RAW {
            return Err(Error::Invalid(format!(
                "metadata of {meta_raw} bytes is implausibly large"
            )));
        }
        let index = decode_meta(meta, meta_raw)?;
        index.validate(windows.len() as u64)?;
        Ok(Self {
            index,
            windows: windows.to_vec(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        Self::decode(&std::fs::read(path)?)
    }

    /// The stored (compressed) window frame of checkpoint `k` of layer
    /// `layer`: what identifies the window without decompressing it.
    pub fn window_frame(&self, layer: usize, k: usize) -> Option<&[u8]> {
        let cp = self.index.layers.get(layer)?.checkpoints.get(k)?;
        let start = cp.window_offset as usize;
        self.windows.get(start..start + cp.window_len as usize)
    }

    /// The decompressed window of checkpoint `k` of layer `layer`.
    pub fn window(&self, layer: usize, k: usize) -> Result<Vec<u8>> {
        let err = |msg: String| Error::Window {
            layer,
            checkpoint: k,
            msg,
        };
        let cp = self
            .index
            .layers
            .get(layer)
            .and_then(|l| l.checkpoints.get(k))
            .ok_or_else(|| err("no such checkpoint".into()))?;
        if cp.window_len == 0 {
            return Ok(Vec::new());
        }
        let start = cp.window_offset as usize;
        let frame = &self.windows[start..start + cp.window_len as usize];
        // A window is at most 32 KiB; the cap keeps a bad frame from
        // allocating more.
        zstd::bulk::decompress(frame, 32 * 1024).map_err(|e| err(e.to_string()))
    }
}

/// Rewrites the checksum of an encoded file (at least a header long) to
/// match its bytes. Public for fuzzing: with it, mutated files get past the
/// checksum to the parsers behind it.
pub fn fix_checksum(bytes: &mut [u8]) {
    if bytes.len() < HEADER_LEN {
        return;
    }
    let (head, rest) = bytes.split_at_mut(HEADER_LEN);
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    let meta_len = (u64_at(16) as usize).min(rest.len());
    let sum = checksum(&head[..40], &rest[..meta_len], &rest[meta_len..]);
    head[40..72].copy_from_slice(&sum);
}

fn checksum(header: &[u8], meta: &[u8], windows: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&header[..40]);
    h.update(meta);
    h.update(windows);
    h.finalize().into()
}

/// Decodes the metadata section (after the checksum). Public for fuzzing.
pub fn decode_meta(meta: &[u8], meta_raw: u64) -> Result<Index> {
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(meta)?
        .take(meta_raw.saturating_add(1))
        .read_to_end(&mut raw)
        .map_err(|e| Error::Decode(e.to_string()))?;
    if raw.len() as u64 != meta_raw {
        return Err(Error::Decode(format!(
            "metadata is {} bytes, header says {meta_raw}",
            raw.len()
        )));
    }
    parse_meta(&raw)
}

/// Parses decompressed metadata. Public for fuzzing: everything before it
/// is guarded by the checksum, so this is what a crafted file reaches.
pub fn parse_meta(raw: &[u8]) -> Result<Index> {
    let (index, rest) = postcard::take_from_bytes::<Index>(raw).map_err(|e| Error::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Decode("trailing bytes after metadata".into()));
    }
    Ok(index)
}

#[cfg(test)]
mod tests;
