//! The daemon's images: references resolved to manifest digests (tags
//! trusted for a while, and remembered on disk so that a cached image
//! starts while its registry is down), indexes stored under
//! `CLIP_BASE_DIR/index`, built when missing, and loaded once.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clip_api::ImageSpec;
use clip_format::IndexFile;
use clip_registry::{CredentialSource, ImageRef, ImageSource, Platform, Registries};
use serde::{Deserialize, Serialize};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Resolution {
    digest: String,
    /// Unix seconds.
    at: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Tag (and digest) resolutions, persisted in `CLIP_BASE_DIR/tags.json`.
struct Tags {
    path: PathBuf,
    map: Mutex<HashMap<String, Resolution>>,
}

impl Tags {
    fn open(path: PathBuf) -> Self {
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            map: Mutex::new(map),
        }
    }

    fn get(&self, key: &str) -> Option<Resolution> {
        lock(&self.map).get(key).cloned()
    }

    fn put(&self, key: String, digest: String) {
        let mut map = lock(&self.map);
        map.insert(key, Resolution { digest, at: now() });
        let text = serde_json::to_vec(&*map).unwrap_or_default();
        let tmp = self.path.with_extension("tmp");
        if std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .is_err()
        {
            tracing::warn!(path = %self.path.display(), "cannot save tag resolutions");
        }
    }
}

/// An image, resolved and indexed.
pub struct Ready {
    pub reference: ImageRef,
    pub index_path: PathBuf,
    pub index: Arc<IndexFile>,
    /// Present when the index was built by this call.
    pub built: Option<(clip_index::Stats, f64, u64)>,
    /// Where the index came from, for people.
    pub origin: String,
}

/// Where the stored index at `path` came from (`INDEX.origin`).
pub fn origin_of(path: &Path) -> String {
    std::fs::read_to_string(path.with_extension("origin")).unwrap_or_else(|_| "built here".into())
}

pub struct Images {
    index_dir: PathBuf,
    registries: Arc<Registries>,
    own_creds: Arc<dyn CredentialSource>,
    tag_ttl: Duration,
    /// Look for an index published in the registry before indexing.
    published: bool,
    tags: Tags,
    loaded: Mutex<HashMap<PathBuf, Arc<IndexFile>>>,
    building: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

/// A short, stable key for where an image's blobs come from.
fn source_key(reference: &ImageRef) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(reference.source().as_bytes())[..6])
}

impl Images {
    pub fn new(
        base: &Path,
        registries: Arc<Registries>,
        own_creds: Arc<dyn CredentialSource>,
        tag_ttl: Duration,
        published: bool,
    ) -> Result<Self> {
        let index_dir = base.join("index");
        clip_rootfs::private_dir(&index_dir).context("creating the index directory")?;
        Ok(Self {
            index_dir,
            registries,
            own_creds,
            tag_ttl,
            published,
            tags: Tags::open(base.join("tags.json")),
            loaded: Mutex::new(HashMap::new()),
            building: Mutex::new(HashMap::new()),
        })
    }

    /// Credentials for a request: those it brings, then the daemon's own.
    pub fn creds(&self, brought: &BTreeMap<String, clip_api::Credential>) -> Arc<dyn CredentialSource> {
        let mut m = HashMap::new();
        for (k, v) in brought {
            m.insert(k.clone(), clip_registry::Credential::from(v.clone()));
        }
        Arc::new(clip_registry::auth::Chain(vec![
            Arc::new(clip_registry::auth::StaticCredentials(m)),
            self.own_creds.clone(),
        ]))
    }

    pub fn source(&self, reference: &ImageRef, creds: Arc<dyn CredentialSource>) -> Result<Arc<dyn ImageSource>> {
        Ok(Arc::from(clip_registry::open(reference, &self.registries, creds)?))
    }

    /// Drops a removed index from the loaded ones (the next use of its
    /// image indexes it again).
    pub fn forget(&self, path: &Path) {
        lock(&self.loaded).remove(path);
    }

    /// An index file to look at (listing, removing): the loaded one if
    /// any, else read now and not kept (a store's worth of indexes is not
    /// held in memory for a listing).
    pub fn peek(&self, path: &Path) -> Result<Arc<IndexFile>> {
        if let Some(f) = lock(&self.loaded).get(path) {
            return Ok(f.clone());
        }
        Ok(Arc::new(
            IndexFile::load(path).with_context(|| format!("loading {}", path.display()))?,
        ))
    }

    /// An index file, loaded (and checked) once per daemon.
    pub fn load(&self, path: &Path) -> Result<Arc<IndexFile>> {
        if let Some(f) = lock(&self.loaded).get(path) {
            return Ok(f.clone());
        }
        let f = Arc::new(IndexFile::load(path).with_context(|| format!("loading {}", path.display()))?);
        lock(&self.loaded).insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    /// The manifest digest `reference` names for `platform`: from the
    /// registry when the last resolution is older than the TTL (never, for
    /// a digest reference), else remembered; a registry that is down falls
    /// back to the last resolution, with a warning.
    fn manifest_digest(
        &self,
        reference: &ImageRef,
        source: &dyn ImageSource,
        platform: &Platform,
        warn: &dyn Fn(String),
    ) -> Result<String> {
        if matches!(reference, ImageRef::Layout { .. }) {
            return Ok(source.resolve_digest(platform)?);
        }
        let key = format!("{}|{platform}", reference.canonical());
        let by_digest = match reference {
            ImageRef::Registry(r) => r.digest(),
            ImageRef::Layout { .. } => None,
        };
        // An image manifest's digest whose index is stored: nothing to ask.
        if let Some(d) = by_digest {
            if self.path_for(d, reference).is_ok_and(|p| p.exists()) {
                return Ok(d.to_string());
            }
        }
        let by_digest = by_digest.is_some();
        let known = self.tags.get(&key);
        if let Some(k) = &known {
            if by_digest || now().saturating_sub(k.at) < self.tag_ttl.as_secs() {
                return Ok(k.digest.clone());
            }
        }
        match source.resolve_digest(platform) {
            Ok(d) => {
                self.tags.put(key, d.clone());
                Ok(d)
            }
            Err(e) => match known {
                Some(k) => {
                    let age = now().saturating_sub(k.at);
                    warn(format!(
                        "cannot resolve {} ({}); using its resolution from {age} s ago, {}",
                        reference.canonical(),
                        chain(&e),
                        k.digest
                    ));
                    Ok(k.digest)
                }
                // It names the image itself.
                None if matches!(e, clip_registry::Error::NoSuchImage { .. }) => Err(e.into()),
                None => Err(e).with_context(|| format!("resolving {}", reference.canonical())),
            },
        }
    }

    fn path_for(&self, digest: &str, reference: &ImageRef) -> Result<PathBuf> {
        let hex = clip_registry::digest_hex(digest)?;
        Ok(self.index_dir.join(format!("{hex}-{}.clip", source_key(reference))))
    }

    /// The image `spec` names, indexed: the stored index if there is one,
    /// else built now (`progress` gets compressed bytes read and the
    /// total).
    pub fn ensure(
        &self,
        spec: &ImageSpec,
        progress: &(dyn Fn(u64, u64) + Sync),
        warn: &dyn Fn(String),
    ) -> Result<Ready> {
        let reference = ImageRef::parse(&spec.image)?;
        let platform: Platform = spec.platform.parse()?;
        let source = self.source(&reference, self.creds(&spec.creds))?;
        let digest = self.manifest_digest(&reference, source.as_ref(), &platform, warn)?;
        let path = self.path_for(&digest, &reference)?;
        let gate = lock(&self.building).entry(path.clone()).or_default().clone();
        let _building = lock(&gate);
        let wanted = spec.checkpoint_mib.map(|m| m << 20);
        if let Ok(index) = self.load(&path).and_then(|i| {
            // Asked for another spacing: index again (and replace it).
            anyhow::ensure!(wanted.is_none_or(|w| w == i.index.spacing), "another spacing");
            Ok(i)
        }) {
            return Ok(Ready {
                origin: origin_of(&path),
                reference,
                index_path: path,
                index,
                built: None,
            });
        }
        let started = Instant::now();
        let resolved = source
            .resolve(&platform)
            .with_context(|| format!("resolving {}", reference.canonical()))?;
        let path = self.path_for(&resolved.manifest_digest, &reference)?;
        let mut origin = "built here".to_string();
        if let Some(reg) = source.registry().filter(|_| self.published && wanted.is_none()) {
            match crate::published::find(reg, &resolved) {
                Ok(Some(found)) => return self.adopt(reference, path, found),
                Ok(None) => {
                    tracing::info!(image = %reference.canonical(), "no clip index published; indexing here");
                    origin = "built here (none published)".into();
                }
                Err(e) => {
                    warn(format!(
                        "the clip index published for {} cannot be used ({e:#}); indexing here",
                        reference.canonical()
                    ));
                    origin = "built here (the published one was unusable)".into();
                }
            }
        }
        let total: u64 = resolved.layers.iter().map(|l| l.size).sum();
        let counter = Arc::new(AtomicU64::new(0));
        let mut opts = clip_index::Options {
            progress: Some(counter.clone()),
            ..clip_index::Options::default()
        };
        if let Some(mib) = spec.checkpoint_mib {
            opts.spacing = mib << 20;
        }
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let (file, stats, mut hints) = std::thread::scope(|s| {
            s.spawn(move || loop {
                progress(counter.load(Ordering::Relaxed), total);
                // Ends the moment the build does (the sender drops).
                if finished.recv_timeout(Duration::from_millis(200)) != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    break;
                }
            });
            let r = clip_index::build_with_hints(source.as_ref(), &reference.canonical(), &resolved, &opts);
            drop(done);
            r
        })?;
        let bytes = file.encode()?;
        write_atomic(&path, &bytes)?;
        write_atomic(&path.with_extension("origin"), origin.as_bytes())?;
        hints.manifest_digest = file.index.image.manifest_digest.clone();
        write_atomic(&crate::guesses::path_for(&path), &hints.encode())?;
        let index = Arc::new(file);
        // Mounts of a replaced index keep the one they loaded.
        lock(&self.loaded).insert(path.clone(), index.clone());
        Ok(Ready {
            reference,
            index_path: path,
            index,
            built: Some((stats, started.elapsed().as_secs_f64(), bytes.len() as u64)),
            origin,
        })
    }

    /// Stores an index found in the registry (and its profile, unless this
    /// node has recorded one, and its hints).
    fn adopt(&self, reference: ImageRef, path: PathBuf, found: crate::published::Found) -> Result<Ready> {
        write_atomic(&path, &found.bytes)?;
        let digest = &found.index.index.image.manifest_digest;
        if let Some(p) = &found.profile {
            let profile = crate::profiles::path_for(&path);
            match serde_json::from_slice::<crate::profiles::Profile>(p) {
                Ok(pr) if pr.manifest_digest == *digest => {
                    if !profile.exists() {
                        write_atomic(&profile, p)?;
                    }
                }
                _ => tracing::warn!(artifact = %found.artifact, "ignoring a published profile for another image"),
            }
        }
        if let Some(h) = &found.hints {
            match crate::guesses::decode_for(h, digest) {
                Ok(Some(_)) => write_atomic(&crate::guesses::path_for(&path), h)?,
                Ok(None) => tracing::warn!(artifact = %found.artifact, "ignoring published hints for another image"),
                Err(e) => tracing::warn!(artifact = %found.artifact, error = %e, "ignoring unreadable published hints"),
            }
        }
        let origin = format!("registry (artifact {}, found through {})", found.artifact, found.via);
        write_atomic(&path.with_extension("origin"), origin.as_bytes())?;
        tracing::info!(image = %reference.canonical(), artifact = %found.artifact, "using the published index");
        let index = Arc::new(found.index);
        lock(&self.loaded).insert(path.clone(), index.clone());
        Ok(Ready {
            reference,
            index_path: path,
            index,
            built: None,
            origin,
        })
    }
}

/// An error and its causes, each once.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Writes `bytes` to `path` so that a reader sees the old file or the whole
/// new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_resolutions_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tags::open(dir.path().join("tags.json"));
        t.put("r/x:1|linux/amd64".into(), "sha256:aa".into());
        let again = Tags::open(dir.path().join("tags.json"));
        assert_eq!(again.get("r/x:1|linux/amd64").unwrap().digest, "sha256:aa");
        assert!(again.get("r/x:2|linux/amd64").is_none());
    }
}
