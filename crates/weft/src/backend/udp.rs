//! udp: `flannel0` (a TUN device) carries the whole cluster network; the userspace engine
//! (`crate::udp`) forwards its packets to peers over UDP.

use std::net::{IpAddr, Ipv4Addr};

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
use crate::metrics::{Labels, Metrics};
use crate::udp::fastpath::Attachment;
use crate::udp::{DEVICE, Udp};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Adds what the fast path carried since the last rendering to `packets`.
fn fast_path_refresher(
    read: impl Fn() -> Option<(u64, u64)> + Send + Sync + 'static,
    packets: Family<Labels, Counter>,
) -> crate::metrics::Refresher {
    let last = std::sync::Mutex::new((0u64, 0u64));
    Box::new(move || {
        let Some((tx, rx)) = read() else { return };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        // Re-attached programs count from zero: then all they counted is new.
        let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
        packets.get_or_create(&vec![("direction", "tx")]).inc_by(delta(tx, last.0));
        packets.get_or_create(&vec![("direction", "rx")]).inc_by(delta(rx, last.1));
        *last = (tx, rx);
    })
}

/// The udp backend.
pub struct UdpBackend {
    engine: Udp,
    mtu: u32,
    network: Ipv4Net,
    subnet_len: u8,
    own: Option<Ipv4Net>,
    /// `flannel0`'s index, as of the last repair.
    index: Option<u32>,
    /// The external interface's name (the fast path's ingress follows it by name).
    ext_name: String,
    /// The engine's bind address and port.
    bind: Ipv4Addr,
    port: u16,
    /// `weft_udp_offload` (set at start).
    offload_metric: Option<Family<Labels, Gauge>>,
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
        Ok(UdpBackend {
            engine,
            mtu,
            network,
            subnet_len,
            own: None,
            index: None,
            ext_name: ext.name.clone(),
            bind,
            port: s.port,
            offload_metric: None,
        })
    }

    /// Addresses and routes `flannel0` for our lease and starts forwarding.
    pub async fn start(&mut self, kernel: &Kernel, own: Ipv4Net, metrics: &Metrics) -> Result<(), KernelError> {
        self.own = Some(own);
        if self.offload_metric.is_none() {
            self.offload_metric = Some(metrics.udp_offload.clone());
            metrics
                .on_render(fast_path_refresher(self.engine.fast_path_counter(), metrics.udp_fast_path_packets.clone()));
        }
        self.ensure(kernel).await?;
        self.engine.start(own, own.network(), self.mtu, metrics).map_err(|e| KernelError {
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
        kernel.ensure_device_route(self.network, link.index).await?;
        self.ensure_fast_path(kernel, own, link.index).await
    }

    /// The kernel fast path on flannel0's egress and the external interface's ingress,
    /// re-attached when either device was re-created.
    async fn ensure_fast_path(&mut self, kernel: &Kernel, own: Ipv4Net, tun_index: u32) -> Result<(), KernelError> {
        let Some(ext) = kernel.link(&self.ext_name).await? else {
            // The data plane waits for the interface to come back; nothing to attach to.
            return Ok(());
        };
        let at = Attachment {
            own,
            subnet_len: self.subnet_len,
            local: self.bind,
            port: self.port,
            ext_index: ext.index,
            ext_ethernet: ext.mac.is_some(),
            tun_index,
        };
        // Every possible subnet of the network fits, up to a million.
        let room = 1u64 << u32::from(self.subnet_len.saturating_sub(self.network.prefix_len())).min(20);
        let on = self.engine.ensure_fast_path(at, room as u32);
        if let Some(offload) = &self.offload_metric {
            offload.get_or_create(&vec![("feature", "tc_bpf")]).set(i64::from(on));
        }
        Ok(())
    }

    /// Replaces the engine's peer table with one built from `peers` (the accepted leases;
    /// udp leases carry no BackendType).
    pub fn set_peers<'a>(&self, peers: impl Iterator<Item = &'a Lease>) {
        self.engine.set_peers(PeerTable::of_leases(self.subnet_len, peers));
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

    /// One peer's two entries per event, changed in place under the table's write lock,
    /// and the same peers' entries in the fast path's maps.
    fn peers_changed(&self, events: &[LeaseEvent], cache: &LeaseCache) {
        self.engine.apply(events, cache);
    }

    fn peers_reset(&self, cache: &LeaseCache) {
        self.set_peers(cache.accepted());
    }

    fn stop(&mut self) {
        self.engine.stop();
    }
}
