//! Links and their addresses, for any backend's devices: look a link up by name, set it up
//! with an MTU, give it exactly one address inside the network, route a prefix to it.

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};
use weft_core::backend::Mac;

use super::{Kernel, KernelError, err, translate};

/// A link as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Kernel index.
    pub index: u32,
    /// Administratively up.
    pub up: bool,
    /// MTU.
    pub mtu: Option<u32>,
    /// MAC, for links that have one.
    pub mac: Option<Mac>,
}

pub(super) fn mac_of(l: &LinkMessage) -> Option<Mac> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) if m.len() == 6 => Some([m[0], m[1], m[2], m[3], m[4], m[5]]),
        _ => None,
    })
}

pub(super) fn mtu_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None })
}

impl From<&LinkMessage> for LinkState {
    fn from(l: &LinkMessage) -> Self {
        LinkState { index: l.header.index, up: l.header.flags.contains(LinkFlags::Up), mtu: mtu_of(l), mac: mac_of(l) }
    }
}

/// The link called `name`, if any.
pub(super) async fn by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, KernelError> {
    match h.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(err(format!("look up link {name}"))(e)),
    }
}

/// Gives device `index` the address `addr` and removes its other addresses inside `network`.
/// Returns whether anything changed.
pub(super) async fn ensure_address(h: &Handle, index: u32, addr: IpNet, network: IpNet) -> Result<bool, KernelError> {
    let current: Vec<_> =
        h.address().get().set_link_index_filter(index).execute().try_collect().await.map_err(err("dump addresses"))?;
    let mut present = false;
    let mut changed = false;
    for a in current {
        let Some(ip) =
            a.attributes.iter().find_map(|x| if let AddressAttribute::Address(ip) = x { Some(*ip) } else { None })
        else {
            continue;
        };
        if ip == addr.addr() && a.header.prefix_len == addr.prefix_len() {
            present = true;
        } else if network.contains(&ip) {
            h.address().del(a).execute().await.map_err(err(format!("remove stale address {ip}")))?;
            changed = true;
        }
    }
    if !present {
        h.address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
            .map_err(err(format!("add address {addr}")))?;
        changed = true;
    }
    Ok(changed)
}

impl Kernel {
    /// The link called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<LinkState>, KernelError> {
        Ok(by_name(&self.handle, name).await?.as_ref().map(LinkState::from))
    }

    /// Sets link `index` up with `mtu`.
    pub async fn set_up(&self, index: u32, mtu: u32, what: &str) -> Result<(), KernelError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(err(format!("set {what} up")))
    }

    /// Gives device `index` the address `addr` and removes its other addresses inside
    /// `network`; `Ok(true)` when anything changed.
    pub async fn ensure_address(&self, index: u32, addr: IpNet, network: IpNet) -> Result<bool, KernelError> {
        ensure_address(&self.handle, index, addr, network).await
    }

    /// Whether this kernel can create a `wireguard` link: creates one called `name` and
    /// deletes it again. `Err` carries the kernel's answer (no module: "operation not
    /// supported").
    pub async fn probe_wireguard(&self, name: &str) -> Result<(), KernelError> {
        let mut msg = LinkUnspec::new_with_name(name).build();
        msg.attributes.push(LinkAttribute::LinkInfo(vec![netlink_packet_route::link::LinkInfo::Kind(
            netlink_packet_route::link::InfoKind::Wireguard,
        )]));
        self.handle.link().add(msg).execute().await.map_err(err(format!("create a wireguard link {name}")))?;
        if let Some(l) = by_name(&self.handle, name).await? {
            self.handle.link().del(l.header.index).execute().await.map_err(err(format!("delete {name}")))?;
        }
        Ok(())
    }

    /// Creates a `wireguard` link called `name` (down, unconfigured).
    pub async fn add_wireguard_link(&self, name: &str) -> Result<(), KernelError> {
        let mut msg = LinkUnspec::new_with_name(name).build();
        msg.attributes.push(LinkAttribute::LinkInfo(vec![netlink_packet_route::link::LinkInfo::Kind(
            netlink_packet_route::link::InfoKind::Wireguard,
        )]));
        self.handle.link().add(msg).execute().await.map_err(err(format!("create a wireguard link {name}")))
    }

    /// Deletes the link called `name` if there is one; `Ok(true)` when it was there.
    pub async fn delete_link(&self, name: &str) -> Result<bool, KernelError> {
        let Some(l) = by_name(&self.handle, name).await? else { return Ok(false) };
        self.handle.link().del(l.header.index).execute().await.map_err(err(format!("delete {name}")))?;
        Ok(true)
    }

    /// Routes all of `network` to device `index` (`scope link proto boot`) unless a route
    /// for it is already there (ours from an earlier pass, or someone else's: left alone).
    pub async fn ensure_device_route(&self, network: Ipv4Net, index: u32) -> Result<(), KernelError> {
        match self.handle.route().add(translate::device_route(network, index)).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(err(format!("route {network} to device {index}"))(e)),
        }
    }

    /// [`Kernel::ensure_device_route`] for an IPv6 network (wireguard's `flannel-wg-v6`).
    pub async fn ensure_device_route_v6(&self, network: ipnet::Ipv6Net, index: u32) -> Result<(), KernelError> {
        let msg = rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(network.network(), network.prefix_len())
            .output_interface(index)
            .scope(netlink_packet_route::route::RouteScope::Link)
            .protocol(netlink_packet_route::route::RouteProtocol::Boot)
            .build();
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(err(format!("route {network} to device {index}"))(e)),
        }
    }
}
