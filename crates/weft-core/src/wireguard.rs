//! The wireguard backend's contract with flannel, without I/O: its config keys, keys in
//! WireGuard's base64 form, the lease's `BackendData`, and the peers wanted for a set of
//! leases (public key, endpoint, allowed IPs), as flanneld configures its `flannel-wg`
//! device.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ipnet::IpNet;
use serde_json::Value;

use crate::config::{BackendConfig, BackendError};
use crate::lease::{Lease, SubnetKey};

/// The IPv4 device, as flannel names it (also the device of the single-tunnel modes).
pub const DEVICE: &str = "flannel-wg";
/// The IPv6 device of `separate` mode.
pub const DEVICE_V6: &str = "flannel-wg-v6";
/// Where flanneld keeps the private key.
pub const KEY_FILE: &str = "/run/flannel/wgkey";
/// The environment variable that overrides [`KEY_FILE`].
pub const KEY_FILE_ENV: &str = "WIREGUARD_KEY_FILE";
/// `ListenPort`'s default.
pub const DEFAULT_PORT: u16 = 51820;
/// `ListenPortV6`'s default.
pub const DEFAULT_PORT_V6: u16 = 51821;
/// What WireGuard takes from the underlay MTU (flannel's figure: outer IPv6 40 + UDP 8 +
/// WireGuard header 16 + tag 16).
pub const OVERHEAD: u32 = 80;
/// `BackendType` of wireguard leases.
pub const LEASE_TYPE: &str = "wireguard";

/// A Curve25519 key (private, public or pre-shared). Its `Debug` never shows the bytes: a
/// private key must not reach a log by accident.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    /// Parses WireGuard's form: standard base64 of exactly 32 bytes (`wg genkey`, flannel's
    /// `wgtypes.ParseKey`); surrounding whitespace (a file's newline) is ignored.
    pub fn parse(s: &str) -> Result<Key, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("the key is empty".into());
        }
        if s.len() != 44 {
            return Err(format!("a key is 44 base64 characters (32 bytes), this one has {} characters", s.len()));
        }
        let bytes = STANDARD.decode(s).map_err(|e| format!("the key is not valid base64: {e}"))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| "the key does not decode to 32 bytes".to_string())?;
        Ok(Key(arr))
    }

    /// WireGuard's form: standard base64 with padding.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// A private key as Curve25519 uses it (RFC 7748 clamping), so the stored key is the
    /// one `wg genkey` would have written.
    pub fn clamped(mut bytes: [u8; 32]) -> Key {
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Key(bytes)
    }
}

/// `Mode`: how the IPv4 and IPv6 sides are tunnelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One device per family, each over its own family (flannel's default).
    Separate,
    /// One device over IPv4 unless the peer's IPv4 address is private and both have IPv6.
    Auto,
    /// One device over IPv4.
    Ipv4,
    /// One device over IPv6.
    Ipv6,
}

impl Mode {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Separate => "separate",
            Mode::Auto => "auto",
            Mode::Ipv4 => "ipv4",
            Mode::Ipv6 => "ipv6",
        }
    }
}

/// wireguard settings (flannel's keys and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireguardSettings {
    /// `ListenPort`, default 51820.
    pub listen_port: u16,
    /// `ListenPortV6`, default 51821.
    pub listen_port_v6: u16,
    /// `PSK`: the pre-shared key every peer uses.
    pub psk: Option<Key>,
    /// `PersistentKeepaliveInterval` in seconds; 0 is off.
    pub keepalive: u16,
    /// `Mode`.
    pub mode: Mode,
    /// `MTU`: the underlay MTU to subtract the overhead from (default: the interface's).
    pub mtu: Option<u32>,
}

fn field_err(field: &'static str, problem: impl Into<String>) -> BackendError {
    BackendError::Field { field, problem: problem.into() }
}

fn port(cfg: &BackendConfig, field: &'static str, default: u16) -> Result<u16, BackendError> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(p @ 1..=65535) => Ok(p as u16),
            _ => Err(field_err(field, format!("{n} is not a port: use 1 to 65535"))),
        },
        Some(other) => Err(field_err(field, format!("expected a port number, got {other}"))),
    }
}

impl WireguardSettings {
    /// Validates the `Backend` object of a `wireguard` network.
    pub fn from_config(cfg: &BackendConfig) -> Result<WireguardSettings, BackendError> {
        let listen_port = port(cfg, "ListenPort", DEFAULT_PORT)?;
        let listen_port_v6 = port(cfg, "ListenPortV6", DEFAULT_PORT_V6)?;
        let psk =
            match cfg.get("PSK") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.is_empty() => None,
                // The value itself is a secret: never echoed in the error.
                Some(Value::String(s)) => Some(Key::parse(s).map_err(|e| {
                    field_err("PSK", format!("{e}; generate one with `wg genpsk` (base64 of 32 bytes)"))
                })?),
                Some(_) => return Err(field_err("PSK", "expected a base64 string (`wg genpsk`)")),
            };
        let keepalive = match cfg.get("PersistentKeepaliveInterval") {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= 65535 => v as u16,
                _ => {
                    return Err(field_err(
                        "PersistentKeepaliveInterval",
                        format!("{n} is out of range: seconds from 0 (off) to 65535"),
                    ));
                }
            },
            Some(other) => {
                return Err(field_err("PersistentKeepaliveInterval", format!("expected seconds, got {other}")));
            }
        };
        let mode = match cfg.get("Mode") {
            None | Some(Value::Null) => Mode::Separate,
            Some(Value::String(s)) => match s.as_str() {
                "" | "separate" => Mode::Separate,
                "auto" => Mode::Auto,
                "ipv4" => Mode::Ipv4,
                "ipv6" => Mode::Ipv6,
                other => {
                    return Err(field_err(
                        "Mode",
                        format!("no valid Mode configured ({other:?}): use separate, auto, ipv4 or ipv6"),
                    ));
                }
            },
            Some(other) => {
                return Err(field_err(
                    "Mode",
                    format!("no valid Mode configured ({other}): use separate, auto, ipv4 or ipv6"),
                ));
            }
        };
        let mtu = match cfg.get("MTU") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => None,
                Some(m) if (u64::from(576 + OVERHEAD)..=65535).contains(&m) => Some(m as u32),
                _ => {
                    return Err(field_err(
                        "MTU",
                        format!(
                            "{n} is out of range: the underlay MTU, {} to 65535 (WireGuard takes {OVERHEAD})",
                            576 + OVERHEAD
                        ),
                    ));
                }
            },
            Some(other) => return Err(field_err("MTU", format!("expected a number, got {other}"))),
        };
        Ok(WireguardSettings { listen_port, listen_port_v6, psk, keepalive, mode, mtu })
    }

    /// `FLANNEL_MTU` and the device MTU: the underlay's (`MTU` or the interface's) − 80.
    pub fn mtu(&self, iface_mtu: u32) -> u32 {
        self.mtu.unwrap_or(iface_mtu).saturating_sub(OVERHEAD)
    }
}

/// wireguard `BackendData`: `{"PublicKey":"…","Port":51820}`, compact, flannel's order.
pub fn backend_data(public: &Key, port: u16) -> String {
    format!("{{\"PublicKey\":\"{}\",\"Port\":{port}}}", public.to_base64())
}

/// Reads a peer's wireguard `BackendData`: its public key and port (0 when absent: old
/// flanneld wrote none, and its peers then use their own port).
pub fn parse_backend_data(raw: &str) -> Result<(Key, u16), String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let key = match crate::config::field(obj, "PublicKey") {
        None | Some(Value::Null) => return Err("no PublicKey".into()),
        Some(Value::String(s)) => Key::parse(s).map_err(|e| format!("PublicKey: {e}"))?,
        Some(other) => return Err(format!("PublicKey is {other}, not a string")),
    };
    if key.0 == [0; 32] {
        return Err("PublicKey is all zero".into());
    }
    let port = match crate::config::field(obj, "Port") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(p) if p <= 65535 => p as u16,
            _ => return Err(format!("Port {n} is not a port")),
        },
        Some(other) => return Err(format!("Port is {other}, not a number")),
    };
    Ok((key, port))
}

/// One WireGuard peer, as flanneld configures it from a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The lease it comes from.
    pub lease: SubnetKey,
    /// Its public key.
    pub public_key: Key,
    /// `PublicIP:Port` or `[PublicIPv6]:Port` (our own port when the lease has none).
    pub endpoint: SocketAddr,
    /// The peer's subnet(s).
    pub allowed_ips: Vec<IpNet>,
}

/// The peers wanted on one device and the leases that could not be used, with why.
#[derive(Debug, Clone, Default)]
pub struct PeerPlan {
    /// Peers, in lease order.
    pub peers: Vec<Peer>,
    /// Leases skipped (malformed data, no address of the family needed), with a reason.
    pub skipped: Vec<(SubnetKey, String)>,
}

/// One WireGuard device flanneld creates for a network, as the pure plan sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpec {
    /// `flannel-wg` or `flannel-wg-v6`.
    pub name: &'static str,
    /// The UDP port it listens on.
    pub port: u16,
    /// It carries IPv4 pod traffic (holds our IPv4 subnet's address and the IPv4 route).
    pub inner_v4: bool,
    /// It carries IPv6 pod traffic.
    pub inner_v6: bool,
    /// `Separate` mode's IPv6 device: peers from `BackendV6Data` at `[PublicIPv6]:Port`.
    pub v6_only: bool,
}

/// The devices of a network with IPv4 (`v4`) and/or IPv6 (`v6`) enabled, as flanneld makes
/// them: `separate` mode one per family (`flannel-wg` on `ListenPort`, `flannel-wg-v6` on
/// `ListenPortV6`); the other modes one `flannel-wg` on `ListenPort` carrying both.
pub fn devices(s: &WireguardSettings, v4: bool, v6: bool) -> Vec<DeviceSpec> {
    if s.mode == Mode::Separate {
        let mut d = Vec::new();
        if v4 {
            d.push(DeviceSpec { name: DEVICE, port: s.listen_port, inner_v4: true, inner_v6: false, v6_only: false });
        }
        if v6 {
            d.push(DeviceSpec {
                name: DEVICE_V6,
                port: s.listen_port_v6,
                inner_v4: false,
                inner_v6: true,
                v6_only: true,
            });
        }
        d
    } else if v4 || v6 {
        vec![DeviceSpec { name: DEVICE, port: s.listen_port, inner_v4: v4, inner_v6: v6, v6_only: false }]
    } else {
        Vec::new()
    }
}

/// Our lease's `BackendData` and `BackendV6Data` for the network's devices: the same public
/// key (flanneld's devices share the key file), each with the port its peers must use.
pub fn lease_data(s: &WireguardSettings, public: &Key, v4: bool, v6: bool) -> (Option<String>, Option<String>) {
    let v6_port = if s.mode == Mode::Separate { s.listen_port_v6 } else { s.listen_port };
    (v4.then(|| backend_data(public, s.listen_port)), v6.then(|| backend_data(public, v6_port)))
}

/// What the `auto` mode's endpoint choice knows of this host: whether it has an IPv4
/// address on the external interface, and its IPv6 one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Local {
    /// The external interface has an IPv4 address.
    pub has_v4: bool,
    /// The external interface's IPv6 address.
    pub v6: Option<Ipv6Addr>,
}

/// flannel's "private": RFC 1918 for IPv4, unique local (fc00::/7) for IPv6.
fn private_v6(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xfe00) == 0xfc00
}

/// `auto` mode's endpoint address (flanneld's `selectPublicEndpoint`): IPv4 when the peer
/// has only that, or a public one and we have IPv4; IPv6 when the peer has only that, or a
/// public one and ours is public too; IPv4 otherwise.
pub fn auto_endpoint(local: &Local, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> Option<IpAddr> {
    match (v4, v6) {
        (None, None) => None,
        (Some(a), None) => Some(IpAddr::V4(a)),
        (None, Some(b)) => Some(IpAddr::V6(b)),
        (Some(a), Some(b)) => {
            if !a.is_private() && local.has_v4 {
                Some(IpAddr::V4(a))
            } else if !private_v6(&b) && local.v6.is_some_and(|l| !private_v6(&l)) {
                Some(IpAddr::V6(b))
            } else {
                Some(IpAddr::V4(a))
            }
        }
    }
}

fn data_of(raw: Option<&serde_json::value::RawValue>) -> Result<(Key, u16), String> {
    parse_backend_data(raw.map(|d| d.get()).unwrap_or(""))
}

/// The peers of device `dev` for the accepted `leases`, as flanneld configures them:
/// `separate` mode: the IPv4 device gets each lease's IPv4 subnet at `PublicIP:Port` from
/// `BackendData`, the IPv6 device its IPv6 subnet at `[PublicIPv6]:Port` from
/// `BackendV6Data`; the single-device modes get both subnets, the key and port from
/// `BackendV6Data` when the lease has IPv6 (else `BackendData`), at the address `Mode`
/// picks. Leases of other backends are ignored, as flannel ignores them; a port of 0 (old
/// flanneld) means the device's own.
pub fn plan_peers<'a>(
    s: &WireguardSettings,
    dev: &DeviceSpec,
    local: &Local,
    leases: impl IntoIterator<Item = &'a Lease>,
) -> PeerPlan {
    let mut p = PeerPlan::default();
    for l in leases {
        if l.attrs.backend_type != LEASE_TYPE {
            continue;
        }
        let (v4, v6) = (l.key.v4.filter(|_| dev.inner_v4), l.key.v6.filter(|_| dev.inner_v6));
        if v4.is_none() && v6.is_none() {
            continue;
        }
        let data = if dev.v6_only || (v6.is_some() && l.attrs.backend_v6_data.is_some()) {
            ("BackendV6Data", data_of(l.attrs.backend_v6_data.as_deref()))
        } else {
            ("BackendData", data_of(l.attrs.backend_data.as_deref()))
        };
        let (key, port) = match data {
            (_, Ok(k)) => k,
            (field, Err(e)) => {
                p.skipped.push((l.key, format!("its wireguard {field} is unusable: {e}")));
                continue;
            }
        };
        let port = if port == 0 { dev.port } else { port };
        let public_v4 = (!l.attrs.public_ip.is_unspecified()).then_some(l.attrs.public_ip);
        let ip = if dev.v6_only {
            l.attrs.public_ipv6.map(IpAddr::V6)
        } else {
            match s.mode {
                Mode::Ipv6 => l.attrs.public_ipv6.map(IpAddr::V6),
                Mode::Auto => auto_endpoint(local, public_v4, l.attrs.public_ipv6),
                Mode::Ipv4 | Mode::Separate => public_v4.map(IpAddr::V4),
            }
        };
        let Some(ip) = ip else {
            let which = if matches!(ip_family_wanted(s, dev), Some(true)) { "PublicIPv6" } else { "PublicIP" };
            p.skipped.push((l.key, format!("it has no {which} to reach it at over {}", dev.name)));
            continue;
        };
        let allowed = v4.map(IpNet::V4).into_iter().chain(v6.map(IpNet::V6)).collect();
        p.peers.push(Peer { lease: l.key, public_key: key, endpoint: SocketAddr::new(ip, port), allowed_ips: allowed });
    }
    p
}

/// Which outer family a device's peers are reached over: `Some(true)` IPv6, `Some(false)`
/// IPv4, `None` per peer (`auto`).
pub fn ip_family_wanted(s: &WireguardSettings, dev: &DeviceSpec) -> Option<bool> {
    if dev.v6_only {
        return Some(true);
    }
    match s.mode {
        Mode::Ipv6 => Some(true),
        Mode::Auto => None,
        Mode::Ipv4 | Mode::Separate => Some(false),
    }
}

/// The peers of the IPv4 device (`flannel-wg`) of an IPv4-only network (see [`plan_peers`]).
pub fn plan_v4<'a>(s: &WireguardSettings, own_port: u16, leases: impl IntoIterator<Item = &'a Lease>) -> PeerPlan {
    let dev =
        DeviceSpec { name: DEVICE, port: own_port, inner_v4: true, inner_v6: s.mode != Mode::Separate, v6_only: false };
    plan_peers(s, &dev, &Local { has_v4: true, v6: None }, leases)
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::config::NetworkConfig;
    use crate::lease::{Expiry, LeaseAttrs};

    const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn settings(backend: &str) -> Result<WireguardSettings, BackendError> {
        let c = NetworkConfig::parse(&format!(r#"{{"Network":"10.5.0.0/16","Backend":{backend}}}"#)).unwrap();
        WireguardSettings::from_config(&c.backend)
    }

    #[test]
    fn defaults_are_flannels() {
        let s = settings(r#"{"Type":"wireguard"}"#).unwrap();
        assert_eq!(
            s,
            WireguardSettings {
                listen_port: 51820,
                listen_port_v6: 51821,
                psk: None,
                keepalive: 0,
                mode: Mode::Separate,
                mtu: None
            }
        );
        assert_eq!(s.mtu(1500), 1420);
    }

    #[test]
    fn keys_are_read_as_go_reads_them() {
        let s = settings(&format!(
            r#"{{"Type":"wireguard","listenport":6000,"ListenPortV6":6001,"PSK":"{PUB}","PersistentKeepaliveInterval":25,"Mode":"auto","MTU":9000}}"#
        ))
        .unwrap();
        assert_eq!(
            (s.listen_port, s.listen_port_v6, s.keepalive, s.mode, s.mtu),
            (6000, 6001, 25, Mode::Auto, Some(9000))
        );
        assert_eq!(s.psk.unwrap().to_base64(), PUB);
        assert_eq!(s.mtu(1500), 8920, "MTU is the underlay's; the overhead comes off it");
        for m in ["separate", "auto", "ipv4", "ipv6"] {
            assert_eq!(settings(&format!(r#"{{"Type":"wireguard","Mode":"{m}"}}"#)).unwrap().mode.as_str(), m);
        }
    }

    #[test]
    fn hostile_settings_are_clear_errors() {
        let err = |b: &str| settings(b).unwrap_err().to_string();
        for m in [r#""Separate""#, r#""ipv5""#, "4", r#"" auto""#] {
            let e = err(&format!(r#"{{"Type":"wireguard","Mode":{m}}}"#));
            assert!(e.contains("Backend.Mode") && e.contains("no valid Mode configured"), "{e}");
            assert!(e.contains("separate, auto, ipv4 or ipv6"), "{e}");
        }
        for p in ["0", "65536", "-1", "1.5", r#""51820""#] {
            let e = err(&format!(r#"{{"Type":"wireguard","ListenPort":{p}}}"#));
            assert!(e.contains("Backend.ListenPort"), "{e}");
            let e = err(&format!(r#"{{"Type":"wireguard","ListenPortV6":{p}}}"#));
            assert!(e.contains("Backend.ListenPortV6"), "{e}");
        }
        // A PSK that is not a key: the error never repeats the (secret) value.
        let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
        for psk in [secret, "not base64 at all, not base64 at all, not b!", &format!("{}AAAA", &PUB[..40])] {
            let e = err(&format!(r#"{{"Type":"wireguard","PSK":"{psk}"}}"#));
            assert!(e.contains("Backend.PSK") && e.contains("wg genpsk"), "{e}");
            assert!(!e.contains(psk), "the PSK leaked into the error: {e}");
        }
        assert!(err(r#"{"Type":"wireguard","PSK":5}"#).contains("Backend.PSK"));
        for k in ["-1", "65536", r#""25s""#, "true"] {
            let e = err(&format!(r#"{{"Type":"wireguard","PersistentKeepaliveInterval":{k}}}"#));
            assert!(e.contains("Backend.PersistentKeepaliveInterval"), "{e}");
        }
        for m in ["100", "655", "65536", r#""1500""#] {
            assert!(err(&format!(r#"{{"Type":"wireguard","MTU":{m}}}"#)).contains("Backend.MTU"), "{m}");
        }
        assert_eq!(settings(r#"{"Type":"wireguard","MTU":656}"#).unwrap().mtu(1500), 576);
    }

    #[test]
    fn keys_parse_strictly_and_never_print() {
        let k = Key::parse(PUB).unwrap();
        assert_eq!(k.to_base64(), PUB);
        assert_eq!(Key::parse(&format!("  {PUB}\n")).unwrap(), k, "a key file's newline");
        assert_eq!(format!("{k:?}"), "Key(…)");
        for bad in ["", "   ", &PUB[..43], &format!("{PUB}A"), "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "ä"] {
            assert!(Key::parse(bad).is_err(), "{bad:?}");
        }
        // 44 characters that are base64 but 33 bytes' worth is impossible; 31 bytes + junk:
        assert!(Key::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==").is_err());
        let c = Key::clamped([0xff; 32]);
        assert_eq!((c.0[0], c.0[31]), (0xf8, 0x7f));
    }

    #[test]
    fn lease_data_is_flannels_bytes() {
        let k = Key::parse(PUB).unwrap();
        assert_eq!(backend_data(&k, 51820), format!(r#"{{"PublicKey":"{PUB}","Port":51820}}"#));
        assert_eq!(parse_backend_data(&backend_data(&k, 51821)), Ok((k, 51821)));
        assert_eq!(parse_backend_data(&format!(r#"{{"publickey":"{PUB}"}}"#)), Ok((k, 0)), "old peers: no port");
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"PublicKey":null}"#,
            r#"{"PublicKey":5}"#,
            r#"{"PublicKey":"short"}"#,
            r#"{"PublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#,
            &format!(r#"{{"PublicKey":"{PUB}","Port":70000}}"#),
            &format!(r#"{{"PublicKey":"{PUB}","Port":"51820"}}"#),
        ] {
            assert!(parse_backend_data(bad).is_err(), "{bad}");
        }
    }

    fn wg(key: &str, ip: &str, data: Option<&str>) -> Lease {
        let mut a = LeaseAttrs::new(ip.parse().unwrap());
        a.backend_type = LEASE_TYPE.into();
        a.backend_data = data.map(|d| RawValue::from_string(d.to_string()).unwrap());
        Lease { key: key.parse().unwrap(), attrs: a, expiry: Expiry::Unknown, revision: 1 }
    }

    #[test]
    fn peers_as_flanneld_configures_them() {
        let s = settings(r#"{"Type":"wireguard"}"#).unwrap();
        let k = Key::parse(PUB).unwrap();
        let mut other = wg("10.5.4.0-24", "192.0.2.14", None);
        other.attrs.backend_type = "vxlan".into();
        let leases = vec![
            wg("10.5.2.0-24", "192.0.2.12", Some(&backend_data(&k, 6000))),
            wg("10.5.3.0-24", "192.0.2.13", Some(&format!(r#"{{"PublicKey":"{PUB}"}}"#))),
            wg("10.5.5.0-24", "192.0.2.15", Some(r#"{"PublicKey":"x"}"#)),
            wg("10.5.6.0-24", "192.0.2.16", None),
            other,
        ];
        let p = plan_v4(&s, 51820, &leases);
        assert_eq!(p.peers.len(), 2);
        assert_eq!(p.peers[0].endpoint, "192.0.2.12:6000".parse().unwrap());
        assert_eq!(p.peers[0].allowed_ips, vec!["10.5.2.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(p.peers[1].endpoint, "192.0.2.13:51820".parse().unwrap(), "port 0 → ours");
        assert_eq!(p.skipped.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>(), ["10.5.5.0-24", "10.5.6.0-24"]);
        assert!(p.skipped[1].1.contains("BackendData"));
    }

    fn dual(key: &str, ip: &str, ip6: Option<&str>, data: Option<&str>, data6: Option<&str>) -> Lease {
        let mut l = wg(key, ip, data);
        l.attrs.public_ipv6 = ip6.map(|a| a.parse().unwrap());
        l.attrs.backend_v6_data = data6.map(|d| RawValue::from_string(d.to_string()).unwrap());
        l
    }

    #[test]
    fn devices_and_lease_data_per_mode() {
        let k = Key::parse(PUB).unwrap();
        let sep = settings(r#"{"Type":"wireguard","ListenPort":6000,"ListenPortV6":6001}"#).unwrap();
        let d = devices(&sep, true, true);
        assert_eq!(
            d.iter().map(|d| (d.name, d.port, d.inner_v4, d.inner_v6)).collect::<Vec<_>>(),
            [("flannel-wg", 6000, true, false), ("flannel-wg-v6", 6001, false, true)]
        );
        assert_eq!(devices(&sep, false, true)[0].name, "flannel-wg-v6", "IPv6-only: only the v6 device");
        assert_eq!(lease_data(&sep, &k, true, true), (Some(backend_data(&k, 6000)), Some(backend_data(&k, 6001))));
        for m in ["auto", "ipv4", "ipv6"] {
            let s = settings(&format!(r#"{{"Type":"wireguard","ListenPort":6000,"Mode":"{m}"}}"#)).unwrap();
            let d = devices(&s, true, true);
            assert_eq!(d.len(), 1, "{m}: one device");
            assert_eq!((d[0].name, d[0].port, d[0].inner_v4, d[0].inner_v6), ("flannel-wg", 6000, true, true));
            // The one device listens on ListenPort: both data carry it.
            assert_eq!(lease_data(&s, &k, true, true), (Some(backend_data(&k, 6000)), Some(backend_data(&k, 6000))));
        }
        assert_eq!(lease_data(&sep, &k, true, false), (Some(backend_data(&k, 6000)), None));
        assert!(devices(&sep, false, false).is_empty());
    }

    #[test]
    fn separate_mode_peers_per_family() {
        let s = settings(r#"{"Type":"wireguard"}"#).unwrap();
        let k = Key::parse(PUB).unwrap();
        let leases = vec![
            dual(
                "10.5.2.0-24&fd00:5:0:2::-64",
                "192.0.2.12",
                Some("fd00:192::12"),
                Some(&backend_data(&k, 51820)),
                Some(&format!(r#"{{"PublicKey":"{PUB}"}}"#)),
            ),
            // v6 data malformed: the v4 peer still works, the v6 one is skipped with why.
            dual(
                "10.5.3.0-24&fd00:5:0:3::-64",
                "192.0.2.13",
                Some("fd00:192::13"),
                Some(&backend_data(&k, 7)),
                Some("{}"),
            ),
            // No PublicIPv6: cannot be reached over flannel-wg-v6.
            dual(
                "10.5.4.0-24&fd00:5:0:4::-64",
                "192.0.2.14",
                None,
                Some(&backend_data(&k, 7)),
                Some(&backend_data(&k, 8)),
            ),
        ];
        let d = devices(&s, true, true);
        let local = Local { has_v4: true, v6: Some("fd00:192::11".parse().unwrap()) };
        let v4 = plan_peers(&s, &d[0], &local, &leases);
        assert_eq!(v4.peers.len(), 3);
        assert_eq!(v4.peers[0].allowed_ips, vec!["10.5.2.0/24".parse::<IpNet>().unwrap()]);
        let v6 = plan_peers(&s, &d[1], &local, &leases);
        assert_eq!(v6.peers.len(), 1);
        assert_eq!(v6.peers[0].endpoint, "[fd00:192::12]:51821".parse().unwrap(), "port 0 → our ListenPortV6");
        assert_eq!(v6.peers[0].allowed_ips, vec!["fd00:5:0:2::/64".parse::<IpNet>().unwrap()]);
        assert!(v6.skipped[0].1.contains("BackendV6Data"), "{:?}", v6.skipped);
        assert!(v6.skipped[1].1.contains("PublicIPv6"), "{:?}", v6.skipped);
    }

    #[test]
    fn single_device_modes_pick_the_endpoint_as_flanneld() {
        let k = Key::parse(PUB).unwrap();
        let data = backend_data(&k, 6000);
        let lease =
            |ip: &str, ip6: Option<&str>| dual("10.5.2.0-24&fd00:5:0:2::-64", ip, ip6, Some(&data), Some(&data));
        let ep = |mode: &str, local: Local, l: &Lease| {
            let s = settings(&format!(r#"{{"Type":"wireguard","Mode":"{mode}"}}"#)).unwrap();
            let d = devices(&s, true, true)[0];
            let p = plan_peers(&s, &d, &local, std::iter::once(l));
            p.peers.first().map(|p| (p.endpoint.to_string(), p.allowed_ips.len()))
        };
        let public4 = lease("198.51.100.12", Some("2001:db8::12"));
        let private4 = lease("192.168.1.12", Some("2001:db8::12"));
        let ula = lease("192.168.1.12", Some("fd00::12"));
        let both = Local { has_v4: true, v6: Some("2001:db8::11".parse().unwrap()) };
        let ula_local = Local { has_v4: true, v6: Some("fd00::11".parse().unwrap()) };
        assert_eq!(ep("ipv4", both, &public4), Some(("198.51.100.12:6000".into(), 2)), "both subnets allowed");
        assert_eq!(ep("ipv6", both, &private4), Some(("[2001:db8::12]:6000".into(), 2)));
        assert_eq!(ep("auto", both, &public4), Some(("198.51.100.12:6000".into(), 2)), "public IPv4 first");
        assert_eq!(ep("auto", both, &private4), Some(("[2001:db8::12]:6000".into(), 2)), "private IPv4, public IPv6");
        assert_eq!(ep("auto", ula_local, &private4), Some(("192.168.1.12:6000".into(), 2)), "our IPv6 is not public");
        assert_eq!(ep("auto", both, &ula), Some(("192.168.1.12:6000".into(), 2)), "theirs is not public");
        let v4only = lease("192.168.1.12", None);
        assert_eq!(ep("auto", both, &v4only), Some(("192.168.1.12:6000".into(), 2)));
        assert_eq!(ep("ipv6", both, &v4only), None, "ipv6 mode and no PublicIPv6: skipped");
    }
}
