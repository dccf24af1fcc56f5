//! A streaming tar reader that reports where each file's bytes sit in the
//! uncompressed stream, instead of handing out the bytes.
//!
//! It reads ustar, GNU and PAX archives as Go's `archive/tar` does (the
//! reader behind containerd, Docker and umoci): PAX `x` headers, GNU long
//! names (`L`, `K`), all three GNU sparse formats (old `S` headers, PAX 0.0,
//! 0.1 and 1.0), and `SCHILY.xattr.*` records. Every length read from the
//! stream is bounded before it is trusted.

use std::io::BufRead;

use clip_format::Segment;

const BLOCK: usize = 512;
/// Long names, link targets and PAX headers larger than this are hostile.
const MAX_META: u64 = 16 << 20;
/// Sparse maps with more entries than this are hostile.
const MAX_SPARSE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDev,
    BlockDev,
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path as stored (not normalised).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Logical size of a regular file (its real size if sparse).
    pub size: u64,
    /// Symlink or hardlink target.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the file's data starts in the uncompressed stream.
    pub offset: u64,
    /// The data map of a sparse file, with absolute stream offsets.
    pub sparse: Option<Vec<Segment>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the layer")]
    Io(#[from] std::io::Error),
    #[error("bad tar header at byte {offset}: {msg}")]
    Header { offset: u64, msg: String },
    #[error("tar stream ends in the middle of an entry at byte {0}")]
    Truncated(u64),
}

type Result<T> = std::result::Result<T, TarError>;

/// PAX records that apply to the next entry.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse_major: Option<u64>,
    sparse_minor: Option<u64>,
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
    /// PAX 0.0 and 0.1 maps: (offset, numbytes) pairs.
    sparse_map: Vec<(u64, u64)>,
    sparse_offset: Option<u64>,
}

pub struct Walker<R: BufRead> {
    r: R,
    pos: u64,
    done: bool,
    /// Facts learnt from files' bytes as they pass, by where each file's
    /// bytes start; None when not asked for.
    facts: Option<Vec<(u64, clip_guess::Fact)>>,
}

impl<R: BufRead> Walker<R> {
    pub fn new(r: R) -> Self {
        Self {
            r,
            pos: 0,
            done: false,
            facts: None,
        }
    }

    /// Also learns what files say about the start of a process (see
    /// `clip_guess`), from the bytes the walk reads anyway.
    pub fn with_facts(mut self) -> Self {
        self.facts = Some(Vec::new());
        self
    }

    /// The facts learnt so far.
    pub fn take_facts(&mut self) -> Vec<(u64, clip_guess::Fact)> {
        self.facts.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    fn header_err(&self, at: u64, msg: impl Into<String>) -> TarError {
        TarError::Header {
            offset: at,
            msg: msg.into(),
        }
    }

    /// Fills `buf` completely; Ok(false) on a clean end of stream before
    /// the first byte.
    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            let avail = self.r.fill_buf()?;
            if avail.is_empty() {
                if got == 0 {
                    return Ok(false);
                }
                return Err(TarError::Truncated(self.pos));
            }
            let n = avail.len().min(buf.len() - got);
            buf[got..got + n].copy_from_slice(&avail[..n]);
            self.r.consume(n);
            got += n;
            self.pos += n as u64;
        }
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let avail = self.r.fill_buf()?.len();
            if avail == 0 {
                return Err(TarError::Truncated(self.pos));
            }
            let k = (avail as u64).min(n) as usize;
            self.r.consume(k);
            self.pos += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    /// Skips a file's `n` bytes of data, showing them to a probe while it
    /// wants them.
    fn skip_probing(&mut self, mut n: u64, mut probe: clip_guess::Probe) -> Result<Option<clip_guess::Fact>> {
        while n > 0 && probe.wants_more() {
            let avail = self.r.fill_buf()?;
            if avail.is_empty() {
                return Err(TarError::Truncated(self.pos));
            }
            let k = (avail.len() as u64).min(n) as usize;
            probe.feed(&avail[..k]);
            self.r.consume(k);
            self.pos += k as u64;
            n -= k as u64;
        }
        self.skip(n)?;
        Ok(probe.finish())
    }

    fn padding(size: u64) -> u64 {
        (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
    }

    /// Reads an entry's data of `size` bytes (plus padding) into memory.
    fn read_meta(&mut self, size: u64, at: u64) -> Result<Vec<u8>> {
        if size > MAX_META {
            return Err(self.header_err(at, format!("metadata entry of {size} bytes")));
        }
        let mut buf = vec![0; size as usize];
        if !self.read_exact_or_eof(&mut buf)? && size > 0 {
            return Err(TarError::Truncated(self.pos));
        }
        self.skip(Self::padding(size))?;
        Ok(buf)
    }

    /// The next file entry, or None at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        let mut pending = Pending::default();
        let mut gnu_long_name: Option<Vec<u8>> = None;
        let mut gnu_long_link: Option<Vec<u8>> = None;
        loop {
            if self.done {
                return Ok(None);
            }
            let at = self.pos;
            let mut h = [0u8; BLOCK];
            if !self.read_exact_or_eof(&mut h)? {
                self.done = true;
                return Ok(None);
            }
            if h.iter().all(|&b| b == 0) {
                // End of archive: a second zero block, or the end of the
                // stream. Whatever follows (more zeros) is padding.
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&h).map_err(|m| self.header_err(at, m))?;
            let num = |range: std::ops::Range<usize>, what: &str| {
                parse_numeric(&h[range]).map_err(|m| self.header_err(at, format!("{what}: {m}")))
            };
            let typeflag = h[156];
            let size_field = num(124..136, "size")?;
            let size = pending.size.unwrap_or(size_field);
            match typeflag {
                b'x' => {
                    let data = self.read_meta(size_field, at)?;
                    parse_pax(&data, &mut pending).map_err(|m| self.header_err(at, m))?;
                    continue;
                }
                b'g' => {
                    // Global PAX headers: Go's reader does not apply them to
                    // entries, and neither do we.
                    self.read_meta(size_field, at)?;
                    continue;
                }
                b'L' => {
                    gnu_long_name = Some(cstr(&self.read_meta(size_field, at)?).to_vec());
                    continue;
                }
                b'K' => {
                    gnu_long_link = Some(cstr(&self.read_meta(size_field, at)?).to_vec());
                    continue;
                }
                b'V' | b'N' => {
                    // Volume labels and old GNU rename records name no file.
                    self.skip(size_field + Self::padding(size_field))?;
                    continue;
                }
                b'M' => return Err(self.header_err(at, "multi-volume archives are not supported")),
                _ => {}
            }
            let kind = match typeflag {
                b'0' | 0 | b'7' | b'S' => EntryKind::File,
                b'1' => EntryKind::Hardlink,
                b'2' => EntryKind::Symlink,
                b'3' => EntryKind::CharDev,
                b'4' => EntryKind::BlockDev,
                b'5' | b'D' => EntryKind::Dir,
                b'6' => EntryKind::Fifo,
                other => {
                    // Unknown types carry data like a file (POSIX says to
                    // treat them as regular files); we skip them instead so
                    // that nothing unexpected lands in the tree.
                    tracing::warn!(offset = at, typeflag = other, "skipping tar entry of unknown type");
                    self.skip(size + Self::padding(size))?;
                    pending = Pending::default();
                    gnu_long_name = None;
                    gnu_long_link = None;
                    continue;
                }
            };
            let ustar = &h[257..263] == b"ustar\0";
            let mut path = cstr(&h[0..100]).to_vec();
            if ustar && h[345] != 0 {
                let mut p = cstr(&h[345..500]).to_vec();
                p.push(b'/');
                p.extend_from_slice(&path);
                path = p;
            }
            if let Some(p) = gnu_long_name.take() {
                path = p;
            }
            if let Some(p) = pending.path.take() {
                path = p;
            }
            let mut link = cstr(&h[157..257]).to_vec();
            if let Some(l) = gnu_long_link.take() {
                link = l;
            }
            if let Some(l) = pending.link.take() {
                link = l;
            }
            let to_u32 = |v: u64, what: &str| {
                u32::try_from(v).map_err(|_| self.header_err(at, format!("{what} {v} does not fit in 32 bits")))
            };
            let uid = to_u32(pending.uid.map_or_else(|| num(108..116, "uid"), Ok)?, "uid")?;
            let gid = to_u32(pending.gid.map_or_else(|| num(116..124, "gid"), Ok)?, "gid")?;
            let (mtime, mtime_nsec) = match pending.mtime {
                Some(t) => t,
                None => (
                    parse_signed(&h[136..148]).map_err(|m| self.header_err(at, format!("mtime: {m}")))?,
                    0,
                ),
            };
            let mode = (num(100..108, "mode")? & 0o7777) as u32;
            let (dev_major, dev_minor) = if matches!(kind, EntryKind::CharDev | EntryKind::BlockDev) {
                (
                    to_u32(num(329..337, "devmajor")?, "devmajor")?,
                    to_u32(num(337..345, "devminor")?, "devminor")?,
                )
            } else {
                (0, 0)
            };
            let has_data = kind == EntryKind::File;
            let stored = if has_data { size } else { 0 };
            let mut entry = Entry {
                path,
                kind,
                mode,
                uid,
                gid,
                mtime,
                mtime_nsec,
                size: stored,
                link,
                dev_major,
                dev_minor,
                xattrs: std::mem::take(&mut pending.xattrs),
                offset: 0,
                sparse: None,
            };
            if typeflag == b'S' {
                let (map, realsize) = self.gnu_sparse_map(&h, at)?;
                entry.offset = self.pos;
                entry.sparse = Some(self.place_segments(&map, entry.offset, stored, realsize, at)?);
                entry.size = realsize;
                self.skip(stored + Self::padding(stored))?;
            } else if has_data && (pending.sparse_major.is_some() || !pending.sparse_map.is_empty()) {
                if let Some(name) = pending.sparse_name.take() {
                    entry.path = name;
                }
                let realsize = pending
                    .sparse_realsize
                    .ok_or_else(|| self.header_err(at, "sparse file without a real size"))?;
                let data_start = self.pos;
                let (map, map_len) = if pending.sparse_major == Some(1) && pending.sparse_minor == Some(0) {
                    self.pax1_sparse_map(stored, at)?
                } else {
                    (std::mem::take(&mut pending.sparse_map), 0)
                };
                entry.offset = data_start + map_len;
                entry.sparse = Some(self.place_segments(&map, entry.offset, stored - map_len, realsize, at)?);
                entry.size = realsize;
                let rest = stored - map_len;
                self.skip(rest + Self::padding(stored))?;
            } else {
                entry.offset = self.pos;
                let probe = match (&self.facts, has_data) {
                    (Some(_), true) => clip_guess::Probe::for_file(&entry.path, stored),
                    _ => None,
                };
                match probe {
                    Some(p) => {
                        let fact = self.skip_probing(stored, p)?;
                        // Kept only with its entry: a stream cut in the
                        // padding returns neither.
                        self.skip(Self::padding(stored))?;
                        if let (Some(f), Some(facts)) = (fact, &mut self.facts) {
                            facts.push((entry.offset, f));
                        }
                    }
                    None => self.skip(stored + Self::padding(stored))?,
                }
            }
            return Ok(Some(entry));
        }
    }

    /// Old GNU sparse map: four slots in the header, then extension blocks.
    fn gnu_sparse_map(&mut self, h: &[u8; BLOCK], at: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let realsize = parse_numeric(&h[483..495]).map_err(|m| self.header_err(at, format!("realsize: {m}")))?;
        let mut map = Vec::new();
        let read_slots = |block: &[u8], slots: usize, map: &mut Vec<(u64, u64)>| -> std::result::Result<(), String> {
            for i in 0..slots {
                let s = &block[i * 24..i * 24 + 24];
                if s.iter().all(|&b| b == 0) {
                    break;
                }
                map.push((parse_numeric(&s[..12])?, parse_numeric(&s[12..])?));
            }
            Ok(())
        };
        read_slots(&h[386..482], 4, &mut map).map_err(|m| self.header_err(at, m))?;
        let mut extended = h[482] != 0;
        while extended {
            let mut ext = [0u8; BLOCK];
            if !self.read_exact_or_eof(&mut ext)? {
                return Err(TarError::Truncated(self.pos));
            }
            read_slots(&ext[..504], 21, &mut map).map_err(|m| self.header_err(at, m))?;
            if map.len() > MAX_SPARSE {
                return Err(self.header_err(at, "sparse map too large"));
            }
            extended = ext[504] != 0;
        }
        Ok((map, realsize))
    }

    /// PAX 1.0 sparse map: decimal lines at the start of the data.
    fn pax1_sparse_map(&mut self, stored: u64, at: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let start = self.pos;
        let mut block = Vec::new();
        let mut numbers = Vec::new();
        let mut wanted: Option<u64> = None;
        let mut cur = Vec::new();
        loop {
            if block.is_empty() {
                if self.pos - start >= stored {
                    return Err(self.header_err(at, "sparse map runs past the entry"));
                }
                let mut b = [0u8; BLOCK];
                if !self.read_exact_or_eof(&mut b)? {
                    return Err(TarError::Truncated(self.pos));
                }
                block = b.to_vec();
                block.reverse();
            }
            let c = block.pop().expect("non-empty");
            if c != b'\n' {
                if !c.is_ascii_digit() || cur.len() > 20 {
                    return Err(self.header_err(at, "bad sparse map"));
                }
                cur.push(c);
                continue;
            }
            let v: u64 = std::str::from_utf8(&cur)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| self.header_err(at, "bad sparse map number"))?;
            cur.clear();
            match wanted {
                None => {
                    if v as usize > MAX_SPARSE {
                        return Err(self.header_err(at, "sparse map too large"));
                    }
                    wanted = Some(v * 2);
                }
                Some(_) => numbers.push(v),
            }
            if wanted == Some(numbers.len() as u64) {
                break;
            }
        }
        // The map is padded to a block boundary; `block` holds the rest.
        let map_len = self.pos - start;
        if map_len > stored {
            return Err(self.header_err(at, "sparse map runs past the entry"));
        }
        Ok((numbers.chunks(2).map(|p| (p[0], p[1])).collect(), map_len))
    }

    /// Turns (logical offset, length) pairs into segments with stream
    /// offsets, checking that they are ordered, inside the real size and
    /// exactly cover the stored bytes.
    fn place_segments(
        &self,
        map: &[(u64, u64)],
        data_start: u64,
        stored: u64,
        realsize: u64,
        at: u64,
    ) -> Result<Vec<Segment>> {
        let mut segs = Vec::with_capacity(map.len());
        let mut logical_end = 0u64;
        let mut stream = 0u64;
        for &(logical, len) in map {
            let end = logical
                .checked_add(len)
                .filter(|&e| e <= realsize && logical >= logical_end);
            let Some(end) = end else {
                return Err(self.header_err(at, "sparse map out of order or past the file's end"));
            };
            if len > 0 {
                segs.push(Segment {
                    logical,
                    len,
                    offset: data_start + stream,
                });
            }
            stream += len;
            logical_end = end;
        }
        if stream != stored {
            return Err(self.header_err(at, format!("sparse map covers {stream} bytes but {stored} are stored")));
        }
        Ok(segs)
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

fn verify_checksum(h: &[u8; BLOCK]) -> std::result::Result<(), String> {
    let stored = parse_numeric(&h[148..156])?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err("header checksum mismatch".into())
    }
}

/// A non-negative numeric field (sizes, ids, device numbers, the checksum).
fn parse_numeric(field: &[u8]) -> std::result::Result<u64, String> {
    let v = parse_signed(field)?;
    u64::try_from(v).map_err(|_| format!("negative number {v}"))
}

/// A numeric field as Go's `archive/tar` reads it (the reader behind
/// containerd and umoci): GNU base-256 (two's complement, big-endian, so
/// negative values such as pre-1970 mtimes are allowed), or octal ASCII
/// with leading and trailing spaces or NULs, cut at the first NUL.
fn parse_signed(field: &[u8]) -> std::result::Result<i64, String> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // -a-1 == !a: invert a negative number's bytes and read it unsigned.
        let inv = if field[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &b) in field.iter().enumerate() {
            let mut c = b ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return Err("base-256 number too large".into());
            }
            x = (x << 8) | u64::from(c);
        }
        if x >> 63 != 0 {
            return Err("base-256 number too large".into());
        }
        let x = x as i64;
        return Ok(if inv == 0xff { !x } else { x });
    }
    let trimmed = {
        let start = field.iter().position(|&b| b != b' ' && b != 0).unwrap_or(field.len());
        let end = field
            .iter()
            .rposition(|&b| b != b' ' && b != 0)
            .map_or(start, |e| e + 1);
        &field[start..end.max(start)]
    };
    let digits = cstr(trimmed);
    if digits.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for &b in digits {
        match b {
            b'0'..=b'7' => {
                v = v
                    .checked_mul(8)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    .ok_or("octal number too large")?;
            }
            _ => return Err(format!("invalid octal digit {b:#04x}")),
        }
    }
    i64::try_from(v).map_err(|_| "octal number too large".into())
}

fn parse_decimal(v: &[u8]) -> std::result::Result<u64, String> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad number {:?}", String::from_utf8_lossy(v)))
}

/// `[-]SECONDS[.FRACTION]`
fn parse_pax_time(v: &[u8]) -> std::result::Result<(i64, u32), String> {
    let s = std::str::from_utf8(v).map_err(|_| "bad time")?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().map_err(|_| format!("bad time {s:?}"))?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad time {s:?}"));
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().map_err(|_| "bad time")?;
    if neg {
        // -1.25 is 1.25 seconds before the epoch: (-2, 0.75).
        if nsec == 0 {
            Ok((-secs, 0))
        } else {
            Ok((-secs - 1, 1_000_000_000 - nsec))
        }
    } else {
        Ok((secs, nsec))
    }
}

/// Parses `LEN KEY=VALUE\n` records.
fn parse_pax(mut data: &[u8], p: &mut Pending) -> std::result::Result<(), String> {
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without length")?;
        let len = parse_decimal(&data[..sp])? as usize;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("bad PAX record length".into());
        }
        let rec = &data[sp + 1..len - 1];
        data = &data[len..];
        let eq = rec.iter().position(|&b| b == b'=').ok_or("PAX record without '='")?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        match key {
            b"path" => p.path = Some(value.to_vec()),
            b"linkpath" => p.link = Some(value.to_vec()),
            b"size" => p.size = Some(parse_decimal(value)?),
            b"uid" => p.uid = Some(parse_decimal(value)?),
            b"gid" => p.gid = Some(parse_decimal(value)?),
            b"mtime" => p.mtime = Some(parse_pax_time(value)?),
            b"GNU.sparse.major" => p.sparse_major = Some(parse_decimal(value)?),
            b"GNU.sparse.minor" => p.sparse_minor = Some(parse_decimal(value)?),
            b"GNU.sparse.name" => p.sparse_name = Some(value.to_vec()),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => p.sparse_realsize = Some(parse_decimal(value)?),
            b"GNU.sparse.offset" => p.sparse_offset = Some(parse_decimal(value)?),
            b"GNU.sparse.numbytes" => {
                let off = p.sparse_offset.take().ok_or("GNU.sparse.numbytes without offset")?;
                p.sparse_map.push((off, parse_decimal(value)?));
            }
            b"GNU.sparse.map" => {
                let nums = value
                    .split(|&b| b == b',')
                    .filter(|s| !s.is_empty())
                    .map(parse_decimal)
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                if nums.len() % 2 != 0 || nums.len() / 2 > MAX_SPARSE {
                    return Err("bad GNU.sparse.map".into());
                }
                p.sparse_map = nums.chunks(2).map(|c| (c[0], c[1])).collect();
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if !name.is_empty() {
                        p.xattrs.retain(|(k, _)| k != name);
                        p.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_numeric(b"0000644\0").unwrap(), 0o644);
        assert_eq!(parse_numeric(b"  755 \0").unwrap(), 0o755);
        assert_eq!(parse_numeric(b"\0\0\0\0").unwrap(), 0);
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap(),
            1 << 32
        );
        assert!(parse_numeric(b"0009").is_err());
        assert!(parse_numeric(&[0xff; 12]).is_err());
        assert!(parse_numeric(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        // GNU tar's base-256 for dates before 1970: two's complement.
        let mut neg = [0xffu8; 12];
        neg[11] = 0xfe; // -2
        assert_eq!(parse_signed(&neg).unwrap(), -2);
        let mut neg = [0xffu8; 12];
        neg[8..].copy_from_slice(&(-86_400i64 * 365).to_be_bytes()[4..]);
        assert_eq!(parse_signed(&neg).unwrap(), -86_400 * 365);
        assert_eq!(parse_signed(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]).unwrap(), 7);
        assert!(parse_numeric(&neg).is_err(), "sizes and ids are never negative");
        // Octal as writers emit it: zero-padded, space- or NUL-terminated,
        // leading spaces (old tars), or all NULs.
        for f in [&b"00000000017\0"[..], b"          17", b"17 \0\0\0", b" 17\0 "] {
            assert_eq!(parse_signed(f).unwrap(), 0o17, "{f:?}");
        }
        assert!(parse_signed(b"1 7").is_err());
        assert_eq!(parse_pax_time(b"1700000000.5").unwrap(), (1_700_000_000, 500_000_000));
        assert_eq!(parse_pax_time(b"-1.25").unwrap(), (-2, 750_000_000));
        assert_eq!(parse_pax_time(b"12").unwrap(), (12, 0));
        assert!(parse_pax_time(b"1.x").is_err());
    }

    /// A ustar header block with a valid checksum.
    pub(crate) fn header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        if size < 1 << 33 {
            h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        } else {
            h[124] = 0x80;
            h[128..136].copy_from_slice(&size.to_be_bytes());
        }
        h[136..148].copy_from_slice(b"14000000000\0");
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        fix_checksum(&mut h);
        h
    }

    pub(crate) fn fix_checksum(h: &mut [u8; BLOCK]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    /// An archive of (header, data) pairs, data padded, two zero blocks.
    pub(crate) fn archive(entries: &[([u8; BLOCK], Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (h, data) in entries {
            out.extend_from_slice(h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        out.extend_from_slice(&[0u8; 2 * BLOCK]);
        out
    }

    fn walk(bytes: &[u8]) -> Result<Vec<Entry>> {
        let mut w = Walker::new(bytes);
        let mut v = Vec::new();
        while let Some(e) = w.next_entry()? {
            v.push(e);
        }
        Ok(v)
    }

    fn pax(records: &[(&str, &[u8])]) -> ([u8; BLOCK], Vec<u8>) {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = k.len() + v.len() + 3;
            let mut len = body_len + 1;
            while format!("{len}").len() + body_len != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        (header(b"PaxHeader", b'x', data.len() as u64, b""), data)
    }

    #[test]
    fn offsets_and_kinds() {
        let a = archive(&[
            (header(b"dir/", b'5', 0, b""), vec![]),
            (header(b"dir/file", b'0', 5, b""), b"hello".to_vec()),
            (header(b"dir/link", b'1', 0, b"dir/file"), vec![]),
            (header(b"dir/sym", b'2', 0, b"file"), vec![]),
            (header(b"dir/empty", 0, 0, b""), vec![]),
        ]);
        let v = walk(&a).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v[1].offset, 3 * 512 - 512);
        assert_eq!(&a[v[1].offset as usize..v[1].offset as usize + 5], b"hello");
        assert_eq!(v[2].kind, EntryKind::Hardlink);
        assert_eq!(v[2].link, b"dir/file");
        assert_eq!(v[3].kind, EntryKind::Symlink);
        assert_eq!(v[4].kind, EntryKind::File);
        assert_eq!(v[1].mtime, 0o14000000000);
    }

    #[test]
    fn pax_overrides_and_long_names() {
        let long = vec![b'n'; 300];
        let (ph, pd) = pax(&[
            ("path", &long),
            ("size", b"3"),
            ("mtime", b"5.5"),
            ("uid", b"4294967295"),
        ]);
        let mut gnu = header(b"././@LongLink", b'L', 11, b"");
        fix_checksum(&mut gnu);
        let a = archive(&[
            (ph, pd),
            (header(b"short", b'0', 0, b""), b"abc".to_vec()),
            (gnu, b"gnu/long/n\0".to_vec()),
            (header(b"ignored", b'0', 1, b""), b"x".to_vec()),
        ]);
        let v = walk(&a).unwrap();
        assert_eq!(v[0].path, long);
        assert_eq!(v[0].size, 3);
        assert_eq!((v[0].mtime, v[0].mtime_nsec), (5, 500_000_000));
        assert_eq!(v[0].uid, u32::MAX);
        assert_eq!(v[1].path, b"gnu/long/n");
        assert_eq!(&a[v[1].offset as usize..v[1].offset as usize + 1], b"x");
    }

    #[test]
    fn hostile_archives_are_errors_not_panics() {
        // Bad checksum.
        let mut h = header(b"f", b'0', 0, b"");
        h[0] = b'g';
        assert!(matches!(walk(&archive(&[(h, vec![])])), Err(TarError::Header { .. })));
        // A size far past the end of the stream.
        let h = header(b"f", b'0', 0o77777777777, b"");
        assert!(matches!(walk(&archive(&[(h, vec![])])), Err(TarError::Truncated(_))));
        // Base-256 size of 2^62: still just truncated, no overflow.
        let mut h = header(b"f", b'0', 0, b"");
        h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        fix_checksum(&mut h);
        assert!(walk(&archive(&[(h, vec![])])).is_err());
        // Huge PAX header, huge long name.
        let h = header(b"p", b'x', 1 << 40, b"");
        assert!(matches!(walk(&archive(&[(h, vec![])])), Err(TarError::Header { .. })));
        let h = header(b"l", b'L', MAX_META + 1, b"");
        assert!(matches!(walk(&archive(&[(h, vec![])])), Err(TarError::Header { .. })));
        // Bad PAX records.
        let (ph, _) = pax(&[("path", b"x")]);
        assert!(walk(&archive(&[(ph, b"999 path=x\n".to_vec())])).is_err());
        // uid that does not fit, negative base-256.
        let (ph, pd) = pax(&[("uid", b"4294967296")]);
        assert!(walk(&archive(&[(ph, pd), (header(b"f", b'0', 0, b""), vec![])])).is_err());
        let mut h = header(b"f", b'0', 0, b"");
        h[108..116].copy_from_slice(&[0xff; 8]);
        fix_checksum(&mut h);
        assert!(walk(&archive(&[(h, vec![])])).is_err());
        // A stream cut inside a header.
        let a = archive(&[(header(b"f", b'0', 0, b""), vec![])]);
        assert!(matches!(walk(&a[..100]), Err(TarError::Truncated(_))));
        // Sparse maps out of order or covering more than is stored.
        let (ph, pd) = pax(&[
            ("GNU.sparse.major", b"0"),
            ("GNU.sparse.minor", b"1"),
            ("GNU.sparse.map", b"100,10,50,10"),
            ("GNU.sparse.realsize", b"1000"),
        ]);
        assert!(walk(&archive(&[(ph, pd), (header(b"s", b'0', 20, b""), vec![0; 20])])).is_err());
        let (ph, pd) = pax(&[("GNU.sparse.map", b"0,10"), ("GNU.sparse.realsize", b"5")]);
        assert!(walk(&archive(&[(ph, pd), (header(b"s", b'0', 10, b""), vec![0; 10])])).is_err());
        // An end of stream exactly between entries is a clean end.
        let a = archive(&[(header(b"f", b'0', 0, b""), vec![])]);
        assert_eq!(walk(&a[..512]).unwrap().len(), 1);
        assert_eq!(walk(b"").unwrap().len(), 0);
    }

    #[test]
    fn pax_sparse_formats() {
        // 0.1: map in a record.
        let (ph, pd) = pax(&[
            ("GNU.sparse.major", b"0"),
            ("GNU.sparse.minor", b"1"),
            ("GNU.sparse.name", b"real/name"),
            ("GNU.sparse.map", b"10,3,100,2"),
            ("GNU.sparse.realsize", b"200"),
        ]);
        let a = archive(&[
            (ph, pd),
            (header(b"GNUSparseFile.0/name", b'0', 5, b""), b"abcde".to_vec()),
        ]);
        let v = walk(&a).unwrap();
        assert_eq!(v[0].path, b"real/name");
        assert_eq!(v[0].size, 200);
        let segs = v[0].sparse.as_ref().unwrap();
        assert_eq!((segs[0].logical, segs[0].len), (10, 3));
        assert_eq!(
            (segs[1].logical, segs[1].len, segs[1].offset),
            (100, 2, v[0].offset + 3)
        );
        // 1.0: map at the start of the data, padded to a block.
        let (ph, pd) = pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"one"),
            ("GNU.sparse.realsize", b"4096"),
        ]);
        let mut data = b"2\n0\n3\n4000\n2\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"xyzuv");
        let a = archive(&[(ph, pd), (header(b"x", b'0', data.len() as u64, b""), data)]);
        let v = walk(&a).unwrap();
        let segs = v[0].sparse.as_ref().unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(&a[segs[0].offset as usize..segs[0].offset as usize + 3], b"xyz");
        assert_eq!(&a[segs[1].offset as usize..segs[1].offset as usize + 2], b"uv");
        // 0.0: offset/numbytes record pairs.
        let (ph, pd) = pax(&[
            ("GNU.sparse.size", b"50"),
            ("GNU.sparse.numblocks", b"1"),
            ("GNU.sparse.offset", b"40"),
            ("GNU.sparse.numbytes", b"4"),
        ]);
        let v = walk(&archive(&[(ph, pd), (header(b"z", b'0', 4, b""), b"data".to_vec())])).unwrap();
        assert_eq!(v[0].size, 50);
        assert_eq!(v[0].sparse.as_ref().unwrap()[0].logical, 40);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 1u64;
        let base = archive(&[
            (header(b"dir/", b'5', 0, b""), vec![]),
            (header(b"dir/file", b'0', 700, b""), vec![7; 700]),
            (header(b"dir/sparse", b'S', 0, b""), vec![]),
        ]);
        for _ in 0..3000 {
            let mut a = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % a.len();
                a[i] = (x >> 32) as u8;
            }
            let _ = walk(&a);
        }
    }

    #[test]
    fn pax_records() {
        let mut p = Pending::default();
        let xattr = b"SCHILY.xattr.security.capability=\x01\x00\x00\x02\n";
        let rec = format!("{} ", xattr.len() + 3);
        let mut data = rec.into_bytes();
        data.extend_from_slice(xattr);
        data.extend_from_slice(b"20 path=a/long/name\n");
        parse_pax(&data, &mut p).unwrap();
        assert_eq!(p.path.as_deref(), Some(&b"a/long/name"[..]));
        assert_eq!(
            p.xattrs,
            vec![(b"security.capability".to_vec(), b"\x01\x00\x00\x02".to_vec())]
        );
        assert!(parse_pax(b"99 path=x\n", &mut Pending::default()).is_err());
        assert!(parse_pax(b"5 a\n", &mut Pending::default()).is_err());
        assert!(parse_pax(b"x path=x\n", &mut Pending::default()).is_err());
    }

    #[test]
    fn facts_come_with_their_entries_only() {
        let src = b"import os\n".to_vec();
        let a = archive(&[(header(b"m.py", b'0', src.len() as u64, b""), src.clone())]);
        let mut w = Walker::new(&a[..]).with_facts();
        let e = w.next_entry().unwrap().unwrap();
        assert_eq!(w.next_entry().unwrap(), None);
        let facts = w.take_facts();
        assert_eq!(facts.len(), 1);
        assert_eq!(facts[0].0, e.offset);
        // Cut in the file's padding: an error, and no fact for it.
        let cut = &a[..BLOCK + src.len() + 3];
        let mut w = Walker::new(cut).with_facts();
        assert!(w.next_entry().is_err());
        assert!(w.take_facts().is_empty());
    }
}
