//! When did the container's process exec? The kernel's process events
//! connector (netlink, root only) reports every exec on the host with a
//! CLOCK_MONOTONIC timestamp; the runtime's pid file names the container's
//! init process. Its first exec after the pid file appears is the user's
//! process starting (runc and crun write the pid file while the init is
//! still the runtime's own code).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;

/// Nanoseconds of CLOCK_MONOTONIC, the clock of the connector's timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A subscription to exec events.
pub struct ExecWatch {
    fd: OwnedFd,
}

impl ExecWatch {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket calls on a descriptor we then own.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_CONNECTOR,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl is valid; we fill the fields we need.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: sending a buffer we own.
        let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: setting a receive timeout from a valid timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Self { fd })
    }

    /// Exec events in one datagram: (pid, monotonic ns). None on timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<Vec<(i32, u64)>> {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return None;
        }
        Some(parse(&buf[..n as usize]))
    }

    /// Waits (on a thread) for the first exec, after the runtime wrote
    /// `pid_file`, of the process it names; gives up when `stop` is set.
    /// Returns the exec's CLOCK_MONOTONIC time in nanoseconds.
    pub fn first_exec(
        self,
        pid_file: PathBuf,
        stop: Arc<AtomicBool>,
        then: Option<Box<dyn FnOnce(u64) + Send>>,
    ) -> std::thread::JoinHandle<Option<u64>> {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            let mut seen: HashMap<i32, Vec<u64>> = HashMap::new();
            let mut target: Option<(i32, u64)> = None;
            while !stop.load(Ordering::Relaxed) {
                if let Some(events) = self.recv(&mut buf) {
                    for (p, t) in events {
                        seen.entry(p).or_default().push(t);
                    }
                }
                if target.is_none() {
                    target = pid_written(&pid_file);
                }
                if let Some((pid, written)) = target {
                    // An exec before the pid file was the runtime's own
                    // (runc, crun and libcontainer clone the init, so there
                    // is none; a runtime that execs a helper would have one).
                    if let Some(t) = seen.get(&pid).and_then(|v| v.iter().find(|t| **t >= written)) {
                        if let Some(f) = then {
                            f(*t);
                        }
                        return Some(*t);
                    }
                }
            }
            None
        })
    }
}

/// The pid in `path` and (about) when it was written, in CLOCK_MONOTONIC ns.
fn pid_written(path: &std::path::Path) -> Option<(i32, u64)> {
    let pid = std::fs::read_to_string(path).ok()?.trim().parse::<i32>().ok()?;
    let mtime = std::fs::metadata(path).ok()?.modified().ok()?;
    let age = std::time::SystemTime::now().duration_since(mtime).unwrap_or_default();
    // File times come from a coarse clock (a jiffy behind): allow for it.
    const SLACK: u64 = 20_000_000;
    Some((pid, monotonic_ns().saturating_sub(age.as_nanos() as u64 + SLACK)))
}

/// Exec events of a netlink datagram (possibly several messages).
fn parse(mut b: &[u8]) -> Vec<(i32, u64)> {
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
    };
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32_at(b, 0).unwrap_or(0) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            break;
        }
        let msg = &b[..len];
        let ev = NLMSG_HDRLEN + CN_MSG_LEN;
        if u32_at(msg, NLMSG_HDRLEN) == Some(CN_IDX_PROC) && u32_at(msg, ev) == Some(PROC_EVENT_EXEC) {
            let ts = msg
                .get(ev + 8..ev + 16)
                .map(|s| u64::from_ne_bytes(s.try_into().expect("8 bytes")));
            if let (Some(ts), Some(pid)) = (ts, u32_at(msg, ev + 16)) {
                out.push((pid as i32, ts));
            }
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_child_exec() {
        let Ok(w) = ExecWatch::open() else {
            // Needs root (CAP_NET_ADMIN); the tests run as root.
            panic!("cannot subscribe to process events; run the tests as root");
        };
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let stop = Arc::new(AtomicBool::new(false));
        let before = monotonic_ns();
        let h = w.first_exec(pid_file.clone(), stop.clone(), None);
        // A shell (exec'd well before) writes its pid, waits, then execs.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sleep 0.1; echo $$ > {}; sleep 0.2; exec sleep 0",
                pid_file.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        let t = h.join().unwrap().expect("exec seen");
        stop.store(true, Ordering::Relaxed);
        let after = monotonic_ns();
        assert!(t > before + 250_000_000 && t < after, "{before} {t} {after}");
    }
}
