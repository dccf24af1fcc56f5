//! Prefetch profiles: the units an image's containers read first, in
//! first-access order, and how far into each the reads went, kept next to
//! the image's index (`INDEX.profile`). A new recording refines the
//! profile: what it saw that the profile lacks is appended, up to a bound,
//! and a unit read further than before keeps the further reach.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clip_fs::view::{Reach, UnitRef};
use serde::{Deserialize, Serialize};

/// The most units a profile keeps.
const MAX_UNITS: usize = 1 << 16;

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
pub fn merge(index: &Path, manifest_digest: &str, recorded: &[Reach]) -> Result<usize> {
    let mut p = load(index, manifest_digest).unwrap_or(Profile {
        version: 1,
        manifest_digest: manifest_digest.to_string(),
        units: Vec::new(),
        reach: Vec::new(),
    });
    let mut reach = p.replay_list().into_iter().map(|(_, r)| r).collect::<Vec<_>>();
    let mut places: std::collections::HashMap<UnitRef, usize> =
        p.units.iter().enumerate().map(|(i, &u)| (u, i)).collect();
    for &(u, r) in recorded {
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
    crate::images::write_atomic(&path_for(index), &serde_json::to_vec(&p)?)?;
    Ok(p.units.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_refine_a_profile_in_first_access_order() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.clip");
        assert!(load(&index, "sha256:a").is_none());
        assert_eq!(
            merge(&index, "sha256:a", &[((0, 5), 10), ((1, 2), 20), ((0, 1), 30)]).unwrap(),
            3
        );
        assert_eq!(
            merge(&index, "sha256:a", &[((1, 2), 5), ((0, 9), 40), ((0, 5), 50)]).unwrap(),
            4
        );
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(p.units, vec![(0, 5), (1, 2), (0, 1), (0, 9)]);
        assert_eq!(p.reach, vec![50, 20, 30, 40], "each unit keeps its furthest reach");
        assert!(load(&index, "sha256:b").is_none(), "a profile binds to its manifest");
    }

    #[test]
    fn a_profile_without_reaches_replays_its_units_whole_and_stays_whole() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("x.clip");
        let old = br#"{"version":1,"manifest_digest":"sha256:a","units":[[0,5],[1,2]]}"#;
        std::fs::write(path_for(&index), old).unwrap();
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(p.replay_list(), vec![((0, 5), u64::MAX), ((1, 2), u64::MAX)]);
        merge(&index, "sha256:a", &[((0, 5), 10), ((0, 7), 20)]).unwrap();
        let p = load(&index, "sha256:a").unwrap();
        assert_eq!(
            p.replay_list(),
            vec![((0, 5), u64::MAX), ((1, 2), u64::MAX), ((0, 7), 20)]
        );
    }
}
