//! udp: `flannel0` (a TUN device) carries the whole cluster network; the userspace engine
//! (`crate::udp`) forwards its packets to peers over UDP.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use weft_core::backend::UdpSettings;
use weft_core::cache::{LeaseCache, LeaseEvent};
use weft_core::iface::External;
use weft_core::lease::Lease;
use weft_core::packet::PeerTable;

use futures::future::BoxFuture;
use weft_core::lease::SubnetKey;
use weft_core::plan::Plan;

use super::{Backend, BackendError};
use crate::kernel::{Kernel, KernelError};
use crate::metrics::Metrics;
use crate::udp::{DEVICE, Udp};

/// The udp backend.
pub struct UdpBackend {
    engine: Udp,
    mtu: u32,
    network: Ipv4Net,
    subnet_len: u8,
    own: Option<Ipv4Net>,
    /// `flannel0`'s index, as of the last repair.
    index: Option<u32>,
}

impl UdpBackend {
    /// Opens the TUN device and binds the socket on the interface address.
    pub fn open(
        ext: &External,
        s: UdpSettings,
        mtu: u32,
        network: Option<Ipv4Net>,
        subnet_len: u8,
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
        Ok(UdpBackend { engine, mtu, network, subnet_len, own: None, index: None })
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
    pub async fn ensure(&mut self, kernel: &Kernel) -> Result<(), KernelError> {
        let Some(own) = self.own else { return Ok(()) };
        let link = match kernel.link(DEVICE).await? {
            Some(l) => l,
            None => {
                tracing::warn!("{DEVICE} is gone; re-opening it and re-attaching the engine");
                self.engine.reopen().map_err(|e| KernelError {
                    op: format!("re-open {DEVICE}: {e}"),
                    source: rtnetlink::Error::RequestFailed,
                })?;
                kernel.link(DEVICE).await?.ok_or_else(|| KernelError {
                    op: format!("find {DEVICE} after re-opening it"),
                    source: rtnetlink::Error::RequestFailed,
                })?
            }
        };
        self.index = Some(link.index);
        if !link.up || link.mtu != Some(self.mtu) {
            tracing::warn!("{DEVICE} was down or had another MTU; restoring it");
            kernel.set_up(link.index, self.mtu, DEVICE).await?;
        }
        kernel
            .ensure_address(
                link.index,
                IpNet::new(IpAddr::V4(own.network()), 32).expect("/32"),
                IpNet::V4(self.network),
            )
            .await?;
        // flannel's text (`10.5.0.0/16 dev flannel0 scope link`): flannel0 is ours whole.
        kernel.ensure_device_route(self.network, link.index).await
    }

    /// Replaces the engine's peer table with one built from `peers` (the accepted leases;
    /// udp leases carry no BackendType).
    pub fn set_peers<'a>(&self, peers: impl Iterator<Item = &'a Lease>) {
        self.engine.peers.set(PeerTable::of_leases(self.subnet_len, peers));
    }
}

impl Backend for UdpBackend {
    fn name(&self) -> &'static str {
        "udp"
    }

    /// The socket is bound to the interface address; `flannel0` is repaired by name.
    fn uses_underlay(&self) -> bool {
        false
    }

    fn start<'a>(
        &'a mut self,
        kernel: &'a Kernel,
        own: &'a SubnetKey,
        metrics: &'a Metrics,
    ) -> BoxFuture<'a, Result<(), KernelError>> {
        Box::pin(async move {
            match own.v4 {
                Some(v4) => UdpBackend::start(self, kernel, v4, metrics).await,
                None => Ok(()),
            }
        })
    }

    fn ensure_devices<'a>(
        &'a mut self,
        kernel: &'a Kernel,
        _own: &'a SubnetKey,
    ) -> BoxFuture<'a, Result<bool, KernelError>> {
        Box::pin(async move { self.ensure(kernel).await.map(|()| false) })
    }

    fn devices(&self) -> Vec<(String, u32)> {
        self.index.map(|i| (DEVICE.to_string(), i)).into_iter().collect()
    }

    /// The engine forwards by its own peer table; the kernel holds no per-peer entries.
    fn plan(&self, _peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan> {
        None
    }

    /// One peer's two entries per event, changed in place under the table's write lock.
    fn peers_changed(&self, events: &[LeaseEvent], cache: &LeaseCache) {
        self.engine.peers.update(|t| t.apply(events, cache));
    }

    fn peers_reset(&self, cache: &LeaseCache) {
        self.set_peers(cache.accepted());
    }

    fn stop(&mut self) {
        self.engine.stop();
    }
}
