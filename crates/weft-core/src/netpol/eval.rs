//! The reference evaluator: decides, straight from the NetworkPolicy semantics and without
//! any of the compiler's data structures, whether a connection is allowed. The compiled
//! ruleset is checked against it (property tests, and real traffic in namespaces).

use std::net::IpAddr;

use super::model::{Cluster, Direction, Peer, Pod, PolicyPort, PortMatch, Protocol, Rule};

/// The protocol of a connection: one NetworkPolicy can name, or another (ICMP, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP, UDP or SCTP.
    L4(Protocol),
    /// Any other IP protocol number: only rules without `ports` allow it.
    Other(u8),
}

/// The first packet of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Conn {
    /// Source address.
    pub src: IpAddr,
    /// Destination address (after any DNAT).
    pub dst: IpAddr,
    /// Protocol.
    pub proto: Proto,
    /// Destination port (ignored for [`Proto::Other`]).
    pub port: u16,
}

/// Whether `conn` is allowed: the source pod's egress policy (if the source is a pod) and
/// the destination pod's ingress policy (if the destination is a pod) must both allow it.
/// A pod's own node always reaches it and is always reachable from it; a pod cannot block
/// traffic to itself.
pub fn allowed(c: &Cluster, conn: &Conn) -> bool {
    let src = c.pod_by_ip(conn.src);
    let dst = c.pod_by_ip(conn.dst);
    if let (Some(s), Some(d)) = (src, dst)
        && s.namespace == d.namespace
        && s.name == d.name
    {
        return true;
    }
    let egress_ok = match src {
        None => true,
        Some(s) => is_own_node(c, s, conn.dst) || direction_allows(c, s, Direction::Egress, conn),
    };
    let ingress_ok = match dst {
        None => true,
        Some(d) => is_own_node(c, d, conn.src) || direction_allows(c, d, Direction::Ingress, conn),
    };
    egress_ok && ingress_ok
}

fn is_own_node(c: &Cluster, pod: &Pod, addr: IpAddr) -> bool {
    c.node_addrs.get(&pod.node).is_some_and(|a| a.contains(&addr))
}

/// Whether `pod` is isolated for `dir` (some policy in its namespace selects it and has that type).
pub fn isolated(c: &Cluster, pod: &Pod, dir: Direction) -> bool {
    c.policies
        .iter()
        .any(|p| p.namespace == pod.namespace && p.rules(dir).is_some() && p.pod_selector.matches(&pod.labels))
}

/// The decision for one direction at `pod` (the destination for ingress, the source for egress).
pub fn direction_allows(c: &Cluster, pod: &Pod, dir: Direction, conn: &Conn) -> bool {
    let mut isolated = false;
    for p in c.policies.iter().filter(|p| p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels)) {
        let Some(rules) = p.rules(dir) else { continue };
        isolated = true;
        if rules.iter().any(|r| rule_allows(c, &p.namespace, pod, dir, r, conn)) {
            return true;
        }
    }
    !isolated
}

fn rule_allows(c: &Cluster, policy_ns: &str, pod: &Pod, dir: Direction, rule: &Rule, conn: &Conn) -> bool {
    let remote = match dir {
        Direction::Ingress => conn.src,
        Direction::Egress => conn.dst,
    };
    let peer_ok = rule.peers.is_empty() || rule.peers.iter().any(|peer| peer_matches(c, policy_ns, peer, remote));
    if !peer_ok {
        return false;
    }
    if rule.ports.is_empty() {
        return true;
    }
    // Named ports are looked up on the connection's destination pod, in both directions.
    let dest_pod = match dir {
        Direction::Ingress => Some(pod),
        Direction::Egress => c.pod_by_ip(conn.dst),
    };
    rule.ports.iter().any(|pp| port_matches(pp, dest_pod, conn))
}

fn peer_matches(c: &Cluster, policy_ns: &str, peer: &Peer, ip: IpAddr) -> bool {
    match peer {
        Peer::Block(b) => b.contains(ip),
        Peer::Pods { pods, namespaces } => {
            let Some(p) = c.pod_by_ip(ip) else { return false };
            let ns_ok = match namespaces {
                None => p.namespace == policy_ns,
                Some(sel) => sel.matches(&c.namespace_labels(&p.namespace)),
            };
            ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&p.labels))
        }
    }
}

fn port_matches(pp: &PolicyPort, dest_pod: Option<&Pod>, conn: &Conn) -> bool {
    if conn.proto != Proto::L4(pp.protocol) {
        return false;
    }
    match &pp.port {
        PortMatch::Any => true,
        PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&conn.port),
        PortMatch::Named(name) => dest_pod.and_then(|d| d.named_port(name, pp.protocol)) == Some(conn.port),
    }
}
