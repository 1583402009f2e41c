//! udp: `flannel0` (a TUN device) carries the whole cluster network; the userspace engine
//! (`crate::udp`) forwards its packets to peers over UDP.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
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

    /// `flannel0` up with our MTU, our base address /32, and `<Network> dev flannel0`.
    /// Idempotent: the reconciler calls it on every pass to repair what was changed.
    pub async fn ensure(&self, kernel: &Kernel) -> Result<(), KernelError> {
        let Some(own) = self.own else { return Ok(()) };
        let h = &kernel.handle;
        let link = link_by_name(h, DEVICE)
            .await?
            .ok_or_else(|| KernelError { op: format!("find {DEVICE}"), source: rtnetlink::Error::RequestFailed })?;
        let idx = link.header.index;
        h.link()
            .set(LinkUnspec::new_with_index(idx).mtu(self.mtu).up().build())
            .execute()
            .await
            .map_err(err("set flannel0 up"))?;
        ensure_address(h, idx, IpNet::new(IpAddr::V4(own.network()), 32).expect("/32"), IpNet::V4(self.network))
            .await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.network.network(), self.network.prefix_len())
            .output_interface(idx)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build();
        h.route().add(route).replace().execute().await.map_err(err("route the network to flannel0"))
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
