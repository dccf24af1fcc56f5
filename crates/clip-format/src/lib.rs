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
//! 40  checksum   32 bytes SHA-256 of bytes 0..40 and of the metadata
//! 72  metadata   zstd(postcard(Index))
//! ..  windows    one zstd frame (with content checksum) per window
//! ```
//!
//! Loading reads and checks the header and the metadata only (a 53 MB
//! index is 99% windows); each checkpoint holds its window's SHA-256, so a
//! window is read, checked and decompressed when a read first needs it.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MAGIC: [u8; 8] = *b"CLIPIDX\0";
/// 2: layers carry pieces of long zstd spans. 3: checkpoints carry their
/// window's digest; the checksum covers the metadata only.
pub const VERSION: u32 = 3;
const HEADER_LEN: usize = 72;
/// The largest metadata section we will decompress: far above any real
/// image, low enough that a hostile header cannot exhaust memory.
const MAX_META_RAW: u64 = 4 << 30;
/// The largest stored window frame: a 32 KiB window, zstd-compressed,
/// with room to spare.
const MAX_WINDOW_FRAME: u32 = 64 << 10;
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
    #[error("window of layer {layer} checkpoint {checkpoint}: {msg}")]
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
    /// SHA-256 of the stored window frame (zeros when there is none); set
    /// by [`IndexFile::new`].
    pub window_digest: [u8; 32],
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

    /// The path of directory `ino` from the root (`a/b`; empty for the
    /// root), found through its parents' entries. None when `ino` is not a
    /// directory, or its parents do not lead to the root.
    pub fn dir_path(&self, ino: u64) -> Option<Vec<u8>> {
        if self.node(ino)?.kind != Kind::Dir {
            return None;
        }
        let mut names: Vec<&[u8]> = Vec::new();
        let mut at = ino;
        while at != ROOT_INO {
            // Deeper than any path the kernel takes: a loop.
            if names.len() > 4096 {
                return None;
            }
            let parent = self.node(self.node(at)?.parent)?;
            names.push(&parent.entries.iter().find(|e| e.ino == at)?.name);
            at = self.node(at)?.parent;
        }
        names.reverse();
        Some(names.join(&b'/'))
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
                    || c.window_len > MAX_WINDOW_FRAME
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

/// Where a loaded index's window section is.
#[derive(Debug)]
enum Windows {
    /// Built or decoded in memory.
    Memory(Vec<u8>),
    /// In the index file, from byte `at`: read a window at a time.
    File { file: std::fs::File, at: u64 },
}

/// A loaded, checked index with its window section.
#[derive(Debug)]
pub struct IndexFile {
    pub index: Index,
    windows: Windows,
    windows_len: u64,
}

/// The checked header: section lengths.
struct Header {
    meta_len: u64,
    meta_raw: u64,
    win_len: u64,
}

impl Header {
    /// Checks magic, version and that the file is `total` bytes long as
    /// the header says (`head` holds at least the header when `total`
    /// allows one).
    fn parse(head: &[u8], total: u64) -> Result<Self> {
        if head.len() < 8 || head[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        if head.len() < HEADER_LEN {
            return Err(Error::Truncated {
                expected: HEADER_LEN as u64,
                got: total,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let h = Header {
            meta_len: u64_at(16),
            meta_raw: u64_at(24),
            win_len: u64_at(32),
        };
        let expected = (HEADER_LEN as u64)
            .checked_add(h.meta_len)
            .and_then(|v| v.checked_add(h.win_len))
            .ok_or(Error::Invalid("section lengths overflow".into()))?;
        if total < expected {
            return Err(Error::Truncated { expected, got: total });
        }
        if total > expected {
            return Err(Error::TrailingData { expected, got: total });
        }
        if h.meta_raw > MAX_META_RAW {
            return Err(Error::Invalid(format!(
                "metadata of {} bytes is implausibly large",
                h.meta_raw
            )));
        }
        Ok(h)
    }

    /// The index its metadata section holds, once the checksum matches.
    fn index(&self, head: &[u8], meta: &[u8]) -> Result<Index> {
        if checksum(&head[..40], meta) != head[40..72] {
            return Err(Error::Checksum);
        }
        let index = decode_meta(meta, self.meta_raw)?;
        index.validate(self.win_len)?;
        Ok(index)
    }
}

impl IndexFile {
    /// An index and its windows; each checkpoint's window digest is taken
    /// from the window section here.
    pub fn new(mut index: Index, windows: WindowWriter) -> Self {
        for l in &mut index.layers {
            for c in &mut l.checkpoints {
                let frame = windows
                    .buf
                    .get(c.window_offset as usize..)
                    .and_then(|w| w.get(..c.window_len as usize))
                    .unwrap_or_default();
                c.window_digest = if c.window_len == 0 {
                    [0; 32]
                } else {
                    Sha256::digest(frame).into()
                };
            }
        }
        Self {
            index,
            windows_len: windows.buf.len() as u64,
            windows: Windows::Memory(windows.buf),
        }
    }

    pub fn windows_len(&self) -> u64 {
        self.windows_len
    }

    /// Encodes the file.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let raw = postcard::to_stdvec(&self.index).map_err(|e| Error::Decode(e.to_string()))?;
        let meta = zstd::bulk::compress(&raw, 3)?;
        let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + self.windows_len as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.windows_len.to_le_bytes());
        let sum = checksum(&out, &meta);
        out.extend_from_slice(&sum);
        out.extend_from_slice(&meta);
        let at = out.len();
        out.resize(at + self.windows_len as usize, 0);
        self.read_windows(0, &mut out[at..])?;
        Ok(out)
    }

    /// Decodes and checks a file in memory: magic, version, length,
    /// checksum, then the metadata and its invariants. Windows are checked
    /// against their digests when read.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let h = Header::parse(bytes, bytes.len() as u64)?;
        let meta = &bytes[HEADER_LEN..HEADER_LEN + h.meta_len as usize];
        let index = h.index(bytes, meta)?;
        Ok(Self {
            index,
            windows_len: h.win_len,
            windows: Windows::Memory(bytes[HEADER_LEN + h.meta_len as usize..].to_vec()),
        })
    }

    /// Loads a file as [`IndexFile::decode`] does, reading only its header
    /// and metadata; the file stays open for the windows.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path)?;
        let total = file.metadata()?.len();
        let mut head = vec![0u8; (HEADER_LEN as u64).min(total) as usize];
        file.read_exact_at(&mut head, 0)?;
        let h = Header::parse(&head, total)?;
        let mut meta = vec![0u8; h.meta_len as usize];
        file.read_exact_at(&mut meta, HEADER_LEN as u64)?;
        let index = h.index(&head, &meta)?;
        Ok(Self {
            index,
            windows_len: h.win_len,
            windows: Windows::File {
                file,
                at: HEADER_LEN as u64 + h.meta_len,
            },
        })
    }

    /// Fills `buf` from the window section at `offset`.
    fn read_windows(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.windows {
            Windows::Memory(w) => {
                let src = w
                    .get(offset as usize..)
                    .and_then(|w| w.get(..buf.len()))
                    .ok_or(Error::Truncated {
                        expected: offset + buf.len() as u64,
                        got: w.len() as u64,
                    })?;
                buf.copy_from_slice(src);
            }
            Windows::File { file, at } => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(buf, at + offset)?;
            }
        }
        Ok(())
    }

    /// The digest of checkpoint `k`'s window in layer `layer`: what
    /// identifies the window without reading it.
    pub fn window_digest(&self, layer: usize, k: usize) -> Option<&[u8; 32]> {
        Some(&self.index.layers.get(layer)?.checkpoints.get(k)?.window_digest)
    }

    /// The decompressed window of checkpoint `k` of layer `layer`, read
    /// and checked against its digest.
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
        let mut frame = vec![0u8; cp.window_len as usize];
        self.read_windows(cp.window_offset, &mut frame)
            .map_err(|e| err(format!("reading it: {e}")))?;
        if Sha256::digest(&frame).as_slice() != cp.window_digest {
            return Err(err("its digest does not match (the index file is corrupted)".into()));
        }
        // A window is at most 32 KiB; the cap keeps a bad frame from
        // allocating more.
        zstd::bulk::decompress(&frame, 32 * 1024).map_err(|e| err(format!("corrupted: {e}")))
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
    let sum = checksum(&head[..40], &rest[..meta_len]);
    head[40..72].copy_from_slice(&sum);
}

fn checksum(header: &[u8], meta: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&header[..40]);
    h.update(meta);
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
