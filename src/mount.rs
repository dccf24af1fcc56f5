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
    #[arg(required_unless_present = "cid")]
    dir: Option<PathBuf>,
}

pub fn mount(a: MountArgs) -> Result<()> {
    let spec = a
        .image
        .as_deref()
        .map(|i| crate::client::spec(i, &a.platform, crate::checkpoint_mib_env()));
    let index = a.index.as_ref().map(std::path::absolute).transpose()?;
    let req = match (&a.cid, &a.dir) {
        (Some(id), _) => Request::Prepare {
            spec,
            index,
            id: id.clone(),
            fuse_overlayfs: a.fuse_overlayfs,
            record: false,
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

pub fn umount(a: UmountArgs) -> Result<()> {
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
