//! `clipctl mount` and `clipctl umount`: requests to clipd, which mounts
//! and serves.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clip_api::{Reply, Request};

#[derive(clap::Args)]
pub struct MountArgs {
    /// Mount this index.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    index: Option<PathBuf>,
    /// Mount this image: its index is taken from CLIP_BASE_DIR, or built.
    #[arg(long)]
    image: Option<String>,
    /// Platform to pick from a multi-arch image (with --image; default:
    /// this host's).
    #[arg(long, default_value_t = crate::client::host_platform())]
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
    /// With --cid: stop the container first if it runs.
    #[arg(long, requires = "cid")]
    force: bool,
    #[arg(required_unless_present = "cid")]
    dir: Option<PathBuf>,
}

pub fn mount(a: MountArgs) -> Result<()> {
    crate::require_root()?;
    if let Some(dir) = &a.dir {
        check_mount_point(dir)?;
    }
    let mib = crate::checkpoint_mib_env()?;
    let spec = a.image.as_deref().map(|i| crate::client::spec(i, &a.platform, mib));
    let index = a.index.as_ref().map(std::path::absolute).transpose()?;
    let req = match (&a.cid, &a.dir) {
        (Some(id), _) => Request::Prepare {
            spec,
            index,
            id: id.clone(),
            fuse_overlayfs: a.fuse_overlayfs,
            record: false,
            // The image's own Entrypoint and Cmd.
            command: Some(Default::default()),
        },
        (None, Some(dir)) => Request::Mount {
            spec,
            index,
            dir: std::path::absolute(dir)?,
        },
        (None, None) => bail!("give a directory to mount on, or --cid ID"),
    };
    match crate::client::call(&req)? {
        Reply::Mounted { dir } => println!("{}", dir.display()),
        Reply::Prepared(p) => println!("{}", p.rootfs.display()),
        _ => bail!("clipd answered something else"),
    }
    Ok(())
}

/// A mount point must be an empty directory, as mount(8) users expect
/// from FUSE (which refuses to hide files under a mount unless told).
fn check_mount_point(dir: &std::path::Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("mount point {}", dir.display()))),
        Ok(m) if !m.is_dir() => bail!("mount point {} is not a directory", dir.display()),
        // Already a mount point (clip's own, say, mounted again or stale):
        // clipd decides.
        Ok(m) if is_mount_point(dir, &m) => Ok(()),
        Ok(_) => {
            if std::fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "mount point {} is not empty: mount on an empty directory (its files would be hidden)",
                    dir.display()
                );
            }
            Ok(())
        }
    }
}

fn is_mount_point(dir: &std::path::Path, m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

pub fn umount(a: UmountArgs) -> Result<()> {
    crate::require_root()?;
    if let Some(id) = &a.cid {
        if crate::containers::running_on(id) {
            if !a.force {
                bail!("container {id} is running: stop it first (clipctl stop {id}), or umount --cid {id} --force");
            }
            crate::containers::stop(crate::containers::StopArgs::now(id))?;
        }
        // The runtime's state goes with the rootfs (a container clipctl ran).
        if let Ok(r) = crate::containers::load(id) {
            let rt: clip_run::Runtime = r.runtime.parse().expect("infallible");
            rt.delete(id);
        }
    }
    let req = match (&a.cid, &a.dir) {
        (Some(id), _) => Request::Release { id: id.clone() },
        (None, Some(dir)) => Request::Umount {
            dir: std::path::absolute(dir)?,
        },
        (None, None) => bail!("give a directory or --cid ID"),
    };
    crate::client::call(&req)?;
    Ok(())
}
