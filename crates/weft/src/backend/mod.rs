//! Backends: what a host writes into its lease and the MTU it reports, and (with the
//! data-plane work) how it programs the kernel for its peers.

use weft_core::config::BackendConfig;
use weft_core::iface::External;
use weft_core::lease::LeaseAttrs;

/// A backend that cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `Backend.Type` names no backend.
    #[error("unknown backend type {0:?}: set Backend.Type to vxlan, host-gw, udp or alloc")]
    Unknown(String),
    /// The backend is known but its data plane is not in this build yet.
    #[error("backend {0:?} is not available in this version of weft yet; use \"alloc\" (lease only) for now")]
    NotYetAvailable(String),
    /// The host has no IPv4 address to advertise.
    #[error("backend {0} needs an IPv4 public address; pass --public-ip or --iface")]
    NoPublicIp(String),
}

/// What a backend contributes before the lease is taken.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Our lease attributes.
    pub attrs: LeaseAttrs,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
}

/// Prepares the configured backend on the chosen interface.
pub fn prepare(cfg: &BackendConfig, ext: &External) -> Result<Prepared, BackendError> {
    match cfg.kind.as_str() {
        // alloc: a lease and nothing else (routing is someone else's job); MTU = interface.
        "alloc" => {
            let mut attrs = LeaseAttrs::new(ext.public_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED));
            attrs.public_ipv6 = ext.public_ipv6;
            if ext.public_ip.is_none() && ext.public_ipv6.is_none() {
                return Err(BackendError::NoPublicIp(cfg.kind.clone()));
            }
            Ok(Prepared { attrs, mtu: ext.mtu })
        }
        "vxlan" | "host-gw" | "udp" => Err(BackendError::NotYetAvailable(cfg.kind.clone())),
        other => Err(BackendError::Unknown(other.to_string())),
    }
}
