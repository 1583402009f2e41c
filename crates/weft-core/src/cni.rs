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

/// A CNI version as numbers, for ordering ("0.3.1" → (0, 3, 1)); `None` if malformed.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let r = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(r)
}

/// The result format a version uses: versions in one family share the same result JSON,
/// so a result converts between them by changing `cniVersion` alone.
fn result_family(v: (u32, u32, u32)) -> u8 {
    match v {
        (0, 1 | 2, _) => 0,
        (0, 3 | 4, _) => 1,
        _ => 2,
    }
}

/// Picks the version to hand the delegate for a config of `config_version`: the highest
/// version the delegate supports that is not newer than the config's and has the same
/// result format (1.1.0 → 1.0.0 for today's `bridge`). Code 1 when there is none.
pub fn delegate_version(config_version: &str, delegate: &str, supported: &[String]) -> Result<String, CniError> {
    let incompatible = || {
        CniError::new(
            1,
            format!(
                "incompatible CNI versions: config is {config_version:?}, delegate {delegate} supports [{}]; use a cniVersion the delegate supports or upgrade the CNI plugins",
                supported.join(", ")
            ),
        )
    };
    let want = parse_version(config_version).ok_or_else(incompatible)?;
    supported
        .iter()
        .filter_map(|s| parse_version(s).map(|v| (v, s)))
        .filter(|(v, _)| *v <= want && result_family(*v) == result_family(want))
        .max_by_key(|(v, _)| *v)
        .map(|(_, s)| s.clone())
        .ok_or_else(incompatible)
}

/// The versions a delegate's VERSION answer lists.
pub fn parse_supported_versions(stdout: &str) -> Option<Vec<String>> {
    let v: Value = serde_json::from_str(stdout).ok()?;
    Some(v.get("supportedVersions")?.as_array()?.iter().filter_map(|s| s.as_str().map(String::from)).collect())
}

/// Converts a delegate's result to the config's version. Only versions of one result
/// family are ever chosen by [`delegate_version`], so the JSON stays as it is and only
/// `cniVersion` changes (1.1.0's result is 1.0.0's).
pub fn convert_result(delegate_stdout: &str, config_version: &str) -> Result<String, CniError> {
    let mut v: Value = serde_json::from_str(delegate_stdout)
        .map_err(|e| CniError::new(6, format!("the delegate's result is not JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(CniError::new(6, "the delegate's result is not a JSON object"));
    };
    obj.insert("cniVersion".into(), Value::from(config_version));
    Ok(v.to_string())
}

/// Checks a container ID as libcni does: letters, digits, `_`, `.` and `-`, not starting with
/// `.` or `-` (so it is always a plain file name inside `dataDir`). Code 4 otherwise.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Ok(());
    }
    Err(CniError {
        code: 4,
        msg:
            "invalid characters in CNI_CONTAINERID: use letters, digits, '_', '.' and '-', not starting with '.' or '-'"
                .into(),
        details: id.chars().take(256).collect(),
    })
}

/// The `cni.dev/valid-attachments` of a GC request: (containerID, ifname) pairs.
pub fn valid_attachments(conf: &NetConf) -> Result<Vec<(String, String)>, CniError> {
    let Some(list) = conf.raw.get("cni.dev/valid-attachments") else { return Ok(Vec::new()) };
    let bad =
        || CniError::new(7, "\"cni.dev/valid-attachments\" must be an array of {\"containerID\", \"ifname\"} objects");
    list.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|a| {
            let s = |k: &str| a.get(k).and_then(Value::as_str).map(String::from);
            Ok((s("containerID").ok_or_else(bad)?, s("ifname").unwrap_or_default()))
        })
        .collect()
}

/// What CHECK reads from one network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsView {
    /// Every link.
    pub links: Vec<LinkView>,
    /// Main-table routes: (destination, gateway).
    pub routes: Vec<(ipnet::IpNet, Option<std::net::IpAddr>)>,
}

/// One link as CHECK sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkView {
    /// Name.
    pub name: String,
    /// Index.
    pub index: u32,
    /// Administratively up.
    pub up: bool,
    /// Index of its bridge (IFLA_MASTER).
    pub master: Option<u32>,
    /// Index of its veth peer (IFLA_LINK), in the peer's namespace.
    pub peer: Option<u32>,
    /// Addresses with prefix length.
    pub addrs: Vec<ipnet::IpNet>,
}

impl NsView {
    fn link(&self, name: &str) -> Option<&LinkView> {
        self.links.iter().find(|l| l.name == name)
    }
}

/// CHECK's verdict, pure: the container interface `ifname` carries the addresses and routes
/// of `prev` (the cached result); with a bridge delegate, the host-side veth of `prev` is
/// present, up, the veth peer of the container interface and attached to `bridge`, and the
/// bridge is up with the gateway address. Code 100 with what is wrong otherwise.
pub fn check_attachment(
    prev: &Value,
    ifname: &str,
    container: &NsView,
    host: Option<(&NsView, &str)>,
) -> Result<(), CniError> {
    let fail = |m: String| Err(CniError::new(100, m));
    let Some(cif) = container.link(ifname) else {
        return fail(format!("interface {ifname} is missing in the container"));
    };
    if !cif.up {
        return fail(format!("interface {ifname} is down in the container"));
    }
    let ips = prev.get("ips").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut gateways: Vec<std::net::IpAddr> = Vec::new();
    for ip in &ips {
        let Some(a) = ip.get("address").and_then(Value::as_str) else { continue };
        let Ok(net) = a.parse::<ipnet::IpNet>() else {
            return Err(CniError::new(7, format!("prevResult address {a:?} is not an address/prefix")));
        };
        if !cif.addrs.contains(&net) {
            return fail(format!("address {a} is missing on {ifname} in the container"));
        }
        if let Some(gw) = ip.get("gateway").and_then(Value::as_str).and_then(|g| g.parse().ok()) {
            gateways.push(gw);
        }
    }
    for r in prev.get("routes").and_then(Value::as_array).cloned().unwrap_or_default() {
        let Some(dst) = r.get("dst").and_then(Value::as_str) else { continue };
        let Ok(dst_net) = dst.parse::<ipnet::IpNet>() else {
            return Err(CniError::new(7, format!("prevResult route {dst:?} is not a prefix")));
        };
        let gw: Option<std::net::IpAddr> = r.get("gw").and_then(Value::as_str).and_then(|g| g.parse().ok());
        let found = container.routes.iter().any(|(d, g)| d.trunc() == dst_net.trunc() && (gw.is_none() || *g == gw));
        if !found {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return fail(format!("route {dst}{via} is missing in the container"));
        }
    }
    let Some((host, bridge)) = host else { return Ok(()) };
    let Some(br) = host.link(bridge) else {
        return fail(format!("bridge {bridge} is missing on the host"));
    };
    if !br.up {
        return fail(format!("bridge {bridge} is down on the host"));
    }
    for gw in gateways {
        if !br.addrs.iter().any(|a| a.addr() == gw) {
            return fail(format!("bridge {bridge} does not carry the gateway address {gw}"));
        }
    }
    let host_veth = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .and_then(|ifs| {
            ifs.iter().find(|i| {
                i.get("sandbox").and_then(Value::as_str).unwrap_or("").is_empty()
                    && i.get("name").and_then(Value::as_str).is_some_and(|n| n != bridge)
            })
        })
        .and_then(|i| i.get("name")?.as_str().map(String::from));
    let Some(veth) = host_veth else {
        return fail(format!("prevResult names no host-side interface besides the bridge {bridge}"));
    };
    let Some(hv) = host.link(&veth) else {
        return fail(format!("host-side veth {veth} of {ifname} is missing on the host"));
    };
    if !hv.up {
        return fail(format!("host-side veth {veth} is down on the host"));
    }
    if cif.peer.is_some_and(|p| p != hv.index) {
        return fail(format!("{ifname} in the container is no longer paired with the host-side veth {veth}"));
    }
    if hv.master != Some(br.index) {
        return fail(format!("host-side veth {veth} is not attached to the bridge {bridge}"));
    }
    Ok(())
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

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn delegate_gets_the_highest_version_with_the_same_result_format() {
        // Debian's bridge 1.1.1.
        let bridge = strings(&["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]);
        assert_eq!(delegate_version("1.1.0", "bridge", &bridge).unwrap(), "1.0.0");
        for v in ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
            assert_eq!(delegate_version(v, "bridge", &bridge).unwrap(), v);
        }
        // Never a newer version, never another result format.
        let e = delegate_version("1.0.0", "old", &strings(&["0.3.1", "0.4.0"])).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("incompatible CNI versions") && e.msg.contains("0.4.0"), "{}", e.msg);
        assert_eq!(delegate_version("0.4.0", "new", &strings(&["1.0.0"])).unwrap_err().code, 1);
        assert_eq!(delegate_version("0.4.0", "mid", &strings(&["0.3.1", "1.0.0"])).unwrap(), "0.3.1");
        assert_eq!(delegate_version("x", "bridge", &bridge).unwrap_err().code, 1);
        assert_eq!(parse_version("1.10.0"), Some((1, 10, 0)));
        assert_eq!(parse_version("1.0"), None);
        assert_eq!(
            parse_supported_versions(r#"{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}"#),
            Some(strings(&["0.4.0", "1.0.0"]))
        );
        assert_eq!(parse_supported_versions("nope"), None);
    }

    #[test]
    fn a_result_converts_to_the_config_version_unchanged_otherwise() {
        let r = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0"}],"ips":[{"address":"10.1.17.2/24","gateway":"10.1.17.1","interface":2}],"dns":{}}"#;
        let out: Value = serde_json::from_str(&convert_result(r, "1.1.0").unwrap()).unwrap();
        let mut want: Value = serde_json::from_str(r).unwrap();
        want["cniVersion"] = json!("1.1.0");
        assert_eq!(out, want);
        assert_eq!(convert_result("[]", "1.1.0").unwrap_err().code, 6);
    }

    #[test]
    fn container_ids_are_checked_like_libcni() {
        for bad in ["/../../../../tmp/x", "../x", ".hidden", "-x", "a/b", "", "a b", "a\0b", "é"] {
            let e = validate_container_id(bad).unwrap_err();
            assert_eq!(e.code, 4, "{bad:?}");
        }
        for good in ["c1", "0123abcdef", "a_b.c-d", "x.."] {
            validate_container_id(good).unwrap();
        }
    }

    #[test]
    fn gc_reads_valid_attachments() {
        let conf = parse_netconf(br#"{"name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"net1"}]}"#).unwrap();
        assert_eq!(valid_attachments(&conf).unwrap(), vec![("a".into(), "eth0".into()), ("b".into(), "net1".into())]);
        assert!(valid_attachments(&parse_netconf(br#"{"name":"n"}"#).unwrap()).unwrap().is_empty());
        let bad = parse_netconf(br#"{"name":"n","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#).unwrap();
        assert_eq!(valid_attachments(&bad).unwrap_err().code, 7);
    }

    fn net(s: &str) -> ipnet::IpNet {
        s.parse().unwrap()
    }

    fn views() -> (Value, NsView, NsView) {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "aa"}, {"name": "veth1234", "mac": "bb"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.1.17.2/24", "gateway": "10.1.17.1", "interface": 2}],
            "routes": [{"dst": "10.1.0.0/16", "gw": "10.1.17.1"}],
        });
        let container = NsView {
            links: vec![LinkView {
                name: "eth0".into(),
                index: 2,
                up: true,
                master: None,
                peer: Some(7),
                addrs: vec![net("10.1.17.2/24")],
            }],
            routes: vec![(net("10.1.17.0/24"), None), (net("10.1.0.0/16"), Some("10.1.17.1".parse().unwrap()))],
        };
        let host = NsView {
            links: vec![
                LinkView {
                    name: "cni0".into(),
                    index: 5,
                    up: true,
                    master: None,
                    peer: None,
                    addrs: vec![net("10.1.17.1/24")],
                },
                LinkView { name: "veth1234".into(), index: 7, up: true, master: Some(5), peer: Some(2), addrs: vec![] },
            ],
            routes: vec![],
        };
        (prev, container, host)
    }

    #[test]
    fn check_covers_the_container_and_the_host_side() {
        let (prev, c, h) = views();
        check_attachment(&prev, "eth0", &c, Some((&h, "cni0"))).unwrap();
        let expect = |c: &NsView, h: &NsView, what: &str| {
            let e = check_attachment(&prev, "eth0", c, Some((h, "cni0"))).unwrap_err();
            assert_eq!(e.code, 100);
            assert!(e.msg.contains(what), "{what}: {}", e.msg);
        };
        let mut detached = h.clone();
        detached.links[1].master = None;
        expect(&c, &detached, "not attached to the bridge cni0");
        let mut down = h.clone();
        down.links[1].up = false;
        expect(&c, &down, "veth1234 is down");
        let mut gone = h.clone();
        gone.links.remove(1);
        expect(&c, &gone, "veth1234 of eth0 is missing");
        let mut no_gw = h.clone();
        no_gw.links[0].addrs.clear();
        expect(&c, &no_gw, "gateway address 10.1.17.1");
        let mut br_down = h.clone();
        br_down.links[0].up = false;
        expect(&c, &br_down, "bridge cni0 is down");
        let mut other_peer = c.clone();
        other_peer.links[0].peer = Some(99);
        expect(&other_peer, &h, "no longer paired");
        let mut no_route = c.clone();
        no_route.routes.pop();
        expect(&no_route, &h, "route 10.1.0.0/16 via 10.1.17.1 is missing");
        let mut no_addr = c.clone();
        no_addr.links[0].addrs.clear();
        expect(&no_addr, &h, "address 10.1.17.2/24 is missing on eth0");
        let mut no_if = c.clone();
        no_if.links[0].name = "eth1".into();
        expect(&no_if, &h, "interface eth0 is missing");
        // Without a bridge delegate only the container side is checked.
        check_attachment(&prev, "eth0", &c, None).unwrap();
    }
}
