//! Peer leases are untrusted input: any host with store access, or an operator's typo, can
//! write any key and value. This module decides which peer leases a host may act on.
//!
//! [`check`] applies the rules one lease must satisfy on its own (inside the network, the
//! configured size, not ours, sane addresses); [`claims`] says what a lease holds that only
//! one lease may hold. The [`crate::cache::LeaseCache`] applies both to every lease it
//! stores and resolves the conflicts.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::backend::{Mac, mac_to_string, parse_vxlan_backend_data};
use crate::config::NetworkConfig;
use crate::lease::{Lease, SubnetKey};

/// What a host knows about itself and the network, to judge peer leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `Network` and the subnet length of IPv4 leases.
    pub v4: Option<(Ipv4Net, u8)>,
    /// `IPv6Network` and the subnet length of IPv6 leases.
    pub v6: Option<(Ipv6Net, u8)>,
    /// Our own lease (`None` for a viewer such as `weft leases`).
    pub own: Option<SubnetKey>,
    /// Our own public addresses: no peer may claim them.
    pub own_ips: Vec<IpAddr>,
}

impl Rules {
    /// The network part of the rules, from the network config.
    pub fn from_config(cfg: &NetworkConfig) -> Rules {
        Rules {
            v4: cfg.v4.map(|r| (r.network, r.subnet_len)),
            v6: cfg.v6.map(|r| (r.network, r.subnet_len)),
            own: None,
            own_ips: Vec::new(),
        }
    }
}

/// Why a peer lease is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The subnet does not lie inside `Network` / `IPv6Network` (or that family is off).
    OutsideNetwork(String),
    /// The subnet is not of the configured length.
    WrongLength(String),
    /// The subnet overlaps our own.
    OverlapsOwn(String),
    /// `PublicIP` / `PublicIPv6` is not a usable unicast address, or is ours.
    PublicIp(String),
    /// The vxlan `VtepMAC` is missing, malformed, multicast or zero.
    VtepMac(String),
    /// The wireguard `PublicKey` (or `Port`) is missing or malformed.
    WireguardKey(String),
    /// An older lease claims the same subnet, public address or VTEP MAC.
    Conflict {
        /// What both claim.
        what: String,
        /// The older lease that keeps it.
        winner: SubnetKey,
    },
}

impl Reject {
    /// The `reason` label of `weft_leases_rejected_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::OutsideNetwork(_) => "outside_network",
            Reject::WrongLength(_) => "wrong_length",
            Reject::OverlapsOwn(_) => "overlaps_own",
            Reject::PublicIp(_) => "bad_public_ip",
            Reject::VtepMac(_) => "bad_vtep_mac",
            Reject::WireguardKey(_) => "bad_wireguard_key",
            Reject::Conflict { .. } => "conflict",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::OutsideNetwork(s)
            | Reject::WrongLength(s)
            | Reject::OverlapsOwn(s)
            | Reject::PublicIp(s)
            | Reject::VtepMac(s)
            | Reject::WireguardKey(s) => f.write_str(s),
            Reject::Conflict { what, winner } => {
                write!(f, "{what} is already claimed by the older lease {winner}; delete one of the two keys")
            }
        }
    }
}

fn check_v4_ip(ip: Ipv4Addr, rules: &Rules) -> Result<(), Reject> {
    let bad = |why: &str| Err(Reject::PublicIp(format!("PublicIP {ip} is {why}")));
    if ip.is_unspecified() {
        bad("unspecified")
    } else if ip.is_loopback() {
        bad("a loopback address")
    } else if ip.is_multicast() || ip.is_broadcast() || u32::from(ip) >> 28 == 0xf {
        bad("not a unicast address")
    } else if rules.own_ips.contains(&IpAddr::V4(ip)) {
        bad("this host's own address")
    } else {
        Ok(())
    }
}

fn check_v6_ip(ip: Ipv6Addr, rules: &Rules) -> Result<(), Reject> {
    let bad = |why: &str| Err(Reject::PublicIp(format!("PublicIPv6 {ip} is {why}")));
    if ip.is_unspecified() {
        bad("unspecified")
    } else if ip.is_loopback() {
        bad("a loopback address")
    } else if ip.is_multicast() {
        bad("not a unicast address")
    } else if let Some(v4) = ip.to_ipv4_mapped() {
        check_v4_ip(v4, rules).map_err(|_| Reject::PublicIp(format!("PublicIPv6 {ip} maps to a bad IPv4 address")))
    } else if rules.own_ips.contains(&IpAddr::V6(ip)) {
        bad("this host's own address")
    } else {
        Ok(())
    }
}

/// The MACs a vxlan lease advertises (only checked for the families the network uses).
fn vtep_macs(lease: &Lease, rules: &Rules) -> Result<Vec<Mac>, Reject> {
    if lease.attrs.backend_type != "vxlan" {
        return Ok(Vec::new());
    }
    let mut macs = Vec::new();
    if lease.key.v4.is_some() && rules.v4.is_some() {
        match lease.attrs.backend_data.as_ref().and_then(|d| parse_vxlan_backend_data(d.get())) {
            Some((_, m)) => macs.push(m),
            None => return Err(Reject::VtepMac("its BackendData has no unicast VtepMAC".into())),
        }
    }
    if lease.key.v6.is_some() && rules.v6.is_some() && lease.attrs.public_ipv6.is_some() {
        match lease.attrs.backend_v6_data.as_ref().and_then(|d| parse_vxlan_backend_data(d.get())) {
            Some((_, m)) => macs.push(m),
            None => return Err(Reject::VtepMac("its BackendV6Data has no unicast VtepMAC".into())),
        }
    }
    Ok(macs)
}

/// The public keys a wireguard lease advertises (only checked for the families the network
/// uses; the IPv6 side's data only when the lease has it, since the single-tunnel modes
/// write none).
fn wireguard_keys(lease: &Lease, rules: &Rules) -> Result<Vec<crate::wireguard::Key>, Reject> {
    if lease.attrs.backend_type != crate::wireguard::LEASE_TYPE {
        return Ok(Vec::new());
    }
    let mut keys = Vec::new();
    let parse = |d: Option<&serde_json::value::RawValue>, name: &str| match d {
        None => Err(Reject::WireguardKey(format!("its {name} has no wireguard PublicKey"))),
        Some(d) => crate::wireguard::parse_backend_data(d.get())
            .map(|(k, _)| k)
            .map_err(|e| Reject::WireguardKey(format!("its wireguard {name} is unusable: {e}"))),
    };
    if lease.key.v4.is_some() && rules.v4.is_some() {
        keys.push(parse(lease.attrs.backend_data.as_deref(), "BackendData")?);
    }
    if lease.key.v6.is_some() && rules.v6.is_some() && lease.attrs.backend_v6_data.is_some() {
        keys.push(parse(lease.attrs.backend_v6_data.as_deref(), "BackendV6Data")?);
    }
    if lease.key.v6.is_some() && rules.v6.is_some() && keys.is_empty() {
        return Err(Reject::WireguardKey("it has neither BackendData nor BackendV6Data with a PublicKey".into()));
    }
    Ok(keys)
}

/// The rules one peer lease must satisfy on its own.
pub fn check(lease: &Lease, rules: &Rules) -> Result<(), Reject> {
    let key = lease.key;
    if let Some(sub) = key.v4 {
        let Some((net, len)) = rules.v4 else {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is IPv4 but the network has no IPv4 Network")));
        };
        if !net.contains(&sub) || sub.prefix_len() < net.prefix_len() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is not inside Network {net}")));
        }
        if sub.prefix_len() != len {
            return Err(Reject::WrongLength(format!("subnet {sub} is not a /{len} (SubnetLen)")));
        }
        if sub.network() != sub.addr() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} has host bits set")));
        }
        if let Some(own) = rules.own.and_then(|o| o.v4)
            && (own.contains(&sub) || sub.contains(&own))
        {
            return Err(Reject::OverlapsOwn(format!("subnet {sub} overlaps our own subnet {own}")));
        }
        check_v4_ip(lease.attrs.public_ip, rules)?;
    }
    if let Some(sub) = key.v6 {
        let Some((net, len)) = rules.v6 else {
            // An IPv4 network ignores the IPv6 half of a dual-stack lease, as flannel does.
            if key.v4.is_some() {
                wireguard_keys(lease, rules)?;
                return vtep_macs(lease, rules).map(|_| ());
            }
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is IPv6 but the network has no IPv6Network")));
        };
        if !net.contains(&sub) || sub.prefix_len() < net.prefix_len() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} is not inside IPv6Network {net}")));
        }
        if sub.prefix_len() != len {
            return Err(Reject::WrongLength(format!("subnet {sub} is not a /{len} (IPv6SubnetLen)")));
        }
        if sub.network() != sub.addr() {
            return Err(Reject::OutsideNetwork(format!("subnet {sub} has host bits set")));
        }
        if let Some(own) = rules.own.and_then(|o| o.v6)
            && (own.contains(&sub) || sub.contains(&own))
        {
            return Err(Reject::OverlapsOwn(format!("subnet {sub} overlaps our own subnet {own}")));
        }
        match lease.attrs.public_ipv6 {
            Some(ip) => check_v6_ip(ip, rules)?,
            None if key.v4.is_none() => {
                return Err(Reject::PublicIp("an IPv6-only lease without PublicIPv6".into()));
            }
            None => {}
        }
    }
    wireguard_keys(lease, rules)?;
    vtep_macs(lease, rules).map(|_| ())
}

/// Something only one lease may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Claim {
    V4(Ipv4Net),
    V6(Ipv6Net),
    Ip(IpAddr),
    Mac(Mac),
    /// A WireGuard public key: two peers with one key would be one peer to WireGuard.
    Key([u8; 32]),
}

impl Claim {
    pub(crate) fn describe(&self) -> String {
        match self {
            Claim::V4(n) => format!("subnet {n}"),
            Claim::V6(n) => format!("subnet {n}"),
            Claim::Ip(ip) => format!("public address {ip}"),
            Claim::Mac(m) => format!("VtepMAC {}", mac_to_string(m)),
            Claim::Key(k) => format!("wireguard PublicKey {}", crate::wireguard::Key(*k).to_base64()),
        }
    }
}

/// Everything a (rule-valid) lease claims. Subnets of the configured length without host
/// bits overlap only when equal, so equality of claims finds every conflict.
pub(crate) fn claims(lease: &Lease, rules: &Rules) -> Vec<Claim> {
    let mut c = Vec::new();
    if let Some(n) = lease.key.v4.filter(|_| rules.v4.is_some()) {
        c.push(Claim::V4(n));
        c.push(Claim::Ip(IpAddr::V4(lease.attrs.public_ip)));
    }
    if let Some(n) = lease.key.v6.filter(|_| rules.v6.is_some()) {
        c.push(Claim::V6(n));
        if let Some(ip) = lease.attrs.public_ipv6 {
            c.push(Claim::Ip(IpAddr::V6(ip)));
        }
    }
    c.extend(vtep_macs(lease, rules).unwrap_or_default().into_iter().map(Claim::Mac));
    c.extend(wireguard_keys(lease, rules).unwrap_or_default().into_iter().map(|k| Claim::Key(k.0)));
    c.sort();
    c.dedup();
    c
}

/// [`claims`] of a rule-valid lease whose [`crate::plan::Peer`] was read already: the vxlan
/// MACs come from it, so only a wireguard lease's data is parsed again (the cache calls this
/// on changes instead of keeping every lease's claims).
pub(crate) fn claims_of(lease: &Lease, peer: &crate::plan::Peer, rules: &Rules) -> Vec<Claim> {
    if lease.attrs.backend_type != "vxlan" {
        return claims(lease, rules);
    }
    let mut c = Vec::with_capacity(4);
    if let Some(n) = lease.key.v4.filter(|_| rules.v4.is_some()) {
        c.push(Claim::V4(n));
        c.push(Claim::Ip(IpAddr::V4(lease.attrs.public_ip)));
        c.extend(peer.vtep4.map(Claim::Mac));
    }
    if let Some(n) = lease.key.v6.filter(|_| rules.v6.is_some()) {
        c.push(Claim::V6(n));
        if let Some(ip) = lease.attrs.public_ipv6 {
            c.push(Claim::Ip(IpAddr::V6(ip)));
            c.extend(peer.vtep6.map(Claim::Mac));
        }
    }
    c.sort();
    c.dedup();
    c
}

#[cfg(test)]
pub(crate) mod tests {

    use serde_json::value::RawValue;

    use super::*;
    use crate::backend::vxlan_backend_data;
    use crate::lease::{Expiry, LeaseAttrs};

    pub(crate) fn rules() -> Rules {
        Rules {
            v4: Some(("10.5.0.0/16".parse().unwrap(), 24)),
            v6: None,
            own: Some("10.5.1.0-24".parse().unwrap()),
            own_ips: vec!["192.0.2.11".parse().unwrap()],
        }
    }

    pub(crate) fn lease(key: &str, ip: &str, rev: i64) -> Lease {
        let mut a = LeaseAttrs::new(ip.parse().unwrap());
        a.backend_type = "host-gw".into();
        Lease { key: key.parse().unwrap(), attrs: a, expiry: Expiry::Unknown, revision: rev }
    }

    pub(crate) fn vx(key: &str, ip: &str, mac: Mac, rev: i64) -> Lease {
        let mut l = lease(key, ip, rev);
        l.attrs.backend_type = "vxlan".into();
        l.attrs.backend_data = Some(RawValue::from_string(vxlan_backend_data(1, &mac)).unwrap());
        l
    }

    #[test]
    fn single_lease_rules() {
        let r = rules();
        assert_eq!(check(&lease("10.5.2.0-24", "192.0.2.12", 1), &r), Ok(()));
        let label = |l: Lease| check(&l, &r).unwrap_err().label();
        // The hostile lease of issue 9: the LAN itself.
        assert_eq!(label(lease("192.0.2.0-24", "192.0.2.99", 1)), "outside_network");
        assert_eq!(label(lease("10.0.0.0-8", "192.0.2.99", 1)), "outside_network");
        assert_eq!(label(lease("10.5.2.0-25", "192.0.2.12", 1)), "wrong_length");
        assert_eq!(label(lease("10.5.0.0-16", "192.0.2.12", 1)), "wrong_length");
        assert_eq!(label(lease("10.5.1.0-24", "192.0.2.12", 1)), "overlaps_own");
        for ip in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "240.0.0.1", "192.0.2.11"] {
            assert_eq!(label(lease("10.5.2.0-24", ip, 1)), "bad_public_ip", "{ip}");
        }
        let mut bad_mac = vx("10.5.2.0-24", "192.0.2.12", [1, 0, 0x5e, 0, 0, 1], 1);
        assert_eq!(check(&bad_mac, &r).unwrap_err().label(), "bad_vtep_mac");
        bad_mac.attrs.backend_data = None;
        assert_eq!(check(&bad_mac, &r).unwrap_err().label(), "bad_vtep_mac");
        let v6only = Lease {
            key: "0.0.0.0-0&fd00:5:0:2::-64".parse().unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::UNSPECIFIED),
            expiry: Expiry::Unknown,
            revision: 1,
        };
        assert_eq!(check(&v6only, &r).unwrap_err().label(), "outside_network", "no IPv6Network configured");
        let r6 = Rules { v4: None, v6: Some(("fd00:5::/56".parse().unwrap(), 64)), own: None, own_ips: vec![] };
        assert_eq!(check(&v6only, &r6).unwrap_err().label(), "bad_public_ip", "IPv6-only without PublicIPv6");
        let mut ok6 = v6only.clone();
        ok6.attrs.public_ipv6 = Some("fd00:192::12".parse().unwrap());
        assert_eq!(check(&ok6, &r6), Ok(()));
        for ip in ["::", "::1", "ff02::1", "::ffff:127.0.0.1"] {
            ok6.attrs.public_ipv6 = Some(ip.parse().unwrap());
            assert_eq!(check(&ok6, &r6).unwrap_err().label(), "bad_public_ip", "{ip}");
        }
    }

    #[test]
    fn claims_from_the_parsed_peer_are_the_claims_from_the_lease() {
        let r6 = Rules {
            v4: Some(("10.5.0.0/16".parse().unwrap(), 24)),
            v6: Some(("fd00:5::/56".parse().unwrap(), 64)),
            own: None,
            own_ips: vec![],
        };
        let mut dual = vx("10.5.2.0-24", "192.0.2.12", [0x0e, 1, 2, 3, 4, 5], 1);
        dual.key = "10.5.2.0-24&fd00:5:0:2::-64".parse().unwrap();
        dual.attrs.public_ipv6 = Some("2001:db8::12".parse().unwrap());
        dual.attrs.backend_v6_data =
            Some(RawValue::from_string(vxlan_backend_data(1, &[0x0e, 6, 6, 6, 6, 6])).unwrap());
        let hg = lease("10.5.3.0-24", "192.0.2.13", 1);
        for (l, r) in [(&dual, &r6), (&dual, &rules()), (&hg, &rules()), (&hg, &r6)] {
            assert_eq!(check(l, r), Ok(()));
            assert_eq!(claims_of(l, &crate::plan::Peer::of(l), r), claims(l, r), "{} {r:?}", l.key);
        }
        assert_eq!(claims(&dual, &r6).len(), 6, "two subnets, two addresses, two MACs");
    }

    pub(crate) fn wg(key: &str, ip: &str, data: Option<&str>, rev: i64) -> Lease {
        let mut l = lease(key, ip, rev);
        l.attrs.backend_type = "wireguard".into();
        l.attrs.backend_data = data.map(|d| RawValue::from_string(d.to_string()).unwrap());
        l
    }

    #[test]
    fn wireguard_leases_need_a_public_key() {
        let r = rules();
        let k = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let good = format!(r#"{{"PublicKey":"{k}","Port":51820}}"#);
        assert_eq!(check(&wg("10.5.2.0-24", "192.0.2.12", Some(&good), 1), &r), Ok(()));
        for bad in [
            None,
            Some("{}"),
            Some(r#"{"PublicKey":""}"#),
            Some(r#"{"PublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#),
            Some(r#"{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yk"}"#),
            Some(r#"{"PublicKey":["x"]}"#),
            Some(r#"{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","Port":-1}"#),
        ] {
            let e = check(&wg("10.5.2.0-24", "192.0.2.12", bad, 1), &r).unwrap_err();
            assert_eq!(e.label(), "bad_wireguard_key", "{bad:?}");
            assert!(e.to_string().contains("wireguard") || e.to_string().contains("PublicKey"), "{e}");
        }
        // Claims: the key is one lease's only.
        let c = claims(&wg("10.5.2.0-24", "192.0.2.12", Some(&good), 1), &r);
        assert!(c.iter().any(|c| matches!(c, Claim::Key(_))), "{c:?}");
    }
}
