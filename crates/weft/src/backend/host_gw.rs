//! host-gw: a route to each peer subnet via the peer's public IP. Needs every host on one L2
//! segment, so the public IP must be the interface's own address.

use weft_core::backend::BackendSpec;
use weft_core::cache::LeaseCache;
use weft_core::iface::External;
use weft_core::lease::Lease;
use weft_core::plan::{self, HostFacts, Plan};

use super::{Backend, BackendError};

/// The host-gw backend: no device of its own; routes on the external interface.
pub struct HostGw;

impl HostGw {
    /// Refuses to start behind NAT, as flanneld does.
    pub fn new(ext: &External) -> Result<HostGw, BackendError> {
        check(ext)?;
        Ok(HostGw)
    }
}

impl Backend for HostGw {
    fn name(&self) -> &'static str {
        "host-gw"
    }

    fn plan(&self, peers: &mut dyn Iterator<Item = &Lease>) -> Option<Plan> {
        Some(plan::plan(&BackendSpec::HostGw, peers, &HostFacts::default()))
    }

    fn plan_cached(&self, cache: &LeaseCache) -> Option<Plan> {
        Some(plan::plan_peers(&BackendSpec::HostGw, cache.peers(), &HostFacts::default()))
    }
}

/// Refuses to start behind NAT, as flanneld does.
pub fn check(ext: &External) -> Result<(), BackendError> {
    if ext.public_ip.is_some() && ext.public_ip != ext.iface_addr {
        return Err(BackendError::Address(format!(
            "host-gw: the public IP {} is not the address of interface {} ({}); probably you're on a NAT, which host-gw does not support: drop --public-ip or use vxlan",
            ext.public_ip.map(|a| a.to_string()).unwrap_or_default(),
            ext.name,
            ext.iface_addr.map(|a| a.to_string()).unwrap_or_else(|| "none".into())
        )));
    }
    if ext.public_ipv6.is_some() && ext.public_ipv6 != ext.iface_addr_v6 {
        return Err(BackendError::Address(format!(
            "host-gw: the public IPv6 address is not the address of interface {}; host-gw does not support NAT: drop --public-ipv6 or use vxlan",
            ext.name
        )));
    }
    Ok(())
}
