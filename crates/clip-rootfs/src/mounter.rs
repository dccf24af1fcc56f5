//! The kernel calls clip makes, behind a trait: [`Kernel`] makes them,
//! [`Recording`] only records them (and fails on demand), so that mount
//! ordering and cleanup after failures are unit tests that run without
//! root.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A mount, as the mount table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    /// clip's FUSE mounts are `fuse.clip` (or plain `fuse` with source
    /// `clip` when mounted without a subtype).
    pub fn is_clip(&self) -> bool {
        self.fstype == "fuse.clip" || (self.fstype == "fuse" && self.source == "clip")
    }
}

pub trait Mounter: Send + Sync {
    /// Opens `/dev/fuse` and mounts a read-only clip filesystem on it at
    /// `target` (`nosuid`, `nodev`, `allow_other`, `default_permissions`);
    /// returns the connection's descriptor, to be served.
    fn mount_fuse(&self, target: &Path) -> io::Result<OwnedFd>;
    /// Kernel overlayfs: `lower` read-only, `upper` and `work` on disk.
    fn mount_overlay(&self, lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()>;
    /// The same with `fuse-overlayfs`, where the kernel's is missing.
    fn fuse_overlayfs(&self, lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()>;
    /// Unmounts `target`; `lazy` detaches it even while busy.
    fn unmount(&self, target: &Path, lazy: bool) -> io::Result<()>;
    /// The topmost mount at `target`, if any.
    fn mount_at(&self, target: &Path) -> Option<MountEntry>;
    /// A FUSE mount whose server is gone: every access fails with
    /// ENOTCONN or ECONNABORTED.
    fn is_stale(&self, target: &Path) -> bool;
    /// Whether kernel overlayfs is available.
    fn kernel_overlay(&self) -> bool;
}

/// Mount points in /proc/self/mountinfo are octal-escaped.
fn escape(p: &Path) -> String {
    let mut s = String::new();
    for c in p.to_string_lossy().chars() {
        match c {
            ' ' => s.push_str("\\040"),
            '\t' => s.push_str("\\011"),
            '\n' => s.push_str("\\012"),
            '\\' => s.push_str("\\134"),
            c => s.push(c),
        }
    }
    s
}

fn cstr(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kernel;

impl Mounter for Kernel {
    fn mount_fuse(&self, target: &Path) -> io::Result<OwnedFd> {
        use nix::mount::MsFlags;
        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?
            .into();
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        );
        nix::mount::mount(
            Some("clip"),
            target,
            Some("fuse.clip"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )?;
        Ok(fd)
    }

    fn mount_overlay(&self, lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
        // index=off and metacopy=off: no hardlink index or metadata-only
        // copy-ups tying the upper dir to this exact lower mount.
        let data = format!(
            "lowerdir={},upperdir={},workdir={},index=off,metacopy=off",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::MS_NODEV,
            Some(data.as_str()),
        )?;
        Ok(())
    }

    fn fuse_overlayfs(&self, lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
        let out = std::process::Command::new("fuse-overlayfs")
            .arg("-o")
            .arg(format!(
                "lowerdir={},upperdir={},workdir={},allow_other,nodev",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(target)
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "fuse-overlayfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn unmount(&self, target: &Path, lazy: bool) -> io::Result<()> {
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        nix::mount::umount2(target, flags)?;
        Ok(())
    }

    fn mount_at(&self, target: &Path) -> Option<MountEntry> {
        let want = escape(target);
        let infos = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
        infos
            .into_iter()
            .rev()
            .find(|m| m.mount_point.to_string_lossy() == want)
            .map(|m| MountEntry {
                mount_point: target.to_path_buf(),
                fstype: m.fs_type,
                source: m.mount_source.unwrap_or_default(),
            })
    }

    fn is_stale(&self, target: &Path) -> bool {
        let Ok(c) = cstr(target) else { return false };
        // statfs always reaches the server (a stat may be answered from
        // the kernel's cache).
        // SAFETY: valid path and out pointer.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        r != 0
            && matches!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::ENOTCONN | libc::ECONNABORTED)
            )
    }

    fn kernel_overlay(&self) -> bool {
        std::fs::read_to_string("/proc/filesystems")
            .is_ok_and(|s| s.lines().any(|l| l.trim_end().ends_with("\toverlay")))
            || std::process::Command::new("modprobe")
                .arg("overlay")
                .status()
                .is_ok_and(|s| s.success())
    }
}

/// One call a [`Recording`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    MountFuse(PathBuf),
    MountOverlay { lower: PathBuf, target: PathBuf },
    FuseOverlayfs { lower: PathBuf, target: PathBuf },
    Unmount { target: PathBuf, lazy: bool },
}

/// A fake that records calls, keeps its own mount table, and fails the
/// calls it is told to (by name: `mount_fuse`, `mount_overlay`,
/// `fuse_overlayfs`, `unmount`).
#[derive(Debug, Default)]
pub struct Recording {
    pub calls: Mutex<Vec<Call>>,
    pub fail: Mutex<HashSet<&'static str>>,
    mounted: Mutex<HashMap<PathBuf, MountEntry>>,
    pub no_kernel_overlay: bool,
}

impl Recording {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call(&self, name: &'static str, c: Call) -> io::Result<()> {
        Self::lock(&self.calls).push(c);
        if Self::lock(&self.fail).contains(name) {
            return Err(io::Error::other(format!("{name} failed (as told)")));
        }
        Ok(())
    }

    fn add(&self, target: &Path, fstype: &str, source: &str) {
        Self::lock(&self.mounted).insert(
            target.to_path_buf(),
            MountEntry {
                mount_point: target.to_path_buf(),
                fstype: fstype.into(),
                source: source.into(),
            },
        );
    }

    /// A host without kernel overlayfs.
    pub fn without_kernel_overlay() -> Self {
        Self {
            no_kernel_overlay: true,
            ..Self::default()
        }
    }

    pub fn recorded(&self) -> Vec<Call> {
        Self::lock(&self.calls).clone()
    }

    pub fn mounted(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = Self::lock(&self.mounted).keys().cloned().collect();
        v.sort();
        v
    }
}

impl Mounter for Recording {
    fn mount_fuse(&self, target: &Path) -> io::Result<OwnedFd> {
        self.call("mount_fuse", Call::MountFuse(target.into()))?;
        self.add(target, "fuse.clip", "clip");
        Ok(std::fs::File::open("/dev/null")?.into())
    }

    fn mount_overlay(&self, lower: &Path, _: &Path, _: &Path, target: &Path) -> io::Result<()> {
        self.call(
            "mount_overlay",
            Call::MountOverlay {
                lower: lower.into(),
                target: target.into(),
            },
        )?;
        self.add(target, "overlay", "overlay");
        Ok(())
    }

    fn fuse_overlayfs(&self, lower: &Path, _: &Path, _: &Path, target: &Path) -> io::Result<()> {
        self.call(
            "fuse_overlayfs",
            Call::FuseOverlayfs {
                lower: lower.into(),
                target: target.into(),
            },
        )?;
        self.add(target, "fuse.fuse-overlayfs", "fuse-overlayfs");
        Ok(())
    }

    fn unmount(&self, target: &Path, lazy: bool) -> io::Result<()> {
        self.call(
            "unmount",
            Call::Unmount {
                target: target.into(),
                lazy,
            },
        )?;
        if Self::lock(&self.mounted).remove(target).is_none() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn mount_at(&self, target: &Path) -> Option<MountEntry> {
        Self::lock(&self.mounted).get(target).cloned()
    }

    fn is_stale(&self, _: &Path) -> bool {
        false
    }

    fn kernel_overlay(&self) -> bool {
        !self.no_kernel_overlay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_reads_the_mount_table() {
        let k = Kernel;
        let proc = k.mount_at(Path::new("/proc")).expect("/proc is mounted");
        assert_eq!(proc.fstype, "proc");
        assert!(k.mount_at(Path::new("/no/such/mount")).is_none());
        assert_eq!(escape(Path::new("/a b\\c")), "/a\\040b\\134c");
    }
}
