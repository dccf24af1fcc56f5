//! `clipctl run`: clipd prepares the rootfs (index, image mount, overlay);
//! this process writes the bundle and runs the container: in the
//! foreground with the caller's stdio (or a terminal) and signals, or
//! detached with its output in a log.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clip_api::{Reply, Request};
use clip_run::{Bind, Io, Network, RunOptions, Runtime};

use crate::containers::{self, Record};
use crate::exit::{Failure, CANNOT_RUN, NOT_FOUND};

#[derive(clap::Args)]
#[command(trailing_var_arg = true)]
pub struct Args {
    /// clip (clip-runtime, the default), runc, crun, runsc, or the path of a
    /// runc-compatible binary.
    #[arg(long, default_value = "clip")]
    runtime: String,
    /// Remove the container (rootfs, state, log) when it exits.
    #[arg(long)]
    rm: bool,
    /// Run in the background and print the container's id; its output goes
    /// to `clipctl logs ID`.
    #[arg(short = 'd', long, conflicts_with_all = ["rm", "tty", "interactive"])]
    detach: bool,
    /// Keep stdin open and pass it to the container (without it, stdin is
    /// /dev/null).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the container a terminal (with -i: this terminal, in raw mode,
    /// so keys such as Ctrl-C and Ctrl-Z reach the container).
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable: KEY=VALUE, or KEY for this shell's
    /// value (left unset if this shell has none); repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Read environment variables from a file: KEY=VALUE or KEY lines,
    /// blank lines and lines starting with # ignored; repeatable.
    #[arg(long = "env-file")]
    env_file: Vec<PathBuf>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid, resolved in the image.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Replace the image's Entrypoint (and its Cmd); "" clears it.
    #[arg(long, allow_hyphen_values = true)]
    entrypoint: Option<String>,
    /// Container name (default: a generated id, printed).
    #[arg(long)]
    name: Option<String>,
    /// Platform to pick from a multi-arch image (default: this host's).
    /// An image for another platform runs only when asked for here.
    #[arg(long)]
    platform: Option<String>,
    /// Run from this .clip index instead of an image reference (then
    /// every argument is the command).
    #[arg(long)]
    index: Option<PathBuf>,
    /// Network: host (the default: this host's network, clip sets up no
    /// bridge) or none (a namespace with only lo).
    #[arg(long, default_value = "host")]
    network: String,
    /// Add a capability (NET_ADMIN, CAP_SYS_PTRACE, ALL) to containerd's
    /// default 14; repeatable.
    #[arg(long = "cap-add")]
    cap_add: Vec<String>,
    /// Drop a capability (or ALL); repeatable.
    #[arg(long = "cap-drop")]
    cap_drop: Vec<String>,
    /// Every capability, every device, no masked paths, /sys writable.
    #[arg(long)]
    privileged: bool,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// Bind mount a host path: SRC:DST[:ro|rw]; repeatable.
    #[arg(short = 'v', long = "volume")]
    volume: Vec<String>,
    /// Bind mount: type=bind,source=SRC,target=DST[,readonly]; repeatable.
    #[arg(long)]
    mount: Vec<String>,
    /// Run an init (tini, from the host) as PID 1: it reaps zombies and
    /// passes signals on.
    #[arg(long)]
    init: bool,
    /// Memory limit: bytes, or with k, m, g (binary units: 512m, 2g).
    #[arg(short = 'm', long)]
    memory: Option<String>,
    /// CPU limit, in CPUs (1.5: one and a half).
    #[arg(long)]
    cpus: Option<f64>,
    /// Use fuse-overlayfs for the writable layer.
    #[arg(long)]
    fuse_overlayfs: bool,
    /// Image reference.
    #[arg(required_unless_present = "index")]
    image: Option<String>,
    /// Command and arguments, replacing the image's Cmd.
    #[arg(allow_hyphen_values = true)]
    cmd: Vec<String>,
}

fn generated_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "clip-{:x}{:05x}",
        t.as_micros() & 0xffff_ffff_ffff,
        std::process::id() & 0xfffff
    )
}

/// A size with an optional binary unit: `512m`, `2g`, `1024`; not zero.
pub fn parse_bytes(v: &str) -> Option<i64> {
    clip_store::parse_size(v)
        .filter(|n| *n > 0)
        .and_then(|n| i64::try_from(n).ok())
}

/// `-e KEY` takes this shell's value; KEY=VALUE passes as is.
pub fn env_entry(kv: &str, out: &mut Vec<String>) {
    if kv.contains('=') {
        out.push(kv.to_string());
    } else if let Ok(v) = std::env::var(kv) {
        out.push(format!("{kv}={v}"));
    }
}

fn env_file(path: &Path, out: &mut Vec<String>) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--env-file {}", path.display()))?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line.split('=').next().unwrap_or_default();
        if key.is_empty() || key.contains(char::is_whitespace) {
            bail!(
                "--env-file {}, line {}: {line:?} is not KEY=VALUE",
                path.display(),
                n + 1
            );
        }
        env_entry(line, out);
    }
    Ok(())
}

fn bind_source(src: &str, flag: &str) -> Result<PathBuf> {
    let p = std::path::absolute(src)?;
    if !p.exists() {
        bail!("{flag} {src}: no such file or directory on this host");
    }
    Ok(p)
}

fn target(dst: &str, flag: &str) -> Result<String> {
    if !dst.starts_with('/') {
        bail!("{flag}: the target {dst:?} must be an absolute path in the container");
    }
    Ok(dst.to_string())
}

/// `-v SRC:DST[:ro|rw]`.
pub fn parse_volume(v: &str) -> Result<Bind> {
    let parts: Vec<&str> = v.split(':').collect();
    let (src, dst, mode) = match parts.as_slice() {
        [s, d] => (*s, *d, ""),
        [s, d, m] => (*s, *d, *m),
        _ => bail!("-v {v}: expected SRC:DST or SRC:DST:ro (clip makes no named volumes)"),
    };
    let readonly = match mode {
        "" | "rw" => false,
        "ro" => true,
        other => bail!("-v {v}: unknown option {other:?} (ro or rw)"),
    };
    Ok(Bind {
        source: bind_source(src, "-v")?,
        target: target(dst, "-v")?,
        readonly,
    })
}

/// `--mount type=bind,source=SRC,target=DST[,readonly]`.
pub fn parse_mount(v: &str) -> Result<Bind> {
    let (mut src, mut dst, mut ro, mut typ) = (None, None, false, "bind");
    for kv in v.split(',') {
        let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "type" => typ = val,
            "source" | "src" => src = Some(val),
            "target" | "destination" | "dst" => dst = Some(val),
            "readonly" | "ro" => ro = val.is_empty() || val == "true" || val == "1",
            other => bail!("--mount {v}: unknown key {other:?}"),
        }
    }
    if typ != "bind" {
        bail!("--mount {v}: only type=bind is supported");
    }
    let (Some(src), Some(dst)) = (src, dst) else {
        bail!("--mount {v}: needs source= and target=");
    };
    Ok(Bind {
        source: bind_source(src, "--mount")?,
        target: target(dst, "--mount")?,
        readonly: ro,
    })
}

/// tini from the host, static so it runs on any image.
fn init_binary() -> Result<PathBuf> {
    for p in ["/usr/bin/tini-static", "/usr/bin/docker-init", "/sbin/tini-static"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("--init needs tini on this host (Debian: apt-get install tini)")
}

/// /etc/hosts, /etc/hostname and /etc/resolv.conf for the container, in
/// its state directory, as containerd's CRI writes them.
fn etc_files(dir: &Path, hostname: &str, network: Network) -> Result<Vec<(PathBuf, String)>> {
    std::fs::create_dir_all(dir)?;
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    hosts.push_str(&format!("127.0.1.1\t{hostname}\n"));
    if network == Network::Host {
        // The host's own names resolve as on the host.
        let host = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        for l in host
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        {
            if !l.contains("localhost") {
                hosts.push_str(l);
                hosts.push('\n');
            }
        }
    }
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let files = [
        ("hosts", hosts, "/etc/hosts"),
        ("hostname", format!("{hostname}\n"), "/etc/hostname"),
        ("resolv.conf", resolv, "/etc/resolv.conf"),
    ];
    let mut out = Vec::new();
    for (name, text, at) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        out.push((p, at.to_string()));
    }
    Ok(out)
}

/// `path` inside `root`, following symlinks as the container would see
/// them (absolute ones from `root`, `..` clamped at it).
fn resolve_in_root(root: &Path, path: &str) -> PathBuf {
    let mut parts: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(String::from).collect();
    parts.reverse();
    let mut at: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(p) = parts.pop() {
        match p.as_str() {
            "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => {}
        }
        let host: PathBuf = root.join(at.iter().collect::<PathBuf>()).join(&p);
        match std::fs::read_link(&host) {
            Ok(target) if hops < 40 => {
                hops += 1;
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    at.clear();
                }
                parts.extend(t.split('/').filter(|s| !s.is_empty()).rev().map(String::from));
            }
            _ => at.push(p),
        }
    }
    root.join(at.iter().collect::<PathBuf>())
}

/// Docker's exit codes for a command that cannot run: 127 when it is not
/// there, 126 when it is not executable. Checked in the rootfs before the
/// runtime starts, so that the answer is one clear line whatever the
/// runtime (each words its failure differently). Paths under a bind
/// mount are left to the runtime.
fn check_command(rootfs: &Path, spec: &Proc, binds: &[Bind]) -> Result<()> {
    let args = spec.args.as_slice();
    let Some(cmd) = args.iter().find(|a| *a != "/sbin/docker-init" && *a != "--") else {
        return Ok(());
    };
    let under_bind = |p: &str| binds.iter().any(|b| Path::new(p).starts_with(&b.target));
    // A working directory that is a file: runtimes fail on it with words
    // of their own (clip-runtime's: "failed to unix syscall"); a missing
    // one they create.
    if !under_bind(&spec.cwd) {
        let cwd = resolve_in_root(rootfs, &spec.cwd);
        if std::fs::metadata(&cwd).is_ok_and(|m| !m.is_dir()) {
            return Err(Failure::new(
                crate::exit::CLIP_FAILED,
                format!("working directory {}: not a directory in the image", spec.cwd),
            )
            .into());
        }
    }
    let candidates: Vec<String> = if cmd.contains('/') {
        if cmd.starts_with('/') {
            vec![cmd.clone()]
        } else {
            vec![format!("{}/{cmd}", spec.cwd)]
        }
    } else {
        spec.path
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{cmd}"))
            .collect()
    };
    let mut not_exec = None;
    for c in &candidates {
        if under_bind(c) {
            return Ok(());
        }
        let host = resolve_in_root(rootfs, c);
        let Ok(md) = std::fs::metadata(&host) else { continue };
        use std::os::unix::fs::PermissionsExt;
        if md.is_file() && md.permissions().mode() & 0o111 != 0 {
            return Ok(());
        }
        not_exec.get_or_insert_with(|| {
            if md.is_dir() {
                format!("{c}: is a directory")
            } else {
                format!("{c}: permission denied (not executable)")
            }
        });
    }
    match not_exec {
        Some(why) => Err(Failure::new(CANNOT_RUN, format!("cannot run {cmd:?}: {why}")).into()),
        None if cmd.contains('/') => Err(Failure::new(NOT_FOUND, format!("{cmd:?}: no such file in the image")).into()),
        None => Err(Failure::new(
            NOT_FOUND,
            format!("{cmd:?}: executable file not found in $PATH ({})", spec.path),
        )
        .into()),
    }
}

/// The parts of the process `check_command` needs.
struct Proc {
    args: Vec<String>,
    cwd: String,
    path: String,
}

fn process_of(spec: &oci_spec::runtime::Spec) -> Proc {
    let p = spec.process().clone().unwrap_or_default();
    let path = p
        .env()
        .clone()
        .unwrap_or_default()
        .iter()
        .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
        .unwrap_or_default();
    Proc {
        args: p.args().clone().unwrap_or_default(),
        cwd: p.cwd().display().to_string(),
        path,
    }
}

/// Refuses an image built for another platform unless it was asked for.
fn check_platform(config: &str, asked: Option<&str>) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(config).unwrap_or_default();
    let (Some(os), Some(arch)) = (v["os"].as_str(), v["architecture"].as_str()) else {
        return Ok(());
    };
    let image = format!("{os}/{arch}");
    let host = crate::client::host_platform();
    if asked.is_none() && image != host {
        bail!("the image is for {image}, this host is {host}: pass --platform {image} to run it anyway");
    }
    Ok(())
}

/// Runs the container and returns its exit code. `record`: what it reads,
/// until it exits, goes into its image's prefetch profile (and it is
/// removed when it exits).
pub fn run(mut a: Args, record: bool) -> Result<i32> {
    if record {
        a.rm = true;
    }
    if a.index.is_some() {
        if let Some(first) = a.image.take() {
            a.cmd.insert(0, first);
        }
    }
    crate::require_root()?;
    let started = clip_run::monotonic_ns();
    let named = a.name.is_some();
    let id = a.name.clone().unwrap_or_else(generated_id);
    containers::validate(&id)?;
    if containers::exists(&id) {
        bail!("a container named {id} exists: remove it with `clipctl rm {id}`, or choose another --name");
    }
    let network: Network = a.network.parse()?;
    let mut env = Vec::new();
    for f in &a.env_file {
        env_file(f, &mut env)?;
    }
    for kv in &a.env {
        if kv.starts_with('=') || kv.is_empty() {
            bail!("-e {kv:?}: expected KEY=VALUE or KEY");
        }
        env_entry(kv, &mut env);
    }
    let mut binds = Vec::new();
    for v in &a.volume {
        binds.push(parse_volume(v)?);
    }
    for m in &a.mount {
        binds.push(parse_mount(m)?);
    }
    let memory = a
        .memory
        .as_deref()
        .map(|m| parse_bytes(m).with_context(|| format!("--memory {m:?}: expected a size such as 512m or 2g")))
        .transpose()?;
    if let Some(c) = a.cpus {
        if !(c > 0.0 && c.is_finite()) {
            bail!("--cpus {c}: expected a positive number of CPUs");
        }
    }
    clip_run::capabilities(a.privileged, &a.cap_add, &a.cap_drop)?;
    let init = a.init.then(init_binary).transpose()?;

    let mib = crate::checkpoint_mib_env()?;
    let platform = a.platform.clone().unwrap_or_else(crate::client::host_platform);
    let req = Request::Prepare {
        spec: a.image.as_deref().map(|i| crate::client::spec(i, &platform, mib)),
        index: a.index.as_ref().map(std::path::absolute).transpose()?,
        id: id.clone(),
        fuse_overlayfs: a.fuse_overlayfs,
        record,
        command: Some(clip_api::Command {
            cmd: a.cmd.clone(),
            entrypoint: a.entrypoint.clone(),
            env: env.clone(),
            workdir: a.workdir.clone(),
        }),
    };
    let Reply::Prepared(p) = crate::client::call(&req)? else {
        bail!("clipd answered something else");
    };
    let runtime: Runtime = a.runtime.parse().expect("infallible");
    let state_dir = containers::dir(&id);
    let log = state_dir.join("container.log");
    let hostname: String = id.chars().take(63).collect();
    let prepared = (|| -> Result<Io> {
        check_platform(&p.config, a.platform.as_deref())?;
        let opts = RunOptions {
            cmd: a.cmd.clone(),
            entrypoint: a.entrypoint.clone(),
            env: env.clone(),
            workdir: a.workdir.clone(),
            user: a.user.clone(),
            hostname: Some(hostname.clone()),
            network,
            cap_add: a.cap_add.clone(),
            cap_drop: a.cap_drop.clone(),
            privileged: a.privileged,
            read_only: a.read_only,
            binds: binds.clone(),
            files: etc_files(&state_dir.join("etc"), &hostname, network)?,
            init: init.clone(),
            memory,
            cpus: a.cpus,
            terminal: a.tty,
        };
        let spec = clip_run::build_spec(p.config.as_bytes(), &p.rootfs, &opts)?;
        let process = process_of(&spec);
        check_command(&p.rootfs, &process, &binds)?;
        clip_run::write_bundle(&p.bundle, &spec)?;
        containers::save(
            &id,
            &Record {
                runtime: runtime.name(),
                image: p.image.clone(),
                created: containers::now(),
                detached: a.detach,
                command: process.args,
            },
        )?;
        Ok(if a.detach {
            Io::Detached { log: log.clone() }
        } else if a.tty {
            Io::Terminal {
                stdin: a.interactive,
                socket: state_dir.join("console.sock"),
            }
        } else {
            Io::Inherit { stdin: a.interactive }
        })
    })();
    let io = match prepared {
        Ok(io) => io,
        Err(e) => {
            let _ = containers::remove(&id, &runtime);
            return Err(e);
        }
    };
    if !a.detach && !a.rm && !named {
        // Found again by this id (`clipctl ps -a`, `clipctl rm`).
        eprintln!("{id}");
    }
    let name = runtime.name();
    let label = name.rsplit('/').next().unwrap_or(&name).to_string();
    let cid = id.clone();
    // Recorded at once: a long-running container's start shows in the
    // metrics while it runs.
    let on_exec = Box::new(move |t: u64| {
        let seconds = t.saturating_sub(started) as f64 / 1e9;
        tracing::info!(container = %cid, runtime = %label, seconds, "container process started");
        let _ = crate::client::call_running(&Request::ObserveFirstExec {
            runtime: label,
            seconds,
        });
    });
    let result = runtime
        .run(&p.bundle, &id, &io, Some(on_exec))
        .with_context(|| format!("running container {id}"));
    if a.detach {
        let exit = match result {
            Ok(e) => e,
            Err(e) => {
                let _ = containers::remove(&id, &runtime);
                return Err(e);
            }
        };
        if exit.code != 0 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = containers::remove(&id, &runtime);
            bail!(
                "{} failed to start the container: {}",
                runtime.name(),
                text.lines().last().unwrap_or("(no message)")
            );
        }
        println!("{id}");
        return Ok(0);
    }
    if a.rm {
        containers::remove(&id, &runtime).with_context(|| format!("removing container {id}"))?;
    }
    Ok(result?.code)
}
