//! The peer lease cache: every peer lease the store holds, judged by the rules of
//! [`crate::validate`], with conflicts between leases resolved (two leases on one subnet,
//! one public address or one VTEP MAC): the older lease (lower store create revision) wins,
//! never "whichever came last", and when the winner goes away the loser is accepted again.
//! Store snapshots and changes go in; Added/Removed events for the accepted set come out.
//!
//! Each lease is read once, when it arrives: its verdict under the single-lease rules and
//! the planner's compact [`Peer`] (backend data parsed) are kept beside it, so a resync
//! pass parses no JSON. One map holds every lease with whether it is in use, and the claim
//! index is one ordered set of (claim, holder) pairs: no second copy of the accepted
//! leases, no allocation per claim.

use std::collections::{BTreeMap, BTreeSet};

use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::plan::Peer;
use crate::validate::{Claim, Reject, Rules, check, claims_of};

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

/// A claim other than a WireGuard key, as the index keeps it (18 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Small {
    V4(ipnet::Ipv4Net),
    V6(ipnet::Ipv6Net),
    Ip(std::net::IpAddr),
    Mac(crate::backend::Mac),
}

/// Which index holds claim `c`, and its key there.
enum Slot {
    Small(Small),
    Key([u8; 32]),
}

fn slot(c: Claim) -> Slot {
    match c {
        Claim::V4(n) => Slot::Small(Small::V4(n)),
        Claim::V6(n) => Slot::Small(Small::V6(n)),
        Claim::Ip(ip) => Slot::Small(Small::Ip(ip)),
        Claim::Mac(m) => Slot::Small(Small::Mac(m)),
        Claim::Key(k) => Slot::Key(k),
    }
}

/// Below every age: where the holders of a claim start in the index.
const FIRST: Age = (i64::MIN, SubnetKey { v4: None, v6: None });

/// Whether two leases say the same (`LeaseAttrs`' equality compares the backend data's
/// text without copying it).
fn same_attrs(a: &LeaseAttrs, b: &LeaseAttrs) -> bool {
    a == b
}

/// A peer lease as the cache keeps it, with what was worked out when it arrived (the rules
/// do not change during the cache's life).
#[derive(Debug)]
struct Stored {
    lease: Lease,
    peer: Peer,
    /// Whether it passes the single-lease rules (a rare refusal is boxed: the common case
    /// stays small). Its claims are worked out again when needed (on changes only), from
    /// `peer`: kept for 20 000 leases they would cost more memory than anything else here.
    rule: Result<(), Box<Reject>>,
    /// Whether this version is in use.
    accepted: bool,
}

/// The peer leases of a host, validated, with conflicts resolved: the one copy of the peer
/// set. The lease watch writes it; the data plane plans from its accepted peers. Work per
/// change is proportional to the leases that share a claim with the changed one.
#[derive(Debug, Default)]
pub struct LeaseCache {
    rules: Rules,
    /// Every peer lease seen (not our own), valid or not, and whether it is in use.
    all: BTreeMap<SubnetKey, Stored>,
    /// Rule-valid leases by claim, oldest first: (claim, holder) pairs. WireGuard keys
    /// (32 bytes) have a set of their own: in one set every entry would be as large as the
    /// largest claim (72 bytes instead of 56, for the three claims of each of 20 000 leases).
    holders: BTreeSet<(Small, Age)>,
    /// The WireGuard key claims, as `holders`.
    key_holders: BTreeSet<([u8; 32], Age)>,
    /// How many leases are in use.
    in_use: usize,
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

    /// Reads a lease once: its verdict, claims and planner view.
    fn store(&self, lease: Lease) -> Stored {
        let rule = check(&lease, &self.rules).map_err(Box::new);
        Stored { peer: Peer::of(&lease), lease, rule, accepted: false }
    }

    /// What `s` claims (nothing when it fails the rules).
    fn claims(&self, s: &Stored) -> Vec<Claim> {
        if s.rule.is_ok() { claims_of(&s.lease, &s.peer, &self.rules) } else { Vec::new() }
    }

    fn index(&mut self, s: &Stored, add: bool) {
        let a = age(&s.lease);
        for c in self.claims(s) {
            match (slot(c), add) {
                (Slot::Small(c), true) => self.holders.insert((c, a)),
                (Slot::Small(c), false) => self.holders.remove(&(c, a)),
                (Slot::Key(k), true) => self.key_holders.insert((k, a)),
                (Slot::Key(k), false) => self.key_holders.remove(&(k, a)),
            };
        }
    }

    /// The holders of claim `c`, oldest first.
    fn holders_of(&self, c: Claim) -> impl Iterator<Item = Age> + '_ {
        let (small, key) = match slot(c) {
            Slot::Small(c) => (Some(c), None),
            Slot::Key(k) => (None, Some(k)),
        };
        let s = small
            .into_iter()
            .flat_map(move |c| self.holders.range((c, FIRST)..).take_while(move |(h, _)| *h == c).map(|(_, a)| *a));
        let k = key
            .into_iter()
            .flat_map(move |k| self.key_holders.range((k, FIRST)..).take_while(move |(h, _)| *h == k).map(|(_, a)| *a));
        s.chain(k)
    }

    /// The verdict on a lease from the current indexes.
    fn verdict(&self, s: &Stored) -> Result<(), Reject> {
        s.rule.as_ref().map_err(|r| Reject::clone(r))?;
        let mine = age(&s.lease);
        for c in self.claims(s) {
            if let Some(first) = self.holders_of(c).next()
                && first != mine
            {
                return Err(Reject::Conflict { what: c.describe(), winner: first.1 });
            }
        }
        Ok(())
    }

    /// Keys sharing a claim with `s` (including its own).
    fn neighbours(&self, s: &Stored, out: &mut BTreeSet<SubnetKey>) {
        out.insert(s.lease.key);
        for c in self.claims(s) {
            out.extend(self.holders_of(c).map(|a| a.1));
        }
    }

    /// Takes `old` out of use (its replacement, if any, is judged by [`LeaseCache::settle`]);
    /// returns the lease when it was in use, for the event.
    fn retire(&mut self, old: Stored) -> Option<Lease> {
        self.index(&old, false);
        if old.accepted {
            self.in_use -= 1;
            Some(old.lease)
        } else {
            None
        }
    }

    /// Re-judges `keys` and reports what changed. `was` holds the versions, in use until
    /// now, of keys whose lease was replaced or removed.
    fn settle(
        &mut self,
        keys: impl IntoIterator<Item = SubnetKey>,
        was: &mut BTreeMap<SubnetKey, Lease>,
        out: &mut Outcome,
    ) {
        for k in keys {
            let prev = was.remove(&k);
            let verdict = match self.all.get(&k) {
                None => {
                    if let Some(old) = prev {
                        out.events.push(LeaseEvent::Removed(old));
                    }
                    self.rejected.remove(&k);
                    continue;
                }
                Some(s) => self.verdict(s),
            };
            let s = self.all.get_mut(&k).expect("looked up above");
            match verdict {
                Ok(()) => {
                    self.rejected.remove(&k);
                    if s.accepted {
                        continue;
                    }
                    s.accepted = true;
                    self.in_use += 1;
                    match prev {
                        Some(old) if same_attrs(&old.attrs, &s.lease.attrs) => {}
                        _ => out.events.push(LeaseEvent::Added(s.lease.clone())),
                    }
                }
                Err(why) => {
                    if s.accepted {
                        s.accepted = false;
                        self.in_use -= 1;
                        out.events.push(LeaseEvent::Removed(s.lease.clone()));
                    } else if let Some(old) = prev {
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
        let mut was = BTreeMap::new();
        if let Some(old) = self.all.remove(&lease.key) {
            self.neighbours(&old, &mut affected);
            if let Some(l) = self.retire(old) {
                was.insert(l.key, l);
            }
        }
        let new = self.store(lease);
        self.index(&new, true);
        self.neighbours(&new, &mut affected);
        self.all.insert(new.lease.key, new);
        let mut out = Outcome::default();
        self.settle(affected, &mut was, &mut out);
        out
    }

    /// A lease was deleted or expired.
    pub fn delete(&mut self, key: &SubnetKey) -> Outcome {
        let mut out = Outcome::default();
        if let Some(old) = self.all.remove(key) {
            let mut affected = BTreeSet::new();
            let mut was = BTreeMap::new();
            self.neighbours(&old, &mut affected);
            if let Some(l) = self.retire(old) {
                was.insert(l.key, l);
            }
            self.settle(affected, &mut was, &mut out);
        }
        out
    }

    /// Replaces the whole set (a fresh list) and reports the difference. A lease listed
    /// again unchanged keeps what was worked out for it (and its place in use).
    pub fn replace_all(&mut self, leases: impl IntoIterator<Item = Lease>) -> Outcome {
        let own = self.rules.own;
        let mut old = std::mem::take(&mut self.all);
        let mut was = BTreeMap::new();
        // Gathered, then built at once: full B-tree nodes, half the memory of inserting
        // 20 000 leases in the store's (string) order.
        let mut next: Vec<(SubnetKey, Stored)> = Vec::new();
        for l in leases.into_iter().filter(|l| Some(l.key) != own) {
            let s = match old.remove(&l.key) {
                Some(mut s) if s.lease.revision == l.revision && same_attrs(&s.lease.attrs, &l.attrs) => {
                    // Judged the same; the expiry may have moved.
                    s.lease.expiry = l.expiry;
                    s
                }
                Some(s) => {
                    if s.accepted {
                        self.in_use -= 1;
                        was.insert(s.lease.key, s.lease);
                    }
                    self.store(l)
                }
                None => self.store(l),
            };
            next.push((s.lease.key, s));
        }
        let next: BTreeMap<SubnetKey, Stored> = next.into_iter().collect();
        for (k, s) in old {
            if s.accepted {
                self.in_use -= 1;
                was.insert(k, s.lease);
            }
        }
        let mut holders = Vec::with_capacity(next.len() * 3);
        let mut key_holders = Vec::new();
        for s in next.values() {
            let a = age(&s.lease);
            for c in self.claims(s) {
                match slot(c) {
                    Slot::Small(c) => holders.push((c, a)),
                    Slot::Key(k) => key_holders.push((k, a)),
                }
            }
        }
        self.holders = holders.into_iter().collect();
        self.key_holders = key_holders.into_iter().collect();
        self.all = next;
        let mut keys: Vec<SubnetKey> = self.all.keys().chain(was.keys()).copied().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut out = Outcome::default();
        self.settle(keys, &mut was, &mut out);
        out
    }

    /// The leases in use.
    pub fn accepted(&self) -> impl Iterator<Item = &Lease> {
        self.all.values().filter(|s| s.accepted).map(|s| &s.lease)
    }

    /// The lease of `key` if it is in use (what a table keyed by lease holds for it now).
    pub fn accepted_lease(&self, key: &SubnetKey) -> Option<&Lease> {
        self.all.get(key).filter(|s| s.accepted).map(|s| &s.lease)
    }

    /// For each event (already applied to the cache), its key and what is in use for that
    /// key now: the state a per-peer table must hold for it, whatever the event said (a
    /// later change may have been applied already; its own event follows and finds the same
    /// state). A key with several events is named several times; applying the same state
    /// twice changes nothing. O(events × log peers), no allocation.
    pub fn current<'a>(&'a self, events: &'a [LeaseEvent]) -> impl Iterator<Item = (SubnetKey, Option<&'a Lease>)> {
        events.iter().map(|e| {
            let key = match e {
                LeaseEvent::Added(l) | LeaseEvent::Removed(l) => l.key,
            };
            (key, self.accepted_lease(&key))
        })
    }

    /// The leases in use as the planner reads them (parsed when they arrived), by key.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.all.values().filter(|s| s.accepted).map(|s| &s.peer)
    }

    /// The leases not in use, with why.
    pub fn rejected(&self) -> &BTreeMap<SubnetKey, Reject> {
        &self.rejected
    }

    /// How many leases are in use.
    pub fn len(&self) -> usize {
        self.in_use
    }

    /// Whether no lease is in use.
    pub fn is_empty(&self) -> bool {
        self.in_use == 0
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::validate::claims;
    use crate::validate::tests::{lease, rules, vx};

    #[test]
    fn the_claim_index_stays_small() {
        // Three claims per vxlan lease, 20 000 leases: 16 bytes an entry is ~1 MiB.
        assert!(std::mem::size_of::<(Small, Age)>() <= 56, "{}", std::mem::size_of::<(Small, Age)>());
    }

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

    #[test]
    fn a_relisted_unchanged_lease_keeps_its_place_and_a_changed_one_is_judged_again() {
        let mut c = LeaseCache::new(rules());
        let mac = [0x0e, 1, 2, 3, 4, 5];
        let a = vx("10.5.2.0-24", "192.0.2.12", mac, 3);
        let b = vx("10.5.3.0-24", "192.0.2.13", [0x0e, 1, 2, 3, 4, 6], 4);
        assert_eq!(c.replace_all([a.clone(), b.clone()]).events.len(), 2);
        // The same list again (an expiry moved): nothing to report.
        let mut a2 = a.clone();
        a2.expiry = crate::lease::Expiry::Reservation;
        assert_eq!(c.replace_all([a2.clone(), b.clone()]), Outcome::default());
        assert_eq!(c.peers().map(|p| p.vtep4).collect::<Vec<_>>(), vec![Some(mac), Some([0x0e, 1, 2, 3, 4, 6])]);
        // b re-created (a new revision) with a's MAC: it is younger, so it loses and goes.
        let b2 = vx("10.5.3.0-24", "192.0.2.13", mac, 9);
        let out = c.replace_all([a2.clone(), b2.clone()]);
        assert_eq!(out.events, vec![LeaseEvent::Removed(b.clone())]);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(c.len(), 1);
        // A listing without a: a gone, b2 accepted in its place.
        let out = c.replace_all([b2.clone()]);
        assert_eq!(out.events, vec![LeaseEvent::Removed(a2.clone()), LeaseEvent::Added(b2.clone())]);
        assert_eq!(c.peers().map(|p| p.key).collect::<Vec<_>>(), vec![b2.key]);
    }

    #[test]
    fn hostile_backend_data_is_read_once_and_never_reaches_the_planner() {
        use serde_json::value::RawValue;
        let mut c = LeaseCache::new(rules());
        for (i, data) in [
            r#"[1,2,3]"#,
            r#""VtepMAC""#,
            r#"{"VtepMAC":17}"#,
            r#"{"VtepMAC":"ff:ff:ff:ff:ff:ff"}"#,
            r#"{"VtepMAC":"00:00:00:00:00:00"}"#,
            r#"{"VtepMAC":"0e:01:02:03:04"}"#,
            r#"{"VtepMAC":"0e:01:02:03:04:05:06"}"#,
            r#"{"vtepmac":"01:00:5e:00:00:01","VNI":-1}"#,
        ]
        .into_iter()
        .enumerate()
        {
            let mut l = vx(&format!("10.5.{}.0-24", 10 + i), &format!("192.0.2.{}", 30 + i), [0x0e, 0, 0, 0, 0, 1], 1);
            l.attrs.backend_data = Some(RawValue::from_string(data.to_string()).unwrap());
            let out = c.put(l.clone());
            assert!(out.events.is_empty(), "{data}");
            assert_eq!(out.rejected[0].1.label(), "bad_vtep_mac", "{data}");
            assert_eq!(Peer::of(&l).vtep4, None, "{data}");
        }
        // Keys match case-insensitively, as Go reads them; the MAC is parsed once, here.
        let mut ok = vx("10.5.30.0-24", "192.0.2.60", [0x0e, 0, 0, 0, 0, 1], 1);
        ok.attrs.backend_data =
            Some(RawValue::from_string(r#"{"vni":1,"vtepmac":"0e:aa:bb:cc:dd:ee"}"#.into()).unwrap());
        assert_eq!(c.put(ok.clone()).events.len(), 1);
        assert_eq!(c.peers().next().unwrap().vtep4, Some([0x0e, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        assert_eq!(c.len(), 1);
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
            // The planner's view is the accepted set, read once from each lease.
            let peers: Vec<Peer> = v.peers().copied().collect();
            let want: Vec<Peer> = accepted.values().map(Peer::of).collect();
            prop_assert_eq!(peers, want);
            prop_assert_eq!(v.len(), accepted.len());
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
