//! The kernel side of the data plane over netlink: read the routes, neighbours and FDB
//! entries that belong to us, apply a diff computed by `weft_core::plan`, manage the vxlan
//! device, and watch for changes made behind our back.

pub mod monitor;
pub mod vxlan;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{StreamExt, TryStreamExt, stream};
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use weft_core::backend::Mac;
use weft_core::plan::{KernelState, LinkRef, Ops, Route};

/// A netlink operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct KernelError {
    /// What was attempted.
    pub op: String,
    /// The kernel's answer.
    #[source]
    pub source: rtnetlink::Error,
}

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
    fn index(&self, l: LinkRef) -> Option<u32> {
        match l {
            LinkRef::External => Some(self.external),
            LinkRef::Vxlan4 => self.vxlan4,
            LinkRef::Vxlan6 => self.vxlan6,
        }
    }

    fn link(&self, index: u32) -> Option<LinkRef> {
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

/// Turns a netlink error into a [`KernelError`] that says what was attempted.
pub(crate) fn err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let op = op.into();
    move |source| KernelError { op, source }
}

fn route_dst(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => IpNet::new(IpAddr::V4(*ip), len).ok(),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => IpNet::new(IpAddr::V6(*ip), len).ok(),
        _ => None,
    })
}

fn route_gateway(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        RouteAttribute::Via(netlink_packet_route::route::RouteVia::Inet(ip)) => Some(IpAddr::V4(*ip)),
        _ => None,
    })
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None })
}

fn neigh_dst(n: &NeighbourMessage) -> Option<IpAddr> {
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

fn neigh_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v) => NeighbourAddress::Inet(v),
        IpAddr::V6(v) => NeighbourAddress::Inet6(v),
    }
}

fn neigh_mac(n: &NeighbourMessage) -> Option<Mac> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => Some([m[0], m[1], m[2], m[3], m[4], m[5]]),
        _ => None,
    })
}

/// The route protocol of every route weft installs (`ip route` shows `proto 87`): how a
/// restarted daemon and the resync recognise their routes, wherever they point, and leave
/// every other route alone. flannel installs its routes as `proto boot`.
pub const WEFT_PROTOCOL: RouteProtocol = RouteProtocol::Other(87);

/// What applying a diff did besides succeeding.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes that failed (retried on the next pass).
    pub errors: Vec<KernelError>,
    /// Routes not created because a route of someone else has the same destination: left
    /// alone, never replaced.
    pub blocked: Vec<Route>,
}

/// How many netlink requests are in flight at once while applying a diff.
const PARALLEL: usize = 64;

/// Netlink access for the data plane.
#[derive(Clone)]
pub struct Kernel {
    /// The rtnetlink handle.
    pub handle: Handle,
}

impl Kernel {
    /// Wraps a handle.
    pub fn new(handle: Handle) -> Self {
        Kernel { handle }
    }

    /// Reads the entries that belong to us: routes of protocol [`WEFT_PROTOCOL`], wherever
    /// they point (so a route a bad lease once made outside the network is found and removed
    /// too); routes inside `networks` on a vxlan device, which is ours (also those flannel or
    /// an older weft made with another protocol); permanent neighbours and FDB entries on the
    /// vxlan devices. Nothing else is ever reported, so nothing else is ever changed.
    /// Also returns our own subnets whose route was displaced by a route via a gateway on
    /// the external interface (what a hostile lease did before weft validated leases).
    pub async fn read_state(
        &self,
        links: &Links,
        networks: &[IpNet],
        own: &[IpNet],
    ) -> Result<(KernelState, Vec<IpNet>), KernelError> {
        let mut displaced = Vec::new();
        let mut s = KernelState::default();
        for v6 in [false, true] {
            let msg = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let routes: Vec<RouteMessage> =
                self.handle.route().get(msg).execute().try_collect().await.map_err(err("dump routes"))?;
            for r in routes {
                if r.header.table != 254 || r.header.kind != RouteType::Unicast {
                    continue;
                }
                let (Some(dst), Some(oif)) = (route_dst(&r), route_oif(&r)) else { continue };
                if own.contains(&dst) && oif == links.external && route_gateway(&r).is_some() {
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
                let route = match route_gateway(&r) {
                    Some(via) => Route { dst, via, link, onlink },
                    // A route without a gateway is not one we make: replace or delete it.
                    None => Route { dst, via: dst.network(), link, onlink: false },
                };
                s.routes.insert(dst, route);
            }
        }
        for (link, family) in [(LinkRef::Vxlan4, AddressFamily::Inet), (LinkRef::Vxlan6, AddressFamily::Inet6)] {
            let Some(idx) = links.index(link) else { continue };
            let neighs: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(err("dump neighbours"))?;
            for n in neighs.iter().filter(|n| n.header.ifindex == idx) {
                if let (Some(ip), Some(mac)) = (neigh_dst(n), neigh_mac(n)) {
                    s.neighbors.insert((link, ip), mac);
                }
            }
        }
        if links.vxlan4.is_some() || links.vxlan6.is_some() {
            let fdb: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute()
                .try_collect()
                .await
                .map_err(err("dump fdb"))?;
            for n in &fdb {
                let Some(link @ (LinkRef::Vxlan4 | LinkRef::Vxlan6)) = links.link(n.header.ifindex) else { continue };
                if let (Some(mac), Some(dst)) = (neigh_mac(n), neigh_dst(n))
                    && mac != [0; 6]
                {
                    s.fdb.insert((link, mac), dst);
                }
            }
        }
        Ok((s, displaced))
    }

    /// Puts back the route of our own subnet `net` on the device holding an address inside
    /// it (the CNI bridge, `cni0`), as the kernel makes it, in place of a route via the
    /// external interface that displaced it. Does nothing while no such device exists.
    pub async fn restore_own_route(&self, net: IpNet, external: u32) -> Result<bool, KernelError> {
        let addrs: Vec<_> = self.handle.address().get().execute().try_collect().await.map_err(err("dump addresses"))?;
        let holder = addrs.iter().find_map(|a| {
            let ip = a.attributes.iter().find_map(|x| match x {
                netlink_packet_route::address::AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            (a.header.index != external && a.header.prefix_len == net.prefix_len() && net.contains(&ip))
                .then_some((a.header.index, ip))
        });
        let Some((index, src)) = holder else { return Ok(false) };
        let mut msg = match (net, src) {
            (IpNet::V4(n), IpAddr::V4(s)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .pref_source(s)
                .build(),
            (IpNet::V6(n), IpAddr::V6(_)) => {
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(n.network(), n.prefix_len()).build()
            }
            _ => return Ok(false),
        };
        msg.attributes.push(RouteAttribute::Oif(index));
        msg.header.scope = RouteScope::Link;
        msg.header.protocol = RouteProtocol::Kernel;
        self.handle.route().add(msg).replace().execute().await.map_err(err(format!("restore the route of {net}")))?;
        Ok(true)
    }

    fn route_message(&self, r: &Route, idx: u32) -> RouteMessage {
        let mut msg = match (r.dst, r.via) {
            (IpNet::V4(d), IpAddr::V4(g)) => {
                let b =
                    RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d.network(), d.prefix_len()).gateway(g);
                b.output_interface(idx).protocol(WEFT_PROTOCOL).scope(RouteScope::Universe).build()
            }
            (IpNet::V6(d), IpAddr::V6(g)) => {
                let b =
                    RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d.network(), d.prefix_len()).gateway(g);
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

    /// Applies `ops` in order (neighbours, FDB, routes; then deletions in reverse), many
    /// requests in flight at once. Keeps going past failures and returns them all.
    pub async fn apply(&self, ops: &Ops, links: &Links) -> Applied {
        let mut errors = Vec::new();
        let mut blocked = Vec::new();
        let missing = |l: LinkRef| KernelError {
            op: format!("{l:?} device is missing"),
            source: rtnetlink::Error::RequestFailed,
        };
        macro_rules! phase {
            ($items:expr, |$it:ident| $fut:expr) => {{
                let t = std::time::Instant::now();
                let results: Vec<Result<(), KernelError>> =
                    stream::iter($items.iter().map(|$it| $fut)).buffer_unordered(PARALLEL).collect().await;
                errors.extend(results.into_iter().filter_map(Result::err));
                tracing::debug!(items = $items.len(), took_us = t.elapsed().as_micros() as u64, "netlink phase");
            }};
        }
        phase!(ops.neighbors_set, |n| async move {
            let (l, ip, mac) = *n;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            self.handle
                .neighbours()
                .add(idx, ip)
                .link_layer_address(&mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(err(format!("set neighbour {ip}")))
        });
        phase!(ops.fdb_set, |f| async move {
            let (l, mac, dst) = *f;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            self.handle
                .neighbours()
                .add_bridge(idx, &mac)
                .destination(dst)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(err(format!("set fdb {} dst {dst}", weft_core::backend::mac_to_string(&mac))))
        });
        // Exclusive creation: the kernel refuses (EEXIST) when any route has this destination.
        let added: Vec<(Route, Result<(), KernelError>)> = stream::iter(ops.routes_add.iter().map(|r| async move {
            let res = match links.index(r.link) {
                None => Err(missing(r.link)),
                Some(idx) => self
                    .handle
                    .route()
                    .add(self.route_message(r, idx))
                    .execute()
                    .await
                    .map_err(err(format!("add route {}", r.dst))),
            };
            (*r, res)
        }))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
        for (r, res) in added {
            match res {
                Ok(()) => {}
                Err(KernelError { source: rtnetlink::Error::NetlinkError(e), .. }) if e.raw_code() == -libc::EEXIST => {
                    blocked.push(r)
                }
                Err(e) => errors.push(e),
            }
        }
        phase!(ops.routes_set, |r| async move {
            let idx = links.index(r.link).ok_or_else(|| missing(r.link))?;
            self.handle
                .route()
                .add(self.route_message(r, idx))
                .replace()
                .execute()
                .await
                .map_err(err(format!("set route {}", r.dst)))
        });
        phase!(ops.routes_del, |r| async move {
            let idx = links.index(r.link).ok_or_else(|| missing(r.link))?;
            let mut msg = self.route_message(r, idx);
            // Delete by destination and device only: whatever gateway the stale route has. On
            // the external interface only a route of our protocol matches; vxlan devices are
            // ours whole (older routes there may carry flannel's protocol).
            msg.attributes.retain(|a| !matches!(a, RouteAttribute::Gateway(_)));
            msg.header.flags.remove(RouteFlags::Onlink);
            if r.link != LinkRef::External {
                msg.header.protocol = RouteProtocol::Unspec;
            }
            self.handle.route().del(msg).execute().await.map_err(err(format!("delete route {}", r.dst)))
        });
        phase!(ops.fdb_del, |f| async move {
            let (l, mac, dst) = *f;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            let mut msg = NeighbourMessage::default();
            msg.header.family = AddressFamily::Bridge;
            msg.header.ifindex = idx;
            msg.header.flags = NeighbourFlags::Own;
            msg.header.state = NeighbourState::Permanent;
            msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
            msg.attributes.push(NeighbourAttribute::Destination(neigh_address(dst)));
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(err(format!("delete fdb {}", weft_core::backend::mac_to_string(&mac))))
        });
        phase!(ops.neighbors_del, |n| async move {
            let (l, ip, _) = *n;
            let idx = links.index(l).ok_or_else(|| missing(l))?;
            let mut msg = NeighbourMessage::default();
            msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            msg.header.ifindex = idx;
            msg.attributes.push(NeighbourAttribute::Destination(neigh_address(ip)));
            self.handle.neighbours().del(msg).execute().await.map_err(err(format!("delete neighbour {ip}")))
        });
        Applied { errors, blocked }
    }

    /// Keeps `blackhole <net>` routes for our subnets (`--ip-blackhole-route`).
    pub async fn ensure_blackholes(&self, nets: &[IpNet]) -> Result<(), KernelError> {
        for net in nets {
            let mut msg = match net {
                IpNet::V4(n) => {
                    RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(n.network(), n.prefix_len()).build()
                }
                IpNet::V6(n) => {
                    RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(n.network(), n.prefix_len()).build()
                }
            };
            msg.header.kind = RouteType::BlackHole;
            msg.header.protocol = RouteProtocol::Boot;
            msg.header.scope = RouteScope::Universe;
            match self.handle.route().add(msg).execute().await {
                Ok(()) => {}
                // EEXIST: a route for the subnet is already there (ours, or the CNI bridge's).
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                Err(e) => return Err(err(format!("add blackhole route {net}"))(e)),
            }
        }
        Ok(())
    }

    /// The prefixes directly connected on interface `index` (for DirectRouting).
    pub async fn connected_prefixes(&self, index: u32) -> Result<Vec<IpNet>, KernelError> {
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(err("dump addresses"))?;
        Ok(addrs
            .iter()
            .filter_map(|a| {
                a.attributes.iter().find_map(|x| match x {
                    netlink_packet_route::address::AddressAttribute::Address(ip) => {
                        IpNet::new(*ip, a.header.prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .map(|n| n.trunc())
            .collect())
    }
}
