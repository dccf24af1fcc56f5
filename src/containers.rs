//! Containers after `run`: `ps`, `logs`, `stop`, `rm` and `exec`. Each
//! container keeps a small record (which runtime runs it, its image and
//! command) in its state directory, root's alone, beside its bundle;
//! whether it runs is the runtime's to say.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clip_api::{Reply, Request};
use clip_run::{Io, Runtime};
use serde::{Deserialize, Serialize};

/// What clipctl remembers of a container it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub runtime: String,
    pub image: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub detached: bool,
    pub command: Vec<String>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn paths() -> clip_rootfs::Paths {
    clip_rootfs::Paths::from_env()
}

/// The container's state directory (its bundle, record, log, /etc files).
pub fn dir(id: &str) -> PathBuf {
    paths().container_dir(id)
}

pub fn validate(id: &str) -> Result<()> {
    Ok(clip_rootfs::validate_id(id)?)
}

pub fn exists(id: &str) -> bool {
    dir(id).exists()
}

pub fn save(id: &str, r: &Record) -> Result<()> {
    let d = dir(id);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("clip.json"), serde_json::to_vec(r)?).context("saving the container's record")
}

pub fn load(id: &str) -> Result<Record> {
    validate(id)?;
    let text = std::fs::read(dir(id).join("clip.json")).map_err(|_| anyhow::anyhow!("no container {id}"))?;
    serde_json::from_slice(&text).with_context(|| format!("container {id}: its record is damaged"))
}

/// Removes the runtime's state and the rootfs (and the image mount once
/// unused).
pub fn remove(id: &str, runtime: &Runtime) -> Result<()> {
    runtime.delete(id);
    crate::client::call(&Request::Release { id: id.to_string() })?;
    Ok(())
}

fn runtime_of(r: &Record) -> Runtime {
    r.runtime.parse().expect("infallible")
}

/// `running`, `created`, `paused`, or `exited` once the runtime has
/// nothing running.
pub fn status(r: &Record, id: &str) -> String {
    match runtime_of(r).status(id).as_deref() {
        Some("stopped") | None => "exited".into(),
        Some(s) => s.into(),
    }
}

fn ago(t: u64) -> String {
    let s = now().saturating_sub(t);
    match s {
        0..=59 => format!("{s} seconds ago"),
        60..=3599 => format!("{} minutes ago", s / 60),
        3600..=86399 => format!("{} hours ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

#[derive(clap::Args)]
pub struct PsArgs {
    /// Show every container, exited ones too.
    #[arg(short, long)]
    all: bool,
    /// Show the image mounts and the containers on each instead.
    #[arg(long)]
    mounts: bool,
    #[arg(long)]
    json: bool,
}

pub fn ps(a: PsArgs) -> Result<()> {
    crate::require_root()?;
    let Reply::Ps(p) = crate::client::call(&Request::Ps)? else {
        bail!("clipd answered something else");
    };
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["format_version"] = 1.into();
        if let Some(cs) = v["containers"].as_array_mut() {
            for c in cs {
                let id = c["id"].as_str().unwrap_or_default().to_string();
                if let Ok(r) = load(&id) {
                    c["status"] = status(&r, &id).into();
                    c["runtime"] = r.runtime.into();
                    c["command"] = r.command.into();
                    c["created"] = r.created.into();
                }
            }
        }
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    if a.mounts {
        println!("{:<40} {:<24} {:<40} INDEX FROM", "IMAGE", "CONTAINERS", "MOUNT");
        for m in &p.mounts {
            let containers = if m.containers.is_empty() {
                "-".to_string()
            } else {
                m.containers.join(",")
            };
            println!(
                "{:<40} {:<24} {:<40} {}",
                m.image,
                containers,
                m.dir.display(),
                m.origin
            );
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<36} {:<24} {:<16} {:<10} RUNTIME",
        "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"
    );
    for c in &p.containers {
        // A rootfs made by `mount --cid` has no record: shown as such.
        let (image, command, created, st, rt) = match load(&c.id) {
            Ok(r) => {
                let st = status(&r, &c.id);
                (r.image.clone(), r.command.join(" "), ago(r.created), st, r.runtime)
            }
            Err(_) => (c.image.clone(), "-".into(), "-".into(), "rootfs".into(), "-".into()),
        };
        if !a.all && st == "exited" {
            continue;
        }
        let command: String = command.chars().take(22).collect();
        println!(
            "{:<24} {:<36} {:<24} {:<16} {:<10} {rt}",
            c.id,
            image,
            format!("\"{command}\""),
            created,
            st
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LogsArgs {
    /// Keep printing what the container writes, until it exits.
    #[arg(short, long)]
    follow: bool,
    id: String,
}

pub fn logs(a: LogsArgs) -> Result<()> {
    crate::require_root()?;
    let r = load(&a.id)?;
    if !r.detached {
        bail!(
            "container {} ran in the foreground: its output went to the terminal that ran it",
            a.id
        );
    }
    let path = dir(&a.id).join("container.log");
    let mut f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        if !a.follow || status(&r, &a.id) == "exited" {
            // One last read: what it wrote as it exited.
            let mut rest = Vec::new();
            f.read_to_end(&mut rest)?;
            out.write_all(&rest)?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `within` for the container to stop running.
fn wait_exited(r: &Record, id: &str, within: Duration) -> bool {
    let t = Instant::now();
    loop {
        if status(r, id) == "exited" {
            return true;
        }
        if t.elapsed() >= within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop_one(id: &str, grace: Duration) -> Result<()> {
    let r = load(id)?;
    if status(&r, id) == "exited" {
        return Ok(());
    }
    let rt = runtime_of(&r);
    // As docker stop: SIGTERM, then SIGKILL after the grace period.
    let _ = rt.kill(id, "TERM");
    if !wait_exited(&r, id, grace) {
        rt.kill(id, "KILL").with_context(|| format!("killing container {id}"))?;
        if !wait_exited(&r, id, Duration::from_secs(10)) {
            bail!("container {id} is still running after SIGKILL");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short, long, default_value_t = 10)]
    time: u64,
    #[arg(required = true)]
    ids: Vec<String>,
}

impl StopArgs {
    /// Stop `id` with no grace period.
    pub fn now(id: &str) -> StopArgs {
        StopArgs {
            time: 0,
            ids: vec![id.to_string()],
        }
    }
}

pub fn stop(a: StopArgs) -> Result<()> {
    crate::require_root()?;
    for id in &a.ids {
        stop_one(id, Duration::from_secs(a.time))?;
        println!("{id}");
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short, long)]
    force: bool,
    #[arg(required = true)]
    ids: Vec<String>,
}

pub fn rm(a: RmArgs) -> Result<()> {
    crate::require_root()?;
    for id in &a.ids {
        let r = load(id);
        if let Ok(r) = &r {
            if status(r, id) != "exited" {
                if !a.force {
                    bail!("container {id} is running: stop it first (`clipctl stop {id}`), or use rm --force");
                }
                stop_one(id, Duration::ZERO)?;
            }
        } else if !exists(id) {
            bail!("no container {id}");
        }
        let rt = r.as_ref().map_or(Runtime::Clip, runtime_of);
        remove(id, &rt)?;
        println!("{id}");
    }
    Ok(())
}

#[derive(clap::Args)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    /// Keep stdin open and pass it on.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// A terminal for the process.
    #[arg(short = 't', long)]
    tty: bool,
    /// Run in the background.
    #[arg(short = 'd', long, conflicts_with_all = ["tty", "interactive"])]
    detach: bool,
    /// KEY=VALUE, or KEY for this shell's value; repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// User as uid[:gid] (default: the container's).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Working directory (default: the container's).
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    id: String,
    #[arg(required = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

pub fn exec(a: ExecArgs) -> Result<i32> {
    crate::require_root()?;
    let r = load(&a.id)?;
    if status(&r, &a.id) != "running" {
        bail!("container {} is not running", a.id);
    }
    let d = dir(&a.id);
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.join("bundle/config.json")).context("reading the container's config.json")?,
    )?;
    // The container's own process, with this command: the same
    // capabilities, user and environment, as docker exec.
    let mut process = config["process"].clone();
    process["args"] = serde_json::to_value(&a.cmd)?;
    process["terminal"] = a.tty.into();
    let mut env: Vec<String> = process["env"]
        .as_array()
        .map(|e| e.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default();
    for kv in &a.env {
        let mut one = Vec::new();
        crate::run::env_entry(kv, &mut one);
        for kv in one {
            let key = kv.split('=').next().unwrap_or_default().to_string();
            env.retain(|e| e.split('=').next() != Some(key.as_str()));
            env.push(kv);
        }
    }
    process["env"] = serde_json::to_value(&env)?;
    if let Some(w) = &a.workdir {
        process["cwd"] = w.clone().into();
    }
    if let Some(u) = &a.user {
        let (uid, gid) = u.split_once(':').map_or((u.as_str(), None), |(u, g)| (u, Some(g)));
        process["user"]["uid"] = uid.parse::<u32>().context("--user: a numeric uid[:gid]")?.into();
        if let Some(g) = gid {
            process["user"]["gid"] = g.parse::<u32>().context("--user: a numeric uid[:gid]")?.into();
        }
    }
    let path = d.join(format!("exec-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec(&process)?)?;
    let io = if a.detach {
        Io::Detached {
            log: d.join("container.log"),
        }
    } else if a.tty {
        Io::Terminal {
            stdin: a.interactive,
            socket: d.join(format!("exec-{}.sock", std::process::id())),
        }
    } else {
        Io::Inherit { stdin: a.interactive }
    };
    let exit = runtime_of(&r).exec(&a.id, &path, &io);
    let _ = std::fs::remove_file(&path);
    Ok(exit?.code)
}

/// Whether `dir` is the rootfs of a container that is running.
pub fn running_on(id: &str) -> bool {
    load(id).is_ok_and(|r| status(&r, id) != "exited")
}
