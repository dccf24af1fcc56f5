//! Snapshot metadata, per containerd namespace, in one JSON file under the
//! root (`metadata.json`), written whole and atomically at every change.
//! Each local snapshot has `snapshots/ID/fs` (its tree, or its upper) and
//! `snapshots/ID/work` (overlayfs's work directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// The image a remote snapshot is a layer of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub image: String,
    pub manifest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snap {
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Unix time (seconds, nanoseconds).
    pub created: (i64, i32),
    pub updated: (i64, i32),
    #[serde(default)]
    pub remote: Option<Remote>,
}

pub fn now() -> (i64, i32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub next_id: u64,
    /// Namespace, then key.
    pub spaces: BTreeMap<String, BTreeMap<String, Snap>>,
}

impl Meta {
    pub fn space(&mut self, ns: &str) -> &mut BTreeMap<String, Snap> {
        self.spaces.entry(ns.to_string()).or_default()
    }

    pub fn get(&self, ns: &str, key: &str) -> Result<&Snap> {
        self.spaces
            .get(ns)
            .and_then(|s| s.get(key))
            .ok_or_else(|| Error::NotFound(key.to_string()))
    }
}

pub struct Store {
    root: PathBuf,
    meta: Mutex<Meta>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

impl Store {
    /// Opens (creating, root-only) the snapshotter's root.
    pub fn open(root: &Path) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("snapshots"))
            .map_err(io(format!("creating {}", root.display())))?;
        let path = root.join("metadata.json");
        let meta = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Io {
                what: format!("reading {}", path.display()),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        Ok(Self {
            root: root.to_path_buf(),
            meta: Mutex::new(meta),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    pub fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Writes the metadata: a reader after a crash sees the old file or
    /// the new one.
    pub fn save(&self, meta: &Meta) -> Result<()> {
        use std::io::Write;
        let path = self.root.join("metadata.json");
        let tmp = self.root.join(".metadata.json.tmp");
        let bytes = serde_json::to_vec(meta).map_err(|e| Error::Io {
            what: "encoding the metadata".into(),
            source: std::io::Error::other(e),
        })?;
        (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })()
        .map_err(io(format!("writing {}", path.display())))
    }

    /// Makes a local snapshot's directories.
    pub fn make_dirs(&self, id: u64) -> Result<()> {
        for d in [self.fs(id), self.work(id)] {
            std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
        }
        Ok(())
    }
}
