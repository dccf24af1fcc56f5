//! One view of the metrics of every clip process on the host.
//!
//! Under one directory (`$CLIP_RUN_DIR/metrics`):
//! - each mount server listens on `serve-PID.sock` and answers every
//!   connection with its snapshot as JSON ([`Exporter`]);
//! - `totals.json` holds the counts of processes that have finished: short
//!   -lived ones ([`persist`]) and servers that stopped ([`Exporter::finish`]);
//! - `lock` orders the two: [`collect`] holds it shared while it reads the
//!   totals and asks the servers, a process adding to the totals holds it
//!   exclusively and stops answering before it lets go, so no count is
//!   seen twice or missed.
//!
//! A server that is killed loses its counts since it started: the counters
//! go down, which Prometheus reads as a restart.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{defs, global, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn io<T>(what: &'static str, path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `dir` (and missing parents) for root only.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// `$CLIP_RUN_DIR/metrics` (default `/run/clip/metrics`).
pub fn dir_from_env() -> PathBuf {
    std::env::var_os("CLIP_RUN_DIR")
        .map_or_else(|| PathBuf::from("/run/clip"), PathBuf::from)
        .join("metrics")
}

const TOTALS: &str = "totals.json";

/// An flock on `dir/lock`, released on drop.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(dir: &Path, exclusive: bool) -> Result<Self> {
        io("creating", dir, private_dir(dir))?;
        let path = dir.join("lock");
        let f = io("opening", &path, File::options().create(true).append(true).open(&path))?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
            return io("locking", &path, Err(std::io::Error::last_os_error()));
        }
        Ok(Self { _file: f })
    }
}

fn read_totals(dir: &Path) -> Snapshot {
    let path = dir.join(TOTALS);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            // Counters restart from zero rather than fail every collection.
            tracing::warn!(path = %path.display(), error = %e, "ignoring damaged metrics totals");
            Snapshot::default()
        }),
        Err(_) => Snapshot::default(),
    }
}

/// Adds `snap` to the totals; the caller holds the lock exclusively.
fn add_to_totals(dir: &Path, snap: &Snapshot) -> Result<()> {
    let mut totals = read_totals(dir);
    totals.merge(snap);
    let path = dir.join(TOTALS);
    let tmp = dir.join(format!(".{TOTALS}.{}", std::process::id()));
    let bytes = serde_json::to_vec(&totals).expect("a snapshot serialises");
    io("writing", &tmp, fs::write(&tmp, bytes))?;
    io("renaming", &tmp, fs::rename(&tmp, &path))
}

/// Adds what this process recorded since its last `persist` to the host's
/// totals. For processes that end on their own (index builds, `clipctl
/// run`, `cat`); may be called more than once.
pub fn persist(dir: &Path) -> Result<()> {
    static DONE: Mutex<Option<Snapshot>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let now = global().snapshot();
    let delta = match done.as_ref() {
        Some(before) => now.since(before),
        None => now.clone(),
    };
    if delta.families.is_empty() {
        return Ok(());
    }
    let _lock = Lock::take(dir, true)?;
    add_to_totals(dir, &delta)?;
    *done = Some(now);
    Ok(())
}

/// Answers snapshot requests for a long-running process (a mount server).
pub struct Exporter {
    dir: PathBuf,
    sock: PathBuf,
    stopped: Arc<AtomicBool>,
}

impl Exporter {
    pub fn start(dir: &Path) -> Result<Self> {
        io("creating", dir, private_dir(dir))?;
        let sock = dir.join(format!("serve-{}.sock", std::process::id()));
        let _ = fs::remove_file(&sock);
        let listener = io("listening on", &sock, UnixListener::bind(&sock))?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                    let bytes = serde_json::to_vec(&global().snapshot()).expect("a snapshot serialises");
                    let _ = conn.write_all(&bytes);
                }
            })
            .map_err(|e| Error::Io {
                what: "starting thread for",
                path: dir.to_path_buf(),
                source: e,
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            sock,
            stopped,
        })
    }

    /// Adds this process's counts to the totals and stops answering.
    pub fn finish(self) -> Result<()> {
        let _lock = Lock::take(&self.dir, true)?;
        self.stopped.store(true, Ordering::SeqCst);
        let _ = fs::remove_file(&self.sock);
        add_to_totals(&self.dir, &global().snapshot())
    }
}

fn ask(sock: &Path) -> std::io::Result<Snapshot> {
    let mut conn = UnixStream::connect(sock)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut bytes = Vec::new();
    conn.read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

/// The host-wide metrics: finished processes' totals plus every live
/// server's snapshot, with the `clip_mounts` gauge and, when given, the
/// span cache's size.
pub fn collect(dir: &Path, cache_bytes: Option<u64>) -> Result<Snapshot> {
    let _lock = Lock::take(dir, false)?;
    let mut all = read_totals(dir);
    let mut live = 0;
    let mut entries: Vec<PathBuf> = io("listing", dir, fs::read_dir(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    entries.sort();
    for sock in entries {
        match ask(&sock) {
            Ok(snap) => {
                all.merge(&snap);
                live += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // Its server was killed.
                let _ = fs::remove_file(&sock);
            }
            Err(e) => tracing::warn!(socket = %sock.display(), error = %e, "no metrics from mount server"),
        }
    }
    all.set_gauge(defs::MOUNTS.0, defs::MOUNTS.1, f64::from(live));
    if let Some(bytes) = cache_bytes {
        all.set_gauge(defs::CACHE_SIZE.0, defs::CACHE_SIZE.1, bytes as f64);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: defs::CounterDef = defs::CounterDef {
        name: "test_host_things",
        help: "Things.",
        scale: 1.0,
    };

    #[test]
    fn live_servers_and_totals_add_up_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("metrics");
        C.get().inc_by(5);
        let mine = global().snapshot().sum("test_host_things", &[]);
        let exporter = Exporter::start(&dir).unwrap();
        // A socket left by a killed server is skipped and removed.
        let stale = dir.join("serve-999999999.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let s = collect(&dir, Some(7)).unwrap();
        assert_eq!(s.sum("test_host_things", &[]), mine);
        assert_eq!(s.value("clip_mounts", &[]), Some(&crate::Value::Number(1.0)));
        assert_eq!(s.value("clip_cache_size_bytes", &[]), Some(&crate::Value::Number(7.0)));
        assert!(!stale.exists());
        // A finished server's counts move to the totals: seen once.
        exporter.finish().unwrap();
        let s = collect(&dir, None).unwrap();
        assert_eq!(s.sum("test_host_things", &[]), mine);
        assert_eq!(s.value("clip_mounts", &[]), Some(&crate::Value::Number(0.0)));
        persist(&dir).unwrap();
        assert_eq!(collect(&dir, None).unwrap().sum("test_host_things", &[]), 2.0 * mine);
        // A second persist adds only what is new.
        C.get().inc_by(2);
        persist(&dir).unwrap();
        persist(&dir).unwrap();
        assert_eq!(
            collect(&dir, None).unwrap().sum("test_host_things", &[]),
            2.0 * mine + 2.0
        );
        // Damaged totals restart from zero instead of failing.
        fs::write(dir.join(TOTALS), b"{not json").unwrap();
        assert_eq!(collect(&dir, None).unwrap().sum("test_host_things", &[]), 0.0);
    }
}
