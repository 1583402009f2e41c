//! Peer leases are untrusted input: any host with store access, or an operator's typo, can
//! write any key and value. This module decides which peer leases a host may act on.
//!
//! Two layers: [`check`] applies the rules one lease must satisfy on its own (inside the
//! network, the configured size, not ours, sane addresses); [`Validator`] keeps the set of
//! leases and resolves conflicts between them (two leases on one subnet, one public address
//! or one VTEP MAC): the older lease (lower store create revision) wins, never "whichever
//! came last", and when the winner goes away the loser is accepted again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::backend::{Mac, mac_to_string, parse_vxlan_backend_data};
use crate::cache::LeaseEvent;
use crate::config::NetworkConfig;
use crate::lease::{Lease, SubnetKey};

/// What a host knows about itself and the network, to judge peer leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `Network` and the subnet length of IPv4 leases.
    pub v4: Option<(Ipv4Net, u8)>,
    /// `IPv6Network` and the subnet length of IPv6 leases.
    pub v6: Option<(Ipv6Net, u8)>,
    /// Our own lease (`None` for a viewer such as `weft leases`).
    pub own: Option<SubnetKey>,
    /// Our own public addresses: no peer may claim them.
    pub own_ips: Vec<IpAddr>,
}

impl Rules {
    /// The network part of the rules, from the network config.
    pub fn from_config(cfg: &NetworkConfig) -> Rules {
        Rules {
            v4: cfg.v4.map(|r| (r.network, r.subnet_len)),
            v6: cfg.v6.map(|r| (r.network, r.subnet_len)),
            own: None,
            own_ips: Vec::new(),
        }
    }
}

/// Why a peer lease is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The subnet does not lie inside `Network` / `IPv6Network` (or that family is off).
    OutsideNetwork(String),
    /// The subnet is not of the configured length.
    WrongLength(String),
    /// The subnet overlaps our own.
    OverlapsOwn(String),
    /// `PublicIP` / `PublicIPv6` is not a usable unicast address, or is ours.
    PublicIp(String),
    /// The vxlan `VtepMAC` is missing, malformed, multicast or zero.
    VtepMac(String),
    /// An older lease claims the same subnet, public address or VTEP MAC.
    Conflict {
        /// What both claim.
        what: String,
        /// The older lease that keeps it.
        winner: SubnetKey,
    },
}

impl Reject {
    /// The `reason` label of `weft_leases_rejected_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::OutsideNetwork(_) => "outside_network",
            Reject::WrongLength(_) => "wrong_length",
            Reject::OverlapsOwn(_) => "overlaps_own",
            Reject::PublicIp(_) => "bad_public_ip",
            Reject::VtepMac(_) => "bad_vtep_mac",
            Reject::Conflict { .. } => "conflict",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::OutsideNetwork(s)
            | Reject::WrongLength(s)
            | Reject::OverlapsOwn(s)
            | Reject::PublicIp(s)
            | Reject::VtepMac(s) => f.write_str(s),
            Reject::Conflict { what, winner } => {
                write!(f, "{what} is already claimed by the older lease {winner}; delete one of the two keys")
            }
        }
    }
}

fn check_v4_ip(ip: Ipv4Addr, rules: &Rules) -> Result<(), Reject> {
    let bad = |why: &str| Err(Reject::PublicIp(format!("PublicIP {ip} is {why}")));
    if ip.is_unspecified() {
        bad("unspecified")
    } else if ip.is_loopback() {
        bad("a loopback address")
    } else if ip.is_multicast() || ip.is_broadcast() || u32::from(ip) >> 28 == 0xf {
        bad("not a unicast address")
    } else if rules.own_ips.contains(&IpAddr::V4(ip)) {
        bad("this host's own address")
    } else {
        Ok(())
    }
}

fn check_v6_ip(ip: Ipv6Addr, rules: &Rules) -> Result<(), Reject> {
    let bad = |why: &str| Err(Reject::PublicIp(format!("PublicIPv6 {ip} is {why}")));
    if ip.is_unspecified() {
        bad("unspecified")
    } else if ip.is_loopback() {
        bad("a loopback address")
    } else if ip.is_multicast() {
        bad("not a unicast address")
    } else if let Some(v4) = ip.to_ipv4_mapped() {
        check_v4_ip(v4, rules).map_err(|_| Reject::PublicIp(format!("PublicIPv6 {ip} maps to a bad IPv4 address")))
    } else if rules.own_ips.contains(&IpAddr::V6(ip)) {
        bad("this host's own address")
    } else {
        Ok(())
    }
}

/// The MACs a vxlan lease advertises (only checked for the families the network uses).
fn vtep_macs(lease: &Lease, rules: &Rules) -> Result<Vec<Mac>, Reject> {
    if lease.attrs.backend_type != "vxlan" {
        return Ok(Vec::new());
    }
    let mut macs = Vec::new();
    if lease.key.v4.is_some() && rules.v4.is_some() {
        match lease.attrs.backend_data.as_ref().and_then(|d| parse_vxlan_backend_data(d.get())) {
            Some((_, m)) => macs.push(m),
            None => return Err(Reject::VtepMac("its BackendData has no unicast VtepMAC".into())),
        }
    }
    if lease.key.v6.is_some() && rules.v6.is_some() && lease.attrs.public_ipv6.is_some() {
        match lease.attrs.backend_v6_data.as_ref().and_then(|d| parse_vxlan_backend_data(d.get())) {
            Some((_, m)) => macs.push(m),
            None => return Err(Reject::VtepMac("its BackendV6Data has no unicast VtepMAC".into())),
        }
    }
    Ok(macs)
}

/// The rules one peer lease must satisfy on its own.
pub fn check(lease: &Lease, rules: &Rules) -> Result<(), Reject> {
    let key = lease.key;
    if let Some(sub) = key.v4 {
        let Some((net, len)) = rules.v4 else {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is IPv4 but the network has no IPv4 Network")));
        };
        if !net.contains(&sub) || sub.prefix_len() < net.prefix_len() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is not inside Network {net}")));
        }
        if sub.prefix_len() != len {
            return Err(Reject::WrongLength(format!("subnet {sub} is not a /{len} (SubnetLen)")));
        }
        if sub.network() != sub.addr() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} has host bits set")));
        }
        if let Some(own) = rules.own.and_then(|o| o.v4)
            && (own.contains(&sub) || sub.contains(&own))
        {
            return Err(Reject::OverlapsOwn(format!("subnet {sub} overlaps our own subnet {own}")));
        }
        check_v4_ip(lease.attrs.public_ip, rules)?;
    }
    if let Some(sub) = key.v6 {
        let Some((net, len)) = rules.v6 else {
            // An IPv4 network ignores the IPv6 half of a dual-stack lease, as flannel does.
            if key.v4.is_some() {
                return vtep_macs(lease, rules).map(|_| ());
            }
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is IPv6 but the network has no IPv6Network")));
        };
        if !net.contains(&sub) || sub.prefix_len() < net.prefix_len() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is not inside IPv6Network {net}")));
        }
        if sub.prefix_len() != len {
            return Err(Reject::WrongLength(format!("subnet {sub} is not a /{len} (IPv6SubnetLen)")));
        }
        if sub.network() != sub.addr() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} has host bits set")));
        }
        if let Some(own) = rules.own.and_then(|o| o.v6)
            && (own.contains(&sub) || sub.contains(&own))
        {
            return Err(Reject::OverlapsOwn(format!("subnet {sub} overlaps our own subnet {own}")));
        }
        match lease.attrs.public_ipv6 {
            Some(ip) => check_v6_ip(ip, rules)?,
            None if key.v4.is_none() => {
                return Err(Reject::PublicIp("an IPv6-only lease without PublicIPv6".into()));
            }
            None => {}
        }
    }
    vtep_macs(lease, rules).map(|_| ())
}

/// Something only one lease may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Claim {
    V4(Ipv4Net),
    V6(Ipv6Net),
    Ip(IpAddr),
    Mac(Mac),
}

impl Claim {
    fn describe(&self) -> String {
        match self {
            Claim::V4(n) => format!("subnet {n}"),
            Claim::V6(n) => format!("subnet {n}"),
            Claim::Ip(ip) => format!("public address {ip}"),
            Claim::Mac(m) => format!("VtepMAC {}", mac_to_string(m)),
        }
    }
}

/// Everything a (rule-valid) lease claims. Subnets of the configured length without host
/// bits overlap only when equal, so equality of claims finds every conflict.
fn claims(lease: &Lease, rules: &Rules) -> Vec<Claim> {
    let mut c = Vec::new();
    if let Some(n) = lease.key.v4.filter(|_| rules.v4.is_some()) {
        c.push(Claim::V4(n));
        c.push(Claim::Ip(IpAddr::V4(lease.attrs.public_ip)));
    }
    if let Some(n) = lease.key.v6.filter(|_| rules.v6.is_some()) {
        c.push(Claim::V6(n));
        if let Some(ip) = lease.attrs.public_ipv6 {
            c.push(Claim::Ip(IpAddr::V6(ip)));
        }
    }
    c.extend(vtep_macs(lease, rules).unwrap_or_default().into_iter().map(Claim::Mac));
    c.sort();
    c.dedup();
    c
}

/// Which leases are older: lower create revision first; the key breaks ties (stores that
/// do not report a create revision give 0).
type Age = (i64, SubnetKey);

fn age(l: &Lease) -> Age {
    (l.revision, l.key)
}

/// The peer leases of a host, validated, with conflicts resolved. Work per change is
/// proportional to the leases that share a claim with the changed one.
#[derive(Debug, Default)]
pub struct Validator {
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

impl Validator {
    /// An empty validator.
    pub fn new(rules: Rules) -> Self {
        Validator { rules, ..Validator::default() }
    }

    /// Sets our own lease and addresses and judges every lease again.
    pub fn set_rules(&mut self, rules: Rules) -> Outcome {
        self.rules = rules;
        let leases: Vec<Lease> = std::mem::take(&mut self.all).into_values().collect();
        self.replace_all(leases)
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
        let next: BTreeMap<SubnetKey, Lease> = leases.into_iter().map(|l| (l.key, l)).collect();
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

    /// Applies an event of the lease cache.
    pub fn apply(&mut self, e: &LeaseEvent) -> Outcome {
        match e {
            LeaseEvent::Added(l) => self.put(l.clone()),
            LeaseEvent::Removed(l) => self.delete(&l.key),
        }
    }

    /// The leases in use.
    pub fn accepted(&self) -> impl Iterator<Item = &Lease> {
        self.accepted.values()
    }

    /// The leases not in use, with why.
    pub fn rejected(&self) -> &BTreeMap<SubnetKey, Reject> {
        &self.rejected
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    use super::*;
    use crate::backend::vxlan_backend_data;
    use crate::lease::{Expiry, LeaseAttrs};

    fn rules() -> Rules {
        Rules {
            v4: Some(("10.5.0.0/16".parse().unwrap(), 24)),
            v6: None,
            own: Some("10.5.1.0-24".parse().unwrap()),
            own_ips: vec!["192.0.2.11".parse().unwrap()],
        }
    }

    fn lease(key: &str, ip: &str, rev: i64) -> Lease {
        let mut a = LeaseAttrs::new(ip.parse().unwrap());
        a.backend_type = "host-gw".into();
        Lease { key: key.parse().unwrap(), attrs: a, expiry: Expiry::Unknown, revision: rev }
    }

    fn vx(key: &str, ip: &str, mac: Mac, rev: i64) -> Lease {
        let mut l = lease(key, ip, rev);
        l.attrs.backend_type = "vxlan".into();
        l.attrs.backend_data = Some(RawValue::from_string(vxlan_backend_data(1, &mac)).unwrap());
        l
    }

    #[test]
    fn single_lease_rules() {
        let r = rules();
        assert_eq!(check(&lease("10.5.2.0-24", "192.0.2.12", 1), &r), Ok(()));
        let label = |l: Lease| check(&l, &r).unwrap_err().label();
        // The hostile lease of issue 9: the LAN itself.
        assert_eq!(label(lease("192.0.2.0-24", "192.0.2.99", 1)), "outside_network");
        assert_eq!(label(lease("10.0.0.0-8", "192.0.2.99", 1)), "outside_network");
        assert_eq!(label(lease("10.5.2.0-25", "192.0.2.12", 1)), "wrong_length");
        assert_eq!(label(lease("10.5.0.0-16", "192.0.2.12", 1)), "wrong_length");
        assert_eq!(label(lease("10.5.1.0-24", "192.0.2.12", 1)), "overlaps_own");
        for ip in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "240.0.0.1", "192.0.2.11"] {
            assert_eq!(label(lease("10.5.2.0-24", ip, 1)), "bad_public_ip", "{ip}");
        }
        let mut bad_mac = vx("10.5.2.0-24", "192.0.2.12", [1, 0, 0x5e, 0, 0, 1], 1);
        assert_eq!(check(&bad_mac, &r).unwrap_err().label(), "bad_vtep_mac");
        bad_mac.attrs.backend_data = None;
        assert_eq!(check(&bad_mac, &r).unwrap_err().label(), "bad_vtep_mac");
        let v6only = Lease {
            key: "0.0.0.0-0&fd00:5:0:2::-64".parse().unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::UNSPECIFIED),
            expiry: Expiry::Unknown,
            revision: 1,
        };
        assert_eq!(check(&v6only, &r).unwrap_err().label(), "outside_network", "no IPv6Network configured");
        let r6 = Rules { v4: None, v6: Some(("fd00:5::/56".parse().unwrap(), 64)), own: None, own_ips: vec![] };
        assert_eq!(check(&v6only, &r6).unwrap_err().label(), "bad_public_ip", "IPv6-only without PublicIPv6");
        let mut ok6 = v6only.clone();
        ok6.attrs.public_ipv6 = Some("fd00:192::12".parse().unwrap());
        assert_eq!(check(&ok6, &r6), Ok(()));
        for ip in ["::", "::1", "ff02::1", "::ffff:127.0.0.1"] {
            ok6.attrs.public_ipv6 = Some(ip.parse().unwrap());
            assert_eq!(check(&ok6, &r6).unwrap_err().label(), "bad_public_ip", "{ip}");
        }
    }

    #[test]
    fn the_older_lease_wins_and_the_loser_returns_when_it_goes() {
        let mut v = Validator::new(rules());
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
        let mut v = Validator::new(rules());
        let lan = lease("192.0.2.0-24", "192.0.2.99", 1);
        let out = v.put(lan.clone());
        assert!(out.events.is_empty());
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(v.put(lan.clone()), Outcome::default(), "logged once");
        assert_eq!(v.delete(&lan.key), Outcome::default());
        assert!(v.rejected().is_empty());
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
            let mut v = Validator::new(rules());
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
            let mut fresh = Validator::new(rules());
            fresh.replace_all(store.values().cloned());
            let again: BTreeMap<SubnetKey, Lease> = fresh.accepted().map(|l| (l.key, l.clone())).collect();
            prop_assert_eq!(accepted, again);
            prop_assert_eq!(v.accepted().count() + v.rejected().len(), store.len());
        }
    }
}
