//! Handing a profile's recorded reads to the kernel's page cache
//! (`FUSE_NOTIFY_STORE`) as their units arrive. A container that then
//! reads those bytes finds them cached, with no FUSE round trip: on two
//! busy cores each round trip waits for a FUSE thread to be scheduled,
//! and a torch start makes about 4,500 of them.
//!
//! Only bytes the store holds, verified, are pushed, each into its own
//! file's pages at its own offsets: a profile that names the wrong bytes
//! wastes work, never serves a wrong byte. Nothing is fetched for a push.
//! The kernel takes a push only for an inode it has (looked up, so the
//! profile's lookups come first), and marks a page valid only when a push
//! fills all of it: pieces are whole pages.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Weak;
use std::time::Instant;

use clip_format::{Data, Index, Kind};
use clip_metrics::defs;

use crate::view::{ImageView, LayerRead};

const PAGE: u64 = 4096;
/// The most bytes one push carries.
const MAX_PIECE: u64 = 1 << 20;

/// What a push of recorded reads did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// Pieces the kernel took, and their bytes.
    pub stored: u64,
    pub bytes: u64,
    /// Pieces of files the kernel did not have (never looked up).
    pub unknown: u64,
    /// Pieces whose units did not arrive in time (or were never coming).
    pub missing: u64,
}

/// The image's regular files (contiguous ones: a sparse file's reads go
/// through FUSE) by where their bytes are in each layer.
struct Extents {
    by_layer: Vec<Vec<Extent>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Extent {
    pos: u64,
    len: u64,
    ino: u64,
}

impl Extents {
    fn new(index: &Index) -> Self {
        let mut by_layer = vec![Vec::new(); index.layers.len()];
        for (i, n) in index.nodes.iter().enumerate() {
            if let (Kind::File, Data::Contiguous { layer, offset }) = (n.kind, &n.data) {
                if let Some(l) = by_layer.get_mut(*layer as usize) {
                    if n.size > 0 {
                        l.push(Extent {
                            pos: *offset,
                            len: n.size,
                            ino: i as u64 + 1,
                        });
                    }
                }
            }
        }
        for l in &mut by_layer {
            l.sort_unstable();
        }
        Self { by_layer }
    }

    /// The files with bytes in `pos..end` of `layer`. A tar's files do not
    /// overlap (hard links share an entry), so ends ascend with starts.
    fn overlapping(&self, layer: u32, pos: u64, end: u64) -> impl Iterator<Item = &Extent> {
        let l = self.by_layer.get(layer as usize).map_or(&[][..], Vec::as_slice);
        let first = l.partition_point(|e| e.pos.saturating_add(e.len) <= pos);
        l[first..].iter().take_while(move |e| e.pos < end)
    }
}

/// The whole-page pieces, as (file offset, length), in which to push the
/// bytes `pos..end` of a layer that fall in file `e`: from the page the
/// range starts in to the page it ends in (or the file's end), cut after
/// the page in which a unit ends (so a piece waits for little more than
/// one unit) and at [`MAX_PIECE`]. `unit_end(p)`: where the unit holding
/// layer byte `p` ends.
fn pieces(e: &Extent, pos: u64, end: u64, unit_end: impl Fn(u64) -> u64) -> Vec<(u64, u64)> {
    let from = pos.max(e.pos) - e.pos;
    let to = end.min(e.pos.saturating_add(e.len)).saturating_sub(e.pos);
    if to <= from {
        return Vec::new();
    }
    let (mut s, last) = (from / PAGE * PAGE, to.div_ceil(PAGE).saturating_mul(PAGE).min(e.len));
    let mut out = Vec::new();
    while s < last {
        let t = unit_end(e.pos + s)
            .saturating_sub(e.pos)
            .div_ceil(PAGE)
            .saturating_mul(PAGE)
            .min(s + MAX_PIECE)
            .min(last);
        if t <= s {
            // A unit that ends before the byte it holds: a bad index.
            break;
        }
        out.push((s, t - s));
        s = t;
    }
    out
}

/// `FUSE_NOTIFY_STORE`: `data` into the page cache of inode `ino` at
/// `offset`. fuser's notifier hides ENOENT (an inode the kernel does not
/// have), which is worth counting here.
fn notify_store(fd: BorrowedFd<'_>, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
    const FUSE_NOTIFY_STORE: i32 = 4;
    let mut head = [0u8; 40];
    let len = u32::try_from(head.len() + data.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..8].copy_from_slice(&FUSE_NOTIFY_STORE.to_le_bytes());
    // unique (8..16) is 0: a notification.
    head[16..24].copy_from_slice(&ino.to_le_bytes());
    head[24..32].copy_from_slice(&offset.to_le_bytes());
    head[32..36].copy_from_slice(&(data.len() as u32).to_le_bytes());
    let iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut _,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        },
    ];
    // SAFETY: two buffers we own, alive for the call, written to a
    // descriptor we hold.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 2) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != len as usize {
        return Err(std::io::Error::other("a short write of a FUSE notification"));
    }
    Ok(())
}

/// Pushes the bytes of `reads` (a profile's, in first-access order) into
/// the page cache of the mount served on `fd`, each piece once its units
/// are held, until `deadline` or until the view goes (its mount ended).
pub fn push_reads(view: &Weak<ImageView>, fd: BorrowedFd<'_>, reads: &[LayerRead], deadline: Instant) -> Pushed {
    let mut done = Pushed::default();
    let Some(v) = view.upgrade() else { return done };
    let extents = Extents::new(&v.index().index);
    drop(v);
    let stored = defs::PAGE_CACHE_PUSHES.with(&[("result", "stored")]);
    let unknown = defs::PAGE_CACHE_PUSHES.with(&[("result", "unknown_inode")]);
    let missing = defs::PAGE_CACHE_PUSHES.with(&[("result", "not_held")]);
    let bytes = defs::PAGE_CACHE_PUSHED_BYTES.get();
    let mut seen = HashSet::new();
    let mut buf = Vec::new();
    // While it waits, a push holds the layer's layout and the store, not
    // the view: a mount that ends mid-start frees its index at once.
    let mounted = || view.strong_count() > 0;
    for &(layer, pos, len) in reads {
        let Some(v) = view.upgrade() else { break };
        let Some(l) = v.layers().get(layer as usize) else {
            continue;
        };
        let (layout, store) = (l.layout.clone(), v.store().clone());
        drop(v);
        let layout = &*layout;
        let end = pos.saturating_add(len).min(layout.uncompressed_size);
        for e in extents.overlapping(layer, pos, end) {
            let unit_end = |p| {
                let u = &layout.units[layout.unit_at(p)];
                u.out + u.len
            };
            for (off, n) in pieces(e, pos, end, unit_end) {
                if !seen.insert((e.ino, off)) {
                    continue;
                }
                let (a, b) = (e.pos + off, e.pos + off + n);
                let held = (layout.unit_at(a)..=layout.unit_at(b - 1)).all(|u| {
                    let unit = &layout.units[u];
                    store.wait_held(layout, u, b - unit.out, deadline, &mounted)
                });
                if !mounted() {
                    return done;
                }
                buf.clear();
                if !held || !store.read_held(layout, a, n, &mut buf) {
                    done.missing += 1;
                    missing.inc();
                    continue;
                }
                match notify_store(fd, e.ino, off, &buf) {
                    Ok(()) => {
                        done.stored += 1;
                        done.bytes += n;
                        stored.inc();
                        bytes.inc_by(n);
                    }
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                        done.unknown += 1;
                        unknown.inc();
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "the kernel refused a page-cache push; stopping");
                        return done;
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_whole_pages_cut_after_each_units_last_page() {
        // Units at layer bytes 0, 10_000 and 20_000..30_000.
        let layout = |p: u64| (p / 10_000 + 1) * 10_000;
        // A file at layer bytes 1_000..26_000; a read of 5_000..21_000.
        let e = Extent {
            pos: 1_000,
            len: 25_000,
            ino: 7,
        };
        let p = pieces(&e, 5_000, 21_000, layout);
        // File offsets: 4_000..20_000, from page 0 to page 5 (20_480).
        // Unit 0 ends at file offset 9_000 (in page 2, which ends at
        // 12_288); unit 1 at 19_000 (in page 4, ending at 20_480).
        assert_eq!(p, vec![(0, 12_288), (12_288, 8_192)]);
        // The file's last piece ends with the file, not a page.
        let p = pieces(&e, 24_000, 40_000, layout);
        assert_eq!(p, vec![(20_480, 4_520)]);
        // Bytes outside the file: none.
        assert!(pieces(&e, 26_000, 28_000, layout).is_empty());
        assert!(pieces(&e, 0, 1_000, layout).is_empty());
        // Every piece starts on a page.
        let big = Extent {
            pos: 0,
            len: 30_000,
            ino: 8,
        };
        for (off, n) in pieces(&big, 0, 30_000, layout) {
            assert_eq!(off % PAGE, 0);
            assert!(n > 0 && (off + n == 30_000 || n % PAGE == 0));
        }
    }

    #[test]
    fn only_the_files_in_a_range_are_found() {
        let ext = |pos, len, ino| Extent { pos, len, ino };
        let extents = Extents {
            by_layer: vec![vec![ext(0, 100, 2), ext(512, 100, 3), ext(1024, 4096, 4)]],
        };
        let found = |a, b| extents.overlapping(0, a, b).map(|e| e.ino).collect::<Vec<_>>();
        assert_eq!(found(50, 600), vec![2, 3]);
        assert_eq!(found(100, 512), Vec::<u64>::new());
        assert_eq!(found(2000, 2001), vec![4]);
        assert_eq!(extents.overlapping(5, 0, 1 << 30).count(), 0, "no such layer");
    }
}
