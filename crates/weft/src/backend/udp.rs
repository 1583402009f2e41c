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
use crate::kernel::link::LinkState;
use crate::kernel::vxlan::{VxlanDevice, VxlanParams};
use crate::kernel::{Kernel, KernelError};
use crate::metrics::{Labels, Metrics};
use crate::udp::fastpath::{Attachment, RxDevice};
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

/// The VXLAN device a peer's TCP super-packets are received through (see
/// [`crate::udp::fastpath`]): ours alone, sealed so that nothing but the fast path's
/// redirect gets through it.
pub const RX_DEVICE: &str = "weft-udp-rx";

/// Makes the receive device a dead end for anything our program on it does not redirect:
/// no forwarding from it, strict reverse-path filtering (no route points at it), no IPv6.
fn seal_rx_device() {
    for (path, value) in [
        (format!("ipv4/conf/{RX_DEVICE}/forwarding"), "0"),
        (format!("ipv4/conf/{RX_DEVICE}/rp_filter"), "1"),
        (format!("ipv6/conf/{RX_DEVICE}/disable_ipv6"), "1"),
    ] {
        if let Err(e) = std::fs::write(format!("/proc/sys/net/{path}"), value) {
            tracing::warn!("cannot set net.{} to {value}: {e}", path.replace('/', "."));
        }
    }
}

/// The receive device's UDP port: the one after flannel's (before it at the top).
fn rx_port(port: u16) -> u16 {
    port.checked_add(1).unwrap_or(port - 1)
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
    /// The receive device, as of the last repair.
    rx: Option<VxlanDevice>,
    /// Its VNI: random per start, one more thing a stranger would have to guess to reach it.
    rx_vni: u32,
    /// Creating it failed (logged once until it works).
    rx_failed: bool,
    /// The fast path could not be attached: no receive device either.
    rx_unwanted: bool,
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
            rx: None,
            rx_vni: rand::random::<u32>() % 0xff_fffe + 1,
            rx_failed: false,
            rx_unwanted: false,
        })
    }

    /// Addresses and routes `flannel0` for our lease and starts forwarding.
    pub async fn start(&mut self, kernel: &Kernel, own: Ipv4Net, metrics: &Metrics) -> Result<(), KernelError> {
        self.own = Some(own);
        if self.offload_metric.is_none() {
            self.offload_metric = Some(metrics.udp_offload.clone());
            metrics
                .on_render(fast_path_refresher(self.engine.fast_path_counter(), metrics.udp_fast_path_packets.clone()));
            // The watchdog may turn the detour off between passes: read it when rendered.
            let detour = self.engine.detour_reader();
            let offload = metrics.udp_offload.clone();
            metrics.on_render(Box::new(move || {
                offload.get_or_create(&vec![("feature", "rx_vxlan")]).set(i64::from(detour()));
            }));
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
        let rx = self.ensure_rx_device(kernel, &ext).await;
        let at = Attachment {
            own,
            subnet_len: self.subnet_len,
            local: self.bind,
            port: self.port,
            ext_index: ext.index,
            ext_ethernet: ext.mac.is_some(),
            tun_index,
            rx,
        };
        // Every possible subnet of the network fits, up to a million.
        let room = 1u64 << u32::from(self.subnet_len.saturating_sub(self.network.prefix_len())).min(20);
        let on = self.engine.ensure_fast_path(at, room as u32);
        if !on && self.rx.take().is_some() {
            // Without the programs the device would only be an open port.
            self.rx_unwanted = true;
            if let Err(e) = kernel.delete_link(RX_DEVICE).await {
                tracing::warn!("removing {RX_DEVICE} failed: {e}");
            }
        }
        if let Some(offload) = &self.offload_metric {
            offload.get_or_create(&vec![("feature", "tc_bpf")]).set(i64::from(on));
        }
        Ok(())
    }

    /// The receive device, created or repaired (re-created when it was deleted: the fast
    /// path then re-attaches to the new one). `None` when it cannot be made, which is
    /// logged once: super-packets are then decapsulated in place.
    async fn ensure_rx_device(&mut self, kernel: &Kernel, ext: &LinkState) -> Option<RxDevice> {
        let disabled = std::env::var("WEFT_UDP_DISABLE").unwrap_or_default();
        if self.rx_unwanted || !self.engine.fast_path_enabled() || disabled.split(',').any(|d| d.trim() == "rx_vxlan") {
            return None;
        }
        let port = rx_port(self.port);
        let p = VxlanParams {
            name: RX_DEVICE.to_string(),
            vni: self.rx_vni,
            port,
            gbp: false,
            learning: false,
            local: IpAddr::V4(self.bind),
            underlay: ext.index,
            // VXLAN's own limit under this underlay; nothing is sent through it.
            mtu: ext.mtu.unwrap_or(1500).saturating_sub(50).max(68),
        };
        let made = match self.rx {
            Some(current) => kernel.vxlan_repair(&p, current, RX_DEVICE.as_bytes()).await.map(|(d, _)| d),
            None => kernel.vxlan_ensure(&p, None, RX_DEVICE.as_bytes()).await,
        };
        match made {
            Ok(d) => {
                if self.rx.map(|r| r.index) != Some(d.index) {
                    seal_rx_device();
                }
                self.rx = Some(d);
                self.rx_failed = false;
                Some(RxDevice { index: d.index, mac: d.mac, port, vni: self.rx_vni })
            }
            Err(e) => {
                if !self.rx_failed {
                    tracing::warn!(
                        "cannot make {RX_DEVICE} (a VXLAN device on UDP port {port}): {e}; peers' TCP super-packets \
                         are decapsulated in place instead, which is slower (the bridge splits them)"
                    );
                }
                self.rx = None;
                self.rx_failed = true;
                None
            }
        }
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
        let tun = self.index.map(|i| (DEVICE.to_string(), i));
        let rx = self.rx.map(|d| (RX_DEVICE.to_string(), d.index));
        tun.into_iter().chain(rx).collect()
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
