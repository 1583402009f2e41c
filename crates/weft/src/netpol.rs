//! NetworkPolicy at the edges: converting Kubernetes objects (k8s-openapi) into the pure
//! model of `weft_core::netpol`, and applying a compiled ruleset to the kernel as one
//! atomic `nft -f` transaction, only when it changed (or drifted).
//!
//! The daemon's policy task (`daemon/netpol.rs`) feeds its reflectors' objects to
//! [`cluster_from`] and calls [`PolicyTable::update`] on every change and
//! [`PolicyTable::resync`] on drift; [`PolicyTable::remove`] runs when the feature is off
//! (at startup) and in `weft cleanup`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_core::netpol::compile::Ruleset;
use weft_core::netpol::kernel::KernelTable;
use weft_core::netpol::model::{
    Cluster, ContainerPort, IpBlock, Namespace, NetpolError, Operator, Peer, Pod, Policy, PolicyPort, PortRef,
    Protocol, Requirement, Rule, Selector,
};
use weft_core::netpol::render::{TABLE, TABLE_FAMILY, remove_script, render};

use crate::firewall::FirewallError;

/// A NetworkPolicy object weft cannot use, and where in it the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NetworkPolicy {namespace}/{name}: {at}: {source}")]
pub struct PolicyError {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
    /// Where, e.g. `spec.ingress[0].from[1]`.
    pub at: String,
    /// What is wrong.
    pub source: NetpolError,
}

/// Converts a label selector (absent = match everything, as the API's zero value).
pub fn selector(sel: &LabelSelector) -> Result<Selector, NetpolError> {
    let mut s = Selector { match_labels: sel.match_labels.clone().unwrap_or_default(), match_expressions: Vec::new() };
    for r in sel.match_expressions.iter().flatten() {
        let op = Operator::parse(&r.operator)?;
        s.match_expressions.push(Requirement::new(&r.key, op, r.values.clone().unwrap_or_default())?);
    }
    Ok(s)
}

fn peer(p: &net::NetworkPolicyPeer) -> Result<Peer, NetpolError> {
    let pods = p.pod_selector.as_ref().map(selector).transpose()?;
    let namespaces = p.namespace_selector.as_ref().map(selector).transpose()?;
    let block =
        p.ip_block.as_ref().map(|b| IpBlock::parse(&b.cidr, b.except.as_deref().unwrap_or_default())).transpose()?;
    Peer::new(pods, namespaces, block)
}

fn port(p: &net::NetworkPolicyPort) -> Result<PolicyPort, NetpolError> {
    let num = p.port.as_ref().map(|v| match v {
        IntOrString::Int(n) => PortRef::Number(i64::from(*n)),
        IntOrString::String(s) => PortRef::Name(s.clone()),
    });
    PolicyPort::new(p.protocol.as_deref(), num, p.end_port.map(i64::from))
}

fn rule(
    peers: Option<&[net::NetworkPolicyPeer]>,
    ports: Option<&[net::NetworkPolicyPort]>,
    at: &str,
    peer_key: &str,
) -> Result<Rule, (String, NetpolError)> {
    let peers = peers
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| peer(p).map_err(|e| (format!("{at}.{peer_key}[{i}]"), e)))
        .collect::<Result<_, _>>()?;
    let ports = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| port(p).map_err(|e| (format!("{at}.ports[{i}]"), e)))
        .collect::<Result<_, _>>()?;
    Ok(Rule { peers, ports })
}

/// Converts a NetworkPolicy, applying the API server's defaulting (policyTypes, protocol).
pub fn policy(np: &net::NetworkPolicy) -> Result<Policy, Box<PolicyError>> {
    let namespace = np.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = np.metadata.name.clone().unwrap_or_default();
    let err =
        |at: String, source| Box::new(PolicyError { namespace: namespace.clone(), name: name.clone(), at, source });
    let spec = np.spec.clone().unwrap_or_default();
    let sel = spec.pod_selector.as_ref().map(selector).transpose().map_err(|e| err("spec.podSelector".into(), e))?;
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        ingress.push(rule(r.from.as_deref(), r.ports.as_deref(), &at, "from").map_err(|(at, e)| err(at, e))?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let at = format!("spec.egress[{i}]");
        egress.push(rule(r.to.as_deref(), r.ports.as_deref(), &at, "to").map_err(|(at, e)| err(at, e))?);
    }
    let types = spec.policy_types.unwrap_or_default();
    Policy::new(&namespace, &name, sel.unwrap_or_default(), &types, ingress, egress)
        .map_err(|e| err("spec.policyTypes".into(), e))
}

/// What to enforce for a policy that cannot be converted: it still isolates the pods it
/// selects (for the directions it names, Ingress when unreadable) and allows nothing —
/// failing closed, since ignoring it would open what its author meant to restrict.
/// `None` when not even its podSelector can be read (then nothing is known to select).
pub fn fail_closed(np: &net::NetworkPolicy) -> Option<Policy> {
    let spec = np.spec.clone().unwrap_or_default();
    let sel = match &spec.pod_selector {
        Some(s) => selector(s).ok()?,
        None => Selector::default(),
    };
    let types = spec.policy_types.unwrap_or_default();
    let types: Vec<String> = if types.iter().all(|t| t == "Ingress" || t == "Egress") && !types.is_empty() {
        types
    } else {
        let mut t = vec!["Ingress".to_string()];
        if spec.egress.is_some_and(|e| !e.is_empty()) {
            t.push("Egress".into());
        }
        t
    };
    let namespace = np.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = np.metadata.name.clone().unwrap_or_default();
    Policy::new(&namespace, &name, sel, &types, vec![], vec![]).ok()
}

fn container_ports(c: &core::Container, out: &mut Vec<ContainerPort>) {
    for p in c.ports.iter().flatten() {
        // The API validates these; a malformed one is skipped, it can only name nothing.
        let (Ok(protocol), Ok(port)) = (Protocol::parse(p.protocol.as_deref()), u16::try_from(p.container_port)) else {
            continue;
        };
        if port != 0 {
            out.push(ContainerPort { name: p.name.clone(), port, protocol });
        }
    }
}

/// Converts a Pod; `None` for pods that take no part in policy: finished (Succeeded or
/// Failed: their IPs are reused by new pods), hostNetwork (their traffic is the node's), not
/// yet scheduled, or without an address. Named ports come from the containers and from
/// restartable init containers (sidecars, which serve for the pod's lifetime).
pub fn pod(p: &core::Pod) -> Option<Pod> {
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) || spec.host_network == Some(true) {
        return None;
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let mut ips: Vec<IpAddr> = status.pod_ips.iter().flatten().filter_map(|i| i.ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.as_deref().and_then(|i| i.parse::<IpAddr>().ok()));
    }
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return None;
    }
    let mut ports = Vec::new();
    spec.containers.iter().for_each(|c| container_ports(c, &mut ports));
    for c in spec.init_containers.iter().flatten().filter(|c| c.restart_policy.as_deref() == Some("Always")) {
        container_ports(c, &mut ports);
    }
    Some(Pod {
        namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: p.metadata.name.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ips,
        node,
        ports,
    })
}

/// Converts a Namespace; its name label is added when the object lacks it (the API server
/// always sets `kubernetes.io/metadata.name`).
pub fn namespace(ns: &core::Namespace) -> Namespace {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.entry("kubernetes.io/metadata.name".into()).or_insert_with(|| name.clone());
    Namespace { name, labels }
}

/// The whole model from API objects. Policies that cannot be converted are enforced fail
/// closed (see [`fail_closed`]) and returned as errors for the caller to log.
pub fn cluster_from<'a>(
    namespaces: impl IntoIterator<Item = &'a core::Namespace>,
    pods: impl IntoIterator<Item = &'a core::Pod>,
    policies: impl IntoIterator<Item = &'a net::NetworkPolicy>,
    node_addrs: BTreeMap<String, Vec<IpAddr>>,
) -> (Cluster, Vec<PolicyError>) {
    let mut c = Cluster { node_addrs, ..Default::default() };
    c.namespaces = namespaces.into_iter().map(namespace).map(|n| (n.name.clone(), n)).collect();
    c.pods = pods.into_iter().filter_map(pod).collect();
    let mut errors = Vec::new();
    for np in policies {
        match policy(np) {
            Ok(p) => c.policies.push(p),
            Err(e) => {
                errors.push(*e);
                c.policies.extend(fail_closed(np));
            }
        }
    }
    (c, errors)
}

/// How long one policy transaction may take (a 100k-element table loads in about a second
/// on a small machine; a wedged nft must not hang the caller).
pub const NFT_TIMEOUT: Duration = Duration::from_secs(60);

async fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    use crate::process::ProcessError;
    crate::process::run("nft", args, stdin, NFT_TIMEOUT).await.map_err(|e| match e {
        ProcessError::Spawn { program, source } => FirewallError::Spawn { program, source },
        ProcessError::Failed { command, stderr } => FirewallError::Failed { command, stderr },
        ProcessError::TimedOut { command, after } => FirewallError::TimedOut { command, after },
    })
}

/// Whether the policy table exists in the kernel (`false` too when `nft` cannot run).
pub async fn table_present() -> bool {
    table_state().await == Some(true)
}

/// Whether the policy table exists in the kernel; `None` when `nft` cannot tell (not
/// installed, not root, timed out).
pub async fn table_state() -> Option<bool> {
    match nft(&["list", "table", TABLE_FAMILY, TABLE], None).await {
        Ok(_) => Some(true),
        // ENOENT: nft's answer for a table that does not exist.
        Err(FirewallError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => Some(false),
        Err(_) => None,
    }
}

/// The table's outline: `nft -t list table` (chains, rules and set declarations, no
/// elements), cheap even for a table of 100 000 elements. `None` when there is no table.
pub async fn table_outline() -> Option<String> {
    nft(&["-t", "list", "table", TABLE_FAMILY, TABLE], None).await.ok()
}

/// Reads the policy table back from the kernel; `None` when it is absent or unreadable.
pub async fn read_kernel() -> Option<KernelTable> {
    let json = nft(&["-j", "list", "table", TABLE_FAMILY, TABLE], None).await.ok()?;
    KernelTable::parse(&json).ok()
}

/// weft's policy table (`inet weft-netpol`) in the kernel of the current network namespace.
#[derive(Debug, Default)]
pub struct PolicyTable {
    applied: Option<Ruleset>,
    transactions: u64,
}

impl PolicyTable {
    /// A table manager that has applied nothing yet (the first [`update`](Self::update)
    /// checks the kernel, so a restart with the right table in place writes nothing).
    pub fn new() -> PolicyTable {
        PolicyTable::default()
    }

    /// Number of `nft` transactions run so far.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Makes the kernel hold `rs`. A ruleset equal to the last one applied costs nothing
    /// (a change elsewhere in the cluster that does not affect this node's pods); a
    /// different one is written in one atomic transaction. Before the first write (a
    /// restarted daemon) the kernel's table is read, and left alone if it already holds
    /// `rs`. `Ok(true)` when a transaction ran.
    pub async fn update(&mut self, rs: &Ruleset) -> Result<bool, FirewallError> {
        match &self.applied {
            Some(prev) if prev == rs => Ok(false),
            Some(_) => self.write(rs).await,
            None => self.write_if_different(rs).await,
        }
    }

    /// Re-checks the kernel against the last ruleset applied and repairs drift (a set,
    /// element, chain or the whole table removed by someone else). `Ok(true)` when repaired.
    pub async fn resync(&mut self) -> Result<bool, FirewallError> {
        match self.applied.clone() {
            Some(rs) => self.write_if_different(&rs).await,
            None => Ok(false),
        }
    }

    async fn write_if_different(&mut self, rs: &Ruleset) -> Result<bool, FirewallError> {
        if read_kernel().await.is_some_and(|k| k.matches(rs)) {
            self.applied = Some(rs.clone());
            return Ok(false);
        }
        self.write(rs).await
    }

    async fn write(&mut self, rs: &Ruleset) -> Result<bool, FirewallError> {
        // Forget what was applied first: a failed transaction leaves the old table intact,
        // and the next update must read the kernel and retry.
        self.applied = None;
        nft(&["-f", "-"], Some(&render(rs))).await?;
        self.transactions += 1;
        self.applied = Some(rs.clone());
        tracing::info!(
            table = TABLE,
            ingress_pods = rs.ingress.dispatch.len(),
            egress_pods = rs.egress.dispatch.len(),
            "applied NetworkPolicy rules"
        );
        Ok(true)
    }

    /// Removes the table (the feature is off): every policy rule goes. Idempotent.
    pub async fn remove(&mut self) -> Result<(), FirewallError> {
        self.applied = None;
        nft(&["-f", "-"], Some(&remove_script())).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::netpol::eval::{Conn, Proto, allowed};
    use weft_core::netpol::model::PortMatch;

    fn np(json: serde_json::Value) -> net::NetworkPolicy {
        serde_json::from_value(json).expect("a NetworkPolicy")
    }

    #[test]
    fn upstream_policy_objects_convert_with_the_api_defaults() {
        // The e2e suite's "allow ingress from namespace on one named port", as kubectl sends it.
        let p = policy(&np(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-ns-y-named", "namespace": "x"},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y"]}]}}],
                    "ports": [{"port": "serve-80-tcp"}, {"protocol": "UDP", "port": 53, "endPort": 60}]
                }]
            }
        })))
        .unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("x", "allow-ns-y-named"));
        assert!(p.egress.is_none(), "no policyTypes and no egress rules: Ingress only");
        let rules = p.ingress.unwrap();
        assert_eq!(
            rules[0].ports[0],
            PolicyPort { protocol: Protocol::Tcp, port: PortMatch::Named("serve-80-tcp".into()) }
        );
        assert_eq!(rules[0].ports[1], PolicyPort { protocol: Protocol::Udp, port: PortMatch::Range(53, 60) });
        match &rules[0].peers[0] {
            Peer::Pods { pods: None, namespaces: Some(s) } => assert_eq!(s.match_expressions.len(), 1),
            other => panic!("{other:?}"),
        }
        // Egress rules present and no policyTypes: both directions.
        let p = policy(&np(serde_json::json!({
            "metadata": {"name": "e", "namespace": "x"},
            "spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]}
        })))
        .unwrap();
        assert!(p.ingress == Some(vec![]) && p.egress.as_ref().is_some_and(|e| e.len() == 1));
        // Explicit Egress only: ingress rules ignored, no ingress isolation.
        let p = policy(&np(serde_json::json!({
            "metadata": {"name": "e", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}
        })))
        .unwrap();
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
    }

    #[test]
    fn hostile_policy_objects_say_where_and_what() {
        let cases = [
            (
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}}),
                "spec.podSelector",
                "Gt",
            ),
            (
                serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/40"}}]}]}),
                "spec.ingress[0].from[1]",
                "10.0.0.0/40",
            ),
            (
                serde_json::json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
                "spec.ingress[0].from[0]",
                "not strictly inside",
            ),
            (
                serde_json::json!({"podSelector": {}, "egress": [{"ports": [{"port": 70000}]}]}),
                "spec.egress[0].ports[0]",
                "70000",
            ),
            (
                serde_json::json!({"podSelector": {}, "egress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "spec.egress[0].ports[0]",
                "below port 90",
            ),
            (
                serde_json::json!({"podSelector": {}, "egress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]}),
                "spec.egress[0].ports[0]",
                "ICMP",
            ),
            (serde_json::json!({"podSelector": {}, "egress": [{"to": [{}]}]}), "spec.egress[0].to[0]", "must specify"),
            (
                serde_json::json!({"podSelector": {}, "egress": [{"to": [{"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
                "spec.egress[0].to[0]",
                "both ipBlock",
            ),
            (serde_json::json!({"podSelector": {}, "policyTypes": ["Both"]}), "spec.policyTypes", "Both"),
            (
                serde_json::json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}),
                "spec.podSelector",
                "takes no values",
            ),
        ];
        for (spec, at, what) in cases {
            let obj = np(serde_json::json!({"metadata": {"name": "bad", "namespace": "x"}, "spec": spec}));
            let e = policy(&obj).unwrap_err();
            assert_eq!(e.at, at, "{e}");
            let text = e.to_string();
            assert!(text.starts_with("NetworkPolicy x/bad: ") && text.contains(what), "{text}");
        }
    }

    #[test]
    fn a_broken_policy_fails_closed() {
        let bad = np(serde_json::json!({
            "metadata": {"name": "bad", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"ipBlock": {"cidr": "nonsense"}}]}]}
        }));
        let pod_json = serde_json::json!({
            "metadata": {"name": "db-0", "namespace": "x", "labels": {"app": "db"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.1.2"}]}
        });
        let pods: Vec<core::Pod> = vec![serde_json::from_value(pod_json).unwrap()];
        let (c, errors) = cluster_from([], &pods, [&bad], BTreeMap::new());
        assert_eq!(errors.len(), 1);
        assert_eq!(c.policies.len(), 1);
        let k = Conn {
            src: "10.0.2.2".parse().unwrap(),
            dst: "10.0.1.2".parse().unwrap(),
            proto: Proto::L4(Protocol::Tcp),
            port: 80,
        };
        assert!(!allowed(&c, &k), "isolated, nothing allowed");
        let k = Conn { src: "10.0.1.2".parse().unwrap(), dst: "10.0.2.2".parse().unwrap(), ..k };
        assert!(!allowed(&c, &k), "egress too, as its policyTypes say");
        // Unreadable podSelector: nothing is known to be selected.
        let worse = np(serde_json::json!({"metadata": {"name": "w", "namespace": "x"},
            "spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Nope"}]}}}));
        assert!(fail_closed(&worse).is_none());
    }

    #[test]
    fn pods_that_take_no_part_in_policy_are_left_out() {
        let mk = |phase: &str, host_network: bool, ips: serde_json::Value, node: Option<&str>| -> core::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "x", "labels": {"pod": "a"}},
                "spec": {"nodeName": node, "hostNetwork": host_network,
                         "containers": [{"name": "c", "ports": [
                             {"name": "serve-80-tcp", "containerPort": 80},
                             {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
                             {"containerPort": 70000}, {"name": "weird", "containerPort": 81, "protocol": "QUIC"}]}],
                         "initContainers": [
                             {"name": "sidecar", "restartPolicy": "Always", "ports": [{"name": "metrics", "containerPort": 9090}]},
                             {"name": "init", "ports": [{"name": "setup", "containerPort": 7070}]}]},
                "status": {"phase": phase, "podIPs": ips}
            }))
            .unwrap()
        };
        let ips = serde_json::json!([{"ip": "10.0.1.2"}, {"ip": "fd00:1::2"}]);
        let p = pod(&mk("Running", false, ips.clone(), Some("n1"))).expect("a running pod");
        assert_eq!(p.ips, vec!["10.0.1.2".parse::<IpAddr>().unwrap(), "fd00:1::2".parse().unwrap()]);
        assert_eq!(p.named_port("serve-80-tcp", Protocol::Tcp), Some(80));
        assert_eq!(p.named_port("serve-80-udp", Protocol::Udp), Some(80));
        assert_eq!(p.named_port("serve-80-udp", Protocol::Tcp), None);
        assert_eq!(p.named_port("metrics", Protocol::Tcp), Some(9090), "sidecar ports count");
        assert_eq!(p.named_port("setup", Protocol::Tcp), None, "plain init containers are gone when the pod serves");
        assert_eq!(p.ports.len(), 3, "the out-of-range and QUIC ports are skipped: {:?}", p.ports);
        assert!(pod(&mk("Succeeded", false, ips.clone(), Some("n1"))).is_none(), "finished pods free their IPs");
        assert!(pod(&mk("Failed", false, ips.clone(), Some("n1"))).is_none());
        assert!(pod(&mk("Running", true, ips.clone(), Some("n1"))).is_none(), "hostNetwork");
        assert!(pod(&mk("Pending", false, serde_json::json!([]), Some("n1"))).is_none(), "no IP yet");
        assert!(pod(&mk("Running", false, serde_json::json!([{"ip": "garbage"}]), Some("n1"))).is_none());
        assert!(pod(&mk("Running", false, ips, None)).is_none(), "not scheduled");
        let ns: core::Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "y", "labels": {"team": "blue"}}})).unwrap();
        let n = namespace(&ns);
        assert_eq!(n.labels.get("kubernetes.io/metadata.name").map(String::as_str), Some("y"));
        assert_eq!(n.labels.get("team").map(String::as_str), Some("blue"));
    }
}
