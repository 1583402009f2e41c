//! The NetworkPolicy model: validated policies, pods and namespaces, independent of any
//! Kubernetes client library. Constructors check what the API server validates, so a
//! hostile or malformed object is a clear [`NetpolError`], never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// Why a policy (or one of its parts) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetpolError {
    /// A `matchExpressions` operator other than In, NotIn, Exists, DoesNotExist.
    #[error("label selector operator {0:?} is not one of In, NotIn, Exists, DoesNotExist")]
    Operator(String),
    /// In/NotIn without values, or Exists/DoesNotExist with values.
    #[error("label selector requirement on {key:?} with operator {op}: {why}")]
    Values {
        /// The label key.
        key: String,
        /// The operator.
        op: Operator,
        /// What is wrong.
        why: &'static str,
    },
    /// A protocol other than TCP, UDP, SCTP.
    #[error("protocol {0:?} is not one of TCP, UDP, SCTP")]
    Protocol(String),
    /// A port number outside 1..=65535.
    #[error("port {0} is outside 1-65535")]
    PortRange(i64),
    /// `endPort` below `port`, or with a named or absent port.
    #[error("endPort {end}: {why}")]
    EndPort {
        /// The endPort given.
        end: i64,
        /// What is wrong.
        why: String,
    },
    /// A named port that is not a valid IANA service name.
    #[error("named port {0:?} is not a valid port name (1-15 lowercase letters, digits and '-', with a letter)")]
    PortName(String),
    /// A CIDR that does not parse.
    #[error("ipBlock {0:?} is not a CIDR such as 10.0.0.0/8 or fd00::/64")]
    Cidr(String),
    /// An `except` that is not strictly inside its `cidr`.
    #[error("ipBlock except {except} is not strictly inside cidr {cidr}")]
    Except {
        /// The block.
        cidr: String,
        /// The offending exception.
        except: String,
    },
    /// A peer with nothing in it, or with ipBlock plus a selector.
    #[error("network policy peer: {0}")]
    Peer(&'static str),
    /// A `policyTypes` entry other than Ingress / Egress.
    #[error("policyTypes entry {0:?} is not Ingress or Egress")]
    PolicyType(String),
}

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// The label is present with one of the values.
    In,
    /// The label is absent, or present with none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        })
    }
}

impl Operator {
    /// Parses the API's spelling (case-sensitive, as the API server is).
    pub fn parse(s: &str) -> Result<Operator, NetpolError> {
        match s {
            "In" => Ok(Operator::In),
            "NotIn" => Ok(Operator::NotIn),
            "Exists" => Ok(Operator::Exists),
            "DoesNotExist" => Ok(Operator::DoesNotExist),
            _ => Err(NetpolError::Operator(s.to_string())),
        }
    }
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    key: String,
    op: Operator,
    values: Vec<String>,
}

impl Requirement {
    /// Validates a requirement as the API server does.
    pub fn new(key: &str, op: Operator, values: Vec<String>) -> Result<Requirement, NetpolError> {
        let bad = |why| Err(NetpolError::Values { key: key.to_string(), op, why });
        match op {
            Operator::In | Operator::NotIn if values.is_empty() => bad("needs at least one value"),
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => bad("takes no values"),
            _ => Ok(Requirement { key: key.to_string(), op, values }),
        }
    }

    fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            Operator::In => v.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

/// A label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// `matchLabels`.
    pub match_labels: Labels,
    /// `matchExpressions` (ANDed with `matchLabels`).
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// A selector of `matchLabels` only.
    pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Selector {
        Selector {
            match_labels: pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            match_expressions: Vec::new(),
        }
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// A layer-4 protocol NetworkPolicy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (the API's default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// All three, in order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Parses the API's spelling; absent means TCP (the API server's default).
    pub fn parse(s: Option<&str>) -> Result<Protocol, NetpolError> {
        match s {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(NetpolError::Protocol(other.to_string())),
        }
    }

    /// The name nft uses (`meta l4proto`).
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// Which ports of a protocol a policy port entry allows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// No `port`: every port of the protocol.
    Any,
    /// `port` (and `endPort`): an inclusive range.
    Range(u16, u16),
    /// A named port, resolved on the destination pod.
    Named(String),
}

/// A port given by number or by name, as `IntOrString` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// A number (not yet range-checked).
    Number(i64),
    /// A name.
    Name(String),
}

/// One `ports` entry of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyPort {
    /// The protocol.
    pub protocol: Protocol,
    /// The ports.
    pub port: PortMatch,
}

fn port_number(n: i64) -> Result<u16, NetpolError> {
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or(NetpolError::PortRange(n))
}

/// Whether `name` is an IANA service name (what the API accepts for a named port).
pub fn valid_port_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

impl PolicyPort {
    /// Validates a port entry as the API server does (protocol defaults to TCP).
    pub fn new(
        protocol: Option<&str>,
        port: Option<PortRef>,
        end_port: Option<i64>,
    ) -> Result<PolicyPort, NetpolError> {
        let protocol = Protocol::parse(protocol)?;
        let port = match (port, end_port) {
            (None, None) => PortMatch::Any,
            (None, Some(end)) => return Err(NetpolError::EndPort { end, why: "given without a port".into() }),
            (Some(PortRef::Name(n)), None) if valid_port_name(&n) => PortMatch::Named(n),
            (Some(PortRef::Name(n)), None) => return Err(NetpolError::PortName(n)),
            (Some(PortRef::Name(n)), Some(end)) => {
                return Err(NetpolError::EndPort {
                    end,
                    why: format!("needs a numeric port, not the named port {n:?}"),
                });
            }
            (Some(PortRef::Number(p)), None) => {
                let p = port_number(p)?;
                PortMatch::Range(p, p)
            }
            (Some(PortRef::Number(p)), Some(end)) => {
                let p = port_number(p)?;
                let e = port_number(end)?;
                if e < p {
                    return Err(NetpolError::EndPort { end, why: format!("is below port {p}") });
                }
                PortMatch::Range(p, e)
            }
        };
        Ok(PolicyPort { protocol, port })
    }
}

/// An `ipBlock`: a CIDR minus exceptions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpBlock {
    /// The block (host bits cleared).
    pub cidr: IpNet,
    /// Holes in it.
    pub except: Vec<IpNet>,
}

fn parse_cidr(s: &str) -> Result<IpNet, NetpolError> {
    // Legacy CIDRs with host bits set are accepted by the API; the kernel would mask them too.
    s.trim().parse::<IpNet>().map(|n| n.trunc()).map_err(|_| NetpolError::Cidr(s.to_string()))
}

impl IpBlock {
    /// Validates an ipBlock: every `except` must lie strictly inside `cidr`, same family.
    pub fn parse(cidr: &str, except: &[String]) -> Result<IpBlock, NetpolError> {
        let block = parse_cidr(cidr)?;
        let mut holes = Vec::new();
        for e in except {
            let hole = parse_cidr(e)?;
            if !block.contains(&hole) || hole.prefix_len() <= block.prefix_len() {
                return Err(NetpolError::Except { cidr: cidr.to_string(), except: e.clone() });
            }
            holes.push(hole);
        }
        Ok(IpBlock { cidr: block, except: holes })
    }

    /// Whether `ip` is in the block and in none of its holes.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// One peer (`from` / `to` entry).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods by selectors. `namespaces: None` = the policy's own namespace;
    /// `pods: None` = every pod of the selected namespaces.
    Pods {
        /// `podSelector`.
        pods: Option<Selector>,
        /// `namespaceSelector`.
        namespaces: Option<Selector>,
    },
    /// An `ipBlock`.
    Block(IpBlock),
}

impl Peer {
    /// Validates a peer's shape as the API server does.
    pub fn new(
        pods: Option<Selector>,
        namespaces: Option<Selector>,
        block: Option<IpBlock>,
    ) -> Result<Peer, NetpolError> {
        match (pods, namespaces, block) {
            (None, None, None) => Err(NetpolError::Peer("must specify a podSelector, namespaceSelector or ipBlock")),
            (None, None, Some(b)) => Ok(Peer::Block(b)),
            (_, _, Some(_)) => Err(NetpolError::Peer("may not specify both ipBlock and another peer")),
            (pods, namespaces, None) => Ok(Peer::Pods { pods, namespaces }),
        }
    }
}

/// One ingress or egress rule: traffic from/to any of `peers` AND on any of `ports`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Empty = every peer (including addresses outside the cluster).
    pub peers: Vec<Peer>,
    /// Empty = every port and protocol.
    pub ports: Vec<PolicyPort>,
}

/// A NetworkPolicy after the API server's defaulting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Policy {
    /// Namespace (the policy applies to pods here only).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.podSelector`.
    pub pod_selector: Selector,
    /// Ingress rules when `Ingress` is in `policyTypes` (an empty list isolates and allows nothing).
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules when `Egress` is in `policyTypes`.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// Builds a policy, applying the API server's `policyTypes` defaulting: when `types` is
    /// empty it is `[Ingress]`, plus `Egress` iff there are egress rules. Rules of a direction
    /// that is not in `policyTypes` are ignored, as the API defines.
    pub fn new(
        namespace: &str,
        name: &str,
        pod_selector: Selector,
        types: &[String],
        ingress: Vec<Rule>,
        egress: Vec<Rule>,
    ) -> Result<Policy, NetpolError> {
        let (mut has_in, mut has_out) = (false, false);
        for t in types {
            match t.as_str() {
                "Ingress" => has_in = true,
                "Egress" => has_out = true,
                _ => return Err(NetpolError::PolicyType(t.clone())),
            }
        }
        if types.is_empty() {
            has_in = true;
            has_out = !egress.is_empty();
        }
        Ok(Policy {
            namespace: namespace.to_string(),
            name: name.to_string(),
            pod_selector,
            ingress: has_in.then_some(ingress),
            egress: has_out.then_some(egress),
        })
    }

    /// The policy's rules for `dir`, when it has that type.
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// Ingress (to a pod) or egress (from a pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic to the selected pod.
    Ingress,
    /// Traffic from the selected pod.
    Egress,
}

/// A container port of a pod (for named ports).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    /// The port's name, if any.
    pub name: Option<String>,
    /// The number.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

/// A pod that takes part in policy: running (not Succeeded/Failed), not hostNetwork, with
/// addresses. The conversion from the API filters the others out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// `status.podIPs` (one per family).
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: String,
    /// Container ports of all containers.
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// The number of the port called `name` for `protocol` on this pod.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports.iter().find(|p| p.protocol == protocol && p.name.as_deref() == Some(name)).map(|p| p.port)
    }
}

/// A namespace and its labels (including `kubernetes.io/metadata.name`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
}

/// Everything the policy decision depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Policies.
    pub policies: Vec<Policy>,
    /// Each node's own addresses (traffic from a pod's own node is always allowed).
    pub node_addrs: BTreeMap<String, Vec<IpAddr>>,
}

impl Cluster {
    /// The labels of namespace `name` (a namespace the API has not shown us has none, and
    /// only its name label is assumed).
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(ns) => ns.labels.clone(),
            None => [("kubernetes.io/metadata.name".to_string(), name.to_string())].into(),
        }
    }

    /// The pod that owns `ip`: when several claim it (an API race), the first in
    /// (namespace, name) order, so every part of weft agrees.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods
            .iter()
            .filter(|p| p.ips.contains(&ip))
            .min_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    }
}
