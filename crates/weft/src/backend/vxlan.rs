//! vxlan: the `flannel.<VNI>` (and `flannel-v6.<VNI>`) devices, their addresses, and the
//! VtepMAC the lease advertises.

use std::net::IpAddr;

use futures::future::BoxFuture;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;
use weft_core::backend::{BackendSpec, VxlanSettings, vxlan_backend_data};
use weft_core::cache::LeaseCache;
use weft_core::config::NetworkConfig;
use weft_core::iface::External;
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};
use weft_core::plan::{self, HostFacts, Plan};

use super::{Backend, BackendError};
use crate::kernel::vxlan::{VxlanDevice, VxlanParams};
use crate::kernel::{Kernel, KernelError, Links};
use crate::metrics::Metrics;

/// The vxlan backend's devices.
pub struct Vxlan {
    /// The IPv4 device.
    pub v4: Option<VxlanDevice>,
    /// The IPv6 device.
    pub v6: Option<VxlanDevice>,
    p4: Option<VxlanParams>,
    p6: Option<VxlanParams>,
    seed4: Vec<u8>,
    seed6: Vec<u8>,
    networks: (Option<Ipv4Net>, Option<Ipv6Net>),
    vni: u32,
    spec: BackendSpec,
    facts: HostFacts,
}

impl Vxlan {
    /// Creates (or adopts) the devices before the lease is taken.
    pub async fn create(
        kernel: &Kernel,
        cfg: &NetworkConfig,
        ext: &External,
        s: VxlanSettings,
    ) -> Result<Vxlan, BackendError> {
        let mtu = weft_core::backend::BackendSpec::Vxlan(s).mtu(ext.mtu);
        let params = |name: String, local: IpAddr| VxlanParams {
            name,
            vni: s.vni,
            port: s.port,
            gbp: s.gbp,
            learning: s.learning,
            local,
            underlay: ext.index,
            mtu,
        };
        let fail = |source| BackendError::Kernel { backend: "vxlan", source };
        let mut v = Vxlan {
            v4: None,
            v6: None,
            p4: None,
            p6: None,
            seed4: ext.public_ip.map(|a| a.octets().to_vec()).unwrap_or_default(),
            seed6: ext.public_ipv6.map(|a| a.octets().to_vec()).unwrap_or_default(),
            networks: (cfg.v4.map(|r| r.network), cfg.v6.map(|r| r.network)),
            vni: s.vni,
            spec: BackendSpec::Vxlan(s),
            facts: HostFacts::default(),
        };
        if cfg.v4.is_some() {
            // The local address is the interface's own (flannel's older, correct behaviour):
            // with --public-ip behind NAT the kernel could not send from the public address.
            let local = ext
                .iface_addr
                .ok_or_else(|| BackendError::Address(format!("vxlan: interface {} has no IPv4 address", ext.name)))?;
            let p = params(format!("flannel.{}", s.vni), IpAddr::V4(local));
            v.v4 = Some(kernel.vxlan_ensure(&p, None, &v.seed4).await.map_err(fail)?);
            v.p4 = Some(p);
        }
        if cfg.v6.is_some() {
            let local = ext
                .iface_addr_v6
                .ok_or_else(|| BackendError::Address(format!("vxlan: interface {} has no IPv6 address", ext.name)))?;
            let mut p = params(format!("flannel-v6.{}", s.vni), IpAddr::V6(local));
            // Over IPv6 the encapsulation takes 20 bytes more; the kernel caps the MTU there,
            // and the repair must not fight the cap.
            p.mtu = p.mtu.min(ext.mtu.saturating_sub(weft_core::backend::VXLAN_OVERHEAD + 20));
            v.v6 = Some(kernel.vxlan_ensure(&p, None, &v.seed6).await.map_err(fail)?);
            v.p6 = Some(p);
        }
        if s.direct_routing {
            v.facts.connected = kernel.connected_prefixes(ext.index).await.map_err(fail)?;
        }
        v.facts.vxlan6 = v.v6.is_some();
        Ok(v)
    }

    /// The external interface has a new index: the devices must sit on it.
    pub fn set_underlay(&mut self, index: u32) {
        for p in [&mut self.p4, &mut self.p6].into_iter().flatten() {
            p.underlay = index;
        }
    }

    /// Puts `{"VNI":…,"VtepMAC":…}` into the lease.
    pub fn fill_lease(&self, attrs: &mut LeaseAttrs) {
        let raw =
            |d: &Option<VxlanDevice>| d.and_then(|d| RawValue::from_string(vxlan_backend_data(self.vni, &d.mac)).ok());
        attrs.backend_data = raw(&self.v4);
        attrs.backend_v6_data = raw(&self.v6);
    }

    /// Gives the devices our subnet's base address (/32, /128) and nothing else in the
    /// network; `Ok(true)` when an address had to be added or removed.
    pub async fn address(&self, kernel: &Kernel, own: &SubnetKey) -> Result<bool, KernelError> {
        let mut changed = false;
        if let (Some(d), Some(sub), Some(net)) = (self.v4, own.v4, self.networks.0) {
            changed |= kernel
                .ensure_address(d.index, IpNet::new(IpAddr::V4(sub.network()), 32).expect("/32"), IpNet::V4(net))
                .await?;
        }
        if let (Some(d), Some(sub), Some(net)) = (self.v6, own.v6, self.networks.1) {
            changed |= kernel
                .ensure_address(d.index, IpNet::new(IpAddr::V6(sub.network()), 128).expect("/128"), IpNet::V6(net))
                .await?;
        }
        Ok(changed)
    }

    /// Repairs the devices, whatever happened to them (deleted, down, MTU, MAC, `local` or
    /// address changed); `Ok(true)` when something had to be repaired.
    pub async fn repair(&mut self, kernel: &Kernel, key: &SubnetKey) -> Result<bool, KernelError> {
        let mut changed = false;
        for (dev_slot, params, seed) in [(&mut self.v4, &self.p4, &self.seed4), (&mut self.v6, &self.p6, &self.seed6)] {
            let (Some(current), Some(p)) = (*dev_slot, params) else { continue };
            let (d, fixed) = kernel.vxlan_repair(p, current, seed).await?;
            *dev_slot = Some(d);
            changed |= fixed;
        }
        if self.address(kernel, key).await? {
            tracing::warn!("the vxlan device's address was changed; restored it");
            changed = true;
        }
        Ok(changed)
    }
}

impl Backend for Vxlan {
    fn name(&self) -> &'static str {
        "vxlan"
    }

    fn advertise(&self, attrs: &mut LeaseAttrs) {
        self.fill_lease(attrs);
    }

    fn set_underlay(&mut self, index: u32) {
        Vxlan::set_underlay(self, index);
    }

    fn start<'a>(
        &'a mut self,
        kernel: &'a Kernel,
        own: &'a SubnetKey,
        _metrics: &'a Metrics,
    ) -> BoxFuture<'a, Result<(), KernelError>> {
        Box::pin(async move { self.address(kernel, own).await.map(|_| ()) })
    }

    fn ensure_devices<'a>(
        &'a mut self,
        kernel: &'a Kernel,
        own: &'a SubnetKey,
    ) -> BoxFuture<'a, Result<bool, KernelError>> {
        Box::pin(self.repair(kernel, own))
    }

    fn devices(&self) -> Vec<(String, u32)> {
        [(&self.p4, self.v4), (&self.p6, self.v6)]
            .into_iter()
            .filter_map(|(p, d)| Some((p.as_ref()?.name.clone(), d?.index)))
            .collect()
    }

    fn links(&self, links: &mut Links) {
        links.vxlan4 = self.v4.map(|d| d.index);
        links.vxlan6 = self.v6.map(|d| d.index);
    }

    fn plan(&self, peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan> {
        Some(plan::plan(&self.spec, peers, &self.facts))
    }

    fn plan_cached(&self, cache: &LeaseCache) -> Option<Plan> {
        Some(plan::plan_peers(&self.spec, cache.peers(), &self.facts))
    }
}
