//! The writable layer: kernel overlayfs, or fuse-overlayfs.

use std::path::Path;
use std::process::Command;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// Kernel overlayfs where available, else fuse-overlayfs.
    Auto,
    Kernel,
    Fuse,
}

impl OverlayKind {
    pub fn name(self) -> &'static str {
        match self {
            OverlayKind::Auto => "auto",
            OverlayKind::Kernel => "overlay",
            OverlayKind::Fuse => "fuse-overlayfs",
        }
    }
}

pub fn kernel_overlay_available() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| s.lines().any(|l| l.trim_end().ends_with("\toverlay")))
        || Command::new("modprobe")
            .arg("overlay")
            .status()
            .is_ok_and(|s| s.success())
}

/// Mounts `lower` (read-only) + `upper`/`work` at `target`; returns the
/// kind used.
pub(crate) fn mount(lower: &Path, upper: &Path, work: &Path, target: &Path, kind: OverlayKind) -> Result<OverlayKind> {
    let kind = match kind {
        OverlayKind::Auto if kernel_overlay_available() => OverlayKind::Kernel,
        OverlayKind::Auto => OverlayKind::Fuse,
        k => k,
    };
    for p in [lower, upper, work] {
        if p.to_string_lossy().contains([',', ':']) {
            return Err(Error::Overlay(format!(
                "{} has a ',' or ':' that overlay options cannot carry",
                p.display()
            )));
        }
    }
    match kind {
        OverlayKind::Kernel => {
            // index=off and metacopy=off: no hardlink index or metadata-only
            // copy-ups tying the upper dir to this exact lower mount.
            let opts = format!(
                "lowerdir={},upperdir={},workdir={},index=off,metacopy=off",
                lower.display(),
                upper.display(),
                work.display()
            );
            let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
            let (src, tgt, fs, data) = (c("overlay"), c(&target.to_string_lossy()), c("overlay"), c(&opts));
            // SAFETY: valid NUL-terminated strings.
            let r = unsafe {
                libc::mount(
                    src.as_ptr(),
                    tgt.as_ptr(),
                    fs.as_ptr(),
                    libc::MS_NODEV,
                    data.as_ptr().cast(),
                )
            };
            if r != 0 {
                return Err(Error::Overlay(format!("mount: {}", std::io::Error::last_os_error())));
            }
        }
        _ => {
            let out = Command::new("fuse-overlayfs")
                .arg("-o")
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={},allow_other,nodev",
                    lower.display(),
                    upper.display(),
                    work.display()
                ))
                .arg(target)
                .output()
                .map_err(|e| Error::Overlay(format!("fuse-overlayfs: {e}")))?;
            if !out.status.success() {
                return Err(Error::Overlay(format!(
                    "fuse-overlayfs: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
    }
    Ok(kind)
}
