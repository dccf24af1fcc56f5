//! clip-runtime: an OCI runtime with runc's command line, built on youki's
//! `libcontainer`, which does the work (namespaces, mounts, cgroups,
//! capabilities, seccomp, hooks). This crate adds the command line, state
//! output in the runtime spec's format, and one fix of its own:
//! [`readonly_cgroups`] makes the cgroup mounts read-only when config.json
//! says `ro` (libcontainer mounts cgroup v1 controllers read-write, which
//! lets a container raise its own limits).
//!
//! libcontainer clones the calling process and keeps running Rust in the
//! child, so the binary that calls this must be single-threaded.

pub mod readonly_cgroups;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::{ContainerState, Spec};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {id} is {status}: {what}")]
    State {
        id: String,
        status: String,
        what: &'static str,
    },
    #[error("invalid signal {0}")]
    Signal(String),
    #[error(transparent)]
    Container(#[from] libcontainer::error::LibcontainerError),
    #[error("bundle {0}: {1}")]
    Spec(PathBuf, String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Where containers' state lives (`--root`).
#[derive(Debug, Clone)]
pub struct Root(pub PathBuf);

impl Root {
    fn dir(&self, id: &str) -> PathBuf {
        self.0.join(id)
    }

    /// Loads a container and refreshes its status from the process table.
    pub fn load(&self, id: &str) -> Result<Container> {
        let dir = self.dir(id);
        if id.is_empty() || id.contains('/') || !dir.join("state.json").exists() {
            return Err(Error::NotFound(id.into()));
        }
        let mut c = Container::load(dir)?;
        c.refresh_status()?;
        Ok(c)
    }

    /// Ids of the containers under this root.
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("state.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// What `create` and `run` take.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub preserve_fds: i32,
    pub no_pivot: bool,
}

fn load_spec(bundle: &Path) -> Result<Spec> {
    let spec = Spec::load(bundle.join("config.json")).map_err(|e| Error::Spec(bundle.to_path_buf(), e.to_string()))?;
    check_process(&spec).map_err(|why| Error::Spec(bundle.to_path_buf(), why))?;
    Ok(spec)
}

/// Process fields libcontainer would trip on (an environment entry
/// without a name made it panic): refused with a clear error.
fn check_process(spec: &Spec) -> std::result::Result<(), String> {
    let Some(p) = spec.process() else {
        return Ok(());
    };
    for e in p.env().iter().flatten() {
        match e.split_once('=') {
            Some((name, _)) if !name.is_empty() && !name.contains('\0') => {}
            _ => return Err(format!("process.env entry {e:?} is not NAME=VALUE")),
        }
    }
    if p.args().as_ref().is_none_or(|a| a.is_empty()) && p.command_line().is_none() {
        return Err("process.args is empty: there is nothing to run".into());
    }
    Ok(())
}

fn builder(root: &Root, id: &str, console: Option<&Path>, pid_file: Option<&Path>) -> Result<ContainerBuilder> {
    std::fs::create_dir_all(&root.0).map_err(io(format!("creating {}", root.0.display())))?;
    let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default()).with_root_path(&root.0)?;
    if let Some(p) = pid_file {
        b = b.with_pid_file(Some(p))?;
    }
    if let Some(s) = console {
        b = b.with_console_socket(Some(s));
    }
    Ok(b.validate_id()?)
}

/// `create`: the container's processes are set up and wait for `start`.
/// A failed create leaves nothing behind.
pub fn create(root: &Root, id: &str, o: &CreateOptions, detach: bool) -> Result<Container> {
    if root.dir(id).exists() {
        return Err(Error::Exists(id.into()));
    }
    let spec = load_spec(&o.bundle)?;
    let built = builder(root, id, o.console_socket.as_deref(), o.pid_file.as_deref())?
        .with_preserved_fds(o.preserve_fds)
        .as_init(&o.bundle)
        .with_systemd(false)
        .with_no_pivot(o.no_pivot)
        .with_detach(detach)
        .build();
    let mut container = match built {
        Ok(c) => c,
        Err(e) => {
            cleanup_failed(root, id);
            return Err(e.into());
        }
    };
    let applied = readonly_cgroups::enforce(&container, &spec).and_then(|_| disable_oom_killer(&container, &spec));
    if let Err(e) = applied {
        let _ = container.delete(true);
        cleanup_failed(root, id);
        return Err(e);
    }
    Ok(container)
}

/// `linux.resources.memory.disableOOMKiller`, which libcontainer 0.7
/// never applies: `memory.oom_control` of the container's memory cgroup
/// (cgroup v1; cgroup v2 has no such switch).
fn disable_oom_killer(c: &Container, spec: &Spec) -> Result<()> {
    let wanted = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.disable_oom_killer());
    let (Some(true), Some(pid)) = (wanted, c.pid()) else {
        return Ok(());
    };
    let cgroups =
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(io("reading the container's cgroups"))?;
    let Some(path) = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
    }) else {
        return Ok(()); // no v1 memory controller
    };
    let mounts = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| Error::Io {
            what: "reading the mount table".into(),
            source: std::io::Error::other(e),
        })?;
    let Some(mount) = mounts
        .into_iter()
        .find(|m| m.fs_type == "cgroup" && m.super_options.contains_key("memory"))
    else {
        return Ok(());
    };
    let file = mount
        .mount_point
        .join(path.trim_start_matches('/'))
        .join("memory.oom_control");
    std::fs::write(&file, "1").map_err(io(format!("writing {}", file.display())))
}

/// Removes what a failed create may have left (libcontainer cleans up
/// most of it itself).
fn cleanup_failed(root: &Root, id: &str) {
    let dir = root.dir(id);
    if let Ok(mut c) = Container::load(dir.clone()) {
        let _ = c.delete(true);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts a created container: as libcontainer's `Container::start`, but
/// it returns only once the container's process has exec'd, as runc's
/// does (its exec fifo), so that poststart hooks, and a signal sent right
/// after `start`, find the container's own process; and a failing
/// poststart hook is a warning, and the other hooks still run (the spec).
pub fn start(root: &Root, id: &str) -> Result<()> {
    use libcontainer::notify_socket::{NotifySocket, NOTIFY_FILE};
    let mut c = root.load(id)?;
    c.refresh_status()?;
    if c.status() != ContainerStatus::Created {
        return Err(state_error(&c, "only a created container can be started"));
    }
    let config =
        libcontainer::config::YoukiConfig::load(&c.root).map_err(libcontainer::error::LibcontainerError::from)?;
    let pid = c.pid();
    let before = pid.and_then(|p| exe_of(p.as_raw()));
    NotifySocket::new(c.root.join(NOTIFY_FILE))
        .notify_container_start()
        .map_err(libcontainer::error::LibcontainerError::from)?;
    if let (Some(p), Some(before)) = (pid, before) {
        wait_for_exec(p.as_raw(), before);
    }
    c.set_status(ContainerStatus::Running).save()?;
    if let Some(hooks) = config.hooks.as_ref() {
        if let (Some(p), true) = (pid, hooks.poststart().as_ref().is_some_and(|h| !h.is_empty())) {
            wait_until_settled(p.as_raw());
        }
        for hook in hooks.poststart().iter().flatten() {
            let one = vec![hook.clone()];
            if let Err(e) = libcontainer::hooks::run_hooks(Some(&one), Some(&c.state), Some(&c.root), None, None) {
                tracing::warn!(path = %hook.path().display(), error = %e, "a poststart hook failed");
            }
        }
    }
    Ok(())
}

/// The (device, inode) of process `pid`'s executable.
fn exe_of(pid: i32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Waits until process `pid` runs another executable than `before` (it
/// exec'd the container's process) or is gone (it exec'd and exited).
fn wait_for_exec(pid: i32, before: (u64, u64)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while exe_of(pid) == Some(before) {
        if std::time::Instant::now() > deadline {
            tracing::warn!(pid, "the container's process did not exec within 10 s");
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Waits (up to 1 s) until process `pid`, just exec'd, has run its start:
/// it sleeps waiting for something, has stopped or exited. Poststart hooks
/// then see a process that has done its first steps, on a busy machine too
/// (a hook run at the instant of the exec raced the process's first write
/// in runtime-tools' poststart test); only containers with poststart
/// hooks wait.
fn wait_until_settled(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return;
        };
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if !matches!(state, Some('R' | 'D')) || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

fn status_name(s: ContainerStatus) -> &'static str {
    match s {
        ContainerStatus::Creating => "creating",
        ContainerStatus::Created => "created",
        ContainerStatus::Running => "running",
        ContainerStatus::Stopped => "stopped",
        ContainerStatus::Paused => "paused",
    }
}

fn state_error(c: &Container, what: &'static str) -> Error {
    Error::State {
        id: c.id().to_string(),
        status: status_name(c.status()).to_string(),
        what,
    }
}

/// The runtime spec's state of a container.
pub fn state(root: &Root, id: &str) -> Result<oci_spec::runtime::State> {
    let c = root.load(id)?;
    let status = match c.status() {
        ContainerStatus::Creating => ContainerState::Creating,
        ContainerStatus::Created => ContainerState::Created,
        ContainerStatus::Running | ContainerStatus::Paused => ContainerState::Running,
        ContainerStatus::Stopped => ContainerState::Stopped,
    };
    let mut s = oci_spec::runtime::State::default();
    s.set_version(oci_spec::runtime::VERSION.to_string())
        .set_id(id.to_string())
        .set_status(status)
        .set_pid(
            c.pid()
                .map(|p| p.as_raw())
                .filter(|_| status != ContainerState::Stopped),
        )
        .set_bundle(c.bundle().clone())
        .set_annotations(c.state.annotations.clone());
    Ok(s)
}

pub fn kill(root: &Root, id: &str, signal: &str, all: bool) -> Result<()> {
    let mut c = root.load(id)?;
    let sig = libcontainer::signal::Signal::try_from(signal).map_err(|_| Error::Signal(signal.into()))?;
    let signallable = match c.status() {
        ContainerStatus::Created | ContainerStatus::Running | ContainerStatus::Paused => true,
        ContainerStatus::Stopped => all,
        ContainerStatus::Creating => false,
    };
    if !signallable {
        return Err(state_error(&c, "only a created or running container can be signalled"));
    }
    Ok(c.kill(sig, all)?)
}

/// `delete`: a stopped container's resources go (with `force`, a running
/// one is killed first).
pub fn delete(root: &Root, id: &str, force: bool) -> Result<()> {
    let mut c = root.load(id)?;
    if !force && !matches!(c.status(), ContainerStatus::Stopped | ContainerStatus::Created) {
        return Err(state_error(&c, "stop it first or use --force"));
    }
    match c.delete(true) {
        // The spec: a failing poststop hook is logged and the lifecycle
        // goes on. libcontainer stops before removing the state; finish.
        Err(libcontainer::error::LibcontainerError::Hook(e)) => {
            tracing::warn!(error = %e, container = id, "poststop hook failed");
            std::fs::remove_dir_all(&c.root).map_err(io(format!("removing {}", c.root.display())))
        }
        r => Ok(r?),
    }
}

/// Pids of every process in the container's cgroup.
pub fn pids(root: &Root, id: &str) -> Result<Vec<i32>> {
    use libcgroups::common::CgroupManager;
    let c = root.load(id)?;
    let config = c.spec()?;
    let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: config.cgroup_path.clone(),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| Error::Spec(c.bundle().clone(), format!("cgroup: {e}")))?;
    let mut pids: Vec<i32> = manager
        .get_all_pids()
        .map_err(|e| Error::Spec(c.bundle().clone(), format!("cgroup pids: {e}")))?
        .into_iter()
        .map(|p| p.as_raw())
        .collect();
    pids.sort();
    Ok(pids)
}

/// One row of `list`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub pid: i32,
    pub status: &'static str,
    pub bundle: PathBuf,
    pub created: String,
    pub owner: String,
}

pub fn list(root: &Root) -> Vec<Listed> {
    root.ids()
        .into_iter()
        .filter_map(|id| {
            let c = root.load(&id).ok()?;
            Some(Listed {
                pid: c
                    .pid()
                    .map(|p| p.as_raw())
                    .filter(|_| c.status() != ContainerStatus::Stopped)
                    .unwrap_or(0),
                status: status_name(c.status()),
                bundle: c.bundle().clone(),
                created: c.created().map(|t| t.to_rfc3339()).unwrap_or_default(),
                owner: c
                    .creator()
                    .map(|o| o.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                id,
            })
        })
        .collect()
}

/// What `exec` takes.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub process: Option<PathBuf>,
    pub args: Vec<String>,
    pub env: HashMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub user: Option<(u32, Option<u32>)>,
    pub additional_gids: Vec<u32>,
    pub no_new_privs: bool,
    pub caps: Vec<String>,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub detach: bool,
}

/// Starts another process in a running container; returns its pid.
pub fn exec(root: &Root, id: &str, o: &ExecOptions) -> Result<i32> {
    let c = root.load(id)?;
    if c.status() != ContainerStatus::Running {
        return Err(state_error(&c, "exec needs a running container"));
    }
    let mut b = builder(root, id, o.console_socket.as_deref(), o.pid_file.as_deref())?
        .as_tenant()
        .with_detach(o.detach)
        .with_env(o.env.clone())
        .with_cwd(o.cwd.clone())
        .with_container_args(o.args.clone())
        .with_process(o.process.clone())
        .with_capabilities(o.caps.clone())
        .with_additional_gids(o.additional_gids.clone());
    if o.no_new_privs {
        b = b.with_no_new_privs(true);
    }
    if let Some((uid, gid)) = o.user {
        b = b.with_user(Some(uid)).with_group(gid);
    }
    Ok(b.build()?.as_raw())
}

/// Waits for a child process; its exit code, or 128 + signal.
pub fn wait(pid: i32) -> Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waiting for a pid with a status slot we own.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io(format!("waiting for {pid}"))(e));
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// Waits in the foreground for `pid` (a child of this process: libcontainer
/// clones the container's init and exec'd processes as siblings of its
/// helper, so they are ours) while passing the usual signals on to it, as
/// runc does. Returns its exit code, or 128 + signal.
pub fn foreground(pid: i32) -> Result<i32> {
    use clip_run::signals;
    let mut wanted = signals::FORWARDED.to_vec();
    wanted.push(libc::SIGCHLD);
    let set = signals::set_of(&wanted);
    signals::block(&set);
    let mut result = None;
    // SIGCHLD wakes the loop; each turn reaps whatever has exited and
    // stops once the container's process has.
    signals::forward(&set, pid, std::time::Duration::from_millis(200), || loop {
        let mut status = 0;
        // SAFETY: non-blocking wait with a status slot we own.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r == pid {
            result = Some(Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            }));
            return true;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            result = Some(Err(io(format!("waiting for {pid}"))(
                std::io::Error::from_raw_os_error(libc::ECHILD),
            )));
            return true;
        }
        if r <= 0 {
            return false;
        }
    });
    result.expect("forward returns once done")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_process(env: &[&str], args: &[&str]) -> Spec {
        let mut spec = Spec::default();
        let mut p = spec.process().clone().unwrap_or_default();
        p.set_env(Some(env.iter().map(|s| s.to_string()).collect()));
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        spec.set_process(Some(p));
        spec
    }

    #[test]
    fn process_fields_libcontainer_trips_on_are_refused() {
        assert!(check_process(&with_process(&["A=1", "B="], &["sh"])).is_ok());
        let e = check_process(&with_process(&["=value"], &["sh"])).unwrap_err();
        assert!(e.contains("\"=value\""), "{e}");
        assert!(check_process(&with_process(&["NOEQUALS"], &["sh"])).is_err());
        assert!(check_process(&with_process(&[], &[]))
            .unwrap_err()
            .contains("nothing to run"));
    }
}
