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
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
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
    }
    Ok(())
}
