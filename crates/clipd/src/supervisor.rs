//! The supervisor: `clipd`'s first process. It does little that can fail:
//! it takes the instance lock, binds the API socket, starts the worker
//! (which does everything else), holds every mount's `/dev/fuse`
//! descriptor the worker gives it, and starts a new worker when one dies,
//! handing it the descriptors back. The kernel keeps a FUSE connection
//! while any process holds its descriptor, so a worker crash costs the
//! containers a stall, never an error: requests the dead worker had read
//! are resent by the kernel to the next one (`FUSE_NOTIFY_RESEND`).
//!
//! The listening sockets (the API's, and containerd's snapshotter socket
//! when there is one) are the supervisor's too: while a worker restarts,
//! clients' connections wait in the backlog instead of being refused, so
//! containerd's gRPC channel never falls into its reconnect backoff.
//!
//! Upgrades: the worker asks; the supervisor stops it and `exec`s the new
//! binary in its own process (same pid), passing the lock, the listening
//! sockets and the held descriptors, described in a memfd.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use serde::{Deserialize, Serialize};

use crate::handover::{self, MountRecord, Msg};
use crate::Options;

/// What crosses an upgrade's exec.
#[derive(Serialize, Deserialize)]
struct Handover {
    lock: RawFd,
    listener: RawFd,
    /// Absent from the handover of a clipd that did not hold it.
    #[serde(default)]
    snapshotter: Option<RawFd>,
    held: Vec<(String, RawFd, MountRecord)>,
}

struct Held {
    fd: OwnedFd,
    record: MountRecord,
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; on success it returns a new descriptor.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Takes the instance lock; None when another clipd holds it.
fn lock(run: &Path) -> Result<Option<std::fs::File>> {
    let f = std::fs::File::create(run.join("clipd.lock")).context("creating the lock file")?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e).context("locking"),
    }
}

fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    // Root only: the socket is born 0600 (umask), not chmod-ed after.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    l.with_context(|| format!("binding {}", socket.display()))
}

fn write_pidfile(run: &Path) {
    let pid = std::process::id() as i32;
    let start = crate::start_time(pid).unwrap_or(0);
    let _ = std::fs::write(run.join("clipd.pid"), format!("{pid} {start}\n"));
}

pub fn run(opts: &Options, handover_fd: Option<RawFd>) -> Result<()> {
    // A bad setting ends clipd here, said once, rather than in every
    // worker the supervisor would start (and clients waiting on them).
    crate::worker::check_settings()?;
    let paths = clip_rootfs::Paths::from_env();
    clip_rootfs::private_dir(&paths.run).context("creating the run directory")?;
    let socket = clip_api::socket_path(&paths.run);
    let (lock, listener, snapshotter, mut held) = match handover_fd {
        None => {
            let Some(lock) = lock(&paths.run)? else {
                tracing::info!("another clipd runs here; leaving it be");
                return Ok(());
            };
            let listener = bind(&socket)?;
            (OwnedFd::from(lock), OwnedFd::from(listener), None, BTreeMap::new())
        }
        Some(fd) => restore(fd)?,
    };
    let snapshotter = match (snapshotter, &opts.snapshotter_socket) {
        (Some(fd), _) => Some(fd),
        (None, Some(path)) => Some(OwnedFd::from(bind(path)?)),
        (None, None) => None,
    };
    write_pidfile(&paths.run);
    tracing::info!(pid = std::process::id(), held = held.len(), "clipd supervisor up");

    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(s);
    }
    mask.thread_block()?;
    let signals = SignalFd::new(&mask)?;
    let mut stopping = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        let (mine, theirs) = handover::pair()?;
        let mut child = spawn_worker(opts, &theirs, &listener, snapshotter.as_ref(), &mask)?;
        drop(theirs);
        let pidfd = pidfd_open(child.id() as i32)?;
        let mut upgrade: Option<PathBuf> = None;
        let mut worker_gone = false;
        loop {
            let mut fds = [
                PollFd::new(mine.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            let (worker_msg, sig, exited) = (ready(0), ready(1), ready(2));
            if worker_msg && !worker_gone {
                match handover::recv(mine.as_raw_fd()) {
                    Ok(Some((msg, fd))) => {
                        if let Some(binary) = answer(mine.as_raw_fd(), msg, fd, &mut held, &mut stopping) {
                            upgrade = Some(binary);
                            let _ = child.kill();
                        }
                    }
                    Ok(None) | Err(_) => worker_gone = true,
                }
            }
            if sig {
                if let Ok(Some(s)) = signals.read_signal() {
                    if s.ssi_signo == libc::SIGTERM as u32 || s.ssi_signo == libc::SIGINT as u32 {
                        tracing::info!(signal = s.ssi_signo, "stopping");
                        stopping = true;
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    }
                }
            }
            if exited {
                break;
            }
        }
        let status = child.wait()?;
        if let Some(binary) = upgrade.take() {
            tracing::info!(binary = %binary.display(), "handing over to a new clipd");
            let e = exec_upgrade(&binary, opts, &lock, &listener, snapshotter.as_ref(), &held);
            tracing::error!(error = %e, "upgrade failed; restarting the old worker");
            continue;
        }
        if stopping {
            tracing::info!(%status, "clipd stopped");
            let _ = std::fs::remove_file(&socket);
            if let (Some(_), Some(path)) = (&snapshotter, &opts.snapshotter_socket) {
                let _ = std::fs::remove_file(path);
            }
            let _ = std::fs::remove_file(paths.run.join("clipd.pid"));
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(50);
        }
        tracing::warn!(%status, held = held.len(), after = ?backoff, "the worker exited; starting another");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Answers one message of the worker; Some(binary) for an upgrade.
fn answer(
    sock: RawFd,
    msg: Msg,
    fd: Option<OwnedFd>,
    held: &mut BTreeMap<String, Held>,
    stopping: &mut bool,
) -> Option<PathBuf> {
    let reply = |m: &Msg, fd: Option<RawFd>| {
        if let Err(e) = handover::send(sock, m, fd) {
            tracing::warn!(error = %e, "cannot answer the worker");
        }
    };
    match msg {
        Msg::Hold { id, record } => match fd {
            Some(fd) => {
                held.insert(id, Held { fd, record });
                reply(&Msg::Ok, None);
            }
            None => reply(
                &Msg::Error {
                    message: "hold without a descriptor".into(),
                },
                None,
            ),
        },
        Msg::Release { id } => {
            held.remove(&id);
            reply(&Msg::Ok, None);
        }
        Msg::List => {
            for (id, h) in held.iter() {
                reply(
                    &Msg::Item {
                        id: id.clone(),
                        record: h.record.clone(),
                    },
                    Some(h.fd.as_raw_fd()),
                );
            }
            reply(&Msg::End, None);
        }
        Msg::Upgrade { binary } => {
            reply(&Msg::Ok, None);
            return Some(binary);
        }
        Msg::Shutdown => {
            *stopping = true;
            reply(&Msg::Ok, None);
        }
        other => reply(
            &Msg::Error {
                message: format!("unexpected {other:?}"),
            },
            None,
        ),
    }
    None
}

/// Options a worker (or a new supervisor) takes from this one.
fn pass_through(cmd: &mut std::process::Command, opts: &Options) {
    if let Some(s) = opts.idle_exit {
        cmd.arg("--idle-exit").arg(s.to_string());
    }
    if let Some(a) = &opts.auth_file {
        cmd.arg("--auth-file").arg(a);
    }
    cmd.arg("--tag-ttl").arg(opts.tag_ttl.to_string());
    cmd.arg("--record-secs").arg(opts.record_secs.to_string());
    cmd.arg("--guess").arg(opts.guess.to_string());
    cmd.arg("--image-linger").arg(opts.image_linger.to_string());
    cmd.arg("--fuse-threads").arg(opts.fuse_threads.to_string());
    if let Some(s) = &opts.snapshotter_socket {
        cmd.arg("--snapshotter-socket").arg(s);
    }
    cmd.arg("--snapshotter-root").arg(&opts.snapshotter_root);
}

fn spawn_worker(
    opts: &Options,
    sock: &OwnedFd,
    listener: &OwnedFd,
    snapshotter: Option<&OwnedFd>,
    mask: &SigSet,
) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // Inheritable copies (dup clears close-on-exec), closed here after the
    // spawn; the supervisor is single-threaded, so no other child sees them.
    let s = nix::unistd::dup(sock)?;
    let l = nix::unistd::dup(listener)?;
    let snap = snapshotter.map(nix::unistd::dup).transpose()?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--worker");
    pass_through(&mut cmd, opts);
    cmd.env("CLIPD_SUPERVISOR_FD", s.as_raw_fd().to_string())
        .env("CLIPD_LISTEN_FD", l.as_raw_fd().to_string());
    match &snap {
        Some(fd) => cmd.env("CLIPD_SNAPSHOTTER_FD", fd.as_raw_fd().to_string()),
        None => cmd.env_remove("CLIPD_SNAPSHOTTER_FD"),
    };
    let mask = *mask;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let _ = mask.thread_unblock();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the worker")?;
    drop((s, l, snap));
    Ok(child)
}

type Restored = (OwnedFd, OwnedFd, Option<OwnedFd>, BTreeMap<String, Held>);

fn restore(fd: RawFd) -> Result<Restored> {
    // SAFETY: the descriptor named by our own handover.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text)?;
    let h: Handover = serde_json::from_str(&text).context("reading the handover")?;
    // SAFETY: descriptors the previous process image left open for us.
    let own = |fd: RawFd| -> OwnedFd {
        let o = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(&o, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        o
    };
    let held = h
        .held
        .into_iter()
        .map(|(id, fd, record)| (id, Held { fd: own(fd), record }))
        .collect();
    Ok((own(h.lock), own(h.listener), h.snapshotter.map(own), held))
}

/// Replaces this process with `binary`, which takes over as supervisor.
/// Returns only on failure.
fn exec_upgrade(
    binary: &Path,
    opts: &Options,
    lock: &OwnedFd,
    listener: &OwnedFd,
    snapshotter: Option<&OwnedFd>,
    held: &BTreeMap<String, Held>,
) -> anyhow::Error {
    let attempt = || -> Result<std::convert::Infallible> {
        let h = Handover {
            lock: lock.as_raw_fd(),
            listener: listener.as_raw_fd(),
            snapshotter: snapshotter.map(|s| s.as_raw_fd()),
            held: held
                .iter()
                .map(|(id, h)| (id.clone(), h.fd.as_raw_fd(), h.record.clone()))
                .collect(),
        };
        let memfd = nix::sys::memfd::memfd_create(c"clipd-handover", nix::sys::memfd::MFdFlags::empty())?;
        let mut f = std::fs::File::from(memfd);
        std::io::Write::write_all(&mut f, serde_json::to_string(&h)?.as_bytes())?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
        handover::keep_across_exec(&f)?;
        handover::keep_across_exec(lock)?;
        handover::keep_across_exec(listener)?;
        if let Some(s) = snapshotter {
            handover::keep_across_exec(s)?;
        }
        for h in held.values() {
            handover::keep_across_exec(&h.fd)?;
        }
        if !binary.exists() {
            bail!("{} does not exist", binary.display());
        }
        let mut cmd = std::process::Command::new(binary);
        cmd.arg("--takeover").arg(f.as_raw_fd().to_string());
        pass_through(&mut cmd, opts);
        use std::os::unix::process::CommandExt;
        // Same pid: for service managers and the pid file, nothing moved.
        Err(cmd.exec()).context("exec")
    };
    match attempt() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}
