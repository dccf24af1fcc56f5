//! The prefetch queue: two lanes (a recorded profile's replay first, then
//! read-ahead), in order within each, served by worker threads. A unit is
//! queued once, with the most of its first bytes any push needs and wants
//! (see `LayerStore::prefetch_prefixes`). A worker takes a unit with the queued spans around it, in
//! one step ([`Queue::pop_run`]), wherever they wait in the queue: workers
//! popping side by side would otherwise split a run of neighbours into a
//! request each.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, Weak};
use std::time::Duration;

use crate::flight::lock;
use crate::{LayerRef, LayerStore, UnitId, Want};

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
    /// Each queued unit's `(need, upto)`.
    queued: HashMap<(UnitId, usize), (u64, u64)>,
    /// Runs taken off the queue whose jobs have not ended: their units
    /// are neither queued nor yet (or any more) in flight.
    in_hand: usize,
}

#[derive(Default)]
pub(crate) struct Queue {
    st: Mutex<State>,
    cv: Condvar,
}

impl Queue {
    /// Queues `(layer, unit, need, upto)`. A unit queued already keeps its
    /// place and `upto`, raised to this `need` at most: a read-ahead that
    /// needs less than a replay's prefix does not make it whole.
    pub(crate) fn push(&self, items: impl Iterator<Item = (LayerRef, usize, u64, u64)>, priority: Priority) {
        let mut st = lock(&self.st);
        let mut added = false;
        for (layer, u, need, upto) in items {
            match st.queued.entry((layer.layout.key, u)) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let (n, up) = e.get_mut();
                    *n = (*n).max(need);
                    *up = (*up).max(need);
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert((need, upto));
                    st.lanes[priority as usize].push_back((layer, u));
                    added = true;
                }
            }
        }
        if added {
            self.cv.notify_all();
        }
    }

    /// Whether unit `u` of the layout `key` waits in the queue.
    pub(crate) fn contains(&self, key: UnitId, u: usize) -> bool {
        lock(&self.st).queued.contains_key(&(key, u))
    }

    /// Whether a run taken off the queue is still being worked on.
    pub(crate) fn in_hand(&self) -> bool {
        lock(&self.st).in_hand > 0
    }

    /// Whether a replay waits in the queue.
    pub(crate) fn replay_queued(&self) -> bool {
        !lock(&self.st).lanes[Priority::Replay as usize].is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.st).queued.len()
    }

    /// The next queued unit and the queued units of the spans around it, to
    /// fetch with one request: up to `max_bytes` compressed from the first
    /// span's start, across gaps of spans nobody queued of at most
    /// `max_gap` compressed bytes (fetched and skipped: a request costs
    /// the registry more than a few hundred kilobytes). Units of spans read
    /// as streams go alone.
    pub(crate) fn pop_run(
        &self,
        timeout: Duration,
        max_bytes: u64,
        max_gap: u64,
    ) -> Option<(LayerRef, Vec<Want>, Priority)> {
        let mut st = lock(&self.st);
        loop {
            for (lane, prio) in [(0, Priority::Replay), (1, Priority::Readahead)] {
                while let Some((layer, u)) = st.lanes[lane].pop_front() {
                    // Entries taken into another's run are stale.
                    let Some((need, upto)) = st.queued.remove(&(layer.layout.key, u)) else {
                        continue;
                    };
                    let l = &layer.layout;
                    let mut run = vec![(u, need, upto)];
                    let k0 = l.units[u].span;
                    if l.spans[k0].streamed || l.spans[k0].units.start != u {
                        st.in_hand += 1;
                        return Some((layer, run, prio));
                    }
                    // Backwards first (what was queued behind it sits
                    // before it in the layer as often as after), then on.
                    // Neighbouring gzip spans may share a byte: no gap.
                    let mut first = k0;
                    for k in (0..k0).rev() {
                        let s = &l.spans[k];
                        if s.streamed
                            || l.spans[k0].comp.1 - s.comp.0 > max_bytes
                            || l.spans[first].comp.0.saturating_sub(s.comp.1) > max_gap
                        {
                            break;
                        }
                        if let Some((need, upto)) = st.queued.remove(&(l.key, s.units.start)) {
                            run.insert(0, (s.units.start, need, upto));
                            first = k;
                        }
                    }
                    let start = l.spans[first].comp.0;
                    let mut last = k0;
                    for (k, s) in l.spans.iter().enumerate().skip(k0 + 1) {
                        if s.streamed
                            || s.comp.1 - start > max_bytes
                            || s.comp.0.saturating_sub(l.spans[last].comp.1) > max_gap
                        {
                            break;
                        }
                        if let Some((need, upto)) = st.queued.remove(&(l.key, s.units.start)) {
                            run.push((s.units.start, need, upto));
                            last = k;
                        }
                    }
                    st.in_hand += 1;
                    return Some((layer, run, prio));
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
        let (max, gap) = (s.options().coalesce_bytes, s.options().coalesce_gap);
        let Some((layer, run, prio)) = s.queue.pop_run(Duration::from_secs(1), max, gap) else {
            continue;
        };
        // One job's panic must not end the worker.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.prefetch_run(&layer, &run, prio)));
        lock(&s.queue.st).in_hand -= 1;
        if r.is_err() {
            tracing::error!(layer = %layer.layout.desc.digest, units = ?run, "a prefetch panicked");
        }
    }
}
