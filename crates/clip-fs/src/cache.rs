//! The persistent span cache: decompressed spans on disk, keyed by layer
//! digest and uncompressed range, so that images sharing a base layer share
//! its cache whatever their checkpoint spacing.
//!
//! Files are written under a temporary name and renamed into place, and
//! carry a SHA-256 of their content, so neither a torn write (crash between
//! write and rename, or a rename that reached the disk before the data) nor
//! a damaged file is ever served. Other processes may use the same
//! directory at once: renames are atomic and identical content wins either
//! way. The size is bounded; least recently used files go first.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use clip_metrics::defs;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"CLIPSPN1";
const HEADER: usize = 8 + 32;

pub struct DiskCache {
    root: PathBuf,
    max_bytes: u64,
    /// Our estimate of the bytes under root (other processes add too; a
    /// full scan at eviction time corrects it).
    size: AtomicU64,
    evicting: Mutex<()>,
    pub evictions: AtomicU64,
}

fn dir_size(root: &Path) -> u64 {
    let mut total = 0;
    for layer in fs::read_dir(root).into_iter().flatten().flatten() {
        for f in fs::read_dir(layer.path()).into_iter().flatten().flatten() {
            total += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

/// Bytes in the span cache under `cache_dir` (as given to [`DiskCache::open`]).
pub fn usage(cache_dir: &Path) -> u64 {
    dir_size(&cache_dir.join(SUBDIR))
}

const SUBDIR: &str = "spans-v1";

impl DiskCache {
    pub fn open(root: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let root = root.join(SUBDIR);
        fs::create_dir_all(&root)?;
        let size = dir_size(&root);
        Ok(Self {
            root,
            max_bytes,
            size: AtomicU64::new(size),
            evicting: Mutex::new(()),
            evictions: AtomicU64::new(0),
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn path(&self, layer_hex: &str, start: u64, len: u64) -> PathBuf {
        self.root.join(layer_hex).join(format!("{start:016x}-{len:x}"))
    }

    /// The span's bytes, if cached and intact.
    pub fn get(&self, layer_hex: &str, start: u64, len: u64) -> Option<Vec<u8>> {
        let path = self.path(layer_hex, start, len);
        let bytes = fs::read(&path).ok()?;
        let ok = bytes.len() == HEADER + len as usize
            && &bytes[..8] == MAGIC
            && Sha256::digest(&bytes[HEADER..]).as_slice() == &bytes[8..HEADER];
        if !ok {
            tracing::warn!(path = %path.display(), "discarding damaged cache file");
            if fs::remove_file(&path).is_ok() {
                self.size
                    .fetch_sub((bytes.len() as u64).min(self.size()), Ordering::Relaxed);
            }
            return None;
        }
        // Mark as recently used for eviction.
        let _ = fs::File::options()
            .append(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now()));
        let mut bytes = bytes;
        bytes.drain(..HEADER);
        Some(bytes)
    }

    pub fn put(&self, layer_hex: &str, start: u64, data: &[u8]) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = self.path(layer_hex, start, data.len() as u64);
        let dir = path.parent().expect("has a parent");
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| -> std::io::Result<()> {
            fs::create_dir_all(dir)?;
            let mut f = fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&Sha256::digest(data))?;
            f.write_all(data)?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot write span cache");
            let _ = fs::remove_file(&tmp);
            return;
        }
        defs::CACHE_WRITTEN_BYTES.get().inc_by(data.len() as u64);
        let size = self.size.fetch_add((HEADER + data.len()) as u64, Ordering::Relaxed) + (HEADER + data.len()) as u64;
        if size > self.max_bytes {
            self.evict();
        }
    }

    /// Removes the least recently used files until the cache is at 90% of
    /// its bound.
    fn evict(&self) {
        let Ok(_guard) = self.evicting.try_lock() else { return };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        for layer in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            for f in fs::read_dir(layer.path()).into_iter().flatten().flatten() {
                if let Ok(m) = f.metadata() {
                    files.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), f.path()));
                }
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        let target = self.max_bytes / 10 * 9;
        let (mut evicted, mut evicted_bytes) = (0u64, 0u64);
        for (_, len, path) in files {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
                self.evictions.fetch_add(1, Ordering::Relaxed);
                evicted += 1;
                evicted_bytes += len;
            }
        }
        if evicted > 0 {
            defs::CACHE_EVICTIONS.get().inc_by(evicted);
            tracing::info!(
                files = evicted,
                bytes = evicted_bytes,
                left = total,
                "evicted cached spans"
            );
        }
        self.size.store(total, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_damage_and_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 10_000).unwrap();
        assert!(c.get("aa", 0, 3).is_none());
        c.put("aa", 0, b"abc");
        assert_eq!(c.get("aa", 0, 3).unwrap(), b"abc");
        // A torn or damaged file is discarded, never served.
        let p = c.path("aa", 0, 3);
        let mut raw = fs::read(&p).unwrap();
        raw[HEADER] ^= 1;
        fs::write(&p, &raw).unwrap();
        assert!(c.get("aa", 0, 3).is_none());
        assert!(!p.exists());
        fs::write(&p, &raw[..HEADER + 1]).unwrap();
        assert!(c.get("aa", 0, 3).is_none());
        // Eviction keeps the newest within the bound.
        for i in 0..10 {
            c.put("bb", i * 4000, &[i as u8; 4000]);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(c.size() <= 10_000, "{}", c.size());
        assert!(c.evictions.load(Ordering::Relaxed) >= 7);
        assert!(c.get("bb", 9 * 4000, 4000).is_some());
        assert!(c.get("bb", 0, 4000).is_none());
        // Another process (a new handle) sees the same files.
        let c2 = DiskCache::open(dir.path(), 10_000).unwrap();
        assert_eq!(c2.get("bb", 9 * 4000, 4000).unwrap(), vec![9u8; 4000]);
    }
}
