//! Single flight: the first reader of a unit fetches it, later ones wait
//! for that result. A leader that panics or gives up still answers its
//! waiters (with an error) when its guard drops, and every wait is bounded.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub(crate) struct Flight<T: Clone, E: Clone> {
    result: Mutex<Option<Result<T, E>>>,
    done: Condvar,
}

impl<T: Clone, E: Clone> Flight<T, E> {
    /// The leader's result, or None when `timeout` passed first.
    pub(crate) fn wait(&self, timeout: Duration) -> Option<Result<T, E>> {
        let deadline = Instant::now() + timeout;
        let mut r = lock(&self.result);
        loop {
            if let Some(v) = r.as_ref() {
                return Some(v.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            r = self.done.wait_timeout(r, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not wedge every later reader: the data under
    // these locks stays consistent between statements.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Flights<K, T: Clone, E: Clone> {
    map: Mutex<HashMap<K, Arc<Flight<T, E>>>>,
}

pub(crate) enum Claim<'a, K: Hash + Eq + Clone, T: Clone, E: Clone> {
    Leader(Leader<'a, K, T, E>),
    Waiter(Arc<Flight<T, E>>),
}

impl<K: Hash + Eq + Clone, T: Clone, E: Clone> Flights<K, T, E> {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn claim(&self, key: K, abandoned: E) -> Claim<'_, K, T, E> {
        let mut map = lock(&self.map);
        if let Some(f) = map.get(&key) {
            return Claim::Waiter(f.clone());
        }
        let f = Arc::new(Flight {
            result: Mutex::new(None),
            done: Condvar::new(),
        });
        map.insert(key.clone(), f.clone());
        Claim::Leader(Leader {
            flights: self,
            key,
            flight: f,
            abandoned: Some(abandoned),
        })
    }

    /// Claims `key` only if nobody has it.
    pub(crate) fn try_lead(&self, key: K, abandoned: E) -> Option<Leader<'_, K, T, E>> {
        match self.claim(key, abandoned) {
            Claim::Leader(l) => Some(l),
            Claim::Waiter(_) => None,
        }
    }

    #[cfg(test)]
    pub(crate) fn in_flight(&self, key: &K) -> bool {
        lock(&self.map).contains_key(key)
    }

    /// References to `key`'s flight: the map's, the leader's, and one per
    /// waiter (0 when none is in flight).
    pub(crate) fn holders(&self, key: &K) -> usize {
        lock(&self.map).get(key).map_or(0, Arc::strong_count)
    }

    /// Whether a reader waits for `key`'s flight.
    pub(crate) fn awaited(&self, key: &K) -> bool {
        self.holders(key) > 2
    }
}

/// The duty to answer one flight. Dropped without [`Leader::complete`]
/// (a panic, an early return), it answers with the `abandoned` error.
pub(crate) struct Leader<'a, K: Hash + Eq + Clone, T: Clone, E: Clone> {
    flights: &'a Flights<K, T, E>,
    key: K,
    flight: Arc<Flight<T, E>>,
    abandoned: Option<E>,
}

impl<K: Hash + Eq + Clone, T: Clone, E: Clone> Leader<'_, K, T, E> {
    pub(crate) fn key(&self) -> &K {
        &self.key
    }

    pub(crate) fn complete(mut self, r: Result<T, E>) {
        self.finish(r);
        self.abandoned = None;
    }

    fn finish(&mut self, r: Result<T, E>) {
        // Out of the map first: a reader that comes after this looks at
        // the caches (or starts again) instead of joining a finished flight.
        lock(&self.flights.map).remove(&self.key);
        *lock(&self.flight.result) = Some(r);
        self.flight.done.notify_all();
    }
}

impl<K: Hash + Eq + Clone, T: Clone, E: Clone> Drop for Leader<'_, K, T, E> {
    fn drop(&mut self) {
        if let Some(e) = self.abandoned.take() {
            self.finish(Err(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_get_the_leaders_result_or_its_abandonment() {
        let f: Flights<u32, u32, String> = Flights::new();
        let Claim::Leader(l) = f.claim(1, "abandoned".into()) else {
            panic!()
        };
        let Claim::Waiter(w) = f.claim(1, "x".into()) else {
            panic!()
        };
        assert!(w.wait(Duration::from_millis(20)).is_none(), "bounded wait");
        l.complete(Ok(7));
        assert_eq!(w.wait(Duration::from_secs(1)), Some(Ok(7)));
        assert!(!f.in_flight(&1));
        // A leader that panics answers its waiters and frees the key.
        let f = Arc::new(f);
        let f2 = f.clone();
        let Claim::Leader(l) = f.claim(2, "abandoned".into()) else {
            panic!()
        };
        let Claim::Waiter(w) = f.claim(2, "x".into()) else {
            panic!()
        };
        drop(l);
        assert_eq!(w.wait(Duration::from_secs(1)), Some(Err("abandoned".into())));
        let t = std::thread::spawn(move || {
            let Claim::Leader(_l) = f2.claim(3, "it panicked".into()) else {
                panic!()
            };
            panic!("leader panics");
        });
        assert!(t.join().is_err());
        assert!(!f.in_flight(&3), "the next reader can lead");
        assert!(f.try_lead(3, String::new()).is_some());
    }
}
