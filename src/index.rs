//! `clipctl index`

use std::path::PathBuf;

use anyhow::{bail, Result};
use clip_api::{Reply, Request};

#[derive(clap::Args)]
pub struct Args {
    /// Image reference: host[:port]/repo[:tag|@digest], Docker Hub shorthand,
    /// or oci:DIR[:TAG] for a local OCI layout.
    #[arg(long)]
    image: String,
    /// Also write the index here (it is always stored under CLIP_BASE_DIR).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Platform to pick from a multi-arch image (default: this host's).
    #[arg(long, default_value_t = crate::client::host_platform())]
    platform: String,
    /// Uncompressed MiB between checkpoints.
    #[arg(long, env = "CLIP_CHECKPOINT_MIB")]
    checkpoint_mib: Option<u64>,
    /// Layers indexed at once (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Publish the index (with the prefetch profile, if one is recorded, and
    /// the hints for a guessed start) in the image's repository, attached to
    /// its manifest, so that other nodes fetch it instead of indexing. Needs
    /// push access.
    #[arg(long)]
    push: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct PushProfileArgs {
    /// Image reference (it must be in a registry).
    image: String,
    /// Platform to pick from a multi-arch image (default: this host's).
    #[arg(long, default_value_t = crate::client::host_platform())]
    platform: String,
}

/// `clipctl push-profile`: publishes the index with the recorded profile.
pub fn push_profile(a: PushProfileArgs) -> Result<()> {
    let req = Request::PushProfile {
        spec: crate::client::spec(&a.image, &a.platform, None),
    };
    match crate::client::call(&req)? {
        Reply::Text { text } => println!("{text}"),
        _ => bail!("clipd answered something else"),
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    crate::require_root()?;
    if let Some(m) = a.checkpoint_mib {
        anyhow::ensure!((1..=64).contains(&m), "--checkpoint-mib must be between 1 and 64");
    }
    if let Some(out) = &a.out {
        crate::check_writable(out)?;
    }
    let req = Request::Index {
        spec: crate::client::spec(&a.image, &a.platform, a.checkpoint_mib),
        out: a.out.as_ref().map(std::path::absolute).transpose()?,
        jobs: a.jobs,
        push: a.push,
    };
    let Reply::Indexed(s) = crate::client::call(&req)? else {
        bail!("clipd answered something else");
    };
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "indexed {} ({} layers, {} files, {} dirs) into {}: {} bytes, {} checkpoints, {:.2}s{}",
            s.reference,
            s.layers,
            s.files,
            s.directories,
            a.out.as_ref().unwrap_or(&s.path).display(),
            s.index_bytes,
            s.checkpoints,
            s.seconds,
            if s.built { "" } else { " (already indexed)" }
        );
        println!("index origin: {}", s.origin);
        if let Some(p) = &s.published {
            println!("published: {p}");
        }
    }
    Ok(())
}
