//! Backend settings from the `Backend` object of the network config, validated, and each
//! backend's lease data (`BackendData`) and MTU rules.

use serde_json::Value;

use crate::config::BackendConfig;
pub use crate::config::BackendError;

/// vxlan settings (flannel's keys and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanSettings {
    /// `VNI`, default 1.
    pub vni: u32,
    /// `Port`, default 8472 (the kernel's default when flannel passes 0).
    pub port: u16,
    /// `GBP`.
    pub gbp: bool,
    /// `Learning`.
    pub learning: bool,
    /// `DirectRouting`: plain routes to peers on our L2 segment.
    pub direct_routing: bool,
    /// `MTU`: the underlay MTU to subtract the overhead from (default: the interface's).
    pub mtu: Option<u32>,
}

/// udp settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// `Port`, default 8285.
    pub port: u16,
}

/// A validated backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendSpec {
    /// Lease only.
    Alloc,
    /// Routes via peers' public IPs on a shared L2 segment.
    HostGw,
    /// Kernel VXLAN.
    Vxlan(VxlanSettings),
    /// Userspace TUN⇄UDP.
    Udp(UdpSettings),
    /// WireGuard (`flannel-wg`).
    Wireguard(crate::wireguard::WireguardSettings),
}

/// VXLAN header overhead over the underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// udp backend overhead (outer IPv4 20 + UDP 8).
pub const UDP_OVERHEAD: u32 = 28;

fn uint(cfg: &BackendConfig, field: &'static str, max: u64, default: u64) -> Result<u64, BackendError> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(v),
            _ => Err(BackendError::Field { field, problem: format!("{n} is out of range: use 0 to {max}") }),
        },
        Some(other) => Err(BackendError::Field { field, problem: format!("expected a number, got {other}") }),
    }
}

fn flag(cfg: &BackendConfig, field: &'static str) -> Result<bool, BackendError> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(BackendError::Field { field, problem: format!("expected true or false, got {other}") }),
    }
}

impl BackendSpec {
    /// Validates the `Backend` object.
    pub fn from_config(cfg: &BackendConfig) -> Result<Self, BackendError> {
        match cfg.kind.as_str() {
            "alloc" => Ok(BackendSpec::Alloc),
            "host-gw" => Ok(BackendSpec::HostGw),
            "vxlan" => {
                let vni = uint(cfg, "VNI", (1 << 24) - 1, 1)? as u32;
                let port = match uint(cfg, "Port", 65535, 0)? {
                    0 => 8472,
                    p => p as u16,
                };
                let mtu = match uint(cfg, "MTU", 65535, 0)? {
                    0 => None,
                    m if m < 576 => {
                        return Err(BackendError::Field {
                            field: "MTU",
                            problem: format!("{m} is below the IPv4 minimum of 576"),
                        });
                    }
                    m => Some(m as u32),
                };
                Ok(BackendSpec::Vxlan(VxlanSettings {
                    vni,
                    port,
                    gbp: flag(cfg, "GBP")?,
                    learning: flag(cfg, "Learning")?,
                    direct_routing: flag(cfg, "DirectRouting")?,
                    mtu,
                }))
            }
            "udp" => {
                let port = match uint(cfg, "Port", 65535, 8285)? {
                    0 => 8285,
                    p => p as u16,
                };
                Ok(BackendSpec::Udp(UdpSettings { port }))
            }
            "wireguard" => Ok(BackendSpec::Wireguard(crate::wireguard::WireguardSettings::from_config(cfg)?)),
            other => Err(BackendError::Unknown(other.to_string())),
        }
    }

    /// `BackendType` in the lease (flannel writes none for udp and alloc).
    pub fn lease_type(&self) -> &'static str {
        match self {
            BackendSpec::Alloc | BackendSpec::Udp(_) => "",
            BackendSpec::HostGw => "host-gw",
            BackendSpec::Vxlan(_) => "vxlan",
            BackendSpec::Wireguard(_) => crate::wireguard::LEASE_TYPE,
        }
    }

    /// `FLANNEL_MTU` for an external interface of MTU `iface_mtu`.
    pub fn mtu(&self, iface_mtu: u32) -> u32 {
        match self {
            BackendSpec::Alloc | BackendSpec::HostGw => iface_mtu,
            BackendSpec::Vxlan(v) => v.mtu.unwrap_or(iface_mtu).saturating_sub(VXLAN_OVERHEAD),
            BackendSpec::Udp(_) => iface_mtu.saturating_sub(UDP_OVERHEAD),
            BackendSpec::Wireguard(w) => w.mtu(iface_mtu),
        }
    }
}

/// A MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC as flannel writes it (`c6:d2:32:6f:8f:44`).
pub fn mac_to_string(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case, `-` also accepted as Go's net.ParseMAC does).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

/// vxlan `BackendData`: `{"VNI":1,"VtepMAC":"…"}`, compact, flannel's field order.
pub fn vxlan_backend_data(vni: u32, mac: &Mac) -> String {
    format!("{{\"VNI\":{vni},\"VtepMAC\":\"{}\"}}", mac_to_string(mac))
}

/// Reads a peer's vxlan `BackendData`; `None` when it carries no usable VtepMAC.
pub fn parse_vxlan_backend_data(raw: &str) -> Option<(u32, Mac)> {
    let v: Value = serde_json::from_str(raw).ok()?;
    let obj = v.as_object()?;
    let mac = crate::config::field(obj, "VtepMAC")?.as_str().and_then(parse_mac)?;
    // A multicast or all-zero MAC cannot be a VTEP.
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return None;
    }
    let vni = crate::config::field(obj, "VNI").and_then(Value::as_u64).unwrap_or(0) as u32;
    Some((vni, mac))
}

/// A stable VTEP MAC for a host: derived from its public address and VNI, locally
/// administered and unicast. A device re-created after a reboot or a deletion gets the same
/// MAC, so peers' neighbour and FDB entries stay valid (flannel picks a new random one).
pub fn derived_vtep_mac(seed: &[u8], vni: u32) -> Mac {
    // FNV-1a, 64 bit: small, stable across versions and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.iter().chain(&vni.to_be_bytes()).chain(b"weft-vtep") {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkConfig;

    fn spec(backend: &str) -> Result<BackendSpec, BackendError> {
        let c = NetworkConfig::parse(&format!(r#"{{"Network":"10.5.0.0/16","Backend":{backend}}}"#)).unwrap();
        BackendSpec::from_config(&c.backend)
    }

    #[test]
    fn vxlan_defaults_and_keys() {
        let BackendSpec::Vxlan(v) = spec(r#"{"Type":"vxlan"}"#).unwrap() else { panic!() };
        assert_eq!((v.vni, v.port, v.gbp, v.learning, v.direct_routing, v.mtu), (1, 8472, false, false, false, None));
        let BackendSpec::Vxlan(v) =
            spec(r#"{"type":"vxlan","vni":7,"port":4789,"directrouting":true,"MTU":9000}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!((v.vni, v.port, v.direct_routing, v.mtu), (7, 4789, true, Some(9000)));
        assert_eq!(BackendSpec::Vxlan(v).mtu(1500), 8950);
        assert!(spec(r#"{"Type":"vxlan","VNI":"one"}"#).unwrap_err().to_string().contains("Backend.VNI"));
        assert!(spec(r#"{"Type":"vxlan","VNI":16777216}"#).unwrap_err().to_string().contains("out of range"));
        assert!(spec(r#"{"Type":"ipsec"}"#).unwrap_err().to_string().contains("unknown backend type"));
    }

    #[test]
    fn mtu_per_backend_as_flannel() {
        assert_eq!(spec(r#"{"Type":"vxlan"}"#).unwrap().mtu(1500), 1450);
        assert_eq!(spec(r#"{"Type":"host-gw"}"#).unwrap().mtu(1500), 1500);
        assert_eq!(spec(r#"{"Type":"udp"}"#).unwrap().mtu(1500), 1472);
        assert_eq!(spec(r#"{"Type":"alloc"}"#).unwrap().mtu(1500), 1500);
        assert_eq!(spec(r#"{"Type":"wireguard"}"#).unwrap().mtu(1500), 1420);
        assert_eq!(spec(r#"{"Type":"wireguard","MTU":9000}"#).unwrap().mtu(1500), 8920);
        assert_eq!(spec(r#"{"Type":"wireguard"}"#).unwrap().lease_type(), "wireguard");
    }

    #[test]
    fn vxlan_lease_data_round_trips() {
        let mac = parse_mac("c6:d2:32:6f:8f:44").unwrap();
        assert_eq!(vxlan_backend_data(1, &mac), r#"{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#);
        assert_eq!(parse_vxlan_backend_data(r#"{"VNI":1,"VtepMAC":"C6:D2:32:6F:8F:44"}"#), Some((1, mac)));
        for bad in
            ["", "{}", r#"{"VtepMAC":"zz:d2:32:6f:8f:44"}"#, r#"{"VtepMAC":"01:00:5e:00:00:01"}"#, r#"{"VtepMAC":5}"#]
        {
            assert_eq!(parse_vxlan_backend_data(bad), None, "{bad}");
        }
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_local() {
        let a = derived_vtep_mac(&[192, 0, 2, 11], 1);
        assert_eq!(a, derived_vtep_mac(&[192, 0, 2, 11], 1));
        assert_ne!(a, derived_vtep_mac(&[192, 0, 2, 12], 1));
        assert_ne!(a, derived_vtep_mac(&[192, 0, 2, 11], 2));
        assert_eq!(a[0] & 0x03, 0x02);
    }
}
