//! The memory tier: decompressed units (or their first bytes, see
//! `DiskCache`), least recently used out first, under one bound for the
//! whole host.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::flight::lock;
use crate::UnitId;

struct Inner {
    map: HashMap<UnitId, (Arc<Vec<u8>>, u64)>,
    order: BTreeMap<u64, UnitId>,
    tick: u64,
    bytes: usize,
}

pub(crate) struct MemCache {
    inner: Mutex<Inner>,
    /// Signalled whenever a unit (or a longer prefix) comes in.
    arrived: Condvar,
    max: usize,
}

impl MemCache {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                bytes: 0,
            }),
            arrived: Condvar::new(),
            max,
        }
    }

    pub(crate) fn get(&self, id: &UnitId) -> Option<Arc<Vec<u8>>> {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let (v, t) = inner.map.get_mut(id)?;
        inner.order.remove(t);
        inner.tick += 1;
        *t = inner.tick;
        inner.order.insert(inner.tick, *id);
        Some(v.clone())
    }

    /// Whether at least the first `need` bytes of unit `id` are here.
    pub(crate) fn contains(&self, id: &UnitId, need: u64) -> bool {
        lock(&self.inner)
            .map
            .get(id)
            .is_some_and(|(v, _)| v.len() as u64 >= need)
    }

    pub(crate) fn put(&self, id: UnitId, v: Arc<Vec<u8>>) {
        if v.len() > self.max {
            return;
        }
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        // A longer prefix (or the whole unit) replaces a shorter one.
        match inner.map.get(&id) {
            Some((old, _)) if old.len() >= v.len() => return,
            Some(_) => {
                let (old, t) = inner.map.remove(&id).expect("present");
                inner.order.remove(&t);
                inner.bytes -= old.len();
            }
            None => {}
        }
        inner.tick += 1;
        inner.bytes += v.len();
        inner.map.insert(id, (v, inner.tick));
        inner.order.insert(inner.tick, id);
        while inner.bytes > self.max {
            let Some((_, old)) = inner.order.pop_first() else { break };
            if let Some((v, _)) = inner.map.remove(&old) {
                inner.bytes -= v.len();
            }
        }
        drop(g);
        self.arrived.notify_all();
    }

    /// Waits up to `timeout` for at least the first `need` bytes of unit
    /// `id` to come in; whether they are here.
    pub(crate) fn wait_for(&self, id: &UnitId, need: u64, timeout: Duration) -> bool {
        let here = |i: &Inner| i.map.get(id).is_some_and(|(v, _)| v.len() as u64 >= need);
        let g = lock(&self.inner);
        if here(&g) {
            return true;
        }
        let (g, _) = self
            .arrived
            .wait_timeout_while(g, timeout, |i| !here(i))
            .unwrap_or_else(|p| p.into_inner());
        here(&g)
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first_within_the_bound() {
        let m = MemCache::new(250);
        let id = |b: u8| [b; 32];
        m.put(id(1), Arc::new(vec![1; 100]));
        m.put(id(2), Arc::new(vec![2; 100]));
        assert!(m.get(&id(1)).is_some());
        m.put(id(3), Arc::new(vec![3; 100]));
        assert!(m.contains(&id(1), 100) && m.contains(&id(3), 100));
        assert!(!m.contains(&id(2), 1), "least recently used");
        assert!(m.bytes() <= 250);
        m.put(id(4), Arc::new(vec![4; 1000]));
        assert!(!m.contains(&id(4), 1), "larger than the bound");
        // A longer prefix replaces a shorter one, never the reverse.
        m.put(id(5), Arc::new(vec![5; 10]));
        m.put(id(5), Arc::new(vec![5; 50]));
        m.put(id(5), Arc::new(vec![5; 20]));
        assert_eq!(m.get(&id(5)).unwrap().len(), 50);
        assert!(m.contains(&id(5), 50) && !m.contains(&id(5), 51));
        assert!(m.bytes() <= 250);
    }
}
