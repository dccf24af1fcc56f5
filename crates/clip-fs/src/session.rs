//! Serving a FUSE connection: a fresh one (after `Mounter::mount_fuse`,
//! the kernel's INIT is answered here) or one another process already
//! initialized and handed over (a daemon restart or upgrade).
//!
//! Every thread reads the same descriptor (no `FUSE_DEV_IOC_CLONE`): the
//! requests a crashed server had read stay queued on that one device,
//! which the supervisor keeps open, and [`notify_resend`] puts them back
//! in front of the next server.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{ClipFs, ImageView};

/// A connection being served, on its own threads.
pub struct Served {
    pub thread: JoinHandle<std::io::Result<()>>,
    /// A duplicate of the connection's descriptor (for notifications and
    /// for handing it over).
    pub fd: OwnedFd,
}

fn config(threads: usize) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.acl = fuser::SessionACL::All;
    c.n_threads = Some(threads.max(1));
    // One device for all threads: see the module's doc.
    c.clone_fd = false;
    c
}

/// Serves `fd` with `view` on `threads` threads. `initialized`: the
/// connection's INIT was answered before (by an earlier server).
pub fn serve_fd(view: Arc<ImageView>, fd: OwnedFd, initialized: bool, threads: usize) -> std::io::Result<Served> {
    let dup = fd.try_clone()?;
    let fs = ClipFs::new(view);
    let session = if initialized {
        fuser::Session::from_initialized_fd(fs, fd, fuser::SessionACL::All, config(threads))
    } else {
        fuser::Session::from_fd(fs, fd, fuser::SessionACL::All, config(threads))?
    };
    let thread = std::thread::Builder::new()
        .name("clip-fuse".into())
        .spawn(move || session.run())?;
    Ok(Served { thread, fd: dup })
}

/// `FUSE_NOTIFY_RESEND` (Linux 6.9): the kernel puts every request that a
/// server read but did not answer back in the queue, for this server to
/// read again. Sent once a new server reads the connection.
pub fn notify_resend(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&16u32.to_le_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    // SAFETY: a 16-byte buffer we own, written to a descriptor we hold.
    let n = unsafe { libc::write(fd.as_fd().as_raw_fd(), header.as_ptr().cast(), header.len()) };
    if n == 16 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
