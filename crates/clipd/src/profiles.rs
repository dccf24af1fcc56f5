//! Prefetch profiles: the units an image's containers read first, in
//! first-access order, kept next to the image's index
//! (`INDEX.profile`). A new recording refines the profile: what it saw
//! that the profile lacks is appended, up to a bound.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clip_fs::view::UnitRef;
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
pub fn merge(index: &Path, manifest_digest: &str, recorded: &[UnitRef]) -> Result<usize> {
    let mut p = load(index, manifest_digest).unwrap_or(Profile {
        version: 1,
        manifest_digest: manifest_digest.to_string(),
        units: Vec::new(),
    });
    let have: std::collections::HashSet<UnitRef> = p.units.iter().copied().collect();
    for u in recorded {
        if p.units.len() >= MAX_UNITS {
            break;
        }
        if !have.contains(u) && !p.units.contains(u) {
            p.units.push(*u);
        }
    }
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
        assert_eq!(merge(&index, "sha256:a", &[(0, 5), (1, 2), (0, 1)]).unwrap(), 3);
        assert_eq!(merge(&index, "sha256:a", &[(1, 2), (0, 9), (0, 5)]).unwrap(), 4);
        assert_eq!(
            load(&index, "sha256:a").unwrap().units,
            vec![(0, 5), (1, 2), (0, 1), (0, 9)]
        );
        assert!(load(&index, "sha256:b").is_none(), "a profile binds to its manifest");
    }
}
