//! Messages between the supervisor and the worker, over a SEQPACKET
//! socket pair: one JSON document per packet, and with it, when it is
//! about a mount, that mount's `/dev/fuse` descriptor (`SCM_RIGHTS`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// What the supervisor keeps of a mount besides its descriptor: enough for
/// a new worker to serve it again. Credentials stay in memory, never on
/// disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    pub dir: std::path::PathBuf,
    pub index: std::path::PathBuf,
    /// The image reference the index names (where its blobs come from).
    pub reference: String,
    /// The image mount key, for mounts shared by containers.
    pub key: Option<String>,
    #[serde(default)]
    pub creds: std::collections::BTreeMap<String, clip_api::Credential>,
    /// The first container's command, for a guessed start when the image
    /// has no profile; None for a mount with no container (not handed
    /// over: only a fresh mount uses it).
    #[serde(skip)]
    pub command: Option<clip_api::Command>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Msg {
    /// Worker: keep this mount's descriptor (sent with it).
    Hold {
        id: String,
        record: MountRecord,
    },
    /// Worker: forget this mount.
    Release {
        id: String,
    },
    /// Worker: send me every mount you hold.
    List,
    /// Supervisor: one held mount (with its descriptor).
    Item {
        id: String,
        record: MountRecord,
    },
    /// Supervisor: end of a list.
    End,
    /// Worker: hand everything over to this binary.
    Upgrade {
        binary: std::path::PathBuf,
    },
    /// Worker: everything is unmounted; do not restart me.
    Shutdown,
    /// Supervisor: done.
    Ok,
    Error {
        message: String,
    },
}

const MAX: usize = 1 << 20;

pub fn send(sock: RawFd, msg: &Msg, fd: Option<RawFd>) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg)?;
    let iov = [IoSlice::new(&body)];
    let fds;
    let cmsgs: Vec<ControlMessage> = match fd {
        Some(f) => {
            fds = [f];
            vec![ControlMessage::ScmRights(&fds)]
        }
        None => Vec::new(),
    };
    sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// The next message and its descriptor, if one came with it; None when
/// the other side is gone.
pub fn recv(sock: RawFd) -> std::io::Result<Option<(Msg, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let m = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for c in m.cmsgs()? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        (m.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    let msg: Msg =
        serde_json::from_slice(&buf[..n]).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fds.into_iter().next())))
}

/// A connected SEQPACKET pair: (supervisor's end, worker's end).
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Lets `fd` survive an exec (for the worker's inherited descriptors and
/// the supervisor's own re-exec on upgrade).
pub fn keep_across_exec(fd: &impl AsRawFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: a descriptor we hold.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    fcntl(b, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_travels_with_its_message() {
        let (a, b) = pair().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let rec = MountRecord {
            dir: "/mnt".into(),
            index: "/i.clip".into(),
            reference: "r/x:y".into(),
            key: None,
            creds: Default::default(),
            command: None,
        };
        send(
            a.as_raw_fd(),
            &Msg::Hold {
                id: "m".into(),
                record: rec,
            },
            Some(f.as_raw_fd()),
        )
        .unwrap();
        let (msg, fd) = recv(b.as_raw_fd()).unwrap().unwrap();
        assert!(matches!(msg, Msg::Hold { ref id, .. } if id == "m"));
        let fd = fd.unwrap();
        let got = std::fs::read_to_string(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(got.contains("Pid:"));
        send(a.as_raw_fd(), &Msg::End, None).unwrap();
        assert!(matches!(recv(b.as_raw_fd()).unwrap(), Some((Msg::End, None))));
        drop(a);
        assert!(recv(b.as_raw_fd()).unwrap().is_none(), "the other side is gone");
    }
}
