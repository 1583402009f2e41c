//! The network configuration (`net-conf.json`, or `<prefix>/config` in etcd) with flannel's
//! field names, case-insensitive keys, defaults and validation.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

/// What is wrong with a network configuration. Each message names the field and what is
/// allowed, so the operator can fix the JSON without reading our source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not a JSON object.
    #[error(
        "network config is not valid JSON: {0}; expected an object like {{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}"
    )]
    Json(String),
    /// A field has the wrong JSON type or an unparsable value.
    #[error("network config field {field}: {problem}")]
    Field {
        /// The field, in flannel's spelling.
        field: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
    /// The combination of fields is invalid (the message is flannel's where flannel has one).
    #[error("network config: {0}")]
    Invalid(String),
}

/// The `Backend` object: its lower-cased type and the raw object for the backend's own keys.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Lower-cased `Type` (flannel looks backends up in lower case).
    pub kind: String,
    /// Whether `Backend` was absent and `udp` was chosen as flannel does.
    pub defaulted: bool,
    /// The whole `Backend` object, for backend-specific keys (`VNI`, `Port`, …).
    pub raw: Map<String, Value>,
}

impl BackendConfig {
    /// A backend key, looked up the way Go's JSON decoder does (exact, then case-insensitive).
    pub fn get(&self, key: &str) -> Option<&Value> {
        field(&self.raw, key)
    }
}

/// IPv4 part of a validated config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4Range {
    /// The cluster network (host bits masked).
    pub network: Ipv4Net,
    /// Prefix length of each host's subnet.
    pub subnet_len: u8,
    /// First subnet that may be leased.
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased.
    pub subnet_max: Ipv4Addr,
}

/// IPv6 part of a validated config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6Range {
    /// The cluster IPv6 network (host bits masked).
    pub network: Ipv6Net,
    /// Prefix length of each host's subnet.
    pub subnet_len: u8,
    /// First subnet that may be leased.
    pub subnet_min: Ipv6Addr,
    /// Last subnet that may be leased.
    pub subnet_max: Ipv6Addr,
}

/// A parsed and validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// IPv4 range, present when `EnableIPv4` (the default).
    pub v4: Option<V4Range>,
    /// IPv6 range, present when `EnableIPv6`.
    pub v6: Option<V6Range>,
    /// `EnableNFTables`: use the nftables traffic manager.
    pub enable_nftables: bool,
    /// The `Backend` object.
    pub backend: BackendConfig,
    /// `NetworkPolicy` (weft's own key): enforce Kubernetes NetworkPolicy (kube mode only).
    pub network_policy: bool,
}

/// Looks up `name` in a JSON object as Go's `encoding/json` does: exact key first, then
/// the first key equal to it ignoring ASCII case.
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

fn opt_bool(obj: &Map<String, Value>, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match field(obj, name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ConfigError::Field { field: name, problem: format!("expected true or false, got {other}") }),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, name: &'static str, example: &str) -> Result<Option<&'a str>, ConfigError> {
    match field(obj, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ConfigError::Field {
            field: name,
            problem: format!("expected a string like \"{example}\", got {other}"),
        }),
    }
}

fn opt_len(obj: &Map<String, Value>, name: &'static str) -> Result<Option<u8>, ConfigError> {
    match field(obj, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => Ok(None),
            Some(v) if v <= 128 => Ok(Some(v as u8)),
            _ => Err(ConfigError::Field {
                field: name,
                problem: format!("expected a prefix length between 1 and 128, got {n}"),
            }),
        },
        Some(other) => Err(ConfigError::Field {
            field: name,
            problem: format!("expected a number (a prefix length such as 24), got {other}"),
        }),
    }
}

fn bad(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field { field, problem: problem.into() }
}

/// `2^(bits-prefix) - 1`: the host part of a prefix, without overflow for /0.
fn host_mask(bits: u8, prefix: u8) -> u128 {
    let host_bits = u32::from(bits - prefix);
    if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 }
}

/// Validated range of one family, in integer form: shared by v4 and v6 checks.
struct Range {
    subnet_len: u8,
    min: u128,
    max: u128,
}

struct FamilyRules {
    bits: u8,
    network_field: &'static str,
    len_field: &'static str,
    min_field: &'static str,
    max_field: &'static str,
    max_subnet_len: u8,
    min_network_prefix_msg: &'static str,
}

const V4_RULES: FamilyRules = FamilyRules {
    bits: 32,
    network_field: "Network",
    len_field: "SubnetLen",
    min_field: "SubnetMin",
    max_field: "SubnetMax",
    max_subnet_len: 30,
    min_network_prefix_msg: "network is too small. Minimum useful network prefix is /28",
};

const V6_RULES: FamilyRules = FamilyRules {
    bits: 128,
    network_field: "IPv6Network",
    len_field: "IPv6SubnetLen",
    min_field: "IPv6SubnetMin",
    max_field: "IPv6SubnetMax",
    max_subnet_len: 126,
    min_network_prefix_msg: "IPv6Network is too small. Minimum useful network prefix is /124",
};

/// flannel's `CheckNetworkConfig` for one family, on integers.
fn check_family(
    rules: &FamilyRules,
    net: u128,
    prefix: u8,
    len: Option<u8>,
    min: Option<u128>,
    max: Option<u128>,
) -> Result<Range, ConfigError> {
    let subnet_len = match len {
        Some(l) => {
            if l > rules.max_subnet_len {
                return Err(ConfigError::Invalid(format!(
                    "{} must be less than /{} (got {l})",
                    rules.len_field,
                    rules.max_subnet_len + 1
                )));
            }
            if u16::from(l) < u16::from(prefix) + 2 {
                return Err(ConfigError::Invalid(format!(
                    "{} /{l} is too large for a /{prefix} network: the network must be able to accommodate at least four subnets (use a {} of at least /{})",
                    rules.len_field,
                    rules.len_field,
                    prefix + 2
                )));
            }
            l
        }
        None => {
            if prefix > rules.max_subnet_len - 2 {
                return Err(ConfigError::Invalid(rules.min_network_prefix_msg.to_string()));
            }
            let default_len = if rules.bits == 32 { 24 } else { 64 };
            if prefix <= default_len - 2 { default_len } else { prefix + 2 }
        }
    };
    let size_mask = host_mask(rules.bits, subnet_len);
    let size = size_mask + 1;
    let net_mask = host_mask(rules.bits, prefix);
    let check = |value: Option<u128>, field: &'static str, default: u128| -> Result<u128, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        if v < net || v > net + net_mask {
            return Err(ConfigError::Invalid(format!("{field} is not in the range of the {}", rules.network_field)));
        }
        if v & size_mask != 0 {
            return Err(ConfigError::Invalid(format!(
                "{field} is not on a {} boundary: {}",
                rules.len_field,
                render(rules.bits, v)
            )));
        }
        Ok(v)
    };
    let min = check(min, rules.min_field, net + size)?;
    let max = check(max, rules.max_field, net + net_mask - size_mask)?;
    if min > max {
        return Err(ConfigError::Invalid(format!(
            "{} {} is above {} {}: no subnet could ever be leased",
            rules.min_field,
            render(rules.bits, min),
            rules.max_field,
            render(rules.bits, max)
        )));
    }
    Ok(Range { subnet_len, min, max })
}

fn render(bits: u8, v: u128) -> String {
    if bits == 32 { Ipv4Addr::from(v as u32).to_string() } else { Ipv6Addr::from(v).to_string() }
}

impl NetworkConfig {
    /// Parses and validates a configuration as flannel does in etcd mode.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ConfigError::Json(format!("found {} instead of an object", kind_of(&value))));
        };
        let enable_ipv4 = opt_bool(&obj, "EnableIPv4", true)?;
        let enable_ipv6 = opt_bool(&obj, "EnableIPv6", false)?;
        let enable_nftables = opt_bool(&obj, "EnableNFTables", false)?;
        let network_policy = opt_bool(&obj, "NetworkPolicy", false)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(ConfigError::Invalid(
                "neither EnableIPv4 nor EnableIPv6 is true: enable at least one address family".into(),
            ));
        }
        let v4 = if enable_ipv4 { Some(parse_v4(&obj)?) } else { None };
        let v6 = if enable_ipv6 { Some(parse_v6(&obj)?) } else { None };
        let backend = parse_backend(&obj)?;
        Ok(NetworkConfig { v4, v6, enable_nftables, backend, network_policy })
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_v4(obj: &Map<String, Value>) -> Result<V4Range, ConfigError> {
    let network = match opt_str(obj, "Network", "10.244.0.0/16")? {
        None => {
            return Err(ConfigError::Invalid(
                "please define a correct Network parameter in the flannel config (an IPv4 CIDR such as \"10.244.0.0/16\")".into(),
            ));
        }
        Some(s) => s
            .parse::<Ipv4Net>()
            .map_err(|_| {
                bad("Network", format!("\"{s}\" is not an IPv4 CIDR; expected something like \"10.244.0.0/16\""))
            })?
            .trunc(),
    };
    let addr = |name: &'static str| -> Result<Option<u128>, ConfigError> {
        opt_str(obj, name, "10.244.1.0")?
            .map(|s| {
                s.parse::<Ipv4Addr>().map(|a| u128::from(u32::from(a))).map_err(|_| {
                    bad(name, format!("\"{s}\" is not an IPv4 address (no prefix length), e.g. \"10.244.1.0\""))
                })
            })
            .transpose()
    };
    let r = check_family(
        &V4_RULES,
        u128::from(u32::from(network.network())),
        network.prefix_len(),
        opt_len(obj, "SubnetLen")?,
        addr("SubnetMin")?,
        addr("SubnetMax")?,
    )?;
    Ok(V4Range {
        network,
        subnet_len: r.subnet_len,
        subnet_min: Ipv4Addr::from(r.min as u32),
        subnet_max: Ipv4Addr::from(r.max as u32),
    })
}

fn parse_v6(obj: &Map<String, Value>) -> Result<V6Range, ConfigError> {
    let network = match opt_str(obj, "IPv6Network", "fd00:10:244::/56")? {
        None => {
            return Err(ConfigError::Invalid(
                "please define a correct IPv6Network parameter in the flannel config (an IPv6 CIDR such as \"fd00:10:244::/56\")".into(),
            ));
        }
        Some(s) => s
            .parse::<Ipv6Net>()
            .map_err(|_| {
                bad("IPv6Network", format!("\"{s}\" is not an IPv6 CIDR; expected something like \"fd00:10:244::/56\""))
            })?
            .trunc(),
    };
    let addr = |name: &'static str| -> Result<Option<u128>, ConfigError> {
        opt_str(obj, name, "fd00:10:244:1::")?
            .map(|s| {
                s.parse::<Ipv6Addr>()
                    .map(u128::from)
                    .map_err(|_| bad(name, format!("\"{s}\" is not an IPv6 address (no prefix length)")))
            })
            .transpose()
    };
    let r = check_family(
        &V6_RULES,
        u128::from(network.network()),
        network.prefix_len(),
        opt_len(obj, "IPv6SubnetLen")?,
        addr("IPv6SubnetMin")?,
        addr("IPv6SubnetMax")?,
    )?;
    Ok(V6Range {
        network,
        subnet_len: r.subnet_len,
        subnet_min: Ipv6Addr::from(r.min),
        subnet_max: Ipv6Addr::from(r.max),
    })
}

fn parse_backend(obj: &Map<String, Value>) -> Result<BackendConfig, ConfigError> {
    match field(obj, "Backend") {
        None | Some(Value::Null) => Ok(BackendConfig { kind: "udp".into(), defaulted: true, raw: Map::new() }),
        Some(Value::Object(raw)) if raw.is_empty() => {
            Ok(BackendConfig { kind: "udp".into(), defaulted: true, raw: raw.clone() })
        }
        Some(Value::Object(raw)) => {
            let kind = match field(raw, "Type") {
                Some(Value::String(s)) if !s.is_empty() => s.to_ascii_lowercase(),
                Some(Value::String(_)) | None | Some(Value::Null) => {
                    return Err(bad(
                        "Backend.Type",
                        "missing: set it to one of \"vxlan\", \"host-gw\", \"udp\" or \"alloc\"",
                    ));
                }
                Some(other) => {
                    return Err(bad("Backend.Type", format!("expected a string such as \"vxlan\", got {other}")));
                }
            };
            Ok(BackendConfig { kind, defaulted: false, raw: raw.clone() })
        }
        Some(other) => Err(bad("Backend", format!("expected an object like {{\"Type\": \"vxlan\"}}, got {other}"))),
    }
}

/// An invalid backend setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// `Backend.Type` names no backend.
    #[error("unknown backend type {0:?}: set Backend.Type to vxlan, host-gw, wireguard, udp or alloc")]
    Unknown(String),
    /// A key has a bad value.
    #[error("network config field Backend.{field}: {problem}")]
    Field {
        /// Key name.
        field: &'static str,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> V4Range {
        NetworkConfig::parse(text).unwrap().v4.unwrap()
    }

    fn err(text: &str) -> String {
        NetworkConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn vector1_defaults_for_a_slash16() {
        let r = v4(r#"{ "network": "10.3.0.0/16" }"#);
        assert_eq!(r.network, "10.3.0.0/16".parse().unwrap());
        assert_eq!(r.subnet_len, 24);
        assert_eq!(r.subnet_min, Ipv4Addr::new(10, 3, 1, 0));
        assert_eq!(r.subnet_max, Ipv4Addr::new(10, 3, 255, 0));
    }

    #[test]
    fn vector1_explicit_values_are_kept() {
        let r = v4(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.0","SubnetMax":"10.3.8.0","SubnetLen":28}"#);
        assert_eq!(r.subnet_len, 28);
        assert_eq!(r.subnet_min, Ipv4Addr::new(10, 3, 5, 0));
        assert_eq!(r.subnet_max, Ipv4Addr::new(10, 3, 8, 0));
    }

    #[test]
    fn vector1_small_networks() {
        let r = v4(r#"{"Network":"10.0.0.0/23"}"#);
        assert_eq!(
            (r.subnet_len, r.subnet_min, r.subnet_max),
            (25, Ipv4Addr::new(10, 0, 0, 128), Ipv4Addr::new(10, 0, 1, 128))
        );
        let r = v4(r#"{"Network":"10.0.0.0/28"}"#);
        assert_eq!(
            (r.subnet_len, r.subnet_min, r.subnet_max),
            (30, Ipv4Addr::new(10, 0, 0, 4), Ipv4Addr::new(10, 0, 0, 12))
        );
        assert!(err(r#"{"Network":"10.0.0.0/29"}"#).contains("Minimum useful network prefix is /28"));
        assert!(err(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#).contains("SubnetLen must be less than /31"));
        assert!(err(r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#).contains("at least four subnets"));
    }

    #[test]
    fn vector2_ipv6_only() {
        let c =
            NetworkConfig::parse(r#"{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }"#).unwrap();
        assert!(c.v4.is_none());
        let r = c.v6.unwrap();
        assert_eq!(r.subnet_len, 64);
        assert_eq!(r.subnet_min, "fc00:0:0:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(r.subnet_max, "fc00:0:0:ffff::".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn host_bits_are_masked_and_keys_are_case_insensitive() {
        let c = NetworkConfig::parse(r#"{"NETWORK":"10.3.1.5/16","backend":{"type":"VXLAN","vni":4}}"#).unwrap();
        assert_eq!(c.v4.unwrap().network, "10.3.0.0/16".parse().unwrap());
        assert_eq!(c.backend.kind, "vxlan");
        assert_eq!(c.backend.get("VNI"), Some(&Value::from(4)));
    }

    #[test]
    fn backend_defaults_to_udp_and_type_is_required() {
        let c = NetworkConfig::parse(r#"{"Network":"10.3.0.0/16"}"#).unwrap();
        assert_eq!((c.backend.kind.as_str(), c.backend.defaulted), ("udp", true));
        assert!(err(r#"{"Network":"10.3.0.0/16","Backend":{"Port":1}}"#).contains("Backend.Type"));
    }

    #[test]
    fn network_policy_is_opt_in() {
        assert!(!NetworkConfig::parse(r#"{"Network":"10.3.0.0/16"}"#).unwrap().network_policy);
        assert!(NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","NetworkPolicy":true}"#).unwrap().network_policy);
        assert!(!NetworkConfig::parse(r#"{"Network":"10.3.0.0/16","NetworkPolicy":false}"#).unwrap().network_policy);
        assert!(
            err(r#"{"Network":"10.3.0.0/16","NetworkPolicy":"on"}"#).contains("NetworkPolicy: expected true or false")
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        assert!(err("{").contains("not valid JSON"));
        assert!(err("[1]").contains("instead of an object"));
        assert!(err(r#"{}"#).contains("Network parameter"));
        assert!(err(r#"{"Network":"fd00::/48"}"#).contains("Network: \"fd00::/48\" is not an IPv4 CIDR"));
        assert!(err(r#"{"Network":5}"#).contains("field Network: expected a string"));
        assert!(err(r#"{"Network":"10.3.0.0/16","EnableIPv6":"yes"}"#).contains("EnableIPv6: expected true or false"));
        assert!(
            err(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.4.0.0"}"#)
                .contains("SubnetMin is not in the range of the Network")
        );
        assert!(
            err(r#"{"Network":"10.3.0.0/16","SubnetMax":"10.3.0.5"}"#)
                .contains("SubnetMax is not on a SubnetLen boundary: 10.3.0.5")
        );
        assert!(err(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.9.0","SubnetMax":"10.3.8.0"}"#).contains("above"));
        assert!(err(r#"{"Network":"10.3.0.0/16","SubnetLen":-1}"#).contains("SubnetLen"));
        assert!(err(r#"{"EnableIPv4":false}"#).contains("at least one address family"));
        assert!(err(r#"{"EnableIPv6":true,"EnableIPv4":false,"IPv6Network":"fc00::/126"}"#).contains("/124"));
    }
}
