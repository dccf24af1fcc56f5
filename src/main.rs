//! `clipctl`: the command line of clip. Parses, calls the libraries, prints.

mod index;
mod inspect;
mod metrics;
mod mount;
mod run;
mod source;

use std::path::PathBuf;

use anyhow::Result;
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
    /// Read an image once and write its metadata-only .clip index.
    Index(index::Args),
    /// Summarise an index, or list its entries.
    Inspect(inspect::Args),
    /// Mount an image read-only, lazily fetching file data as it is read.
    Mount(mount::MountArgs),
    /// Unmount a clip mount and stop what served it (also a stale one).
    Umount(mount::UmountArgs),
    /// Serve a mount in the foreground (started by `clipctl mount`).
    #[command(hide = true)]
    Serve(mount::ServeArgs),
    /// Run a container from an image, lazily: index, mount, run.
    Run(run::Args),
    /// Print the host's clip metrics (every mount, index build and run), or
    /// serve them for Prometheus.
    Metrics(metrics::Args),
    /// Print a file of the image, read through the index's checkpoints.
    Cat {
        /// The .clip index.
        index: PathBuf,
        /// Path of the file inside the image.
        path: String,
    },
}

/// Logs go to stderr: warnings by default, more with `CLIP_VERBOSE=1` or
/// `RUST_LOG`. A mount server (whose stderr is its log file) logs its
/// events (mount, unmount, retries, evictions) by default.
fn init_logging(daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if daemon || std::env::var("CLIP_VERBOSE").is_ok_and(|v| v == "1") {
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

fn main() {
    // Die quietly on a closed pipe (`clipctl inspect ... | head`), like
    // other Unix tools, instead of reporting EPIPE as an error.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_)) {
        // Before any thread exists: every thread then keeps them blocked
        // and the runtime's forwarder gets them.
        clip_run::block_forwarded_signals();
    }
    init_logging(matches!(cli.command, Command::Serve(_)));
    // Processes that end on their own leave their counts (index builds,
    // range reads, container starts) to the host's metrics; servers and
    // `metrics` itself handle theirs.
    let persist = !matches!(cli.command, Command::Serve(_) | Command::Metrics(_));
    let mut code = 0;
    let result: Result<()> = match cli.command {
        Command::Index(a) => index::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Cat { index, path } => inspect::cat(&index, &path),
        Command::Mount(a) => mount::mount(a),
        Command::Umount(a) => mount::umount(a),
        Command::Serve(a) => mount::serve(a),
        Command::Metrics(a) => metrics::run(a),
        Command::Run(a) => run::run(a).map(|c| code = c),
    };
    if persist {
        if let Err(e) = clip_metrics::host::persist(&clip_metrics::host::dir_from_env()) {
            tracing::debug!(error = %e, "metrics not kept");
        }
    }
    if let Err(e) = result {
        eprintln!("clipctl: {e:#}");
        std::process::exit(1);
    }
    std::process::exit(code);
}
