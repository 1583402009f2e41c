//! Netlink change notifications: wakes the reconciler when something we own changes (our
//! devices, routes, neighbours and FDB entries on them, their addresses, our subnet's
//! routes), so an entry deleted by hand or a deleted device is put back within moments.
//! Events about things we don't own, and the echoes of our own pass (entries now equal to
//! the desired state), do not wake it; a deletion of an entry we want always does.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use ipnet::IpNet;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::{RouteMessage, RouteType};
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;
use weft_core::plan::{KernelState, LinkRef, Route};

use super::translate::{
    Links, NexthopEntry, RTM_DELNEXTHOP, RTM_NEWNEXTHOP, RTNLGRP_NEXTHOP, WEFT_PROTOCOL, neigh_dst, neigh_mac,
    parse_nexthop, route_dst, route_gateway, route_nhid, route_oif,
};

/// What the data plane owns and wants, as of its last pass: the filter the monitor applies.
#[derive(Debug, Clone, Default)]
pub struct Interest {
    /// The external interface's name (followed when it is re-created).
    pub ext_name: String,
    /// Link indexes per-peer entries live on.
    pub links: Links,
    /// The backend's devices: name and index.
    pub devices: Vec<(String, u32)>,
    /// The Network(s).
    pub networks: Vec<IpNet>,
    /// Our lease's subnets.
    pub own: Vec<IpNet>,
    /// Whether `blackhole <own subnet>` routes are wanted.
    pub blackhole: bool,
    /// The per-peer entries wanted (with nexthop ids): also the data plane's model of what
    /// the kernel holds, which a peer change alone updates in place.
    pub desired: KernelState,
    /// Set when a relevant change was seen since the last full pass (which clears it): the
    /// kernel may no longer match the model.
    pub changed: Arc<std::sync::atomic::AtomicBool>,
}

/// The shared, updated-by-the-data-plane filter.
pub type SharedInterest = Arc<RwLock<Interest>>;

const MAIN_TABLE: u8 = 254;

impl Interest {
    fn device(&self, index: u32) -> bool {
        self.devices.iter().any(|(_, i)| *i == index)
            || self.links.vxlan4 == Some(index)
            || self.links.vxlan6 == Some(index)
    }

    fn link(&self, l: &LinkMessage) -> bool {
        let name = l.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n) } else { None });
        let index = l.header.index;
        index == self.links.external
            || self.device(index)
            || name.is_some_and(|n| *n == self.ext_name || self.devices.iter().any(|(d, _)| d == n))
    }

    fn address(&self, a: &AddressMessage) -> bool {
        let ip = a.attributes.iter().find_map(|x| if let AddressAttribute::Address(ip) = x { Some(*ip) } else { None });
        // An address inside our subnet (the CNI bridge's) decides where our own route goes.
        self.device(a.header.index) || ip.is_some_and(|ip| self.own.iter().any(|n| n.contains(&ip)))
    }

    /// The route as the planner would describe it, if it sits on one of our links.
    fn as_planned(&self, r: &RouteMessage, dst: IpNet) -> Option<Route> {
        let link = self.links.link(route_oif(r)?)?;
        let via = route_gateway(r)?;
        let onlink = r.header.flags.contains(netlink_packet_route::route::RouteFlags::Onlink);
        Some(Route { nhid: route_nhid(r), ..Route::new(dst, via, link, onlink) })
    }

    fn route(&self, r: &RouteMessage, deleted: bool) -> bool {
        if r.header.table != MAIN_TABLE {
            return false;
        }
        let Some(dst) = route_dst(r) else { return false };
        if self.own.contains(&dst) {
            // A blackhole we want, just (re)made: nothing to do. Anything else about our own
            // subnet (a displacing route, the blackhole gone) is looked at.
            return !(self.blackhole && !deleted && r.header.kind == RouteType::BlackHole);
        }
        if r.header.kind != RouteType::Unicast {
            return false;
        }
        if let Some(want) = self.desired.routes.get(&dst) {
            // Deleted: always put back. Added or replaced: only when it differs from ours.
            let same = match want.nhid {
                // Through a nexthop object: the id says it all (the kernel repeats the gateway
                // only in `nexthop_compat_mode`).
                Some(id) => route_nhid(r) == Some(id),
                None => self.as_planned(r, dst) == Some(*want),
            };
            return deleted || !same || r.header.protocol != WEFT_PROTOCOL;
        }
        let ours = r.header.protocol == WEFT_PROTOCOL;
        let on_device = route_oif(r).is_some_and(|i| self.device(i));
        if deleted {
            // Our own pass deleting what it does not want is an echo; a device route of the
            // backend (udp's `<Network> dev flannel0`) going away is not.
            return on_device && !ours;
        }
        // A route of ours we do not want, anything on our devices, or a route of someone
        // else inside the Network (it may block one of ours or free its place).
        ours || on_device || self.networks.iter().any(|n| n.contains(&dst))
    }

    fn neighbour(&self, n: &NeighbourMessage, deleted: bool) -> bool {
        let Some(link @ (LinkRef::Vxlan4 | LinkRef::Vxlan6)) = self.links.link(n.header.ifindex) else {
            // Only udp's flannel0 among the other devices: it has no neighbours we keep.
            return false;
        };
        let (Some(dst), Some(mac)) = (neigh_dst(n), neigh_mac(n)) else { return !deleted };
        let fdb = n.header.family == netlink_packet_route::AddressFamily::Bridge;
        let wanted = if fdb {
            self.desired.fdb.get(&(link, mac)) == Some(&dst)
        } else {
            self.desired.neighbors.get(&(link, dst)) == Some(&mac)
        };
        if deleted { self.wanted_key(link, fdb, dst, mac) } else { !wanted }
    }

    /// Whether an entry with this key is wanted (with whatever value): a deletion of it wakes.
    fn wanted_key(&self, link: LinkRef, fdb: bool, dst: IpAddr, mac: weft_core::backend::Mac) -> bool {
        if fdb {
            self.desired.fdb.contains_key(&(link, mac))
        } else {
            self.desired.neighbors.contains_key(&(link, dst))
        }
    }

    /// Records that the kernel changed behind our back.
    pub fn mark_changed(&self) {
        self.changed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a nexthop notification should wake the reconciler: one we want deleted (the
    /// kernel then drops the routes through it without telling), or one of ours that is not
    /// as we want it. Our own pass creating what we want, or deleting what we do not, is an echo.
    pub fn nexthop(&self, n: &NexthopEntry, deleted: bool) -> bool {
        let want = self.desired.nexthops.get(&n.id);
        if deleted {
            return want.is_some();
        }
        let ours = n.protocol == 87;
        let now = n.gateway.zip(n.oif.and_then(|i| self.links.link(i))).map(|(via, link)| weft_core::plan::Nexthop {
            via,
            link,
            onlink: n.onlink,
        });
        match want {
            Some(w) => now != Some(*w) || !ours,
            None => ours && !n.blackhole,
        }
    }

    /// Whether a notification should wake the reconciler.
    pub fn relevant(&self, msg: &RouteNetlinkMessage) -> bool {
        match msg {
            RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => self.link(l),
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => self.address(a),
            RouteNetlinkMessage::NewRoute(r) => self.route(r, false),
            RouteNetlinkMessage::DelRoute(r) => self.route(r, true),
            RouteNetlinkMessage::NewNeighbour(n) => self.neighbour(n, false),
            RouteNetlinkMessage::DelNeighbour(n) => self.neighbour(n, true),
            _ => false,
        }
    }
}

/// Subscribes to link, neighbour, route and address changes and notifies `wake` on each
/// one `interest` finds relevant. Returns when the subscription cannot be made.
pub fn spawn(wake: Arc<Notify>, interest: SharedInterest) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])?;
    tokio::spawn(conn);
    // The netlink crates do not know nexthop messages: a socket of its own reads them.
    let nexthops = nexthop_socket();
    if let Ok(sock) = nexthops {
        let (wake, interest) = (wake.clone(), interest.clone());
        tokio::spawn(async move {
            use rtnetlink::sys::AsyncSocketExt;
            loop {
                let Ok((buf, _)) = sock.recv_from_full().await else {
                    // ENOBUFS after a burst: the next pass sees everything anyway.
                    interest.read().unwrap_or_else(|p| p.into_inner()).mark_changed();
                    wake.notify_one();
                    continue;
                };
                let relevant = {
                    let i = interest.read().unwrap_or_else(|p| p.into_inner());
                    nexthop_messages(&buf).any(|(t, e)| i.nexthop(&e, t == RTM_DELNEXTHOP))
                };
                if relevant {
                    interest.read().unwrap_or_else(|p| p.into_inner()).mark_changed();
                    wake.notify_one();
                }
            }
        });
    }
    Ok(tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                // A poisoned lock still holds the last filter; better a spurious pass than none.
                let relevant = {
                    let i = interest.read().unwrap_or_else(|p| p.into_inner());
                    let r = i.relevant(&m);
                    if r {
                        i.mark_changed();
                    }
                    r
                };
                if relevant {
                    wake.notify_one();
                }
            }
        }
    }))
}

fn nexthop_socket() -> std::io::Result<rtnetlink::sys::TokioSocket> {
    use rtnetlink::sys::AsyncSocket;
    let mut sock = rtnetlink::sys::TokioSocket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
    sock.socket_mut().bind_auto()?;
    // Refused where the kernel has no nexthop objects: then there is nothing to watch.
    sock.socket_mut().add_membership(RTNLGRP_NEXTHOP)?;
    Ok(sock)
}

/// The nexthop messages in a received buffer: (type, nexthop).
fn nexthop_messages(buf: &[u8]) -> impl Iterator<Item = (u16, NexthopEntry)> + '_ {
    let mut rest = buf;
    std::iter::from_fn(move || {
        loop {
            if rest.len() < 16 {
                return None;
            }
            let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
            if len < 16 || len > rest.len() {
                return None;
            }
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let payload = &rest[16..len];
            rest = &rest[((len + 3) & !3).min(rest.len())..];
            if (kind == RTM_NEWNEXTHOP || kind == RTM_DELNEXTHOP)
                && let Some(e) = parse_nexthop(payload)
            {
                return Some((kind, e));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::translate::{blackhole, device_route, fdb_set, neighbour_set, route_add, route_del};
    use netlink_packet_route::route::RouteProtocol;

    const MAC: [u8; 6] = [0x0e, 1, 2, 3, 4, 5];

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn peer() -> Route {
        Route::new(net("10.5.3.0/24"), ip("10.5.3.0"), LinkRef::Vxlan4, true)
    }

    fn interest() -> Interest {
        let mut desired = KernelState::default();
        desired.routes.insert(peer().dst, peer());
        desired.neighbors.insert((LinkRef::Vxlan4, ip("10.5.3.0")), MAC);
        desired.fdb.insert((LinkRef::Vxlan4, MAC), ip("192.0.2.3"));
        Interest {
            ext_name: "eth0".into(),
            links: Links { external: 2, vxlan4: Some(7), vxlan6: None },
            devices: vec![("flannel.1".into(), 7)],
            networks: vec![net("10.5.0.0/16")],
            own: vec![net("10.5.1.0/24")],
            blackhole: true,
            desired,
            changed: Default::default(),
        }
    }

    /// A route as the kernel announces it (main table, unicast).
    fn announced(mut m: RouteMessage) -> RouteMessage {
        m.header.table = MAIN_TABLE;
        m
    }

    #[test]
    fn echoes_of_our_own_pass_do_not_wake() {
        let i = interest();
        // The route, neighbour and FDB entry we just wrote, as desired.
        assert!(!i.relevant(&RouteNetlinkMessage::NewRoute(announced(route_add(&peer(), 7)))));
        assert!(!i.relevant(&RouteNetlinkMessage::NewNeighbour(neighbour_set(7, ip("10.5.3.0"), &MAC))));
        assert!(!i.relevant(&RouteNetlinkMessage::NewNeighbour(fdb_set(7, &MAC, ip("192.0.2.3")))));
        // A stale route of ours that the pass deleted.
        let stale = Route::new(net("10.5.9.0/24"), ip("10.5.9.0"), LinkRef::Vxlan4, true);
        assert!(!i.relevant(&RouteNetlinkMessage::DelRoute(announced(route_add(&stale, 7)))));
        // A stale neighbour we deleted.
        assert!(!i.relevant(&RouteNetlinkMessage::DelNeighbour(neighbour_set(7, ip("10.5.9.0"), &MAC))));
        // The blackhole we keep.
        assert!(!i.relevant(&RouteNetlinkMessage::NewRoute(announced(blackhole(net("10.5.1.0/24"))))));
    }

    #[test]
    fn things_we_do_not_own_do_not_wake() {
        let i = interest();
        // ARP churn on the external interface and on other devices.
        assert!(!i.relevant(&RouteNetlinkMessage::NewNeighbour(neighbour_set(2, ip("192.0.2.1"), &MAC))));
        assert!(!i.relevant(&RouteNetlinkMessage::DelNeighbour(neighbour_set(3, ip("172.16.0.1"), &MAC))));
        // Someone else's route outside the Network, in the main table and in another one.
        let mut other = device_route("172.16.0.0/24".parse().unwrap(), 3);
        other.header.protocol = RouteProtocol::Static;
        assert!(!i.relevant(&RouteNetlinkMessage::NewRoute(announced(other.clone()))));
        assert!(!i.relevant(&RouteNetlinkMessage::DelRoute(announced(other))));
        let mut local = route_add(&peer(), 7);
        local.header.table = 255;
        assert!(!i.relevant(&RouteNetlinkMessage::DelRoute(local)));
        // Another link.
        let mut l = LinkMessage::default();
        l.header.index = 3;
        l.attributes.push(LinkAttribute::IfName("veth9".into()));
        assert!(!i.relevant(&RouteNetlinkMessage::NewLink(l)));
    }

    #[test]
    fn deletions_and_changes_of_what_we_want_wake() {
        let i = interest();
        // Deleted by hand: route, neighbour, FDB entry, the blackhole.
        assert!(i.relevant(&RouteNetlinkMessage::DelRoute(announced(route_del(&peer(), 7)))));
        assert!(i.relevant(&RouteNetlinkMessage::DelNeighbour(neighbour_set(7, ip("10.5.3.0"), &MAC))));
        assert!(i.relevant(&RouteNetlinkMessage::DelNeighbour(fdb_set(7, &MAC, ip("192.0.2.3")))));
        assert!(i.relevant(&RouteNetlinkMessage::DelRoute(announced(blackhole(net("10.5.1.0/24"))))));
        // Replaced with another next hop, or another MAC.
        let moved = Route { via: ip("10.5.3.1"), ..peer() };
        assert!(i.relevant(&RouteNetlinkMessage::NewRoute(announced(route_add(&moved, 7)))));
        assert!(i.relevant(&RouteNetlinkMessage::NewNeighbour(neighbour_set(
            7,
            ip("10.5.3.0"),
            &[0x0e, 9, 9, 9, 9, 9]
        ))));
        // A route via the external interface displacing our own subnet's.
        let displacing = Route::new(net("10.5.1.0/24"), ip("192.0.2.66"), LinkRef::External, false);
        assert!(i.relevant(&RouteNetlinkMessage::NewRoute(announced(route_add(&displacing, 2)))));
        // Someone else's route inside the Network.
        let mut foreign = device_route("10.5.8.0/24".parse().unwrap(), 3);
        foreign.header.protocol = RouteProtocol::Static;
        assert!(i.relevant(&RouteNetlinkMessage::NewRoute(announced(foreign))));
        // Our device deleted, or the external interface re-created under a new index.
        let mut l = LinkMessage::default();
        l.header.index = 7;
        assert!(i.relevant(&RouteNetlinkMessage::DelLink(l)));
        let mut l = LinkMessage::default();
        l.header.index = 40;
        l.attributes.push(LinkAttribute::IfName("eth0".into()));
        assert!(i.relevant(&RouteNetlinkMessage::NewLink(l)));
        // The address of our device.
        let mut a = AddressMessage::default();
        a.header.index = 7;
        assert!(i.relevant(&RouteNetlinkMessage::DelAddress(a)));
    }

    #[test]
    fn the_udp_device_route_going_away_wakes() {
        let mut i = interest();
        i.devices = vec![("flannel0".into(), 9)];
        i.links = Links { external: 2, vxlan4: None, vxlan6: None };
        i.desired = KernelState::default();
        let r = announced(device_route("10.5.0.0/16".parse().unwrap(), 9));
        assert!(i.relevant(&RouteNetlinkMessage::DelRoute(r)));
    }

    #[test]
    fn a_wanted_nexthop_deleted_or_altered_wakes_and_our_echoes_do_not() {
        let mut i = interest();
        let nh = weft_core::plan::Nexthop { via: ip("10.5.3.0"), link: LinkRef::Vxlan4, onlink: true };
        i.desired.nexthops.insert(87_000_001, nh);
        let r = i.desired.routes.get_mut(&peer().dst).unwrap();
        r.nhid = Some(87_000_001);
        let entry = NexthopEntry {
            id: 87_000_001,
            protocol: 87,
            oif: Some(7),
            gateway: Some(ip("10.5.3.0")),
            onlink: true,
            blackhole: false,
        };
        assert!(!i.nexthop(&entry, false), "our own creation");
        assert!(i.nexthop(&entry, true), "deleted by hand: its routes went silently with it");
        assert!(i.nexthop(&NexthopEntry { gateway: Some(ip("10.5.3.9")), ..entry }, false), "altered");
        // A stale nexthop of ours deleted by our pass; someone else's nexthops.
        assert!(!i.nexthop(&NexthopEntry { id: 87_000_002, ..entry }, true));
        assert!(!i.nexthop(&NexthopEntry { id: 5, protocol: 3, ..entry }, false));
        assert!(!i.nexthop(&NexthopEntry { id: 5, protocol: 3, ..entry }, true));
        // A stray nexthop of ours that no route wants is looked at (and deleted).
        assert!(i.nexthop(&NexthopEntry { id: 87_000_009, ..entry }, false));
        // The route through the wanted nexthop, as announced: an echo; through another: not.
        let mut m = announced(route_add(&Route { nhid: Some(87_000_001), ..peer() }, 7));
        m.header.kind = RouteType::Unicast;
        assert!(!i.relevant(&RouteNetlinkMessage::NewRoute(m.clone())));
        let other = announced(route_add(&Route { nhid: Some(87_000_005), ..peer() }, 7));
        assert!(i.relevant(&RouteNetlinkMessage::NewRoute(other)));
        // A buffer of two messages is read as two nexthops.
        let mut buf = Vec::new();
        for (t, p) in [
            (RTM_NEWNEXTHOP, crate::kernel::translate::nexthop_add(1, &nh, 7)),
            (RTM_DELNEXTHOP, crate::kernel::translate::nexthop_del(2)),
        ] {
            let len = 16 + p.len();
            buf.extend_from_slice(&(len as u32).to_ne_bytes());
            buf.extend_from_slice(&t.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(&p);
            buf.resize(buf.len() + (4 - len % 4) % 4, 0);
        }
        let got: Vec<_> = nexthop_messages(&buf).map(|(t, e)| (t, e.id)).collect();
        assert_eq!(got, vec![(RTM_NEWNEXTHOP, 1), (RTM_DELNEXTHOP, 2)]);
    }
}
