//! Passing signals on to a child: the one helper behind `clipctl run`
//! (forwarding to the runtime) and `clip-runtime run` (forwarding to the
//! container's process), as runc does.

use std::time::Duration;

/// The signals a foreground container gets passed on to it.
pub const FORWARDED: [i32; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// A signal set of `signals`.
pub fn set_of(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: plain operations on a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks `set` in the calling thread (and every thread it starts later).
pub fn block(set: &libc::sigset_t) {
    // SAFETY: a valid set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) };
}

/// Waits for the (blocked) signals of `set` and passes each on to `pid`,
/// until `done` says to stop; `done` is asked after every signal and at
/// least every `tick`. SIGCHLD, if in `set`, only wakes the loop (for a
/// `done` that reaps children).
pub fn forward(set: &libc::sigset_t, pid: i32, tick: Duration, done: impl FnMut() -> bool) {
    forward_except(set, pid, tick, done, |_| false)
}

/// [`forward`], but a signal for which `handle` returns true is handled
/// here and not passed on (SIGWINCH, when this process owns the terminal).
pub fn forward_except(
    set: &libc::sigset_t,
    pid: i32,
    tick: Duration,
    mut done: impl FnMut() -> bool,
    mut handle: impl FnMut(i32) -> bool,
) {
    let ts = libc::timespec {
        tv_sec: tick.as_secs() as libc::time_t,
        tv_nsec: tick.subsec_nanos() as libc::c_long,
    };
    while !done() {
        // SAFETY: a valid set of blocked signals; null info is allowed.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        if sig > 0 && sig != libc::SIGCHLD && !handle(sig) {
            // SAFETY: signalling the process we were asked to.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_reach_the_child_and_the_loop_ends_when_told() {
        let set = set_of(&[libc::SIGUSR1]);
        block(&set);
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap 'exit 7' USR1; while true; do sleep 0.05; done"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // The shell sets its trap after it starts: send until it is gone.
        let mut sent = false;
        forward(&set, pid, Duration::from_millis(20), || {
            if !sent {
                std::thread::sleep(Duration::from_millis(200));
                // To this thread, which blocks it: forward passes it on.
                // SAFETY: raise signals the calling thread.
                unsafe { libc::raise(libc::SIGUSR1) };
                sent = true;
            }
            matches!(child.try_wait(), Ok(Some(_)))
        });
        assert_eq!(child.wait().unwrap().code(), Some(7));
    }
}
