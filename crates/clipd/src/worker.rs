//! The worker: everything clipd does. One layer store, one set of registry
//! clients and one metrics registry for the host; one FUSE session per
//! mounted image; the API on the socket the supervisor holds.
//!
//! At start it asks the supervisor for the mounts it holds and serves them
//! again as they are: the kernel's connections, inode numbers and open
//! files are untouched (the tree and its inode numbers come from the same
//! index), and `FUSE_NOTIFY_RESEND` gives it the requests the previous
//! worker had read but not answered.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clip_api::{read_frame, write_frame, Reply, Request};
use clip_fs::{ImageView, Served};
use clip_registry::{ImageRef, Registries, RegistryOptions};
use clip_rootfs::{Kernel, Mounter, Paths};
use clip_store::{LayerStore, StoreOptions};

use crate::handover::{self, MountRecord, Msg};
use crate::images::Images;
use crate::Options;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A mount this worker serves.
pub struct Mount {
    pub record: MountRecord,
    pub image: String,
    pub manifest_digest: String,
    pub view: Arc<ImageView>,
    served: Option<Served>,
    /// When its recording window closes and the profile is updated.
    flush_at: Option<Instant>,
    /// An image mount without containers: since when (it is unmounted
    /// once it has lingered `--image-linger` seconds).
    pub idle_since: Option<Instant>,
}

pub struct Daemon {
    pub opts: Options,
    pub paths: Paths,
    pub mounter: Arc<dyn Mounter>,
    pub store: Arc<LayerStore>,
    pub images: Images,
    sup: Mutex<OwnedFd>,
    pub mounts: Mutex<BTreeMap<PathBuf, Mount>>,
    image_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    pub started: Instant,
    pub takeovers: u64,
    last_activity: Mutex<Instant>,
    busy: AtomicUsize,
    /// An upgrade or a stop is under way: accept no more connections
    /// (they wait in the socket's backlog for the next worker).
    pub handing_over: std::sync::atomic::AtomicBool,
    /// Image mounts containerd's snapshots use (by key): never retired.
    pub pinned: Mutex<std::collections::HashSet<String>>,
    /// Containers (or images about to start one) in their first
    /// [`START_HOLD`], by name: span cache writes wait for them.
    starting: Mutex<HashMap<String, Instant>>,
}

/// How long after a container's start span cache writes wait, unless it
/// ends sooner. A warm start reads from the page cache, not from clipd, so
/// the store looks quiet while the writes of the cold start before it
/// compete with it: torch started warm 0.6 s after a cold start took
/// 1.49 s with them under way and 1.40 s held (medians of 8 interleaved;
/// 1.41 and 1.35 in 10 more). Cold torch starts with a profile did not
/// move (2.95 s either way, medians of 8). The starts measured here take
/// 0.4-4.6 s; a container that runs longer has its writes go after this,
/// at the store's quiet as before.
const START_HOLD: Duration = Duration::from_secs(10);

fn env_fd(name: &str) -> Result<OwnedFd> {
    let n: RawFd = std::env::var(name)
        .with_context(|| format!("{name} is not set: clipd --worker is started by clipd"))?
        .parse()
        .with_context(|| name.to_string())?;
    // SAFETY: the supervisor passed us this descriptor for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(n) };
    let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    Ok(fd)
}

/// Checks every setting clipd reads from its environment.
pub fn check_settings() -> Result<()> {
    store_options()?;
    registry_options()?;
    Ok(())
}

fn registry_options() -> Result<RegistryOptions> {
    let mut o = RegistryOptions {
        read_timeout: Duration::from_secs(10),
        ..RegistryOptions::from_env().for_reads()
    };
    // Every registry operation (manifest lookups too) ends by this
    // deadline, retries included.
    if let Ok(v) = std::env::var("CLIP_REGISTRY_DEADLINE") {
        let secs = v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=3600).contains(s))
            .with_context(|| format!("CLIP_REGISTRY_DEADLINE={v:?}: expected seconds, from 1 to 3600"))?;
        // The read timeout is left as it is: a stall longer than the
        // deadline ends at the deadline. Clamping it to the deadline made
        // the two timers tie, and which error came out was a race.
        o.deadline = Duration::from_secs(secs);
    }
    Ok(o)
}

fn store_options() -> Result<StoreOptions> {
    let cache_dir = clip_api::env_dir("CLIP_CACHE_DIR", "/var/cache/clip");
    let cache_max = match std::env::var("CLIP_CACHE_MAX") {
        Ok(v) => clip_store::parse_size(&v)
            .with_context(|| format!("CLIP_CACHE_MAX={v:?}: expected a size such as 10G or 500M"))?,
        Err(_) => 10 << 30,
    };
    let defaults = StoreOptions::default();
    let miss_readahead = match std::env::var("CLIP_MISS_READAHEAD") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("CLIP_MISS_READAHEAD={v:?}: expected a number of spans"))?,
        Err(_) => defaults.miss_readahead,
    };
    let prefetch_workers = match std::env::var("CLIP_PREFETCH_WORKERS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .with_context(|| format!("CLIP_PREFETCH_WORKERS={v:?}: expected a number of threads, from 1 to 64"))?,
        Err(_) => defaults.prefetch_workers,
    };
    Ok(StoreOptions {
        cache_dir: Some(cache_dir),
        cache_max,
        miss_readahead,
        prefetch_workers,
        ..defaults
    })
}

pub fn run(opts: &Options) -> Result<()> {
    // Block the stop signals before any thread exists; one thread waits
    // for them.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGTERM);
    mask.add(nix::sys::signal::Signal::SIGINT);
    mask.thread_block()?;
    let sup = env_fd("CLIPD_SUPERVISOR_FD")?;
    let listener = UnixListener::from(env_fd("CLIPD_LISTEN_FD")?);
    let paths = Paths::from_env();
    let registries = Registries::new(registry_options()?)?;
    // The system's TLS roots (150 files, 25 ms) load off the requests'
    // path: a little after start, at the lowest CPU priority, so that they
    // do not compete with the container a new clipd was started for.
    let _ = std::thread::Builder::new().name("clipd-tls-roots".into()).spawn(|| {
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: setpriority on the calling thread's own id.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        clip_registry::warm_tls_roots();
    });
    let auth = opts
        .auth_file
        .clone()
        .or_else(|| Some(PathBuf::from("/etc/clip/auth.json")).filter(|p| p.exists()));
    let own_creds: Arc<dyn clip_registry::CredentialSource> = match auth {
        Some(path) => Arc::new(clip_registry::auth::DockerConfig { path }),
        None => Arc::new(clip_registry::auth::Anonymous),
    };
    let store = LayerStore::new(store_options()?).context("opening the layer store")?;
    // CLIP_PUBLISHED_INDEX=0: always index here, never fetch an index.
    let published = std::env::var("CLIP_PUBLISHED_INDEX").map_or(true, |v| v != "0");
    let images = Images::new(
        &paths.base,
        registries,
        own_creds,
        Duration::from_secs(opts.tag_ttl),
        published,
    )?;
    let mut d = Daemon {
        opts: opts.clone(),
        paths,
        mounter: Arc::new(Kernel),
        store,
        images,
        sup: Mutex::new(sup),
        mounts: Mutex::new(BTreeMap::new()),
        image_locks: Mutex::new(HashMap::new()),
        started: Instant::now(),
        takeovers: 0,
        last_activity: Mutex::new(Instant::now()),
        busy: AtomicUsize::new(0),
        handing_over: std::sync::atomic::AtomicBool::new(false),
        pinned: Mutex::new(Default::default()),
        starting: Mutex::new(HashMap::new()),
    };
    d.take_over()?;
    d.clean_stale();
    let d = Arc::new(d);
    tracing::info!(
        pid = std::process::id(),
        mounts = lock(&d.mounts).len(),
        "clipd worker serving"
    );
    {
        let d = d.clone();
        std::thread::Builder::new()
            .name("clipd-signals".into())
            .spawn(move || {
                if let Ok(sig) = mask.wait() {
                    tracing::info!(signal = ?sig, "stopping: unmounting everything");
                    d.stop_all();
                    std::process::exit(0);
                }
            })?;
    }
    {
        let d = d.clone();
        std::thread::Builder::new()
            .name("clipd-profiles".into())
            .spawn(move || d.flush_loop())?;
    }
    if let Some(sock) = &opts.snapshotter_socket {
        // The supervisor's socket, which outlives this worker.
        let listener = UnixListener::from(env_fd("CLIPD_SNAPSHOTTER_FD")?);
        crate::snapshotter::start(d.clone(), listener, sock, &opts.snapshotter_root)?;
    }
    // containerd depends on a snapshotter being there: no idle exit.
    if let Some(secs) = opts.idle_exit.filter(|_| opts.snapshotter_socket.is_none()) {
        let d = d.clone();
        std::thread::Builder::new()
            .name("clipd-idle".into())
            .spawn(move || d.idle_exit(Duration::from_secs(secs)))?;
    }
    loop {
        // Polled, so that an upgrade can stop accepting: connections then
        // wait in the backlog for the next worker instead of being reset.
        let mut fds = [nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
        if d.handing_over.load(Ordering::SeqCst) {
            continue;
        }
        if !fds[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLIN))
        {
            continue;
        }
        let Ok((conn, _)) = listener.accept() else { continue };
        let d = d.clone();
        std::thread::Builder::new()
            .name("clipd-request".into())
            .spawn(move || d.connection(conn))?;
    }
}

impl Daemon {
    /// One request from `conn`; its handler's panic is caught and
    /// answered with an error.
    fn connection(&self, mut conn: UnixStream) {
        self.busy.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_activity) = Instant::now();
        let req: Request = match read_frame(&mut conn) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.busy.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                let _ = write_frame(
                    &mut conn,
                    &Reply::Error {
                        message: format!("bad request: {e}"),
                    },
                );
                self.busy.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        };
        let mut out = conn.try_clone().ok();
        let mut send = |r: Reply| {
            if let Some(o) = out.as_mut() {
                let _ = write_frame(o, &r);
            }
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::handlers::handle(self, req, &mut send)
        }));
        let reply = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Reply::Error {
                message: format!("{e:#}"),
            },
            Err(_) => {
                clip_metrics::defs::PANICS.with(&[("where", "api")]).inc();
                tracing::error!("a request's handler panicked");
                Reply::Error {
                    message: "clipd failed on this request (a bug: see its log); it goes on serving".into(),
                }
            }
        };
        let _ = write_frame(&mut conn, &reply);
        *lock(&self.last_activity) = Instant::now();
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// Asks the supervisor; serialized, one exchange at a time.
    pub fn supervisor(&self, msg: &Msg, fd: Option<RawFd>) -> Result<Vec<(Msg, Option<OwnedFd>)>> {
        let sock = lock(&self.sup);
        handover::send(sock.as_raw_fd(), msg, fd)?;
        let mut got = Vec::new();
        loop {
            let Some((m, fd)) = handover::recv(sock.as_raw_fd())? else {
                bail!("the supervisor is gone");
            };
            match m {
                Msg::Item { .. } => got.push((m, fd)),
                Msg::Ok | Msg::End => return Ok(got),
                Msg::Error { message } => bail!("supervisor: {message}"),
                other => bail!("supervisor: unexpected {other:?}"),
            }
        }
    }

    /// Serves again every mount the supervisor holds.
    fn take_over(&mut self) -> Result<()> {
        let held = self.supervisor(&Msg::List, None)?;
        if held.is_empty() {
            return Ok(());
        }
        let mut resend = Vec::new();
        for (m, fd) in held {
            let (Msg::Item { id, record }, Some(fd)) = (m, fd) else {
                continue;
            };
            let dir = record.dir.clone();
            match self.serve(record, fd, true) {
                Ok(dup) => resend.push((dir, dup)),
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = format!("{e:#}"), "cannot serve a held mount again; detaching it");
                    let _ = self.supervisor(&Msg::Release { id }, None);
                    let _ = self.mounter.unmount(&dir, true);
                }
            }
        }
        for (dir, fd) in resend {
            if let Err(e) = clip_fs::notify_resend(fd.as_fd()) {
                tracing::warn!(dir = %dir.display(), error = %e, "FUSE_NOTIFY_RESEND failed: requests the last worker had read may wait for their timeout");
            }
        }
        for m in lock(&self.mounts).values_mut() {
            if m.record
                .key
                .as_deref()
                .is_some_and(|k| clip_rootfs::users(&self.paths, k).is_empty())
            {
                m.idle_since = Some(Instant::now());
            }
        }
        self.takeovers = 1;
        tracing::info!(
            mounts = lock(&self.mounts).len(),
            "took over the mounts of the previous worker"
        );
        Ok(())
    }

    /// Serves the FUSE connection `fd` of the mount `record` describes;
    /// returns a duplicate of the descriptor.
    pub fn serve(&self, record: MountRecord, fd: OwnedFd, initialized: bool) -> Result<OwnedFd> {
        let index = self.images.load(&record.index)?;
        let reference = ImageRef::parse(&record.reference)?;
        let source = self.images.source(&reference, self.images.creds(&record.creds))?;
        let view = ImageView::new(index.clone(), self.store.clone(), source)?;
        let mut profile = None;
        if !initialized {
            // A fresh mount: fetch what its containers read first, in the
            // background, in the order they read it.
            profile = crate::profiles::load(&record.index, &index.index.image.manifest_digest);
            if let Some(p) = &profile {
                let n = view.replay(&p.replay_list());
                tracing::info!(dir = %record.dir.display(), units = n, "replaying the prefetch profile");
            } else if let (true, Some(command)) = (self.opts.guess, record.command.clone()) {
                // Off the mount's path: the container starts meanwhile.
                let (view, index) = (view.clone(), record.index.clone());
                if let Err(e) = std::thread::Builder::new()
                    .name("clipd-guess".into())
                    .spawn(move || crate::guesses::replay(&view, &index, &command))
                {
                    tracing::warn!(error = %e, "no guessed start for this mount");
                }
            }
        }
        let served = clip_fs::serve_fd(view.clone(), fd, initialized, self.opts.fuse_threads)?;
        if let Some(p) = profile.filter(|p| !p.lookups.is_empty() || !p.reads.is_empty()) {
            // Speed, not correctness: a mount without them still serves.
            match served.fd.try_clone() {
                Ok(fd) => ahead_of_the_container(&record.dir, p, &view, fd),
                Err(e) => tracing::warn!(error = %e, "no lookups or page-cache pushes for this mount"),
            }
        }
        let dup = served.fd.try_clone()?;
        let dir = record.dir.clone();
        lock(&self.mounts).insert(
            dir,
            Mount {
                image: index.index.image.reference.clone(),
                manifest_digest: index.index.image.manifest_digest.clone(),
                record,
                view,
                served: Some(served),
                flush_at: None,
                idle_since: None,
            },
        );
        Ok(dup)
    }

    /// Records what the mount at `dir` serves for `d` (a container just
    /// started on it); the profile is updated when the window closes.
    pub fn record(&self, dir: &Path, d: Duration) {
        if d.is_zero() {
            return;
        }
        if let Some(m) = lock(&self.mounts).get_mut(dir) {
            m.view.record_for(d);
            let at = Instant::now() + d;
            m.flush_at = Some(m.flush_at.map_or(at, |t| t.max(at)));
        }
    }

    /// `who` (a container, or an image mounted for one) is starting: span
    /// cache writes wait until it ends or [`START_HOLD`] passes.
    pub fn starting(&self, who: String) {
        lock(&self.starting).insert(who, Instant::now());
        self.hold_writes();
    }

    /// `who` has ended: its hold on span cache writes is lifted.
    pub fn ended(&self, who: &str) {
        lock(&self.starting).remove(who);
        self.hold_writes();
    }

    fn hold_writes(&self) {
        let mut s = lock(&self.starting);
        s.retain(|_, at| at.elapsed() < START_HOLD);
        if let Some(disk) = self.store.disk() {
            disk.hold_until(s.values().max().map(|at| *at + START_HOLD));
        }
    }

    /// Adds what the mount at `dir` recorded to its image's profile.
    pub fn flush_recording(&self, dir: &Path) {
        let taken = {
            let mut mounts = lock(&self.mounts);
            let Some(m) = mounts.get_mut(dir) else { return };
            m.flush_at = None;
            (
                m.view.take_recording(),
                m.record.index.clone(),
                m.manifest_digest.clone(),
            )
        };
        let (recorded, index, digest) = taken;
        if recorded.units.is_empty() && recorded.lookups.is_empty() {
            return;
        }
        match crate::profiles::merge(&index, &digest, &recorded) {
            Ok(total) => {
                tracing::info!(
                    index = %index.display(),
                    recorded = recorded.units.len(),
                    lookups = recorded.lookups.len(),
                    total,
                    "prefetch profile updated"
                )
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot update the prefetch profile"),
        }
    }

    /// Flushes recordings whose window has closed and unmounts images
    /// that have lingered long enough; runs forever.
    fn flush_loop(&self) {
        let linger = Duration::from_secs(self.opts.image_linger);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let (due, expired): (Vec<PathBuf>, Vec<(PathBuf, String)>) = {
                let mounts = lock(&self.mounts);
                (
                    mounts
                        .iter()
                        .filter(|(_, m)| m.flush_at.is_some_and(|t| t <= Instant::now()))
                        .map(|(d, _)| d.clone())
                        .collect(),
                    mounts
                        .iter()
                        .filter(|(_, m)| m.idle_since.is_some_and(|t| t.elapsed() >= linger))
                        .filter_map(|(d, m)| Some((d.clone(), m.record.key.clone()?)))
                        .collect(),
                )
            };
            for dir in due {
                self.flush_recording(&dir);
            }
            for (dir, key) in expired {
                self.retire_image(&dir, &key, Some(linger));
            }
        }
    }

    /// The last container of image `key` is gone: unmount it now, or
    /// (`linger`) once it has been idle that long. Under the image's lock,
    /// so that a container being prepared keeps it.
    pub fn retire_image(&self, dir: &Path, key: &str, linger: Option<Duration>) {
        let gate = self.image_lock(key);
        let _g = lock(&gate);
        if !clip_rootfs::users(&self.paths, key).is_empty() || lock(&self.pinned).contains(key) {
            return;
        }
        let due = {
            let mut mounts = lock(&self.mounts);
            let Some(m) = mounts.get_mut(dir) else {
                drop(mounts);
                let _ = std::fs::remove_dir_all(dir.parent().expect("images/KEY/mnt"));
                return;
            };
            match linger {
                Some(l) if !l.is_zero() => {
                    let since = *m.idle_since.get_or_insert_with(Instant::now);
                    since.elapsed() >= l
                }
                _ => true,
            }
        };
        if !due {
            return;
        }
        // Lazy: a process that still has a file of it open (a container's
        // leftover) must not keep it mounted.
        if let Err(e) = self.unmount(dir, true) {
            tracing::warn!(dir = %dir.display(), error = format!("{e:#}"), "cannot unmount an idle image");
            return;
        }
        let _ = std::fs::remove_dir_all(dir.parent().expect("images/KEY/mnt"));
    }

    /// Mounts `index_path` at `dir` and serves it; the supervisor holds it.
    pub fn mount(&self, record: MountRecord) -> Result<()> {
        let fd = self
            .mounter
            .mount_fuse(&record.dir)
            .with_context(|| format!("mounting {}", record.dir.display()))?;
        let dir = record.dir.clone();
        let id = dir.display().to_string();
        let r = self.serve(record.clone(), fd, false).and_then(|dup| {
            self.supervisor(&Msg::Hold { id, record }, Some(dup.as_raw_fd()))?;
            Ok(())
        });
        if let Err(e) = r {
            let _ = self.mounter.unmount(&dir, true);
            lock(&self.mounts).remove(&dir);
            return Err(e);
        }
        tracing::info!(dir = %dir.display(), "mounted");
        Ok(())
    }

    /// Unmounts a mount this worker serves and forgets it.
    pub fn unmount(&self, dir: &Path, lazy: bool) -> Result<()> {
        self.flush_recording(dir);
        self.mounter
            .unmount(dir, lazy)
            .with_context(|| format!("unmounting {}", dir.display()))?;
        let m = lock(&self.mounts).remove(dir);
        if let Some(mut m) = m {
            if let Some(s) = m.served.take() {
                // A plain unmount ends the connection at once; a lazy one
                // keeps it for the files still open, and the session
                // serves them until the last is closed.
                if !lazy {
                    let _ = s.thread.join();
                }
            }
        }
        let _ = self.supervisor(
            &Msg::Release {
                id: dir.display().to_string(),
            },
            None,
        );
        tracing::info!(dir = %dir.display(), "unmounted");
        Ok(())
    }

    /// The lock that orders mounting and unmounting of image `key`.
    pub fn image_lock(&self, key: &str) -> Arc<Mutex<()>> {
        lock(&self.image_locks).entry(key.to_string()).or_default().clone()
    }

    /// Image mounts left by a worker whose descriptors are gone (the
    /// supervisor was killed too): detach them.
    fn clean_stale(&self) {
        let served: Vec<PathBuf> = lock(&self.mounts).keys().cloned().collect();
        for e in std::fs::read_dir(self.paths.run.join("images"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = e.path().join("mnt");
            if served.contains(&dir) {
                continue;
            }
            if self.mounter.mount_at(&dir).is_some_and(|m| m.is_clip()) {
                tracing::warn!(dir = %dir.display(), "detaching a mount no clipd serves");
                let _ = self.mounter.unmount(&dir, true);
            }
        }
    }

    fn stop_all(&self) {
        let dirs: Vec<PathBuf> = lock(&self.mounts).keys().cloned().collect();
        for dir in dirs {
            let _ = self.unmount(&dir, true);
        }
        self.flush_span_cache();
    }

    /// Writes the spans still waiting for a quiet store (the next worker
    /// or start finds them on disk).
    pub fn flush_span_cache(&self) {
        if let Some(disk) = self.store.disk() {
            disk.flush();
        }
    }

    /// Asks the supervisor not to start another worker, then exits.
    pub fn shutdown(&self) -> ! {
        // No new requests: one that came now would mount what is about to
        // be unmounted. They wait in the backlog and fail when the
        // supervisor closes the socket.
        self.handing_over.store(true, Ordering::SeqCst);
        self.stop_all();
        let _ = self.supervisor(&Msg::Shutdown, None);
        std::process::exit(0);
    }

    /// Waits until this request is the only one in progress (an upgrade
    /// lets the others finish first).
    pub fn quiesce(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.busy.load(Ordering::SeqCst) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn idle_exit(&self, after: Duration) {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            // Images that only linger do not keep clipd alive.
            let idle = lock(&self.mounts).values().all(|m| m.idle_since.is_some())
                && clip_rootfs::list(&self.paths).is_empty()
                && self.busy.load(Ordering::SeqCst) == 0
                && lock(&self.last_activity).elapsed() >= after;
            if idle {
                tracing::info!(after = ?after, "no containers, no mounts in use and no requests: exiting");
                self.shutdown();
            }
        }
    }
}

/// How long a fresh mount's lookups wait for its container's first read.
const FIRST_READ_WAIT: Duration = Duration::from_secs(60);
/// How long after that first read a fresh mount pushes its profile's
/// reads into the page cache: a start's reads, not a long run's.
const PUSH_FOR: Duration = Duration::from_secs(30);

/// Looks up a profile's names in the fresh mount at `dir`, in the order
/// its containers did, on a thread of its own: the kernel keeps each
/// answer (found or not) for the entries' timeout, so the container's own
/// lookups of those names make no FUSE round trip. Each one costs a
/// container about 0.1 ms on a busy node, and Python makes a thousand
/// (it opens every module's `__pycache__` entry by name). They start at
/// the mount's first read, or after [`FIRST_READ_WAIT`] without one; a
/// mount that ends unread makes none.
///
/// Then, with the inodes known to the kernel, it hands the profile's
/// recorded reads to the page cache as the replay brings their units in
/// (`clip_fs::push`), for [`PUSH_FOR`] at most: the container's reads of
/// them make no FUSE round trip either. `fd` is the mount's connection.
fn ahead_of_the_container(dir: &Path, profile: crate::profiles::Profile, view: &Arc<ImageView>, fd: OwnedFd) {
    let dir = dir.to_path_buf();
    let view = view.clone();
    let spawned = std::thread::Builder::new().name("clip-lookups".into()).spawn(move || {
        // Checked here, off the mount's path: a thousand resolves.
        let paths: Vec<PathBuf> = profile.lookups_in(&view.index().index).into_iter().map(|p| dir.join(p)).collect();
        // Not beside the runtime's setup, which has the same two cores to
        // share and needs none of these names: from the container's first
        // read (its exec) on, ahead of its own lookups. The wait does not
        // hold the view (and its index) past its mount.
        let first_read = view.first_read();
        let weak = Arc::downgrade(&view);
        drop(view);
        let waited = Instant::now();
        let read = first_read.wait(FIRST_READ_WAIT);
        let t = Instant::now();
        tracing::debug!(?read, waited = waited.elapsed().as_secs_f64(), "the mount's first read");
        if read == clip_fs::FirstReadIs::Gone {
            tracing::info!(dir = %dir.display(), "the mount ended unread: no lookups");
            return;
        }
        for p in &paths {
            // Absent names are the point as much as present ones.
            let _ = std::fs::symlink_metadata(p);
        }
        tracing::info!(dir = %dir.display(), names = paths.len(), seconds = t.elapsed().as_secs_f64(), "looked up the profile's names");
        if !profile.reads.is_empty() {
            let p = clip_fs::push::push_reads(&weak, fd.as_fd(), &profile.reads, t + PUSH_FOR);
            tracing::info!(
                dir = %dir.display(),
                pieces = p.stored,
                bytes = p.bytes,
                unknown = p.unknown,
                not_held = p.missing,
                seconds = t.elapsed().as_secs_f64(),
                "pushed the profile's reads into the page cache"
            );
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the profile's lookups");
    }
}
