//! The peer lease cache: turns store snapshots and changes into Added/Removed events for the
//! backends, with our own lease filtered out.

use std::collections::BTreeMap;

use crate::lease::{Lease, SubnetKey};

/// A change in the set of peer leases.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// A peer lease appeared or its attributes changed (backends replace what they had).
    Added(Lease),
    /// A peer lease is gone; carries the attributes it last had.
    Removed(Lease),
}

/// The peers known to this host.
#[derive(Debug, Default)]
pub struct LeaseCache {
    own: Option<SubnetKey>,
    peers: BTreeMap<SubnetKey, Lease>,
}

impl LeaseCache {
    /// An empty cache that will ignore `own`.
    pub fn new(own: Option<SubnetKey>) -> Self {
        LeaseCache { own, peers: BTreeMap::new() }
    }

    /// Replaces the whole set (initial list, or a re-list after the store compacted its
    /// history) and returns the difference. Unlike flannel, a lease whose attributes changed
    /// while we were not watching is re-announced, so a new VTEP MAC is not missed.
    pub fn replace_all(&mut self, leases: impl IntoIterator<Item = Lease>) -> Vec<LeaseEvent> {
        let mut next = BTreeMap::new();
        for l in leases {
            if Some(l.key) != self.own {
                next.insert(l.key, l);
            }
        }
        let mut events = Vec::new();
        for (k, old) in &self.peers {
            if !next.contains_key(k) {
                events.push(LeaseEvent::Removed(old.clone()));
            }
        }
        for (k, new) in &next {
            match self.peers.get(k) {
                Some(old) if old.attrs == new.attrs => {}
                _ => events.push(LeaseEvent::Added(new.clone())),
            }
        }
        self.peers = next;
        events
    }

    /// A lease was written. Returns `None` for our own lease.
    pub fn put(&mut self, lease: Lease) -> Option<LeaseEvent> {
        if Some(lease.key) == self.own {
            return None;
        }
        self.peers.insert(lease.key, lease.clone());
        Some(LeaseEvent::Added(lease))
    }

    /// A lease was deleted or expired. Returns `None` for our own or an unknown lease.
    pub fn delete(&mut self, key: &SubnetKey) -> Option<LeaseEvent> {
        if Some(*key) == self.own {
            return None;
        }
        self.peers.remove(key).map(LeaseEvent::Removed)
    }

    /// The current peer leases, ordered by subnet.
    pub fn peers(&self) -> impl Iterator<Item = &Lease> {
        self.peers.values()
    }

    /// How many peers are known.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{Expiry, LeaseAttrs};

    fn l(key: &str, ip: u8) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::new([10, 0, 0, ip].into()),
            expiry: Expiry::Unknown,
            revision: 0,
        }
    }

    #[test]
    fn snapshot_diff_and_own_filter() {
        let own = "10.1.1.0-24".parse().unwrap();
        let mut c = LeaseCache::new(Some(own));
        let ev = c.replace_all([l("10.1.1.0-24", 1), l("10.1.2.0-24", 2), l("10.1.3.0-24", 3)]);
        assert_eq!(ev, vec![LeaseEvent::Added(l("10.1.2.0-24", 2)), LeaseEvent::Added(l("10.1.3.0-24", 3))]);
        let ev = c.replace_all([l("10.1.2.0-24", 2), l("10.1.3.0-24", 9), l("10.1.4.0-24", 4)]);
        assert_eq!(
            ev,
            vec![LeaseEvent::Added(l("10.1.3.0-24", 9)), LeaseEvent::Added(l("10.1.4.0-24", 4))],
            "unchanged leases emit nothing, changed ones are re-announced"
        );
        let ev = c.replace_all([l("10.1.4.0-24", 4)]);
        assert_eq!(ev, vec![LeaseEvent::Removed(l("10.1.2.0-24", 2)), LeaseEvent::Removed(l("10.1.3.0-24", 9))]);
        assert_eq!(c.put(l("10.1.1.0-24", 1)), None);
        assert_eq!(c.delete(&own), None);
        assert_eq!(c.delete(&"10.1.9.0-24".parse().unwrap()), None);
        assert_eq!(c.delete(&"10.1.4.0-24".parse().unwrap()), Some(LeaseEvent::Removed(l("10.1.4.0-24", 4))));
        assert!(c.is_empty());
    }
}
