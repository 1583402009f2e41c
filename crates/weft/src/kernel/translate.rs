//! The pure half of the netlink door: plan entries → netlink messages, and dumped messages
//! → the [`KernelState`] that is ours. No socket here, so all of it is tested without root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::RouteMessageBuilder;
use weft_core::backend::Mac;
use weft_core::plan::{KernelState, LinkRef, Route};

/// The route protocol of every route weft installs (`ip route` shows `proto 87`): how a
/// restarted daemon and the resync recognise their routes, wherever they point, and leave
/// every other route alone. flannel installs its routes as `proto boot`.
pub const WEFT_PROTOCOL: RouteProtocol = RouteProtocol::Other(87);

/// The main routing table, the only one weft reads or writes.
const MAIN_TABLE: u8 = 254;

/// Kernel indexes of the links entries live on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Links {
    /// The external interface.
    pub external: u32,
    /// `flannel.<VNI>`, when vxlan runs.
    pub vxlan4: Option<u32>,
    /// `flannel-v6.<VNI>`, when vxlan runs dual stack.
    pub vxlan6: Option<u32>,
}

impl Links {
    /// The index of `l`, if that link exists.
    pub fn index(&self, l: LinkRef) -> Option<u32> {
        match l {
            LinkRef::External => Some(self.external),
            LinkRef::Vxlan4 => self.vxlan4,
            LinkRef::Vxlan6 => self.vxlan6,
        }
    }

    /// Which of our links has `index`.
    pub fn link(&self, index: u32) -> Option<LinkRef> {
        if Some(index) == self.vxlan4 {
            Some(LinkRef::Vxlan4)
        } else if Some(index) == self.vxlan6 {
            Some(LinkRef::Vxlan6)
        } else if index == self.external {
            Some(LinkRef::External)
        } else {
            None
        }
    }
}

/// A route's destination.
pub fn route_dst(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => IpNet::new(IpAddr::V4(*ip), len).ok(),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => IpNet::new(IpAddr::V6(*ip), len).ok(),
        _ => None,
    })
}

/// A route's gateway.
pub fn route_gateway(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        RouteAttribute::Via(netlink_packet_route::route::RouteVia::Inet(ip)) => Some(IpAddr::V4(*ip)),
        _ => None,
    })
}

/// A route's output interface.
pub fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None })
}

/// A neighbour's (or FDB entry's) destination address.
pub fn neigh_dst(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        // FDB entries (family AF_BRIDGE) carry the underlay address as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => Some(IpAddr::from([b[0], b[1], b[2], b[3]])),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

/// A neighbour's (or FDB entry's) MAC.
pub fn neigh_mac(n: &NeighbourMessage) -> Option<Mac> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => Some([m[0], m[1], m[2], m[3], m[4], m[5]]),
        _ => None,
    })
}

fn neigh_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v) => NeighbourAddress::Inet(v),
        IpAddr::V6(v) => NeighbourAddress::Inet6(v),
    }
}

fn prefix_message(net: IpNet) -> RouteMessage {
    match net {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(n.network(), n.prefix_len()).build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(n.network(), n.prefix_len()).build(),
    }
}

/// The message that creates (or replaces) route `r` on link index `idx`: protocol
/// [`WEFT_PROTOCOL`], main table, `onlink` when the plan says so.
pub fn route_add(r: &Route, idx: u32) -> RouteMessage {
    let mut msg = match (r.dst, r.via) {
        (IpNet::V4(d), IpAddr::V4(g)) => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d.network(), d.prefix_len()).gateway(g);
            b.output_interface(idx).protocol(WEFT_PROTOCOL).scope(RouteScope::Universe).build()
        }
        (IpNet::V6(d), IpAddr::V6(g)) => {
            let b = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d.network(), d.prefix_len()).gateway(g);
            b.output_interface(idx).protocol(WEFT_PROTOCOL).scope(RouteScope::Universe).build()
        }
        // Mixed families cannot come out of the planner; build something the kernel rejects.
        _ => RouteMessage::default(),
    };
    if r.onlink {
        msg.header.flags |= RouteFlags::Onlink;
    }
    msg
}

/// The message that deletes route `r`: by destination and device only, whatever gateway
/// the stale route has. On the external interface only a route of our protocol matches;
/// vxlan devices are ours whole (older routes there may carry flannel's protocol).
pub fn route_del(r: &Route, idx: u32) -> RouteMessage {
    let mut msg = route_add(r, idx);
    msg.attributes.retain(|a| !matches!(a, RouteAttribute::Gateway(_)));
    msg.header.flags.remove(RouteFlags::Onlink);
    if r.link != LinkRef::External {
        msg.header.protocol = RouteProtocol::Unspec;
    }
    msg
}

/// A permanent neighbour `ip lladdr mac` on link index `idx`.
pub fn neighbour_set(idx: u32, ip: IpAddr, mac: &Mac) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.ifindex = idx;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unspec;
    msg.attributes.push(NeighbourAttribute::Destination(neigh_address(ip)));
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg
}

/// Deletes the neighbour `ip` on link index `idx`.
pub fn neighbour_del(idx: u32, ip: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.ifindex = idx;
    msg.attributes.push(NeighbourAttribute::Destination(neigh_address(ip)));
    msg
}

/// A permanent FDB entry `mac dst <dst>` on link index `idx` (flag `self`).
pub fn fdb_set(idx: u32, mac: &Mac, dst: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = idx;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.header.kind = RouteType::Unspec;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(neigh_address(dst)));
    msg
}

/// Deletes the FDB entry `mac dst <dst>` on link index `idx`.
pub fn fdb_del(idx: u32, mac: &Mac, dst: IpAddr) -> NeighbourMessage {
    fdb_set(idx, mac, dst)
}

/// `blackhole <net> proto boot` (`--ip-blackhole-route`).
pub fn blackhole(net: IpNet) -> RouteMessage {
    let mut msg = prefix_message(net);
    msg.header.kind = RouteType::BlackHole;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.scope = RouteScope::Universe;
    msg
}

/// `<network> dev <idx> scope link proto boot`: flannel's route of the whole network to
/// `flannel0` (the udp backend), which is ours whole.
pub fn device_route(network: Ipv4Net, idx: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(idx)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Boot)
        .build()
}

/// The kernel route of our own subnet on the device holding `src`, as the kernel makes it
/// (what a displacing route replaced).
pub fn own_subnet_route(net: IpNet, index: u32, src: IpAddr) -> Option<RouteMessage> {
    let mut msg = match (net, src) {
        (IpNet::V4(n), IpAddr::V4(s)) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .pref_source(s)
            .build(),
        (IpNet::V6(n), IpAddr::V6(_)) => {
            RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(n.network(), n.prefix_len()).build()
        }
        _ => return None,
    };
    msg.attributes.push(RouteAttribute::Oif(index));
    msg.header.scope = RouteScope::Link;
    msg.header.protocol = RouteProtocol::Kernel;
    Some(msg)
}

/// What a dump of the kernel returned: routes (both families), neighbours of the vxlan
/// devices' families, and the bridge FDB.
#[derive(Debug, Default, Clone)]
pub struct Dump {
    /// Routes.
    pub routes: Vec<RouteMessage>,
    /// Neighbours (IPv4 and IPv6).
    pub neighbours: Vec<NeighbourMessage>,
    /// FDB entries (family AF_BRIDGE).
    pub fdb: Vec<NeighbourMessage>,
}

/// The entries of `dump` that belong to us: routes of protocol [`WEFT_PROTOCOL`], wherever
/// they point (so a route a bad lease once made outside the network is found and removed
/// too); routes inside `networks` on a vxlan device, which is ours (also those flannel or
/// an older weft made with another protocol); neighbours and FDB entries on the vxlan
/// devices. Nothing else is ever reported, so nothing else is ever changed.
/// Also returns our own subnets whose route was displaced by a route via a gateway on
/// the external interface (what a hostile lease did before weft validated leases).
pub fn read_state(dump: &Dump, links: &Links, networks: &[IpNet], own: &[IpNet]) -> (KernelState, Vec<IpNet>) {
    let mut displaced = Vec::new();
    let mut s = KernelState::default();
    for r in &dump.routes {
        if r.header.table != MAIN_TABLE || r.header.kind != RouteType::Unicast {
            continue;
        }
        let (Some(dst), Some(oif)) = (route_dst(r), route_oif(r)) else { continue };
        if own.contains(&dst) && oif == links.external && route_gateway(r).is_some() {
            displaced.push(dst);
        }
        let Some(link) = links.link(oif) else { continue };
        let ours = r.header.protocol == WEFT_PROTOCOL
            || (link != LinkRef::External
                && r.header.protocol != RouteProtocol::Kernel
                && networks.iter().any(|n| n.contains(&dst) && n.prefix_len() < dst.prefix_len()));
        if !ours {
            continue;
        }
        let onlink = r.header.flags.contains(RouteFlags::Onlink);
        let route = match route_gateway(r) {
            Some(via) => Route { dst, via, link, onlink },
            // A route without a gateway is not one we make: replace or delete it.
            None => Route { dst, via: dst.network(), link, onlink: false },
        };
        s.routes.insert(dst, route);
    }
    for n in &dump.neighbours {
        let Some(link @ (LinkRef::Vxlan4 | LinkRef::Vxlan6)) = links.link(n.header.ifindex) else { continue };
        let family_ok = match link {
            LinkRef::Vxlan4 => n.header.family == AddressFamily::Inet,
            _ => n.header.family == AddressFamily::Inet6,
        };
        if let (true, Some(ip), Some(mac)) = (family_ok, neigh_dst(n), neigh_mac(n)) {
            s.neighbors.insert((link, ip), mac);
        }
    }
    for n in &dump.fdb {
        let Some(link @ (LinkRef::Vxlan4 | LinkRef::Vxlan6)) = links.link(n.header.ifindex) else { continue };
        if let (Some(mac), Some(dst)) = (neigh_mac(n), neigh_dst(n))
            && mac != [0; 6]
        {
            s.fdb.insert((link, mac), dst);
        }
    }
    (s, displaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKS: Links = Links { external: 2, vxlan4: Some(7), vxlan6: Some(8) };

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A route as the kernel reports it in a dump.
    fn dumped(dst: &str, via: Option<&str>, oif: u32, protocol: RouteProtocol) -> RouteMessage {
        let mut m = match via {
            Some(g) => route_add(&Route { dst: net(dst), via: ip(g), link: LinkRef::External, onlink: false }, oif),
            None => prefix_message(net(dst)),
        };
        if via.is_none() {
            m.attributes.push(RouteAttribute::Oif(oif));
        }
        m.header.table = MAIN_TABLE;
        m.header.kind = RouteType::Unicast;
        m.header.protocol = protocol;
        m
    }

    fn has(m: &RouteMessage, a: &RouteAttribute) -> bool {
        m.attributes.contains(a)
    }

    #[test]
    fn a_vxlan_route_is_built_onlink_with_our_protocol_gateway_device_and_main_table() {
        let r = Route { dst: net("10.5.3.0/24"), via: ip("10.5.3.0"), link: LinkRef::Vxlan4, onlink: true };
        let m = route_add(&r, 7);
        assert_eq!(m.header.protocol, RouteProtocol::Other(87));
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.table, MAIN_TABLE);
        assert_eq!(m.header.kind, RouteType::Unicast);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert_eq!(m.header.destination_prefix_length, 24);
        assert_eq!(m.header.address_family, AddressFamily::Inet);
        assert!(has(&m, &RouteAttribute::Destination(RouteAddress::Inet("10.5.3.0".parse().unwrap()))));
        assert!(has(&m, &RouteAttribute::Gateway(RouteAddress::Inet("10.5.3.0".parse().unwrap()))));
        assert!(has(&m, &RouteAttribute::Oif(7)));
    }

    #[test]
    fn a_host_gw_route_is_not_onlink_and_ipv6_keeps_its_family() {
        let r = Route { dst: net("fd00:5:3::/64"), via: ip("2001:db8::3"), link: LinkRef::External, onlink: false };
        let m = route_add(&r, 2);
        assert!(!m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.address_family, AddressFamily::Inet6);
        assert!(has(&m, &RouteAttribute::Gateway(RouteAddress::Inet6("2001:db8::3".parse().unwrap()))));
        assert!(has(&m, &RouteAttribute::Oif(2)));
        // Mixed families never reach the kernel as a half-built route.
        let bad = Route { dst: net("10.5.3.0/24"), via: ip("2001:db8::3"), link: LinkRef::External, onlink: false };
        assert_eq!(route_add(&bad, 2), RouteMessage::default());
    }

    #[test]
    fn a_route_deletion_matches_by_destination_and_device_and_on_the_external_link_only_ours() {
        let vx = Route { dst: net("10.5.3.0/24"), via: ip("10.5.3.0"), link: LinkRef::Vxlan4, onlink: true };
        let m = route_del(&vx, 7);
        assert!(!m.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))));
        assert!(!m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.protocol, RouteProtocol::Unspec);
        let ext = Route { dst: net("10.5.3.0/24"), via: ip("192.0.2.3"), link: LinkRef::External, onlink: false };
        assert_eq!(route_del(&ext, 2).header.protocol, WEFT_PROTOCOL);
    }

    #[test]
    fn neighbour_and_fdb_entries_are_permanent_on_the_device() {
        let mac = [0x0e, 1, 2, 3, 4, 5];
        let n = neighbour_set(7, ip("10.5.3.0"), &mac);
        assert_eq!(n.header.family, AddressFamily::Inet);
        assert_eq!(n.header.ifindex, 7);
        assert_eq!(n.header.state, NeighbourState::Permanent);
        assert_eq!((neigh_dst(&n), neigh_mac(&n)), (Some(ip("10.5.3.0")), Some(mac)));
        let f = fdb_set(7, &mac, ip("192.0.2.3"));
        assert_eq!(f.header.family, AddressFamily::Bridge);
        assert_eq!(f.header.flags, NeighbourFlags::Own);
        assert_eq!(f.header.state, NeighbourState::Permanent);
        assert_eq!((neigh_dst(&f), neigh_mac(&f)), (Some(ip("192.0.2.3")), Some(mac)));
        let d = neighbour_del(8, ip("fd00:5:3::"));
        assert_eq!((d.header.family, d.header.ifindex), (AddressFamily::Inet6, 8));
        assert_eq!(neigh_mac(&d), None);
    }

    #[test]
    fn blackhole_and_device_routes_are_flannels() {
        let b = blackhole(net("10.5.1.0/24"));
        assert_eq!((b.header.kind, b.header.protocol), (RouteType::BlackHole, RouteProtocol::Boot));
        assert_eq!(route_oif(&b), None);
        let d = device_route("10.5.0.0/16".parse().unwrap(), 9);
        assert_eq!((d.header.scope, d.header.protocol), (RouteScope::Link, RouteProtocol::Boot));
        assert_eq!((route_dst(&d), route_oif(&d), route_gateway(&d)), (Some(net("10.5.0.0/16")), Some(9), None));
    }

    #[test]
    fn a_dump_yields_only_our_entries() {
        let networks = [net("10.5.0.0/16")];
        let own = [net("10.5.1.0/24")];
        let mac = [0x0e, 1, 2, 3, 4, 5];
        let mut onlink = dumped("10.5.3.0/24", Some("10.5.3.0"), 7, RouteProtocol::Boot);
        onlink.header.flags |= RouteFlags::Onlink;
        let mut other_table = dumped("10.5.9.0/24", Some("192.0.2.9"), 2, WEFT_PROTOCOL);
        other_table.header.table = 100;
        let dump = Dump {
            routes: vec![
                // flannel's route on our vxlan device: ours.
                onlink,
                // host-gw route of our protocol on the external interface: ours.
                dumped("10.5.4.0/24", Some("192.0.2.4"), 2, WEFT_PROTOCOL),
                // Our protocol outside the Network (a bad lease's leftover): ours, to remove.
                dumped("203.0.113.0/24", Some("192.0.2.5"), 2, WEFT_PROTOCOL),
                // Not ours: another protocol on the external interface.
                dumped("10.5.6.0/24", Some("192.0.2.6"), 2, RouteProtocol::Static),
                // Not ours: another device.
                dumped("10.5.7.0/24", Some("192.0.2.7"), 3, WEFT_PROTOCOL),
                // Not ours: outside the Network on the vxlan device, of another protocol.
                dumped("172.16.0.0/24", Some("172.16.0.1"), 7, RouteProtocol::Boot),
                // Not ours: the kernel's own route on the vxlan device, and the Network itself.
                dumped("10.5.8.0/24", None, 7, RouteProtocol::Kernel),
                dumped("10.5.0.0/16", None, 7, RouteProtocol::Boot),
                // Not ours: another table.
                other_table,
                // Our subnet displaced via a gateway on the external interface.
                dumped("10.5.1.0/24", Some("192.0.2.66"), 2, RouteProtocol::Static),
            ],
            neighbours: vec![
                neighbour_set(7, ip("10.5.3.0"), &mac),
                // Another device.
                neighbour_set(3, ip("10.5.7.0"), &mac),
                // The external interface is not ours for neighbours.
                neighbour_set(2, ip("192.0.2.1"), &mac),
            ],
            fdb: vec![
                fdb_set(7, &mac, ip("192.0.2.3")),
                // The all-zero (flood) entry is the kernel's.
                fdb_set(7, &[0; 6], ip("192.0.2.3")),
                fdb_set(3, &mac, ip("192.0.2.7")),
            ],
        };
        let (s, displaced) = read_state(&dump, &LINKS, &networks, &own);
        let routes: Vec<_> = s.routes.values().copied().collect();
        assert_eq!(
            routes,
            vec![
                Route { dst: net("10.5.3.0/24"), via: ip("10.5.3.0"), link: LinkRef::Vxlan4, onlink: true },
                Route { dst: net("10.5.4.0/24"), via: ip("192.0.2.4"), link: LinkRef::External, onlink: false },
                Route { dst: net("203.0.113.0/24"), via: ip("192.0.2.5"), link: LinkRef::External, onlink: false },
            ]
        );
        assert_eq!(s.neighbors.into_iter().collect::<Vec<_>>(), vec![((LinkRef::Vxlan4, ip("10.5.3.0")), mac)]);
        assert_eq!(s.fdb.into_iter().collect::<Vec<_>>(), vec![((LinkRef::Vxlan4, mac), ip("192.0.2.3"))]);
        assert_eq!(displaced, vec![net("10.5.1.0/24")]);
    }

    #[test]
    fn a_route_without_gateway_on_our_device_is_reported_to_be_replaced() {
        let dump = Dump { routes: vec![dumped("10.5.3.0/24", None, 7, RouteProtocol::Boot)], ..Dump::default() };
        let (s, _) = read_state(&dump, &LINKS, &[net("10.5.0.0/16")], &[]);
        let r = s.routes[&net("10.5.3.0/24")];
        assert_eq!((r.via, r.onlink), (ip("10.5.3.0"), false));
    }
}
