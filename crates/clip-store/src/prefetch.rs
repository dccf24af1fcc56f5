//! The prefetch queue: two lanes (a recorded profile's replay first, then
//! read-ahead), in order within each, served by worker threads. A unit is
//! queued once; a worker coalescing neighbours takes them out of the queue
//! wherever they wait in it.

use std::collections::{HashSet, VecDeque};
use std::sync::{Condvar, Mutex, Weak};
use std::time::Duration;

use crate::flight::lock;
use crate::{LayerRef, LayerStore, UnitId};

/// What a prefetch is for, in the order workers serve them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A recorded profile replayed at mount.
    Replay = 0,
    /// Guessed from what is being read.
    Readahead = 1,
}

#[derive(Default)]
struct State {
    lanes: [VecDeque<(LayerRef, usize)>; 2],
    queued: HashSet<(UnitId, usize)>,
}

#[derive(Default)]
pub(crate) struct Queue {
    st: Mutex<State>,
    cv: Condvar,
}

impl Queue {
    pub(crate) fn push(&self, items: impl Iterator<Item = (LayerRef, usize)>, priority: Priority) {
        let mut st = lock(&self.st);
        let mut added = false;
        for (layer, u) in items {
            if st.queued.insert((layer.layout.key, u)) {
                st.lanes[priority as usize].push_back((layer, u));
                added = true;
            }
        }
        if added {
            self.cv.notify_all();
        }
    }

    /// Takes unit `u` of layout `key` out of the queue; whether it was in.
    pub(crate) fn take(&self, key: &UnitId, u: usize) -> bool {
        lock(&self.st).queued.remove(&(*key, u))
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.st).queued.len()
    }

    fn pop(&self, timeout: Duration) -> Option<(LayerRef, usize)> {
        let mut st = lock(&self.st);
        loop {
            for lane in 0..2 {
                while let Some((layer, u)) = st.lanes[lane].pop_front() {
                    // Entries taken by a coalescing worker are stale.
                    if st.queued.remove(&(layer.layout.key, u)) {
                        return Some((layer, u));
                    }
                }
            }
            let (g, t) = self.cv.wait_timeout(st, timeout).unwrap_or_else(|p| p.into_inner());
            st = g;
            if t.timed_out() {
                return None;
            }
        }
    }
}

/// A prefetch worker: runs until the store is gone.
pub(crate) fn worker(store: Weak<LayerStore>) {
    loop {
        let Some(s) = store.upgrade() else { return };
        let Some((layer, u)) = s.queue.pop(Duration::from_secs(1)) else {
            continue;
        };
        // One job's panic must not end the worker.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.prefetch_one(&layer, u)));
        if r.is_err() {
            tracing::error!(layer = %layer.layout.desc.digest, unit = u, "a prefetch panicked");
        }
    }
}
