//! `clipctl run`: clipd prepares the rootfs (index, image mount, overlay);
//! this process writes the bundle and runs the container in the
//! foreground, with the caller's stdio and signals.

use anyhow::{bail, Context, Result};
use clip_api::{Reply, Request};
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
    /// Platform to pick from a multi-arch image (default: this host's).
    #[arg(long, default_value_t = crate::client::host_platform())]
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

/// Runs the container and returns its exit code. `record`: what it reads,
/// until it exits, goes into its image's prefetch profile (and it is
/// removed when it exits).
pub fn run(mut a: Args, record: bool) -> Result<i32> {
    if record {
        a.rm = true;
    }
    let started = clip_run::monotonic_ns();
    let id = a.name.clone().unwrap_or_else(generated_id);
    let req = Request::Prepare {
        spec: Some(crate::client::spec(&a.image, &a.platform, crate::checkpoint_mib_env())),
        index: None,
        id: id.clone(),
        fuse_overlayfs: a.fuse_overlayfs,
        record,
    };
    let Reply::Prepared(p) = crate::client::call(&req)? else {
        bail!("clipd answered something else");
    };
    let runtime: Runtime = a.runtime.parse().expect("infallible");
    let result = (|| -> Result<i32> {
        let opts = RunOptions {
            cmd: a.cmd,
            env: a.env,
            workdir: a.workdir,
            user: a.user,
            hostname: Some(id.clone()),
        };
        let spec = clip_run::build_spec(p.config.as_bytes(), &p.rootfs, &opts)?;
        clip_run::write_bundle(&p.bundle, &spec)?;
        let name = runtime.name();
        let label = name.rsplit('/').next().unwrap_or(&name).to_string();
        let cid = id.clone();
        // Recorded at once: a long-running container's start shows in the
        // metrics while it runs.
        let on_exec = Box::new(move |t: u64| {
            let seconds = t.saturating_sub(started) as f64 / 1e9;
            tracing::info!(container = %cid, runtime = %label, seconds, "container process started");
            let _ = crate::client::call_running(&Request::ObserveFirstExec {
                runtime: label,
                seconds,
            });
        });
        let exit = runtime
            .run(&p.bundle, &id, Some(on_exec))
            .with_context(|| format!("running container {id}"))?;
        Ok(exit.code)
    })();
    if a.rm {
        runtime.delete(&id);
        crate::client::call(&Request::Release { id: id.clone() })
            .with_context(|| format!("removing container {id}"))?;
    }
    result
}
