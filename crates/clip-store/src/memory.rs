//! The memory tier: decompressed units, least recently used out first,
//! under one bound for the whole host.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

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

    pub(crate) fn contains(&self, id: &UnitId) -> bool {
        lock(&self.inner).map.contains_key(id)
    }

    pub(crate) fn put(&self, id: UnitId, v: Arc<Vec<u8>>) {
        if v.len() > self.max {
            return;
        }
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        if inner.map.contains_key(&id) {
            return;
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
        assert!(m.contains(&id(1)) && m.contains(&id(3)));
        assert!(!m.contains(&id(2)), "least recently used");
        assert!(m.bytes() <= 250);
        m.put(id(4), Arc::new(vec![4; 1000]));
        assert!(!m.contains(&id(4)), "larger than the bound");
    }
}
