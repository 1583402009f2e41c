//! The compiler: (policies, pods, namespaces, this node) → the set/map structure of this
//! node's policy table. Only pods on this node get entries; a pod no policy isolates in a
//! direction has no entry for it (its packets pass with one map miss).
//!
//! Shape, per direction (ingress keyed by destination, egress by source):
//! - a verdict map `local pod address → jump <group chain>`;
//! - per group (local pods whose allowed traffic is identical share one), two interval
//!   sets per family: remote addresses allowed on every protocol and port (`all`), and
//!   disjoint `remote address range . protocol . port range` elements (`ports`).
//!
//! A packet costs one map lookup and at most four set lookups per direction, whatever the
//! number of pods and policies.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::eval::{Conn, Proto};
use super::model::{Cluster, ContainerPort, Direction, IpBlock, Peer, Pod, PortMatch, Protocol, Rule};

/// Address family of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fam {
    /// IPv4 (`ipv4_addr`).
    V4,
    /// IPv6 (`ipv6_addr`).
    V6,
}

impl Fam {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Fam {
        if ip.is_ipv4() { Fam::V4 } else { Fam::V6 }
    }

    /// The highest address of the family, as a number.
    pub fn max(self) -> u128 {
        match self {
            Fam::V4 => u32::MAX as u128,
            Fam::V6 => u128::MAX,
        }
    }

    /// Number → address.
    pub fn addr(self, n: u128) -> IpAddr {
        match self {
            Fam::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
            Fam::V6 => IpAddr::V6(Ipv6Addr::from(n)),
        }
    }
}

/// Address → (family, number).
pub fn num(ip: IpAddr) -> (Fam, u128) {
    match ip {
        IpAddr::V4(a) => (Fam::V4, u32::from(a) as u128),
        IpAddr::V6(a) => (Fam::V6, u128::from(a)),
    }
}

/// One element of a `ports` set: addresses `lo..=hi`, a protocol, ports `port_lo..=port_hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortElem {
    /// First address.
    pub lo: u128,
    /// Last address.
    pub hi: u128,
    /// Protocol.
    pub proto: Protocol,
    /// First port.
    pub port_lo: u16,
    /// Last port.
    pub port_hi: u16,
}

/// The two sets of one family in a group; elements are sorted and disjoint (nft rejects
/// overlapping elements in concatenated interval sets).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FamilySets {
    /// Address ranges allowed on every protocol and port.
    pub all: Vec<(u128, u128)>,
    /// Address range × protocol × port range elements.
    pub ports: Vec<PortElem>,
}

/// What one group of local pods may exchange in one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    /// IPv4 remote addresses.
    pub v4: FamilySets,
    /// IPv6 remote addresses.
    pub v6: FamilySets,
}

impl Group {
    /// The sets of `fam`.
    pub fn family(&self, fam: Fam) -> &FamilySets {
        match fam {
            Fam::V4 => &self.v4,
            Fam::V6 => &self.v6,
        }
    }
}

/// One direction: local isolated pod address → its group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirSets {
    /// Local pod address → index into `groups`.
    pub dispatch: BTreeMap<IpAddr, usize>,
    /// The distinct groups.
    pub groups: Vec<Group>,
}

/// The compiled policy of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// The node's name.
    pub node: String,
    /// Checks on traffic to local pods.
    pub ingress: DirSets,
    /// Checks on traffic from local pods.
    pub egress: DirSets,
}

/// Address → owning pod, with the same tie-break as [`Cluster::pod_by_ip`].
fn owners(c: &Cluster) -> BTreeMap<IpAddr, &Pod> {
    let mut m: BTreeMap<IpAddr, &Pod> = BTreeMap::new();
    for p in &c.pods {
        for ip in &p.ips {
            m.entry(*ip)
                .and_modify(|o| {
                    if (&p.namespace, &p.name) < (&o.namespace, &o.name) {
                        *o = p;
                    }
                })
                .or_insert(p);
        }
    }
    m
}

/// The remote side of one rule, resolved once for every local pod it applies to.
struct Remote<'a> {
    /// No peers: everything.
    everything: bool,
    /// Pods matched by selector peers (address, owner).
    pods: Vec<(IpAddr, &'a Pod)>,
    /// ipBlock peers.
    blocks: Vec<&'a IpBlock>,
}

impl Remote<'_> {
    /// All remote address ranges, per family.
    fn ranges(&self, out: &mut Vec<(Fam, u128, u128)>) {
        if self.everything {
            out.push((Fam::V4, 0, Fam::V4.max()));
            out.push((Fam::V6, 0, Fam::V6.max()));
            return;
        }
        for (ip, _) in &self.pods {
            let (f, n) = num(*ip);
            out.push((f, n, n));
        }
        for b in &self.blocks {
            block_ranges(b, out);
        }
    }
}

/// `cidr − except*` as disjoint ranges.
pub fn block_ranges(b: &IpBlock, out: &mut Vec<(Fam, u128, u128)>) {
    let (f, lo) = num(b.cidr.network());
    let (_, hi) = num(b.cidr.broadcast());
    let mut parts = vec![(lo, hi)];
    for e in &b.except {
        let (_, elo) = num(e.network());
        let (_, ehi) = num(e.broadcast());
        parts = parts
            .into_iter()
            .flat_map(|(a, z)| {
                let mut v = Vec::new();
                if ehi < a || elo > z {
                    v.push((a, z));
                } else {
                    if elo > a {
                        v.push((a, elo - 1));
                    }
                    if ehi < z {
                        v.push((ehi + 1, z));
                    }
                }
                v
            })
            .collect();
    }
    out.extend(parts.into_iter().map(|(a, z)| (f, a, z)));
}

/// Owned addresses grouped by namespace, so a peer looks only at the namespaces it selects.
type ByNamespace<'a> = BTreeMap<&'a str, Vec<(IpAddr, &'a Pod)>>;

fn resolve<'a>(c: &Cluster, by_ns: &ByNamespace<'a>, policy_ns: &str, rule: &'a Rule) -> Remote<'a> {
    let mut r = Remote { everything: rule.peers.is_empty(), pods: Vec::new(), blocks: Vec::new() };
    for peer in &rule.peers {
        match peer {
            Peer::Block(b) => r.blocks.push(b),
            Peer::Pods { pods, namespaces } => {
                for (ns, members) in by_ns {
                    let ns_ok = match namespaces {
                        None => *ns == policy_ns,
                        Some(sel) => sel.matches(&c.namespace_labels(ns)),
                    };
                    if ns_ok {
                        r.pods
                            .extend(members.iter().filter(|(_, p)| pods.as_ref().is_none_or(|s| s.matches(&p.labels))));
                    }
                }
            }
        }
    }
    r.pods.sort_by_key(|(ip, _)| *ip);
    r.pods.dedup_by_key(|(ip, _)| *ip);
    r
}

/// Raw (overlapping) elements of a group before normalisation.
#[derive(Default)]
struct Raw {
    all: Vec<(Fam, u128, u128)>,
    ports: Vec<(Fam, Protocol, u128, u128, u16, u16)>,
}

impl Raw {
    fn add_rule(&mut self, dir: Direction, local: &Pod, rule: &Rule, remote: &Remote, owners: &BTreeMap<IpAddr, &Pod>) {
        let mut ranges = Vec::new();
        remote.ranges(&mut ranges);
        if rule.ports.is_empty() {
            self.all.extend(ranges);
            return;
        }
        for pp in &rule.ports {
            let p = pp.protocol;
            match (&pp.port, dir) {
                (PortMatch::Any, _) => self.ports.extend(ranges.iter().map(|&(f, a, z)| (f, p, a, z, 0, u16::MAX))),
                (PortMatch::Range(lo, hi), _) => {
                    self.ports.extend(ranges.iter().map(|&(f, a, z)| (f, p, a, z, *lo, *hi)))
                }
                (PortMatch::Named(name), Direction::Ingress) => {
                    if let Some(n) = local.named_port(name, p) {
                        self.ports.extend(ranges.iter().map(|&(f, a, z)| (f, p, a, z, n, n)));
                    }
                }
                (PortMatch::Named(name), Direction::Egress) => {
                    // Resolved on each destination pod; addresses that are no pod never match.
                    let mut add = |ip: IpAddr, pod: &Pod| {
                        if let Some(n) = pod.named_port(name, p) {
                            let (f, a) = num(ip);
                            self.ports.push((f, p, a, a, n, n));
                        }
                    };
                    if remote.everything {
                        owners.iter().for_each(|(ip, pod)| add(*ip, pod));
                    } else {
                        remote.pods.iter().for_each(|(ip, pod)| add(*ip, pod));
                        for b in &remote.blocks {
                            owners.iter().filter(|(ip, _)| b.contains(**ip)).for_each(|(ip, pod)| add(*ip, pod));
                        }
                    }
                }
            }
        }
    }

    fn finish(self) -> Group {
        let mut g = Group::default();
        for fam in [Fam::V4, Fam::V6] {
            let sets = match fam {
                Fam::V4 => &mut g.v4,
                Fam::V6 => &mut g.v6,
            };
            sets.all = merge(self.all.iter().filter(|r| r.0 == fam).map(|r| (r.1, r.2)).collect());
            for proto in Protocol::ALL {
                let rects: Vec<_> =
                    self.ports.iter().filter(|r| r.0 == fam && r.1 == proto).map(|r| (r.2, r.3, r.4, r.5)).collect();
                for (lo, hi, ports) in rectangles(rects) {
                    sets.ports.extend(ports.into_iter().map(|(pl, ph)| PortElem {
                        lo,
                        hi,
                        proto,
                        port_lo: pl,
                        port_hi: ph,
                    }));
                }
            }
            sets.ports.sort();
        }
        g
    }
}

/// Sorts and merges overlapping or adjacent inclusive ranges.
pub fn merge<T: Ord + Copy + Into<u128>>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, z) in v {
        if let Some(last) = out.last_mut()
            && a.into() <= last.1.into().saturating_add(1)
        {
            if z > last.1 {
                last.1 = z;
            }
            continue;
        }
        out.push((a, z));
    }
    out
}

/// Addresses `lo..=hi` × ports `lo..=hi`.
type Rect = (u128, u128, u16, u16);
/// Addresses `lo..=hi` with their disjoint port ranges.
type Segment = (u128, u128, Vec<(u16, u16)>);

/// Turns overlapping (address range × port range) rectangles into disjoint address
/// segments, each with its merged port ranges; neighbouring segments with the same ports
/// are joined.
fn rectangles(mut rects: Vec<Rect>) -> Vec<Segment> {
    if rects.is_empty() {
        return Vec::new();
    }
    rects.sort();
    let mut bounds: Vec<u128> = rects.iter().flat_map(|r| [Some(r.0), r.1.checked_add(1)]).flatten().collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut ends: BinaryHeap<Reverse<(u128, usize)>> = BinaryHeap::new();
    let mut active: BTreeMap<(u16, u16), usize> = BTreeMap::new();
    let mut next = 0;
    let mut out: Vec<Segment> = Vec::new();
    for (i, &b) in bounds.iter().enumerate() {
        while let Some(Reverse((hi, idx))) = ends.peek().copied()
            && hi < b
        {
            ends.pop();
            let key = (rects[idx].2, rects[idx].3);
            if let Some(n) = active.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    active.remove(&key);
                }
            }
        }
        while next < rects.len() && rects[next].0 <= b {
            ends.push(Reverse((rects[next].1, next)));
            *active.entry((rects[next].2, rects[next].3)).or_default() += 1;
            next += 1;
        }
        if active.is_empty() {
            continue;
        }
        let seg_hi = bounds.get(i + 1).map(|n| n - 1).unwrap_or(u128::MAX);
        let ports = merge(active.keys().copied().collect());
        if let Some(last) = out.last_mut()
            && last.2 == ports
            && last.1.checked_add(1) == Some(b)
        {
            last.1 = seg_hi;
            continue;
        }
        out.push((b, seg_hi, ports));
    }
    out
}

/// Compiles the policy of node `node`: entries for the pods on that node only.
pub fn compile(c: &Cluster, node: &str) -> Ruleset {
    let owners = owners(c);
    let mut by_ns: ByNamespace = BTreeMap::new();
    for (ip, p) in &owners {
        by_ns.entry(p.namespace.as_str()).or_default().push((*ip, *p));
    }
    let mut rs = Ruleset { node: node.to_string(), ..Default::default() };
    for dir in [Direction::Ingress, Direction::Egress] {
        // Remote sides are resolved once per distinct peer list (many policies share one,
        // e.g. "all namespaces" for DNS), not per local pod. The policy's namespace is part
        // of the key only when a peer refers to it.
        let mut remotes: BTreeMap<(&str, &[Peer]), Remote> = BTreeMap::new();
        let mut memo: BTreeMap<(Vec<usize>, Vec<ContainerPort>), usize> = BTreeMap::new();
        let mut index: BTreeMap<Group, usize> = BTreeMap::new();
        let out = match dir {
            Direction::Ingress => &mut rs.ingress,
            Direction::Egress => &mut rs.egress,
        };
        for (ip, pod) in &owners {
            if pod.node != node {
                continue;
            }
            let applicable: Vec<usize> = c
                .policies
                .iter()
                .enumerate()
                .filter(|(_, p)| {
                    p.namespace == pod.namespace && p.rules(dir).is_some() && p.pod_selector.matches(&pod.labels)
                })
                .map(|(i, _)| i)
                .collect();
            if applicable.is_empty() {
                continue;
            }
            // Ingress named ports depend on the local pod's ports; nothing else does.
            let uses_names = dir == Direction::Ingress
                && applicable.iter().any(|&i| {
                    c.policies[i]
                        .rules(dir)
                        .unwrap_or_default()
                        .iter()
                        .any(|r| r.ports.iter().any(|p| matches!(p.port, PortMatch::Named(_))))
                });
            let key = (applicable, if uses_names { pod.ports.clone() } else { Vec::new() });
            if let Some(&g) = memo.get(&key) {
                out.dispatch.insert(*ip, g);
                continue;
            }
            let mut raw = Raw::default();
            for &pi in &key.0 {
                let p = &c.policies[pi];
                for rule in p.rules(dir).unwrap_or_default() {
                    let own_ns = rule.peers.iter().any(|peer| matches!(peer, Peer::Pods { namespaces: None, .. }));
                    let key = (if own_ns { p.namespace.as_str() } else { "" }, rule.peers.as_slice());
                    let remote = remotes.entry(key).or_insert_with(|| resolve(c, &by_ns, &p.namespace, rule));
                    raw.add_rule(dir, pod, rule, remote, &owners);
                }
            }
            let group = raw.finish();
            let g = *index.entry(group.clone()).or_insert_with(|| {
                out.groups.push(group);
                out.groups.len() - 1
            });
            memo.insert(key, g);
            out.dispatch.insert(*ip, g);
        }
    }
    rs
}

/// What the compiled table does with a connection's first packet crossing this node's
/// forward hook: `true` = accepted. A small interpreter of the structure [`render`]
/// writes (chain `forward`, the dispatch maps and the group chains), used to check the
/// compiler against the reference evaluator.
///
/// `node_addrs` are this node's own addresses: packets from them, or to them, do not cross
/// the forward hook (output / input path), and the table accepts them (`fib saddr type local`).
///
/// [`render`]: super::render::render
pub fn interpret(rs: &Ruleset, node_addrs: &[IpAddr], conn: &Conn) -> bool {
    if node_addrs.contains(&conn.src) || node_addrs.contains(&conn.dst) {
        return true;
    }
    let check = |d: &DirSets, local: IpAddr, remote: IpAddr| -> bool {
        let Some(&g) = d.dispatch.get(&local) else { return true };
        let Some(group) = d.groups.get(g) else { return false };
        let (fam, r) = num(remote);
        if Fam::of(local) != fam {
            return false;
        }
        let sets = group.family(fam);
        if sets.all.iter().any(|&(a, z)| a <= r && r <= z) {
            return true;
        }
        match conn.proto {
            Proto::Other(_) => false,
            Proto::L4(p) => sets
                .ports
                .iter()
                .any(|e| e.proto == p && e.lo <= r && r <= e.hi && e.port_lo <= conn.port && conn.port <= e.port_hi),
        }
    };
    check(&rs.egress, conn.src, conn.dst) && check(&rs.ingress, conn.dst, conn.src)
}
