//! The FUSE filesystem: an index's tree, read-only, with file data from the
//! span reader.
//!
//! The tree never changes once indexed, so the kernel gets long entry and
//! attribute timeouts and keeps its page cache across opens: warm reads
//! never reach this process. Writes never get here either: the mount is
//! read-only and the kernel answers them with `EROFS`.
//!
//! Round trips a warm container would pay for nothing are refused once
//! with `ENOSYS`, which makes the kernel stop asking for the connection's
//! life:
//! * `OPEN`/`OPENDIR` (and so `RELEASE`): a file here needs no per-open
//!   state, and the kernel's default for a filesystem without open is
//!   `FOPEN_KEEP_CACHE` (and `FOPEN_CACHE_DIR`), what clip answered anyway;
//! * `GETXATTR` when the image has no extended attribute at all: overlayfs
//!   asks its lower layer for `trusted.overlay.metacopy` at every file
//!   lookup of every new container, about two thousand round trips for one
//!   `import pandas`. Such a mount then answers "not supported", as a
//!   filesystem without xattrs does; an image with any xattr is asked as
//!   before.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clip_format::{Kind, Node};
use clip_metrics::{defs, Counter, Histogram};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::view::ImageView;

/// How long the kernel may cache entries and attributes: the tree is
/// immutable, so as long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);

pub struct ClipFs {
    view: Arc<ImageView>,
    /// Per inode: where the last read ended, to spot sequential reads
    /// (there are no per-open handles). Cleared when it grows large.
    last_end: Mutex<HashMap<u64, u64>>,
    /// The image has no extended attributes: GETXATTR is refused with
    /// ENOSYS (see the module's comment).
    no_xattrs: bool,
    metrics: OpMetrics,
}

/// The FUSE operations clip answers, for metrics.
#[derive(Debug, Clone, Copy)]
enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Read,
    Release,
    Opendir,
    Readdir,
    Readdirplus,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
}

const OP_NAMES: [&str; 13] = [
    "lookup",
    "getattr",
    "readlink",
    "open",
    "read",
    "release",
    "opendir",
    "readdir",
    "readdirplus",
    "statfs",
    "getxattr",
    "listxattr",
    "access",
];

/// Per-operation series in the process's metrics, looked up once.
struct OpMetrics {
    ops: Vec<(Arc<Counter>, Arc<Histogram>)>,
    read_bytes: Arc<Counter>,
    read_errors: Arc<Counter>,
    panics: Arc<Counter>,
}

impl OpMetrics {
    fn new() -> Self {
        Self {
            ops: OP_NAMES
                .iter()
                .map(|op| {
                    (
                        defs::FUSE_OPS.with(&[("op", op)]),
                        defs::FUSE_SECONDS.with(&[("op", op)]),
                    )
                })
                .collect(),
            read_bytes: defs::FUSE_BYTES.with(&[("op", "read")]),
            read_errors: defs::FUSE_ERRORS.with(&[("op", "read")]),
            panics: defs::PANICS.with(&[("where", "fuse")]),
        }
    }
}

/// Counts an operation and its time when dropped.
struct Timed<'a>(&'a (Arc<Counter>, Arc<Histogram>), Instant);

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        self.0 .0.inc();
        self.0 .1.observe_duration(self.1.elapsed());
    }
}

/// An error with its causes, each once: "what: why: underneath".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn time(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(u64::from(nsec))
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

/// The kernel's 32-bit device encoding (`new_encode_dev`) of a glibc dev_t.
fn kernel_rdev(rdev: u64) -> u32 {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)) as u32
}

pub fn attr(ino: u64, n: &Node) -> FileAttr {
    let t = time(n.mtime, n.mtime_nsec);
    let size = match n.kind {
        Kind::Symlink => n.target.len() as u64,
        Kind::Dir => 4096,
        _ => n.size,
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(n.kind),
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: kernel_rdev(n.rdev),
        blksize: 4096,
        flags: 0,
    }
}

impl ClipFs {
    pub fn new(view: Arc<ImageView>) -> Self {
        Self {
            no_xattrs: view.index().index.nodes.iter().all(|n| n.xattrs.is_empty()),
            view,
            last_end: Mutex::new(HashMap::new()),
            metrics: OpMetrics::new(),
        }
    }

    /// Runs one request's handler, timed and counted. A panic in it is
    /// caught here: its reply, dropped while unwinding, answers EIO, and
    /// the thread goes on serving.
    fn guarded(&self, op: Op, f: impl FnOnce()) {
        let _t = Timed(&self.metrics.ops[op as usize], Instant::now());
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            self.metrics.panics.inc();
            tracing::error!(
                op = OP_NAMES[op as usize],
                "a FUSE request panicked; it was answered with EIO"
            );
        }
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        self.view.index().index.node(ino.0)
    }

    /// The directory `ino`, for listing.
    fn dir(&self, ino: INodeNo) -> Result<&Node, Errno> {
        match self.node(ino) {
            Some(n) if n.kind == Kind::Dir => Ok(n),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }
}

/// Slot `i` of a directory listing: `.`, `..`, then the entries in order.
fn dir_slot(ino: INodeNo, n: &Node, i: u64) -> Option<(u64, &[u8])> {
    match i {
        0 => Some((ino.0, b".")),
        1 => Some((n.parent, b"..")),
        _ => n
            .entries
            .get(usize::try_from(i - 2).ok()?)
            .map(|e| (e.ino, e.name.as_slice())),
    }
}

impl Filesystem for ClipFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        // READDIRPLUS hands the kernel each entry's attributes with the
        // listing, so `ls -l` and `find` need no LOOKUP per entry.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_CACHE_SYMLINKS
                | fuser::InitFlags::FUSE_PARALLEL_DIROPS
                | fuser::InitFlags::FUSE_DO_READDIRPLUS,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.view.note_lookup(parent.0, name.as_bytes());
        self.guarded(Op::Lookup, || {
            let index = &self.view.index().index;
            match self.node(parent) {
                Some(p) if p.kind == Kind::Dir => match index.lookup(parent.0, name.as_bytes()) {
                    Some(ino) => {
                        let n = index.node(ino).expect("validated index");
                        reply.entry(&TTL, &attr(ino, n), Generation(0));
                    }
                    // A negative entry (inode 0) with a timeout: the kernel
                    // caches the miss, so probing for absent files (Python's
                    // import system does it a lot) stays in the kernel.
                    None => {
                        let mut neg = attr(parent.0, p);
                        neg.ino = INodeNo(0);
                        reply.entry(&TTL, &neg, Generation(0))
                    }
                },
                Some(_) => reply.error(Errno::ENOTDIR),
                None => reply.error(Errno::ENOENT),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.guarded(Op::Getattr, || match self.node(ino) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.guarded(Op::Readlink, || match self.node(ino) {
            Some(n) if n.kind == Kind::Symlink => reply.data(&n.target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guarded(Op::Open, || match self.node(ino) {
            Some(n) if n.kind == Kind::Dir => reply.error(Errno::EISDIR),
            // No per-open state: the kernel stops sending OPEN and RELEASE.
            Some(_) => reply.error(Errno::ENOSYS),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guarded(Op::Read, || {
            let Some(n) = self.node(ino) else {
                return reply.error(Errno::ENOENT);
            };
            if n.kind != Kind::File {
                return reply.error(Errno::EINVAL);
            }
            let sequential = {
                let mut h = self.last_end.lock().expect("not poisoned");
                if h.len() >= 4096 {
                    h.clear();
                }
                let last = h.insert(ino.0, offset + u64::from(size));
                last == Some(offset) && offset > 0
            };
            match self.view.read(n, offset, size, sequential) {
                Ok(data) => {
                    self.metrics.read_bytes.inc_by(data.len() as u64);
                    reply.data(&data)
                }
                Err(e) => {
                    self.metrics.read_errors.inc();
                    tracing::error!(ino = ino.0, offset, size, error = %chain(&e), "read failed");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guarded(Op::Release, || reply.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guarded(Op::Opendir, || match self.node(ino) {
            // As OPEN: the kernel stops asking and caches listings.
            Some(n) if n.kind == Kind::Dir => reply.error(Errno::ENOSYS),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        });
    }

    /// Offsets are stable: 1 is `.`, 2 is `..`, 2 + i + 1 follows entry i.
    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.guarded(Op::Readdir, || {
            let n = match self.dir(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(e),
            };
            let index = &self.view.index().index;
            let mut i = offset;
            while let Some((child, name)) = dir_slot(ino, n, i) {
                let kind = index.node(child).map_or(FileType::Directory, |c| file_type(c.kind));
                if reply.add(INodeNo(child), i + 1, kind, OsStr::from_bytes(name)) {
                    break;
                }
                i += 1;
            }
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        self.guarded(Op::Readdirplus, || {
            let n = match self.dir(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(e),
            };
            let index = &self.view.index().index;
            let mut i = offset;
            while let Some((child, name)) = dir_slot(ino, n, i) {
                let Some(c) = index.node(child) else { break };
                if reply.add(
                    INodeNo(child),
                    i + 1,
                    OsStr::from_bytes(name),
                    &TTL,
                    &attr(child, c),
                    Generation(0),
                ) {
                    break;
                }
                i += 1;
            }
            reply.ok();
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.guarded(Op::Statfs, || {
            let index = &self.view.index().index;
            let bytes: u64 = index.nodes.iter().map(|n| n.size).sum();
            reply.statfs(bytes.div_ceil(4096), 0, 0, index.nodes.len() as u64, 0, 4096, 255, 4096);
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.guarded(Op::Getxattr, || {
            if self.no_xattrs {
                return reply.error(Errno::ENOSYS);
            }
            let Some(n) = self.node(ino) else {
                return reply.error(Errno::ENOENT);
            };
            match n.xattrs.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) {
                None => reply.error(Errno::ENODATA),
                Some((_, v)) if size == 0 => reply.size(v.len() as u32),
                Some((_, v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
                Some((_, v)) => reply.data(v),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.guarded(Op::Listxattr, || {
            let Some(n) = self.node(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let mut names = Vec::new();
            for (k, _) in &n.xattrs {
                names.extend_from_slice(k);
                names.push(0);
            }
            if size == 0 {
                reply.size(names.len() as u32)
            } else if names.len() > size as usize {
                reply.error(Errno::ERANGE)
            } else {
                reply.data(&names)
            }
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.guarded(Op::Access, || {
            // default_permissions: the kernel checks modes itself.
            match self.node(ino) {
                Some(_) => reply.ok(),
                None => reply.error(Errno::ENOENT),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FirstReadIs;

    /// A filesystem over an index with nothing but its root.
    fn empty_fs() -> ClipFs {
        fs_with(|_| {})
    }

    /// A filesystem over an index of a root directory that `build` may
    /// add to (`nodes[0]` is the root, inode 1).
    fn fs_with(build: impl FnOnce(&mut Vec<clip_format::Node>)) -> ClipFs {
        use clip_format::{Data, Image, Index, IndexFile, Node, WindowWriter, ROOT_INO};
        let root = Node {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            nlink: 2,
            rdev: 0,
            parent: ROOT_INO,
            target: Vec::new(),
            xattrs: Vec::new(),
            data: Data::None,
            entries: Vec::new(),
        };
        let index = Index {
            image: Image {
                reference: "oci:/nonexistent".into(),
                manifest_digest: "sha256:00".into(),
                manifest_media_type: String::new(),
                platform: "linux/amd64".into(),
                config_digest: "sha256:00".into(),
                config: b"{}".to_vec(),
            },
            spacing: 1 << 20,
            layers: Vec::new(),
            nodes: {
                let mut nodes = vec![root];
                build(&mut nodes);
                nodes
            },
        };
        let file = Arc::new(IndexFile::new(index, WindowWriter::default()));
        let store = clip_store::LayerStore::new(clip_store::StoreOptions {
            prefetch_workers: 0,
            ..Default::default()
        })
        .unwrap();
        let source = Arc::new(clip_registry::LayoutSource::new("/nonexistent".into(), None));
        ClipFs::new(crate::ImageView::new(file, store, source).unwrap())
    }

    #[test]
    fn a_panicking_handler_is_caught_and_counted() {
        let fs = empty_fs();
        let before = defs::PANICS.with(&[("where", "fuse")]).get();
        let mut ran_after = false;
        fs.guarded(Op::Read, || panic!("a bug in a handler"));
        fs.guarded(Op::Lookup, || ran_after = true);
        assert!(ran_after, "the thread goes on serving");
        assert_eq!(defs::PANICS.with(&[("where", "fuse")]).get(), before + 1);
    }

    #[test]
    fn a_recording_keeps_the_names_looked_up_in_first_lookup_order() {
        use clip_format::{DirEntry, ROOT_INO};
        // /d, a directory (inode 2).
        let fs = fs_with(|nodes| {
            let mut d = nodes[0].clone();
            d.parent = ROOT_INO;
            nodes.push(d);
            nodes[0].entries.push(DirEntry {
                name: b"d".to_vec(),
                ino: 2,
            });
        });
        let v = &fs.view;
        v.note_lookup(ROOT_INO, b"before");
        v.record_for(Duration::from_secs(60));
        v.note_lookup(ROOT_INO, b"d");
        v.note_lookup(2, b"absent");
        v.note_lookup(ROOT_INO, b"d");
        v.note_lookup(2, b"\xff");
        v.note_lookup(99, b"in-no-directory");
        let r = v.take_recording();
        assert_eq!(
            r.lookups,
            [("d".to_string(), true), ("d/absent".to_string(), false)],
            "once each; not UTF-8 or in no directory: left out"
        );
        v.note_lookup(ROOT_INO, b"after");
        assert!(v.take_recording().lookups.is_empty(), "the window closed");
    }

    #[test]
    fn the_first_read_of_a_file_is_signalled() {
        use clip_format::DirEntry;
        // /f, ten bytes of zeros (inode 2).
        let fs = fs_with(|nodes| {
            let mut f = nodes[0].clone();
            (f.kind, f.size, f.nlink) = (Kind::File, 10, 1);
            nodes.push(f);
            nodes[0].entries.push(DirEntry {
                name: b"f".to_vec(),
                ino: 2,
            });
        });
        let v = fs.view.clone();
        let signal = v.first_read();
        assert_eq!(signal.wait(Duration::ZERO), FirstReadIs::Late, "nothing read yet");
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait(Duration::from_secs(60)))
        };
        let f = v.index().index.node(2).unwrap();
        assert_eq!(v.read(f, 0, 100, false).unwrap(), vec![0; 10]);
        assert_eq!(waiter.join().unwrap(), FirstReadIs::Read, "a waiter is woken");
        drop((fs, v));
        assert_eq!(signal.wait(Duration::ZERO), FirstReadIs::Read, "and it stays read");
    }

    #[test]
    fn a_view_that_goes_unread_wakes_its_first_reads_waiters() {
        let fs = fs_with(|_| {});
        let signal = fs.view.first_read();
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait(Duration::from_secs(60)))
        };
        drop(fs);
        assert_eq!(waiter.join().unwrap(), FirstReadIs::Gone);
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        // glibc makedev(1, 3) and makedev(259, 70000)
        let glibc = |major: u64, minor: u64| {
            ((major & 0xffff_f000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0xff)
        };
        assert_eq!(kernel_rdev(glibc(1, 3)), (1 << 8) | 3);
        let r = kernel_rdev(glibc(259, 70000));
        assert_eq!((r & 0xfff00) >> 8, 259);
        assert_eq!((r & 0xff) | ((r >> 12) & 0xfff00), 70000);
    }

    #[test]
    fn times_before_the_epoch() {
        assert_eq!(time(-2, 500_000_000), UNIX_EPOCH - Duration::from_millis(1500));
        assert_eq!(time(5, 1), UNIX_EPOCH + Duration::new(5, 1));
    }
}
