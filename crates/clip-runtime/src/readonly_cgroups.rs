//! Read-only cgroup mounts. config.json's cgroup mount (runc's default
//! spec has `/sys/fs/cgroup` with `ro`) must leave the container unable to
//! write its cgroup files; libcontainer bind-mounts each cgroup v1
//! controller read-write whatever the options say. After create, while the
//! container's init waits for start, this remounts every mount at or under
//! that destination read-only from inside its mount namespace, so the
//! user's process never sees them writable.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use libcontainer::container::Container;
use oci_spec::runtime::Spec;

use crate::{io, Error, Result};

/// The destinations of cgroup mounts that config.json asks to be read-only.
pub fn readonly_destinations(spec: &Spec) -> Vec<PathBuf> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| matches!(m.typ().as_deref(), Some("cgroup") | Some("cgroup2")))
        .filter(|m| m.options().iter().flatten().any(|o| o == "ro"))
        .map(|m| m.destination().clone())
        .collect()
}

/// A mount of the container's table: where, and its per-mount flags.
#[derive(Debug, PartialEq, Eq)]
pub struct MountPoint {
    pub path: PathBuf,
    pub flags: libc::c_ulong,
}

/// Mount points at or under one of `dests` that are not read-only yet
/// (paths as the container sees them).
pub fn writable_under(mounts: &[procfs::process::MountInfo], dests: &[PathBuf]) -> Vec<MountPoint> {
    mounts
        .iter()
        .filter(|m| dests.iter().any(|d| m.mount_point.starts_with(d)))
        .filter(|m| !m.mount_options.contains_key("ro"))
        .map(|m| {
            let flags = m
                .mount_options
                .keys()
                .map(|o| match o.as_str() {
                    "nosuid" => libc::MS_NOSUID,
                    "nodev" => libc::MS_NODEV,
                    "noexec" => libc::MS_NOEXEC,
                    "noatime" => libc::MS_NOATIME,
                    "nodiratime" => libc::MS_NODIRATIME,
                    "relatime" => libc::MS_RELATIME,
                    _ => 0,
                })
                .fold(0, |a, b| a | b);
            MountPoint {
                path: m.mount_point.clone(),
                flags,
            }
        })
        .collect()
}

/// Makes the container's cgroup mounts read-only if config.json says so.
pub fn enforce(container: &Container, spec: &Spec) -> Result<()> {
    let dests = readonly_destinations(spec);
    if dests.is_empty() {
        return Ok(());
    }
    let Some(pid) = container.pid() else { return Ok(()) };
    let pid = pid.as_raw();
    let mounts = procfs::process::Process::new(pid)
        .and_then(|p| p.mountinfo())
        .map_err(|e| io("reading the container's mounts")(std::io::Error::other(e)))?;
    let points = writable_under(&mounts.0, &dests);
    if points.is_empty() {
        return Ok(());
    }
    remount_readonly_in(pid, &points)
}

/// Remounts `points` read-only in the mount namespace of `pid`, from a
/// child process (setns needs a single-threaded caller and must not move
/// this process).
fn remount_readonly_in(pid: i32, points: &[MountPoint]) -> Result<()> {
    let ns =
        std::fs::File::open(format!("/proc/{pid}/ns/mnt")).map_err(io("opening the container's mount namespace"))?;
    let paths: Vec<std::ffi::CString> = points
        .iter()
        .map(|p| std::ffi::CString::new(p.path.as_os_str().as_encoded_bytes()).expect("no NUL in mountinfo paths"))
        .collect();
    // SAFETY: fork in a single-threaded process; the child only makes
    // async-signal-safe calls (setns, mount, _exit).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io("fork")(std::io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: see above.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                libc::_exit(2);
            }
            for (p, c) in points.iter().zip(&paths) {
                let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | p.flags;
                if libc::mount(std::ptr::null(), c.as_ptr(), std::ptr::null(), flags, std::ptr::null()) != 0 {
                    libc::_exit(3);
                }
            }
            libc::_exit(0);
        }
    }
    let code = crate::wait(child)?;
    if code != 0 {
        return Err(Error::Io {
            what: format!("making cgroup mounts read-only (step {code})"),
            source: std::io::Error::other("remount failed"),
        });
    }
    tracing::debug!(pid, mounts = points.len(), "cgroup mounts made read-only");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
100 90 0:50 / / rw,relatime - overlay overlay rw
101 100 0:51 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
102 101 0:52 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw
103 102 0:30 /user.slice /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,pids
104 102 0:31 / /sys/fs/cgroup/cpu,cpuacct ro,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu
105 100 0:53 / /sys/fs/cgroupx rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_writable_cgroup_mounts_only() {
        use procfs::FromBufRead;
        let mounts = procfs::process::MountInfos::from_buf_read(INFO.as_bytes()).unwrap();
        let p = writable_under(&mounts.0, &[PathBuf::from("/sys/fs/cgroup")]);
        let paths: Vec<_> = p.iter().map(|m| m.path.display().to_string()).collect();
        assert_eq!(paths, ["/sys/fs/cgroup", "/sys/fs/cgroup/pids"]);
        assert_eq!(
            p[1].flags,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RELATIME
        );
    }
}
