//! The wireguard backend's contract with flannel, without I/O: its config keys, keys in
//! WireGuard's base64 form, the lease's `BackendData`, and the peers wanted for a set of
//! leases (public key, endpoint, allowed IPs), as flanneld configures its `flannel-wg`
//! device.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

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
    /// `PublicIP:Port` (our own port when the lease has none).
    pub endpoint: SocketAddr,
    /// The peer's subnet(s).
    pub allowed_ips: Vec<IpNet>,
}

/// The peers wanted on the IPv4 device and the leases that could not be used, with why.
#[derive(Debug, Clone, Default)]
pub struct PeerPlan {
    /// Peers, in lease order.
    pub peers: Vec<Peer>,
    /// Leases skipped (malformed data), with a reason.
    pub skipped: Vec<(SubnetKey, String)>,
}

/// The peers of the IPv4 device (`flannel-wg`) for the accepted `leases`: wireguard leases
/// with an IPv4 subnet, endpoint `PublicIP:Port`, allowed IPs the subnet (and the IPv6
/// subnet too in the single-tunnel modes). Leases of other backends are ignored, as flannel
/// ignores them. `own_port` replaces a port of 0.
pub fn plan_v4<'a>(s: &WireguardSettings, own_port: u16, leases: impl IntoIterator<Item = &'a Lease>) -> PeerPlan {
    let mut p = PeerPlan::default();
    for l in leases {
        if l.attrs.backend_type != LEASE_TYPE {
            continue;
        }
        let Some(v4) = l.key.v4 else { continue };
        let data = l.attrs.backend_data.as_ref().map(|d| d.get()).unwrap_or("");
        let (key, port) = match parse_backend_data(data) {
            Ok(k) => k,
            Err(e) => {
                p.skipped.push((l.key, format!("its wireguard BackendData is unusable: {e}")));
                continue;
            }
        };
        let port = if port == 0 { own_port } else { port };
        let mut allowed = vec![IpNet::V4(v4)];
        if s.mode != Mode::Separate
            && let Some(v6) = l.key.v6
        {
            allowed.push(IpNet::V6(v6));
        }
        p.peers.push(Peer {
            lease: l.key,
            public_key: key,
            endpoint: SocketAddr::new(IpAddr::V4(l.attrs.public_ip), port),
            allowed_ips: allowed,
        });
    }
    p
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
}
