//! Removing what weft installed in the kernel (`weft cleanup`): its devices (with them go
//! the neighbours, FDB entries, addresses and routes that live on them), the routes it
//! marks with protocol 87 wherever they point, and the blackhole routes of its own subnets.
//! Nothing else is touched: a device is ours only by flannel's name *and* kind.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteMessage, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::translate::route_dst;
use super::{KernelError, WEFT_PROTOCOL, err};

/// Whether a device of this name and kind is one weft (or flannel) makes: `flannel.<VNI>`
/// and `flannel-v6.<VNI>` vxlan devices, the `flannel0` TUN device, and the udp backend's
/// `weft-udp-rx` vxlan device.
pub fn is_own_device(name: &str, kind: Option<&InfoKind>) -> bool {
    let numbered =
        |p: &str| name.strip_prefix(p).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match kind {
        Some(InfoKind::Vxlan) => numbered("flannel.") || numbered("flannel-v6.") || name == "weft-udp-rx",
        Some(InfoKind::Tun) => name == "flannel0",
        _ => false,
    }
}

/// Whether a route is one weft installed: protocol 87 (any destination, any device), or a
/// blackhole route for one of our own subnets (`--ip-blackhole-route`).
pub fn is_own_route(r: &RouteMessage, own_subnets: &[IpNet]) -> bool {
    if r.header.protocol == WEFT_PROTOCOL {
        return true;
    }
    r.header.kind == RouteType::BlackHole && route_dst(r).is_some_and(|d| own_subnets.contains(&d))
}

fn name_of(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
        .unwrap_or_default()
}

fn kind_of(l: &LinkMessage) -> Option<InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => {
            infos.iter().find_map(|i| if let LinkInfo::Kind(k) = i { Some(k.clone()) } else { None })
        }
        _ => None,
    })
}

/// Deletes weft's devices; returns their names.
pub async fn remove_devices(h: &Handle) -> Result<Vec<String>, KernelError> {
    let links: Vec<LinkMessage> = h.link().get().execute().try_collect().await.map_err(err("dump links"))?;
    let mut removed = Vec::new();
    for l in links {
        let name = name_of(&l);
        if !is_own_device(&name, kind_of(&l).as_ref()) {
            continue;
        }
        match h.link().del(l.header.index).execute().await {
            Ok(()) => removed.push(name),
            // Gone meanwhile (a daemon still stopping): what we wanted.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(err(format!("delete device {name}"))(e)),
        }
    }
    Ok(removed)
}

/// Deletes weft's routes (see [`is_own_route`]) in every table; returns them as text.
pub async fn remove_routes(h: &Handle, own_subnets: &[IpNet]) -> Result<Vec<String>, KernelError> {
    let mut removed = Vec::new();
    for v6 in [false, true] {
        let msg = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let routes: Vec<RouteMessage> = h.route().get(msg).execute().try_collect().await.map_err(err("dump routes"))?;
        for r in routes.into_iter().filter(|r| is_own_route(r, own_subnets)) {
            let what = match route_dst(&r) {
                Some(d) if r.header.kind == RouteType::BlackHole => format!("blackhole {d}"),
                Some(d) => format!("{d} proto 87"),
                None => "a default route with proto 87".to_string(),
            };
            match h.route().del(r).execute().await {
                Ok(()) => removed.push(what),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(e) => return Err(err(format!("delete route {what}"))(e)),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flannels_names_with_the_right_kind_are_ours() {
        assert!(is_own_device("flannel.1", Some(&InfoKind::Vxlan)));
        assert!(is_own_device("flannel-v6.4096", Some(&InfoKind::Vxlan)));
        assert!(is_own_device("flannel0", Some(&InfoKind::Tun)));
        assert!(!is_own_device("flannel.1", Some(&InfoKind::Bridge)), "a bridge someone named flannel.1");
        assert!(!is_own_device("flannel.", Some(&InfoKind::Vxlan)));
        assert!(!is_own_device("flannel.1x", Some(&InfoKind::Vxlan)));
        assert!(!is_own_device("vxlan0", Some(&InfoKind::Vxlan)));
        assert!(!is_own_device("flannel0", Some(&InfoKind::Vxlan)));
        assert!(is_own_device("weft-udp-rx", Some(&InfoKind::Vxlan)));
        assert!(!is_own_device("weft-udp-rx", Some(&InfoKind::Tun)));
        assert!(!is_own_device("cni0", Some(&InfoKind::Bridge)));
        assert!(!is_own_device("flannel.1", None));
    }

    #[test]
    fn routes_are_ours_by_protocol_or_as_our_blackhole() {
        let own: IpNet = "10.5.1.0/24".parse().unwrap();
        let mut r = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::new(10, 5, 2, 0), 24).build();
        assert!(!is_own_route(&r, &[own]));
        r.header.protocol = WEFT_PROTOCOL;
        assert!(is_own_route(&r, &[own]));
        let mut b = super::super::translate::blackhole(own);
        assert!(is_own_route(&b, &[own]));
        assert!(!is_own_route(&b, &[]), "a blackhole for a subnet not ours stays");
        b.header.kind = RouteType::Unicast;
        assert!(!is_own_route(&b, &[own]), "the CNI bridge's route of our subnet stays");
    }
}
