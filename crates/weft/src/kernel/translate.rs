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
use weft_core::plan::{KernelState, LinkRef, Nexthop, Route};

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
    if let Some(id) = r.nhid {
        // Where it goes is the nexthop's business: no gateway, device or onlink here (the
        // kernel refuses them beside an id).
        let mut msg = prefix_message(r.dst);
        msg.header.protocol = WEFT_PROTOCOL;
        msg.header.scope = RouteScope::Universe;
        msg.attributes.push(RouteAttribute::NhId(id));
        return msg;
    }
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
    if r.nhid.is_some() {
        // The kernel matches a route through a nexthop object by its id, never by device.
        let mut msg = route_add(r, idx);
        msg.header.protocol = RouteProtocol::Unspec;
        return msg;
    }
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

/// `RTM_NEWNEXTHOP`, `RTM_DELNEXTHOP`, `RTM_GETNEXTHOP` (the netlink crates do not know
/// nexthop messages; they are built and read here).
pub const RTM_NEWNEXTHOP: u16 = 104;
/// See [`RTM_NEWNEXTHOP`].
pub const RTM_DELNEXTHOP: u16 = 105;
/// See [`RTM_NEWNEXTHOP`].
pub const RTM_GETNEXTHOP: u16 = 106;
/// The multicast group of nexthop changes.
pub const RTNLGRP_NEXTHOP: u32 = 32;
const NHA_ID: u16 = 1;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
/// `RTNH_F_ONLINK` in `nhmsg.nh_flags`.
const RTNH_F_ONLINK: u32 = 4;
const NHMSG_LEN: usize = 8;

/// A nexthop object as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NexthopEntry {
    /// Its id.
    pub id: u32,
    /// Who made it (ours: protocol 87).
    pub protocol: u8,
    /// Output device, if any.
    pub oif: Option<u32>,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// `onlink`.
    pub onlink: bool,
    /// A blackhole nexthop.
    pub blackhole: bool,
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

fn nhmsg(family: AddressFamily, flags: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.push(u8::from(family));
    b.push(0); // scope: the kernel works it out
    b.push(87); // protocol, as [`WEFT_PROTOCOL`]
    b.push(0);
    b.extend_from_slice(&flags.to_ne_bytes());
    b
}

/// The payload of `RTM_NEWNEXTHOP` for nexthop `id` = `nh` on link index `idx`
/// (`ip nexthop add id <id> via <gw> dev <idx> [onlink] proto 87`).
pub fn nexthop_add(id: u32, nh: &Nexthop, idx: u32) -> Vec<u8> {
    let family = if nh.via.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let mut b = nhmsg(family, if nh.onlink { RTNH_F_ONLINK } else { 0 });
    push_attr(&mut b, NHA_ID, &id.to_ne_bytes());
    push_attr(&mut b, NHA_OIF, &idx.to_ne_bytes());
    match nh.via {
        IpAddr::V4(a) => push_attr(&mut b, NHA_GATEWAY, &a.octets()),
        IpAddr::V6(a) => push_attr(&mut b, NHA_GATEWAY, &a.octets()),
    }
    b
}

/// The payload of `RTM_NEWNEXTHOP` for `ip nexthop add id <id> blackhole proto 87` (the
/// probe whether the kernel has nexthop objects: it needs no device).
pub fn nexthop_blackhole(id: u32) -> Vec<u8> {
    // The kernel wants a family for a blackhole (as `ip` sends it).
    let mut b = nhmsg(AddressFamily::Inet, 0);
    push_attr(&mut b, NHA_ID, &id.to_ne_bytes());
    push_attr(&mut b, NHA_BLACKHOLE, &[]);
    b
}

/// The payload of `RTM_DELNEXTHOP` (and `RTM_GETNEXTHOP` for one id) for nexthop `id`.
pub fn nexthop_del(id: u32) -> Vec<u8> {
    let mut b = nhmsg(AddressFamily::Unspec, 0);
    b[2] = 0;
    push_attr(&mut b, NHA_ID, &id.to_ne_bytes());
    b
}

/// The payload of an `RTM_GETNEXTHOP` dump of every nexthop.
pub fn nexthop_dump() -> Vec<u8> {
    let mut b = nhmsg(AddressFamily::Unspec, 0);
    b[2] = 0;
    b
}

/// Reads a nexthop message's payload (`nhmsg` and attributes); `None` when it is too short
/// or has no id.
pub fn parse_nexthop(payload: &[u8]) -> Option<NexthopEntry> {
    if payload.len() < NHMSG_LEN {
        return None;
    }
    let protocol = payload[2];
    let flags = u32::from_ne_bytes(payload[4..8].try_into().ok()?);
    let mut e = NexthopEntry {
        id: 0,
        protocol,
        oif: None,
        gateway: None,
        onlink: flags & RTNH_F_ONLINK != 0,
        blackhole: false,
    };
    let mut rest = &payload[NHMSG_LEN..];
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        let data = &rest[4..len];
        match (kind, data.len()) {
            (NHA_ID, 4) => e.id = u32::from_ne_bytes(data.try_into().ok()?),
            (NHA_OIF, 4) => e.oif = Some(u32::from_ne_bytes(data.try_into().ok()?)),
            (NHA_GATEWAY, 4) => e.gateway = Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (NHA_GATEWAY, 16) => e.gateway = Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            (NHA_BLACKHOLE, _) => e.blackhole = true,
            _ => {}
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    (e.id != 0).then_some(e)
}

/// A route's nexthop object id (`nhid`).
pub fn route_nhid(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| if let RouteAttribute::NhId(id) = a { Some(*id) } else { None })
}

/// What a dump of the kernel returned: routes (both families), neighbours of the vxlan
/// devices' families, and the bridge FDB.
#[derive(Debug, Default, Clone)]
pub struct Dump {
    /// Every nexthop object (empty where the kernel has none).
    pub nexthops: Vec<NexthopEntry>,
    /// Routes.
    pub routes: Vec<RouteEntry>,
    /// Neighbours (IPv4 and IPv6).
    pub neighbours: Vec<NeighEntry>,
    /// FDB entries (family AF_BRIDGE).
    pub fdb: Vec<NeighEntry>,
}

/// The fields of a dumped route weft reads, parsed in place from the message (no allocation:
/// a resync reads every route of the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteEntry {
    /// Routing table.
    pub table: u32,
    /// Protocol (87: ours).
    pub protocol: u8,
    /// Route type (1: unicast).
    pub kind: u8,
    /// `rtm_flags` (`RTNH_F_ONLINK`).
    pub flags: u32,
    /// Destination.
    pub dst: Option<IpNet>,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
    /// Nexthop object id.
    pub nhid: Option<u32>,
}

/// The fields of a dumped neighbour or FDB entry weft reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NeighEntry {
    /// Address family (`AF_INET`, `AF_INET6`, `AF_BRIDGE`).
    pub family: u8,
    /// Device.
    pub ifindex: u32,
    /// IP address (the underlay address for FDB entries).
    pub dst: Option<IpAddr>,
    /// MAC.
    pub mac: Option<Mac>,
}

/// Walks netlink attributes: (kind without flag bits, data).
fn attrs(mut rest: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let data = &rest[4..len];
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some((kind, data))
    })
}

fn ip_of(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    }
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.try_into().ok()?))
}

/// Reads a route message's payload (`rtmsg` and attributes).
pub fn parse_route(payload: &[u8]) -> Option<RouteEntry> {
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    const RTA_TABLE: u16 = 15;
    const RTA_NH_ID: u16 = 30;
    if payload.len() < 12 {
        return None;
    }
    let dst_len = payload[1];
    let mut e = RouteEntry {
        table: u32::from(payload[4]),
        protocol: payload[5],
        kind: payload[7],
        flags: u32::from_ne_bytes(payload[8..12].try_into().ok()?),
        ..RouteEntry::default()
    };
    for (kind, data) in attrs(&payload[12..]) {
        match kind {
            RTA_DST => e.dst = ip_of(data).and_then(|ip| IpNet::new(ip, dst_len).ok()),
            RTA_OIF => e.oif = u32_of(data),
            RTA_GATEWAY => e.gateway = ip_of(data),
            RTA_TABLE => e.table = u32_of(data).unwrap_or(e.table),
            RTA_NH_ID => e.nhid = u32_of(data),
            _ => {}
        }
    }
    Some(e)
}

/// Reads a neighbour message's payload (`ndmsg` and attributes).
pub fn parse_neigh(payload: &[u8]) -> Option<NeighEntry> {
    const NDA_DST: u16 = 1;
    const NDA_LLADDR: u16 = 2;
    if payload.len() < 12 {
        return None;
    }
    let mut e = NeighEntry {
        family: payload[0],
        ifindex: u32::from_ne_bytes(payload[4..8].try_into().ok()?),
        ..NeighEntry::default()
    };
    for (kind, data) in attrs(&payload[12..]) {
        match kind {
            NDA_DST => e.dst = ip_of(data),
            NDA_LLADDR => e.mac = <[u8; 6]>::try_from(data).ok(),
            _ => {}
        }
    }
    Some(e)
}

/// The payload of a route dump request of `family` (`AF_INET`, `AF_INET6`).
pub fn route_dump(family: AddressFamily) -> Vec<u8> {
    let mut b = vec![0; 12];
    b[0] = u8::from(family);
    b
}

/// The payload of a neighbour dump request of `family` (`AF_BRIDGE` for the FDB).
pub fn neigh_dump(family: AddressFamily) -> Vec<u8> {
    route_dump(family)
}

/// The entries of `dump` that belong to us: routes of protocol [`WEFT_PROTOCOL`], wherever
/// they point (so a route a bad lease once made outside the network is found and removed
/// too); routes inside `networks` on a vxlan device, which is ours (also those flannel or
/// an older weft made with another protocol); neighbours and FDB entries on the vxlan
/// devices. Nothing else is ever reported, so nothing else is ever changed.
/// Also returns our own subnets whose route was displaced by a route via a gateway on
/// the external interface (what a hostile lease did before weft validated leases).
pub fn read_state(dump: &Dump, links: &Links, networks: &[IpNet], own: &[IpNet]) -> (KernelState, Vec<IpNet>) {
    let (mut state, displaced) = read_routes(&dump.nexthops, &dump.routes, links, networks, own);
    let neighbours = read_neighbours(&dump.neighbours, &dump.fdb, links);
    (state.neighbors, state.fdb) = (neighbours.neighbors, neighbours.fdb);
    (state, displaced)
}

/// The routing half of [`read_state`]: our nexthop objects and routes (the neighbour and FDB
/// maps stay empty), and our displaced subnets. Apart from the other half, so that a resync
/// builds the two on two threads.
pub fn read_routes(
    nexthops: &[NexthopEntry],
    routes: &[RouteEntry],
    links: &Links,
    networks: &[IpNet],
    own: &[IpNet],
) -> (KernelState, Vec<IpNet>) {
    let mut displaced = Vec::new();
    // Lists built into maps at once (a resync reads every entry; see `plan::Builder`).
    let mut s = weft_core::plan::Builder::default();
    // The kernel dumps nexthops by id; sorted here whatever it did, for binary search.
    let mut by_id: Vec<&NexthopEntry> = nexthops.iter().collect();
    if !by_id.is_sorted_by_key(|n| n.id) {
        by_id.sort_by_key(|n| n.id);
    }
    for n in &by_id {
        if n.protocol != 87 || n.blackhole {
            continue;
        }
        if let (Some(via), Some(link)) = (n.gateway, n.oif.and_then(|i| links.link(i))) {
            s.nexthops.push((n.id, Nexthop { via, link, onlink: n.onlink }));
        }
    }
    const UNICAST: u8 = 1;
    const ONLINK: u32 = 4;
    for r in routes {
        if r.table != u32::from(MAIN_TABLE) || r.kind != UNICAST {
            continue;
        }
        // A route through a nexthop object goes where the object says (the dump repeats it
        // only while `nexthop_compat_mode` is on).
        let nh = r.nhid.and_then(|id| by_id.binary_search_by_key(&id, |n| n.id).ok().map(|i| by_id[i]));
        let Some(dst) = r.dst else { continue };
        let Some(oif) = nh.map_or(r.oif, |n| n.oif) else { continue };
        let (gateway, onlink) = match nh {
            Some(n) => (n.gateway, n.onlink),
            None => (r.gateway, r.flags & ONLINK != 0),
        };
        if own.contains(&dst) && oif == links.external && gateway.is_some() {
            displaced.push(dst);
        }
        let Some(link) = links.link(oif) else { continue };
        let protocol = RouteProtocol::from(r.protocol);
        let ours = protocol == WEFT_PROTOCOL
            || (link != LinkRef::External
                && protocol != RouteProtocol::Kernel
                && networks.iter().any(|n| n.contains(&dst) && n.prefix_len() < dst.prefix_len()));
        if !ours {
            continue;
        }
        let nhid = r.nhid;
        let route = match gateway {
            Some(via) => Route { dst, via, link, onlink, nhid },
            // A route without a gateway is not one we make: replace or delete it.
            None => Route { dst, via: dst.network(), link, onlink: false, nhid },
        };
        s.routes.push(route);
    }
    (s.build(), displaced)
}

/// The neighbour half of [`read_state`]: the neighbours and FDB entries on our vxlan devices
/// (the route and nexthop maps stay empty).
pub fn read_neighbours(neighbours: &[NeighEntry], fdb: &[NeighEntry], links: &Links) -> KernelState {
    let mut s = weft_core::plan::Builder::default();
    for n in neighbours {
        let Some(link @ (LinkRef::Vxlan4 | LinkRef::Vxlan6)) = links.link(n.ifindex) else { continue };
        let family_ok = match link {
            LinkRef::Vxlan4 => n.family == u8::from(AddressFamily::Inet),
            _ => n.family == u8::from(AddressFamily::Inet6),
        };
        if let (true, Some(ip), Some(mac)) = (family_ok, n.dst, n.mac) {
            s.neighbors.push(((link, ip), mac));
        }
    }
    for n in fdb {
        let Some(link @ (LinkRef::Vxlan4 | LinkRef::Vxlan6)) = links.link(n.ifindex) else { continue };
        if let (Some(mac), Some(dst)) = (n.mac, n.dst)
            && mac != [0; 6]
        {
            s.fdb.push(((link, mac), dst));
        }
    }
    s.build()
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
            Some(g) => route_add(&Route::new(net(dst), ip(g), LinkRef::External, false), oif),
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

    /// A route message as the raw dump parser reads it.
    fn entry(m: RouteMessage) -> RouteEntry {
        use netlink_packet_core::Emitable;
        let mut b = vec![0; m.buffer_len()];
        m.emit(&mut b);
        parse_route(&b).unwrap()
    }

    /// A neighbour message as the raw dump parser reads it.
    fn neigh(m: NeighbourMessage) -> NeighEntry {
        use netlink_packet_core::Emitable;
        let mut b = vec![0; m.buffer_len()];
        m.emit(&mut b);
        parse_neigh(&b).unwrap()
    }

    fn has(m: &RouteMessage, a: &RouteAttribute) -> bool {
        m.attributes.contains(a)
    }

    #[test]
    fn a_vxlan_route_is_built_onlink_with_our_protocol_gateway_device_and_main_table() {
        let r = Route::new(net("10.5.3.0/24"), ip("10.5.3.0"), LinkRef::Vxlan4, true);
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
        let r = Route::new(net("fd00:5:3::/64"), ip("2001:db8::3"), LinkRef::External, false);
        let m = route_add(&r, 2);
        assert!(!m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.address_family, AddressFamily::Inet6);
        assert!(has(&m, &RouteAttribute::Gateway(RouteAddress::Inet6("2001:db8::3".parse().unwrap()))));
        assert!(has(&m, &RouteAttribute::Oif(2)));
        // Mixed families never reach the kernel as a half-built route.
        let bad = Route::new(net("10.5.3.0/24"), ip("2001:db8::3"), LinkRef::External, false);
        assert_eq!(route_add(&bad, 2), RouteMessage::default());
    }

    #[test]
    fn a_route_deletion_matches_by_destination_and_device_and_on_the_external_link_only_ours() {
        let vx = Route::new(net("10.5.3.0/24"), ip("10.5.3.0"), LinkRef::Vxlan4, true);
        let m = route_del(&vx, 7);
        assert!(!m.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))));
        assert!(!m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.protocol, RouteProtocol::Unspec);
        let ext = Route::new(net("10.5.3.0/24"), ip("192.0.2.3"), LinkRef::External, false);
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
            nexthops: vec![],
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
            ]
            .into_iter()
            .map(entry)
            .collect(),
            neighbours: vec![
                neighbour_set(7, ip("10.5.3.0"), &mac),
                // Another device.
                neighbour_set(3, ip("10.5.7.0"), &mac),
                // The external interface is not ours for neighbours.
                neighbour_set(2, ip("192.0.2.1"), &mac),
            ]
            .into_iter()
            .map(neigh)
            .collect(),
            fdb: vec![
                fdb_set(7, &mac, ip("192.0.2.3")),
                // The all-zero (flood) entry is the kernel's.
                fdb_set(7, &[0; 6], ip("192.0.2.3")),
                fdb_set(3, &mac, ip("192.0.2.7")),
            ]
            .into_iter()
            .map(neigh)
            .collect(),
        };
        let (s, displaced) = read_state(&dump, &LINKS, &networks, &own);
        let routes: Vec<_> = s.routes.values().copied().collect();
        assert_eq!(
            routes,
            vec![
                Route::new(net("10.5.3.0/24"), ip("10.5.3.0"), LinkRef::Vxlan4, true),
                Route::new(net("10.5.4.0/24"), ip("192.0.2.4"), LinkRef::External, false),
                Route::new(net("203.0.113.0/24"), ip("192.0.2.5"), LinkRef::External, false),
            ]
        );
        assert_eq!(s.neighbors.into_iter().collect::<Vec<_>>(), vec![((LinkRef::Vxlan4, ip("10.5.3.0")), mac)]);
        assert_eq!(s.fdb.into_iter().collect::<Vec<_>>(), vec![((LinkRef::Vxlan4, mac), ip("192.0.2.3"))]);
        assert_eq!(displaced, vec![net("10.5.1.0/24")]);
    }

    #[test]
    fn a_route_without_gateway_on_our_device_is_reported_to_be_replaced() {
        let dump = Dump { routes: vec![entry(dumped("10.5.3.0/24", None, 7, RouteProtocol::Boot))], ..Dump::default() };
        let (s, _) = read_state(&dump, &LINKS, &[net("10.5.0.0/16")], &[]);
        let r = s.routes[&net("10.5.3.0/24")];
        assert_eq!((r.via, r.onlink), (ip("10.5.3.0"), false));
    }

    #[test]
    fn a_nexthop_is_built_with_our_protocol_and_read_back() {
        let nh = Nexthop { via: ip("10.5.3.0"), link: LinkRef::Vxlan4, onlink: true };
        let b = nexthop_add(87_000_001, &nh, 7);
        assert_eq!(b[0], u8::from(AddressFamily::Inet));
        assert_eq!(b[2], 87, "protocol 87");
        let e = parse_nexthop(&b).unwrap();
        assert_eq!(
            e,
            NexthopEntry {
                id: 87_000_001,
                protocol: 87,
                oif: Some(7),
                gateway: Some(ip("10.5.3.0")),
                onlink: true,
                blackhole: false
            }
        );
        let v6 = Nexthop { via: ip("2001:db8::3"), link: LinkRef::External, onlink: false };
        let e = parse_nexthop(&nexthop_add(9, &v6, 2)).unwrap();
        assert_eq!((e.gateway, e.onlink, e.oif), (Some(ip("2001:db8::3")), false, Some(2)));
        let bh = parse_nexthop(&nexthop_blackhole(5)).unwrap();
        assert!(bh.blackhole && bh.gateway.is_none());
        assert_eq!(parse_nexthop(&nexthop_del(5)).map(|e| (e.id, e.protocol)), Some((5, 0)));
        // Truncated or id-less messages are nothing, not a panic.
        assert_eq!(parse_nexthop(&b[..5]), None);
        assert_eq!(parse_nexthop(&nexthop_dump()), None);
        let mut bad = b.clone();
        bad[8] = 200; // an attribute longer than the message
        let _ = parse_nexthop(&bad);
    }

    #[test]
    fn a_route_through_a_nexthop_carries_only_the_id_and_is_deleted_by_it() {
        let r =
            Route { nhid: Some(87_000_004), ..Route::new(net("10.5.3.0/24"), ip("10.5.3.0"), LinkRef::Vxlan4, true) };
        let m = route_add(&r, 7);
        assert_eq!(route_nhid(&m), Some(87_000_004));
        assert_eq!((route_gateway(&m), route_oif(&m)), (None, None), "the kernel refuses a gateway beside an id");
        assert!(!m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!((m.header.protocol, m.header.table, m.header.kind), (WEFT_PROTOCOL, MAIN_TABLE, RouteType::Unicast));
        let d = route_del(&r, 7);
        assert_eq!((route_nhid(&d), route_oif(&d)), (Some(87_000_004), None), "matched by id, never by device");
    }

    #[test]
    fn routes_through_our_nexthops_are_read_as_where_they_go_and_foreign_nexthops_are_not_ours() {
        let ours = NexthopEntry {
            id: 87_000_001,
            protocol: 87,
            oif: Some(7),
            gateway: Some(ip("10.5.3.0")),
            onlink: true,
            blackhole: false,
        };
        let foreign = NexthopEntry { id: 12, protocol: 3, oif: Some(2), gateway: Some(ip("192.0.2.9")), ..ours };
        // A route through our nexthop as the kernel dumps it without compat mode: id only.
        let mut through = prefix_message(net("10.5.3.0/24"));
        through.header.table = MAIN_TABLE;
        through.header.kind = RouteType::Unicast;
        through.header.protocol = WEFT_PROTOCOL;
        through.attributes.push(RouteAttribute::NhId(87_000_001));
        // Someone else's route through their nexthop, inside the Network on the external link.
        let mut theirs = through.clone();
        theirs.header.protocol = RouteProtocol::Static;
        theirs.header.destination_prefix_length = 24;
        theirs.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet("10.5.9.0".parse().unwrap())),
            RouteAttribute::NhId(12),
        ];
        let dump =
            Dump { nexthops: vec![ours, foreign], routes: vec![entry(through), entry(theirs)], ..Dump::default() };
        let (s, _) = read_state(&dump, &LINKS, &[net("10.5.0.0/16")], &[]);
        assert_eq!(s.nexthops.len(), 1, "only protocol 87 is ours");
        assert_eq!(s.nexthops[&87_000_001], Nexthop { via: ip("10.5.3.0"), link: LinkRef::Vxlan4, onlink: true });
        let want =
            Route { nhid: Some(87_000_001), ..Route::new(net("10.5.3.0/24"), ip("10.5.3.0"), LinkRef::Vxlan4, true) };
        assert_eq!(s.routes.values().copied().collect::<Vec<_>>(), vec![want]);
    }
}
