//! `clipctl`: the command line of clip. Parses, asks clipd (or, for
//! `inspect` and `cat`, reads an index itself), prints.

mod client;
mod containers;
mod daemon;
mod exit;
mod images;
mod index;
mod inspect;
mod metrics;
mod mount;
mod run;
mod source;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "clipctl",
    version,
    about = "Lazy, read-only OCI container images for fast container starts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read an image once and store its metadata-only .clip index.
    Index(index::Args),
    /// Publish an image's index with its recorded prefetch profile in the
    /// image's repository (replacing what was published).
    PushProfile(index::PushProfileArgs),
    /// Summarise an index, or list its entries.
    Inspect(inspect::Args),
    /// Mount an image read-only, lazily fetching file data as it is read.
    Mount(mount::MountArgs),
    /// Unmount a clip mount, or remove a container's rootfs.
    Umount(mount::UmountArgs),
    /// Run a container from an image, lazily: index, mount, run.
    Run(run::Args),
    /// The stored indexes: image, digest, when indexed, size.
    Images {
        #[arg(long)]
        json: bool,
    },
    /// Remove stored indexes (by reference, digest or digest prefix);
    /// refused while mounted.
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove every stored index no mount uses, and the cached spans when
    /// no image is mounted.
    Prune,
    /// Run a command in a running container.
    Exec(containers::ExecArgs),
    /// Print what a detached container wrote.
    Logs(containers::LogsArgs),
    /// Stop running containers: SIGTERM, then SIGKILL after a grace period.
    Stop(containers::StopArgs),
    /// Remove containers: runtime state, rootfs and log.
    Rm(containers::RmArgs),
    /// Run a container and record what it reads into its image's prefetch
    /// profile (replayed whenever the image is mounted); removed on exit.
    Record(run::Args),
    /// Containers (running ones; -a for all), or with --mounts the image
    /// mounts and which containers use each.
    Ps(containers::PsArgs),
    /// Print clipd's metrics, or serve them for Prometheus.
    Metrics(metrics::Args),
    /// Print a file of the image, read through the index's checkpoints.
    Cat {
        /// The .clip index.
        index: PathBuf,
        /// Path of the file inside the image.
        path: String,
    },
    /// Print the sections of containerd's config.toml that make clip its
    /// snapshotter (for clipd run with CLIP_SNAPSHOTTER_SOCKET).
    ContainerdConfig {
        /// clipd's snapshotter socket.
        #[arg(long, env = "CLIP_SNAPSHOTTER_SOCKET", default_value = "/run/clip/snapshotter.sock")]
        socket: PathBuf,
    },
    /// The node service: status, stop, upgrade.
    #[command(subcommand)]
    Daemon(daemon::Command),
}

/// Checkpoint spacing bounds: below 1 MiB the index outgrows the data it
/// saves; above 64 MiB one small read inflates tens of megabytes.
pub const CHECKPOINT_MIB: std::ops::RangeInclusive<u64> = 1..=64;

/// `CLIP_CHECKPOINT_MIB`, when set; an error when it is not a whole
/// number of MiB within [`CHECKPOINT_MIB`].
pub fn checkpoint_mib_env() -> Result<Option<u64>> {
    match std::env::var("CLIP_CHECKPOINT_MIB") {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if CHECKPOINT_MIB.contains(&n) => Ok(Some(n)),
            _ => anyhow::bail!(
                "CLIP_CHECKPOINT_MIB={v:?}: expected a whole number of MiB from {} to {}",
                CHECKPOINT_MIB.start(),
                CHECKPOINT_MIB.end()
            ),
        },
    }
}

/// Commands that mount, run or talk to clipd need root; said plainly
/// before anything else goes wrong.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("this command needs root (clip mounts filesystems and runs containers): run it with sudo");
    }
    Ok(())
}

/// Fails now, before any work, if `out` cannot be written.
pub fn check_writable(out: &Path) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir.join(format!(".clipctl-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("{} cannot be written", out.display()))
}

/// Logs go to stderr: warnings by default, more with `CLIP_VERBOSE=1` or
/// `RUST_LOG`.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let default = if std::env::var("CLIP_VERBOSE").is_ok_and(|v| v == "1") {
        "info"
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// containerd's side of the snapshotter: the proxy plugin, and the CRI
/// settings that pass each layer's image reference and digests to it.
fn containerd_config(socket: &Path) -> String {
    format!(
        r#"# clip as containerd's snapshotter: add to /etc/containerd/config.toml
# (version = 2), then restart containerd. clipd must serve the socket
# (CLIP_SNAPSHOTTER_SOCKET, as in contrib/systemd/clipd.service).
[proxy_plugins.clip]
  type = "snapshot"
  address = "{}"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "clip"
  # The CRI passes each layer's image reference, manifest and layer digests
  # to the snapshotter only with this off.
  disable_snapshot_annotations = false
"#,
        socket.display()
    )
}

fn main() {
    // Die quietly on a closed pipe (`clipctl inspect ... | head`), like
    // other Unix tools, instead of reporting EPIPE as an error.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_) | Command::Record(_) | Command::Exec(_)) {
        // Before any thread exists: every thread then keeps them blocked
        // and the runtime's forwarder gets them.
        clip_run::block_forwarded_signals();
    }
    init_logging();
    let mut code = 0;
    // docker's codes for the commands that run containers (exit.rs).
    let runs = matches!(cli.command, Command::Run(_) | Command::Record(_) | Command::Exec(_));
    let result: Result<()> = match cli.command {
        Command::Index(a) => index::run(a),
        Command::PushProfile(a) => index::push_profile(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Cat { index, path } => inspect::cat(&index, &path),
        Command::Mount(a) => mount::mount(a),
        Command::Umount(a) => mount::umount(a),
        Command::Run(a) => run::run(a, false).map(|c| code = c),
        Command::Record(a) => run::run(a, true).map(|c| code = c),
        Command::Ps(a) => containers::ps(a),
        Command::Images { json } => images::list(json),
        Command::Rmi { images } => images::rmi(&images),
        Command::Prune => images::prune(),
        Command::Exec(a) => containers::exec(a).map(|c| code = c),
        Command::Logs(a) => containers::logs(a),
        Command::Stop(a) => containers::stop(a),
        Command::Rm(a) => containers::rm(a),
        Command::Metrics(a) => metrics::run(a),
        Command::Daemon(c) => daemon::run(c),
        Command::ContainerdConfig { socket } => {
            print!("{}", containerd_config(&socket));
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("clipctl: {e:#}");
        std::process::exit(if runs { exit::code_of(&e) } else { 1 });
    }
    std::process::exit(code);
}
