//! Container root filesystems on clip images.
//!
//! * [`mount_image`] mounts an index read-only through a serving process
//!   (any binary with clipctl's `serve --index FILE DIR` command), returns
//!   once the mount answers, and is idempotent; [`unmount_image`] undoes it,
//!   also after the server was killed.
//! * [`create`] gives a container a writable rootfs: the image mounted once
//!   per image (shared by all its containers) as the lower layer of a
//!   kernel overlayfs (`index=off,metacopy=off`, `nodev`), or of
//!   `fuse-overlayfs` where the kernel's is missing or when asked; upper and
//!   work directories under `CLIP_BASE_DIR/containers/ID/`.
//!   [`release`] removes it, and the image mount once no container uses it.
//!
//! A program that embeds clip serves its own mounts: call
//! [`serve_if_requested`] first thing in `main` and pass
//! `std::env::current_exe()` as [`Paths::server`]; mounts then run as that
//! program re-executed with `serve --index FILE DIR`. See
//! `examples/embed.rs` for the whole flow: index, mount, rootfs, release.

mod image_mount;
mod overlay;

use std::fs;
use std::path::{Path, PathBuf};

pub use clip_store::private_dir;

pub use image_mount::{mount_image, unmount_image};
pub use overlay::{kernel_overlay_available, OverlayKind};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid container id {0:?}: use 1-64 letters, digits, '-', '_' or '.'")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("no container {0}")]
    NoContainer(String),
    #[error("{0} is already a clip mount of another index")]
    OtherIndex(PathBuf),
    #[error("{0} is not a clip mount ({1})")]
    NotClip(PathBuf, String),
    #[error("the serving process exited ({status}): {log}")]
    ServerExited { status: String, log: String },
    #[error("{0} did not come up within 60 s")]
    Timeout(PathBuf),
    #[error("loading the index")]
    Index(#[from] clip_format::Error),
    #[error("overlay: {0}")]
    Overlay(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io<T>(what: impl Into<String>, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|source| Error::Io {
        what: what.into(),
        source,
    })
}

/// Where clip keeps its state.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Indexes and container upper/work directories (`CLIP_BASE_DIR`).
    pub base: PathBuf,
    /// Mount points and runtime state (`CLIP_RUN_DIR`).
    pub run: PathBuf,
    /// The binary that serves mounts (`serve --index FILE DIR`).
    pub server: PathBuf,
}

impl Paths {
    /// From `CLIP_BASE_DIR` (default `/var/lib/clip`) and `CLIP_RUN_DIR`
    /// (default `/run/clip`).
    pub fn from_env(server: PathBuf) -> Self {
        let var = |k: &str, d: &str| std::env::var_os(k).map_or_else(|| PathBuf::from(d), PathBuf::from);
        Self {
            base: var("CLIP_BASE_DIR", "/var/lib/clip"),
            run: var("CLIP_RUN_DIR", "/run/clip"),
            server,
        }
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.base.join("containers").join(id)
    }

    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.run.join(id).join("rootfs")
    }

    fn image_dir(&self, manifest_hex: &str) -> PathBuf {
        self.run.join("images").join(manifest_hex)
    }
}

/// A container's rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    pub id: String,
    pub rootfs: PathBuf,
    /// The shared read-only image mount (the overlay's lower dir).
    pub image_mount: PathBuf,
    pub upper: PathBuf,
    pub overlay: OverlayKind,
}

pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !matches!(id, "." | ".." | "images" | "mounts")
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.into()))
    }
}

/// Upper and work directories hold what containers write: they must not
/// live in memory (a tmpfs such as /dev/shm).
fn refuse_tmpfs(base: &Path) -> Result<()> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    io(format!("creating {}", base.display()), private_dir(base))?;
    let c = std::ffi::CString::new(base.as_os_str().as_encoded_bytes()).map_err(|e| Error::Overlay(e.to_string()))?;
    // SAFETY: valid path and out pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == TMPFS_MAGIC {
        return Err(Error::Overlay(format!(
            "{} is on a tmpfs: container upper and work directories must be on disk (set CLIP_BASE_DIR)",
            base.display()
        )));
    }
    Ok(())
}

/// The key of an index's image mount: its file name, made safe.
fn image_key(index: &Path) -> String {
    use sha2::Digest;
    let stem = index
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(100)
        .collect();
    let path_hash: String = sha2::Sha256::digest(index.as_os_str().as_encoded_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{clean}-{path_hash}")
}

/// Serialises image mount and unmount decisions between processes.
fn image_lock(paths: &Paths, hex: &str) -> Result<fs::File> {
    let dir = paths.run.join("images");
    io(format!("creating {}", dir.display()), private_dir(&dir))?;
    let f = io(
        "opening the image lock",
        fs::File::create(dir.join(format!("{hex}.lock"))),
    )?;
    io("locking the image", f.lock())?;
    Ok(f)
}

/// Containers (by id) that use the image `hex`.
fn users(paths: &Paths, hex: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in fs::read_dir(paths.base.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if fs::read_to_string(e.path().join("image")).is_ok_and(|h| h.trim() == hex) {
            v.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    v
}

/// Makes the rootfs of container `id` from the index at `index`.
pub fn create(paths: &Paths, index: &Path, id: &str, overlay: OverlayKind) -> Result<Rootfs> {
    validate_id(id)?;
    refuse_tmpfs(&paths.base)?;
    // One image mount per index file: an index names the source it fetches
    // from, so the same image from two registries gets two mounts.
    let index = &std::fs::canonicalize(index).map_err(|source| Error::Io {
        what: format!("{}", index.display()),
        source,
    })?;
    let hex = image_key(index);
    let cdir = paths.container_dir(id);
    if cdir.exists() {
        return Err(Error::Exists(id.into()));
    }
    let image_mount = paths.image_dir(&hex).join("mnt");
    {
        let _lock = image_lock(paths, &hex)?;
        mount_image(&paths.server, &paths.run, index, &image_mount)?;
        // Registered under the lock, so that a release of another container
        // cannot unmount the image in between.
        io(format!("creating {}", cdir.display()), private_dir(&cdir))?;
        io("recording the image", fs::write(cdir.join("image"), &hex))?;
    }
    let result = (|| {
        let (upper, work) = (cdir.join("upper"), cdir.join("work"));
        io("creating upper", fs::create_dir_all(&upper))?;
        io("creating work", fs::create_dir_all(&work))?;
        let rootfs = paths.rootfs(id);
        // The rootfs allows setuid for the container: what leads to it is
        // root's alone, as containerd keeps its bundles.
        io(
            format!("creating {}", rootfs.display()),
            private_dir(rootfs.parent().expect("run/ID/rootfs")).and_then(|_| fs::create_dir_all(&rootfs)),
        )?;
        let kind = overlay::mount(&image_mount, &upper, &work, &rootfs, overlay)?;
        io("recording the overlay", fs::write(cdir.join("overlay"), kind.name()))?;
        Ok(Rootfs {
            id: id.into(),
            rootfs,
            image_mount: image_mount.clone(),
            upper,
            overlay: kind,
        })
    })();
    if result.is_err() {
        let _ = release(paths, id);
    }
    result
}

/// Removes container `id`'s rootfs, its upper and work directories, and the
/// image mount once no other container uses it. Idempotent.
pub fn release(paths: &Paths, id: &str) -> Result<()> {
    validate_id(id)?;
    let cdir = paths.container_dir(id);
    let rootfs = paths.rootfs(id);
    if clip_fs::mounts::mount_at(&rootfs).is_some() || clip_fs::mounts::is_stale(&rootfs) {
        // Lazy: a process still inside must not keep the rootfs alive.
        io(
            format!("unmounting {}", rootfs.display()),
            clip_fs::mounts::unmount(&rootfs, true),
        )?;
    }
    let _ = fs::remove_dir_all(paths.run.join(id));
    let hex = fs::read_to_string(cdir.join("image"))
        .ok()
        .map(|h| h.trim().to_string());
    if cdir.exists() {
        io(format!("removing {}", cdir.display()), fs::remove_dir_all(&cdir))?;
    }
    if let Some(hex) = hex {
        let _lock = image_lock(paths, &hex)?;
        if users(paths, &hex).is_empty() {
            let dir = paths.image_dir(&hex);
            unmount_image(&paths.run, &dir.join("mnt"))?;
            let _ = fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// If this process was started as a mount server (`PROG serve --index FILE
/// DIR`, as [`mount_image`] starts it), serves that mount and returns the
/// exit code; otherwise returns None at once.
pub fn serve_if_requested() -> Option<i32> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() != 5 || args[1] != "serve" || args[2] != "--index" {
        return None;
    }
    let opts = clip_fs::serve::ServeOptions::from_env();
    match clip_fs::serve::serve(Path::new(&args[3]), Path::new(&args[4]), &opts) {
        Ok(()) => Some(0),
        Err(e) => {
            eprintln!("serve: {e}");
            Some(1)
        }
    }
}

/// Container ids with state on this host.
pub fn list(paths: &Paths) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(paths.base.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "web-1", "x_y.z", &"a".repeat(64)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".", "a/b", "images", "mounts", "sp ace", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upper_dirs_are_never_on_tmpfs() {
        let t = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = Paths {
            base: t.path().into(),
            run: t.path().join("run"),
            server: "/bin/false".into(),
        };
        let err = create(&p, Path::new("/nonexistent.clip"), "c", OverlayKind::Auto).unwrap_err();
        assert!(err.to_string().contains("tmpfs"), "{err}");
        let disk = tempfile::tempdir().unwrap();
        let p = Paths {
            base: disk.path().into(),
            run: disk.path().join("run"),
            server: "/bin/false".into(),
        };
        assert!(!create(&p, Path::new("/nonexistent.clip"), "c", OverlayKind::Auto)
            .unwrap_err()
            .to_string()
            .contains("tmpfs"));
    }

    #[test]
    fn users_of_an_image() {
        let t = tempfile::tempdir().unwrap();
        let p = Paths {
            base: t.path().into(),
            run: t.path().join("run"),
            server: "/bin/false".into(),
        };
        for (id, hex) in [("a", "h1"), ("b", "h2"), ("c", "h1")] {
            fs::create_dir_all(p.container_dir(id)).unwrap();
            fs::write(p.container_dir(id).join("image"), hex).unwrap();
        }
        let mut u = users(&p, "h1");
        u.sort();
        assert_eq!(u, ["a", "c"]);
        assert_eq!(list(&p), ["a", "b", "c"]);
        // Releasing a container that has no mounts only removes its state.
        release(&p, "b").unwrap();
        assert_eq!(list(&p), ["a", "c"]);
        release(&p, "b").unwrap();
    }
}
