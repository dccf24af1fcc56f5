//! What the dynamic loader reads of an ELF object, learnt from the object
//! as it streams past the indexer once: its interpreter, the libraries it
//! needs and where it looks for them, and the byte ranges the loader
//! touches to relocate it (symbols, strings, hash tables, relocations, and
//! the writable pages they write). The stream is read once and in order,
//! so a table is kept only if its place is known before it passes: the
//! headers at the start say where the dynamic section and the section
//! headers are, and the dynamic section where its strings are.

use serde::{Deserialize, Serialize};

/// What one ELF object needs at load time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElfFact {
    /// `PT_INTERP` (executables).
    pub interp: Option<String>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH`, else `DT_RPATH`, split at `:` (may hold `$ORIGIN`).
    pub runpath: Vec<String>,
    /// Whether `runpath` came from `DT_RPATH` (which its dependencies
    /// inherit) rather than `DT_RUNPATH` (which they do not).
    pub rpath: bool,
    /// (file offset, length) ranges the loader reads, sorted.
    pub ranges: Vec<(u64, u64)>,
    /// Strings that look like module names (`a.b`), for Python
    /// extension modules: the modules they import at load time are named
    /// in their string constants.
    pub names: Vec<String>,
}

/// Bytes of an object's start kept to find its headers and, in the usual
/// layout, its dynamic strings (which sit in the first segment).
const PREFIX_CAP: u64 = 16 << 20;
/// The largest dynamic section or section header table kept.
const TABLE_CAP: u64 = 1 << 20;
/// The largest dynamic string table kept when it comes after the dynamic
/// section (as `patchelf` leaves it).
const STRTAB_CAP: u64 = 16 << 20;
/// The largest single range a guess takes from one section.
const RANGE_CAP: u64 = 64 << 20;
/// A writable section up to this size is taken whole; past it, only the
/// pages relocation writes.
const WHOLE_WRITABLE: u64 = 256 << 10;
/// Relocated pages this close are read as one range.
const MERGE_GAP: u64 = 64 << 10;
const PAGE: u64 = 4096;
/// The most relocated pages noted per object (8 MiB of page numbers; a
/// large library writes tens of thousands).
const MAX_PAGES: usize = 1 << 20;
/// The most relocation entries read per object (`libtorch_cpu.so` has
/// 285,000).
const MAX_ENTRIES: usize = 1 << 22;
/// The most names kept per extension module.
const MAX_NAMES: usize = 4096;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: i64 = 1;
const DT_STRTAB: i64 = 5;
const DT_STRSZ: i64 = 10;
const DT_RPATH: i64 = 15;
const DT_RUNPATH: i64 = 29;
const SHF_WRITE: u64 = 1;
const SHF_ALLOC: u64 = 2;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o.checked_add(2)?)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o.checked_add(4)?)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o.checked_add(8)?)?.try_into().ok()?))
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

#[derive(Debug, Clone, Copy)]
struct Section {
    kind: u32,
    flags: u64,
    offset: u64,
    size: u64,
}

/// A range of the file kept as it passes.
#[derive(Debug)]
struct Capture {
    what: Table,
    offset: u64,
    len: u64,
    data: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Dynamic,
    Sections,
    Strings,
}

/// Streams one file's bytes; says at the end what the loader needs of it
/// if it is an ELF object (64-bit, little-endian).
#[derive(Debug)]
pub struct ElfProbe {
    size: u64,
    pos: u64,
    head: Vec<u8>,
    /// How much of the start to keep (grows once the headers are read).
    keep: u64,
    parsed: bool,
    dead: bool,
    segments: Vec<Segment>,
    shoff: u64,
    shnum: u64,
    captures: Vec<Capture>,
    names: Option<NameScan>,
}

impl ElfProbe {
    /// `scan_names`: also collect module-like strings (Python extension
    /// modules).
    pub fn new(size: u64, scan_names: bool) -> Self {
        Self {
            size,
            pos: 0,
            head: Vec::new(),
            keep: size.min(4096),
            parsed: false,
            dead: size < 64,
            segments: Vec::new(),
            shoff: 0,
            shnum: 0,
            captures: Vec::new(),
            names: scan_names.then(NameScan::default),
        }
    }

    /// Whether the bytes seen so far rule out an ELF object.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.dead {
            return;
        }
        let start = self.pos;
        let end = start + chunk.len() as u64;
        self.fill_head(chunk, start);
        if !self.parsed && self.head.len() as u64 >= self.keep.min(4096) {
            // The headers say how much more of the start to keep, and what
            // to catch later; this chunk may already hold some of it.
            self.parse_headers();
            if self.dead {
                return;
            }
            self.fill_head(chunk, start);
        }
        self.fill_captures(chunk, start);
        if let Some(n) = &mut self.names {
            n.feed(chunk);
        }
        // The dynamic section, once whole, says where its strings are; keep
        // them too if they are still to come.
        let dynamic_done = self
            .captures
            .iter()
            .find(|c| c.what == Table::Dynamic)
            .is_some_and(|c| c.data.len() as u64 == c.len);
        if dynamic_done && !self.captures.iter().any(|c| c.what == Table::Strings) {
            if let Some((off, len)) = self.strtab() {
                // Header values are untrusted: a table past the file's end
                // is not caught.
                let len = len.min(STRTAB_CAP);
                if off >= start && off.saturating_add(len) > self.keep && off.saturating_add(len) <= self.size {
                    self.captures.push(Capture {
                        what: Table::Strings,
                        offset: off,
                        len,
                        data: Vec::new(),
                    });
                    // `patchelf` puts the strings right after the dynamic
                    // section: this very chunk may hold their start.
                    self.fill_captures(chunk, start);
                } else {
                    // Kept in the head, or passed: nothing to add. Mark it
                    // so this is not worked out again.
                    self.captures.push(Capture {
                        what: Table::Strings,
                        offset: 0,
                        len: 0,
                        data: Vec::new(),
                    });
                }
            }
        }
        self.pos = end;
    }

    /// Extends each capture with the part of `chunk` (at `start`) that
    /// follows what it holds.
    fn fill_captures(&mut self, chunk: &[u8], start: u64) {
        let end = start + chunk.len() as u64;
        for c in &mut self.captures {
            let have = c.offset + c.data.len() as u64;
            if have < c.offset + c.len && have >= start && have < end {
                let upto = (c.offset + c.len).min(end);
                c.data
                    .extend_from_slice(&chunk[(have - start) as usize..(upto - start) as usize]);
            }
        }
    }

    /// Keeps the part of `chunk` (at `start`) that extends the head.
    fn fill_head(&mut self, chunk: &[u8], start: u64) {
        let have = self.head.len() as u64;
        let end = start + chunk.len() as u64;
        if have >= start && have < self.keep && have < end {
            let upto = self.keep.min(end);
            self.head
                .extend_from_slice(&chunk[(have - start) as usize..(upto - start) as usize]);
        }
    }

    fn parse_headers(&mut self) {
        self.parsed = true;
        let h = &self.head;
        if h.len() < 64 || &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
            self.dead = true;
            return;
        }
        let (Some(phoff), Some(shoff), Some(phentsize), Some(phnum), Some(shentsize), Some(shnum)) = (
            u64_at(h, 32),
            u64_at(h, 40),
            u16_at(h, 54),
            u16_at(h, 56),
            u16_at(h, 58),
            u16_at(h, 60),
        ) else {
            self.dead = true;
            return;
        };
        if phentsize != 56 {
            self.dead = true;
            return;
        }
        for i in 0..phnum as u64 {
            let o = phoff.saturating_add(i * 56);
            let Ok(o) = usize::try_from(o) else { break };
            let (Some(kind), Some(flags), Some(offset), Some(vaddr), Some(filesz), Some(memsz)) = (
                u32_at(h, o),
                u32_at(h, o + 4),
                u64_at(h, o + 8),
                u64_at(h, o + 16),
                u64_at(h, o + 32),
                u64_at(h, o + 40),
            ) else {
                break;
            };
            self.segments.push(Segment {
                kind,
                flags,
                offset,
                vaddr,
                filesz,
                memsz,
            });
        }
        // The first segment holds the dynamic symbols and strings in the
        // usual layout.
        let first = self
            .segments
            .iter()
            .find(|s| s.kind == PT_LOAD && s.offset == 0)
            .map_or(0, |s| s.filesz);
        self.keep = self.size.min(first.clamp(4096, PREFIX_CAP));
        let mut add = |what, offset: u64, len: u64, pos: u64| {
            if len > 0 && len <= TABLE_CAP && offset >= pos && offset.saturating_add(len) <= self.size {
                self.captures.push(Capture {
                    what,
                    offset,
                    len,
                    data: Vec::new(),
                });
            }
        };
        if let Some(d) = self.segments.iter().find(|s| s.kind == PT_DYNAMIC) {
            if d.offset.saturating_add(d.filesz) > self.keep {
                add(Table::Dynamic, d.offset, d.filesz, self.pos);
            }
        }
        if shentsize == 64 && shnum > 0 {
            self.shoff = shoff;
            self.shnum = shnum as u64;
            add(Table::Sections, shoff, shnum as u64 * 64, self.pos);
        }
    }

    /// Bytes at `[off, off+len)` if the head or a capture holds them.
    fn bytes(&self, off: u64, len: u64) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if end <= self.head.len() as u64 {
            return self.head.get(off as usize..end as usize);
        }
        self.captures.iter().find_map(|c| {
            (off >= c.offset && end <= c.offset + c.data.len() as u64)
                .then(|| &c.data[(off - c.offset) as usize..(end - c.offset) as usize])
        })
    }

    fn dynamic(&self) -> Vec<(i64, u64)> {
        let Some(d) = self.segments.iter().find(|s| s.kind == PT_DYNAMIC) else {
            return Vec::new();
        };
        let Some(b) = self.bytes(d.offset, d.filesz.min(TABLE_CAP)) else {
            return Vec::new();
        };
        b.chunks_exact(16)
            .map(|e| (u64_at(e, 0).unwrap_or(0) as i64, u64_at(e, 8).unwrap_or(0)))
            .take_while(|&(t, _)| t != 0)
            .collect()
    }

    /// A virtual address's place in the file.
    fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.kind == PT_LOAD && vaddr >= s.vaddr && vaddr < s.vaddr.saturating_add(s.filesz))
            .and_then(|s| (vaddr - s.vaddr).checked_add(s.offset))
    }

    fn strtab(&self) -> Option<(u64, u64)> {
        let d = self.dynamic();
        let va = d.iter().find(|e| e.0 == DT_STRTAB)?.1;
        let size = d.iter().find(|e| e.0 == DT_STRSZ)?.1;
        Some((self.file_offset(va)?, size))
    }

    fn string(&self, strtab: (u64, u64), at: u64) -> Option<String> {
        if at >= strtab.1 {
            return None;
        }
        let rest = strtab.1 - at;
        let b = self.bytes(strtab.0.checked_add(at)?, rest.min(4096))?;
        let s = &b[..b.iter().position(|&c| c == 0)?];
        (!s.is_empty()).then(|| String::from_utf8_lossy(s).into_owned())
    }

    /// The section headers, if they were kept.
    fn sections(&self) -> Vec<Section> {
        let Some(sh) = self.bytes(self.shoff, self.shnum * 64) else {
            return Vec::new();
        };
        sh.chunks_exact(64)
            .map(|s| Section {
                kind: u32_at(s, 4).unwrap_or(0),
                flags: u64_at(s, 8).unwrap_or(0),
                offset: u64_at(s, 24).unwrap_or(0),
                size: u64_at(s, 32).unwrap_or(0),
            })
            .collect()
    }

    /// The file's pages that dynamic relocation writes, as sorted,
    /// merged `(offset, len)` ranges; None unless every relocation table
    /// was kept (they sit in the first segment, which the head holds).
    /// Hostile tables that name too many pages, or hold too many entries
    /// between them, give None too.
    fn relocated(&self, sections: &[Section]) -> Option<Vec<(u64, u64)>> {
        let mut pages = Vec::new();
        let mut entries = 0usize;
        let mark = |pages: &mut Vec<u64>, vaddr: u64| {
            // Neighbouring entries mostly write the same page; a page
            // past the file's end is no page of it.
            if let Some(p) = self.file_offset(vaddr).filter(|&o| o < self.size).map(|o| o / PAGE) {
                if pages.last() != Some(&p) {
                    pages.push(p);
                }
            }
        };
        for s in sections.iter().filter(|s| s.flags & SHF_ALLOC != 0 && s.size > 0) {
            let entry = match s.kind {
                4 => 24, // RELA: offset, info, addend
                9 => 16, // REL: offset, info
                19 => 8, // RELR: addresses and bitmaps
                _ => continue,
            };
            let table = self.bytes(s.offset, s.size)?;
            entries += table.len() / entry;
            if entries > MAX_ENTRIES {
                return None;
            }
            if s.kind == 19 {
                // An even entry is an address; an odd one a bitmap of the
                // 63 words after the last address covered.
                let mut base = 0u64;
                for e in table.chunks_exact(8).filter_map(|e| u64_at(e, 0)) {
                    if pages.len() > MAX_PAGES {
                        return None;
                    }
                    if e & 1 == 0 {
                        mark(&mut pages, e);
                        base = e.wrapping_add(8);
                    } else {
                        for i in (0..63).filter(|i| e >> (i + 1) & 1 == 1) {
                            mark(&mut pages, base.wrapping_add(i * 8));
                        }
                        base = base.wrapping_add(63 * 8);
                    }
                }
            } else {
                for e in table.chunks_exact(entry) {
                    mark(&mut pages, u64_at(e, 0).unwrap_or(0));
                }
            }
            if pages.len() > MAX_PAGES {
                return None;
            }
        }
        pages.sort_unstable();
        pages.dedup();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in pages {
            let (o, end) = (p * PAGE, (p + 1) * PAGE);
            match out.last_mut() {
                // Pages close together are read as one range.
                Some((lo, ll)) if o <= *lo + *ll + MERGE_GAP => *ll = end - *lo,
                _ => out.push((o, PAGE)),
            }
        }
        Some(out)
    }

    /// What the loader needs of the object; None if it is not one.
    pub fn finish(self) -> Option<ElfFact> {
        if self.dead || !self.parsed {
            return None;
        }
        let mut fact = ElfFact::default();
        if let Some(i) = self.segments.iter().find(|s| s.kind == PT_INTERP) {
            if let Some(b) = self.bytes(i.offset, i.filesz.min(4096)) {
                let s = b.split(|&c| c == 0).next().unwrap_or(b);
                fact.interp = Some(String::from_utf8_lossy(s).into_owned()).filter(|s| !s.is_empty());
            }
        }
        let dynamic = self.dynamic();
        if let Some(st) = self.strtab() {
            let runpath = dynamic.iter().find(|e| e.0 == DT_RUNPATH);
            let rpath = dynamic.iter().find(|e| e.0 == DT_RPATH);
            for &(t, v) in &dynamic {
                if t == DT_NEEDED && fact.needed.len() < 256 {
                    fact.needed.extend(self.string(st, v));
                }
            }
            if let Some(&(_, v)) = runpath.or(rpath) {
                fact.rpath = runpath.is_none();
                if let Some(s) = self.string(st, v) {
                    fact.runpath = s.split(':').filter(|p| !p.is_empty()).map(str::to_string).collect();
                }
            }
        }
        // What relocation touches, by section type when the section headers
        // were kept; else the writable segments and the dynamic section.
        let mut ranges = vec![(0, self.size.min(4096))];
        let sections = self.sections();
        if !sections.is_empty() {
            let relocated = self.relocated(&sections);
            for s in &sections {
                let loader = matches!(
                    s.kind,
                    3 // dynamic strings (the only allocated string table)
                    | 4 | 5 | 6 | 9 | 11 | 14 | 15 | 16 | 19 // rela, hash, dynamic, rel, dynsym, init/fini/preinit arrays, relr
                    | 0x6fff_fff6 | 0x6fff_fffd | 0x6fff_fffe | 0x6fff_ffff // gnu hash, verdef, verneed, versym
                ) || (s.kind == 1 && s.flags & SHF_WRITE != 0); // .got, .data, .data.rel.ro
                if !loader || s.flags & SHF_ALLOC == 0 || s.size == 0 || s.offset >= self.size {
                    continue;
                }
                let len = s.size.min(RANGE_CAP).min(self.size - s.offset);
                match &relocated {
                    // A large writable section (CUDA libraries keep
                    // kernels of 100 MB in `.data`): only the pages that
                    // relocation writes are read at load.
                    Some(pages) if s.kind == 1 && len > WHOLE_WRITABLE => {
                        let end = s.offset + len;
                        let from = pages.partition_point(|&(o, l)| o + l <= s.offset);
                        for &(o, l) in pages[from..].iter().take_while(|&&(o, _)| o < end) {
                            let a = o.max(s.offset);
                            ranges.push((a, (o + l).min(end) - a));
                        }
                    }
                    _ => ranges.push((s.offset, len)),
                }
            }
        } else {
            for s in &self.segments {
                if ((s.kind == PT_LOAD && s.flags & 2 != 0) || s.kind == PT_DYNAMIC) && s.offset < self.size {
                    ranges.push((s.offset, s.filesz.min(RANGE_CAP).min(self.size - s.offset)));
                }
            }
        }
        // The loader zeroes the rest of a writable segment's last page in
        // the file, where its `.bss` starts (the end of a CUDA library).
        for s in &self.segments {
            let end = s.offset.saturating_add(s.filesz);
            if s.kind == PT_LOAD && s.flags & 2 != 0 && s.memsz > s.filesz && end % PAGE != 0 && end <= self.size {
                ranges.push((end - end % PAGE, end % PAGE));
            }
        }
        ranges.sort_unstable();
        ranges.dedup();
        fact.ranges = ranges;
        if let Some(n) = self.names {
            fact.names = n.found;
        }
        Some(fact)
    }
}

/// Collects NUL-terminated strings between NULs that read as module
/// names (`a`, `a.b_c`), as string constants are stored.
#[derive(Debug, Default)]
struct NameScan {
    cur: Vec<u8>,
    /// The current run started right after a NUL and is all name bytes.
    clean: bool,
    found: Vec<String>,
    seen: std::collections::HashSet<Vec<u8>>,
}

impl NameScan {
    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == 0 {
                if self.clean
                    && !self.cur.is_empty()
                    && self.found.len() < MAX_NAMES
                    && crate::is_module_name(&self.cur)
                    && self.seen.insert(self.cur.clone())
                {
                    self.found.push(String::from_utf8_lossy(&self.cur).into_owned());
                }
                self.cur.clear();
                self.clean = true;
            } else if self.clean && (b.is_ascii_alphanumeric() || b == b'_' || b == b'.') && self.cur.len() < 128 {
                self.cur.push(b);
            } else {
                self.clean = false;
                self.cur.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(bytes: &[u8], chunk: usize, names: bool) -> Option<ElfFact> {
        let mut p = ElfProbe::new(bytes.len() as u64, names);
        for c in bytes.chunks(chunk) {
            p.feed(c);
        }
        p.finish()
    }

    #[test]
    fn reads_this_test_binary() {
        // The test binary itself: a dynamic executable that needs libc.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let whole = probe(&exe, 1 << 20, false).expect("an ELF object");
        assert!(
            whole.interp.as_deref().is_some_and(|i| i.contains("ld-linux")),
            "{:?}",
            whole.interp
        );
        assert!(
            whole.needed.iter().any(|n| n.starts_with("libc.so")),
            "{:?}",
            whole.needed
        );
        assert!(whole.ranges.len() > 3 && whole.ranges[0] == (0, 4096));
        // Chunking does not change what is found.
        assert_eq!(probe(&exe, 4093, false), Some(whole));
    }

    /// A little-endian ELF64 header at the start of `b`: `phnum` program
    /// headers right after it, `shnum` section headers at `shoff`.
    fn header(b: &mut [u8], phnum: u16, shoff: u64, shnum: u16) {
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        b[40..48].copy_from_slice(&shoff.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&phnum.to_le_bytes());
        b[58..60].copy_from_slice(&64u16.to_le_bytes());
        b[60..62].copy_from_slice(&shnum.to_le_bytes());
    }

    /// Program header `i`: kind, flags, offset, address, file and memory
    /// sizes.
    fn phdr(b: &mut [u8], i: usize, (kind, flags, off, vaddr, filesz, memsz): (u32, u32, u64, u64, u64, u64)) {
        let o = 64 + i * 56;
        b[o..o + 4].copy_from_slice(&kind.to_le_bytes());
        b[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
        b[o + 8..o + 16].copy_from_slice(&off.to_le_bytes());
        b[o + 16..o + 24].copy_from_slice(&vaddr.to_le_bytes());
        b[o + 32..o + 40].copy_from_slice(&filesz.to_le_bytes());
        b[o + 40..o + 48].copy_from_slice(&memsz.to_le_bytes());
    }

    /// An object laid out as `patchelf` leaves one: the dynamic section
    /// and its strings moved to the end, past the first segment.
    fn patched(needed: &str, runpath: &str) -> Vec<u8> {
        let mut b = vec![0u8; 3 * 4096];
        header(&mut b, 3, 0, 0);
        phdr(&mut b, 0, (PT_LOAD, 4, 0, 0, 4096, 4096));
        phdr(&mut b, 1, (PT_LOAD, 6, 8192, 0x10000, 4096, 4096));
        phdr(&mut b, 2, (PT_DYNAMIC, 6, 8192, 0x10000, 80, 80));
        let strings = format!("\0{needed}\0{runpath}\0");
        let dynamic: [(i64, u64); 5] = [
            (DT_NEEDED, 1),
            (DT_RUNPATH, 2 + needed.len() as u64),
            (DT_STRTAB, 0x10000 + 80),
            (DT_STRSZ, strings.len() as u64),
            (0, 0),
        ];
        for (i, (t, v)) in dynamic.iter().enumerate() {
            let o = 8192 + i * 16;
            b[o..o + 8].copy_from_slice(&t.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&v.to_le_bytes());
        }
        b[8192 + 80..8192 + 80 + strings.len()].copy_from_slice(strings.as_bytes());
        b
    }

    #[test]
    fn strings_right_after_the_dynamic_section() {
        let b = patched("libopenblas.so", "$ORIGIN/../lib");
        for chunk in [b.len(), 8192 + 40, 4096, 1000, 7] {
            let f = probe(&b, chunk, false).expect("an ELF object");
            assert_eq!(f.needed, ["libopenblas.so"], "chunks of {chunk}");
            assert_eq!(f.runpath, ["$ORIGIN/../lib"]);
            assert!(!f.rpath);
            // No section headers: the writable segment and the dynamic
            // section stand for what relocation reads.
            assert_eq!(f.ranges, [(0, 4096), (8192, 80), (8192, 4096)]);
        }
    }

    /// An object with section headers, a relocation table of `kind` in
    /// its first segment, and a 512 KiB `.data` of which relocation
    /// writes the pages at file offsets 0x1000, 0x41000 and 0x80000.
    fn relocated(kind: u32) -> Vec<u8> {
        let (data_off, data_va, data_len) = (0x1000u64, 0x20_1000u64, 0x8_0000u64);
        let shoff = data_off + data_len;
        let mut b = vec![0u8; (shoff + 3 * 64) as usize];
        header(&mut b, 2, shoff, 3);
        phdr(&mut b, 0, (PT_LOAD, 4, 0, 0, 0x1000, 0x1000));
        // The data segment's file bytes end 16 bytes short of a page,
        // where its `.bss` starts.
        phdr(
            &mut b,
            1,
            (PT_LOAD, 6, data_off, data_va, data_len - 16, data_len + 0x2000),
        );
        let targets = [data_va + 8, data_va + 0x4_0008, data_va + 0x7_f010];
        let table: Vec<u8> = match kind {
            // RELR: addresses, and after the second a bitmap of two words
            // that stay in its page.
            19 => [targets[0], targets[1], (1 << 1) | (1 << 63) | 1, targets[2]]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            _ => targets
                .iter()
                .flat_map(|&t| [t, 8 /* R_X86_64_RELATIVE */, 0].into_iter().flat_map(u64::to_le_bytes))
                .collect(),
        };
        b[0x200..0x200 + table.len()].copy_from_slice(&table);
        let sh = |b: &mut Vec<u8>, i: u64, kind: u32, flags: u64, off: u64, size: u64| {
            let o = (shoff + i * 64) as usize;
            b[o + 4..o + 8].copy_from_slice(&kind.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&flags.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&off.to_le_bytes());
            b[o + 32..o + 40].copy_from_slice(&size.to_le_bytes());
        };
        sh(&mut b, 1, kind, SHF_ALLOC, 0x200, table.len() as u64);
        sh(&mut b, 2, 1, SHF_ALLOC | SHF_WRITE, data_off, data_len);
        b
    }

    #[test]
    fn a_large_writable_section_only_where_relocation_writes_and_where_bss_starts() {
        for kind in [4, 19] {
            let b = relocated(kind);
            let table = if kind == 19 { 32 } else { 72 };
            for chunk in [b.len(), 4096, 1000, 61] {
                let f = probe(&b, chunk, false).expect("an ELF object");
                assert_eq!(
                    f.ranges,
                    [
                        (0, 4096),
                        (0x200, table),
                        (0x1000, 4096),
                        (0x4_1000, 4096),
                        (0x8_0000, 0xff0),
                        (0x8_0000, 4096)
                    ],
                    "table type {kind}, chunks of {chunk}"
                );
            }
        }
        // A table that lies outside the file is not read: the section is
        // taken whole, as without relocations known.
        let mut b = relocated(4);
        let o = (0x8_1000 + 64 + 24) as usize;
        b[o..o + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let f = probe(&b, 4096, false).expect("an ELF object");
        assert!(f.ranges.contains(&(0x1000, 0x8_0000)), "{:?}", f.ranges);
    }

    #[test]
    fn hostile_relocation_tables_are_not_followed() {
        // RELR tables in the head of an object whose one segment maps
        // everything: too many pages, or too many entries between them.
        let relr = |entries: Vec<u64>| {
            let table: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            // A file as large as the pages it names.
            let mut p = ElfProbe::new(1 << 40, false);
            p.segments.push(Segment {
                kind: PT_LOAD,
                flags: 6,
                offset: 0,
                vaddr: 0,
                filesz: 1 << 50,
                memsz: 1 << 50,
            });
            let size = table.len() as u64;
            p.head = table;
            (p, size)
        };
        let section = |size| Section {
            kind: 19,
            flags: SHF_ALLOC,
            offset: 0,
            size,
        };
        let (p, size) = relr((0..=MAX_PAGES as u64).map(|i| i * PAGE).collect());
        assert_eq!(p.relocated(&[section(size)]), None, "a page each");
        let (p, size) = relr(vec![PAGE; MAX_ENTRIES / 4 + 1]);
        assert!(p.relocated(&[section(size)]).is_some(), "one page, many times");
        assert_eq!(p.relocated(&[section(size); 4]), None, "the same table four times");
    }

    #[test]
    fn header_values_near_the_end_of_the_address_space() {
        // Found by the fuzz target: offsets and sizes whose sums overflow.
        let mut b = patched("libx.so", "");
        phdr(&mut b, 2, (PT_DYNAMIC, 6, u64::MAX - 10, 0x10000, 100, 100));
        phdr(&mut b, 1, (PT_LOAD, 6, u64::MAX - 10, 0x10000, 4096, 4096));
        for chunk in [b.len(), 61] {
            let f = probe(&b, chunk, true).expect("an ELF object");
            assert!(f.ranges.iter().all(|&(o, l)| o + l <= b.len() as u64), "{:?}", f.ranges);
        }
    }

    #[test]
    fn not_elf_or_truncated() {
        assert_eq!(probe(b"#!/bin/sh\necho hi\n", 7, false), None);
        assert_eq!(probe(&[0x7f, b'E', b'L', b'F'], 7, false), None);
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Cut short: headers only, or garbage after them. No panic, and
        // whatever is found lies inside the file.
        for cut in [64, 100, 4096, 70_000] {
            if let Some(f) = probe(&exe[..cut], 512, true) {
                assert!(f.ranges.iter().all(|&(o, l)| o + l <= cut as u64));
            }
        }
        let mut junk = exe[..4096].to_vec();
        junk.extend(std::iter::repeat_n(0xa5, 100_000));
        let _ = probe(&junk, 333, true);
    }

    #[test]
    fn module_names_from_strings() {
        let mut b = b"\x7fELF".to_vec();
        b.extend_from_slice(b"\0dateutil.parser\0x\0not a name\0_strptime\0a..b\0.x\0pkg.mod_2\0tail");
        let mut s = NameScan::default();
        s.feed(&b[..20]);
        s.feed(&b[20..]);
        assert_eq!(s.found, vec!["dateutil.parser", "x", "_strptime", "pkg.mod_2"]);
    }
}
