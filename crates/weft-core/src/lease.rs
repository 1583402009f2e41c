//! Lease formats shared with flannel: the subnet key (`10.5.52.0-24&fd00::-64`) and the lease
//! value JSON, byte for byte as flanneld writes them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::field;

/// A key or value of a lease that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseFormatError {
    /// The subnet key is not `a.b.c.d-len[&v6-len]`.
    #[error("subnet key {key:?} is not of the form 10.5.52.0-24 or 10.5.52.0-24&fd00::-64: {why}")]
    Key {
        /// The offending key.
        key: String,
        /// What in particular is wrong.
        why: &'static str,
    },
    /// The lease value is not flannel's JSON.
    #[error("lease value is not flannel's lease JSON ({0})")]
    Value(String),
}

/// The subnet(s) of a lease, as encoded in the last segment of its store key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    /// The IPv4 subnet; `None` is written as `0.0.0.0-0` (IPv6-only leases).
    pub v4: Option<Ipv4Net>,
    /// The IPv6 subnet of a dual-stack or IPv6 lease.
    pub v6: Option<Ipv6Net>,
}

impl SubnetKey {
    /// A key for an IPv4-only lease.
    pub fn v4(net: Ipv4Net) -> Self {
        SubnetKey { v4: Some(net), v6: None }
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.v4 {
            Some(n) => write!(f, "{}-{}", n.network(), n.prefix_len())?,
            None => f.write_str("0.0.0.0-0")?,
        }
        if let Some(n) = self.v6 {
            write!(f, "&{}-{}", n.network(), n.prefix_len())?;
        }
        Ok(())
    }
}

impl FromStr for SubnetKey {
    type Err = LeaseFormatError;

    /// Parses a key strictly: every key flanneld writes is accepted; keys with leading or
    /// trailing text, which flannel's unanchored regex would half-accept, are refused.
    fn from_str(key: &str) -> Result<Self, Self::Err> {
        let e = |why| LeaseFormatError::Key { key: key.to_string(), why };
        let (v4_part, v6_part) = match key.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (key, None),
        };
        let (ip, len) = v4_part.rsplit_once('-').ok_or_else(|| e("no '-' before the IPv4 prefix length"))?;
        if ip.split('.').count() != 4 || !ip.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(e("the IPv4 part is not four dotted numbers"));
        }
        let ip: Ipv4Addr = ip.parse().map_err(|_| e("the IPv4 address is invalid"))?;
        let len = parse_len(len, 31).ok_or_else(|| e("the IPv4 prefix length is not a number from 0 to 31"))?;
        let v4 = if ip.is_unspecified() && len == 0 {
            None
        } else {
            let net = Ipv4Net::new(ip, len).map_err(|_| e("the IPv4 prefix length is invalid"))?;
            if net.network() != ip {
                return Err(e("the IPv4 subnet has host bits set"));
            }
            Some(net)
        };
        let v6 = match v6_part {
            None => None,
            Some(p) => {
                let (ip, len) = p.rsplit_once('-').ok_or_else(|| e("no '-' before the IPv6 prefix length"))?;
                if ip.is_empty() || !ip.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b':') {
                    return Err(e("the IPv6 part must be lower-case hex and colons"));
                }
                let ip: Ipv6Addr = ip.parse().map_err(|_| e("the IPv6 address is invalid"))?;
                let len =
                    parse_len(len, 127).ok_or_else(|| e("the IPv6 prefix length is not a number from 0 to 127"))?;
                let net = Ipv6Net::new(ip, len).map_err(|_| e("the IPv6 prefix length is invalid"))?;
                if net.network() != ip {
                    return Err(e("the IPv6 subnet has host bits set"));
                }
                Some(net)
            }
        };
        if v4.is_none() && v6.is_none() {
            return Err(e("it names no subnet"));
        }
        Ok(SubnetKey { v4, v6 })
    }
}

fn parse_len(s: &str, max: u8) -> Option<u8> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u8>().ok().filter(|l| *l <= max)
}

/// The value of a lease, with flannel's field names and order.
#[derive(Debug, Clone)]
pub struct LeaseAttrs {
    /// Address other hosts use to reach this one (`0.0.0.0` when unset).
    pub public_ip: Ipv4Addr,
    /// IPv6 address other hosts use to reach this one.
    pub public_ipv6: Option<Ipv6Addr>,
    /// Backend that programs this host (`vxlan`, `host-gw`); empty for `udp` and `alloc`,
    /// which flannel writes without the field.
    pub backend_type: String,
    /// Backend-specific data (vxlan: `{"VNI":1,"VtepMAC":"…"}`), kept as compact JSON text.
    pub backend_data: Option<Box<RawValue>>,
    /// Backend-specific data of the IPv6 side.
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    /// Compares the backend data's JSON text in place (a lease is compared on every store
    /// change and relisting; copying its text each time cost an allocation per value).
    fn eq(&self, other: &Self) -> bool {
        fn raw(r: &Option<Box<RawValue>>) -> Option<&str> {
            r.as_deref().map(RawValue::get)
        }
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw(&self.backend_data) == raw(&other.backend_data)
            && raw(&self.backend_v6_data) == raw(&other.backend_v6_data)
    }
}

impl LeaseAttrs {
    /// Attributes with only a public address (what udp and alloc write).
    pub fn new(public_ip: Ipv4Addr) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// The JSON text flanneld stores: compact, fixed field order, `PublicIPv6` always present.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("{\"PublicIP\":\"");
        out.push_str(&self.public_ip.to_string());
        out.push_str("\",\"PublicIPv6\":");
        match self.public_ipv6 {
            Some(ip) => {
                out.push('"');
                out.push_str(&ip.to_string());
                out.push('"');
            }
            None => out.push_str("null"),
        }
        if !self.backend_type.is_empty() {
            out.push_str(",\"BackendType\":");
            out.push_str(&Value::from(self.backend_type.as_str()).to_string());
        }
        if let Some(d) = &self.backend_data {
            out.push_str(",\"BackendData\":");
            out.push_str(d.get());
        }
        if let Some(d) = &self.backend_v6_data {
            out.push_str(",\"BackendV6Data\":");
            out.push_str(d.get());
        }
        out.push('}');
        out
    }

    /// Reads a lease value written by flanneld or weft (keys case-insensitive, as Go reads them).
    pub fn from_json(text: &str) -> Result<Self, LeaseFormatError> {
        let obj: Map<String, Value> = serde_json::from_str(text).map_err(|e| LeaseFormatError::Value(e.to_string()))?;
        let public_ip = match field(&obj, "PublicIP") {
            None | Some(Value::Null) => Ipv4Addr::UNSPECIFIED,
            Some(Value::String(s)) => match s.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => ip,
                _ => return Err(LeaseFormatError::Value(format!("PublicIP {s:?} is not an IPv4 address"))),
            },
            Some(v) => return Err(LeaseFormatError::Value(format!("PublicIP is {v}, not a string"))),
        };
        let public_ipv6 = match field(&obj, "PublicIPv6") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(
                s.parse::<Ipv6Addr>()
                    .map_err(|_| LeaseFormatError::Value(format!("PublicIPv6 {s:?} is not an IPv6 address")))?,
            ),
            Some(v) => return Err(LeaseFormatError::Value(format!("PublicIPv6 is {v}, not a string"))),
        };
        let backend_type = match field(&obj, "BackendType") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(LeaseFormatError::Value(format!("BackendType is {v}, not a string"))),
        };
        let raw = |name| -> Result<Option<Box<RawValue>>, LeaseFormatError> {
            match field(&obj, name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    RawValue::from_string(v.to_string()).map(Some).map_err(|e| LeaseFormatError::Value(e.to_string()))
                }
            }
        };
        Ok(LeaseAttrs {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data: raw("BackendData")?,
            backend_v6_data: raw("BackendV6Data")?,
        })
    }
}

/// When a lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A key without an etcd lease: an operator's reservation, never expires, never re-leased.
    Reservation,
    /// Expires at this time.
    At(SystemTime),
    /// Held by a store lease whose remaining time was not looked up.
    Unknown,
}

/// One subnet lease as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The subnet(s) leased.
    pub key: SubnetKey,
    /// The holder's attributes.
    pub attrs: LeaseAttrs,
    /// When the lease ends.
    pub expiry: Expiry,
    /// The store's create revision of the key (0 when the store does not say): the older
    /// of two conflicting leases wins.
    pub revision: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_data_with_any_number_survives_a_round_trip() {
        // Found by the `lease` fuzz target: without exact float parsing a hand-written
        // number came back as a neighbouring float after our own rewrite.
        let v = r#"{"PublicIP":"192.0.2.7","BackendData":{"X":8.885888888888889e+59,"VNI":1}}"#;
        let a = LeaseAttrs::from_json(v).unwrap();
        assert_eq!(LeaseAttrs::from_json(&a.to_json()).unwrap(), a);
        assert!(a.to_json().contains("8.885888888888889e+59"), "{}", a.to_json());
    }

    #[test]
    fn vector3_keys_round_trip() {
        let k: SubnetKey = "10.12.13.0-24".parse().unwrap();
        assert_eq!(k, SubnetKey::v4("10.12.13.0/24".parse().unwrap()));
        assert_eq!(k.to_string(), "10.12.13.0-24");
        let k: SubnetKey = "10.12.13.0-24&fd00:12:13::-56".parse().unwrap();
        assert_eq!(k.v6, Some("fd00:12:13::/56".parse().unwrap()));
        assert_eq!(k.to_string(), "10.12.13.0-24&fd00:12:13::-56");
        let k: SubnetKey = "0.0.0.0-0&fc00:0:0:1::-64".parse().unwrap();
        assert_eq!((k.v4, k.to_string().as_str()), (None, "0.0.0.0-0&fc00:0:0:1::-64"));
    }

    #[test]
    fn vector3_bad_keys_are_rejected() {
        for bad in [
            "10",
            "10.12.13.0",
            "10.12.13-24",
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&:12:13:-56",
            "10.12.13.0-24&20011::-56",
            "10.12.13.0-24&2001-56",
            "10.12.13.0-24&2001::",
            "10.12.13.0-24&2001::-56hi",
            "10.12.13.0-32",
            "10.12.13.0-24&fd00::-128",
            "x10.12.13.0-24",
            "",
            "0.0.0.0-0",
            "10.12.13.0-24&FD00::-64",
            "10.12.13.5-24",
            "10.12.13.0-16",
            "10.12.13.0-24&fd00::1-64",
        ] {
            assert!(bad.parse::<SubnetKey>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn vector4_values_are_byte_exact() {
        let mut a = LeaseAttrs::new(Ipv4Addr::new(192, 168, 64, 3));
        a.backend_type = "vxlan".into();
        a.backend_data = Some(RawValue::from_string(r#"{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#.into()).unwrap());
        let text = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        assert_eq!(a.to_json(), text);
        assert_eq!(LeaseAttrs::from_json(text).unwrap(), a);

        let mut hg = LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 5));
        hg.backend_type = "host-gw".into();
        assert_eq!(hg.to_json(), r#"{"PublicIP":"10.0.0.5","PublicIPv6":null,"BackendType":"host-gw"}"#);
        assert_eq!(
            LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 5)).to_json(),
            r#"{"PublicIP":"10.0.0.5","PublicIPv6":null}"#
        );
    }

    #[test]
    fn values_read_like_go() {
        let a = LeaseAttrs::from_json(r#"{"publicip":"10.0.0.1","PublicIPv6":"fd00::1"}"#).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(a.public_ipv6, Some("fd00::1".parse().unwrap()));
        for bad in [
            "",
            "null",
            "[]",
            r#"{"PublicIP":"fd00::1"}"#,
            r#"{"PublicIP":7}"#,
            r#"{"PublicIP":"1.2.3.4","BackendType":3}"#,
            "\u{0}",
        ] {
            assert!(LeaseAttrs::from_json(bad).is_err(), "{bad:?}");
        }
    }
}
