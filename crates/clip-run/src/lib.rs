//! From an image config to an OCI runtime bundle, and running it.
//!
//! [`build_spec`] starts from containerd's default spec (its 14
//! capabilities, masked and read-only paths, /proc /dev /sys /run mounts;
//! not `runc spec`'s three capabilities) and applies the image config as
//! Docker does: Entrypoint plus Cmd (a given command replaces Cmd, a given
//! entrypoint replaces both), Env, WorkingDir, User resolved through the
//! image's own /etc/passwd and /etc/group; then the user's options (network,
//! capabilities, binds, limits). [`Runtime::run`] runs a bundle in the
//! foreground with stdio and signals passed through, and returns the
//! container's exit code.

pub mod console;
mod exec_watch;
pub mod signals;

pub use exec_watch::monotonic_ns;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxMemoryBuilder,
    LinuxNamespaceType, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image config: {0}")]
    Config(String),
    #[error("user {0:?}: {1}")]
    User(String, String),
    #[error("the image has no command to run (no Entrypoint or Cmd, and none given)")]
    NoCommand,
    #[error("runtime spec")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("runtime {0}")]
    Runtime(String, #[source] std::io::Error),
    #[error("{0}")]
    Option(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The container's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// The host's network namespace (the default: clip sets up no bridge,
    /// and a container without a network surprises more than one that
    /// shares the host's).
    #[default]
    Host,
    /// A network namespace of its own with only `lo`.
    None,
}

impl std::str::FromStr for Network {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "host" => Ok(Network::Host),
            "none" => Ok(Network::None),
            other => Err(Error::Option(format!(
                "--network {other:?}: clip supports host (the default) and none"
            ))),
        }
    }
}

/// A bind mount from the host (`-v SRC:DST[:ro]`, `--mount type=bind,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
}

/// What `clipctl run` lets a user set on top of the image config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replaces the image's Cmd.
    pub cmd: Vec<String>,
    /// Replaces the image's Entrypoint (and drops its Cmd, as Docker does);
    /// an empty string clears it.
    pub entrypoint: Option<String>,
    /// `KEY=VALUE`, added to or replacing the image's.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub network: Network,
    /// Capability names, with or without `CAP_`, any case; `ALL`.
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// Every capability, no masked or read-only paths, every device
    /// allowed, /sys writable.
    pub privileged: bool,
    /// The rootfs is mounted read-only.
    pub read_only: bool,
    pub binds: Vec<Bind>,
    /// Files bind-mounted read-only at their place: /etc/hosts,
    /// /etc/hostname, /etc/resolv.conf, an init.
    pub files: Vec<(PathBuf, String)>,
    /// Run `init` (a host path bind-mounted at /sbin/docker-init) as PID 1
    /// in front of the command.
    pub init: Option<PathBuf>,
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// CPU limit in CPUs (quota over a 100 ms period).
    pub cpus: Option<f64>,
    /// A terminal for the process (`-t`).
    pub terminal: bool,
}

/// containerd's default capabilities (oci/spec.go, `defaultUnixCaps`).
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Every capability this process may hand on: its bounding set (a host
/// that runs clip in a sandbox may lack some the kernel knows; asking a
/// runtime for those fails with EPERM in capset).
fn all_caps() -> Vec<Capability> {
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    (0..64)
        .filter(|n| bounding & (1u64 << n) != 0)
        .filter_map(cap_of_number)
        .collect()
}

fn cap_of_number(n: u32) -> Option<Capability> {
    use Capability::*;
    const ORDER: [Capability; 41] = [
        Chown,
        DacOverride,
        DacReadSearch,
        Fowner,
        Fsetid,
        Kill,
        Setgid,
        Setuid,
        Setpcap,
        LinuxImmutable,
        NetBindService,
        NetBroadcast,
        NetAdmin,
        NetRaw,
        IpcLock,
        IpcOwner,
        SysModule,
        SysRawio,
        SysChroot,
        SysPtrace,
        SysPacct,
        SysAdmin,
        SysBoot,
        SysNice,
        SysResource,
        SysTime,
        SysTtyConfig,
        Mknod,
        Lease,
        AuditWrite,
        AuditControl,
        Setfcap,
        MacOverride,
        MacAdmin,
        Syslog,
        WakeAlarm,
        BlockSuspend,
        AuditRead,
        Perfmon,
        Bpf,
        CheckpointRestore,
    ];
    ORDER.get(n as usize).copied()
}

/// A capability from a user's spelling: `net_admin`, `CAP_NET_ADMIN`.
pub fn parse_cap(name: &str) -> Result<Capability> {
    let up = name.trim().to_ascii_uppercase();
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    bare.parse().map_err(|_| {
        Error::Option(format!(
            "{name:?} is not a capability (such as NET_ADMIN or CAP_SYS_PTRACE)"
        ))
    })
}

/// The capability set of a container: containerd's defaults (or all,
/// privileged), plus `add`, minus `drop`; `ALL` in either means all.
pub fn capabilities(privileged: bool, add: &[String], drop: &[String]) -> Result<Vec<Capability>> {
    let is_all = |v: &[String]| v.iter().any(|c| c.eq_ignore_ascii_case("all"));
    // As docker: --cap-drop ALL empties the set, then --cap-add adds to it;
    // otherwise adds, then drops.
    let mut caps: Vec<Capability> = if privileged || is_all(add) {
        all_caps()
    } else if is_all(drop) {
        Vec::new()
    } else {
        DEFAULT_CAPS.to_vec()
    };
    let named = |v: &[String]| -> Result<Vec<Capability>> {
        v.iter()
            .filter(|c| !c.eq_ignore_ascii_case("all"))
            .map(|c| parse_cap(c))
            .collect()
    };
    let (add, drop) = (named(add)?, named(drop)?);
    caps.retain(|c| !drop.contains(c));
    for c in add {
        if !caps.contains(&c) {
            caps.push(c);
        }
    }
    Ok(caps)
}

/// The command line: Entrypoint plus Cmd, as Docker combines them.
fn command_line(c: &serde_json::Value, opts: &RunOptions) -> Vec<String> {
    let mut args = match &opts.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => strings(&c["Entrypoint"]),
    };
    if !opts.cmd.is_empty() {
        args.extend(opts.cmd.iter().cloned());
    } else if opts.entrypoint.is_none() {
        args.extend(strings(&c["Cmd"]));
    }
    args
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// uid, gid and additional gids of `spec` inside `rootfs`.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<(u32, u32, Vec<u32>)> {
    let read = |f: &str| std::fs::read_to_string(rootfs.join(f)).unwrap_or_default();
    let passwd = read("etc/passwd");
    let group = read("etc/group");
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let err = |m: &str| Error::User(spec.into(), m.into());
    // name:x:uid:gid:...
    let pw = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user)));
    let (uid, mut gid, name) = match (user.parse::<u32>(), &pw) {
        (_, Some(f)) => (
            f[2].parse().map_err(|_| err("bad uid in /etc/passwd"))?,
            f[3].parse().map_err(|_| err("bad gid in /etc/passwd"))?,
            Some(f[0].to_string()),
        ),
        (Ok(uid), None) => (uid, 0, None),
        (Err(_), None) => return Err(err("no such user in the image's /etc/passwd")),
    };
    let groups: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|f| f[0] == g)
                .ok_or_else(|| err("no such group in the image's /etc/group"))?[2]
                .parse()
                .map_err(|_| err("bad gid in /etc/group"))?,
        };
    }
    let mut extra: Vec<u32> = match (&name, grp) {
        (Some(n), None) => groups
            .iter()
            .filter(|f| f.get(3).is_some_and(|m| m.split(',').any(|x| x == n)))
            .filter_map(|f| f[2].parse().ok())
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    extra.sort_unstable();
    extra.dedup();
    Ok((uid, gid, extra))
}

/// The runtime spec for running the image config `config` (JSON) on
/// `rootfs`.
pub fn build_spec(config: &[u8], rootfs: &Path, opts: &RunOptions) -> Result<Spec> {
    let cfg: serde_json::Value = serde_json::from_slice(config).map_err(|e| Error::Config(e.to_string()))?;
    let c = &cfg["config"];
    let mut args = command_line(c, opts);
    if args.is_empty() {
        return Err(Error::NoCommand);
    }
    if opts.init.is_some() {
        args.splice(0..0, ["/sbin/docker-init".to_string(), "--".to_string()]);
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for kv in strings(&c["Env"]).into_iter().chain(opts.env.iter().cloned()) {
        let (k, v) = kv
            .split_once('=')
            .map_or((kv.clone(), String::new()), |(k, v)| (k.into(), v.into()));
        if env.insert(k.clone(), v).is_none() {
            order.push(k);
        }
    }
    if !env.contains_key("PATH") {
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        order.insert(0, "PATH".into());
    }
    if opts.terminal && !env.contains_key("TERM") {
        env.insert("TERM".into(), "xterm".into());
        order.push("TERM".into());
    }
    let env: Vec<String> = order.iter().map(|k| format!("{k}={}", env[k])).collect();
    let cwd = opts
        .workdir
        .clone()
        .or_else(|| c["WorkingDir"].as_str().filter(|s| !s.is_empty()).map(str::to_string));
    let user = opts
        .user
        .clone()
        .or_else(|| c["User"].as_str().filter(|s| !s.is_empty()).map(str::to_string));
    let (uid, gid, extra) = match &user {
        Some(u) => resolve_user(rootfs, u)?,
        None => (0, 0, Vec::new()),
    };
    let mut spec = Spec::default();
    let mut user = UserBuilder::default().uid(uid).gid(gid);
    if !extra.is_empty() {
        user = user.additional_gids(extra);
    }
    let caps: std::collections::HashSet<Capability> = capabilities(opts.privileged, &opts.cap_add, &opts.cap_drop)?
        .into_iter()
        .collect();
    // containerd sets bounding, permitted and effective alike; a non-root
    // process keeps only what its uid earns (no ambient set).
    let caps = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .permitted(caps.clone())
        .effective(caps)
        .inheritable(std::collections::HashSet::new())
        .ambient(std::collections::HashSet::new())
        .build()?;
    let base = spec.process().clone().unwrap_or_default();
    let process = ProcessBuilder::default()
        .terminal(opts.terminal)
        .user(user.build()?)
        .args(args)
        .env(env)
        .cwd(PathBuf::from(cwd.unwrap_or_else(|| "/".into())))
        .capabilities(caps)
        .rlimits(base.rlimits().clone().unwrap_or_default())
        // As containerd and Docker: setuid programs (su, sudo) work.
        .no_new_privileges(false)
        .build()?;
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default().path(rootfs).readonly(opts.read_only).build()?,
    ));
    spec.set_hostname(opts.hostname.clone().or_else(|| Some("clip".into())));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    // containerd's /run; /sys writable when privileged.
    mounts.push(
        MountBuilder::default()
            .destination("/run")
            .typ("tmpfs")
            .source("tmpfs")
            .options(
                ["nosuid", "strictatime", "mode=755", "size=65536k"]
                    .map(String::from)
                    .to_vec(),
            )
            .build()?,
    );
    if opts.privileged {
        for m in mounts.iter_mut().filter(|m| m.destination() == Path::new("/sys")) {
            let o: Vec<String> = m
                .options()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| o != "ro")
                .collect();
            m.set_options(Some(o));
        }
        mounts.retain(|m| m.destination() != Path::new("/sys/fs/cgroup"));
    }
    let bind = |source: &Path, target: &str, ro: bool| {
        let mut o = vec!["rbind".to_string(), "rprivate".to_string()];
        if ro {
            o.push("ro".into());
        }
        MountBuilder::default()
            .destination(target)
            .typ("bind")
            .source(source)
            .options(o)
            .build()
    };
    for (source, target) in &opts.files {
        mounts.push(bind(source, target, false)?);
    }
    if let Some(init) = &opts.init {
        mounts.push(bind(init, "/sbin/docker-init", true)?);
    }
    for b in &opts.binds {
        mounts.push(bind(&b.source, &b.target, b.readonly)?);
    }
    spec.set_mounts(Some(mounts));

    let mut linux = spec.linux().clone().unwrap_or_default();
    if opts.network == Network::Host {
        let ns: Vec<_> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(ns));
    }
    let mut resources = linux.resources().clone().unwrap_or_default();
    if opts.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
        resources.set_devices(Some(vec![LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rwm")
            .build()?]));
    }
    if let Some(limit) = opts.memory {
        resources.set_memory(Some(LinuxMemoryBuilder::default().limit(limit).build()?));
    }
    if let Some(cpus) = opts.cpus {
        let period = 100_000u64;
        resources.set_cpu(Some(
            LinuxCpuBuilder::default()
                .period(period)
                .quota((cpus * period as f64).round() as i64)
                .build()?,
        ));
    }
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Writes `spec` as `bundle/config.json`.
pub fn write_bundle(bundle: &Path, spec: &Spec) -> Result<()> {
    std::fs::create_dir_all(bundle).map_err(|e| Error::Runtime("bundle".into(), e))?;
    spec.save(bundle.join("config.json"))?;
    Ok(())
}

/// An OCI runtime with runc's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    /// clip's own runtime (`clip-runtime`, next to the running binary or
    /// on PATH).
    Clip,
    Runc,
    Crun,
    Runsc,
    Path(PathBuf),
}

impl std::str::FromStr for Runtime {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "clip" | "clip-runtime" => Runtime::Clip,
            "runc" => Runtime::Runc,
            "crun" => Runtime::Crun,
            "runsc" => Runtime::Runsc,
            other => Runtime::Path(other.into()),
        })
    }
}

/// `clip-runtime` beside the running executable (as cargo and packages
/// install them), else whatever PATH finds.
pub fn clip_runtime_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("clip-runtime")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("clip-runtime"))
}

/// This host mounts cgroup v1 controllers with a cgroup2 hierarchy beside
/// them at /sys/fs/cgroup/unified, a layout crun refuses.
fn hybrid_cgroups() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines()
            .any(|l| l.contains(" /sys/fs/cgroup/unified ") && l.contains(" - cgroup2 "))
    })
}

/// Blocks the signals [`Runtime::run`] forwards, in the calling thread and
/// every thread it starts later; returns the set. A program that runs
/// containers in the foreground calls it first thing in `main`, before any
/// thread (a registry client's runtime, say) exists: a thread that left
/// them unblocked would take SIGTERM's default action for the process.
pub fn block_forwarded_signals() -> libc::sigset_t {
    let set = signals::set_of(&signals::FORWARDED);
    signals::block(&set);
    set
}

/// Where a container's stdio goes.
#[derive(Debug, Clone)]
pub enum Io {
    /// This process's stdout and stderr; its stdin too, or /dev/null.
    Inherit { stdin: bool },
    /// A pty made by the runtime and sent over the console socket at
    /// `socket`; with `stdin`, this process's terminal in raw mode feeds it.
    Terminal { stdin: bool, socket: PathBuf },
    /// In the background, stdout and stderr appended to `log`.
    Detached { log: PathBuf },
}

/// How a container run ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// The exit code; 128 + N for death by signal N.
    pub code: i32,
    /// When the container's process first exec'd (CLOCK_MONOTONIC ns, see
    /// [`monotonic_ns`]); None when not seen (not root, or runsc, whose
    /// process lives inside its sandbox).
    pub first_exec_ns: Option<u64>,
}

impl Runtime {
    fn command(&self) -> Command {
        match self {
            Runtime::Clip => Command::new(clip_runtime_path()),
            Runtime::Runc => Command::new("runc"),
            Runtime::Crun => Command::new("crun"),
            Runtime::Runsc => {
                let mut c = Command::new("runsc");
                // gVisor's netstack needs no host network namespace setup.
                c.arg("--network=none");
                c
            }
            Runtime::Path(p) => Command::new(p),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Runtime::Clip => "clip-runtime".into(),
            Runtime::Runc => "runc".into(),
            Runtime::Crun => "crun".into(),
            Runtime::Runsc => "runsc".into(),
            Runtime::Path(p) => p.display().to_string(),
        }
    }

    /// Runs the bundle (`RUNTIME run --bundle DIR ID`) with `io`: in the
    /// foreground with this process's stdio (or a terminal), forwarding
    /// SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to it (runc and
    /// crun pass them on to the container); or detached, its output to a
    /// log. Returns the exit code (128 + N for death by signal N; detached:
    /// the runtime's), and when the container's process first exec'd, if
    /// that was seen. `on_first_exec` is called (from another thread) as
    /// soon as that is.
    pub fn run(
        &self,
        bundle: &Path,
        id: &str,
        io: &Io,
        on_first_exec: Option<Box<dyn FnOnce(u64) + Send>>,
    ) -> Result<Exit> {
        let pid_file = bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = self.command();
        cmd.arg("run");
        if matches!(io, Io::Detached { .. }) {
            cmd.arg("--detach");
        }
        cmd.arg("--bundle").arg(bundle).arg("--pid-file").arg(&pid_file);
        self.drive(cmd, id, io, Some(pid_file), on_first_exec)
    }

    /// Runs `args` in the running container `id` (`RUNTIME exec`), as the
    /// container's process runs: `process` is a process.json.
    pub fn exec(&self, id: &str, process: &Path, io: &Io) -> Result<Exit> {
        let mut cmd = self.command();
        cmd.arg("exec").arg("--process").arg(process);
        if matches!(io, Io::Detached { .. }) {
            cmd.arg("--detach");
        }
        self.drive(cmd, id, io, None, None)
    }

    fn drive(
        &self,
        mut cmd: Command,
        id: &str,
        io: &Io,
        pid_file: Option<PathBuf>,
        on_first_exec: Option<Box<dyn FnOnce(u64) + Send>>,
    ) -> Result<Exit> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        use std::os::unix::process::ExitStatusExt;
        use std::process::Stdio;
        let err = |e| Error::Runtime(self.name(), e);
        // runc refuses a console socket in the foreground; it makes and
        // serves the pty itself from its own stdio (raw mode, SIGWINCH).
        let io = &match io {
            Io::Terminal { stdin, .. } if matches!(self, Runtime::Runc | Runtime::Runsc) => {
                Io::Inherit { stdin: *stdin }
            }
            other => other.clone(),
        };
        let console = match io {
            Io::Terminal { socket, .. } => {
                let c = console::ConsoleSocket::bind(socket).map_err(err)?;
                cmd.arg("--console-socket").arg(c.path());
                Some(c)
            }
            _ => None,
        };
        cmd.arg(id);
        match io {
            Io::Inherit { stdin: false } => {
                cmd.stdin(Stdio::null());
            }
            Io::Inherit { stdin: true } => {}
            Io::Terminal { .. } => {
                cmd.stdin(Stdio::null());
            }
            Io::Detached { log } => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .map_err(err)?;
                cmd.stdin(Stdio::null()).stdout(f.try_clone().map_err(err)?).stderr(f);
            }
        }
        let crun_fix = *self == Runtime::Crun && hybrid_cgroups();
        let set = block_forwarded_signals();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                if crun_fix {
                    // crun refuses hybrid cgroups; in a private mount
                    // namespace without the cgroup2 mount it sees plain v1.
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let root = c"/";
                    libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    );
                    libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH);
                }
                Ok(())
            });
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = match (pid_file, exec_watch::ExecWatch::open()) {
            (Some(pid_file), Ok(w)) => Some(w.first_exec(pid_file, done.clone(), on_first_exec)),
            (Some(_), Err(e)) => {
                tracing::debug!(error = %e, "not timing the first exec (process events need root)");
                None
            }
            (None, _) => None,
        };
        let mut child = cmd.spawn().map_err(err)?;
        let pid = child.id() as i32;
        // A terminal: the runtime sends the pty master once it has made
        // it, or fails first (and exits).
        let mut output = None;
        let mut raw = None;
        let master_fd = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(-1));
        if let (Some(c), Io::Terminal { stdin, .. }) = (&console, io) {
            if let Some(master) = c.receive(|| matches!(child.try_wait(), Ok(None))).map_err(err)? {
                console::copy_size(libc::STDIN_FILENO, master.as_raw_fd());
                master_fd.store(master.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
                if *stdin {
                    raw = console::RawMode::enter(libc::STDIN_FILENO);
                }
                output = Some((console::pump(master.try_clone().map_err(err)?, *stdin), master));
            }
        }
        let d = done.clone();
        let m = master_fd.clone();
        std::thread::spawn(move || {
            signals::forward_except(
                &set,
                pid,
                std::time::Duration::from_millis(100),
                || d.load(std::sync::atomic::Ordering::Relaxed),
                |sig| {
                    let fd = m.load(std::sync::atomic::Ordering::Relaxed);
                    if sig == libc::SIGWINCH && fd >= 0 {
                        console::copy_size(libc::STDIN_FILENO, fd);
                        return true;
                    }
                    false
                },
            )
        });
        let status = child.wait();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some((thread, master)) = output {
            // The container's output ends with its pty (EIO once no process
            // holds the other end); a process that left a child holding it
            // is not waited for.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            master_fd.store(-1, std::sync::atomic::Ordering::Relaxed);
            drop(master);
        }
        drop(raw);
        let first_exec_ns = watch.and_then(|h| h.join().ok().flatten());
        let status = status.map_err(err)?;
        Ok(Exit {
            code: status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            first_exec_ns,
        })
    }

    /// Sends `signal` (a name such as `TERM`, or a number) to the
    /// container's init.
    pub fn kill(&self, id: &str, signal: &str) -> Result<()> {
        self.quiet(&["kill", id, signal])
    }

    /// The runtime's `state` of container `id`: `created`, `running`,
    /// `stopped`, ...; None when it has none.
    pub fn status(&self, id: &str) -> Option<String> {
        let out = self.command().args(["state", id]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["status"].as_str().map(str::to_string)
    }

    fn quiet(&self, args: &[&str]) -> Result<()> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| Error::Runtime(self.name(), e))?;
        if out.status.success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&out.stderr);
            let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("failed");
            Err(Error::Runtime(
                self.name(),
                std::io::Error::other(line.trim().to_string()),
            ))
        }
    }

    /// Where the runtime keeps container `id`'s state, for the runtimes
    /// whose default root is known (run as root, as clipctl is).
    fn state_dir(&self, id: &str) -> Option<PathBuf> {
        let root = match self {
            Runtime::Clip => "/run/clip-runtime",
            Runtime::Runc => "/run/runc",
            Runtime::Crun => "/run/crun",
            Runtime::Runsc | Runtime::Path(_) => return None,
        };
        Some(Path::new(root).join(id))
    }

    /// Removes the runtime's state of container `id`, if any is left. A
    /// foreground `run` removes its own when the container ends: no
    /// runtime process is started when its state is already gone.
    pub fn delete(&self, id: &str) {
        if self.state_dir(id).is_some_and(|d| !d.exists()) {
            return;
        }
        let _ = self.command().args(["delete", "--force", id]).output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            t.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nvideo:x:44:app\naudio:x:29:app,other\n",
        )
        .unwrap();
        t
    }

    #[test]
    fn users_resolve_through_the_image() {
        let r = rootfs();
        assert_eq!(resolve_user(r.path(), "app").unwrap(), (1000, 1000, vec![29, 44]));
        assert_eq!(resolve_user(r.path(), "1000").unwrap(), (1000, 1000, vec![29, 44]));
        assert_eq!(resolve_user(r.path(), "app:video").unwrap(), (1000, 44, vec![]));
        assert_eq!(resolve_user(r.path(), "4242").unwrap(), (4242, 0, vec![]));
        assert_eq!(resolve_user(r.path(), "4242:7").unwrap(), (4242, 7, vec![]));
        assert!(resolve_user(r.path(), "nobody").is_err());
        assert!(resolve_user(r.path(), "app:nogroup").is_err());
    }

    #[test]
    fn capability_sets_follow_docker() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(capabilities(false, &[], &[]).unwrap().len(), 14);
        assert_eq!(
            capabilities(false, &names(&["net_admin"]), &names(&["ALL"])).unwrap(),
            vec![Capability::NetAdmin]
        );
        let c = capabilities(false, &names(&["CAP_SYS_PTRACE"]), &names(&["chown"])).unwrap();
        assert!(c.contains(&Capability::SysPtrace) && !c.contains(&Capability::Chown));
        assert!(capabilities(false, &names(&["fly"]), &[]).is_err());
        assert!(capabilities(true, &[], &[]).unwrap().len() > 14);
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_docker_does() {
        let c = serde_json::json!({"Entrypoint": ["/ep"], "Cmd": ["a"]});
        let o = |e: Option<&str>, cmd: &[&str]| RunOptions {
            entrypoint: e.map(String::from),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(command_line(&c, &o(None, &[])), ["/ep", "a"]);
        assert_eq!(command_line(&c, &o(None, &["b"])), ["/ep", "b"]);
        assert_eq!(command_line(&c, &o(Some("/x"), &[])), ["/x"]);
        assert_eq!(command_line(&c, &o(Some("/x"), &["y"])), ["/x", "y"]);
        assert_eq!(command_line(&c, &o(Some(""), &["sh"])), ["sh"]);
    }

    #[test]
    fn spec_follows_the_image_config() {
        let r = rootfs();
        let cfg = br#"{"config":{"Entrypoint":["/bin/ep"],"Cmd":["a","b"],"Env":["PATH=/x","K=1"],"WorkingDir":"/w","User":"app"}}"#;
        let s = build_spec(cfg, r.path(), &RunOptions::default()).unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/ep", "a", "b"]);
        assert_eq!(p.env().as_ref().unwrap(), &["PATH=/x", "K=1"]);
        assert_eq!(p.cwd(), Path::new("/w"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(s.root().as_ref().unwrap().path(), r.path());
        let opts = RunOptions {
            cmd: vec!["c".into()],
            env: vec!["K=2".into(), "N=3".into()],
            workdir: Some("/o".into()),
            user: Some("0".into()),
            hostname: Some("h".into()),
            ..Default::default()
        };
        let s = build_spec(cfg, r.path(), &opts).unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/ep", "c"]);
        assert_eq!(p.env().as_ref().unwrap(), &["PATH=/x", "K=2", "N=3"]);
        assert_eq!(p.cwd(), Path::new("/o"));
        assert_eq!(p.user().uid(), 0);
        // containerd's defaults: 14 capabilities, setuid allowed, /run.
        let caps = p.capabilities().as_ref().unwrap();
        assert_eq!(caps.bounding().as_ref().unwrap().len(), DEFAULT_CAPS.len());
        assert!(caps.ambient().as_ref().unwrap().is_empty());
        assert_eq!(p.no_new_privileges(), Some(false));
        // Runtime defaults are kept: namespaces, masked paths, /proc.
        let linux = s.linux().as_ref().unwrap();
        // The host's network by default: no network namespace.
        assert!(linux.namespaces().as_ref().unwrap().len() >= 4);
        assert!(!linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Network));
        assert!(linux.masked_paths().as_ref().is_some_and(|m| !m.is_empty()));
        assert!(s
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new("/proc")));
        // No command at all is an error; PATH gets a default.
        assert!(matches!(
            build_spec(br#"{"config":{}}"#, r.path(), &RunOptions::default()),
            Err(Error::NoCommand)
        ));
        let s = build_spec(br#"{"config":{"Cmd":["sh"]}}"#, r.path(), &RunOptions::default()).unwrap();
        assert!(s.process().as_ref().unwrap().env().as_ref().unwrap()[0].starts_with("PATH=/usr/local/sbin"));
    }
}
