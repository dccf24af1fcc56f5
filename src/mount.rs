//! `clipctl mount`, `clipctl umount` and the serving process behind a mount
//! (`clipctl serve`, started by `mount`, one per mount).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clip_format::IndexFile;
use clip_fs::{mounts, ClipFs, DiskCache, ReaderOptions, SpanReader};
use clip_registry::{ImageRef, Platform, RegistryOptions};
use serde_json::json;

#[derive(clap::Args)]
pub struct MountArgs {
    /// Mount this index.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    index: Option<PathBuf>,
    /// Mount this image: its index is taken from CLIP_BASE_DIR, or built.
    #[arg(long)]
    image: Option<String>,
    /// Platform to pick from a multi-arch image (with --image).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Where to mount.
    dir: PathBuf,
}

#[derive(clap::Args)]
pub struct UmountArgs {
    dir: PathBuf,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    index: PathBuf,
    dir: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

pub fn base_dir() -> PathBuf {
    env_path("CLIP_BASE_DIR", "/var/lib/clip")
}

pub fn cache_dir() -> PathBuf {
    env_path("CLIP_CACHE_DIR", "/var/cache/clip")
}

fn run_dir() -> PathBuf {
    env_path("CLIP_RUN_DIR", "/run/clip").join("mounts")
}

/// `CLIP_CACHE_MAX`: bytes, or with a K, M, G or T suffix. Default 10G.
fn cache_max() -> Result<u64> {
    let v = std::env::var("CLIP_CACHE_MAX").unwrap_or_else(|_| "10G".into());
    let (num, mult) = match v.trim().chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        Some('T' | 't') => (&v[..v.len() - 1], 1 << 40),
        _ => (v.as_str(), 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("CLIP_CACHE_MAX={v:?} is not a size"))?;
    Ok(n * mult)
}

/// State files of the mount at `dir`: (json, log).
fn state_paths(dir: &Path) -> (PathBuf, PathBuf) {
    use sha2::Digest;
    let key = hex_prefix(&sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes()));
    let d = run_dir();
    (d.join(format!("{key}.json")), d.join(format!("{key}.log")))
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(12).map(|x| format!("{x:02x}")).collect()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn state_pid(json: &Path) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).ok()?).ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

/// Stops a serving process: it exits by itself once unmounted; one that
/// does not is killed.
fn stop_server(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        // Reap it if it is our child; harmless otherwise.
        // SAFETY: non-blocking waitpid.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid_alive(pid) {
        // SAFETY: plain kill.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes a dead mount at `dir` and whatever served it.
fn clean_stale(dir: &Path) -> Result<()> {
    let (json, log) = state_paths(dir);
    if mounts::mount_at(dir).is_some_and(|m| mounts::is_clip_mount(&m)) && mounts::is_stale(dir) {
        tracing::info!(dir = %dir.display(), "cleaning up a stale mount");
        mounts::unmount(dir, true).with_context(|| format!("unmounting stale {}", dir.display()))?;
    }
    if let Some(pid) = state_pid(&json) {
        stop_server(pid);
    }
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(log);
    Ok(())
}

/// The stored index of an image, built if missing.
pub fn index_for_image(image: &str, platform: &str) -> Result<PathBuf> {
    let reference = ImageRef::parse(image)?;
    let platform: Platform = platform.parse()?;
    let source = clip_registry::open(&reference, &RegistryOptions::from_env())?;
    let resolved = source
        .resolve(&platform)
        .with_context(|| format!("resolving {}", reference.canonical()))?;
    let hex = resolved.manifest_digest.trim_start_matches("sha256:").to_string();
    let path = base_dir().join("index").join(format!("{hex}.clip"));
    if IndexFile::load(&path).is_ok() {
        return Ok(path);
    }
    std::fs::create_dir_all(path.parent().expect("has parent"))?;
    let opts = clip_index::Options::default();
    let (file, _) = clip_index::build(source.as_ref(), &reference.canonical(), &resolved, &opts)?;
    crate::index::write_atomic(&path, &file.encode()?)?;
    Ok(path)
}

pub fn mount(a: MountArgs) -> Result<()> {
    let index = match (&a.index, &a.image) {
        (Some(i), _) => std::fs::canonicalize(i).with_context(|| format!("{}", i.display()))?,
        (None, Some(image)) => index_for_image(image, &a.platform)?,
        (None, None) => bail!("give --index or --image"),
    };
    let dir = mount_index(&index, &a.dir)?;
    println!("{}", dir.display());
    Ok(())
}

/// Mounts an index at `dir` (created if missing), starting its serving
/// process, and returns once the mount answers. Mounting the same index
/// again is a no-op; a stale mount there is cleaned up first.
pub fn mount_index(index: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).or_else(|e| if mounts::is_stale(dir) { Ok(()) } else { Err(e) })?;
    let dir = if mounts::is_stale(dir) {
        std::path::absolute(dir)?
    } else {
        std::fs::canonicalize(dir)?
    };
    let (json, log) = state_paths(&dir);
    if mounts::is_stale(&dir) {
        clean_stale(&dir)?;
    } else if let Some(m) = mounts::mount_at(&dir) {
        if mounts::is_clip_mount(&m) {
            let same = std::fs::read(&json)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["index"] == index.display().to_string());
            if same {
                return Ok(dir);
            }
            bail!("{} is already a clip mount of another index", dir.display());
        }
    }
    // Fail early, in this process, on a bad index.
    IndexFile::load(index).with_context(|| format!("loading {}", index.display()))?;
    std::fs::create_dir_all(run_dir())?;
    let logf = std::fs::File::create(&log)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("serve").arg("--index").arg(index).arg(&dir);
    cmd.stdin(Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
    // SAFETY: setsid is async-signal-safe; the server outlives this command
    // in its own session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the serving process")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if mounts::mount_at(&dir).is_some_and(|m| mounts::is_clip_mount(&m)) && std::fs::metadata(&dir).is_ok() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let mut text = String::new();
            let _ = std::fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut text));
            let _ = std::fs::remove_file(&log);
            bail!("the serving process exited ({status}): {}", text.trim());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{} did not come up within 60 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let state = json!({"dir": dir, "pid": child.id(), "index": index});
    crate::index::write_atomic(&json, state.to_string().as_bytes())?;
    Ok(dir)
}

pub fn umount(a: UmountArgs) -> Result<()> {
    umount_dir(&a.dir)
}

/// Unmounts a clip mount and stops its server. Idempotent; stale mounts
/// (the server was killed) are cleaned up too.
pub fn umount_dir(dir: &Path) -> Result<()> {
    let dir = if mounts::is_stale(dir) {
        std::path::absolute(dir)?
    } else {
        match std::fs::canonicalize(dir) {
            Ok(d) => d,
            Err(_) => std::path::absolute(dir)?,
        }
    };
    if mounts::is_stale(&dir) {
        return clean_stale(&dir);
    }
    let (json, log) = state_paths(&dir);
    if let Some(m) = mounts::mount_at(&dir) {
        if !mounts::is_clip_mount(&m) {
            bail!("{} is not a clip mount ({})", dir.display(), m.fstype);
        }
        mounts::unmount(&dir, false).with_context(|| format!("unmounting {}", dir.display()))?;
    }
    if let Some(pid) = state_pid(&json) {
        stop_server(pid);
    }
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(log);
    Ok(())
}

/// Registry settings for serving reads: shorter timeouts than indexing, so
/// that a read fails with EIO in bounded time rather than hanging.
fn serve_registry_options() -> RegistryOptions {
    RegistryOptions {
        retries: 4,
        backoff: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        deadline: Some(Duration::from_secs(20)),
        ..RegistryOptions::from_env()
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    // SIGTERM and SIGINT unmount cleanly: block them in every thread and
    // wait for them in one.
    // SAFETY: plain signal-mask calls before any thread is started.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let file = Arc::new(IndexFile::load(&a.index).with_context(|| format!("loading {}", a.index.display()))?);
    let reference = ImageRef::parse(&file.index.image.reference)?;
    let source: Arc<dyn clip_registry::ImageSource> =
        Arc::from(clip_registry::open(&reference, &serve_registry_options())?);
    let disk = DiskCache::open(&cache_dir(), cache_max()?).ok();
    if disk.is_none() {
        tracing::warn!(dir = %cache_dir().display(), "span cache unavailable; serving from memory only");
    }
    let reader = SpanReader::new(file, source, disk, ReaderOptions::default());
    let fs = ClipFs::new(reader);
    let mut session = fuser::Session::new(fs, &a.dir, &clip_fs::fs::config(a.threads))
        .with_context(|| format!("mounting {}", a.dir.display()))?;
    let mut unmounter = session.unmount_callable();
    let dir = a.dir.clone();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: set holds blocked signals.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!(signal = sig, dir = %dir.display(), "unmounting on signal");
        let _ = unmounter.unmount();
    });
    tracing::info!(dir = %a.dir.display(), index = %a.index.display(), "serving");
    session.run()?;
    tracing::info!(dir = %a.dir.display(), "unmounted");
    Ok(())
}
