//! Container root filesystems on clip images, and the kernel calls under
//! them.
//!
//! * [`Mounter`] is every mount and unmount clip makes ([`Kernel`] for
//!   real, [`Recording`] as a test double).
//! * [`create`] gives a container a writable rootfs over an image mount
//!   (which the caller, clipd, owns and shares among the image's
//!   containers): kernel overlayfs (`index=off,metacopy=off`, `nodev`), or
//!   `fuse-overlayfs` where the kernel's is missing or when asked; upper
//!   and work directories under `CLIP_BASE_DIR/containers/ID/`, the rootfs
//!   at `CLIP_RUN_DIR/ID/rootfs`. [`release`] removes it and says which
//!   image it was on, so the caller can unmount that image once unused.
//!
//! Everything under `CLIP_RUN_DIR` and `CLIP_BASE_DIR` is root's alone: a
//! container's rootfs allows setuid inside the container.

pub mod mounter;

use std::fs;
use std::path::{Path, PathBuf};

pub use clip_store::private_dir;
pub use mounter::{Call, Kernel, MountEntry, Mounter, Recording};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid container name {0:?}: use 1-64 letters, digits, '-', '_' or '.', and not a name clip reserves")]
    InvalidId(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("no container {0}")]
    NoContainer(String),
    #[error("{0} is on a tmpfs: container upper and work directories must be on disk (set CLIP_BASE_DIR)")]
    Tmpfs(PathBuf),
    #[error("{0} has a ',' or ':', which overlay options cannot carry")]
    OverlayPath(PathBuf),
    #[error("mounting the overlay ({0})")]
    Overlay(&'static str, #[source] std::io::Error),
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
}

impl Paths {
    /// From `CLIP_BASE_DIR` (default `/var/lib/clip`) and `CLIP_RUN_DIR`
    /// (default `/run/clip`).
    pub fn from_env() -> Self {
        // Absolute (as clip_api::env_dir, which this crate sits below):
        // runc resolves a bundle's paths (the rootfs) from the bundle.
        let var = |k: &str, d: &str| {
            std::env::var_os(k).map_or_else(
                || PathBuf::from(d),
                |v| std::path::absolute(&v).unwrap_or_else(|_| v.into()),
            )
        };
        Self {
            base: var("CLIP_BASE_DIR", "/var/lib/clip"),
            run: var("CLIP_RUN_DIR", "/run/clip"),
        }
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.base.join("containers").join(id)
    }

    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.run.join(id).join("rootfs")
    }

    pub fn bundle(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("bundle")
    }

    /// Where the image with mount key `key` is mounted.
    pub fn image_mount(&self, key: &str) -> PathBuf {
        self.run.join("images").join(key).join("mnt")
    }

    pub fn index_dir(&self) -> PathBuf {
        self.base.join("index")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// Kernel overlayfs where available, else fuse-overlayfs.
    Auto,
    Kernel,
    Fuse,
}

impl OverlayKind {
    pub fn name(self) -> &'static str {
        match self {
            OverlayKind::Auto => "auto",
            OverlayKind::Kernel => "overlay",
            OverlayKind::Fuse => "fuse-overlayfs",
        }
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

/// Names clip uses itself under its state directories.
const RESERVED: [&str; 11] = [
    ".",
    "..",
    "images",
    "mounts",
    "metrics",
    "containers",
    "index",
    "clipd.sock",
    "clipd.log",
    "clipd.lock",
    "clipd.pid",
];

pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !RESERVED.contains(&id)
        && !id.starts_with('.')
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
    let c = std::ffi::CString::new(base.as_os_str().as_encoded_bytes()).map_err(|e| Error::Io {
        what: base.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    // SAFETY: valid path and out pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == TMPFS_MAGIC {
        return Err(Error::Tmpfs(base.into()));
    }
    Ok(())
}

/// Makes the rootfs of container `id` over the image mounted at
/// `image_mount` (whose mount key is `image_key`). On failure nothing of
/// the container is left.
pub fn create(
    paths: &Paths,
    m: &dyn Mounter,
    image_key: &str,
    image_mount: &Path,
    id: &str,
    overlay: OverlayKind,
) -> Result<Rootfs> {
    validate_id(id)?;
    refuse_tmpfs(&paths.base)?;
    let cdir = paths.container_dir(id);
    if cdir.exists() {
        return Err(Error::Exists(id.into()));
    }
    io(format!("creating {}", cdir.display()), private_dir(&cdir))?;
    let result = (|| {
        io("recording the image", fs::write(cdir.join("image"), image_key))?;
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
        for p in [image_mount, &upper, &work] {
            if p.to_string_lossy().contains([',', ':']) {
                return Err(Error::OverlayPath(p.into()));
            }
        }
        let kind = match overlay {
            OverlayKind::Auto if m.kernel_overlay() => OverlayKind::Kernel,
            OverlayKind::Auto => OverlayKind::Fuse,
            k => k,
        };
        match kind {
            OverlayKind::Kernel => m
                .mount_overlay(image_mount, &upper, &work, &rootfs)
                .map_err(|e| Error::Overlay("overlay", e))?,
            _ => m
                .fuse_overlayfs(image_mount, &upper, &work, &rootfs)
                .map_err(|e| Error::Overlay("fuse-overlayfs", e))?,
        }
        io("recording the overlay", fs::write(cdir.join("overlay"), kind.name()))?;
        Ok(Rootfs {
            id: id.into(),
            rootfs,
            image_mount: image_mount.into(),
            upper,
            overlay: kind,
        })
    })();
    if result.is_err() {
        let _ = release(paths, m, id);
    }
    result
}

/// Removes container `id`'s rootfs and its upper and work directories;
/// returns the mount key of the image it was on. Idempotent.
pub fn release(paths: &Paths, m: &dyn Mounter, id: &str) -> Result<Option<String>> {
    validate_id(id)?;
    let cdir = paths.container_dir(id);
    let rootfs = paths.rootfs(id);
    if m.mount_at(&rootfs).is_some() || m.is_stale(&rootfs) {
        // Lazy: a process still inside must not keep the rootfs alive.
        io(format!("unmounting {}", rootfs.display()), m.unmount(&rootfs, true))?;
    }
    let _ = fs::remove_dir_all(paths.run.join(id));
    let key = image_of(paths, id);
    if cdir.exists() {
        io(format!("removing {}", cdir.display()), fs::remove_dir_all(&cdir))?;
    }
    Ok(key)
}

/// The mount key of the image container `id` is on.
pub fn image_of(paths: &Paths, id: &str) -> Option<String> {
    fs::read_to_string(paths.container_dir(id).join("image"))
        .ok()
        .map(|h| h.trim().to_string())
}

/// Containers (by id) on the image with mount key `key`.
pub fn users(paths: &Paths, key: &str) -> Vec<String> {
    list(paths)
        .into_iter()
        .filter(|id| image_of(paths, id).as_deref() == Some(key))
        .collect()
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

/// The overlay a container's rootfs uses, as recorded.
pub fn overlay_of(paths: &Paths, id: &str) -> String {
    fs::read_to_string(paths.container_dir(id).join("overlay")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> (tempfile::TempDir, Paths) {
        let t = tempfile::tempdir().unwrap();
        let p = Paths {
            base: t.path().join("base"),
            run: t.path().join("run"),
        };
        (t, p)
    }

    #[test]
    fn ids() {
        for ok in ["a", "web-1", "x_y.z", &"a".repeat(64)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "images",
            "mounts",
            "metrics",
            ".hidden",
            "sp ace",
            &"a".repeat(65),
        ] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upper_dirs_are_never_on_tmpfs() {
        let t = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = Paths {
            base: t.path().into(),
            run: t.path().join("run"),
        };
        let err = create(&p, &Recording::default(), "k", Path::new("/x"), "c", OverlayKind::Auto).unwrap_err();
        assert!(matches!(err, Error::Tmpfs(_)), "{err}");
    }

    #[test]
    fn a_rootfs_is_an_overlay_over_the_image_mount_and_release_undoes_it() {
        let (_t, p) = paths();
        let m = Recording::default();
        let img = p.image_mount("key1");
        let r = create(&p, &m, "key1", &img, "c1", OverlayKind::Auto).unwrap();
        assert_eq!(r.overlay, OverlayKind::Kernel);
        assert_eq!(
            m.recorded(),
            vec![Call::MountOverlay {
                lower: img.clone(),
                target: p.rootfs("c1")
            }]
        );
        assert_eq!(users(&p, "key1"), ["c1"]);
        assert!(matches!(
            create(&p, &m, "key1", &img, "c1", OverlayKind::Auto),
            Err(Error::Exists(_))
        ));
        assert_eq!(release(&p, &m, "c1").unwrap().as_deref(), Some("key1"));
        assert_eq!(
            m.recorded().last(),
            Some(&Call::Unmount {
                target: p.rootfs("c1"),
                lazy: true
            })
        );
        assert!(m.mounted().is_empty());
        assert!(users(&p, "key1").is_empty());
        assert!(!p.container_dir("c1").exists() && !p.run.join("c1").exists());
        assert_eq!(release(&p, &m, "c1").unwrap(), None, "idempotent");
    }

    #[test]
    fn a_failed_overlay_leaves_nothing_behind() {
        let (_t, p) = paths();
        let m = Recording::default();
        m.fail.lock().unwrap().insert("mount_overlay");
        let err = create(&p, &m, "k", &p.image_mount("k"), "c", OverlayKind::Kernel).unwrap_err();
        assert!(matches!(err, Error::Overlay("overlay", _)), "{err}");
        assert!(list(&p).is_empty());
        assert!(!p.run.join("c").exists());
        assert!(m.mounted().is_empty());
        // Without kernel overlayfs, fuse-overlayfs.
        let m = Recording::without_kernel_overlay();
        let r = create(&p, &m, "k", &p.image_mount("k"), "c", OverlayKind::Auto).unwrap();
        assert_eq!(r.overlay, OverlayKind::Fuse);
        assert!(matches!(m.recorded()[0], Call::FuseOverlayfs { .. }));
    }

    #[test]
    fn state_is_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let (_t, p) = paths();
        let m = Recording::default();
        create(&p, &m, "k", &p.image_mount("k"), "c", OverlayKind::Kernel).unwrap();
        for d in [
            p.base.clone(),
            p.container_dir("c"),
            p.base.join("containers"),
            p.run.join("c"),
        ] {
            let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }
}
