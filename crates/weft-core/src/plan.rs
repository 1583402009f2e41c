//! The kernel state a host should have for its peers, per backend, and the difference to
//! what the kernel has: the pure half of the reconciler.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::backend::{BackendSpec, Mac, mac_to_string, parse_vxlan_backend_data};
use crate::lease::{Lease, SubnetKey};

/// Which of our links an entry lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkRef {
    /// `flannel.<VNI>`.
    Vxlan4,
    /// `flannel-v6.<VNI>`.
    Vxlan6,
    /// The external interface.
    External,
}

/// A route to a peer subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The peer subnet.
    pub dst: IpNet,
    /// Next hop.
    pub via: IpAddr,
    /// Output link.
    pub link: LinkRef,
    /// `onlink`: the next hop is reachable without a covering route (vxlan).
    pub onlink: bool,
    /// The nexthop object the route points at (`nhid N`), when nexthop objects are used;
    /// the planner leaves it `None` and [`assign_nexthops`] fills it in.
    pub nhid: Option<u32>,
}

impl Route {
    /// A route to `dst` via `via` on `link`, without a nexthop object.
    pub fn new(dst: IpNet, via: IpAddr, link: LinkRef, onlink: bool) -> Route {
        Route { dst, via, link, onlink, nhid: None }
    }

    /// Where the route goes, as a nexthop object would say it.
    pub fn nexthop(&self) -> Nexthop {
        Nexthop { via: self.via, link: self.link, onlink: self.onlink }
    }
}

/// A nexthop object (`ip nexthop`): a gateway on a link. Routes point at it by id, so the
/// kernel hashes them by id instead of walking every route through the same device (the
/// IPv4 `fib_info` hash does not include the gateway, which makes plain routes quadratic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexthop {
    /// The gateway.
    pub via: IpAddr,
    /// Output link.
    pub link: LinkRef,
    /// `onlink` (vxlan).
    pub onlink: bool,
}

/// The nexthop ids weft allocates (`ip nexthop` shows them as `id 87000001` and so on); its
/// nexthops also carry protocol 87, which is how they are recognised.
pub const NEXTHOP_IDS: std::ops::Range<u32> = 87_000_000..88_000_000;

/// Routes, neighbours and FDB entries: desired or actual.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Routes by destination.
    pub routes: BTreeMap<IpNet, Route>,
    /// Permanent neighbours: (link, IP) → MAC.
    pub neighbors: BTreeMap<(LinkRef, IpAddr), Mac>,
    /// FDB entries: (link, MAC) → underlay destination.
    pub fdb: BTreeMap<(LinkRef, Mac), IpAddr>,
    /// Nexthop objects by id (ours only; empty when plain routes are used).
    pub nexthops: BTreeMap<u32, Nexthop>,
}

/// The desired state and the peers that were skipped, with why.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// What the kernel should hold.
    pub state: KernelState,
    /// Peer leases that could not be used (malformed data), with a reason.
    pub skipped: Vec<(SubnetKey, String)>,
}

/// Facts about the host the plan depends on.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Prefixes directly connected on the external interface (for DirectRouting).
    pub connected: Vec<IpNet>,
    /// Whether the IPv6 vxlan device exists (dual stack).
    pub vxlan6: bool,
}

fn base(net: IpNet) -> IpAddr {
    net.network()
}

/// Computes the desired state for `peers` (our own lease is never among them).
pub fn plan<'a>(spec: &BackendSpec, peers: impl IntoIterator<Item = &'a Lease>, facts: &HostFacts) -> Plan {
    let mut p = Plan::default();
    let own_type = spec.lease_type();
    for peer in peers {
        // Peers of another backend program nothing here (flannel ignores them too).
        if peer.attrs.backend_type != own_type {
            continue;
        }
        match spec {
            BackendSpec::HostGw => {
                if let Some(v4) = peer.key.v4 {
                    let r = Route::new(v4.into(), peer.attrs.public_ip.into(), LinkRef::External, false);
                    p.state.routes.insert(r.dst, r);
                }
                if let (Some(v6), Some(ip6)) = (peer.key.v6, peer.attrs.public_ipv6) {
                    let r = Route::new(v6.into(), ip6.into(), LinkRef::External, false);
                    p.state.routes.insert(r.dst, r);
                }
            }
            BackendSpec::Vxlan(v) => {
                if let Some(v4) = peer.key.v4 {
                    let public: IpAddr = peer.attrs.public_ip.into();
                    if v.direct_routing && facts.connected.iter().any(|n| n.contains(&public)) {
                        let r = Route::new(v4.into(), public, LinkRef::External, false);
                        p.state.routes.insert(r.dst, r);
                    } else {
                        match peer.attrs.backend_data.as_ref().and_then(|d| parse_vxlan_backend_data(d.get())) {
                            Some((_, mac)) => add_vxlan_peer(&mut p.state, LinkRef::Vxlan4, v4.into(), mac, public),
                            None => p.skipped.push((peer.key, "its BackendData has no valid VtepMAC".into())),
                        }
                    }
                }
                if facts.vxlan6
                    && let (Some(v6), Some(ip6)) = (peer.key.v6, peer.attrs.public_ipv6)
                {
                    match peer.attrs.backend_v6_data.as_ref().and_then(|d| parse_vxlan_backend_data(d.get())) {
                        Some((_, mac)) => add_vxlan_peer(&mut p.state, LinkRef::Vxlan6, v6.into(), mac, ip6.into()),
                        None => p.skipped.push((peer.key, "its BackendV6Data has no valid VtepMAC".into())),
                    }
                }
            }
            // wireguard peers live in its own peer table, not in routes.
            BackendSpec::Alloc | BackendSpec::Udp(_) | BackendSpec::Wireguard(_) => {}
        }
    }
    p
}

fn add_vxlan_peer(s: &mut KernelState, link: LinkRef, subnet: IpNet, mac: Mac, public: IpAddr) {
    let gw = base(subnet);
    s.neighbors.insert((link, gw), mac);
    s.fdb.insert((link, mac), public);
    s.routes.insert(subnet, Route::new(subnet, gw, link, true));
}

/// What to change, in the order to apply it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ops {
    /// Neighbours to add or replace (first: a route is never used before its neighbour).
    pub neighbors_set: Vec<(LinkRef, IpAddr, Mac)>,
    /// FDB entries to add or replace.
    pub fdb_set: Vec<(LinkRef, Mac, IpAddr)>,
    /// Nexthop objects to create (exclusively: an id someone else took is never replaced).
    pub nexthops_add: Vec<(u32, Nexthop)>,
    /// Our nexthop objects to replace (altered behind our back).
    pub nexthops_set: Vec<(u32, Nexthop)>,
    /// Routes to create where we have none: created exclusively, so a route of someone else
    /// with the same destination (connected, the CNI bridge's, an administrator's) is never
    /// replaced.
    pub routes_add: Vec<Route>,
    /// Our own routes to replace (their next hop or link changed).
    pub routes_set: Vec<Route>,
    /// Routes to delete (first when removing).
    pub routes_del: Vec<Route>,
    /// Nexthop objects to delete (after the routes through them moved or went).
    pub nexthops_del: Vec<(u32, Nexthop)>,
    /// FDB entries to delete.
    pub fdb_del: Vec<(LinkRef, Mac, IpAddr)>,
    /// Neighbours to delete.
    pub neighbors_del: Vec<(LinkRef, IpAddr, Mac)>,
}

impl Ops {
    /// Whether nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.neighbors_set.len()
            + self.fdb_set.len()
            + self.nexthops_add.len()
            + self.nexthops_set.len()
            + self.routes_add.len()
            + self.routes_set.len()
            + self.routes_del.len()
            + self.nexthops_del.len()
            + self.fdb_del.len()
            + self.neighbors_del.len()
    }

    /// One line per change, for logs.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.neighbors_set.iter().map(|(l, ip, m)| format!("set neigh {ip} lladdr {} on {l:?}", mac_to_string(m))),
        );
        out.extend(self.fdb_set.iter().map(|(l, m, d)| format!("set fdb {} dst {d} on {l:?}", mac_to_string(m))));
        let nh = |verb: &str, id: &u32, n: &Nexthop| format!("{verb} nexthop id {id} via {} on {:?}", n.via, n.link);
        out.extend(self.nexthops_add.iter().map(|(id, n)| nh("add", id, n)));
        out.extend(self.nexthops_set.iter().map(|(id, n)| nh("set", id, n)));
        let route = |verb: &str, r: &Route| match r.nhid {
            Some(id) => format!("{verb} route {} nhid {id} via {} on {:?}", r.dst, r.via, r.link),
            None => format!("{verb} route {} via {} on {:?}", r.dst, r.via, r.link),
        };
        out.extend(self.routes_add.iter().map(|r| route("add", r)));
        out.extend(self.routes_set.iter().map(|r| route("set", r)));
        out.extend(self.routes_del.iter().map(|r| route("del", r)));
        out.extend(self.nexthops_del.iter().map(|(id, n)| nh("del", id, n)));
        out.extend(self.fdb_del.iter().map(|(l, m, d)| format!("del fdb {} dst {d} on {l:?}", mac_to_string(m))));
        out.extend(
            self.neighbors_del.iter().map(|(l, ip, m)| format!("del neigh {ip} lladdr {} on {l:?}", mac_to_string(m))),
        );
        out
    }
}

/// The changes that turn `actual` into `desired`. Entries already right are left alone, so
/// a restart or a resync never disturbs working traffic. `actual` holds only entries that
/// are ours: whatever is not in it is never replaced or deleted.
pub fn diff(desired: &KernelState, actual: &KernelState) -> Ops {
    let mut ops = Ops::default();
    for (&(l, ip), mac) in &desired.neighbors {
        if actual.neighbors.get(&(l, ip)) != Some(mac) {
            ops.neighbors_set.push((l, ip, *mac));
        }
    }
    for (&(l, mac), dst) in &desired.fdb {
        if actual.fdb.get(&(l, mac)) != Some(dst) {
            ops.fdb_set.push((l, mac, *dst));
        }
    }
    for (&id, nh) in &desired.nexthops {
        match actual.nexthops.get(&id) {
            None => ops.nexthops_add.push((id, *nh)),
            Some(a) if a != nh => ops.nexthops_set.push((id, *nh)),
            Some(_) => {}
        }
    }
    for (dst, r) in &desired.routes {
        match actual.routes.get(dst) {
            None => ops.routes_add.push(*r),
            Some(a) if a != r => ops.routes_set.push(*r),
            Some(_) => {}
        }
    }
    for (dst, r) in &actual.routes {
        if !desired.routes.contains_key(dst) {
            ops.routes_del.push(*r);
        }
    }
    for (&id, nh) in &actual.nexthops {
        if !desired.nexthops.contains_key(&id) {
            ops.nexthops_del.push((id, *nh));
        }
    }
    for (&(l, mac), dst) in &actual.fdb {
        if !desired.fdb.contains_key(&(l, mac)) {
            ops.fdb_del.push((l, mac, *dst));
        }
    }
    for (&(l, ip), mac) in &actual.neighbors {
        if !desired.neighbors.contains_key(&(l, ip)) {
            ops.neighbors_del.push((l, ip, *mac));
        }
    }
    ops
}

/// Points every route of `desired` at a nexthop object: the id of one of our nexthops in
/// `actual` that already goes the same way (so a restarted daemon adopts what is there and
/// traffic never stops), else the lowest id of [`NEXTHOP_IDS`] that is neither ours nor
/// `taken` (the ids of every nexthop in the kernel, whoever made it). Fills
/// `desired.nexthops`; a duplicate or unused nexthop of ours is then left for [`diff`] to
/// delete. Work is O(routes + nexthops) map operations.
pub fn assign_nexthops(desired: &mut KernelState, actual: &KernelState, taken: &dyn Fn(u32) -> bool) {
    let mut existing: BTreeMap<Nexthop, u32> = BTreeMap::new();
    for (&id, nh) in &actual.nexthops {
        existing.entry(*nh).or_insert(id);
    }
    let mut next = NEXTHOP_IDS.start;
    desired.nexthops.clear();
    for r in desired.routes.values_mut() {
        let nh = r.nexthop();
        let id = match existing.get(&nh) {
            Some(&id) => id,
            None => {
                while next < NEXTHOP_IDS.end && (taken(next) || actual.nexthops.contains_key(&next)) {
                    next += 1;
                }
                if next >= NEXTHOP_IDS.end {
                    // Out of ids (a million nexthops): this route stays a plain one.
                    r.nhid = None;
                    continue;
                }
                let id = next;
                next += 1;
                existing.insert(nh, id);
                id
            }
        };
        r.nhid = Some(id);
        desired.nexthops.insert(id, nh);
    }
}

/// The changes for a few peers alone, against `model` (what the kernel holds as of the
/// last pass), which is updated to match: the entries of peers that went (`gone`) are
/// deleted where the model has them; those of new peers (`new`) are created, through fresh
/// nexthop objects when `ids` is given (`taken` ids skipped, `next` the allocation cursor).
/// Work is O(entries of these peers), whatever the number of peers. `None`, with `model`
/// untouched, when a new entry's key is already in the model (a peer that changed: its old
/// entries are not known here, so a full pass serves it).
pub fn peer_delta(
    model: &mut KernelState,
    gone: &KernelState,
    new: &KernelState,
    ids: Option<(&dyn Fn(u32) -> bool, &mut u32)>,
) -> Option<Ops> {
    if new.routes.keys().any(|k| model.routes.contains_key(k))
        || new.neighbors.keys().any(|k| model.neighbors.contains_key(k))
        || new.fdb.keys().any(|k| model.fdb.contains_key(k))
    {
        return None;
    }
    let mut ops = Ops::default();
    for (dst, r) in &gone.routes {
        if model.routes.get(dst).is_some_and(|m| m.nexthop() == r.nexthop())
            && let Some(m) = model.routes.remove(dst)
        {
            ops.routes_del.push(m);
            if let Some(nh) = m.nhid.and_then(|id| model.nexthops.remove(&id).map(|nh| (id, nh))) {
                ops.nexthops_del.push(nh);
            }
        }
    }
    for (k, mac) in &gone.neighbors {
        if model.neighbors.get(k) == Some(mac) {
            model.neighbors.remove(k);
            ops.neighbors_del.push((k.0, k.1, *mac));
        }
    }
    for (k, dst) in &gone.fdb {
        if model.fdb.get(k) == Some(dst) {
            model.fdb.remove(k);
            ops.fdb_del.push((k.0, k.1, *dst));
        }
    }
    let mut ids = ids;
    for r in new.routes.values() {
        let mut r = *r;
        if let Some((taken, next)) = ids.as_mut() {
            let mut tries = NEXTHOP_IDS.end - NEXTHOP_IDS.start;
            // An id deleted in this same batch is still there when the additions run.
            let freed = |id: u32| ops.nexthops_del.iter().any(|(d, _)| *d == id);
            while tries > 0 && (taken(**next) || model.nexthops.contains_key(next) || freed(**next)) {
                **next = if **next + 1 >= NEXTHOP_IDS.end { NEXTHOP_IDS.start } else { **next + 1 };
                tries -= 1;
            }
            if tries > 0 {
                let id = **next;
                r.nhid = Some(id);
                model.nexthops.insert(id, r.nexthop());
                ops.nexthops_add.push((id, r.nexthop()));
            }
        }
        model.routes.insert(r.dst, r);
        ops.routes_add.push(r);
    }
    for (&(l, ip), mac) in &new.neighbors {
        model.neighbors.insert((l, ip), *mac);
        ops.neighbors_set.push((l, ip, *mac));
    }
    for (&(l, mac), dst) in &new.fdb {
        model.fdb.insert((l, mac), *dst);
        ops.fdb_set.push((l, mac, *dst));
    }
    Some(ops)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::value::RawValue;

    use super::*;
    use crate::backend::{VxlanSettings, vxlan_backend_data};
    use crate::lease::{Expiry, LeaseAttrs};

    fn vxlan(dr: bool) -> BackendSpec {
        BackendSpec::Vxlan(VxlanSettings {
            vni: 1,
            port: 8472,
            gbp: false,
            learning: false,
            direct_routing: dr,
            mtu: None,
        })
    }

    fn peer(key: &str, ip: [u8; 4], kind: &str, mac: Option<Mac>) -> Lease {
        let mut a = LeaseAttrs::new(Ipv4Addr::from(ip));
        a.backend_type = kind.into();
        a.backend_data = mac.map(|m| RawValue::from_string(vxlan_backend_data(1, &m)).unwrap());
        Lease { key: key.parse().unwrap(), attrs: a, expiry: Expiry::Unknown, revision: 0 }
    }

    const MAC: Mac = [0x0e, 1, 2, 3, 4, 5];

    #[test]
    fn vxlan_peer_gets_neighbour_fdb_and_onlink_route() {
        let peers = [peer("10.5.2.0-24", [192, 0, 2, 12], "vxlan", Some(MAC))];
        let p = plan(&vxlan(false), &peers, &HostFacts::default());
        let gw: IpAddr = "10.5.2.0".parse().unwrap();
        assert_eq!(p.state.neighbors.get(&(LinkRef::Vxlan4, gw)), Some(&MAC));
        assert_eq!(p.state.fdb.get(&(LinkRef::Vxlan4, MAC)), Some(&"192.0.2.12".parse().unwrap()));
        let r = p.state.routes[&"10.5.2.0/24".parse().unwrap()];
        assert_eq!(r, Route::new("10.5.2.0/24".parse().unwrap(), gw, LinkRef::Vxlan4, true));
    }

    #[test]
    fn direct_routing_uses_the_lan_for_peers_on_it() {
        let peers = [
            peer("10.5.2.0-24", [192, 0, 2, 12], "vxlan", Some(MAC)),
            peer("10.5.3.0-24", [198, 51, 100, 7], "vxlan", Some([0x0e, 9, 9, 9, 9, 9])),
        ];
        let facts = HostFacts { connected: vec!["192.0.2.0/24".parse().unwrap()], vxlan6: false };
        let p = plan(&vxlan(true), &peers, &facts);
        let direct = p.state.routes[&"10.5.2.0/24".parse().unwrap()];
        assert_eq!((direct.link, direct.via, direct.onlink), (LinkRef::External, "192.0.2.12".parse().unwrap(), false));
        assert_eq!(
            p.state.routes[&"10.5.3.0/24".parse().unwrap()].link,
            LinkRef::Vxlan4,
            "a routed peer still uses vxlan"
        );
        assert_eq!(p.state.neighbors.len(), 1);
    }

    #[test]
    fn host_gw_routes_via_public_ip_and_other_backends_are_ignored() {
        let peers = [
            peer("10.5.2.0-24", [192, 0, 2, 12], "host-gw", None),
            peer("10.5.3.0-24", [192, 0, 2, 13], "vxlan", Some(MAC)),
        ];
        let p = plan(&BackendSpec::HostGw, &peers, &HostFacts::default());
        assert_eq!(p.state.routes.len(), 1);
        let r = p.state.routes[&"10.5.2.0/24".parse().unwrap()];
        assert_eq!((r.via, r.link), ("192.0.2.12".parse().unwrap(), LinkRef::External));
    }

    #[test]
    fn dual_stack_peers_get_v6_entries_on_the_v6_device() {
        let mut p6 = peer("10.5.2.0-24&fd00:5:0:2::-64", [192, 0, 2, 12], "vxlan", Some(MAC));
        p6.attrs.public_ipv6 = Some("2001:db8::12".parse().unwrap());
        let mac6: Mac = [0x0e, 6, 6, 6, 6, 6];
        p6.attrs.backend_v6_data = Some(RawValue::from_string(vxlan_backend_data(1, &mac6)).unwrap());
        let p = plan(&vxlan(false), &[p6], &HostFacts { connected: vec![], vxlan6: true });
        let gw6: IpAddr = "fd00:5:0:2::".parse().unwrap();
        assert_eq!(p.state.neighbors.get(&(LinkRef::Vxlan6, gw6)), Some(&mac6));
        assert_eq!(p.state.fdb.get(&(LinkRef::Vxlan6, mac6)), Some(&"2001:db8::12".parse().unwrap()));
        let r = p.state.routes[&"fd00:5:0:2::/64".parse().unwrap()];
        assert_eq!((r.link, r.via, r.onlink), (LinkRef::Vxlan6, gw6, true));
        assert_eq!(p.state.routes.len(), 2, "v4 and v6 routes");
    }

    #[test]
    fn malformed_peers_are_skipped_not_fatal() {
        let mut bad = peer("10.5.2.0-24", [192, 0, 2, 12], "vxlan", None);
        bad.attrs.backend_data = Some(RawValue::from_string(r#"{"VtepMAC":"nonsense"}"#.into()).unwrap());
        let good = peer("10.5.3.0-24", [192, 0, 2, 13], "vxlan", Some(MAC));
        let p = plan(&vxlan(false), &[bad, good], &HostFacts::default());
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.state.routes.len(), 1);
    }

    #[test]
    fn diff_touches_only_what_differs_in_safe_order() {
        let peers = [
            peer("10.5.2.0-24", [192, 0, 2, 12], "vxlan", Some(MAC)),
            peer("10.5.3.0-24", [192, 0, 2, 13], "vxlan", Some([0x0e, 7, 7, 7, 7, 7])),
        ];
        let want = plan(&vxlan(false), &peers, &HostFacts::default()).state;
        assert!(diff(&want, &want).is_empty(), "a converged kernel is left alone");
        let mut actual = want.clone();
        // A stale peer, a route deleted by hand and a neighbour with an old MAC.
        let stale = plan(
            &vxlan(false),
            &[peer("10.5.9.0-24", [192, 0, 2, 19], "vxlan", Some([0x0e, 8, 8, 8, 8, 8]))],
            &HostFacts::default(),
        )
        .state;
        actual.routes.extend(stale.routes.clone());
        actual.neighbors.extend(stale.neighbors.clone());
        actual.fdb.extend(stale.fdb.clone());
        actual.routes.remove(&"10.5.2.0/24".parse().unwrap());
        actual.neighbors.insert((LinkRef::Vxlan4, "10.5.3.0".parse().unwrap()), [0x0e, 6, 6, 6, 6, 6]);
        actual.routes.insert(
            "10.5.3.0/24".parse().unwrap(),
            Route::new("10.5.3.0/24".parse().unwrap(), "10.5.3.9".parse().unwrap(), LinkRef::Vxlan4, true),
        );
        let ops = diff(&want, &actual);
        assert_eq!(ops.routes_add.len(), 1, "a missing route is created");
        assert_eq!(ops.routes_set.len(), 1, "our route with a stale next hop is replaced");
        assert_eq!(ops.neighbors_set, vec![(LinkRef::Vxlan4, "10.5.3.0".parse().unwrap(), [0x0e, 7, 7, 7, 7, 7])]);
        assert_eq!(ops.routes_del.len(), 1);
        assert_eq!(ops.fdb_del.len(), 1);
        assert_eq!(ops.neighbors_del.len(), 1);
        assert!(ops.fdb_set.is_empty());
        assert_eq!(ops.len(), 6);
    }

    fn vx_peers(n: u8) -> Vec<Lease> {
        (0..n)
            .map(|i| peer(&format!("10.5.{}.0-24", 10 + i), [192, 0, 2, 10 + i], "vxlan", Some([0x0e, 1, 1, 1, 1, i])))
            .collect()
    }

    #[test]
    fn nexthops_are_assigned_fresh_ids_around_taken_ones_and_routes_point_at_them() {
        let mut want = plan(&vxlan(false), &vx_peers(3), &HostFacts::default()).state;
        let taken = |id: u32| id == NEXTHOP_IDS.start || id == NEXTHOP_IDS.start + 2;
        assign_nexthops(&mut want, &KernelState::default(), &taken);
        let ids: Vec<u32> = want.routes.values().map(|r| r.nhid.unwrap()).collect();
        let s = NEXTHOP_IDS.start;
        assert_eq!(ids, vec![s + 1, s + 3, s + 4], "ids someone else holds are skipped");
        for r in want.routes.values() {
            assert_eq!(want.nexthops[&r.nhid.unwrap()], r.nexthop());
        }
        let ops = diff(&want, &KernelState::default());
        assert_eq!(ops.nexthops_add.len(), 3);
        assert_eq!(ops.routes_add.len(), 3);
        assert!(ops.routes_add.iter().all(|r| r.nhid.is_some()));
    }

    #[test]
    fn a_restart_adopts_existing_nexthops_and_routes_and_changes_nothing() {
        let mut first = plan(&vxlan(false), &vx_peers(3), &HostFacts::default()).state;
        assign_nexthops(&mut first, &KernelState::default(), &|_| false);
        // What the kernel holds after the first daemon, with ids out of the usual order.
        let mut actual = first.clone();
        let (dst, mut r) = actual.routes.pop_first().unwrap();
        actual.nexthops.remove(&r.nhid.unwrap());
        r.nhid = Some(NEXTHOP_IDS.start + 500);
        actual.nexthops.insert(NEXTHOP_IDS.start + 500, r.nexthop());
        actual.routes.insert(dst, r);
        let mut again = plan(&vxlan(false), &vx_peers(3), &HostFacts::default()).state;
        let in_kernel: Vec<u32> = actual.nexthops.keys().copied().collect();
        assign_nexthops(&mut again, &actual, &|id| in_kernel.contains(&id));
        assert_eq!(again, actual, "every id adopted");
        assert!(diff(&again, &actual).is_empty());
    }

    #[test]
    fn plain_routes_move_to_nexthops_in_place_and_back_and_stale_nexthops_go() {
        let plain = plan(&vxlan(false), &vx_peers(2), &HostFacts::default()).state;
        let mut nh = plain.clone();
        assign_nexthops(&mut nh, &plain, &|_| false);
        // flannel's plain routes: replaced (never deleted first), nexthops created before.
        let ops = diff(&nh, &plain);
        assert_eq!((ops.nexthops_add.len(), ops.routes_set.len(), ops.routes_add.len()), (2, 2, 0));
        assert!(ops.routes_del.is_empty() && ops.nexthops_del.is_empty());
        // The fallback (nexthops off): routes replaced by plain ones, our nexthops deleted.
        let ops = diff(&plain, &nh);
        assert_eq!((ops.routes_set.len(), ops.nexthops_del.len()), (2, 2));
        assert!(ops.routes_set.iter().all(|r| r.nhid.is_none()));
        // A peer gone: its route and nexthop go; a duplicate nexthop of ours goes too.
        let mut actual = nh.clone();
        actual.nexthops.insert(NEXTHOP_IDS.start + 77, *nh.nexthops.values().next().unwrap());
        let mut want = plan(&vxlan(false), &vx_peers(1), &HostFacts::default()).state;
        let ids: Vec<u32> = actual.nexthops.keys().copied().collect();
        assign_nexthops(&mut want, &actual, &|id| ids.contains(&id));
        let ops = diff(&want, &actual);
        assert_eq!(ops.routes_del.len(), 1);
        assert_eq!(ops.nexthops_del.len(), 2, "{ops:?}");
        assert!(ops.nexthops_add.is_empty() && ops.routes_set.is_empty());
        // A nexthop of ours altered by hand (same id, another gateway) is put back.
        let mut altered = nh.clone();
        let (&id, n) = altered.nexthops.iter_mut().next().unwrap();
        n.via = "10.9.9.9".parse().unwrap();
        let ops = diff(&nh, &altered);
        assert_eq!(ops.nexthops_set, vec![(id, nh.nexthops[&id])]);
    }

    #[test]
    fn a_peer_delta_touches_only_those_peers_and_matches_a_full_diff() {
        let peers = vx_peers(5);
        let mut model = plan(&vxlan(false), &peers[..4], &HostFacts::default()).state;
        assign_nexthops(&mut model, &KernelState::default(), &|_| false);
        let before = model.clone();
        // Peer 4 arrives, peer 1 goes.
        let new = plan(&vxlan(false), &peers[4..], &HostFacts::default()).state;
        let gone = plan(&vxlan(false), &peers[1..2], &HostFacts::default()).state;
        let taken = |id: u32| id == NEXTHOP_IDS.start + 4;
        let mut next = NEXTHOP_IDS.start;
        let ops = peer_delta(&mut model, &gone, &new, Some((&taken, &mut next))).unwrap();
        assert_eq!(
            (ops.routes_add.len(), ops.nexthops_add.len(), ops.neighbors_set.len(), ops.fdb_set.len()),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (ops.routes_del.len(), ops.nexthops_del.len(), ops.neighbors_del.len(), ops.fdb_del.len()),
            (1, 1, 1, 1)
        );
        assert_eq!(ops.len(), 8);
        let id = ops.nexthops_add[0].0;
        assert_eq!(id, NEXTHOP_IDS.start + 5, "ours (0..=3) and the taken id skipped");
        // The model is what a full plan of the new peer set gives, with the same ids kept.
        let mut want = plan(
            &vxlan(false),
            peers.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, p)| p),
            &HostFacts::default(),
        )
        .state;
        assign_nexthops(&mut want, &model, &|_| false);
        assert_eq!(want, model);
        assert!(diff(&want, &model).is_empty());
        // A changed peer (its key already there) is left to a full pass, model untouched.
        let mut m2 = before.clone();
        let changed = plan(&vxlan(false), &peers[..1], &HostFacts::default()).state;
        assert_eq!(peer_delta(&mut m2, &KernelState::default(), &changed, None), None);
        assert_eq!(m2, before);
        // Without nexthops: plain routes.
        let mut plain = plan(&vxlan(false), &peers[..1], &HostFacts::default()).state;
        let ops = peer_delta(&mut plain, &KernelState::default(), &new, None).unwrap();
        assert!(ops.routes_add[0].nhid.is_none() && ops.nexthops_add.is_empty());
    }
}
