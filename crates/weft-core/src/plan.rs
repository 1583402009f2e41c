//! The kernel state a host should have for its peers, per backend, and the difference to
//! what the kernel has: the pure half of the reconciler.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::backend::{BackendSpec, Mac, mac_to_string, parse_vxlan_backend_data};
use crate::lease::{Lease, SubnetKey};

/// A peer lease's backend, compactly (its `BackendType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// `host-gw`.
    HostGw,
    /// `vxlan`.
    Vxlan,
    /// `wireguard` (or flannel's `extension` name for it, whatever the lease type is).
    Wireguard,
    /// No `BackendType` (udp, alloc) or one weft does not program.
    Other,
}

/// A peer lease as the planner needs it: addresses, backend, and the vxlan `VtepMAC`s parsed
/// once, when the lease enters the cache, instead of on every pass. `Copy`, no heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The lease's subnet(s).
    pub key: SubnetKey,
    /// `PublicIP`.
    pub public_ip: Ipv4Addr,
    /// `PublicIPv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `BackendType`.
    pub kind: PeerKind,
    /// The `VtepMAC` of `BackendData` (vxlan leases), when it is a usable unicast MAC.
    pub vtep4: Option<Mac>,
    /// The `VtepMAC` of `BackendV6Data`.
    pub vtep6: Option<Mac>,
}

impl Peer {
    /// Reads what the planner needs from `lease` (the JSON of its backend data is parsed
    /// here, once).
    pub fn of(lease: &Lease) -> Peer {
        let a = &lease.attrs;
        let kind = match a.backend_type.as_str() {
            "host-gw" => PeerKind::HostGw,
            "vxlan" => PeerKind::Vxlan,
            t if t == crate::wireguard::LEASE_TYPE => PeerKind::Wireguard,
            _ => PeerKind::Other,
        };
        let mac = |d: &Option<Box<serde_json::value::RawValue>>| {
            d.as_ref().and_then(|d| parse_vxlan_backend_data(d.get())).map(|(_, m)| m)
        };
        let (vtep4, vtep6) =
            if kind == PeerKind::Vxlan { (mac(&a.backend_data), mac(&a.backend_v6_data)) } else { (None, None) };
        Peer { key: lease.key, public_ip: a.public_ip, public_ipv6: a.public_ipv6, kind, vtep4, vtep6 }
    }
}

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

/// Computes the desired state for `peers` (our own lease is never among them), reading
/// each lease's backend data (see [`plan_peers`] for peers read once, in the cache).
pub fn plan<'a>(spec: &BackendSpec, peers: impl IntoIterator<Item = &'a Lease>, facts: &HostFacts) -> Plan {
    let peers: Vec<Peer> = peers.into_iter().map(Peer::of).collect();
    plan_peers(spec, &peers, facts)
}

/// Computes the desired state for `peers`, whose backend data was parsed when they
/// arrived: no JSON, no allocation per peer beyond the entries themselves.
pub fn plan_peers<'a>(spec: &BackendSpec, peers: impl IntoIterator<Item = &'a Peer>, facts: &HostFacts) -> Plan {
    let mut p = Plan::default();
    let own_kind = match spec {
        BackendSpec::HostGw => PeerKind::HostGw,
        BackendSpec::Vxlan(_) => PeerKind::Vxlan,
        // wireguard peers live in its own peer table, udp's in the engine's: no routes.
        BackendSpec::Alloc | BackendSpec::Udp(_) | BackendSpec::Wireguard(_) => return p,
    };
    // Entries are gathered in lists and each map built at once (sorted, then filled in
    // order), which is several times cheaper than inserting one by one; a later entry for
    // the same key wins, as with inserts.
    let mut b = Builder::default();
    for peer in peers {
        // Peers of another backend program nothing here (flannel ignores them too).
        if peer.kind != own_kind {
            continue;
        }
        match spec {
            BackendSpec::HostGw => {
                if let Some(v4) = peer.key.v4 {
                    b.routes.push(Route::new(v4.into(), peer.public_ip.into(), LinkRef::External, false));
                }
                if let (Some(v6), Some(ip6)) = (peer.key.v6, peer.public_ipv6) {
                    b.routes.push(Route::new(v6.into(), ip6.into(), LinkRef::External, false));
                }
            }
            BackendSpec::Vxlan(v) => {
                if let Some(v4) = peer.key.v4 {
                    let public: IpAddr = peer.public_ip.into();
                    if v.direct_routing && facts.connected.iter().any(|n| n.contains(&public)) {
                        b.routes.push(Route::new(v4.into(), public, LinkRef::External, false));
                    } else {
                        match peer.vtep4 {
                            Some(mac) => b.vxlan_peer(LinkRef::Vxlan4, v4.into(), mac, public),
                            None => p.skipped.push((peer.key, "its BackendData has no valid VtepMAC".into())),
                        }
                    }
                }
                if facts.vxlan6
                    && let (Some(v6), Some(ip6)) = (peer.key.v6, peer.public_ipv6)
                {
                    match peer.vtep6 {
                        Some(mac) => b.vxlan_peer(LinkRef::Vxlan6, v6.into(), mac, ip6.into()),
                        None => p.skipped.push((peer.key, "its BackendV6Data has no valid VtepMAC".into())),
                    }
                }
            }
            BackendSpec::Alloc | BackendSpec::Udp(_) | BackendSpec::Wireguard(_) => {}
        }
    }
    p.state = b.build();
    p
}

/// Entries of a [`KernelState`] gathered in lists, built into its maps at once.
#[derive(Debug, Default)]
pub struct Builder {
    /// Routes.
    pub routes: Vec<Route>,
    /// Neighbours.
    pub neighbors: Vec<((LinkRef, IpAddr), Mac)>,
    /// FDB entries.
    pub fdb: Vec<((LinkRef, Mac), IpAddr)>,
    /// Nexthop objects.
    pub nexthops: Vec<(u32, Nexthop)>,
}

impl Builder {
    fn vxlan_peer(&mut self, link: LinkRef, subnet: IpNet, mac: Mac, public: IpAddr) {
        let gw = base(subnet);
        self.neighbors.push(((link, gw), mac));
        self.fdb.push(((link, mac), public));
        self.routes.push(Route::new(subnet, gw, link, true));
    }

    /// The maps (for equal keys the later entry wins).
    pub fn build(self) -> KernelState {
        KernelState {
            routes: self.routes.into_iter().map(|r| (r.dst, r)).collect(),
            neighbors: self.neighbors.into_iter().collect(),
            fdb: self.fdb.into_iter().collect(),
            nexthops: self.nexthops.into_iter().collect(),
        }
    }
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

/// Walks two maps in key order at once: `f(key, wanted, present)` for every key of either.
/// O(n) with no lookups, since both are sorted the same way.
fn merge<K: Ord + Copy, V>(want: &BTreeMap<K, V>, have: &BTreeMap<K, V>, mut f: impl FnMut(K, Option<&V>, Option<&V>)) {
    let mut w = want.iter().peekable();
    let mut h = have.iter().peekable();
    loop {
        match (w.peek(), h.peek()) {
            (None, None) => return,
            (Some((k, v)), None) => {
                f(**k, Some(*v), None);
                w.next();
            }
            (None, Some((k, v))) => {
                f(**k, None, Some(*v));
                h.next();
            }
            (Some((kw, vw)), Some((kh, vh))) => match kw.cmp(kh) {
                std::cmp::Ordering::Less => {
                    f(**kw, Some(*vw), None);
                    w.next();
                }
                std::cmp::Ordering::Greater => {
                    f(**kh, None, Some(*vh));
                    h.next();
                }
                std::cmp::Ordering::Equal => {
                    f(**kw, Some(*vw), Some(*vh));
                    w.next();
                    h.next();
                }
            },
        }
    }
}

/// The changes that turn `actual` into `desired`. Entries already right are left alone, so
/// a restart or a resync never disturbs working traffic. `actual` holds only entries that
/// are ours: whatever is not in it is never replaced or deleted. One ordered walk of each
/// pair of maps: O(entries), no lookups.
pub fn diff(desired: &KernelState, actual: &KernelState) -> Ops {
    let mut ops = Ops::default();
    merge(&desired.neighbors, &actual.neighbors, |(l, ip), want, have| match (want, have) {
        (Some(m), h) if h != Some(m) => ops.neighbors_set.push((l, ip, *m)),
        (None, Some(m)) => ops.neighbors_del.push((l, ip, *m)),
        _ => {}
    });
    merge(&desired.fdb, &actual.fdb, |(l, mac), want, have| match (want, have) {
        (Some(d), h) if h != Some(d) => ops.fdb_set.push((l, mac, *d)),
        (None, Some(d)) => ops.fdb_del.push((l, mac, *d)),
        _ => {}
    });
    merge(&desired.nexthops, &actual.nexthops, |id, want, have| match (want, have) {
        (Some(n), None) => ops.nexthops_add.push((id, *n)),
        (Some(n), Some(a)) if a != n => ops.nexthops_set.push((id, *n)),
        (None, Some(a)) => ops.nexthops_del.push((id, *a)),
        _ => {}
    });
    merge(&desired.routes, &actual.routes, |_, want, have| match (want, have) {
        (Some(r), None) => ops.routes_add.push(*r),
        (Some(r), Some(a)) if a != r => ops.routes_set.push(*r),
        (None, Some(a)) => ops.routes_del.push(*a),
        _ => {}
    });
    ops
}

/// Points every route of `desired` at a nexthop object: the id of one of our nexthops in
/// `actual` that already goes the same way (so a restarted daemon adopts what is there and
/// traffic never stops), else the lowest id of [`NEXTHOP_IDS`] that is neither ours nor
/// `taken` (the ids of every nexthop in the kernel, whoever made it). Fills
/// `desired.nexthops`; a duplicate or unused nexthop of ours is then left for [`diff`] to
/// delete. Work is O(routes + nexthops) map operations.
pub fn assign_nexthops(desired: &mut KernelState, actual: &KernelState, taken: &dyn Fn(u32) -> bool) {
    // Ours by where they go, the lowest id first for each (a sorted list: no map to build).
    let mut existing: Vec<(Nexthop, u32)> = actual.nexthops.iter().map(|(&id, nh)| (*nh, id)).collect();
    existing.sort_unstable();
    existing.dedup_by_key(|e| e.0);
    // Allocated in this call (rarely more than a few in a resync).
    let mut fresh: BTreeMap<Nexthop, u32> = BTreeMap::new();
    let mut next = NEXTHOP_IDS.start;
    let mut chosen: Vec<(u32, Nexthop)> = Vec::with_capacity(desired.routes.len());
    for r in desired.routes.values_mut() {
        let nh = r.nexthop();
        let found = existing.binary_search_by(|e| e.0.cmp(&nh)).ok().map(|i| existing[i].1);
        let id = match found.or_else(|| fresh.get(&nh).copied()) {
            Some(id) => id,
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
                fresh.insert(nh, id);
                id
            }
        };
        r.nhid = Some(id);
        chosen.push((id, nh));
    }
    desired.nexthops = chosen.into_iter().collect();
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

    /// The diff by definition: a lookup of every key in the other map.
    fn naive_diff(desired: &KernelState, actual: &KernelState) -> Ops {
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
        ops.routes_del =
            actual.routes.iter().filter(|(k, _)| !desired.routes.contains_key(k)).map(|(_, r)| *r).collect();
        ops.nexthops_del =
            actual.nexthops.iter().filter(|(k, _)| !desired.nexthops.contains_key(k)).map(|(k, n)| (*k, *n)).collect();
        ops.fdb_del =
            actual.fdb.iter().filter(|(k, _)| !desired.fdb.contains_key(k)).map(|(k, d)| (k.0, k.1, *d)).collect();
        ops.neighbors_del = actual
            .neighbors
            .iter()
            .filter(|(k, _)| !desired.neighbors.contains_key(k))
            .map(|(k, m)| (k.0, k.1, *m))
            .collect();
        ops
    }

    fn arb_state() -> impl proptest::strategy::Strategy<Value = KernelState> {
        use proptest::prelude::*;
        // Few distinct keys and values, so that both maps share keys with equal and unequal values.
        let link = prop_oneof![Just(LinkRef::Vxlan4), Just(LinkRef::Vxlan6), Just(LinkRef::External)];
        let ip = (0u8..6).prop_map(|i| IpAddr::from([10, 5, i, 0]));
        let mac = (0u8..4).prop_map(|i| [0x0e, 0, 0, 0, 0, i]);
        let route = (0u8..6, 0u8..3, link.clone(), any::<bool>(), proptest::option::of(0u32..4)).prop_map(
            |(d, via, link, onlink, nhid)| Route {
                dst: IpNet::new(IpAddr::from([10, 5, d, 0]), 24).unwrap(),
                via: IpAddr::from([192, 0, 2, via]),
                link,
                onlink,
                nhid,
            },
        );
        let nh = (0u8..3, link.clone(), any::<bool>()).prop_map(|(via, link, onlink)| Nexthop {
            via: IpAddr::from([192, 0, 2, via]),
            link,
            onlink,
        });
        (
            proptest::collection::vec(route, 0..8),
            proptest::collection::vec(((link.clone(), ip.clone()), mac.clone()), 0..8),
            proptest::collection::vec(((link, mac), ip), 0..8),
            proptest::collection::vec((0u32..6, nh), 0..8),
        )
            .prop_map(|(routes, neighbors, fdb, nexthops)| Builder { routes, neighbors, fdb, nexthops }.build())
    }

    proptest::proptest! {
        /// The ordered walk finds exactly what a lookup of every key finds, in the same order.
        #[test]
        fn the_merged_diff_equals_the_diff_by_lookup(want in arb_state(), have in arb_state()) {
            proptest::prop_assert_eq!(diff(&want, &have), naive_diff(&want, &have));
            proptest::prop_assert!(diff(&want, &want).is_empty());
        }
    }

    #[test]
    fn the_builder_keeps_the_later_of_two_entries_for_one_key() {
        let dst: IpNet = "10.5.2.0/24".parse().unwrap();
        let a = Route::new(dst, "10.5.2.0".parse().unwrap(), LinkRef::Vxlan4, true);
        let b = Route::new(dst, "192.0.2.2".parse().unwrap(), LinkRef::External, false);
        let s = Builder { routes: vec![a, b], ..Builder::default() }.build();
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.routes[&dst], b, "as inserting one after the other would");
    }

    #[test]
    fn planning_from_leases_and_from_peers_read_once_agree() {
        let mut peers = vx_peers(4);
        peers.push(peer("10.5.40.0-24", [192, 0, 2, 40], "host-gw", None));
        let mut bad = peer("10.5.41.0-24", [192, 0, 2, 41], "vxlan", None);
        bad.attrs.backend_data = Some(RawValue::from_string(r#"{"VtepMAC":null}"#.into()).unwrap());
        peers.push(bad);
        let read: Vec<Peer> = peers.iter().map(Peer::of).collect();
        let a = plan(&vxlan(false), &peers, &HostFacts::default());
        let b = plan_peers(&vxlan(false), &read, &HostFacts::default());
        assert_eq!(a.state, b.state);
        assert_eq!(a.skipped, b.skipped);
        assert_eq!(b.skipped.len(), 1, "the vxlan peer without a VtepMAC");
        assert_eq!(b.state.routes.len(), 4, "the host-gw peer is another backend's");
        let hg = plan_peers(&BackendSpec::HostGw, &read, &HostFacts::default());
        assert_eq!(hg.state.routes.len(), 1);
        let wg = plan_peers(&BackendSpec::Alloc, &read, &HostFacts::default());
        assert!(wg.state.routes.is_empty() && wg.skipped.is_empty());
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
