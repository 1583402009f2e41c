//! The flannel CNI plugin's pure half: its network config, the delegate config it renders
//! from `subnet.env` (bridge + host-local by default), and CNI error and version JSON.

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value, json};

use crate::subnet_env::ParsedSubnetEnv;

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Default `subnetFile`.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Default `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// A CNI error: the spec's code and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// CNI error code (1 version, 4 env, 5 I/O, 6 decode, 7 invalid config, 11 retry, 50 not available).
    pub code: u32,
    /// What went wrong and what to do.
    pub msg: String,
    /// Extra detail.
    pub details: String,
}

impl CniError {
    /// An error with a code and message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    /// The error JSON the runtime reads from stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut v = json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::from(self.details.clone());
        }
        v.to_string()
    }
}

/// The plugin's network config (stdin), with flannel's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// The whole object as given.
    pub raw: Map<String, Value>,
    /// `cniVersion` (empty if absent).
    pub cni_version: String,
    /// `name`.
    pub name: String,
    /// `subnetFile`.
    pub subnet_file: String,
    /// `dataDir`.
    pub data_dir: String,
}

/// Parses the network config from stdin bytes.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(6, format!("failed to parse the network configuration on stdin: {e}; the runtime must pass the flannel network config as JSON")))?;
    let Value::Object(raw) = v else {
        return Err(CniError::new(6, "the network configuration on stdin is not a JSON object"));
    };
    let s = |k: &str, default: &str| -> Result<String, CniError> {
        match raw.get(k) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => {
                Err(CniError::new(7, format!("network configuration field {k:?} must be a string, got {other}")))
            }
        }
    };
    let cni_version = s("cniVersion", "")?;
    if !cni_version.is_empty() && !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            1,
            format!("CNI version {cni_version:?} is not supported; use one of {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    Ok(NetConf {
        cni_version,
        name: s("name", "")?,
        subnet_file: s("subnetFile", DEFAULT_SUBNET_FILE)?,
        data_dir: s("dataDir", DEFAULT_DATA_DIR)?,
        raw,
    })
}

/// What the delegate needs from `subnet.env`, with the file's required fields checked as
/// flannel's plugin checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    /// `FLANNEL_NETWORK` entries.
    pub networks: Vec<Ipv4Net>,
    /// `FLANNEL_SUBNET`.
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK` entries.
    pub ipv6_networks: Vec<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET`.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ip_masq: bool,
}

impl SubnetInfo {
    /// Checks a parsed subnet file; the error lists every missing group.
    pub fn from_env(env: &ParsedSubnetEnv, path: &str) -> Result<Self, CniError> {
        let mut missing = Vec::new();
        if env.networks.is_empty() && env.ipv6_networks.is_empty() {
            missing.push("FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK");
        }
        if env.subnets.is_empty() && env.ipv6_subnets.is_empty() {
            missing.push("FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET");
        }
        if env.mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if env.ip_masq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                7,
                format!(
                    "{path} is missing {}; it is written by the weft (or flannel) daemon: check its log on this node",
                    missing.join(", ")
                ),
            ));
        }
        Ok(SubnetInfo {
            networks: env.networks.clone(),
            subnet: env.subnets.first().copied(),
            ipv6_networks: env.ipv6_networks.clone(),
            ipv6_subnet: env.ipv6_subnets.first().copied(),
            mtu: env.mtu.unwrap_or(1500),
            ip_masq: env.ip_masq.unwrap_or(false),
        })
    }
}

/// Renders the delegate config flannel's plugin builds: `delegate` with defaults filled in
/// (type bridge, ipMasq = !FLANNEL_IPMASQ, mtu, isGateway for bridge), name and cniVersion
/// from the netconf, runtimeConfig copied, and IPAM with our ranges and routes.
pub fn render_delegate(conf: &NetConf, sn: &SubnetInfo) -> Result<Value, CniError> {
    let mut d = match conf.raw.get("delegate") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(CniError::new(7, format!("\"delegate\" must be an object, got {other}"))),
    };
    match d.get("type") {
        None => {
            d.insert("type".into(), Value::from("bridge"));
        }
        Some(Value::String(_)) => {}
        Some(_) => {
            return Err(CniError::new(7, "delegate \"type\" must be a string naming a CNI plugin, e.g. \"bridge\""));
        }
    }
    if d.contains_key("name") {
        return Err(CniError::new(7, "\"delegate\" must not set \"name\": the network's name is used"));
    }
    if d.contains_key("ipam") {
        return Err(CniError::new(
            7,
            "\"delegate\" must not set \"ipam\": put IPAM settings in the top-level \"ipam\"",
        ));
    }
    if let Some(rc) = conf.raw.get("runtimeConfig") {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    d.insert("name".into(), Value::from(conf.name.clone()));
    d.entry("ipMasq").or_insert(Value::from(!sn.ip_masq));
    d.entry("mtu").or_insert(Value::from(sn.mtu));
    if d.get("type") == Some(&Value::from("bridge")) {
        d.entry("isGateway").or_insert(Value::from(true));
    }
    if !conf.cni_version.is_empty() {
        d.insert("cniVersion".into(), Value::from(conf.cni_version.clone()));
    }
    let mut ipam = match conf.raw.get("ipam") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(CniError::new(7, format!("\"ipam\" must be an object, got {other}"))),
    };
    ipam.entry("type").or_insert(Value::from("host-local"));
    let mut ranges = Vec::new();
    if let Some(s) = sn.subnet {
        ranges.push(json!([{"subnet": s.to_string()}]));
    }
    if let Some(s) = sn.ipv6_subnet {
        ranges.push(json!([{"subnet": s.to_string()}]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes = match ipam.get("routes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(r)) => r.clone(),
        Some(other) => return Err(CniError::new(7, format!("\"ipam.routes\" must be an array, got {other}"))),
    };
    routes.extend(sn.networks.iter().map(|n| json!({"dst": n.to_string()})));
    routes.extend(sn.ipv6_networks.iter().map(|n| json!({"dst": n.to_string()})));
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    Ok(Value::Object(d))
}

/// The VERSION answer.
pub fn version_json(cni_version: &str) -> String {
    let v = if cni_version.is_empty() { "1.1.0" } else { cni_version };
    json!({"cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// Whether CHECK exists in this CNI version (0.4.0 and later).
pub fn supports_check(cni_version: &str) -> bool {
    !matches!(cni_version, "0.1.0" | "0.2.0" | "0.3.0" | "0.3.1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet_env::parse;

    fn info(text: &str) -> SubnetInfo {
        SubnetInfo::from_env(&parse(text), "/run/flannel/subnet.env").unwrap()
    }

    const ENV: &str =
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn vector6_default_delegate() {
        let conf = parse_netconf(br#"{"name":"cni-flannel","type":"flannel"}"#).unwrap();
        let d = render_delegate(&conf, &info(ENV)).unwrap();
        let want: Value = serde_json::from_str(r#"{"ipMasq":false,"ipam":{"routes":[{"dst":"10.1.0.0/16"}],"ranges":[[{"subnet":"10.1.17.0/24"}]],"type":"host-local"},"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}"#).unwrap();
        assert_eq!(d, want);
        assert_eq!(d.to_string(), want.to_string(), "keys in Go's sorted order");
    }

    #[test]
    fn vector6_two_networks_v6_and_user_ipam() {
        let conf = parse_netconf(br#"{"name":"cni-flannel","type":"flannel"}"#).unwrap();
        let d = render_delegate(&conf, &info("FLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n")).unwrap();
        assert_eq!(d["ipam"]["routes"], json!([{"dst":"10.1.0.0/16"},{"dst":"192.168.0.0/16"}]));
        let d = render_delegate(&conf, &info("FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n")).unwrap();
        assert_eq!(d["ipam"]["ranges"], json!([[{"subnet":"fc00::/64"}]]));
        assert_eq!(d["ipam"]["routes"], json!([{"dst":"fc00::/48"}]));
        let conf = parse_netconf(br#"{"name":"n","type":"flannel","ipam":{"type":"my-ipam","unknown-param":"unknown-value","routes":[{"dst":"10.96.0.0/12"},{"dst":"192.168.244.0/24","gw":"10.1.17.20"}]}}"#).unwrap();
        let d = render_delegate(&conf, &info(ENV)).unwrap();
        assert_eq!(d["ipam"]["type"], "my-ipam");
        assert_eq!(d["ipam"]["unknown-param"], "unknown-value");
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst":"10.96.0.0/12"},{"dst":"192.168.244.0/24","gw":"10.1.17.20"},{"dst":"10.1.0.0/16"}])
        );
        assert_eq!(d["ipam"]["ranges"], json!([[{"subnet":"10.1.17.0/24"}]]));
    }

    #[test]
    fn user_delegate_keys_pass_through_and_defaults_do_not_override() {
        let conf = parse_netconf(br#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true,"mtu":1400,"ipMasq":true},"runtimeConfig":{"portMappings":[]}}"#).unwrap();
        let d = render_delegate(&conf, &info(ENV)).unwrap();
        assert_eq!(
            (d["hairpinMode"].clone(), d["isDefaultGateway"].clone(), d["mtu"].clone(), d["ipMasq"].clone()),
            (json!(true), json!(true), json!(1400), json!(true))
        );
        assert_eq!(d["cniVersion"], "1.0.0");
        assert_eq!(d["runtimeConfig"], json!({"portMappings": []}));
        let ptp = parse_netconf(br#"{"name":"n","delegate":{"type":"ptp"}}"#).unwrap();
        assert!(render_delegate(&ptp, &info(ENV)).unwrap().get("isGateway").is_none(), "isGateway only for bridge");
    }

    #[test]
    fn bad_input_is_a_cni_error_with_a_code() {
        assert_eq!(parse_netconf(b"{nope").unwrap_err().code, 6);
        assert_eq!(parse_netconf(b"[]").unwrap_err().code, 6);
        assert_eq!(parse_netconf(br#"{"cniVersion":"9.9.9"}"#).unwrap_err().code, 1);
        assert_eq!(parse_netconf(br#"{"subnetFile":5}"#).unwrap_err().code, 7);
        let conf = |s: &str| parse_netconf(s.as_bytes()).unwrap();
        for bad in [
            r#"{"name":"n","delegate":{"name":"x"}}"#,
            r#"{"name":"n","delegate":{"ipam":{}}}"#,
            r#"{"name":"n","delegate":{"type":3}}"#,
            r#"{"name":"n","delegate":[]}"#,
        ] {
            assert_eq!(render_delegate(&conf(bad), &info(ENV)).unwrap_err().code, 7, "{bad}");
        }
        let e = SubnetInfo::from_env(&parse("FLANNEL_MTU=1450\n"), "/x").unwrap_err();
        assert!(
            e.msg.contains(
                "missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_IPMASQ"
            ),
            "{}",
            e.msg
        );
        assert_eq!(CniError::new(7, "m").to_json("1.0.0"), r#"{"cniVersion":"1.0.0","code":7,"msg":"m"}"#);
        assert!(version_json("").contains("\"supportedVersions\":[\"0.1.0\""));
        assert!(!supports_check("0.3.1") && supports_check("1.1.0"));
    }
}
