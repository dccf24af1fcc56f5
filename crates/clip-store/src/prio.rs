//! Thread priorities: background work (writing the span cache) yields the
//! CPU and the disk to the containers it serves. On a small node, a
//! container's start otherwise shares its cores with cache writes.

/// Lowers the calling thread's CPU priority to `nice` and, with
/// `idle_io`, puts its disk I/O in the idle class. Best effort: a failure
/// leaves the thread as it was.
pub fn background(nice: i32, idle_io: bool) {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
        if idle_io {
            // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << 13)
            const IOPRIO_WHO_PROCESS: libc::c_long = 1;
            const IOPRIO_CLASS_IDLE: libc::c_long = 3;
            let _ = libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                tid as libc::c_long,
                IOPRIO_CLASS_IDLE << 13,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowers_only_the_calling_thread() {
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let inner = std::thread::spawn(|| {
            super::background(19, true);
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        })
        .join()
        .unwrap();
        assert_eq!(inner, 19);
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, before);
    }
}
