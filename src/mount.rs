//! `clipctl mount`, `clipctl umount` and the serving process behind a mount
//! (`clipctl serve`, started by `mount`, one per mount).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clip_format::IndexFile;
use clip_registry::{ImageRef, Platform};
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

pub fn run_dir() -> PathBuf {
    env_path("CLIP_RUN_DIR", "/run/clip")
}

pub fn paths() -> Result<Paths> {
    Ok(Paths::from_env(std::env::current_exe()?))
}

/// The stored index of an image, built if missing.
pub fn index_for_image(image: &str, platform: &str) -> Result<PathBuf> {
    let reference = ImageRef::parse(image)?;
    let platform: Platform = platform.parse()?;
    let source = crate::source::open(&reference)?;
    let resolved = source
        .resolve(&platform)
        .with_context(|| format!("resolving {}", reference.canonical()))?;
    let hex = resolved.manifest_digest.trim_start_matches("sha256:").to_string();
    let source_key: String = {
        use sha2::Digest;
        sha2::Sha256::digest(reference.source().as_bytes())
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    // Keyed by source too: the index fetches from the registry it names.
    let path = base_dir().join("index").join(format!("{hex}-{source_key}.clip"));
    if IndexFile::load(&path).is_ok() {
        return Ok(path);
    }
    clip_rootfs::private_dir(path.parent().expect("has parent"))?;
    let mut opts = clip_index::Options::default();
    if let Some(mib) = std::env::var("CLIP_CHECKPOINT_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|m| *m > 0)
    {
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

pub fn serve(a: ServeArgs) -> Result<()> {
    let opts = clip_fs::serve::ServeOptions {
        threads: a.threads,
        ..clip_fs::serve::ServeOptions::from_env()
    };
    Ok(clip_fs::serve::serve(&a.index, &a.dir, &opts)?)
}
