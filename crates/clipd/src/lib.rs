//! `clipd`: clip's node service, one per host (the binary is the root
//! package's `src/bin/clipd.rs`, which calls [`main`]).
//!
//! Two processes: the supervisor ([`supervisor`]) holds the instance lock,
//! the API socket and every mount's FUSE descriptor, and restarts the
//! worker ([`worker`]) whenever it dies; the worker serves everything
//! (FUSE sessions, the layer store, registry clients, indexing, the API,
//! metrics). See README.md, "The node service".

mod guesses;
mod handlers;
mod handover;
mod images;
mod profiles;
mod published;
mod snapshotter;
mod supervisor;
mod worker;

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "clipd",
    version,
    about = "clip's node service: serves every image mount of the host"
)]
pub struct Options {
    /// Exit once nothing is mounted and no request came for this many
    /// seconds (clipctl starts clipd with 60 when none runs; a service
    /// manager runs it without).
    #[arg(long)]
    pub idle_exit: Option<u64>,
    /// The daemon's own registry credentials, for fleets: a Docker config
    /// file (`auths`, `credHelpers`, `credsStore`). Used after the
    /// credentials a request brings. Default: /etc/clip/auth.json if it
    /// exists.
    #[arg(long, env = "CLIP_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Seconds a tag's resolution is trusted before asking the registry
    /// again (a registry that is down: the last resolution is used, with a
    /// warning).
    #[arg(long, env = "CLIP_TAG_TTL", default_value_t = 60)]
    pub tag_ttl: u64,
    /// Seconds after a container starts during which what it reads is
    /// recorded into its image's prefetch profile (0: never).
    #[arg(long, env = "CLIP_RECORD_SECS", default_value_t = 30)]
    pub record_secs: u64,
    /// When a fresh mount has no profile, fetch what its container is
    /// guessed to read first, from what indexing learnt of the image's
    /// files (libraries each program needs, modules each Python source
    /// imports). `false` leaves such a start to demand reads.
    #[arg(long, env = "CLIP_GUESS", default_value_t = true, action = clap::ArgAction::Set)]
    pub guess: bool,
    /// Seconds an image stays mounted after its last container is
    /// removed, so that the next container of it starts with the kernel's
    /// caches warm, as a containerd snapshot stays unpacked (0: unmount at
    /// once).
    #[arg(long, env = "CLIP_IMAGE_LINGER", default_value_t = 600)]
    pub image_linger: u64,
    /// Serve containerd's snapshots API (a proxy snapshotter plugin) on
    /// this socket (`clipctl containerd-config` prints containerd's side).
    #[arg(long, env = "CLIP_SNAPSHOTTER_SOCKET")]
    pub snapshotter_socket: Option<PathBuf>,
    /// The snapshotter's root: snapshot metadata and the directories of
    /// layers containerd unpacks itself. Under containerd's root, where
    /// the kubelet looks for image filesystem stats.
    #[arg(
        long,
        env = "CLIP_SNAPSHOTTER_ROOT",
        default_value = "/var/lib/containerd/io.containerd.snapshotter.v1.clip"
    )]
    pub snapshotter_root: PathBuf,
    /// Threads serving each mount's FUSE requests.
    #[arg(long, default_value_t = 4)]
    pub fuse_threads: usize,
    /// Run as the worker (started by the supervisor).
    #[arg(long, hide = true)]
    pub worker: bool,
    /// Take over as supervisor from the handover in this descriptor (an
    /// upgrade's exec).
    #[arg(long, hide = true)]
    pub takeover: Option<i32>,
}

/// When process `pid` started (clock ticks after boot): with the pid, it
/// names one process, never a later one that reused the pid.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count from the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// The `clipd` binary's main.
pub fn main() {
    // A fixed mmap threshold: glibc otherwise raises it to the size of the
    // largest block freed, and every FUSE session's 16 MiB request buffer
    // (calloc) then comes from an arena, zeroed by hand, all of it resident:
    // 16 MiB a mount. Above the threshold, calloc maps untouched zero pages.
    // SAFETY: a plain allocator setting, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
    let opts = Options::parse();
    init_logging();
    // SAFETY: the process runs as root; nothing else to check here.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("clipd: must run as root (it mounts filesystems)");
        std::process::exit(1);
    }
    let r = if opts.worker {
        worker::run(&opts)
    } else {
        supervisor::run(&opts, opts.takeover)
    };
    if let Err(e) = r {
        tracing::error!("{e:#}");
        eprintln!("clipd: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_times_name_processes() {
        let me = std::process::id() as i32;
        let t = super::start_time(me).unwrap();
        assert_eq!(super::start_time(me), Some(t));
        assert!(super::start_time(i32::MAX).is_none());
    }
}
