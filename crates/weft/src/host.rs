//! Reads the host's interfaces, addresses and default routes over netlink, for interface
//! selection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};
use weft_core::iface::{Address, HostSnapshot, Interface};

/// A netlink failure while reading host state.
#[derive(Debug, thiserror::Error)]
#[error("reading {what} over netlink failed: {source}")]
pub struct HostError {
    what: &'static str,
    #[source]
    source: rtnetlink::Error,
}

/// Opens a netlink connection in the current network namespace.
pub fn connect() -> std::io::Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

fn oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

async fn default_route(h: &Handle, v6: bool) -> Result<Option<u32>, HostError> {
    let msg = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let routes: Vec<RouteMessage> =
        h.route().get(msg).execute().try_collect().await.map_err(|source| HostError { what: "routes", source })?;
    Ok(routes.iter().filter(|r| r.header.destination_prefix_length == 0 && r.header.table == 254).find_map(oif))
}

/// Reads everything interface selection needs; `can_reach` asks the kernel for the route to
/// that address.
pub async fn snapshot(h: &Handle, can_reach: Option<IpAddr>) -> Result<HostSnapshot, HostError> {
    let links: Vec<_> =
        h.link().get().execute().try_collect().await.map_err(|source| HostError { what: "links", source })?;
    let addrs: Vec<_> =
        h.address().get().execute().try_collect().await.map_err(|source| HostError { what: "addresses", source })?;
    let mut interfaces: Vec<Interface> = links
        .iter()
        .map(|l| Interface {
            name: l
                .attributes
                .iter()
                .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
                .unwrap_or_default(),
            index: l.header.index,
            mtu: l
                .attributes
                .iter()
                .find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None })
                .unwrap_or(0),
            addrs: Vec::new(),
        })
        .collect();
    for a in &addrs {
        let Some(ip) = a
            .attributes
            .iter()
            .find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })
        else {
            continue;
        };
        let flags = a
            .attributes
            .iter()
            .find_map(|x| match x {
                AddressAttribute::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(a.header.flags.bits())));
        if let Some(i) = interfaces.iter_mut().find(|i| i.index == a.header.index) {
            i.addrs.push(Address {
                ip,
                prefix: a.header.prefix_len,
                deprecated: flags.contains(AddressFlags::Deprecated),
                dynamic: ip.is_ipv6() && !flags.contains(AddressFlags::Permanent),
                temporary: ip.is_ipv6() && flags.contains(AddressFlags::Secondary),
            });
        }
    }
    let can_reach = match can_reach {
        None => None,
        Some(dst) => {
            let msg = match dst {
                IpAddr::V4(v) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(v, 32).build(),
                IpAddr::V6(v) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(v, 128).build(),
            };
            let routes: Vec<RouteMessage> = h
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(|source| HostError { what: "the route to --iface-can-reach", source })?;
            routes.first().and_then(|r| {
                let src = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::PrefSource(s) => match s {
                        netlink_packet_route::route::RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
                        netlink_packet_route::route::RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
                        _ => None,
                    },
                    _ => None,
                });
                oif(r).map(|i| (i, src))
            })
        }
    };
    Ok(HostSnapshot {
        interfaces,
        default_v4: default_route(h, false).await?,
        default_v6: default_route(h, true).await?,
        can_reach,
    })
}
