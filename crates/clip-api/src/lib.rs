//! The protocol between `clipd` and its clients.
//!
//! One request per connection on a unix socket that only root can reach
//! (`$CLIP_RUN_DIR/clipd.sock`): the client writes a [`Request`]; the
//! daemon answers with zero or more [`Reply::Progress`] frames and then one
//! final reply. Frames are a little-endian u32 length and JSON.
//!
//! [`Client::connect`] starts `clipd` when none answers (next to the
//! calling binary, or on PATH), so a plain `clipctl run` works on a host
//! without a service manager.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Bumped when a request or reply changes incompatibly.
pub const PROTOCOL: u32 = 1;
/// The largest frame either side accepts.
const MAX_FRAME: usize = 64 << 20;

/// A registry credential, resolved by the caller (who can read its own
/// Docker config and run its own helpers) and passed with the request.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    Basic { username: String, password: String },
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

impl From<Credential> for clip_registry::Credential {
    fn from(c: Credential) -> Self {
        match c {
            Credential::Basic { username, password } => clip_registry::Credential::Basic { username, password },
            Credential::IdentityToken(t) => clip_registry::Credential::IdentityToken(t),
        }
    }
}

impl From<clip_registry::Credential> for Credential {
    fn from(c: clip_registry::Credential) -> Self {
        match c {
            clip_registry::Credential::Basic { username, password } => Credential::Basic { username, password },
            clip_registry::Credential::IdentityToken(t) => Credential::IdentityToken(t),
        }
    }
}

/// Which image, and how to reach it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageSpec {
    /// An image reference, or `oci:DIR[:TAG]`.
    pub image: String,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Credentials by registry (`host[:port]`).
    #[serde(default)]
    pub creds: BTreeMap<String, Credential>,
    /// Uncompressed MiB between checkpoints, when the image is indexed now.
    #[serde(default)]
    pub checkpoint_mib: Option<u64>,
}

/// A container's command, as given on top of the image's config (Docker's
/// rules combine them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Replaces the image's Cmd when not empty.
    pub cmd: Vec<String>,
    /// Replaces the image's Entrypoint (and its Cmd); "" clears it.
    pub entrypoint: Option<String>,
    /// `KEY=value`, on top of the image's Env.
    pub env: Vec<String>,
    pub workdir: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Index an image into the store (and copy the index to `out`).
    Index {
        spec: ImageSpec,
        out: Option<PathBuf>,
        jobs: Option<usize>,
        /// Publish the index (and the profile, if any) in the image's
        /// repository, attached to its manifest.
        #[serde(default)]
        push: bool,
    },
    /// Publishes the image's index with its recorded profile (which must
    /// exist), replacing what was published before.
    PushProfile {
        spec: ImageSpec,
    },
    /// Mount an image (or an index file) read-only at `dir`.
    Mount {
        spec: Option<ImageSpec>,
        index: Option<PathBuf>,
        dir: PathBuf,
    },
    /// Unmount what [`Request::Mount`] mounted at `dir`.
    Umount {
        dir: PathBuf,
    },
    /// A container's rootfs: the image mounted (once per image, shared),
    /// overlayfs on top. For `clipctl run` and `mount --cid`.
    Prepare {
        spec: Option<ImageSpec>,
        index: Option<PathBuf>,
        id: String,
        fuse_overlayfs: bool,
        /// Record what the container reads until it is released (for
        /// `clipctl record`), whatever the daemon's recording window.
        #[serde(default)]
        record: bool,
        /// How the container's process differs from the image's default;
        /// a fresh mount with no profile guesses what it reads first.
        #[serde(default)]
        command: Option<Command>,
    },
    /// Removes a container's rootfs, and its image mount once unused.
    Release {
        id: String,
    },
    /// What is mounted, and which containers use it.
    Ps,
    /// The stored indexes.
    Images,
    /// Removes a stored index (by reference, digest or its prefix), refused
    /// while it is mounted.
    RemoveImage {
        image: String,
    },
    /// Removes every stored index no mount uses, and the cached spans when
    /// no image is mounted.
    Prune,
    /// The daemon's metrics, as OpenMetrics text or JSON.
    Metrics {
        json: bool,
    },
    /// Adds an observation a client made (the container's first exec is
    /// seen by the process that runs the runtime).
    ObserveFirstExec {
        runtime: String,
        seconds: f64,
    },
    /// Hands every mount over to a new `clipd` binary and exits.
    Upgrade {
        binary: PathBuf,
    },
    /// Unmounts everything and exits.
    Stop,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pong {
    pub protocol: u32,
    pub version: String,
    /// The supervisor (holds the FUSE connections, restarts the worker).
    pub supervisor_pid: i32,
    /// The worker (serves everything).
    pub worker_pid: i32,
    /// Seconds since this worker started.
    pub uptime: f64,
    /// How many times the worker took over live mounts.
    pub takeovers: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexSummary {
    pub reference: String,
    pub manifest_digest: String,
    pub platform: String,
    /// The stored index.
    pub path: PathBuf,
    /// Whether it was built now (false: it was already stored).
    pub built: bool,
    pub layers: usize,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub other: u64,
    pub compressed_bytes: u64,
    pub uncompressed_bytes: u64,
    pub checkpoints: u64,
    pub index_bytes: u64,
    pub seconds: f64,
    pub skipped: BTreeMap<String, u64>,
    /// Where the index came from: built here, or a registry artifact.
    #[serde(default)]
    pub origin: String,
    /// The artifact published by this request, and how it is listed.
    #[serde(default)]
    pub published: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub id: String,
    pub rootfs: PathBuf,
    /// Where the bundle (config.json) goes.
    pub bundle: PathBuf,
    /// The image config JSON.
    pub config: String,
    pub image: String,
    pub index: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    pub dir: PathBuf,
    pub image: String,
    pub manifest_digest: String,
    pub index: PathBuf,
    /// Where the index came from.
    #[serde(default)]
    pub origin: String,
    /// Containers whose rootfs is on it.
    pub containers: Vec<String>,
    /// Whether the worker serves it now (false: a stale mount).
    pub live: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub rootfs: PathBuf,
    pub image: String,
    pub overlay: String,
}

/// A stored index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub reference: String,
    pub manifest_digest: String,
    pub index: PathBuf,
    pub index_bytes: u64,
    /// Seconds since the epoch the index was written.
    pub created: u64,
    /// Bytes of the image's files (uncompressed).
    pub size: u64,
    pub mounted: bool,
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PsReply {
    pub mounts: Vec<MountInfo>,
    pub containers: Vec<ContainerInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong(Pong),
    /// Work in progress: compressed bytes read of the total.
    Progress {
        what: String,
        done: u64,
        total: u64,
    },
    Indexed(IndexSummary),
    Mounted {
        dir: PathBuf,
    },
    Prepared(Prepared),
    Ps(PsReply),
    Images {
        images: Vec<ImageInfo>,
    },
    Text {
        text: String,
    },
    Ok,
    /// A log line for the client's user (a warning, say).
    Warning {
        message: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("clipd at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting clipd ({binary})")]
    Start {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("clipd did not come up within {0:?} (see {1})")]
    StartTimeout(Duration, PathBuf),
    #[error("clipd could not start: {message} (see {log})")]
    StartFailed { message: String, log: PathBuf },
    #[error("talking to clipd")]
    Io(#[from] std::io::Error),
    #[error("clipd sent a frame that is not a reply")]
    Decode(#[from] serde_json::Error),
    #[error("{0}")]
    Daemon(String),
    #[error("clipd ended the conversation without a reply")]
    NoReply,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, v: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(v)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)
}

/// Reads one frame; None at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "frame too large"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Where clip keeps its runtime state: `$CLIP_RUN_DIR` or `/run/clip`.
pub fn run_dir() -> PathBuf {
    env_dir("CLIP_RUN_DIR", "/run/clip")
}

/// A directory named by environment variable `key`, else `default`, made
/// absolute against the working directory: runc resolves a bundle's paths
/// from the bundle, so a relative one would name the wrong place.
pub fn env_dir(key: &str, default: &str) -> PathBuf {
    std::env::var_os(key).map_or_else(
        || PathBuf::from(default),
        |v| std::path::absolute(&v).unwrap_or_else(|_| v.into()),
    )
}

/// The daemon's socket under a run directory.
pub fn socket_path(run: &Path) -> PathBuf {
    run.join("clipd.sock")
}

/// `clipd` next to the running executable (as cargo and packages install
/// them), else whatever PATH finds.
pub fn clipd_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("clipd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("clipd"))
}

/// A connection to clipd, for one request.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// A client on a connection made elsewhere.
    pub fn from_stream(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// Connects to the daemon of `run` (see [`run_dir`]), starting it if
    /// none answers and `start` is set.
    pub fn connect(run: &Path, start: bool) -> Result<Self> {
        let socket = socket_path(run);
        match UnixStream::connect(&socket) {
            Ok(stream) => return Ok(Self { stream }),
            Err(e)
                if !start
                    || !matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                return Err(Error::Connect { socket, source: e });
            }
            Err(_) => {}
        }
        let binary = clipd_binary();
        let log = run.join("clipd.log");
        std::fs::create_dir_all(run).map_err(|source| Error::Connect {
            socket: socket.clone(),
            source,
        })?;
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| Error::Start {
                binary: binary.clone(),
                source,
            })?;
        let mut cmd = std::process::Command::new(&binary);
        cmd.arg("--idle-exit").arg("60");
        cmd.stdin(std::process::Stdio::null())
            .stdout(logf.try_clone().map_err(Error::Io)?)
            .stderr(logf);
        // Its own session: it outlives whoever started it.
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Start {
            binary: binary.clone(),
            source,
        })?;
        let wait = Duration::from_secs(30);
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(stream) = UnixStream::connect(&socket) {
                // The supervisor reaps itself; do not leave a zombie.
                std::thread::spawn(move || child.wait());
                return Ok(Self { stream });
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Another clipd won the race to start: connect to it.
                if let Ok(stream) = UnixStream::connect(&socket) {
                    return Ok(Self { stream });
                }
                if !status.success() {
                    // It said why as its last words (a bad setting, say).
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let message = text.lines().rev().find(|l| l.starts_with("clipd: ")).map_or_else(
                        || format!("it exited with {status}"),
                        |l| l["clipd: ".len()..].to_string(),
                    );
                    return Err(Error::StartFailed { message, log });
                }
            }
            if Instant::now() > deadline {
                return Err(Error::StartTimeout(wait, log));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `req` and returns the final reply; progress and warnings go
    /// to `on_progress`.
    pub fn call(mut self, req: &Request, mut on_progress: impl FnMut(&Reply)) -> Result<Reply> {
        write_frame(&mut self.stream, req)?;
        loop {
            match read_frame::<Reply>(&mut self.stream)? {
                None => return Err(Error::NoReply),
                Some(r @ (Reply::Progress { .. } | Reply::Warning { .. })) => on_progress(&r),
                Some(Reply::Error { message }) => return Err(Error::Daemon(message)),
                Some(r) => return Ok(r),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_secrets_stay_out_of_debug() {
        let mut creds = BTreeMap::new();
        creds.insert(
            "r.example".to_string(),
            Credential::Basic {
                username: "u".into(),
                password: "hunter2".into(),
            },
        );
        let req = Request::Mount {
            spec: Some(ImageSpec {
                image: "r.example/a:b".into(),
                platform: "linux/amd64".into(),
                creds,
                checkpoint_mib: None,
            }),
            index: None,
            dir: "/mnt".into(),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        write_frame(&mut buf, &Reply::Ok).unwrap();
        let mut r = &buf[..];
        let back: Request = read_frame(&mut r).unwrap().unwrap();
        assert!(matches!(back, Request::Mount { .. }));
        assert!(!format!("{back:?}").contains("hunter2"));
        assert!(matches!(read_frame::<Reply>(&mut r).unwrap(), Some(Reply::Ok)));
        assert!(read_frame::<Reply>(&mut r).unwrap().is_none());
        let huge = (u32::MAX).to_le_bytes();
        assert!(read_frame::<Reply>(&mut &huge[..]).is_err());
    }
}
