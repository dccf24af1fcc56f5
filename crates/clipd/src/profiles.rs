//! Prefetch profiles, kept next to the image's index (`INDEX.profile`):
//! the units an image's containers read first, in first-access order, and
//! how far into each the reads went; the names the kernel looked up
//! meanwhile; and the layer bytes the reads asked for, which a fresh mount
//! writes into the kernel's page cache as they arrive. A new recording
//! refines the profile: what it saw that the profile lacks is appended,
//! up to a bound, and a unit read further than before keeps the further
//! reach.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clip_format::{Index, Kind};
use clip_fs::view::{LayerRead, Reach, Recording, UnitRef};
use serde::{Deserialize, Serialize};

/// The most units a profile keeps.
const MAX_UNITS: usize = 1 << 16;
/// The most lookups a profile keeps, and the most bytes of their paths.
const MAX_LOOKUPS: usize = clip_fs::view::MAX_RECORDED_LOOKUPS;
const MAX_LOOKUP_BYTES: usize = 4 << 20;
/// The most reads a profile keeps.
const MAX_READS: usize = clip_fs::view::MAX_RECORDED_READS;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    /// The image manifest the index (and so the units) belong to.
    pub manifest_digest: String,
    /// (layer, unit) in first-access order.
    pub units: Vec<UnitRef>,
    /// How far into each of `units` reads went (bytes from its start).
    /// Absent from profiles written before it was kept (and published
    /// ones): their units are replayed whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach: Vec<u64>,
    /// Paths from the image's root whose last name the kernel looked up,
    /// in first-lookup order: found or not in the first recording, found
    /// in later ones. A fresh mount looks them up
    /// itself before its container does: each is a FUSE round trip that
    /// then leaves the container's way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lookups: Vec<String>,
    /// The layer bytes the recorded reads asked for, in first-access
    /// order: a fresh mount hands them to the kernel's page cache as their
    /// units arrive, so the container reads them without a FUSE round trip.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<LayerRead>,
}

impl Profile {
    /// The units to replay, in order, each with its reach.
    pub fn replay_list(&self) -> Vec<Reach> {
        let known = self.reach.len() == self.units.len();
        self.units
            .iter()
            .enumerate()
            .map(|(i, &u)| (u, if known { self.reach[i] } else { u64::MAX }))
            .collect()
    }

    /// The profile's lookups that stay inside the image when a mount of
    /// `index` looks them up: every name but the last is a directory of
    /// the index (so no symlink is followed on the way), and the last is
    /// one plain name. A published profile is data from the registry.
    pub fn lookups_in(&self, index: &Index) -> Vec<&str> {
        self.lookups
            .iter()
            .take(MAX_LOOKUPS)
            .filter(|p| {
                let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
                let plain = |c: &str| !c.is_empty() && c != "." && c != ".." && !c.contains('\0');
                plain(name)
                    && (dir.is_empty() || dir.split('/').all(plain))
                    && index
                        .resolve(dir.as_bytes())
                        .and_then(|i| index.node(i))
                        .is_some_and(|n| n.kind == Kind::Dir)
            })
            .map(String::as_str)
            .collect()
    }
}

pub fn path_for(index: &Path) -> PathBuf {
    index.with_extension("profile")
}

/// The profile of the index at `index`, if one was recorded for this
/// very manifest.
pub fn load(index: &Path, manifest_digest: &str) -> Option<Profile> {
    let p: Profile = serde_json::from_slice(&std::fs::read(path_for(index)).ok()?).ok()?;
    (p.version == 1 && p.manifest_digest == manifest_digest).then_some(p)
}

/// Adds a recording to the profile; returns how many units it has now.
pub fn merge(index: &Path, manifest_digest: &str, recorded: &Recording) -> Result<usize> {
    let mut p = load(index, manifest_digest).unwrap_or(Profile {
        version: 1,
        manifest_digest: manifest_digest.to_string(),
        ..Default::default()
    });
    let mut reach = p.replay_list().into_iter().map(|(_, r)| r).collect::<Vec<_>>();
    let mut places: std::collections::HashMap<UnitRef, usize> =
        p.units.iter().enumerate().map(|(i, &u)| (u, i)).collect();
    for &(u, r) in &recorded.units {
        match places.get(&u) {
            Some(&i) => reach[i] = reach[i].max(r),
            None if p.units.len() < MAX_UNITS => {
                places.insert(u, p.units.len());
                p.units.push(u);
                reach.push(r);
            }
            None => {}
        }
    }
    p.reach = reach;
    // Names a workload makes up (temporary files, Python's `X.pyc.ID`
    // while it writes bytecode) are looked up absent, and new ones come
    // with every run: absent names are taken from the first recording
    // only, and later ones add names the image has.
    let first = p.lookups.is_empty();
    let mut known: std::collections::HashSet<String> = p.lookups.iter().cloned().collect();
    let mut bytes: usize = p.lookups.iter().map(String::len).sum();
    for (l, found) in &recorded.lookups {
        if p.lookups.len() >= MAX_LOOKUPS || bytes + l.len() > MAX_LOOKUP_BYTES {
            break;
        }
        if (first || *found) && known.insert(l.clone()) {
            bytes += l.len();
            p.lookups.push(l.clone());
        }
    }
    // Reads starting where one already does are seen; the first
    // recording's ranges stand.
    let mut starts: std::collections::HashSet<(u32, u64)> = p.reads.iter().map(|&(l, pos, _)| (l, pos)).collect();
    for &r in &recorded.reads {
        if p.reads.len() >= MAX_READS {
            break;
        }
        if starts.insert((r.0, r.1)) {
            p.reads.push(r);
        }
    }
    crate::images::write_atomic(&path_for(index), &serde_json::to_vec(&p)?)?;
    Ok(p.units.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(u: &[Reach]) -> Recording {
        Recording {
            units: u.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn recordings_refine_a_profile_in_first_access_order() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.clip");
        assert!(load(&index, "sha256:a").is_none());
        assert_eq!(
            merge(&index, "sha256:a", &units(&[((0, 5), 10), ((1, 2), 20), ((0, 1), 30)])).unwrap(),
            3
        );
        assert_eq!(
            merge(&index, "sha256:a", &units(&[((1, 2), 5), ((0, 9), 40), ((0, 5), 50)])).unwrap(),
            4
        );
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(p.units, vec![(0, 5), (1, 2), (0, 1), (0, 9)]);
        assert_eq!(p.reach, vec![50, 20, 30, 40], "each unit keeps its furthest reach");
        assert!(load(&index, "sha256:b").is_none(), "a profile binds to its manifest");
    }

    #[test]
    fn reads_refine_in_first_access_order_within_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.clip");
        let rec = |r: Vec<LayerRead>| Recording {
            reads: r,
            ..Default::default()
        };
        merge(&index, "sha256:a", &rec(vec![(0, 4096, 8192), (1, 0, 4096)])).unwrap();
        merge(
            &index,
            "sha256:a",
            &rec(vec![(1, 0, 65536), (0, 0, 4096), (1, 8192, 4096)]),
        )
        .unwrap();
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(
            p.reads,
            vec![(0, 4096, 8192), (1, 0, 4096), (0, 0, 4096), (1, 8192, 4096)]
        );
        let many = (0..MAX_READS as u64 + 10).map(|i| (2, i << 12, 4096)).collect();
        merge(&index, "sha256:a", &rec(many)).unwrap();
        assert_eq!(load(&index, "sha256:a").unwrap().reads.len(), MAX_READS);
        // Profiles written before reads were kept still load.
        let old = r#"{"version":1,"manifest_digest":"sha256:b","units":[[0,1]]}"#;
        std::fs::write(path_for(&index), old).unwrap();
        assert!(load(&index, "sha256:b").unwrap().reads.is_empty());
    }

    #[test]
    fn lookups_refine_in_first_lookup_order_without_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.clip");
        // A leading `-`: a name the image does not have.
        let rec = |l: &[&str]| Recording {
            units: Vec::new(),
            reads: Vec::new(),
            lookups: l
                .iter()
                .map(|s| (s.trim_start_matches('-').to_string(), !s.starts_with('-')))
                .collect(),
        };
        merge(&index, "sha256:a", &rec(&["usr", "usr/lib", "-nope"])).unwrap();
        merge(
            &index,
            "sha256:a",
            &rec(&["etc", "usr/lib", "-x.pyc.1234", "etc/passwd"]),
        )
        .unwrap();
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(
            p.lookups,
            ["usr", "usr/lib", "nope", "etc", "etc/passwd"],
            "absent names come from the first recording only"
        );
        // Bounded: a recording past the bound adds nothing more.
        let many = (0..MAX_LOOKUPS + 10).map(|i| (format!("n{i}"), true)).collect();
        merge(
            &index,
            "sha256:a",
            &Recording {
                lookups: many,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(load(&index, "sha256:a").unwrap().lookups.len(), MAX_LOOKUPS);
    }

    #[test]
    fn only_lookups_through_the_images_own_directories_are_made() {
        use clip_format::{Data, DirEntry, Image, Node, ROOT_INO};
        let node = |kind, parent, entries: Vec<DirEntry>, target: &[u8]| Node {
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            nlink: 1,
            rdev: 0,
            parent,
            target: target.to_vec(),
            xattrs: Vec::new(),
            data: Data::None,
            entries,
        };
        let e = |name: &str, ino| DirEntry {
            name: name.as_bytes().to_vec(),
            ino,
        };
        // / = {etc (dir 2), link -> /etc (3), file (4)}; etc = {}
        let index = Index {
            image: Image {
                reference: String::new(),
                manifest_digest: String::new(),
                manifest_media_type: String::new(),
                platform: String::new(),
                config_digest: String::new(),
                config: Vec::new(),
            },
            spacing: 1 << 20,
            layers: Vec::new(),
            nodes: vec![
                node(Kind::Dir, ROOT_INO, vec![e("etc", 2), e("file", 4), e("link", 3)], b""),
                node(Kind::Dir, ROOT_INO, Vec::new(), b""),
                node(Kind::Symlink, ROOT_INO, Vec::new(), b"/etc"),
                node(Kind::File, ROOT_INO, Vec::new(), b""),
            ],
        };
        let p = Profile {
            lookups: [
                "etc",
                "etc/passwd",
                "link",
                "absent", // kept
                "link/passwd",
                "file/x",
                "absent/x", // through a symlink, a file, nothing
                "/etc/passwd",
                "etc/../etc",
                "etc/./passwd",
                "etc//passwd",
                "",
                "etc/", // not plain
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        };
        assert_eq!(p.lookups_in(&index), ["etc", "etc/passwd", "link", "absent"]);
    }

    #[test]
    fn a_profile_without_reaches_replays_its_units_whole_and_stays_whole() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.clip");
        let old = br#"{"version":1,"manifest_digest":"sha256:a","units":[[0,5],[1,2]]}"#;
        std::fs::write(path_for(&index), old).unwrap();
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(p.replay_list(), vec![((0, 5), u64::MAX), ((1, 2), u64::MAX)]);
        merge(&index, "sha256:a", &units(&[((0, 5), 10), ((0, 7), 20)])).unwrap();
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(
            p.replay_list(),
            vec![((0, 5), u64::MAX), ((1, 2), u64::MAX), ((0, 7), 20)]
        );
    }
}
