//! From an image config to an OCI runtime bundle, and running it.
//!
//! [`build_spec`] starts from a runtime's usual defaults (oci-spec's, which
//! follow `runc spec`: namespaces, masked and read-only paths, default
//! capabilities, /proc /sys /dev mounts) and applies the image config as
//! Docker does: Entrypoint plus Cmd (a given command replaces Cmd), Env,
//! WorkingDir, User resolved through the image's own /etc/passwd and
//! /etc/group. [`Runtime::run`] runs a bundle in the foreground with stdio
//! and signals passed through, and returns the container's exit code.

mod exec_watch;
pub mod signals;

pub use exec_watch::monotonic_ns;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::runtime::{ProcessBuilder, RootBuilder, Spec, UserBuilder};

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What `clipctl run` lets a user set on top of the image config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replaces the image's Cmd.
    pub cmd: Vec<String>,
    /// `KEY=VALUE`, added to or replacing the image's.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    pub hostname: Option<String>,
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
    let mut args = strings(&c["Entrypoint"]);
    if opts.cmd.is_empty() {
        args.extend(strings(&c["Cmd"]));
    } else {
        args.extend(opts.cmd.iter().cloned());
    }
    if args.is_empty() {
        return Err(Error::NoCommand);
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
    let base = spec.process().clone().unwrap_or_default();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user.build()?)
        .args(args)
        .env(env)
        .cwd(PathBuf::from(cwd.unwrap_or_else(|| "/".into())))
        .capabilities(base.capabilities().clone().unwrap_or_default())
        .rlimits(base.rlimits().clone().unwrap_or_default())
        .no_new_privileges(true)
        .build()?;
    spec.set_process(Some(process));
    spec.set_root(Some(RootBuilder::default().path(rootfs).readonly(false).build()?));
    spec.set_hostname(opts.hostname.clone().or_else(|| Some("clip".into())));
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

    /// Runs the bundle in the foreground (`RUNTIME run --bundle DIR ID`)
    /// with this process's stdio, forwarding SIGINT, SIGTERM, SIGHUP,
    /// SIGQUIT, SIGUSR1 and SIGUSR2 to it (runc and crun pass them on to the
    /// container). Returns the exit code, 128 + N for death by signal N,
    /// and when the container's process first exec'd, if that was seen.
    /// `on_first_exec` is called (from another thread) as soon as that is.
    pub fn run(&self, bundle: &Path, id: &str, on_first_exec: Option<Box<dyn FnOnce(u64) + Send>>) -> Result<Exit> {
        use std::os::unix::process::CommandExt;
        use std::os::unix::process::ExitStatusExt;
        let pid_file = bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = self.command();
        cmd.arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id);
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
        let watch = match exec_watch::ExecWatch::open() {
            Ok(w) => Some(w.first_exec(pid_file, done.clone(), on_first_exec)),
            Err(e) => {
                tracing::debug!(error = %e, "not timing the first exec (process events need root)");
                None
            }
        };
        let mut child = cmd.spawn().map_err(|e| Error::Runtime(self.name(), e))?;
        let pid = child.id() as i32;
        let d = done.clone();
        std::thread::spawn(move || {
            signals::forward(&set, pid, std::time::Duration::from_millis(100), || {
                d.load(std::sync::atomic::Ordering::Relaxed)
            })
        });
        let status = child.wait();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let first_exec_ns = watch.and_then(|h| h.join().ok().flatten());
        let status = status.map_err(|e| Error::Runtime(self.name(), e))?;
        Ok(Exit {
            code: status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            first_exec_ns,
        })
    }

    /// Removes the runtime's state of container `id`, if any is left.
    pub fn delete(&self, id: &str) {
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
        };
        let s = build_spec(cfg, r.path(), &opts).unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/ep", "c"]);
        assert_eq!(p.env().as_ref().unwrap(), &["PATH=/x", "K=2", "N=3"]);
        assert_eq!(p.cwd(), Path::new("/o"));
        assert_eq!(p.user().uid(), 0);
        // Runtime defaults are kept: namespaces, masked paths, /proc.
        let linux = s.linux().as_ref().unwrap();
        assert!(linux.namespaces().as_ref().unwrap().len() >= 5);
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
