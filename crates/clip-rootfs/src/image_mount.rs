//! Read-only image mounts, each served by its own process.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clip_fs::mounts;

use crate::{io, Error, Result};

/// State files of the mount at `dir`: (json, log).
fn state_paths(run: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let key: String = digest.iter().take(12).map(|x| format!("{x:02x}")).collect();
    let d = run.join("mounts");
    (d.join(format!("{key}.json")), d.join(format!("{key}.log")))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// When process `pid` started (clock ticks after boot, field 22 of
/// /proc/PID/stat): with the pid, it names one process, never a later
/// process that reused the pid.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count from the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// The server recorded in a mount's state file: (pid, start time).
fn state_server(json: &Path) -> Option<(i32, u64)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).ok()?).ok()?;
    Some((v["pid"].as_i64()? as i32, v["start"].as_u64()?))
}

/// Stops a serving process: it exits by itself once unmounted; one that
/// does not is killed. A pid that now belongs to another process (the
/// server died and the pid was reused) is left alone.
fn stop_server((pid, start): (i32, u64)) {
    let ours = || pid_alive(pid) && start_time(pid) == Some(start);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ours() && Instant::now() < deadline {
        // Reap it if it is our child; harmless otherwise.
        // SAFETY: non-blocking waitpid.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(20));
    }
    if ours() {
        // SAFETY: plain kill of the process we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes a dead mount at `dir` and whatever served it.
fn clean_stale(run: &Path, dir: &Path) -> Result<()> {
    let (json, log) = state_paths(run, dir);
    if mounts::mount_at(dir).is_some_and(|m| mounts::is_clip_mount(&m)) && mounts::is_stale(dir) {
        tracing::info!(dir = %dir.display(), "cleaning up a stale mount");
        io(
            format!("unmounting stale {}", dir.display()),
            mounts::unmount(dir, true),
        )?;
    }
    if let Some(server) = state_server(&json) {
        stop_server(server);
    }
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(log);
    Ok(())
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    if mounts::is_stale(dir) {
        io("resolving the mount point", std::path::absolute(dir))
    } else {
        std::fs::canonicalize(dir).or_else(|_| io("resolving the mount point", std::path::absolute(dir)))
    }
}

/// Mounts an index at `dir` (created if missing), starting its serving
/// process (`server serve --index INDEX DIR`), and returns once the mount
/// answers. Mounting the same index again is a no-op; a stale mount there
/// is cleaned up first.
pub fn mount_image(server: &Path, run: &Path, index: &Path, dir: &Path) -> Result<PathBuf> {
    if !mounts::is_stale(dir) {
        io(format!("creating {}", dir.display()), std::fs::create_dir_all(dir))?;
    }
    let dir = absolute(dir)?;
    let index = io(format!("resolving {}", index.display()), std::fs::canonicalize(index))?;
    let (json, log) = state_paths(run, &dir);
    if mounts::is_stale(&dir) {
        clean_stale(run, &dir)?;
    } else if let Some(m) = mounts::mount_at(&dir) {
        if mounts::is_clip_mount(&m) {
            let same = std::fs::read(&json)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["index"] == index.display().to_string());
            if same {
                return Ok(dir);
            }
            return Err(Error::OtherIndex(dir));
        }
    }
    // Fail early, in this process, on a bad index.
    clip_format::IndexFile::load(&index)?;
    io("creating the run directory", crate::private_dir(&run.join("mounts")))?;
    let logf = io("creating the server log", std::fs::File::create(&log))?;
    let mut cmd = Command::new(server);
    cmd.arg("serve").arg("--index").arg(&index).arg(&dir);
    cmd.stdin(Stdio::null())
        .stdout(io("log", logf.try_clone())?)
        .stderr(logf);
    // SAFETY: setsid is async-signal-safe; the server outlives whoever
    // asked for the mount, in its own session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = io("starting the serving process", cmd.spawn())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if mounts::mount_at(&dir).is_some_and(|m| mounts::is_clip_mount(&m)) && std::fs::metadata(&dir).is_ok() {
            break;
        }
        if let Some(status) = io("waiting for the server", child.try_wait())? {
            let mut text = String::new();
            let _ = std::fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut text));
            let _ = std::fs::remove_file(&log);
            return Err(Error::ServerExited {
                status: status.to_string(),
                log: text.trim().to_string(),
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(Error::Timeout(dir));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id() as i32;
    let state = serde_json::json!({"dir": dir, "pid": pid, "start": start_time(pid), "index": index});
    let tmp = json.with_extension("tmp");
    io("writing mount state", std::fs::write(&tmp, state.to_string()))?;
    io("writing mount state", std::fs::rename(&tmp, &json))?;
    Ok(dir)
}

/// Unmounts a clip mount and stops its server. Idempotent; stale mounts
/// (the server was killed) are cleaned up too.
pub fn unmount_image(run: &Path, dir: &Path) -> Result<()> {
    let dir = absolute(dir)?;
    if mounts::is_stale(&dir) {
        return clean_stale(run, &dir);
    }
    let (json, log) = state_paths(run, &dir);
    if let Some(m) = mounts::mount_at(&dir) {
        if !mounts::is_clip_mount(&m) {
            return Err(Error::NotClip(dir, m.fstype));
        }
        io(format!("unmounting {}", dir.display()), mounts::unmount(&dir, false))?;
    }
    if let Some(server) = state_server(&json) {
        stop_server(server);
    }
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(log);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_is_never_signalled() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let start = start_time(pid).unwrap();
        assert_eq!(start_time(pid), Some(start));
        // The state names this pid but another start time: another process.
        stop_server((pid, start + 1));
        assert!(child.try_wait().unwrap().is_none(), "left alone");
        stop_server((pid, start));
        assert!(child.wait().is_ok());
        // Spaces and parentheses in the command name do not confuse it.
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
    }
}
