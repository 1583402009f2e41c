//! udp: `flannel0` (a TUN device) carries the whole cluster network; the userspace engine
//! (`crate::udp`) forwards its packets to peers over UDP.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use weft_core::backend::UdpSettings;
use weft_core::iface::External;
use weft_core::lease::Lease;
use weft_core::packet::PeerTable;

use super::BackendError;
use crate::daemon::metrics::Metrics;
use crate::kernel::vxlan::{ensure_address, link_by_name};
use crate::kernel::{Kernel, KernelError, err};
use crate::udp::{DEVICE, Udp};

/// The udp backend.
pub struct UdpBackend {
    engine: Udp,
    mtu: u32,
    network: Ipv4Net,
    own: Option<Ipv4Net>,
}

impl UdpBackend {
    /// Opens the TUN device and binds the socket on the interface address.
    pub fn open(
        ext: &External,
        s: UdpSettings,
        mtu: u32,
        network: Option<Ipv4Net>,
    ) -> Result<UdpBackend, BackendError> {
        let network = network.ok_or_else(|| BackendError::Address("udp: the backend needs an IPv4 Network".into()))?;
        let bind = ext
            .iface_addr
            .ok_or_else(|| BackendError::Address(format!("udp: interface {} has no IPv4 address", ext.name)))?;
        let engine = Udp::open(bind, s.port).map_err(|e| {
            BackendError::Address(format!(
                "udp: cannot open {DEVICE} or bind UDP {bind}:{}: {e}; is another flanneld or weft running here?",
                s.port
            ))
        })?;
        Ok(UdpBackend { engine, mtu, network, own: None })
    }

    /// Addresses and routes `flannel0` for our lease and starts forwarding.
    pub async fn start(&mut self, kernel: &Kernel, own: Ipv4Net, metrics: &Metrics) -> Result<(), KernelError> {
        self.own = Some(own);
        self.ensure(kernel).await?;
        self.engine.start(own, own.network(), metrics).map_err(|e| KernelError {
            op: format!("start the udp engine: {e}"),
            source: rtnetlink::Error::RequestFailed,
        })
    }

    /// `flannel0` up with our MTU, our base address /32, and `<Network> dev flannel0`;
    /// re-opened when it was deleted. Idempotent and quiet: the reconciler calls it on every
    /// pass, and it changes only what is wrong (each change wakes the reconciler again).
    pub async fn ensure(&self, kernel: &Kernel) -> Result<(), KernelError> {
        let Some(own) = self.own else { return Ok(()) };
        let h = &kernel.handle;
        let link = match link_by_name(h, DEVICE).await? {
            Some(l) => l,
            None => {
                tracing::warn!("{DEVICE} is gone; re-opening it and re-attaching the engine");
                self.engine.reopen().map_err(|e| KernelError {
                    op: format!("re-open {DEVICE}: {e}"),
                    source: rtnetlink::Error::RequestFailed,
                })?;
                link_by_name(h, DEVICE).await?.ok_or_else(|| KernelError {
                    op: format!("find {DEVICE} after re-opening it"),
                    source: rtnetlink::Error::RequestFailed,
                })?
            }
        };
        let idx = link.header.index;
        let mtu = link.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None });
        if !link.header.flags.contains(LinkFlags::Up) || mtu != Some(self.mtu) {
            tracing::warn!("{DEVICE} was down or had another MTU; restoring it");
            h.link()
                .set(LinkUnspec::new_with_index(idx).mtu(self.mtu).up().build())
                .execute()
                .await
                .map_err(err("set flannel0 up"))?;
        }
        ensure_address(h, idx, IpNet::new(IpAddr::V4(own.network()), 32).expect("/32"), IpNet::V4(self.network))
            .await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.network.network(), self.network.prefix_len())
            .output_interface(idx)
            .scope(RouteScope::Link)
            // flannel's text (`10.5.0.0/16 dev flannel0 scope link`): flannel0 is ours whole.
            .protocol(RouteProtocol::Boot)
            .build();
        match h.route().add(route).execute().await {
            Ok(()) => Ok(()),
            // Already there (ours from an earlier pass, or someone else's: left alone).
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(err("route the network to flannel0")(e)),
        }
    }

    /// Swaps in a new peer table (udp leases carry no BackendType).
    pub fn set_peers<'a>(&self, prefix: u8, peers: impl Iterator<Item = &'a Lease>) {
        let table = PeerTable::new(
            prefix,
            peers.filter(|l| l.attrs.backend_type.is_empty()).filter_map(|l| l.key.v4.map(|n| (n, l.attrs.public_ip))),
        );
        self.engine.peers.set(table);
    }
}
