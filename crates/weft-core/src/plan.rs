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
}

/// Routes, neighbours and FDB entries: desired or actual.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Routes by destination.
    pub routes: BTreeMap<IpNet, Route>,
    /// Permanent neighbours: (link, IP) → MAC.
    pub neighbors: BTreeMap<(LinkRef, IpAddr), Mac>,
    /// FDB entries: (link, MAC) → underlay destination.
    pub fdb: BTreeMap<(LinkRef, Mac), IpAddr>,
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
                    let r = Route {
                        dst: v4.into(),
                        via: peer.attrs.public_ip.into(),
                        link: LinkRef::External,
                        onlink: false,
                    };
                    p.state.routes.insert(r.dst, r);
                }
                if let (Some(v6), Some(ip6)) = (peer.key.v6, peer.attrs.public_ipv6) {
                    let r = Route { dst: v6.into(), via: ip6.into(), link: LinkRef::External, onlink: false };
                    p.state.routes.insert(r.dst, r);
                }
            }
            BackendSpec::Vxlan(v) => {
                if let Some(v4) = peer.key.v4 {
                    let public: IpAddr = peer.attrs.public_ip.into();
                    if v.direct_routing && facts.connected.iter().any(|n| n.contains(&public)) {
                        let r = Route { dst: v4.into(), via: public, link: LinkRef::External, onlink: false };
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
    s.routes.insert(subnet, Route { dst: subnet, via: gw, link, onlink: true });
}

/// What to change, in the order to apply it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ops {
    /// Neighbours to add or replace (first: a route is never used before its neighbour).
    pub neighbors_set: Vec<(LinkRef, IpAddr, Mac)>,
    /// FDB entries to add or replace.
    pub fdb_set: Vec<(LinkRef, Mac, IpAddr)>,
    /// Routes to create where we have none: created exclusively, so a route of someone else
    /// with the same destination (connected, the CNI bridge's, an administrator's) is never
    /// replaced.
    pub routes_add: Vec<Route>,
    /// Our own routes to replace (their next hop or link changed).
    pub routes_set: Vec<Route>,
    /// Routes to delete (first when removing).
    pub routes_del: Vec<Route>,
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
            + self.routes_add.len()
            + self.routes_set.len()
            + self.routes_del.len()
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
        out.extend(self.routes_add.iter().map(|r| format!("add route {} via {} on {:?}", r.dst, r.via, r.link)));
        out.extend(self.routes_set.iter().map(|r| format!("set route {} via {} on {:?}", r.dst, r.via, r.link)));
        out.extend(self.routes_del.iter().map(|r| format!("del route {} via {} on {:?}", r.dst, r.via, r.link)));
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
        assert_eq!(r, Route { dst: "10.5.2.0/24".parse().unwrap(), via: gw, link: LinkRef::Vxlan4, onlink: true });
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
            Route {
                dst: "10.5.3.0/24".parse().unwrap(),
                via: "10.5.3.9".parse().unwrap(),
                link: LinkRef::Vxlan4,
                onlink: true,
            },
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
}
