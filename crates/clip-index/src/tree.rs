//! Merges layers into one tree with the OCI changeset rules: upper layers
//! win, `.wh.NAME` deletes NAME from lower layers, `.wh..wh..opq` hides a
//! directory's lower contents.

use std::collections::BTreeMap;

use clip_format::{Data, DirEntry, Kind, Node, ROOT_INO};

use crate::tar::{Entry, EntryKind};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Paths the runtime mounts over: never indexed.
const EXCLUDED: [&[u8]; 3] = [b"proc", b"sys", b"dev"];

struct MNode {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    size: u64,
    rdev: u64,
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    data: Data,
    children: BTreeMap<Vec<u8>, usize>,
    /// The layer that created this directory without an entry of its own.
    implicit: Option<u32>,
}

impl MNode {
    fn implicit_dir(mtime: i64, layer: u32) -> Self {
        MNode {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime,
            mtime_nsec: 0,
            size: 0,
            rdev: 0,
            target: Vec::new(),
            xattrs: Vec::new(),
            data: Data::None,
            children: BTreeMap::new(),
            implicit: Some(layer),
        }
    }
}

/// Counts of what was dropped while merging, for the summary and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    /// Entries under /proc, /sys or /dev.
    pub excluded: u64,
    /// Hardlinks whose target is missing or a directory.
    pub bad_hardlinks: u64,
    /// Non-directories replaced because a later entry needed a directory
    /// at their path.
    pub replaced_by_dir: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("resolving {path:?}: more than {MAX_HOPS} symbolic links (a loop)")]
    SymlinkLoop { path: String },
}

/// As Linux's MAXSYMLINKS: more links than this while resolving one path
/// is a loop.
const MAX_HOPS: usize = 40;

pub struct TreeBuilder {
    arena: Vec<MNode>,
    pub skipped: Skipped,
}

/// Splits a tar path into clean components: no empty, `.` or `..` parts.
/// `..` is resolved lexically and clamped at the root, so no entry can
/// name anything outside the tree (as securejoin and containerd do).
pub fn normalize(path: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn makedev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    ((major & 0xffff_f000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0xff)
}

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A resolved directory: it and its ancestors, from the root.
type Chain = Vec<usize>;

/// Whether a parent walk may create what it needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Missing directories are created, non-directories in the way are
    /// replaced by directories (an entry's parent).
    Create { layer: u32, mtime: i64 },
    /// Nothing is changed; a missing or non-directory component fails.
    Lookup,
}

impl TreeBuilder {
    pub fn new() -> Self {
        // The root without a "./" entry of any layer has mtime 0, as umoci
        // unpacks it; other implicit directories follow the rule in walk().
        let mut root = MNode::implicit_dir(0, 0);
        root.implicit = None;
        Self {
            arena: vec![root],
            skipped: Skipped::default(),
        }
    }

    /// Resolves the directory `comps` inside the image root, as containerd's
    /// `fs.RootPath` and umoci's securejoin resolve an entry's parent:
    /// symlinks are followed (absolute targets from the image root, `..`
    /// stopping at the root), so a later layer's `a/b` under a symlink `a`
    /// lands where `a` points. Returns the chain of directories from the
    /// root, or None when it runs into /proc, /sys or
    /// /dev (never indexed) or, in Lookup mode, into a missing component or
    /// a non-directory.
    fn walk(&mut self, comps: &[&[u8]], mode: Walk) -> Result<Option<Chain>, TreeError> {
        let mut todo: std::collections::VecDeque<Vec<u8>> = comps.iter().map(|c| c.to_vec()).collect();
        let mut chain: Chain = vec![0];
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if chain.len() > 1 {
                        chain.pop();
                    }
                    continue;
                }
                _ => {}
            }
            if chain.len() == 1 && EXCLUDED.contains(&c.as_slice()) {
                return Ok(None);
            }
            let cur = *chain.last().expect("root");
            let existing = self.arena[cur].children.get(&c).copied();
            let next = match existing.map(|id| (id, self.arena[id].kind)) {
                Some((id, Kind::Dir)) => id,
                Some((id, Kind::Symlink)) => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        let path = comps.join(&b'/');
                        return Err(TreeError::SymlinkLoop {
                            path: String::from_utf8_lossy(&path).into_owned(),
                        });
                    }
                    let target = self.arena[id].target.clone();
                    if target.first() == Some(&b'/') {
                        chain.truncate(1);
                    }
                    for t in target.split(|&b| b == b'/').rev() {
                        todo.push_front(t.to_vec());
                    }
                    continue;
                }
                other => match mode {
                    Walk::Lookup => return Ok(None),
                    Walk::Create { layer, mtime } => {
                        if other.is_some() {
                            self.skipped.replaced_by_dir += 1;
                        }
                        let id = self.arena.len();
                        self.arena.push(MNode::implicit_dir(mtime, layer));
                        self.arena[cur].children.insert(c.clone(), id);
                        id
                    }
                },
            };
            chain.push(next);
        }
        if let Walk::Create { layer, mtime } = mode {
            // An implicit directory's mtime is the newest mtime of what its
            // layer put beneath it: deterministic, whatever the tar order.
            for &id in &chain {
                let n = &mut self.arena[id];
                if n.implicit == Some(layer) && mtime > n.mtime {
                    n.mtime = mtime;
                }
            }
        }
        Ok(Some(chain))
    }

    /// The node at `comps` (its last component not followed), or None.
    fn lookup(&mut self, comps: &[&[u8]]) -> Result<Option<usize>, TreeError> {
        let Some((name, dir)) = comps.split_last() else {
            return Ok(Some(0));
        };
        Ok(self
            .walk(dir, Walk::Lookup)?
            .and_then(|chain| self.arena[*chain.last().expect("root")].children.get(*name).copied()))
    }

    fn node_from(entry: &Entry, layer: u32) -> MNode {
        let kind = match entry.kind {
            EntryKind::File | EntryKind::Hardlink => Kind::File,
            EntryKind::Dir => Kind::Dir,
            EntryKind::Symlink => Kind::Symlink,
            EntryKind::CharDev => Kind::CharDev,
            EntryKind::BlockDev => Kind::BlockDev,
            EntryKind::Fifo => Kind::Fifo,
        };
        let data = match (&entry.sparse, kind) {
            (Some(segments), _) => Data::Sparse {
                layer,
                segments: segments.clone(),
            },
            (None, Kind::File) if entry.size > 0 => Data::Contiguous {
                layer,
                offset: entry.offset,
            },
            _ => Data::None,
        };
        MNode {
            kind,
            // A symlink's own mode means nothing on Linux: every
            // filesystem, and umoci's unpack, shows 0777.
            mode: if kind == Kind::Symlink { 0o777 } else { entry.mode },
            uid: entry.uid,
            gid: entry.gid,
            mtime: entry.mtime,
            mtime_nsec: entry.mtime_nsec,
            size: if kind == Kind::File { entry.size } else { 0 },
            rdev: makedev(entry.dev_major, entry.dev_minor),
            target: if kind == Kind::Symlink {
                entry.link.clone()
            } else {
                Vec::new()
            },
            xattrs: entry.xattrs.clone(),
            data,
            children: BTreeMap::new(),
            implicit: None,
        }
    }

    /// Resolves (creating as needed) the parent of an entry named `name`
    /// under `dir`; None when the entry is one of the paths the runtime
    /// mounts over.
    fn parent_for(&mut self, dir: &[&[u8]], name: &[u8], layer: u32, mtime: i64) -> Result<Option<usize>, TreeError> {
        let Some(chain) = self.walk(dir, Walk::Create { layer, mtime })? else {
            self.skipped.excluded += 1;
            return Ok(None);
        };
        if chain.len() == 1 && EXCLUDED.contains(&name) {
            self.skipped.excluded += 1;
            return Ok(None);
        }
        Ok(chain.last().copied())
    }

    /// Applies one layer's entries on top of the tree, as containerd's and
    /// umoci's unpackers would.
    pub fn apply_layer(&mut self, layer: u32, entries: &[Entry]) -> Result<(), TreeError> {
        let items: Vec<(Vec<&[u8]>, &Entry)> = entries.iter().map(|e| (normalize(&e.path), e)).collect();
        // A hardlink may name a lower-layer file that this layer then
        // whites out: the link keeps that file (its inode lives on), so
        // resolve such targets before the whiteouts. Targets that this
        // layer itself writes are resolved after its entries.
        let written: std::collections::HashSet<Vec<u8>> = items
            .iter()
            .filter(|(c, _)| c.last().is_some_and(|n| !n.starts_with(WHITEOUT)))
            .map(|(c, _)| c.join(&b'/'))
            .collect();
        let mut links = Vec::new();
        for (comps, e) in &items {
            if e.kind == EntryKind::Hardlink {
                let target = normalize(&e.link);
                let lower = if written.contains(&target.join(&b'/')) || target.is_empty() {
                    None
                } else {
                    self.lookup(&target)?
                };
                links.push((comps.clone(), *e, lower));
            }
        }
        // Whiteouts hide only lower layers, whatever their place in this
        // layer's tar: apply them all first.
        for (comps, _) in &items {
            let Some((name, dir)) = comps.split_last() else {
                continue;
            };
            let is_opaque = *name == OPAQUE;
            let Some(target) = name.strip_prefix(WHITEOUT) else {
                continue;
            };
            if !is_opaque && target.starts_with(WHITEOUT) {
                continue; // other .wh..wh. markers (hardlink dirs): nothing to hide
            }
            let Some(chain) = self.walk(dir, Walk::Lookup)? else {
                continue;
            };
            let d = *chain.last().expect("root");
            if is_opaque {
                self.arena[d].children.clear();
            } else {
                self.arena[d].children.remove(target);
            }
        }
        for (comps, e) in &items {
            let Some((name, dir)) = comps.split_last() else {
                // The root itself ("./"): take its metadata.
                if e.kind == EntryKind::Dir {
                    let children = std::mem::take(&mut self.arena[0].children);
                    self.arena[0] = MNode {
                        children,
                        ..Self::node_from(e, layer)
                    };
                }
                continue;
            };
            if name.starts_with(WHITEOUT) || e.kind == EntryKind::Hardlink {
                continue;
            }
            let Some(parent) = self.parent_for(dir, name, layer, e.mtime)? else {
                continue;
            };
            let new = Self::node_from(e, layer);
            match self.arena[parent].children.get(*name).copied() {
                // A directory over a directory merges: new metadata, the
                // lower contents stay.
                Some(old) if self.arena[old].kind == Kind::Dir && new.kind == Kind::Dir => {
                    let children = std::mem::take(&mut self.arena[old].children);
                    self.arena[old] = MNode { children, ..new };
                }
                _ => {
                    let id = self.arena.len();
                    self.arena.push(new);
                    self.arena[parent].children.insert(name.to_vec(), id);
                }
            }
        }
        // Hardlinks last, so a link may come before or after its target in
        // the tar; chains within the layer resolve over several rounds.
        while !links.is_empty() {
            let before = links.len();
            let mut left = Vec::new();
            for (comps, e, lower) in std::mem::take(&mut links) {
                let target = normalize(&e.link);
                let found = match lower {
                    Some(t) => Some(t),
                    None if target.is_empty() => None,
                    None => self.lookup(&target)?,
                };
                let Some(t) = found.filter(|&t| self.arena[t].kind != Kind::Dir) else {
                    left.push((comps, e, lower));
                    continue;
                };
                let Some((name, dir)) = comps.split_last() else {
                    self.skipped.bad_hardlinks += 1;
                    continue;
                };
                let Some(parent) = self.parent_for(dir, name, layer, e.mtime)? else {
                    continue;
                };
                self.arena[parent].children.insert(name.to_vec(), t);
            }
            links = left;
            if links.len() == before {
                for (_, e, _) in &links {
                    tracing::warn!(
                        path = %String::from_utf8_lossy(&e.path),
                        target = %String::from_utf8_lossy(&e.link),
                        "skipping hardlink whose target is missing or a directory"
                    );
                }
                self.skipped.bad_hardlinks += links.len() as u64;
                break;
            }
        }
        Ok(())
    }

    /// Numbers the reachable nodes breadth-first in name order (so the same
    /// image always gets the same inodes) and returns them by inode.
    pub fn finish(self) -> Vec<Node> {
        let mut ino_of = vec![0u64; self.arena.len()];
        let mut order = vec![0usize];
        let mut parent_of = vec![ROOT_INO];
        let mut links = vec![0u32; self.arena.len()];
        ino_of[0] = ROOT_INO;
        let mut i = 0;
        while i < order.len() {
            let id = order[i];
            for &child in self.arena[id].children.values() {
                links[child] += 1;
                if ino_of[child] == 0 {
                    order.push(child);
                    parent_of.push(i as u64 + 1);
                    ino_of[child] = order.len() as u64;
                }
            }
            i += 1;
        }
        let is_dir: Vec<bool> = self.arena.iter().map(|n| n.kind == Kind::Dir).collect();
        let mut arena: Vec<Option<MNode>> = self.arena.into_iter().map(Some).collect();
        order
            .iter()
            .zip(parent_of)
            .map(|(&id, parent)| {
                let m = arena[id].take().expect("each node once");
                let entries: Vec<DirEntry> = m
                    .children
                    .iter()
                    .map(|(name, &c)| DirEntry {
                        name: name.clone(),
                        ino: ino_of[c],
                    })
                    .collect();
                let nlink = if m.kind == Kind::Dir {
                    2 + m.children.values().filter(|&&c| is_dir[c]).count() as u32
                } else {
                    links[id]
                };
                Node {
                    kind: m.kind,
                    mode: m.mode,
                    uid: m.uid,
                    gid: m.gid,
                    mtime: m.mtime,
                    mtime_nsec: m.mtime_nsec,
                    size: m.size,
                    nlink,
                    rdev: m.rdev,
                    parent,
                    target: m.target,
                    xattrs: m.xattrs,
                    data: m.data,
                    entries,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 7,
            mtime_nsec: 0,
            size: if kind == EntryKind::File { 3 } else { 0 },
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            offset: 512,
            sparse: None,
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            link: target.as_bytes().to_vec(),
            ..e(path, EntryKind::Hardlink)
        }
    }

    fn sym(path: &str, target: &str) -> Entry {
        Entry {
            link: target.as_bytes().to_vec(),
            ..e(path, EntryKind::Symlink)
        }
    }

    fn at(nodes: &[Node], path: &str) -> Node {
        nodes[resolve(nodes, path).unwrap_or_else(|| panic!("{path} missing")) as usize - 1].clone()
    }

    fn build(layers: &[Vec<Entry>]) -> (Vec<Node>, Skipped) {
        let mut t = TreeBuilder::new();
        for (i, l) in layers.iter().enumerate() {
            t.apply_layer(i as u32, l).unwrap();
        }
        let skipped = t.skipped;
        (t.finish(), skipped)
    }

    fn resolve(nodes: &[Node], path: &str) -> Option<u64> {
        let mut ino = ROOT_INO;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            let n = &nodes[ino as usize - 1];
            ino = n.entries.iter().find(|d| d.name == c.as_bytes())?.ino;
        }
        Some(ino)
    }

    #[test]
    fn hardlinks_before_after_and_across_layers() {
        let (nodes, skipped) = build(&[
            vec![e("a/target", EntryKind::File)],
            vec![
                link("b/first", "b/later"),
                e("b/later", EntryKind::File),
                link("b/chain", "b/first"),
                link("b/lower", "a/target"),
                link("b/dir", "a"),
                link("b/missing", "nope"),
            ],
        ]);
        let later = resolve(&nodes, "b/later").unwrap();
        assert_eq!(resolve(&nodes, "b/first"), Some(later));
        assert_eq!(resolve(&nodes, "b/chain"), Some(later));
        assert_eq!(nodes[later as usize - 1].nlink, 3);
        let target = resolve(&nodes, "a/target").unwrap();
        assert_eq!(resolve(&nodes, "b/lower"), Some(target));
        assert_eq!(nodes[target as usize - 1].nlink, 2);
        assert_eq!(resolve(&nodes, "b/dir"), None);
        assert_eq!(skipped.bad_hardlinks, 2);
        // b was never listed: it exists as an implicit directory.
        let b = resolve(&nodes, "b").unwrap();
        assert_eq!(nodes[b as usize - 1].kind, Kind::Dir);
        assert_eq!(nodes[b as usize - 1].mode, 0o755);
    }

    #[test]
    fn whiteouts_hide_only_lower_layers() {
        let (nodes, _) = build(&[
            vec![
                e("d/x", EntryKind::File),
                e("d/y", EntryKind::File),
                e("o/old", EntryKind::File),
            ],
            vec![
                e("d/x", EntryKind::File),
                e("d/.wh.x", EntryKind::File),
                e("d/.wh.y", EntryKind::File),
                e("o/new", EntryKind::File),
                e("o/.wh..wh..opq", EntryKind::File),
                e("d/.wh..wh.plnk", EntryKind::File),
            ],
        ]);
        assert!(
            resolve(&nodes, "d/x").is_some(),
            "same-layer entry survives its whiteout"
        );
        assert!(resolve(&nodes, "d/y").is_none());
        assert!(resolve(&nodes, "o/old").is_none());
        assert!(resolve(&nodes, "o/new").is_some());
        assert!(nodes
            .iter()
            .all(|n| n.entries.iter().all(|d| !d.name.starts_with(b".wh."))));
    }

    #[test]
    fn type_changes_paths_and_exclusions() {
        let (nodes, skipped) = build(&[
            vec![
                e("./", EntryKind::Dir),
                e("f", EntryKind::File),
                e("dir/inner", EntryKind::File),
                e("proc/1/status", EntryKind::File),
                e("dev/null", EntryKind::CharDev),
                e("../../../etc/x", EntryKind::File),
                e("/abs/y", EntryKind::File),
            ],
            vec![
                Entry {
                    mode: 0o700,
                    ..e("f", EntryKind::Dir)
                },
                e("f/inside", EntryKind::File),
                e("dir", EntryKind::File),
                Entry {
                    mode: 0o711,
                    ..e(".", EntryKind::Dir)
                },
                e("f2/sub/deep", EntryKind::File),
            ],
        ]);
        assert_eq!(nodes[0].mode, 0o711, "root takes './' metadata");
        let f = resolve(&nodes, "f").unwrap();
        assert_eq!(nodes[f as usize - 1].kind, Kind::Dir);
        assert!(resolve(&nodes, "f/inside").is_some());
        let d = resolve(&nodes, "dir").unwrap();
        assert_eq!(nodes[d as usize - 1].kind, Kind::File);
        assert!(resolve(&nodes, "dir/inner").is_none());
        assert!(resolve(&nodes, "proc").is_none() && resolve(&nodes, "dev").is_none());
        assert_eq!(skipped.excluded, 2);
        assert!(resolve(&nodes, "etc/x").is_some());
        assert!(resolve(&nodes, "abs/y").is_some());
        // Directory link counts: 2 + subdirectories.
        assert_eq!(nodes[0].nlink, 2 + 4, "f, etc, abs, f2");
    }

    #[test]
    fn inodes_are_breadth_first_in_name_order() {
        let layer = vec![
            e("b/z", EntryKind::File),
            e("a", EntryKind::File),
            e("b/y", EntryKind::File),
        ];
        let (nodes, _) = build(std::slice::from_ref(&layer));
        assert_eq!(resolve(&nodes, "a"), Some(2));
        assert_eq!(resolve(&nodes, "b"), Some(3));
        assert_eq!(resolve(&nodes, "b/y"), Some(4));
        assert_eq!(resolve(&nodes, "b/z"), Some(5));
        let mut reordered = layer.clone();
        reordered.reverse();
        assert_eq!(build(&[reordered]).0, nodes);
        for (i, n) in nodes.iter().enumerate().skip(1) {
            let parent = &nodes[n.parent as usize - 1];
            assert!(parent.entries.iter().any(|d| d.ino == i as u64 + 1));
        }
    }

    #[test]
    fn later_entries_under_a_lower_symlink_land_where_it_points() {
        let (nodes, _) = build(&[
            vec![
                e("real/", EntryKind::Dir),
                e("usr/lib/", EntryKind::Dir),
                sym("rel", "real"),
                sym("abs", "/real"),
                sym("climb", "../../../real"),
                sym("lib", "usr/lib"),
                sym("chain", "rel"),
                sym("dangling", "nowhere/deeper"),
                sym("up", "usr/lib/../.."),
            ],
            vec![
                e("rel/a", EntryKind::File),
                e("abs/b", EntryKind::File),
                e("climb/c", EntryKind::File),
                e("lib/x/y", EntryKind::File),
                e("chain/d", EntryKind::File),
                e("dangling/e", EntryKind::File),
                e("up/f", EntryKind::File),
            ],
        ]);
        for (link, target) in [
            ("rel", "real"),
            ("abs", "/real"),
            ("climb", "../../../real"),
            ("lib", "usr/lib"),
        ] {
            let n = at(&nodes, link);
            assert_eq!(n.kind, Kind::Symlink, "{link} stays a symlink");
            assert_eq!(n.target, target.as_bytes());
            assert_eq!(n.mode, 0o777, "symlinks are 0777 whatever their header says");
        }
        for f in [
            "real/a",
            "real/b",
            "real/c",
            "usr/lib/x/y",
            "real/d",
            "nowhere/deeper/e",
            "f",
        ] {
            assert!(resolve(&nodes, f).is_some(), "{f} missing");
        }
        // A missing target is created where it points, as securejoin does.
        assert_eq!(at(&nodes, "nowhere").kind, Kind::Dir);
    }

    #[test]
    fn a_symlink_loop_is_an_error() {
        let mut t = TreeBuilder::new();
        t.apply_layer(0, &[sym("a", "b"), sym("b", "a")]).unwrap();
        let err = t.apply_layer(1, &[e("a/x", EntryKind::File)]).unwrap_err();
        assert!(err.to_string().contains("loop"), "{err}");
        // Symlinks into /proc, /sys or /dev lead nowhere the index keeps.
        let mut t = TreeBuilder::new();
        t.apply_layer(0, &[sym("p", "/proc/self")]).unwrap();
        t.apply_layer(1, &[e("p/x", EntryKind::File)]).unwrap();
        assert_eq!(t.skipped.excluded, 1);
        assert!(resolve(&t.finish(), "proc").is_none());
    }

    #[test]
    fn a_hardlink_keeps_a_lower_file_its_layer_whites_out() {
        let (nodes, skipped) = build(&[
            vec![Entry {
                size: 3,
                ..e("f", EntryKind::File)
            }],
            vec![link("g", "f"), e(".wh.f", EntryKind::File)],
            vec![e(".wh.h", EntryKind::File), link("h2", "h")],
        ]);
        assert!(resolve(&nodes, "f").is_none());
        let g = at(&nodes, "g");
        assert_eq!(g.kind, Kind::File);
        assert_eq!(g.data, Data::Contiguous { layer: 0, offset: 512 }, "g has f's content");
        assert_eq!(g.nlink, 1);
        assert_eq!(skipped.bad_hardlinks, 1, "a link to nothing is still skipped");
    }

    #[test]
    fn implicit_directories_take_the_newest_mtime_beneath_them() {
        let mut deep = e("a/b/c", EntryKind::File);
        deep.mtime = 30;
        let mut other = e("a/x", EntryKind::File);
        other.mtime = 20;
        let mut late_dir = e("d/", EntryKind::Dir);
        late_dir.mtime = 5;
        let mut in_d = e("d/y", EntryKind::File);
        in_d.mtime = 99;
        let layer = vec![other, deep, in_d, late_dir];
        let (nodes, _) = build(std::slice::from_ref(&layer));
        assert_eq!(at(&nodes, "a").mtime, 30);
        assert_eq!(at(&nodes, "a/b").mtime, 30);
        assert_eq!(at(&nodes, "d").mtime, 5, "an explicit entry's own mtime wins");
        assert_eq!(nodes[0].mtime, 0, "a root without an entry of its own: the epoch");
        // The same in any tar order.
        let mut reversed = layer.clone();
        reversed.reverse();
        let (again, _) = build(&[reversed]);
        assert_eq!(at(&again, "a").mtime, 30);
        // A later layer's entries do not touch an earlier implicit dir.
        let mut newer = e("a/z", EntryKind::File);
        newer.mtime = 1000;
        let (nodes, _) = build(&[layer, vec![newer]]);
        assert_eq!(at(&nodes, "a").mtime, 30);
    }
}
