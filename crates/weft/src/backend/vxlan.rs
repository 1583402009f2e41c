//! vxlan: the `flannel.<VNI>` (and `flannel-v6.<VNI>`) devices, their addresses, and the
//! VtepMAC the lease advertises.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;
use weft_core::backend::{VxlanSettings, vxlan_backend_data};
use weft_core::config::NetworkConfig;
use weft_core::iface::External;
use weft_core::lease::{LeaseAttrs, SubnetKey};

use super::BackendError;
use crate::kernel::vxlan::{self as dev, VxlanDevice, VxlanParams};
use crate::kernel::{Kernel, KernelError};

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
        };
        if cfg.v4.is_some() {
            // The local address is the interface's own (flannel's older, correct behaviour):
            // with --public-ip behind NAT the kernel could not send from the public address.
            let local = ext
                .iface_addr
                .ok_or_else(|| BackendError::Address(format!("vxlan: interface {} has no IPv4 address", ext.name)))?;
            let p = params(format!("flannel.{}", s.vni), IpAddr::V4(local));
            v.v4 = Some(dev::ensure(&kernel.handle, &p, None, &v.seed4).await.map_err(fail)?);
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
            v.v6 = Some(dev::ensure(&kernel.handle, &p, None, &v.seed6).await.map_err(fail)?);
            v.p6 = Some(p);
        }
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
            changed |= dev::ensure_address(
                &kernel.handle,
                d.index,
                IpNet::new(IpAddr::V4(sub.network()), 32).expect("/32"),
                IpNet::V4(net),
            )
            .await?;
        }
        if let (Some(d), Some(sub), Some(net)) = (self.v6, own.v6, self.networks.1) {
            changed |= dev::ensure_address(
                &kernel.handle,
                d.index,
                IpNet::new(IpAddr::V6(sub.network()), 128).expect("/128"),
                IpNet::V6(net),
            )
            .await?;
        }
        Ok(changed)
    }

    /// Repairs the devices, whatever happened to them (deleted, down, MTU, MAC, `local` or
    /// address changed); `Ok(true)` when something had to be repaired.
    pub async fn repair(&mut self, kernel: &Kernel, own: &[IpNet]) -> Result<bool, KernelError> {
        let mut changed = false;
        for (dev_slot, params, seed) in [(&mut self.v4, &self.p4, &self.seed4), (&mut self.v6, &self.p6, &self.seed6)] {
            let (Some(current), Some(p)) = (*dev_slot, params) else { continue };
            let (d, fixed) = dev::repair(&kernel.handle, p, current, seed).await?;
            *dev_slot = Some(d);
            changed |= fixed;
        }
        let key = SubnetKey {
            v4: own.iter().find_map(|n| if let IpNet::V4(v) = n { Some(*v) } else { None }),
            v6: own.iter().find_map(|n| if let IpNet::V6(v) = n { Some(*v) } else { None }),
        };
        if self.address(kernel, &key).await? {
            tracing::warn!("the vxlan device's address was changed; restored it");
            changed = true;
        }
        Ok(changed)
    }
}
