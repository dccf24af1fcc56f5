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
}

impl MNode {
    fn implicit_dir(mtime: i64) -> Self {
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

impl TreeBuilder {
    pub fn new() -> Self {
        Self {
            arena: vec![MNode::implicit_dir(0)],
            skipped: Skipped::default(),
        }
    }

    fn lookup(&self, comps: &[&[u8]]) -> Option<usize> {
        let mut cur = 0;
        for c in comps {
            let n = &self.arena[cur];
            if n.kind != Kind::Dir {
                return None;
            }
            cur = *n.children.get(*c)?;
        }
        Some(cur)
    }

    /// Walks to the directory `comps`, creating missing directories.
    fn ensure_dir(&mut self, comps: &[&[u8]], mtime: i64) -> usize {
        let mut cur = 0;
        for c in comps {
            let next = match self.arena[cur].children.get(*c) {
                Some(&id) if self.arena[id].kind == Kind::Dir => id,
                existing => {
                    if existing.is_some() {
                        self.skipped.replaced_by_dir += 1;
                    }
                    let id = self.arena.len();
                    self.arena.push(MNode::implicit_dir(mtime));
                    self.arena[cur].children.insert(c.to_vec(), id);
                    id
                }
            };
            cur = next;
        }
        cur
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
            mode: entry.mode,
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
        }
    }

    /// Applies one layer's entries on top of the tree.
    pub fn apply_layer(&mut self, layer: u32, entries: &[Entry]) {
        let mut items = Vec::with_capacity(entries.len());
        for e in entries {
            let comps = normalize(&e.path);
            if comps.first().is_some_and(|c| EXCLUDED.contains(c)) {
                self.skipped.excluded += 1;
                continue;
            }
            items.push((comps, e));
        }
        // Whiteouts hide only lower layers, whatever their place in this
        // layer's tar: apply them all first.
        for (comps, _) in &items {
            let Some((name, dir)) = comps.split_last() else {
                continue;
            };
            if *name == OPAQUE {
                if let Some(d) = self.lookup(dir) {
                    if self.arena[d].kind == Kind::Dir {
                        self.arena[d].children.clear();
                    }
                }
            } else if let Some(target) = name.strip_prefix(WHITEOUT) {
                if !target.starts_with(WHITEOUT) {
                    if let Some(d) = self.lookup(dir) {
                        self.arena[d].children.remove(target);
                    }
                }
            }
        }
        let mut links = Vec::new();
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
            if name.starts_with(WHITEOUT) {
                continue;
            }
            if e.kind == EntryKind::Hardlink {
                links.push((comps, *e));
                continue;
            }
            let parent = self.ensure_dir(dir, e.mtime);
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
        // the tar; chains resolve over several rounds.
        while !links.is_empty() {
            let before = links.len();
            links.retain(|(comps, e)| {
                let target = normalize(&e.link);
                match self.lookup(&target) {
                    Some(t) if self.arena[t].kind != Kind::Dir && !target.is_empty() => {
                        let (name, dir) = comps.split_last().expect("non-empty");
                        let parent = self.ensure_dir(dir, e.mtime);
                        self.arena[parent].children.insert(name.to_vec(), t);
                        false
                    }
                    _ => true,
                }
            });
            if links.len() == before {
                for (_, e) in &links {
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

    fn build(layers: &[Vec<Entry>]) -> (Vec<Node>, Skipped) {
        let mut t = TreeBuilder::new();
        for (i, l) in layers.iter().enumerate() {
            t.apply_layer(i as u32, l);
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
}
