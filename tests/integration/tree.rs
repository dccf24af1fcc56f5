//! Compares a tree described by `clipctl inspect --ls / -R --json --hash`
//! with a directory on disk (a `umoci unpack` rootfs).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde_json::Value;
use sha2::Digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub size: Option<u64>,
    pub nlink: Option<u64>,
    pub target: Option<Vec<u8>>,
    pub dev: Option<(u64, u64)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub sha256: Option<String>,
}

pub struct Tree {
    pub entries: BTreeMap<Vec<u8>, Entry>,
    /// Sets of paths sharing one inode (hardlinks), only sets of two or more.
    pub links: BTreeSet<Vec<Vec<u8>>>,
}

fn groups(by_ino: BTreeMap<u64, Vec<Vec<u8>>>) -> BTreeSet<Vec<Vec<u8>>> {
    by_ino
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect()
}

const EXCLUDED: [&str; 3] = ["proc", "sys", "dev"];

fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Reads a directory tree from disk; file contents are hashed.
pub fn from_disk(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), b"/".to_vec())];
    while let Some((p, rel)) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let xattrs = xattr::list(&p)
            .unwrap()
            .map(|k| {
                let v = xattr::get(&p, &k).unwrap().unwrap_or_default();
                (k.as_bytes().to_vec(), v)
            })
            .collect();
        let e = Entry {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec() as u32),
            size: (kind == "file").then(|| md.size()),
            nlink: (kind != "dir").then(|| md.nlink()),
            target: (kind == "symlink").then(|| std::fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
            dev: matches!(kind, "char" | "block").then(|| {
                let r = md.rdev();
                (
                    ((r >> 32) & 0xffff_f000) | ((r >> 8) & 0xfff),
                    ((r >> 12) & 0xffff_ff00) | (r & 0xff),
                )
            }),
            xattrs,
            sha256: (kind == "file").then(|| sha256_file(&p)),
        };
        if kind != "dir" {
            by_ino.entry(md.ino()).or_default().push(rel.clone());
        }
        if kind == "dir" {
            for child in std::fs::read_dir(&p).unwrap() {
                let child = child.unwrap();
                let name = child.file_name();
                if rel == b"/" && EXCLUDED.iter().any(|x| name.as_bytes() == x.as_bytes()) {
                    continue;
                }
                let mut crel = rel.clone();
                if crel != b"/" {
                    crel.push(b'/');
                }
                crel.extend_from_slice(name.as_bytes());
                stack.push((child.path(), crel));
            }
        }
        entries.insert(rel, e);
    }
    Tree {
        entries,
        links: groups(by_ino),
    }
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(|x| x.as_str()).map(str::to_string)
}

/// Parses `clipctl inspect --ls / -R --json --hash` output.
pub fn from_clip(json: &[u8]) -> Tree {
    let arr: Vec<Value> = serde_json::from_slice(json).unwrap();
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for v in arr {
        let path = match str_field(&v, "path_hex") {
            Some(h) => hex::decode(h).unwrap(),
            None => str_field(&v, "path").unwrap().into_bytes(),
        };
        let kind: &'static str = match v["type"].as_str().unwrap() {
            "dir" => "dir",
            "file" => "file",
            "symlink" => "symlink",
            "char" => "char",
            "block" => "block",
            "fifo" => "fifo",
            other => panic!("unknown type {other}"),
        };
        let num = |k: &str| v[k].as_u64().unwrap();
        let xattrs = v
            .get("xattrs_hex")
            .and_then(|x| x.as_object())
            .map(|o| {
                o.iter()
                    .map(|(k, val)| (k.as_bytes().to_vec(), hex::decode(val.as_str().unwrap()).unwrap()))
                    .collect()
            })
            .unwrap_or_default();
        let e = Entry {
            kind,
            mode: num("mode") as u32,
            uid: num("uid") as u32,
            gid: num("gid") as u32,
            mtime: (v["mtime"].as_i64().unwrap(), num("mtime_nsec") as u32),
            size: (kind == "file").then(|| num("size")),
            nlink: (kind != "dir").then(|| num("nlink")),
            target: (kind == "symlink").then(|| hex::decode(str_field(&v, "target_hex").unwrap()).unwrap()),
            dev: matches!(kind, "char" | "block").then(|| (num("major"), num("minor"))),
            xattrs,
            sha256: str_field(&v, "sha256"),
        };
        if kind != "dir" {
            by_ino.entry(num("ino")).or_default().push(path.clone());
        }
        entries.insert(path, e);
    }
    Tree {
        entries,
        links: groups(by_ino),
    }
}

/// Asserts that two trees are equal, listing every difference.
pub fn assert_same(clip: &Tree, disk: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (p, d) in &disk.entries {
        match clip.entries.get(p) {
            None => diffs.push(format!("missing in clip: {}", String::from_utf8_lossy(p))),
            Some(c) if c != d => diffs.push(format!(
                "differs: {}\n   clip: {c:?}\n   disk: {d:?}",
                String::from_utf8_lossy(p)
            )),
            _ => {}
        }
    }
    for p in clip.entries.keys().filter(|p| !disk.entries.contains_key(*p)) {
        diffs.push(format!("extra in clip: {}", String::from_utf8_lossy(p)));
    }
    if clip.links != disk.links {
        diffs.push(format!(
            "hardlink groups differ:\n   clip: {:?}\n   disk: {:?}",
            clip.links, disk.links
        ));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n{}",
        diffs.len(),
        diffs.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}
