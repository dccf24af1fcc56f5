//! Mount-table helpers: find clip mounts, tell a live one from a stale one
//! (its server is gone: every access fails with `ENOTCONN`), unmount.

use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: fields.get(sep + 1)?.to_string(),
                source: fields.get(sep + 2).map_or(String::new(), |s| unescape(s)),
            })
        })
        .collect()
}

pub fn mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The topmost mount at `dir`, if any.
pub fn mount_at(dir: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == dir)
}

/// clip mounts are `fuse.clip`, or plain `fuse` with source `clip` when
/// mounted without a subtype.
pub fn is_clip_mount(m: &MountEntry) -> bool {
    m.fstype == "fuse.clip" || (m.fstype == "fuse" && m.source == "clip")
}

/// A FUSE mount whose server died answers with ENOTCONN (or ECONNABORTED). `statfs` always
/// reaches the server (a `stat` may be answered from the kernel's cache).
pub fn is_stale(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: valid path and out pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // ECONNABORTED is what requests caught by the connection's abort get.
    r != 0
        && matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        )
}

/// Unmounts `dir`; `lazy` detaches it even while busy (for stale mounts).
pub fn unmount(dir: &Path, lazy: bool) -> std::io::Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    100 29 0:50 / /var/lib/x rw,nosuid,nodev,relatime shared:9 - fuse.clip clip ro,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].fstype, "fuse.clip");
        assert!(is_clip_mount(&m[1]));
        assert!(mount_at(Path::new("/proc")).is_some());
    }
}
