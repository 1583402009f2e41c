//! The vxlan device (`flannel.<VNI>`): created like flanneld creates it, reused when it
//! matches, and always with the same MAC so peers' entries stay valid.

use std::net::IpAddr;

use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use weft_core::backend::{Mac, derived_vtep_mac, mac_to_string};

use super::link::{by_name as link_by_name, mac_of, mtu_of};
use super::{Kernel, KernelError, err};

/// What the device must look like.
#[derive(Debug, Clone)]
pub struct VxlanParams {
    /// `flannel.<VNI>` or `flannel-v6.<VNI>`.
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Group-based policy extension.
    pub gbp: bool,
    /// MAC learning.
    pub learning: bool,
    /// Local (source) address: the external interface's address.
    pub local: IpAddr,
    /// Index of the external interface.
    pub underlay: u32,
    /// Device MTU.
    pub mtu: u32,
}

/// The device as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanDevice {
    /// Kernel index.
    pub index: u32,
    /// Its MAC, advertised as VtepMAC.
    pub mac: Mac,
}

fn vxlan_info(l: &LinkMessage) -> Option<&Vec<InfoVxlan>> {
    let infos = l.attributes.iter().find_map(|a| if let LinkAttribute::LinkInfo(i) = a { Some(i) } else { None })?;
    if !infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))) {
        return None;
    }
    infos.iter().find_map(|i| if let LinkInfo::Data(InfoData::Vxlan(d)) = i { Some(d) } else { None })
}

/// Whether an existing device can be kept: a vxlan with our VNI, local address, port,
/// underlay, GBP and learning setting (what flanneld compares, plus learning).
fn compatible(l: &LinkMessage, p: &VxlanParams) -> bool {
    let Some(info) = vxlan_info(l) else { return false };
    let has = |want: &InfoVxlan| info.contains(want);
    let local_ok = match p.local {
        IpAddr::V4(a) => has(&InfoVxlan::Local(a)),
        IpAddr::V6(a) => has(&InfoVxlan::Local6(a)),
    };
    has(&InfoVxlan::Id(p.vni))
        && local_ok
        && has(&InfoVxlan::Port(p.port))
        && has(&InfoVxlan::Link(p.underlay))
        && has(&InfoVxlan::Learning(p.learning))
        && (info.contains(&InfoVxlan::Gbp) == p.gbp)
}

/// Makes sure the device exists as `p` says, is up, and has a stable MAC: the existing
/// device's MAC when there is one (also when it must be re-created), else `preferred` (the
/// MAC we already advertise), else one derived from `mac_seed` (the public address), which a
/// re-creation after a reboot derives again.
async fn ensure(
    h: &Handle,
    p: &VxlanParams,
    preferred: Option<Mac>,
    mac_seed: &[u8],
) -> Result<VxlanDevice, KernelError> {
    let existing = link_by_name(h, &p.name).await?;
    // The MAC we advertise beats the device's: someone may have changed it.
    let mac = preferred.or(existing.as_ref().and_then(mac_of)).unwrap_or_else(|| derived_vtep_mac(mac_seed, p.vni));
    if let Some(l) = &existing {
        if compatible(l, p) {
            let idx = l.header.index;
            if !l.header.flags.contains(LinkFlags::Up) {
                h.link()
                    .set(LinkUnspec::new_with_index(idx).up().build())
                    .execute()
                    .await
                    .map_err(err(format!("set {} up", p.name)))?;
            }
            return Ok(VxlanDevice { index: idx, mac });
        }
        tracing::warn!(device = %p.name, "existing device does not match the config; re-creating it with the same MAC");
        h.link().del(l.header.index).execute().await.map_err(err(format!("delete {}", p.name)))?;
    }
    let mut b = LinkVxlan::new(&p.name, p.vni).dev(p.underlay).port(p.port).learning(p.learning);
    b = match p.local {
        IpAddr::V4(a) => b.local(a),
        IpAddr::V6(a) => b.local6(a),
    };
    if p.gbp {
        b = b.gbp();
    }
    let msg = b.mtu(p.mtu).address(mac.to_vec()).up().build();
    h.link().add(msg).execute().await.map_err(err(format!("create vxlan device {}", p.name)))?;
    let created = link_by_name(h, &p.name).await?.ok_or_else(|| KernelError {
        op: format!("find {} after creating it", p.name),
        source: rtnetlink::Error::RequestFailed,
    })?;
    let got = mac_of(&created);
    if got != Some(mac) {
        // Something (udev's MACAddressPolicy) changed it: put ours back.
        h.link()
            .set(LinkUnspec::new_with_index(created.header.index).address(mac.to_vec()).build())
            .execute()
            .await
            .map_err(err(format!("set the MAC of {} to {}", p.name, mac_to_string(&mac))))?;
    }
    if p.local.is_ipv6() {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/accept_ra", p.name), "0");
    }
    Ok(VxlanDevice { index: created.header.index, mac })
}

/// Puts the device back as `p` says, whatever happened to it: set up again when down; MTU
/// and MAC restored in place; re-created with the same MAC when it is gone, is no longer a
/// vxlan device, or its VNI, `local` address, port, underlay or learning changed. Returns
/// the device and whether anything had to be repaired.
async fn repair(
    h: &Handle,
    p: &VxlanParams,
    current: VxlanDevice,
    mac_seed: &[u8],
) -> Result<(VxlanDevice, bool), KernelError> {
    let existing = link_by_name(h, &p.name).await?;
    let Some(l) = existing.filter(|l| compatible(l, p)) else {
        tracing::warn!(device = %p.name, "vxlan device is gone or altered; re-creating it with the same MAC");
        return Ok((ensure(h, p, Some(current.mac), mac_seed).await?, true));
    };
    let idx = l.header.index;
    let mut fixes = Vec::new();
    let mut req = LinkUnspec::new_with_index(idx);
    if !l.header.flags.contains(LinkFlags::Up) {
        fixes.push("set up".to_string());
        req = req.up();
    }
    if mtu_of(&l) != Some(p.mtu) {
        fixes.push(format!("MTU {:?} -> {}", mtu_of(&l), p.mtu));
        req = req.mtu(p.mtu);
    }
    if mac_of(&l) != Some(current.mac) {
        fixes.push(format!("MAC -> {}", mac_to_string(&current.mac)));
        req = req.address(current.mac.to_vec());
    }
    if !fixes.is_empty() {
        tracing::warn!(device = %p.name, fixes = %fixes.join(", "), "vxlan device was altered; restoring it");
        h.link().set(req.build()).execute().await.map_err(err(format!("restore {}", p.name)))?;
    }
    Ok((VxlanDevice { index: idx, mac: current.mac }, !fixes.is_empty() || idx != current.index))
}

impl Kernel {
    /// Makes sure the vxlan device exists as `p` says (see [`ensure`]).
    pub async fn vxlan_ensure(
        &self,
        p: &VxlanParams,
        preferred: Option<Mac>,
        mac_seed: &[u8],
    ) -> Result<VxlanDevice, KernelError> {
        ensure(&self.handle, p, preferred, mac_seed).await
    }

    /// Puts the vxlan device back as `p` says (see [`repair`]).
    pub async fn vxlan_repair(
        &self,
        p: &VxlanParams,
        current: VxlanDevice,
        mac_seed: &[u8],
    ) -> Result<(VxlanDevice, bool), KernelError> {
        repair(&self.handle, p, current, mac_seed).await
    }
}
