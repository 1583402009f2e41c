//! Choosing the external interface and public address (flannel's `--iface`, `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`), on a snapshot of the host's interfaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use regex::Regex;

/// One address of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// IPv6: deprecated (preferred lifetime over).
    pub deprecated: bool,
    /// IPv6: assigned by autoconfiguration rather than permanently.
    pub dynamic: bool,
    /// IPv6: a temporary (privacy) address.
    pub temporary: bool,
}

/// One interface of the host, in kernel order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Name, e.g. `eth0`.
    pub name: String,
    /// Kernel index.
    pub index: u32,
    /// MTU.
    pub mtu: u32,
    /// Addresses, in kernel order.
    pub addrs: Vec<Address>,
}

/// What the host looks like, read by the caller.
#[derive(Debug, Clone, Default)]
pub struct HostSnapshot {
    /// All interfaces.
    pub interfaces: Vec<Interface>,
    /// Index of the interface of the first IPv4 default route.
    pub default_v4: Option<u32>,
    /// Index of the interface of the first IPv6 default route.
    pub default_v6: Option<u32>,
    /// Result of the route lookup for `--iface-can-reach`: interface index and source.
    pub can_reach: Option<(u32, Option<IpAddr>)>,
}

/// The operator's choice.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `--iface` values: names or addresses, tried in order.
    pub iface: Vec<String>,
    /// `--iface-regex` values, tried after `--iface`.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach` was given.
    pub can_reach: bool,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// IPv4 is enabled in the config.
    pub want_v4: bool,
    /// IPv6 is enabled in the config.
    pub want_v6: bool,
}

/// The chosen interface and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Interface MTU.
    pub mtu: u32,
    /// The interface's own IPv4 address (VXLAN local address, udp bind address).
    pub iface_addr: Option<Ipv4Addr>,
    /// The interface's own IPv6 address.
    pub iface_addr_v6: Option<Ipv6Addr>,
    /// The address peers use (`--public-ip`, else the interface address).
    pub public_ip: Option<Ipv4Addr>,
    /// The IPv6 address peers use.
    pub public_ipv6: Option<Ipv6Addr>,
}

/// Why no interface could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IfaceError {
    /// A regex does not compile.
    #[error("--iface-regex {0:?} is not a valid regular expression: {1}")]
    BadRegex(String, String),
    /// Nothing matched the flags.
    #[error(
        "failed to find interface to use that matches the interfaces and/or regexes provided (--iface {iface:?}, --iface-regex {regex:?}); `ip -br addr` lists the candidates"
    )]
    NoMatch {
        /// `--iface` values.
        iface: Vec<String>,
        /// `--iface-regex` values.
        regex: Vec<String>,
    },
    /// No flag and no default route.
    #[error(
        "no default route found and no --iface given: pass --iface NAME (or --iface-regex, --public-ip) to choose the interface other hosts reach this one on"
    )]
    NoDefaultRoute,
    /// `--public-ip` is not on this host.
    #[error(
        "--public-ip {0} is not assigned to any interface of this host; without --iface it must be a local address"
    )]
    PublicIpNotLocal(IpAddr),
    /// The interface lacks a usable address of a needed family.
    #[error(
        "interface {name} has no usable {family} address (global unicast or link-local); add one or choose another with --iface"
    )]
    NoAddress {
        /// Interface name.
        name: String,
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
    /// The interface reports MTU 0.
    #[error("interface {0} has MTU 0; bring it up with a real MTU or choose another with --iface")]
    ZeroMtu(String),
    /// Dual stack needs one interface for both families.
    #[error("the IPv4 and IPv6 default routes use different interfaces; pass --iface to choose one")]
    DualStackMismatch,
}

fn usable_v4(ip: &Ipv4Addr) -> bool {
    !(ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || ip.is_broadcast())
}

fn usable_v6(ip: &Ipv6Addr) -> bool {
    !(ip.is_loopback() || ip.is_multicast() || ip.is_unspecified())
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => v.is_unicast_link_local(),
    }
}

/// The preferred usable IPv4 address: global before link-local, first wins.
fn best_v4(i: &Interface) -> Option<Ipv4Addr> {
    let mut c: Vec<(bool, Ipv4Addr)> = i
        .addrs
        .iter()
        .filter_map(|a| match a.ip {
            IpAddr::V4(v) if usable_v4(&v) => Some((is_link_local(&a.ip), v)),
            _ => None,
        })
        .collect();
    c.sort_by_key(|(ll, _)| *ll);
    c.first().map(|(_, v)| *v)
}

/// The preferred usable IPv6 address: global > link-local, permanent > dynamic,
/// non-temporary > temporary, never deprecated.
fn best_v6(i: &Interface) -> Option<Ipv6Addr> {
    let mut c: Vec<((bool, bool, bool), Ipv6Addr)> = i
        .addrs
        .iter()
        .filter(|a| !a.deprecated)
        .filter_map(|a| match a.ip {
            IpAddr::V6(v) if usable_v6(&v) => Some(((is_link_local(&a.ip), a.dynamic, a.temporary), v)),
            _ => None,
        })
        .collect();
    c.sort_by_key(|(k, _)| *k);
    c.first().map(|(_, v)| *v)
}

fn owner(snap: &HostSnapshot, ip: IpAddr) -> Option<&Interface> {
    snap.interfaces.iter().find(|i| i.addrs.iter().any(|a| a.ip == ip))
}

/// Picks the external interface and addresses.
pub fn select(snap: &HostSnapshot, sel: &Selection) -> Result<External, IfaceError> {
    let regexes = sel
        .iface_regex
        .iter()
        .map(|r| Regex::new(r).map_err(|e| IfaceError::BadRegex(r.clone(), e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut found: Option<(&Interface, Option<IpAddr>)> = None;
    if !sel.iface.is_empty() || !regexes.is_empty() || sel.can_reach {
        'outer: for want in &sel.iface {
            if let Ok(ip) = want.parse::<IpAddr>() {
                if let Some(i) = owner(snap, ip) {
                    found = Some((i, Some(ip)));
                    break 'outer;
                }
            } else if let Some(i) = snap.interfaces.iter().find(|i| &i.name == want) {
                found = Some((i, None));
                break 'outer;
            }
        }
        if found.is_none() {
            'rx: for rx in &regexes {
                for i in &snap.interfaces {
                    let hit_v4 =
                        sel.want_v4 && i.addrs.iter().any(|a| a.ip.is_ipv4() && rx.is_match(&a.ip.to_string()));
                    let hit_v6 =
                        sel.want_v6 && i.addrs.iter().any(|a| a.ip.is_ipv6() && rx.is_match(&a.ip.to_string()));
                    let by_ip = if sel.want_v4 && sel.want_v6 { hit_v4 && hit_v6 } else { hit_v4 || hit_v6 };
                    if by_ip {
                        let ip = i.addrs.iter().find(|a| rx.is_match(&a.ip.to_string())).map(|a| a.ip);
                        found = Some((i, ip));
                        break 'rx;
                    }
                }
                if let Some(i) = snap.interfaces.iter().find(|i| rx.is_match(&i.name)) {
                    found = Some((i, None));
                    break 'rx;
                }
            }
        }
        if found.is_none()
            && sel.can_reach
            && let Some((idx, src)) = snap.can_reach
            && let Some(i) = snap.interfaces.iter().find(|i| i.index == idx)
        {
            found = Some((i, src));
        }
        if found.is_none() {
            return Err(IfaceError::NoMatch { iface: sel.iface.clone(), regex: sel.iface_regex.clone() });
        }
    } else if let Some(ip) = sel.public_ip {
        let i = owner(snap, IpAddr::V4(ip)).ok_or(IfaceError::PublicIpNotLocal(IpAddr::V4(ip)))?;
        found = Some((i, Some(IpAddr::V4(ip))));
    } else if let Some(ip) = sel.public_ipv6 {
        let i = owner(snap, IpAddr::V6(ip)).ok_or(IfaceError::PublicIpNotLocal(IpAddr::V6(ip)))?;
        found = Some((i, Some(IpAddr::V6(ip))));
    } else {
        let idx = if sel.want_v4 {
            let v4 = snap.default_v4.ok_or(IfaceError::NoDefaultRoute)?;
            if sel.want_v6 && snap.default_v6.is_some_and(|v6| v6 != v4) {
                return Err(IfaceError::DualStackMismatch);
            }
            v4
        } else {
            snap.default_v6.ok_or(IfaceError::NoDefaultRoute)?
        };
        let i = snap.interfaces.iter().find(|i| i.index == idx).ok_or(IfaceError::NoDefaultRoute)?;
        found = Some((i, None));
    }
    let (iface, matched_ip) = found.expect("every branch above sets found or returns");
    if iface.mtu == 0 {
        return Err(IfaceError::ZeroMtu(iface.name.clone()));
    }
    let iface_addr = match matched_ip {
        Some(IpAddr::V4(v)) => Some(v),
        _ => best_v4(iface),
    };
    let iface_addr_v6 = match matched_ip {
        Some(IpAddr::V6(v)) => Some(v),
        _ => best_v6(iface),
    };
    if sel.want_v4 && iface_addr.is_none() {
        return Err(IfaceError::NoAddress { name: iface.name.clone(), family: "IPv4" });
    }
    if sel.want_v6 && iface_addr_v6.is_none() {
        return Err(IfaceError::NoAddress { name: iface.name.clone(), family: "IPv6" });
    }
    Ok(External {
        name: iface.name.clone(),
        index: iface.index,
        mtu: iface.mtu,
        iface_addr,
        iface_addr_v6,
        public_ip: if sel.want_v4 { sel.public_ip.or(iface_addr) } else { None },
        public_ipv6: if sel.want_v6 { sel.public_ipv6.or(iface_addr_v6) } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        let (ip, p) = s.split_once('/').unwrap();
        Address {
            ip: ip.parse().unwrap(),
            prefix: p.parse().unwrap(),
            deprecated: false,
            dynamic: false,
            temporary: false,
        }
    }

    fn snap() -> HostSnapshot {
        HostSnapshot {
            interfaces: vec![
                Interface {
                    name: "lo".into(),
                    index: 1,
                    mtu: 65536,
                    addrs: vec![addr("127.0.0.1/8"), addr("::1/128")],
                },
                Interface {
                    name: "eth0".into(),
                    index: 2,
                    mtu: 1500,
                    addrs: vec![addr("169.254.3.3/16"), addr("192.0.2.10/24"), addr("fe80::1/64")],
                },
                Interface {
                    name: "eth1".into(),
                    index: 3,
                    mtu: 9000,
                    addrs: vec![addr("198.51.100.7/24"), addr("2001:db8::7/64")],
                },
            ],
            default_v4: Some(2),
            default_v6: Some(3),
            can_reach: Some((3, Some("198.51.100.7".parse().unwrap()))),
        }
    }

    fn v4() -> Selection {
        Selection { want_v4: true, ..Default::default() }
    }

    #[test]
    fn default_route_interface_and_its_global_address() {
        let e = select(&snap(), &v4()).unwrap();
        assert_eq!((e.name.as_str(), e.mtu, e.iface_addr), ("eth0", 1500, Some("192.0.2.10".parse().unwrap())));
        assert_eq!(e.public_ip, e.iface_addr);
    }

    #[test]
    fn iface_by_name_by_ip_and_by_regex() {
        let s = snap();
        let e = select(&s, &Selection { iface: vec!["nope".into(), "eth1".into()], ..v4() }).unwrap();
        assert_eq!(e.name, "eth1");
        let e = select(&s, &Selection { iface: vec!["198.51.100.7".into()], ..v4() }).unwrap();
        assert_eq!(e.name, "eth1");
        let e = select(&s, &Selection { iface_regex: vec![r"^198\.51\.".into()], ..v4() }).unwrap();
        assert_eq!(e.name, "eth1");
        let e = select(&s, &Selection { iface_regex: vec!["^eth1$".into()], ..v4() }).unwrap();
        assert_eq!(e.name, "eth1");
        let e = select(&s, &Selection { can_reach: true, ..v4() }).unwrap();
        assert_eq!(e.name, "eth1");
    }

    #[test]
    fn public_ip_overrides_the_advertised_address_only() {
        let s = snap();
        let e = select(
            &s,
            &Selection { iface: vec!["eth0".into()], public_ip: Some("203.0.113.1".parse().unwrap()), ..v4() },
        )
        .unwrap();
        assert_eq!(e.iface_addr, Some("192.0.2.10".parse().unwrap()));
        assert_eq!(e.public_ip, Some("203.0.113.1".parse().unwrap()));
        let e = select(&s, &Selection { public_ip: Some("198.51.100.7".parse().unwrap()), ..v4() }).unwrap();
        assert_eq!(e.name, "eth1");
        let err = select(&s, &Selection { public_ip: Some("203.0.113.1".parse().unwrap()), ..v4() }).unwrap_err();
        assert!(matches!(err, IfaceError::PublicIpNotLocal(_)));
    }

    #[test]
    fn failures_say_what_to_do() {
        let s = snap();
        assert!(matches!(
            select(&s, &Selection { iface: vec!["wlan9".into()], ..v4() }),
            Err(IfaceError::NoMatch { .. })
        ));
        assert!(matches!(
            select(&s, &Selection { iface_regex: vec!["(".into()], ..v4() }),
            Err(IfaceError::BadRegex(..))
        ));
        let dual = Selection { want_v4: true, want_v6: true, ..Default::default() };
        assert_eq!(select(&s, &dual), Err(IfaceError::DualStackMismatch));
        let e = select(&s, &Selection { iface: vec!["eth1".into()], ..dual.clone() }).unwrap();
        assert_eq!(e.public_ipv6, Some("2001:db8::7".parse().unwrap()));
        let mut no_route = snap();
        no_route.default_v4 = None;
        assert_eq!(select(&no_route, &v4()), Err(IfaceError::NoDefaultRoute));
        let v6only = Selection { want_v6: true, iface: vec!["eth0".into()], ..Default::default() };
        assert_eq!(select(&s, &v6only).unwrap().iface_addr_v6, Some("fe80::1".parse().unwrap()));
    }
}
