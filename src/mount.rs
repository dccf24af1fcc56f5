//! `clipctl mount`, `clipctl umount` and the serving process behind a mount
//! (`clipctl serve`, started by `mount`, one per mount).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clip_format::IndexFile;
use clip_fs::{ClipFs, DiskCache, ReaderOptions, SpanReader};
use clip_registry::{ImageRef, Platform, RegistryOptions};
use clip_rootfs::{OverlayKind, Paths};

#[derive(clap::Args)]
pub struct MountArgs {
    /// Mount this index.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    index: Option<PathBuf>,
    /// Mount this image: its index is taken from CLIP_BASE_DIR, or built.
    #[arg(long)]
    image: Option<String>,
    /// Platform to pick from a multi-arch image (with --image).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Make a writable container rootfs for this container id instead:
    /// the image mounted once (shared), overlayfs on top; prints its path.
    #[arg(long, conflicts_with = "dir")]
    cid: Option<String>,
    /// With --cid: use fuse-overlayfs even where kernel overlayfs works.
    #[arg(long, requires = "cid")]
    fuse_overlayfs: bool,
    /// Where to mount.
    #[arg(required_unless_present = "cid")]
    dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    /// Remove this container's rootfs (and the image mount once unused).
    #[arg(long, conflicts_with = "dir")]
    cid: Option<String>,
    #[arg(required_unless_present = "cid")]
    dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    index: PathBuf,
    dir: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

pub fn base_dir() -> PathBuf {
    env_path("CLIP_BASE_DIR", "/var/lib/clip")
}

pub fn cache_dir() -> PathBuf {
    env_path("CLIP_CACHE_DIR", "/var/cache/clip")
}

pub fn run_dir() -> PathBuf {
    env_path("CLIP_RUN_DIR", "/run/clip")
}

/// `CLIP_CACHE_MAX`: bytes, or with a K, M, G or T suffix. Default 10G.
fn cache_max() -> Result<u64> {
    let v = std::env::var("CLIP_CACHE_MAX").unwrap_or_else(|_| "10G".into());
    let (num, mult) = match v.trim().chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        Some('T' | 't') => (&v[..v.len() - 1], 1 << 40),
        _ => (v.as_str(), 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("CLIP_CACHE_MAX={v:?} is not a size"))?;
    Ok(n * mult)
}

pub fn paths() -> Result<Paths> {
    Ok(Paths::from_env(std::env::current_exe()?))
}

/// The stored index of an image, built if missing.
pub fn index_for_image(image: &str, platform: &str) -> Result<PathBuf> {
    let reference = ImageRef::parse(image)?;
    let platform: Platform = platform.parse()?;
    let source = clip_registry::open(&reference, &RegistryOptions::from_env())?;
    let resolved = source
        .resolve(&platform)
        .with_context(|| format!("resolving {}", reference.canonical()))?;
    let hex = resolved.manifest_digest.trim_start_matches("sha256:").to_string();
    let path = base_dir().join("index").join(format!("{hex}.clip"));
    if IndexFile::load(&path).is_ok() {
        return Ok(path);
    }
    std::fs::create_dir_all(path.parent().expect("has parent"))?;
    let mut opts = clip_index::Options::default();
    if let Some(mib) = std::env::var("CLIP_CHECKPOINT_MIB").ok().and_then(|v| v.parse::<u64>().ok()).filter(|m| *m > 0) {
        opts.spacing = mib << 20;
    }
    let (file, _) = clip_index::build(source.as_ref(), &reference.canonical(), &resolved, &opts)?;
    crate::index::write_atomic(&path, &file.encode()?)?;
    Ok(path)
}

pub fn mount(a: MountArgs) -> Result<()> {
    let index = match (&a.index, &a.image) {
        (Some(i), _) => std::fs::canonicalize(i).with_context(|| format!("{}", i.display()))?,
        (None, Some(image)) => index_for_image(image, &a.platform)?,
        (None, None) => bail!("give --index or --image"),
    };
    if let Some(id) = &a.cid {
        let kind = if a.fuse_overlayfs {
            OverlayKind::Fuse
        } else {
            OverlayKind::Auto
        };
        let r = clip_rootfs::create(&paths()?, &index, id, kind)?;
        println!("{}", r.rootfs.display());
        return Ok(());
    }
    let Some(dir) = &a.dir else {
        bail!("give a directory to mount on, or --cid ID")
    };
    let dir = clip_rootfs::mount_image(&std::env::current_exe()?, &run_dir(), &index, dir)?;
    println!("{}", dir.display());
    Ok(())
}

pub fn umount(a: UmountArgs) -> Result<()> {
    match (&a.cid, &a.dir) {
        (Some(id), _) => Ok(clip_rootfs::release(&paths()?, id)?),
        (None, Some(dir)) => Ok(clip_rootfs::unmount_image(&run_dir(), dir)?),
        (None, None) => bail!("give a directory or --cid ID"),
    }
}

/// Registry settings for serving reads: shorter timeouts than indexing, so
/// that a read fails with EIO in bounded time rather than hanging.
fn serve_registry_options() -> RegistryOptions {
    RegistryOptions {
        retries: 4,
        backoff: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        deadline: Some(Duration::from_secs(20)),
        ..RegistryOptions::from_env()
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    // SIGTERM and SIGINT unmount cleanly: block them in every thread and
    // wait for them in one.
    // SAFETY: plain signal-mask calls before any thread is started.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let file = Arc::new(IndexFile::load(&a.index).with_context(|| format!("loading {}", a.index.display()))?);
    let reference = ImageRef::parse(&file.index.image.reference)?;
    let source: Arc<dyn clip_registry::ImageSource> =
        Arc::from(clip_registry::open(&reference, &serve_registry_options())?);
    let disk = DiskCache::open(&cache_dir(), cache_max()?).ok();
    if disk.is_none() {
        tracing::warn!(dir = %cache_dir().display(), "span cache unavailable; serving from memory only");
    }
    let reader = SpanReader::new(file, source, disk, ReaderOptions::default());
    let fs = ClipFs::new(reader);
    let mut session = fuser::Session::new(fs, &a.dir, &clip_fs::fs::config(a.threads))
        .with_context(|| format!("mounting {}", a.dir.display()))?;
    let mut unmounter = session.unmount_callable();
    let dir = a.dir.clone();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: set holds blocked signals.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!(signal = sig, dir = %dir.display(), "unmounting on signal");
        let _ = unmounter.unmount();
    });
    tracing::info!(dir = %a.dir.display(), index = %a.index.display(), "serving");
    session.run()?;
    tracing::info!(dir = %a.dir.display(), "unmounted");
    Ok(())
}
