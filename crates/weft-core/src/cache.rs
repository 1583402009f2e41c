//! The peer lease cache: every peer lease the store holds, judged by the rules of
//! [`crate::validate`], with conflicts between leases resolved (two leases on one subnet,
//! one public address or one VTEP MAC): the older lease (lower store create revision) wins,
//! never "whichever came last", and when the winner goes away the loser is accepted again.
//! Store snapshots and changes go in; Added/Removed events for the accepted set come out.

use std::collections::{BTreeMap, BTreeSet};

use crate::lease::{Lease, SubnetKey};
use crate::validate::{Claim, Reject, Rules, check, claims};

/// A change in the set of peer leases in use.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// A peer lease appeared or its attributes changed (backends replace what they had).
    Added(Lease),
    /// A peer lease is gone (or no longer in use); carries the attributes it last had.
    Removed(Lease),
}

/// Which leases are older: lower create revision first; the key breaks ties (stores that
/// do not report a create revision give 0).
type Age = (i64, SubnetKey);

fn age(l: &Lease) -> Age {
    (l.revision, l.key)
}

/// The peer leases of a host, validated, with conflicts resolved: the one copy of the peer
/// set. The lease watch writes it; the data plane plans from its accepted leases. Work per change is
/// proportional to the leases that share a claim with the changed one.
#[derive(Debug, Default)]
pub struct LeaseCache {
    rules: Rules,
    /// Every peer lease seen (not our own), valid or not.
    all: BTreeMap<SubnetKey, Lease>,
    /// Rule-valid leases by claim, oldest first.
    holders: BTreeMap<Claim, BTreeSet<Age>>,
    /// The leases in use.
    accepted: BTreeMap<SubnetKey, Lease>,
    /// The leases not in use, with why.
    rejected: BTreeMap<SubnetKey, Reject>,
}

/// What one change did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Changes to the set of accepted leases (what the data plane acts on).
    pub events: Vec<LeaseEvent>,
    /// Leases newly rejected, or rejected for a new reason (to be logged and counted once).
    pub rejected: Vec<(SubnetKey, Reject)>,
}

impl LeaseCache {
    /// An empty cache that judges leases by `rules` and ignores our own (`rules.own`).
    pub fn new(rules: Rules) -> Self {
        LeaseCache { rules, ..LeaseCache::default() }
    }

    fn rule_check(&self, l: &Lease) -> Result<(), Reject> {
        if self.rules.own == Some(l.key) {
            return Err(Reject::OverlapsOwn(format!("{} is our own lease", l.key)));
        }
        check(l, &self.rules)
    }

    fn index(&mut self, l: &Lease, add: bool) {
        for c in claims(l, &self.rules) {
            let set = self.holders.entry(c).or_default();
            if add {
                set.insert(age(l));
            } else {
                set.remove(&age(l));
                if set.is_empty() {
                    self.holders.remove(&c);
                }
            }
        }
    }

    /// The verdict on a lease from the current indexes.
    fn verdict(&self, l: &Lease) -> Result<(), Reject> {
        self.rule_check(l)?;
        for c in claims(l, &self.rules) {
            if let Some(first) = self.holders.get(&c).and_then(|s| s.first())
                && *first != age(l)
            {
                return Err(Reject::Conflict { what: c.describe(), winner: first.1 });
            }
        }
        Ok(())
    }

    /// Keys sharing a claim with `l` (including `l`).
    fn neighbours(&self, l: &Lease, out: &mut BTreeSet<SubnetKey>) {
        out.insert(l.key);
        for c in claims(l, &self.rules) {
            if let Some(s) = self.holders.get(&c) {
                out.extend(s.iter().map(|a| a.1));
            }
        }
    }

    /// Re-judges `keys` and reports what changed.
    fn settle(&mut self, keys: BTreeSet<SubnetKey>, out: &mut Outcome) {
        for k in keys {
            let Some(l) = self.all.get(&k) else {
                if let Some(old) = self.accepted.remove(&k) {
                    out.events.push(LeaseEvent::Removed(old));
                }
                self.rejected.remove(&k);
                continue;
            };
            match self.verdict(l) {
                Ok(()) => {
                    self.rejected.remove(&k);
                    match self.accepted.get(&k) {
                        Some(old) if old.attrs == l.attrs => {}
                        _ => {
                            out.events.push(LeaseEvent::Added(l.clone()));
                            self.accepted.insert(k, l.clone());
                        }
                    }
                }
                Err(why) => {
                    if let Some(old) = self.accepted.remove(&k) {
                        out.events.push(LeaseEvent::Removed(old));
                    }
                    if self.rejected.get(&k) != Some(&why) {
                        out.rejected.push((k, why.clone()));
                        self.rejected.insert(k, why);
                    }
                }
            }
        }
    }

    /// A lease was written (or first seen).
    pub fn put(&mut self, lease: Lease) -> Outcome {
        if self.rules.own == Some(lease.key) {
            return Outcome::default();
        }
        let mut affected = BTreeSet::new();
        if let Some(old) = self.all.remove(&lease.key) {
            self.neighbours(&old, &mut affected);
            if self.rule_check(&old).is_ok() {
                self.index(&old, false);
            }
        }
        if self.rule_check(&lease).is_ok() {
            self.index(&lease, true);
        }
        self.neighbours(&lease, &mut affected);
        self.all.insert(lease.key, lease);
        let mut out = Outcome::default();
        self.settle(affected, &mut out);
        out
    }

    /// A lease was deleted or expired.
    pub fn delete(&mut self, key: &SubnetKey) -> Outcome {
        let mut out = Outcome::default();
        if let Some(old) = self.all.remove(key) {
            let mut affected = BTreeSet::new();
            self.neighbours(&old, &mut affected);
            if self.rule_check(&old).is_ok() {
                self.index(&old, false);
            }
            self.settle(affected, &mut out);
        }
        out
    }

    /// Replaces the whole set (a fresh list) and reports the difference.
    pub fn replace_all(&mut self, leases: impl IntoIterator<Item = Lease>) -> Outcome {
        let own = self.rules.own;
        let next: BTreeMap<SubnetKey, Lease> =
            leases.into_iter().filter(|l| Some(l.key) != own).map(|l| (l.key, l)).collect();
        let mut keys: BTreeSet<SubnetKey> = self.all.keys().copied().collect();
        keys.extend(next.keys().copied());
        self.holders.clear();
        for l in next.values() {
            if self.rule_check(l).is_ok() {
                for c in claims(l, &self.rules) {
                    self.holders.entry(c).or_default().insert(age(l));
                }
            }
        }
        self.all = next;
        let mut out = Outcome::default();
        self.settle(keys, &mut out);
        out
    }

    /// The leases in use.
    pub fn accepted(&self) -> impl Iterator<Item = &Lease> {
        self.accepted.values()
    }

    /// The leases not in use, with why.
    pub fn rejected(&self) -> &BTreeMap<SubnetKey, Reject> {
        &self.rejected
    }

    /// How many leases are in use.
    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    /// Whether no lease is in use.
    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::validate::tests::{lease, rules, vx};

    #[test]
    fn our_own_lease_is_never_a_peer() {
        let mut c = LeaseCache::new(rules());
        let own = lease("10.5.1.0-24", "192.0.2.99", 1);
        assert_eq!(c.put(own.clone()), Outcome::default(), "not accepted, not reported as rejected");
        let out = c.replace_all([own.clone(), lease("10.5.2.0-24", "192.0.2.12", 2)]);
        assert_eq!(out.events.len(), 1);
        assert!(out.rejected.is_empty());
        assert_eq!(c.delete(&own.key), Outcome::default());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn snapshots_emit_only_differences_and_re_announce_changed_attributes() {
        let mut c = LeaseCache::new(rules());
        let a = lease("10.5.2.0-24", "192.0.2.12", 1);
        let b = lease("10.5.3.0-24", "192.0.2.13", 2);
        assert_eq!(c.replace_all([a.clone(), b.clone()]).events.len(), 2);
        let mut b2 = b.clone();
        b2.attrs.public_ip = Ipv4Addr::new(192, 0, 2, 33);
        let out = c.replace_all([a.clone(), b2.clone()]);
        assert_eq!(out.events, vec![LeaseEvent::Added(b2.clone())], "a changed lease is re-announced");
        let out = c.replace_all([b2.clone()]);
        assert_eq!(out.events, vec![LeaseEvent::Removed(a.clone())]);
    }

    #[test]
    fn the_older_lease_wins_and_the_loser_returns_when_it_goes() {
        let mut v = LeaseCache::new(rules());
        let old = lease("10.5.2.0-24", "192.0.2.12", 5);
        let same_ip = lease("10.5.3.0-24", "192.0.2.12", 9);
        let out = v.replace_all([same_ip.clone(), old.clone()]);
        assert_eq!(out.events, vec![LeaseEvent::Added(old.clone())]);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].0, same_ip.key);
        assert!(out.rejected[0].1.to_string().contains("192.0.2.12"), "{}", out.rejected[0].1);
        // Re-writing the loser (a renewal) does not make it win or log again.
        let out = v.put(same_ip.clone());
        assert_eq!(out, Outcome::default());
        // The winner goes: the loser is accepted.
        let out = v.delete(&old.key);
        assert_eq!(out.events, vec![LeaseEvent::Removed(old.clone()), LeaseEvent::Added(same_ip.clone())]);
        assert!(v.rejected().is_empty());
        // A newer lease with the same MAC never displaces an older one.
        let mac = [0x0e, 1, 2, 3, 4, 5];
        let a = vx("10.5.4.0-24", "192.0.2.14", mac, 20);
        let b = vx("10.5.5.0-24", "192.0.2.15", mac, 21);
        v.put(a.clone());
        let out = v.put(b.clone());
        assert!(out.events.is_empty());
        assert_eq!(out.rejected[0].1.label(), "conflict");
        assert_eq!(v.accepted().filter(|l| l.key == a.key).count(), 1);
    }

    #[test]
    fn invalid_leases_are_reported_once_and_never_accepted() {
        let mut v = LeaseCache::new(rules());
        let lan = lease("192.0.2.0-24", "192.0.2.99", 1);
        let out = v.put(lan.clone());
        assert!(out.events.is_empty());
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(v.put(lan.clone()), Outcome::default(), "logged once");
        assert_eq!(v.delete(&lan.key), Outcome::default());
        assert!(v.rejected().is_empty());
    }

    #[test]
    fn a_bad_or_borrowed_wireguard_key_keeps_the_peer_out() {
        use crate::validate::tests::wg;
        let mut v = LeaseCache::new(rules());
        let key = r#"{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","Port":51820}"#;
        let out = v.put(wg("10.5.2.0-24", "192.0.2.12", Some(r#"{"PublicKey":"nope"}"#), 1));
        assert!(out.events.is_empty());
        assert_eq!(out.rejected[0].1.label(), "bad_wireguard_key");
        assert!(out.rejected[0].1.to_string().contains("PublicKey"), "{}", out.rejected[0].1);
        // Fixed: accepted.
        let good = wg("10.5.2.0-24", "192.0.2.12", Some(key), 1);
        assert_eq!(v.put(good.clone()).events, vec![LeaseEvent::Added(good.clone())]);
        // A newer lease that copies the key is one peer too many for WireGuard.
        let thief = wg("10.5.3.0-24", "192.0.2.13", Some(key), 2);
        let out = v.put(thief.clone());
        assert!(out.events.is_empty());
        assert_eq!(out.rejected[0].1.label(), "conflict");
        assert!(out.rejected[0].1.to_string().contains("wireguard PublicKey"), "{}", out.rejected[0].1);
        assert_eq!(v.delete(&good.key).events, vec![LeaseEvent::Removed(good), LeaseEvent::Added(thief)]);
    }

    fn arb_lease() -> impl Strategy<Value = Lease> {
        (0u8..6, 0u8..4, 0u8..4, any::<bool>(), 0i64..50).prop_map(|(sub, ip, mac, vxlan, rev)| {
            let key = format!("10.5.{sub}.0-24");
            let ip = format!("192.0.2.{}", 20 + ip);
            if vxlan { vx(&key, &ip, [0x0e, 0, 0, 0, 0, mac], rev) } else { lease(&key, &ip, rev) }
        })
    }

    proptest! {
        /// Whatever the order of puts and deletes, the accepted set is free of conflicts,
        /// equals what a fresh list of the same leases gives, and the events replayed
        /// reproduce it.
        #[test]
        fn accepted_set_is_conflict_free_and_order_independent(
            ops in proptest::collection::vec((arb_lease(), any::<bool>()), 0..40)
        ) {
            let mut v = LeaseCache::new(rules());
            let mut mirror: BTreeMap<SubnetKey, Lease> = BTreeMap::new();
            let mut store: BTreeMap<SubnetKey, Lease> = BTreeMap::new();
            for (l, del) in ops {
                let out = if del { store.remove(&l.key); v.delete(&l.key) } else {
                    // A store keeps the create revision of an existing key.
                    let mut l = l;
                    if let Some(old) = store.get(&l.key) { l.revision = old.revision; }
                    store.insert(l.key, l.clone());
                    v.put(l)
                };
                for e in out.events {
                    match e {
                        LeaseEvent::Added(l) => { mirror.insert(l.key, l); }
                        LeaseEvent::Removed(l) => { prop_assert!(mirror.remove(&l.key).is_some()); }
                    }
                }
            }
            let accepted: BTreeMap<SubnetKey, Lease> = v.accepted().map(|l| (l.key, l.clone())).collect();
            prop_assert_eq!(&accepted, &mirror);
            let mut seen = BTreeSet::new();
            for l in accepted.values() {
                prop_assert!(check(l, &rules()).is_ok());
                for c in claims(l, &rules()) { prop_assert!(seen.insert(c), "two accepted leases claim {:?}", c); }
            }
            let mut fresh = LeaseCache::new(rules());
            fresh.replace_all(store.values().cloned());
            let again: BTreeMap<SubnetKey, Lease> = fresh.accepted().map(|l| (l.key, l.clone())).collect();
            prop_assert_eq!(accepted, again);
            let own = rules().own;
            let peers_in_store = store.keys().filter(|k| Some(**k) != own).count();
            prop_assert_eq!(v.accepted().count() + v.rejected().len(), peers_in_store, "every peer lease is used or rejected; ours is neither");
        }
    }
}
