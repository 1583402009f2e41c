//! `subnet.env`: the file the daemon writes for the CNI plugin and that it reads back on
//! restart, in flannel's exact text.

use std::fmt::Write;

use ipnet::{Ipv4Net, Ipv6Net};

/// What the daemon writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`, when IPv4 is enabled.
    pub network: Option<Ipv4Net>,
    /// The host's IPv4 lease (network form); written as its first address.
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`, when IPv6 is enabled.
    pub ipv6_network: Option<Ipv6Net>,
    /// The host's IPv6 lease (network form); written as its first address.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether the daemon masquerades (the CNI plugin then does not).
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// The file's text, line for line as flanneld writes it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.network {
            let _ = writeln!(s, "FLANNEL_NETWORK={n}");
        }
        if let Some(n) = self.subnet {
            let first = u32::from(n.network()).wrapping_add(1);
            let _ = writeln!(s, "FLANNEL_SUBNET={}/{}", std::net::Ipv4Addr::from(first), n.prefix_len());
        }
        if let Some(n) = self.ipv6_network {
            let _ = writeln!(s, "FLANNEL_IPV6_NETWORK={n}");
        }
        if let Some(n) = self.ipv6_subnet {
            let first = u128::from(n.network()).wrapping_add(1);
            let _ = writeln!(s, "FLANNEL_IPV6_SUBNET={}/{}", std::net::Ipv6Addr::from(first), n.prefix_len());
        }
        let _ = writeln!(s, "FLANNEL_MTU={}", self.mtu);
        let _ = writeln!(s, "FLANNEL_IPMASQ={}", self.ip_masq);
        s
    }
}

/// What a reader finds in a subnet file. Every field is optional: the daemon reads an old
/// file leniently, the CNI plugin checks what it requires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedSubnetEnv {
    /// `FLANNEL_NETWORK` entries (comma list, de-duplicated, masked).
    pub networks: Vec<Ipv4Net>,
    /// `FLANNEL_SUBNET` entries (masked to the network).
    pub subnets: Vec<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK` entries.
    pub ipv6_networks: Vec<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET` entries.
    pub ipv6_subnets: Vec<Ipv6Net>,
    /// `FLANNEL_MTU`, if it is a number.
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ`: `Some(true)` only for the text `true`.
    pub ip_masq: Option<bool>,
}

fn cidrs<T: std::str::FromStr + PartialEq>(value: &str, mask: impl Fn(T) -> T) -> Vec<T> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(n) = part.parse::<T>() {
            let n = mask(n);
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

/// Parses the file the way flannel's dotenv reader does: `KEY=value` lines, `#` comments,
/// optional `export `, optional quotes; unknown keys and invalid CIDRs are skipped.
pub fn parse(text: &str) -> ParsedSubnetEnv {
    let mut env = ParsedSubnetEnv::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        match key.trim() {
            "FLANNEL_NETWORK" => env.networks = cidrs(value, |n: Ipv4Net| n.trunc()),
            "FLANNEL_SUBNET" => env.subnets = cidrs(value, |n: Ipv4Net| n.trunc()),
            "FLANNEL_IPV6_NETWORK" => env.ipv6_networks = cidrs(value, |n: Ipv6Net| n.trunc()),
            "FLANNEL_IPV6_SUBNET" => env.ipv6_subnets = cidrs(value, |n: Ipv6Net| n.trunc()),
            "FLANNEL_MTU" => env.mtu = value.parse().ok(),
            "FLANNEL_IPMASQ" => env.ip_masq = Some(value == "true"),
            _ => {}
        }
    }
    env
}

impl ParsedSubnetEnv {
    /// The single previous IPv4 lease, as flanneld reads it on restart (more than one entry
    /// counts as none).
    pub fn previous_subnet(&self) -> Option<Ipv4Net> {
        (self.subnets.len() == 1).then(|| self.subnets[0])
    }

    /// The single previous IPv6 lease.
    pub fn previous_ipv6_subnet(&self) -> Option<Ipv6Net> {
        (self.ipv6_subnets.len() == 1).then(|| self.ipv6_subnets[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector5_text_is_exact() {
        let env = SubnetEnv {
            network: Some("10.5.0.0/16".parse().unwrap()),
            subnet: Some("10.5.52.0/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn vector5_dual_stack_text_is_exact() {
        let env = SubnetEnv {
            network: Some("10.42.0.0/16".parse().unwrap()),
            subnet: Some("10.42.0.0/24".parse().unwrap()),
            ipv6_network: Some("2001:cafe:42::/56".parse().unwrap()),
            ipv6_subnet: Some("2001:cafe:42::/64".parse().unwrap()),
            mtu: 1450,
            ip_masq: true,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let back = parse(&env.render());
        assert_eq!(back.previous_subnet(), env.subnet);
        assert_eq!(back.previous_ipv6_subnet(), env.ipv6_subnet);
        assert_eq!((back.mtu, back.ip_masq), (Some(1450), Some(true)));
    }

    #[test]
    fn reading_is_lenient_like_dotenv() {
        let p = parse(
            "# comment\nexport FLANNEL_NETWORK=\"10.1.0.0/16,192.168.0.0/16,10.1.0.0/16,bogus\"\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=abc\nFLANNEL_IPMASQ=TRUE\nnonsense\nOTHER=1\n",
        );
        assert_eq!(p.networks, vec!["10.1.0.0/16".parse().unwrap(), "192.168.0.0/16".parse().unwrap()]);
        assert_eq!(p.previous_subnet(), Some("10.1.17.0/24".parse().unwrap()));
        assert_eq!((p.mtu, p.ip_masq), (None, Some(false)));
        assert_eq!(parse("FLANNEL_SUBNET=10.1.17.1/24,10.1.18.1/24").previous_subnet(), None);
        assert_eq!(parse(""), ParsedSubnetEnv::default());
    }
}
