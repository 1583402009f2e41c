//! Kubernetes subnet manager formats (flanneld's `--kube-subnet-mgr`): annotation names from
//! the prefix, the annotation values flanneld writes for a lease, a Node read back into a
//! lease, and the patches weft sends. Pure: the store (`weft::registry::kube`) feeds it the
//! few fields of a Node that matter ([`NodeView`]) and sends what it returns.
//!
//! Everything another host wrote is untrusted: a node whose annotations or podCIDRs do not
//! read is skipped with a reason ([`Skip`]), never an error that stops the daemon. What is
//! read still goes through [`crate::validate`] like every other store's leases.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::value::RawValue;

use crate::config::NetworkConfig;
use crate::lease::{Expiry, Lease, LeaseAttrs, SubnetKey};

/// flanneld's default `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The annotation names for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationNames {
    /// `kube-subnet-manager`: `"true"` on nodes run by a kube subnet manager.
    pub kube_subnet_manager: String,
    /// `backend-type`.
    pub backend_type: String,
    /// `backend-data`.
    pub backend_data: String,
    /// `backend-v6-data`.
    pub backend_v6_data: String,
    /// `public-ip`.
    pub public_ip: String,
    /// `public-ipv6`.
    pub public_ipv6: String,
    /// `public-ip-overwrite`: set by an operator, written as `public-ip`.
    pub public_ip_overwrite: String,
    /// `public-ipv6-overwrite`.
    pub public_ipv6_overwrite: String,
    /// `node-public-ip`: set by an operator, overrides `--public-ip`.
    pub node_public_ip: String,
    /// `node-public-ipv6`: overrides `--public-ipv6`.
    pub node_public_ipv6: String,
}

/// A `--kube-annotation-prefix` flannel would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid --kube-annotation-prefix {prefix:?}: {why}; use a lower-case domain, optionally followed by '/' and a lower-case name, e.g. flannel.alpha.coreos.com or example.com/net"
)]
pub struct PrefixError {
    /// The prefix given.
    pub prefix: String,
    /// What is wrong with it.
    pub why: &'static str,
}

fn name_chars(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// flannel's normalisation: at most one `/`; none → append `/`; not ending in `/` or `-` →
/// append `-`; then the result must match `(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$`.
pub fn normalize_prefix(prefix: &str) -> Result<String, PrefixError> {
    let e = |why| PrefixError { prefix: prefix.to_string(), why };
    let mut p = prefix.to_string();
    match p.matches('/').count() {
        0 => p.push('/'),
        1 => {}
        _ => return Err(e("it has more than one '/'")),
    }
    if !p.ends_with('/') && !p.ends_with('-') {
        p.push('-');
    }
    let (domain, name) = p.split_once('/').ok_or_else(|| e("it has no '/'"))?;
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || !labels.iter().all(|l| name_chars(l)) {
        return Err(e("the part before '/' is not a lower-case domain with at least one dot"));
    }
    if !(name.is_empty() || (name.ends_with('-') && name_chars(name))) {
        return Err(e("the part after '/' is not lower-case letters, digits, '_' and '-'"));
    }
    Ok(p)
}

impl AnnotationNames {
    /// The names for `prefix` (normalised and checked as flannel does).
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let p = normalize_prefix(prefix)?;
        let n = |suffix: &str| format!("{p}{suffix}");
        Ok(AnnotationNames {
            kube_subnet_manager: n("kube-subnet-manager"),
            backend_type: n("backend-type"),
            backend_data: n("backend-data"),
            backend_v6_data: n("backend-v6-data"),
            public_ip: n("public-ip"),
            public_ipv6: n("public-ipv6"),
            public_ip_overwrite: n("public-ip-overwrite"),
            public_ipv6_overwrite: n("public-ipv6-overwrite"),
            node_public_ip: n("node-public-ip"),
            node_public_ipv6: n("node-public-ipv6"),
        })
    }

    /// Whether `key` is one of these names (the store keeps only those of a Node).
    pub fn contains(&self, key: &str) -> bool {
        [
            &self.kube_subnet_manager,
            &self.backend_type,
            &self.backend_data,
            &self.backend_v6_data,
            &self.public_ip,
            &self.public_ipv6,
            &self.public_ip_overwrite,
            &self.public_ipv6_overwrite,
            &self.node_public_ip,
            &self.node_public_ipv6,
        ]
        .iter()
        .any(|n| n.as_str() == key)
    }
}

/// The few hundred bytes of a Node that matter (a Node object is 5–15 KB).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// `metadata.name`.
    pub name: String,
    /// `spec.podCIDR`.
    pub pod_cidr: Option<String>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<String>,
    /// Our annotations only ([`AnnotationNames::contains`]).
    pub annotations: BTreeMap<String, String>,
    /// `metadata.creationTimestamp`, seconds since the epoch (0 unknown): the older of two
    /// nodes claiming one subnet keeps it.
    pub created: i64,
}

/// Why a node is not used as a peer lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why our own node gives us no lease (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnLeaseError {
    /// No podCIDR assigned: wait for it.
    #[error(
        "node {node:?} has no pod CIDR assigned (spec.podCIDR is empty). Kubernetes assigns it when kube-controller-manager runs with --allocate-node-cidrs=true and --cluster-cidr={network} (kubeadm: `kubeadm init --pod-network-cidr={network}`), or set it on the node yourself; weft waits and continues by itself once it is assigned"
    )]
    NotAssigned {
        /// Our node.
        node: String,
        /// The Network from the config, for the message.
        network: String,
    },
    /// The podCIDRs do not read or do not fit the network config.
    #[error("node {node:?}: {why}")]
    Unusable {
        /// Our node.
        node: String,
        /// What is wrong and what to change.
        why: String,
    },
}

/// Reads a CIDR as Go's `net.ParseCIDR` does (host bits masked off).
fn parse_cidr(s: &str) -> Option<IpNet> {
    s.trim().parse::<IpNet>().ok().map(|n| n.trunc())
}

/// The subnet(s) of a node: `spec.podCIDRs` (one per family, at most two), else `spec.podCIDR`.
pub fn node_subnets(view: &NodeView) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), String> {
    let list: Vec<&str> = if view.pod_cidrs.is_empty() {
        view.pod_cidr.iter().map(String::as_str).filter(|s| !s.is_empty()).collect()
    } else {
        view.pod_cidrs.iter().map(String::as_str).collect()
    };
    if list.len() > 2 {
        return Err(format!("it has {} podCIDRs; at most one IPv4 and one IPv6 are possible", list.len()));
    }
    let (mut v4, mut v6) = (None, None);
    for s in list {
        match parse_cidr(s) {
            Some(IpNet::V4(n)) if v4.is_none() => v4 = Some(n),
            Some(IpNet::V6(n)) if v6.is_none() => v6 = Some(n),
            Some(_) => return Err(format!("its podCIDRs {:?} name one family twice", view.pod_cidrs)),
            None => return Err(format!("podCIDR {s:?} is not a CIDR")),
        }
    }
    Ok((v4, v6))
}

/// Our own lease key from our node, checked against the config.
pub fn own_key(view: &NodeView, cfg: &NetworkConfig) -> Result<SubnetKey, OwnLeaseError> {
    let network = [cfg.v4.map(|r| r.network.to_string()), cfg.v6.map(|r| r.network.to_string())]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(",");
    let unusable = |why: String| OwnLeaseError::Unusable { node: view.name.clone(), why };
    let (v4, v6) = node_subnets(view).map_err(unusable)?;
    if v4.is_none() && v6.is_none() {
        return Err(OwnLeaseError::NotAssigned { node: view.name.clone(), network });
    }
    let mut key = SubnetKey { v4: None, v6: None };
    if let Some(r) = cfg.v4 {
        let Some(n) = v4 else {
            return Err(unusable(format!(
                "the network config has an IPv4 Network {} but the node has no IPv4 podCIDR; give the cluster an IPv4 --cluster-cidr or drop Network from net-conf.json",
                r.network
            )));
        };
        if !r.network.contains(&n) {
            return Err(unusable(format!(
                "its podCIDR {n} is not inside Network {}; make kube-controller-manager's --cluster-cidr and the Network of net-conf.json the same",
                r.network
            )));
        }
        key.v4 = Some(n);
    }
    if let Some(r) = cfg.v6 {
        let Some(n) = v6 else {
            return Err(unusable(format!(
                "the network config has an IPv6Network {} but the node has no IPv6 podCIDR; give the cluster an IPv6 --cluster-cidr or drop IPv6Network from net-conf.json",
                r.network
            )));
        };
        if !r.network.contains(&n) {
            return Err(unusable(format!(
                "its IPv6 podCIDR {n} is not inside IPv6Network {}; make kube-controller-manager's --cluster-cidr and the IPv6Network of net-conf.json the same",
                r.network
            )));
        }
        key.v6 = Some(n);
    }
    Ok(key)
}

/// The `node-public-ip` / `node-public-ipv6` annotations of our node, which override
/// `--public-ip` / `--public-ipv6` as in flanneld. Values that do not read are reported.
pub fn public_ip_overrides(
    view: &NodeView,
    names: &AnnotationNames,
) -> (Result<Option<Ipv4Addr>, String>, Result<Option<Ipv6Addr>, String>) {
    let read = |name: &str| view.annotations.get(name).map(|s| s.trim()).filter(|s| !s.is_empty());
    let v4 = match read(&names.node_public_ip) {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| format!("{} {s:?} is not an IPv4 address", names.node_public_ip)),
    };
    let v6 = match read(&names.node_public_ipv6) {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| format!("{} {s:?} is not an IPv6 address", names.node_public_ipv6)),
    };
    (v4, v6)
}

fn raw_text(raw: &Option<Box<RawValue>>) -> String {
    raw.as_ref().map_or_else(|| "null".to_string(), |r| r.get().to_string())
}

/// Whether flanneld writes the IPv4 half (`backend-data`, `public-ip`) for this lease: always,
/// except vxlan and wireguard without IPv4 data (IPv6-only).
fn writes_v4(attrs: &LeaseAttrs, has_v6: bool) -> bool {
    match attrs.backend_type.as_str() {
        "vxlan" => attrs.backend_data.is_some(),
        "wireguard" => attrs.backend_data.is_some() && !has_v6,
        _ => true,
    }
}

/// Whether flanneld writes the IPv6 half (`backend-v6-data`, `public-ipv6`).
fn writes_v6(attrs: &LeaseAttrs) -> bool {
    match attrs.backend_type.as_str() {
        "vxlan" | "wireguard" => attrs.backend_v6_data.is_some(),
        "host-gw" | "extension" => attrs.public_ipv6.is_some(),
        _ => false,
    }
}

/// Our node's annotations as flanneld leaves them for `attrs`, given the current ones
/// (`public-ip-overwrite` / `public-ipv6-overwrite` are honoured: their value is written as
/// the public address). Only our annotation names are returned.
pub fn wanted_annotations(
    current: &BTreeMap<String, String>,
    attrs: &LeaseAttrs,
    key: &SubnetKey,
    names: &AnnotationNames,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert(names.backend_type.clone(), attrs.backend_type.clone());
    let overwrite = |name: &str| current.get(name).filter(|v| !v.is_empty()).cloned();
    if writes_v4(attrs, key.v6.is_some()) {
        out.insert(names.backend_data.clone(), raw_text(&attrs.backend_data));
        let ip = overwrite(&names.public_ip_overwrite).unwrap_or_else(|| attrs.public_ip.to_string());
        out.insert(names.public_ip.clone(), ip);
    }
    if writes_v6(attrs) {
        out.insert(names.backend_v6_data.clone(), raw_text(&attrs.backend_v6_data));
        let ip = overwrite(&names.public_ipv6_overwrite)
            .unwrap_or_else(|| attrs.public_ipv6.map(|ip| ip.to_string()).unwrap_or_default());
        out.insert(names.public_ipv6.clone(), ip);
    }
    out.insert(names.kube_subnet_manager.clone(), "true".into());
    out
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The strategic-merge patch of our node's `status` subresource that brings its annotations
/// to what flanneld writes for `attrs` (sorted keys, only the ones that differ, as the
/// two-way merge patch flanneld computes), or `None` when nothing differs.
pub fn annotation_patch(
    current: &BTreeMap<String, String>,
    attrs: &LeaseAttrs,
    key: &SubnetKey,
    names: &AnnotationNames,
) -> Option<String> {
    let changed: Vec<(String, String)> =
        wanted_annotations(current, attrs, key, names).into_iter().filter(|(k, v)| current.get(k) != Some(v)).collect();
    if changed.is_empty() {
        return None;
    }
    let body: Vec<String> = changed.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_str(v))).collect();
    Some(format!("{{\"metadata\":{{\"annotations\":{{{}}}}}}}", body.join(",")))
}

/// RFC 3339 in UTC with seconds, as Kubernetes writes `metav1.Time`.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Reads `metav1.Time` (`2026-12-02T04:10:52Z`, or with an offset or fraction) as seconds
/// since the epoch; `None` when it does not read.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            let oh = r.get(1..3)?.parse::<i64>().ok()?;
            let om = r.get(4..6)?.parse::<i64>().ok()?;
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let (yy, mm) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy.rem_euclid(400);
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

/// The status patch flanneld sends once it is up (unless `--set-node-network-unavailable=false`):
/// the `NetworkUnavailable=False` condition, reason `FlannelIsUp`, at `now` (seconds).
pub fn condition_patch(now: i64) -> String {
    let t = rfc3339(now);
    format!(
        "{{\"status\":{{\"conditions\":[{{\"type\":\"NetworkUnavailable\",\"status\":\"False\",\"lastHeartbeatTime\":\"{t}\",\"lastTransitionTime\":\"{t}\",\"reason\":\"FlannelIsUp\",\"message\":\"Flannel is running on this node\"}}]}}}}"
    )
}

fn raw_annotation(view: &NodeView, name: &str) -> Result<Option<Box<RawValue>>, Skip> {
    match view.annotations.get(name).map(|s| s.trim()) {
        None | Some("") | Some("null") => Ok(None),
        Some(s) => RawValue::from_string(s.to_string())
            .map(Some)
            .map_err(|_| Skip(format!("annotation {name} is not JSON: {s:?}"))),
    }
}

/// A peer node as a lease, as flanneld reads it (`nodeToLease`), but strict: `Ok(None)` for
/// a node not run by a kube subnet manager (no `kube-subnet-manager: "true"`), `Err` with
/// the reason for one whose podCIDRs or annotations do not read. The rules of
/// [`crate::validate`] apply afterwards as to every store's leases.
pub fn node_lease(view: &NodeView, names: &AnnotationNames, v4: bool, v6: bool) -> Result<Option<Lease>, Skip> {
    if view.annotations.get(&names.kube_subnet_manager).map(String::as_str) != Some("true") {
        return Ok(None);
    }
    let (n4, n6) = node_subnets(view).map_err(Skip)?;
    let mut attrs = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED);
    attrs.backend_type = view.annotations.get(&names.backend_type).cloned().unwrap_or_default();
    let mut key = SubnetKey { v4: None, v6: None };
    if v4 {
        let Some(n) = n4 else { return Err(Skip("it has no IPv4 podCIDR".into())) };
        let ip = view.annotations.get(&names.public_ip).map(|s| s.trim()).unwrap_or("");
        attrs.public_ip = match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip,
            _ if ip.is_empty() => return Err(Skip(format!("it has no {} annotation", names.public_ip))),
            _ => return Err(Skip(format!("annotation {} {ip:?} is not an IPv4 address", names.public_ip))),
        };
        attrs.backend_data = raw_annotation(view, &names.backend_data)?;
        key.v4 = Some(n);
    }
    if v6 {
        match n6 {
            Some(n) => {
                let ip = view.annotations.get(&names.public_ipv6).map(|s| s.trim()).unwrap_or("");
                attrs.public_ipv6 = match ip.parse::<IpAddr>() {
                    Ok(IpAddr::V6(ip)) => Some(ip),
                    _ if ip.is_empty() => return Err(Skip(format!("it has no {} annotation", names.public_ipv6))),
                    _ => return Err(Skip(format!("annotation {} {ip:?} is not an IPv6 address", names.public_ipv6))),
                };
                attrs.backend_v6_data = raw_annotation(view, &names.backend_v6_data)?;
                key.v6 = Some(n);
            }
            None if !v4 => return Err(Skip("it has no IPv6 podCIDR".into())),
            None => {}
        }
    }
    if key.v4.is_none() && key.v6.is_none() {
        return Err(Skip("it has no podCIDR of the network's families".into()));
    }
    Ok(Some(Lease { key, attrs, expiry: Expiry::Unknown, revision: view.created }))
}

/// The network config text with `SubnetLen` / `IPv6SubnetLen` set to the length of our
/// node's podCIDRs when the config leaves them out: in Kubernetes the subnet size is
/// kube-controller-manager's `--node-cidr-mask-size`, not flannel's default, and every peer
/// lease is checked against it. `None` when nothing is to change (or the result would not be
/// a valid config: then the config's own problem is reported as it is).
pub fn config_with_node_lengths(text: &str, view: &NodeView) -> Option<String> {
    let serde_json::Value::Object(mut obj) = serde_json::from_str(text).ok()? else { return None };
    let (v4, v6) = node_subnets(view).ok()?;
    let mut changed = false;
    if let Some(n) = v4
        && crate::config::field(&obj, "SubnetLen").is_none()
    {
        obj.insert("SubnetLen".into(), n.prefix_len().into());
        changed = true;
    }
    if let Some(n) = v6
        && crate::config::field(&obj, "IPv6SubnetLen").is_none()
    {
        obj.insert("IPv6SubnetLen".into(), n.prefix_len().into());
        changed = true;
    }
    let out = serde_json::Value::Object(obj).to_string();
    (changed && NetworkConfig::parse(&out).is_ok()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> AnnotationNames {
        AnnotationNames::new(DEFAULT_PREFIX).unwrap()
    }

    fn view(name: &str, cidr: &str, ann: &[(&str, &str)]) -> NodeView {
        NodeView {
            name: name.into(),
            pod_cidr: Some(cidr.into()),
            pod_cidrs: vec![cidr.into()],
            annotations: ann.iter().map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string())).collect(),
            created: 100,
        }
    }

    fn vxlan_attrs() -> LeaseAttrs {
        let mut a = LeaseAttrs::new(Ipv4Addr::new(192, 168, 1, 10));
        a.backend_type = "vxlan".into();
        a.backend_data = Some(RawValue::from_string(r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#.into()).unwrap());
        a
    }

    #[test]
    fn prefix_vectors_from_flannel() {
        let ok = |p: &str, want: &str| assert_eq!(AnnotationNames::new(p).unwrap().backend_type, want, "{p}");
        ok("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type");
        ok("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/backend-type");
        ok("flannel.alpha.coreos.com/prefix", "flannel.alpha.coreos.com/prefix-backend-type");
        ok("flannel.alpha.coreos.com/prefix-", "flannel.alpha.coreos.com/prefix-backend-type");
        ok("org.com/9", "org.com/9-backend-type");
        for bad in ["org", "org/", "org/prefix", "org.COM", "org.com/PREFIX", "a.b/c/d", "", ".com/x", "a..b/"] {
            let e = AnnotationNames::new(bad).unwrap_err();
            assert!(e.to_string().contains("--kube-annotation-prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn vxlan_annotations_are_flannels() {
        let key = SubnetKey::v4("10.244.1.0/24".parse().unwrap());
        let patch = annotation_patch(&BTreeMap::new(), &vxlan_attrs(), &key, &names()).unwrap();
        assert_eq!(
            patch,
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"{\"VNI\":1,\"VtepMAC\":\"12:c6:65:89:b4:e3\"}","flannel.alpha.coreos.com/backend-type":"vxlan","flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"192.168.1.10"}}}"#
        );
        // Written once, nothing differs any more: no patch.
        let written = wanted_annotations(&BTreeMap::new(), &vxlan_attrs(), &key, &names());
        assert_eq!(annotation_patch(&written, &vxlan_attrs(), &key, &names()), None);
        // One value changed by someone: only that one is patched back.
        let mut edited = written.clone();
        edited.insert("flannel.alpha.coreos.com/public-ip".into(), "6.6.6.6".into());
        assert_eq!(
            annotation_patch(&edited, &vxlan_attrs(), &key, &names()).unwrap(),
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"192.168.1.10"}}}"#
        );
    }

    #[test]
    fn host_gw_and_udp_write_null_backend_data() {
        let key = SubnetKey::v4("10.244.1.0/24".parse().unwrap());
        let mut a = LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 5));
        a.backend_type = "host-gw".into();
        let w = wanted_annotations(&BTreeMap::new(), &a, &key, &names());
        assert_eq!(w["flannel.alpha.coreos.com/backend-data"], "null");
        assert_eq!(w["flannel.alpha.coreos.com/backend-type"], "host-gw");
        let udp = wanted_annotations(&BTreeMap::new(), &LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 5)), &key, &names());
        assert_eq!(udp["flannel.alpha.coreos.com/backend-type"], "");
        assert_eq!(udp["flannel.alpha.coreos.com/backend-data"], "null");
        assert!(!udp.contains_key("flannel.alpha.coreos.com/public-ipv6"));
    }

    #[test]
    fn public_ip_overwrite_is_written_as_public_ip() {
        let key = SubnetKey::v4("10.244.1.0/24".parse().unwrap());
        let cur: BTreeMap<String, String> =
            [("flannel.alpha.coreos.com/public-ip-overwrite".to_string(), "172.18.0.2".to_string())].into();
        let w = wanted_annotations(&cur, &vxlan_attrs(), &key, &names());
        assert_eq!(w["flannel.alpha.coreos.com/public-ip"], "172.18.0.2");
    }

    #[test]
    fn peers_read_back_what_we_write() {
        let key = SubnetKey::v4("10.244.1.0/24".parse().unwrap());
        let w = wanted_annotations(&BTreeMap::new(), &vxlan_attrs(), &key, &names());
        let v = NodeView {
            name: "n1".into(),
            pod_cidr: Some("10.244.1.0/24".into()),
            annotations: w,
            ..Default::default()
        };
        let l = node_lease(&v, &names(), true, false).unwrap().unwrap();
        assert_eq!(l.key, key);
        assert_eq!(l.attrs, vxlan_attrs());
        // host-gw's "null" reads back as no data.
        let v = view(
            "n2",
            "10.244.2.0/24",
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "host-gw"),
                ("backend-data", "null"),
                ("public-ip", "10.0.0.5"),
            ],
        );
        let l = node_lease(&v, &names(), true, false).unwrap().unwrap();
        assert!(l.attrs.backend_data.is_none());
        assert_eq!(l.revision, 100);
    }

    #[test]
    fn hostile_nodes_are_skipped_with_a_reason() {
        let base = [("kube-subnet-manager", "true"), ("backend-type", "vxlan")];
        let skip = |v: NodeView| node_lease(&v, &names(), true, false).unwrap_err().0;
        let with = |extra: &[(&str, &str)], cidr: &str| {
            let mut a: Vec<(&str, &str)> = base.to_vec();
            a.extend_from_slice(extra);
            view("bad", cidr, &a)
        };
        assert!(skip(with(&[], "10.244.3.0/24")).contains("no flannel.alpha.coreos.com/public-ip"));
        assert!(skip(with(&[("public-ip", "not-an-ip")], "10.244.3.0/24")).contains("not an IPv4"));
        assert!(skip(with(&[("public-ip", "fd00::1")], "10.244.3.0/24")).contains("not an IPv4"));
        assert!(
            skip(with(&[("public-ip", "10.0.0.1"), ("backend-data", "{\"VNI\":")], "10.244.3.0/24"))
                .contains("not JSON")
        );
        assert!(skip(with(&[("public-ip", "10.0.0.1")], "garbage")).contains("not a CIDR"));
        assert!(skip(with(&[("public-ip", "10.0.0.1")], "fd00::/64")).contains("no IPv4 podCIDR"));
        let mut three = with(&[("public-ip", "10.0.0.1")], "10.244.3.0/24");
        three.pod_cidrs = vec!["10.244.3.0/24".into(), "fd00::/64".into(), "10.244.4.0/24".into()];
        assert!(skip(three).contains("at most one"));
        let mut twice = with(&[("public-ip", "10.0.0.1")], "10.244.3.0/24");
        twice.pod_cidrs = vec!["10.244.3.0/24".into(), "10.244.4.0/24".into()];
        assert!(skip(twice).contains("one family twice"));
        // Not run by a kube subnet manager: not a peer, and not an error.
        assert_eq!(node_lease(&view("other", "10.244.5.0/24", &[]), &names(), true, false), Ok(None));
        assert_eq!(
            node_lease(&view("other", "10.244.5.0/24", &[("kube-subnet-manager", "false")]), &names(), true, false),
            Ok(None)
        );
        // Reads, but outside the network: validation's job, which rejects it.
        let outside =
            node_lease(&with(&[("public-ip", "10.0.0.1")], "10.99.0.0/24"), &names(), true, false).unwrap().unwrap();
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let rules = crate::validate::Rules::from_config(&cfg);
        assert!(matches!(crate::validate::check(&outside, &rules), Err(crate::validate::Reject::OutsideNetwork(_))));
    }

    #[test]
    fn own_key_waits_for_a_pod_cidr_and_checks_it() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let mut v = view("me", "", &[]);
        v.pod_cidrs.clear();
        let e = own_key(&v, &cfg).unwrap_err();
        assert!(matches!(e, OwnLeaseError::NotAssigned { .. }));
        let msg = e.to_string();
        assert!(msg.contains("--allocate-node-cidrs") && msg.contains("--cluster-cidr=10.244.0.0/16"), "{msg}");
        assert!(msg.contains("--pod-network-cidr=10.244.0.0/16"), "{msg}");
        assert_eq!(own_key(&view("me", "10.244.7.0/24", &[]), &cfg).unwrap().to_string(), "10.244.7.0-24");
        // Host bits masked as Go's ParseCIDR does.
        assert_eq!(own_key(&view("me", "10.244.7.9/24", &[]), &cfg).unwrap().to_string(), "10.244.7.0-24");
        let e = own_key(&view("me", "10.99.0.0/24", &[]), &cfg).unwrap_err().to_string();
        assert!(e.contains("not inside Network 10.244.0.0/16"), "{e}");
        let e = own_key(&view("me", "fd00::/64", &[]), &cfg).unwrap_err().to_string();
        assert!(e.contains("no IPv4 podCIDR"), "{e}");
        let e = own_key(&view("me", "nonsense", &[]), &cfg).unwrap_err().to_string();
        assert!(e.contains("not a CIDR"), "{e}");
    }

    #[test]
    fn the_subnet_length_is_the_node_cidr_mask_size() {
        let text = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
        let out = config_with_node_lengths(text, &view("me", "10.244.7.128/25", &[])).unwrap();
        assert_eq!(NetworkConfig::parse(&out).unwrap().v4.unwrap().subnet_len, 25);
        // Set by the operator: kept.
        let set = r#"{"Network":"10.244.0.0/16","SubnetLen":24}"#;
        assert_eq!(config_with_node_lengths(set, &view("me", "10.244.7.128/25", &[])), None);
        // No podCIDR yet, garbage, or a length the config cannot take: unchanged.
        let mut none = view("me", "", &[]);
        none.pod_cidrs.clear();
        assert_eq!(config_with_node_lengths(text, &none), None);
        assert_eq!(config_with_node_lengths("not json", &view("me", "10.244.7.0/24", &[])), None);
        assert_eq!(config_with_node_lengths(text, &view("me", "10.0.0.0/8", &[])), None);
    }

    #[test]
    fn node_public_ip_annotations_override() {
        let v = view("me", "10.244.7.0/24", &[("node-public-ip", "192.0.2.50"), ("node-public-ipv6", "bogus")]);
        let (v4, v6) = public_ip_overrides(&v, &names());
        assert_eq!(v4, Ok(Some(Ipv4Addr::new(192, 0, 2, 50))));
        assert!(v6.unwrap_err().contains("not an IPv6"));
    }

    #[test]
    fn condition_patch_is_flannels() {
        assert_eq!(
            condition_patch(1_796_184_652),
            r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","lastHeartbeatTime":"2026-12-02T04:10:52Z","lastTransitionTime":"2026-12-02T04:10:52Z","reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}"#
        );
    }

    #[test]
    fn times_round_trip() {
        for t in [0i64, 951_782_400, 1_796_184_652, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2026-12-02T05:10:52+01:00"), Some(1_796_184_652));
        assert_eq!(parse_rfc3339("2026-12-02T04:10:52.123456Z"), Some(1_796_184_652));
        for bad in ["", "yesterday", "2026-13-02T04:10:52Z", "2026-12-02T04:10:52", "2026-12-02T04:10:52+0100"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
