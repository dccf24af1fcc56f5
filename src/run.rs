//! `clipctl run`: index (if needed), mount, write the bundle, run.

use anyhow::{Context, Result};
use clip_rootfs::OverlayKind;
use clip_run::{RunOptions, Runtime};

#[derive(clap::Args)]
#[command(trailing_var_arg = true)]
pub struct Args {
    /// clip (clip-runtime, the default), runc, crun, runsc, or the path of a
    /// runc-compatible binary.
    #[arg(long, default_value = "clip")]
    runtime: String,
    /// Remove the container's rootfs and state when it exits.
    #[arg(long)]
    rm: bool,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid, resolved in the image.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Container id (default: generated).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Use fuse-overlayfs for the writable layer.
    #[arg(long)]
    fuse_overlayfs: bool,
    /// Image reference.
    image: String,
    /// Command and arguments, replacing the image's Cmd.
    #[arg(allow_hyphen_values = true)]
    cmd: Vec<String>,
}

fn generated_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "clip-{:x}{:05x}",
        t.as_micros() & 0xffff_ffff_ffff,
        std::process::id() & 0xfffff
    )
}

/// Runs the container and returns its exit code.
pub fn run(a: Args) -> Result<i32> {
    let started = clip_run::monotonic_ns();
    let index = crate::mount::index_for_image(&a.image, &a.platform)?;
    let id = a.name.clone().unwrap_or_else(generated_id);
    let paths = crate::mount::paths()?;
    let kind = if a.fuse_overlayfs {
        OverlayKind::Fuse
    } else {
        OverlayKind::Auto
    };
    let rootfs = clip_rootfs::create(&paths, &index, &id, kind)?;
    let runtime: Runtime = a.runtime.parse().expect("infallible");
    let result = (|| -> Result<i32> {
        let file = clip_format::IndexFile::load(&index)?;
        let opts = RunOptions {
            cmd: a.cmd,
            env: a.env,
            workdir: a.workdir,
            user: a.user,
            hostname: Some(id.clone()),
        };
        let spec = clip_run::build_spec(&file.index.image.config, &rootfs.rootfs, &opts)?;
        let bundle = paths.base.join("containers").join(&id).join("bundle");
        clip_run::write_bundle(&bundle, &spec)?;
        let name = runtime.name();
        let label = name.rsplit('/').next().unwrap_or(&name).to_string();
        let cid = id.clone();
        // Recorded and kept at once: a long-running container's start
        // shows in the metrics while it runs.
        let on_exec = Box::new(move |t: u64| {
            let secs = t.saturating_sub(started) as f64 / 1e9;
            clip_metrics::defs::FIRST_EXEC_SECONDS
                .with(&[("runtime", &label)])
                .observe(secs);
            tracing::info!(container = %cid, runtime = %label, seconds = secs, "container process started");
            let _ = clip_metrics::host::persist(&clip_metrics::host::dir_from_env());
        });
        let exit = runtime
            .run(&bundle, &id, Some(on_exec))
            .with_context(|| format!("running container {id}"))?;
        Ok(exit.code)
    })();
    if a.rm {
        runtime.delete(&id);
        clip_rootfs::release(&paths, &id).with_context(|| format!("removing container {id}"))?;
    }
    result
}
