//! Tests of the NetworkPolicy model, evaluator, compiler and renderer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proptest::prelude::*;

use super::compile::{Fam, compile, interpret, merge};
use super::eval::{Conn, Proto, allowed};
use super::kernel::KernelTable;
use super::model::*;
use super::render::render;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ips: &[&str], node: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ips: ips.iter().map(|s| ip(s)).collect(),
        node: node.into(),
        ports: vec![],
    }
}

fn ns(name: &str, labels: &[(&str, &str)]) -> (String, Namespace) {
    let mut l: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    l.insert("kubernetes.io/metadata.name".into(), name.into());
    (name.into(), Namespace { name: name.into(), labels: l })
}

fn tcp(port: i64) -> PolicyPort {
    PolicyPort::new(Some("TCP"), Some(PortRef::Number(port)), None).unwrap()
}

fn named(proto: &str, name: &str) -> PolicyPort {
    PolicyPort::new(Some(proto), Some(PortRef::Name(name.into())), None).unwrap()
}

fn pods_peer(pods: Option<Selector>, namespaces: Option<Selector>) -> Peer {
    Peer::new(pods, namespaces, None).unwrap()
}

fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer::Block(IpBlock::parse(cidr, &except.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap())
}

fn policy(ns: &str, name: &str, sel: Selector, types: &[&str], ingress: Vec<Rule>, egress: Vec<Rule>) -> Policy {
    let types: Vec<String> = types.iter().map(|s| s.to_string()).collect();
    Policy::new(ns, name, sel, &types, ingress, egress).unwrap()
}

fn conn(src: &str, dst: &str, proto: Protocol, port: u16) -> Conn {
    Conn { src: ip(src), dst: ip(dst), proto: Proto::L4(proto), port }
}

/// The cluster of the upstream e2e model, trimmed: namespaces x, y, z; pods a, b in x and y,
/// a in z; x on node n1, the others on n2.
fn e2e_cluster() -> Cluster {
    let mut c = Cluster {
        namespaces: [ns("x", &[("team", "red")]), ns("y", &[("team", "blue")]), ns("z", &[])].into(),
        ..Default::default()
    };
    let ports = |http: u16| {
        vec![
            ContainerPort { name: Some("http".into()), port: http, protocol: Protocol::Tcp },
            ContainerPort { name: Some("dns".into()), port: 53, protocol: Protocol::Udp },
        ]
    };
    let mut xa = pod("x", "a", &[("pod", "a")], &["10.0.1.2", "fd00:1::2"], "n1");
    xa.ports = ports(80);
    let mut xb = pod("x", "b", &[("pod", "b")], &["10.0.1.3", "fd00:1::3"], "n1");
    xb.ports = ports(8080);
    let ya = pod("y", "a", &[("pod", "a")], &["10.0.2.2", "fd00:2::2"], "n2");
    let mut yb = pod("y", "b", &[("pod", "b")], &["10.0.2.3", "fd00:2::3"], "n2");
    yb.ports = ports(9090);
    let za = pod("z", "a", &[("pod", "a")], &["10.0.2.4", "fd00:2::4"], "n2");
    c.pods = vec![xa, xb, ya, yb, za];
    c.node_addrs = [("n1".into(), vec![ip("10.0.1.1"), ip("fd00:1::1")]), ("n2".into(), vec![ip("10.0.2.1")])].into();
    c
}

/// The compiled decision of the whole cluster: every node the packet crosses must accept it.
fn compiled_allowed(c: &Cluster, rulesets: &BTreeMap<String, super::compile::Ruleset>, k: &Conn) -> bool {
    let nodes: BTreeSet<&str> =
        [c.pod_by_ip(k.src), c.pod_by_ip(k.dst)].into_iter().flatten().map(|p| p.node.as_str()).collect();
    nodes.into_iter().all(|n| {
        let addrs = c.node_addrs.get(n).cloned().unwrap_or_default();
        interpret(&rulesets[n], &addrs, k)
    })
}

fn rulesets(c: &Cluster) -> BTreeMap<String, super::compile::Ruleset> {
    let mut nodes: BTreeSet<String> = c.pods.iter().map(|p| p.node.clone()).collect();
    nodes.extend(c.node_addrs.keys().cloned());
    nodes.into_iter().map(|n| (n.clone(), compile(c, &n))).collect()
}

/// Asserts evaluator and compiled structure agree on `k`, and returns the decision.
fn decide(c: &Cluster, k: Conn) -> bool {
    let want = allowed(c, &k);
    let got = compiled_allowed(c, &rulesets(c), &k);
    assert_eq!(got, want, "compiled and reference disagree on {k:?}");
    want
}

// ---- validation: hostile input first ----

#[test]
fn hostile_selectors_are_clear_errors() {
    assert_eq!(Operator::parse("in"), Err(NetpolError::Operator("in".into())));
    assert!(Operator::parse("Gt").unwrap_err().to_string().contains("not one of In, NotIn, Exists, DoesNotExist"));
    let e = Requirement::new("app", Operator::In, vec![]).unwrap_err();
    assert!(e.to_string().contains("needs at least one value"), "{e}");
    assert!(Requirement::new("app", Operator::NotIn, vec![]).is_err());
    let e = Requirement::new("app", Operator::Exists, vec!["x".into()]).unwrap_err();
    assert!(e.to_string().contains("takes no values"), "{e}");
    assert!(Requirement::new("app", Operator::DoesNotExist, vec!["x".into()]).is_err());
}

#[test]
fn hostile_ports_are_clear_errors() {
    let num = |n| Some(PortRef::Number(n));
    assert_eq!(PolicyPort::new(Some("ICMP"), num(80), None), Err(NetpolError::Protocol("ICMP".into())));
    assert_eq!(PolicyPort::new(Some("tcp"), num(80), None), Err(NetpolError::Protocol("tcp".into())));
    assert_eq!(PolicyPort::new(None, num(0), None), Err(NetpolError::PortRange(0)));
    assert_eq!(PolicyPort::new(None, num(65536), None), Err(NetpolError::PortRange(65536)));
    assert_eq!(PolicyPort::new(None, num(-1), None), Err(NetpolError::PortRange(-1)));
    assert_eq!(PolicyPort::new(None, num(80), Some(70000)), Err(NetpolError::PortRange(70000)));
    let e = PolicyPort::new(None, num(81), Some(80)).unwrap_err();
    assert!(e.to_string().contains("endPort 80: is below port 81"), "{e}");
    assert!(PolicyPort::new(None, Some(PortRef::Name("http".into())), Some(90)).is_err());
    assert!(PolicyPort::new(None, None, Some(90)).unwrap_err().to_string().contains("without a port"));
    for bad in ["", "HTTP", "-http", "http-", "h--p", "1234", "a-very-long-port-name", "ht tp"] {
        assert_eq!(
            PolicyPort::new(None, Some(PortRef::Name(bad.into())), None),
            Err(NetpolError::PortName(bad.into())),
            "{bad:?}"
        );
    }
    // Defaults and valid forms.
    assert_eq!(
        PolicyPort::new(None, None, None).unwrap(),
        PolicyPort { protocol: Protocol::Tcp, port: PortMatch::Any }
    );
    assert_eq!(PolicyPort::new(Some("SCTP"), num(80), Some(80)).unwrap().port, PortMatch::Range(80, 80));
    assert_eq!(PolicyPort::new(Some("UDP"), num(1), Some(65535)).unwrap().port, PortMatch::Range(1, 65535));
}

#[test]
fn hostile_ip_blocks_are_clear_errors() {
    let ex = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(IpBlock::parse("10.0.0.0/33", &[]), Err(NetpolError::Cidr("10.0.0.0/33".into())));
    assert_eq!(IpBlock::parse("banana", &[]), Err(NetpolError::Cidr("banana".into())));
    assert_eq!(IpBlock::parse("10.0.0.0", &[]), Err(NetpolError::Cidr("10.0.0.0".into())));
    assert!(IpBlock::parse("10.0.0.0/8", &ex(&["11.0.0.0/16"])).is_err());
    assert!(IpBlock::parse("10.0.0.0/8", &ex(&["10.0.0.0/8"])).is_err(), "except must be a strict subset");
    assert!(IpBlock::parse("10.0.0.0/8", &ex(&["10.0.0.0/4"])).is_err());
    assert!(IpBlock::parse("10.0.0.0/8", &ex(&["fd00::/64"])).is_err());
    assert!(IpBlock::parse("10.0.0.0/8", &ex(&["10.1.0.0/99"])).is_err());
    // Legacy host bits are masked, as the kernel would.
    let b = IpBlock::parse("172.16.5.9/12", &ex(&["172.16.5.0/24"])).unwrap();
    assert_eq!(b.cidr.to_string(), "172.16.0.0/12");
    assert!(b.contains(ip("172.17.0.1")) && !b.contains(ip("172.16.5.7")) && !b.contains(ip("172.32.0.1")));
}

#[test]
fn hostile_peers_and_types_are_clear_errors() {
    assert!(Peer::new(None, None, None).unwrap_err().to_string().contains("must specify"));
    let b = IpBlock::parse("10.0.0.0/8", &[]).unwrap();
    assert!(Peer::new(Some(Selector::default()), None, Some(b)).unwrap_err().to_string().contains("both ipBlock"));
    let e = Policy::new("x", "p", Selector::default(), &["ingress".into()], vec![], vec![]).unwrap_err();
    assert_eq!(e, NetpolError::PolicyType("ingress".into()));
}

#[test]
fn policy_types_follow_the_api_defaulting() {
    // Empty types: Ingress, plus Egress iff egress rules exist.
    let p = policy("x", "p", Selector::default(), &[], vec![], vec![]);
    assert_eq!((p.ingress.is_some(), p.egress.is_some()), (true, false));
    let p = policy("x", "p", Selector::default(), &[], vec![], vec![Rule::default()]);
    assert_eq!((p.ingress.is_some(), p.egress.is_some()), (true, true));
    // Explicit types win: egress rules of an Ingress-only policy are ignored.
    let p = policy("x", "p", Selector::default(), &["Ingress"], vec![], vec![Rule::default()]);
    assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
    let p = policy("x", "p", Selector::default(), &["Egress"], vec![Rule::default()], vec![]);
    assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
}

#[test]
fn selectors_follow_the_label_semantics() {
    let l: Labels = [("app".to_string(), "web".to_string())].into();
    let req = |k: &str, op, v: &[&str]| Requirement::new(k, op, v.iter().map(|s| s.to_string()).collect()).unwrap();
    let sel = |r: Vec<Requirement>| Selector { match_labels: Labels::new(), match_expressions: r };
    assert!(Selector::default().matches(&Labels::new()));
    assert!(sel(vec![req("app", Operator::In, &["web", "db"])]).matches(&l));
    assert!(!sel(vec![req("app", Operator::In, &["db"])]).matches(&l));
    assert!(!sel(vec![req("tier", Operator::In, &["db"])]).matches(&l));
    assert!(sel(vec![req("tier", Operator::NotIn, &["db"])]).matches(&l), "NotIn matches an absent key");
    assert!(!sel(vec![req("app", Operator::NotIn, &["web"])]).matches(&l));
    assert!(sel(vec![req("app", Operator::Exists, &[])]).matches(&l));
    assert!(!sel(vec![req("app", Operator::DoesNotExist, &[])]).matches(&l));
    let both = Selector {
        match_labels: [("app".into(), "web".into())].into(),
        match_expressions: vec![req("x", Operator::Exists, &[])],
    };
    assert!(!both.matches(&l), "matchLabels AND matchExpressions");
}

// ---- semantics, decided by both the evaluator and the compiled structure ----

#[test]
fn default_deny_ingress_isolates_only_its_namespace_and_direction() {
    let mut c = e2e_cluster();
    c.policies = vec![policy("x", "deny", Selector::default(), &["Ingress"], vec![], vec![])];
    assert!(!decide(&c, conn("10.0.2.2", "10.0.1.2", Protocol::Tcp, 80)), "y/a → x/a");
    assert!(!decide(&c, conn("10.0.1.3", "10.0.1.2", Protocol::Tcp, 80)), "x/b → x/a (same node)");
    assert!(!decide(&c, conn("fd00:2::2", "fd00:1::2", Protocol::Udp, 53)), "IPv6 too");
    assert!(!decide(&c, Conn { src: ip("10.0.2.2"), dst: ip("10.0.1.2"), proto: Proto::Other(1), port: 0 }), "ICMP");
    assert!(decide(&c, conn("10.0.1.2", "10.0.2.2", Protocol::Tcp, 80)), "egress of x not isolated");
    assert!(decide(&c, conn("10.0.2.2", "10.0.2.3", Protocol::Tcp, 80)), "y unaffected");
    assert!(decide(&c, conn("10.0.1.1", "10.0.1.2", Protocol::Tcp, 80)), "own node always reaches its pods");
    assert!(!decide(&c, conn("10.0.2.1", "10.0.1.2", Protocol::Tcp, 80)), "another node is ordinary traffic");
}

#[test]
fn empty_rule_allows_everything_and_empty_list_nothing() {
    let mut c = e2e_cluster();
    c.policies = vec![policy("x", "all", Selector::default(), &["Ingress"], vec![Rule::default()], vec![])];
    assert!(decide(&c, conn("192.168.7.7", "10.0.1.2", Protocol::Sctp, 9)), "external, any port");
    assert!(decide(&c, Conn { src: ip("10.0.2.2"), dst: ip("10.0.1.2"), proto: Proto::Other(1), port: 0 }));
    // Union: adding a deny-all does not remove what the allow-all allows.
    c.policies.push(policy("x", "deny", Selector::default(), &["Ingress", "Egress"], vec![], vec![]));
    assert!(decide(&c, conn("10.0.2.2", "10.0.1.2", Protocol::Tcp, 80)));
    assert!(!decide(&c, conn("10.0.1.2", "10.0.2.2", Protocol::Tcp, 80)), "egress now isolated and empty");
}

#[test]
fn namespace_and_pod_selectors_and_vs_or() {
    let mut c = e2e_cluster();
    let and = Rule {
        peers: vec![pods_peer(Some(Selector::labels([("pod", "a")])), Some(Selector::labels([("team", "blue")])))],
        ports: vec![],
    };
    c.policies = vec![policy("x", "and", Selector::labels([("pod", "a")]), &["Ingress"], vec![and], vec![])];
    assert!(decide(&c, conn("10.0.2.2", "10.0.1.2", Protocol::Tcp, 80)), "y/a");
    assert!(!decide(&c, conn("10.0.2.3", "10.0.1.2", Protocol::Tcp, 80)), "y/b: pod selector fails");
    assert!(!decide(&c, conn("10.0.2.4", "10.0.1.2", Protocol::Tcp, 80)), "z/a: namespace fails");
    assert!(decide(&c, conn("10.0.2.4", "10.0.1.3", Protocol::Tcp, 80)), "x/b not selected");
    let or = Rule {
        peers: vec![
            pods_peer(Some(Selector::labels([("pod", "a")])), None),
            pods_peer(None, Some(Selector::labels([("team", "blue")]))),
        ],
        ports: vec![],
    };
    c.policies = vec![policy("x", "or", Selector::labels([("pod", "a")]), &["Ingress"], vec![or], vec![])];
    assert!(decide(&c, conn("10.0.2.3", "10.0.1.2", Protocol::Tcp, 80)), "y/b via namespace peer");
    assert!(!decide(&c, conn("10.0.2.4", "10.0.1.2", Protocol::Tcp, 80)), "z/a: pod peer is x-only");
    // namespaceSelector {} = every pod of every namespace, but no external address.
    let any_ns = Rule { peers: vec![pods_peer(None, Some(Selector::default()))], ports: vec![] };
    c.policies = vec![policy("x", "ns", Selector::default(), &["Ingress"], vec![any_ns], vec![])];
    assert!(decide(&c, conn("10.0.2.4", "10.0.1.2", Protocol::Tcp, 80)));
    assert!(!decide(&c, conn("10.0.9.9", "10.0.1.2", Protocol::Tcp, 80)));
}

#[test]
fn named_ports_resolve_on_the_destination_pod() {
    let mut c = e2e_cluster();
    // Ingress: "http" is 80 on x/a and 8080 on x/b.
    let r = Rule { peers: vec![], ports: vec![named("TCP", "http")] };
    c.policies = vec![policy("x", "http", Selector::default(), &["Ingress"], vec![r], vec![])];
    assert!(decide(&c, conn("10.0.2.2", "10.0.1.2", Protocol::Tcp, 80)));
    assert!(!decide(&c, conn("10.0.2.2", "10.0.1.2", Protocol::Tcp, 8080)));
    assert!(decide(&c, conn("10.0.2.2", "10.0.1.3", Protocol::Tcp, 8080)));
    assert!(!decide(&c, conn("10.0.2.2", "10.0.1.3", Protocol::Tcp, 80)));
    assert!(!decide(&c, conn("10.0.2.2", "10.0.1.2", Protocol::Udp, 80)), "protocol must match the name's");
    // Egress without `to`: any destination pod that has the name, at its own number.
    let r = Rule { peers: vec![], ports: vec![named("TCP", "http"), named("UDP", "dns")] };
    c.policies = vec![policy("x", "out", Selector::labels([("pod", "a")]), &["Egress"], vec![], vec![r])];
    assert!(decide(&c, conn("10.0.1.2", "10.0.2.3", Protocol::Tcp, 9090)), "y/b's http");
    assert!(!decide(&c, conn("10.0.1.2", "10.0.2.3", Protocol::Tcp, 80)));
    assert!(decide(&c, conn("10.0.1.2", "10.0.1.3", Protocol::Tcp, 8080)), "x/b's http, same node");
    assert!(!decide(&c, conn("10.0.1.2", "10.0.2.2", Protocol::Tcp, 80)), "y/a has no ports");
    assert!(!decide(&c, conn("10.0.1.2", "8.8.8.8", Protocol::Udp, 53)), "no pod, no named port");
    assert!(decide(&c, conn("fd00:1::2", "fd00:2::3", Protocol::Udp, 53)));
}

#[test]
fn ip_block_except_and_union_with_another_rule() {
    let mut c = e2e_cluster();
    let r1 = Rule { peers: vec![block("10.0.0.0/16", &["10.0.2.3/32"])], ports: vec![] };
    c.policies = vec![policy("x", "blk", Selector::labels([("pod", "a")]), &["Egress"], vec![], vec![r1.clone()])];
    assert!(decide(&c, conn("10.0.1.2", "10.0.2.2", Protocol::Tcp, 80)), "pod IPs match ipBlock");
    assert!(!decide(&c, conn("10.0.1.2", "10.0.2.3", Protocol::Tcp, 80)), "the except");
    assert!(!decide(&c, conn("10.0.1.2", "10.1.0.1", Protocol::Tcp, 80)), "outside the block");
    assert!(!decide(&c, conn("fd00:1::2", "fd00:2::2", Protocol::Tcp, 80)), "an IPv4 block allows no IPv6");
    let r2 = Rule { peers: vec![block("10.0.2.3/32", &[])], ports: vec![tcp(81)] };
    c.policies[0] = policy("x", "blk", Selector::labels([("pod", "a")]), &["Egress"], vec![], vec![r1, r2]);
    assert!(decide(&c, conn("10.0.1.2", "10.0.2.3", Protocol::Tcp, 81)), "another rule re-allows the excepted address");
    assert!(!decide(&c, conn("10.0.1.2", "10.0.2.3", Protocol::Tcp, 80)));
}

#[test]
fn ports_ranges_and_protocols() {
    let mut c = e2e_cluster();
    let range = PolicyPort::new(Some("TCP"), Some(PortRef::Number(8000)), Some(8100)).unwrap();
    let sctp_only = PolicyPort::new(Some("SCTP"), Some(PortRef::Number(81)), None).unwrap();
    let udp_any = PolicyPort::new(Some("UDP"), None, None).unwrap();
    let r = Rule { peers: vec![], ports: vec![range, sctp_only, udp_any] };
    c.policies = vec![policy("x", "ports", Selector::default(), &["Ingress"], vec![r], vec![])];
    for (proto, port, want) in [
        (Protocol::Tcp, 7999, false),
        (Protocol::Tcp, 8000, true),
        (Protocol::Tcp, 8100, true),
        (Protocol::Tcp, 8101, false),
        (Protocol::Tcp, 81, false),
        (Protocol::Sctp, 81, true),
        (Protocol::Udp, 1, true),
        (Protocol::Udp, 65535, true),
        (Protocol::Sctp, 8000, false),
    ] {
        assert_eq!(decide(&c, conn("10.0.2.2", "10.0.1.2", proto, port)), want, "{proto:?}/{port}");
    }
}

#[test]
fn egress_and_ingress_must_both_allow() {
    let mut c = e2e_cluster();
    // x/a may only talk to y/a; y isolates ingress to allow only x/a.
    let to_ya = Rule {
        peers: vec![pods_peer(Some(Selector::labels([("pod", "a")])), Some(Selector::labels([("team", "blue")])))],
        ports: vec![],
    };
    let from_xa = Rule {
        peers: vec![pods_peer(Some(Selector::labels([("pod", "a")])), Some(Selector::labels([("team", "red")])))],
        ports: vec![],
    };
    c.policies = vec![
        policy("x", "out", Selector::labels([("pod", "a")]), &["Egress"], vec![], vec![to_ya]),
        policy("y", "in", Selector::default(), &["Ingress"], vec![from_xa], vec![]),
    ];
    assert!(decide(&c, conn("10.0.1.2", "10.0.2.2", Protocol::Tcp, 80)));
    assert!(!decide(&c, conn("10.0.1.2", "10.0.2.3", Protocol::Tcp, 80)), "egress denies");
    assert!(!decide(&c, conn("10.0.1.3", "10.0.2.2", Protocol::Tcp, 80)), "ingress denies");
    assert!(decide(&c, conn("10.0.1.3", "10.0.2.4", Protocol::Tcp, 80)));
}

#[test]
fn only_this_nodes_pods_get_entries_and_identical_pods_share_a_group() {
    let mut c = e2e_cluster();
    c.policies = vec![policy("y", "deny", Selector::default(), &["Ingress"], vec![], vec![])];
    let n1 = compile(&c, "n1");
    assert!(n1.ingress.dispatch.is_empty() && n1.egress.dispatch.is_empty(), "n1 hosts no y pod: {n1:?}");
    let n2 = compile(&c, "n2");
    assert_eq!(n2.ingress.dispatch.len(), 4, "y/a and y/b, both families");
    assert_eq!(n2.ingress.groups.len(), 1, "same policies, one group");
    assert!(!n2.ingress.dispatch.contains_key(&ip("10.0.2.4")), "z/a is not isolated");
}

#[test]
fn overlapping_rules_become_disjoint_elements() {
    let mut c = e2e_cluster();
    let wide = PolicyPort::new(Some("TCP"), Some(PortRef::Number(80)), Some(90)).unwrap();
    let r1 = Rule { peers: vec![block("10.0.0.0/16", &[])], ports: vec![wide] };
    let r2 = Rule { peers: vec![block("10.0.2.0/24", &[])], ports: vec![tcp(85), tcp(91), tcp(100)] };
    c.policies = vec![policy("x", "p", Selector::labels([("pod", "a")]), &["Ingress"], vec![r1, r2], vec![])];
    let rs = compile(&c, "n1");
    let e = &rs.ingress.groups[0].v4.ports;
    for (i, a) in e.iter().enumerate() {
        for b in &e[i + 1..] {
            let overlap =
                a.proto == b.proto && a.lo <= b.hi && b.lo <= a.hi && a.port_lo <= b.port_hi && b.port_lo <= a.port_hi;
            assert!(!overlap, "{a:?} overlaps {b:?}");
        }
    }
    assert!(decide(&c, conn("10.0.2.9", "10.0.1.2", Protocol::Tcp, 91)));
    assert!(decide(&c, conn("10.0.2.9", "10.0.1.2", Protocol::Tcp, 100)));
    assert!(!decide(&c, conn("10.0.3.9", "10.0.1.2", Protocol::Tcp, 91)));
    assert!(decide(&c, conn("10.0.3.9", "10.0.1.2", Protocol::Tcp, 90)));
}

#[test]
fn merge_joins_overlapping_and_adjacent_ranges() {
    assert_eq!(merge(vec![(5u128, 9u128), (1, 3), (4, 4), (20, 30), (25, 26)]), vec![(1, 9), (20, 30)]);
    assert_eq!(merge(vec![(0u128, u128::MAX), (7, 9)]), vec![(0, u128::MAX)]);
    assert_eq!(Fam::V4.addr(0x0a000102).to_string(), "10.0.1.2");
}

// ---- golden text ----

#[test]
fn golden_render_of_a_small_node() {
    let mut c = e2e_cluster();
    let from_y = Rule {
        peers: vec![pods_peer(None, Some(Selector::labels([("team", "blue")])))],
        ports: vec![named("TCP", "http")],
    };
    let to_dns = Rule {
        peers: vec![block("10.0.0.0/16", &["10.0.2.0/24"])],
        ports: vec![PolicyPort::new(Some("UDP"), Some(PortRef::Number(53)), None).unwrap()],
    };
    c.policies = vec![
        policy("x", "web", Selector::labels([("pod", "a")]), &["Ingress", "Egress"], vec![from_y], vec![to_dns]),
        policy("x", "deny", Selector::default(), &["Ingress"], vec![], vec![]),
    ];
    let text = render(&compile(&c, "n1"));
    let want = "\
table inet weft-netpol
delete table inet weft-netpol
table inet weft-netpol {
\tcomment \"weft NetworkPolicy rules for node n1\"
\tmap out-pods4 {
\t\ttype ipv4_addr : verdict
\t\telements = { 10.0.1.2 : jump out-0 }
\t}
\tmap out-pods6 {
\t\ttype ipv6_addr : verdict
\t\telements = { fd00:1::2 : jump out-0 }
\t}
\tset out-0-ports4 {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\tflags interval
\t\telements = { 10.0.0.0-10.0.1.255 . udp . 53, 10.0.3.0-10.0.255.255 . udp . 53 }
\t}
\tchain out-0 {
\t\tip daddr . meta l4proto . th dport @out-0-ports4 return
\t\tdrop
\t}
\tmap in-pods4 {
\t\ttype ipv4_addr : verdict
\t\telements = { 10.0.1.2 : jump in-0, 10.0.1.3 : jump in-1 }
\t}
\tmap in-pods6 {
\t\ttype ipv6_addr : verdict
\t\telements = { fd00:1::2 : jump in-0, fd00:1::3 : jump in-1 }
\t}
\tset in-0-ports4 {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\tflags interval
\t\telements = { 10.0.2.2-10.0.2.3 . tcp . 80 }
\t}
\tset in-0-ports6 {
\t\ttype ipv6_addr . inet_proto . inet_service
\t\tflags interval
\t\telements = { fd00:2::2-fd00:2::3 . tcp . 80 }
\t}
\tchain in-0 {
\t\tip saddr . meta l4proto . th dport @in-0-ports4 return
\t\tip6 saddr . meta l4proto . th dport @in-0-ports6 return
\t\tdrop
\t}
\tchain in-1 {
\t\tdrop
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state established,related accept
\t\ticmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } accept
\t\tfib saddr type local accept
\t\tip saddr vmap @out-pods4
\t\tip6 saddr vmap @out-pods6
\t\tip daddr vmap @in-pods4
\t\tip6 daddr vmap @in-pods6
\t}
}
";
    assert_eq!(text, want, "got:\n{text}");
    // Node n2 hosts no pod of x: an empty table.
    let n2 = render(&compile(&c, "n2"));
    assert!(!n2.contains("jump") && !n2.contains("set "), "{n2}");
}

#[test]
fn kernel_listing_reads_back_into_the_same_structure() {
    // What `nft -j list table inet weft-netpol` printed for the golden table (nft 1.0.6),
    // with prefixes where nft chose them.
    let mut c = e2e_cluster();
    let r = Rule { peers: vec![block("10.0.0.0/16", &["10.0.2.0/24"])], ports: vec![tcp(80)] };
    c.policies = vec![policy(
        "x",
        "p",
        Selector::labels([("pod", "a")]),
        &["Ingress"],
        vec![r, Rule { peers: vec![block("fd00::/16", &[])], ports: vec![] }],
        vec![],
    )];
    let rs = compile(&c, "n1");
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
      {"table": {"family": "inet", "name": "weft-netpol", "handle": 2, "comment": "weft NetworkPolicy rules for node n1"}},
      {"map": {"family": "inet", "name": "out-pods4", "table": "weft-netpol", "type": "ipv4_addr", "handle": 3, "map": "verdict"}},
      {"map": {"family": "inet", "name": "out-pods6", "table": "weft-netpol", "type": "ipv6_addr", "handle": 4, "map": "verdict"}},
      {"map": {"family": "inet", "name": "in-pods4", "table": "weft-netpol", "type": "ipv4_addr", "handle": 5, "map": "verdict", "elem": [["10.0.1.2", {"jump": {"target": "in-0"}}]]}},
      {"map": {"family": "inet", "name": "in-pods6", "table": "weft-netpol", "type": "ipv6_addr", "handle": 6, "map": "verdict", "elem": [["fd00:1::2", {"jump": {"target": "in-0"}}]]}},
      {"set": {"family": "inet", "name": "in-0-all6", "table": "weft-netpol", "type": "ipv6_addr", "handle": 7, "flags": ["interval"], "elem": [{"prefix": {"addr": "fd00::", "len": 16}}]}},
      {"set": {"family": "inet", "name": "in-0-ports4", "table": "weft-netpol", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 8, "flags": ["interval"],
        "elem": [{"concat": [{"range": ["10.0.3.0", "10.0.255.255"]}, "tcp", 80]}, {"concat": [{"range": ["10.0.0.0", "10.0.1.255"]}, "tcp", 80]}]}},
      {"chain": {"family": "inet", "table": "weft-netpol", "name": "forward", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
      {"chain": {"family": "inet", "table": "weft-netpol", "name": "in-0", "handle": 2}},
      {"rule": {"chain": "forward", "expr": [{"match": {}}, {"accept": null}]}},
      {"rule": {"chain": "forward", "expr": [{"match": {}}, {"accept": null}]}},
      {"rule": {"chain": "forward", "expr": [{"match": {}}, {"accept": null}]}},
      {"rule": {"chain": "forward", "expr": [{"vmap": {}}]}},
      {"rule": {"chain": "forward", "expr": [{"vmap": {}}]}},
      {"rule": {"chain": "forward", "expr": [{"vmap": {}}]}},
      {"rule": {"chain": "forward", "expr": [{"vmap": {}}]}},
      {"rule": {"chain": "in-0", "expr": [{"match": {}}, {"return": null}]}},
      {"rule": {"chain": "in-0", "expr": [{"match": {}}, {"return": null}]}},
      {"rule": {"chain": "in-0", "expr": [{"drop": null}]}}
    ]}"#;
    let k = KernelTable::parse(json).unwrap();
    assert_eq!(k.ruleset.ingress, rs.ingress);
    assert!(k.matches(&rs), "{k:?}\nvs\n{rs:?}");
    // Drift: a missing element, a rule gone, a different node's comment.
    assert!(
        !KernelTable::parse(&json.replace(r#", {"concat": [{"range": ["10.0.0.0", "10.0.1.255"]}, "tcp", 80]}"#, ""))
            .unwrap()
            .matches(&rs)
    );
    assert!(
        !KernelTable::parse(&json.replace(
            r#"{"rule": {"chain": "in-0", "expr": [{"drop": null}]}}"#,
            r#"{"rule": {"chain": "in-0", "expr": [{"accept": null}]}}"#
        ))
        .unwrap()
        .matches(&rs)
    );
    assert!(!KernelTable::parse(&json.replace("node n1", "node n2")).unwrap().matches(&rs));
    // Garbage is an error, not a panic.
    for bad in [
        "",
        "{}",
        "[1]",
        r#"{"nftables": [{"map": {"name": "zzz"}}]}"#,
        r#"{"nftables": [{"set": {"name": "in-0-all4", "elem": [{"prefix": {"addr": "10.0.0.0", "len": 99}}]}}]}"#,
    ] {
        assert!(KernelTable::parse(bad).is_err(), "{bad}");
    }
}

// ---- property: the compiled structure decides like the reference evaluator ----

fn arb_selector() -> impl Strategy<Value = Option<Selector>> {
    let label = prop::sample::select(vec![("app", "a"), ("app", "b"), ("tier", "web"), ("tier", "db")]);
    let req = (
        prop::sample::select(vec!["app", "tier", "team"]),
        prop::sample::select(vec![Operator::In, Operator::NotIn, Operator::Exists, Operator::DoesNotExist]),
        prop::sample::subsequence(vec!["a", "b", "web", "red"], 1..3),
    )
        .prop_map(|(k, op, vals)| {
            let vals = match op {
                Operator::In | Operator::NotIn => vals.into_iter().map(String::from).collect(),
                _ => vec![],
            };
            Requirement::new(k, op, vals).unwrap()
        });
    prop::option::weighted(
        0.8,
        (prop::collection::vec(label, 0..2), prop::collection::vec(req, 0..2)).prop_map(|(ls, rs)| Selector {
            match_labels: ls.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            match_expressions: rs,
        }),
    )
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    let blocks = prop::sample::select(vec![
        ("10.0.0.0/16", vec!["10.0.2.0/24"]),
        ("10.0.1.0/24", vec!["10.0.1.3/32", "10.0.1.4/31"]),
        ("10.0.2.2/32", vec![]),
        ("0.0.0.0/0", vec!["10.0.0.0/8"]),
        ("fd00::/16", vec!["fd00:2::/32"]),
        ("192.168.0.0/16", vec![]),
    ]);
    prop_oneof![
        (arb_selector(), arb_selector()).prop_filter_map("empty peer", |(p, n)| Peer::new(p, n, None).ok()),
        blocks.prop_map(|(c, e)| Peer::Block(
            IpBlock::parse(c, &e.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        )),
    ]
}

fn arb_port() -> impl Strategy<Value = PolicyPort> {
    let proto = prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]);
    let port = prop_oneof![
        Just(PortMatch::Any),
        prop::sample::select(vec![(53u16, 53u16), (80, 80), (80, 81), (81, 8080), (8080, 8080), (1, 65535)])
            .prop_map(|(a, b)| PortMatch::Range(a, b)),
        prop::sample::select(vec!["http", "dns", "metrics", "nope"]).prop_map(|n| PortMatch::Named(n.into())),
    ];
    (proto, port).prop_map(|(protocol, port)| PolicyPort { protocol, port })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (prop::collection::vec(arb_peer(), 0..3), prop::collection::vec(arb_port(), 0..3))
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(vec!["x", "y", "z"]),
        arb_selector().prop_map(Option::unwrap_or_default),
        prop::sample::subsequence(vec!["Ingress", "Egress"], 0..3),
        prop::collection::vec(arb_rule(), 0..3),
        prop::collection::vec(arb_rule(), 0..3),
    )
        .prop_map(|(ns, sel, types, i, e)| {
            let types: Vec<String> = types.into_iter().map(String::from).collect();
            Policy::new(ns, "p", sel, &types, i, e).unwrap()
        })
}

fn arb_pod(i: usize) -> impl Strategy<Value = Pod> {
    let labels = prop::sample::subsequence(vec![("app", "a"), ("app", "b"), ("tier", "web"), ("tier", "db")], 0..3);
    let ports = prop::sample::subsequence(
        vec![
            ContainerPort { name: Some("http".into()), port: 80, protocol: Protocol::Tcp },
            ContainerPort { name: Some("http".into()), port: 8080, protocol: Protocol::Sctp },
            ContainerPort { name: Some("dns".into()), port: 53, protocol: Protocol::Udp },
            ContainerPort { name: Some("metrics".into()), port: 81, protocol: Protocol::Tcp },
            ContainerPort { name: None, port: 82, protocol: Protocol::Tcp },
        ],
        0..4,
    );
    (prop::sample::select(vec!["x", "y", "z"]), labels, 1u8..3, any::<bool>(), ports, any::<bool>()).prop_map(
        move |(ns, labels, node, v6, mut ports, http8080)| {
            if http8080 {
                // The same name at another number on some pods.
                for p in ports.iter_mut().filter(|p| p.name.as_deref() == Some("http") && p.protocol == Protocol::Tcp) {
                    p.port = 8080;
                }
            }
            // Dedupe (name, protocol): names are unique per pod.
            let mut seen = BTreeSet::new();
            ports.retain(|p| seen.insert((p.name.clone(), p.protocol)) || p.name.is_none());
            let mut ips = vec![ip(&format!("10.0.{node}.{}", i + 2))];
            if v6 {
                ips.push(ip(&format!("fd00:{node}::{}", i + 2)));
            }
            Pod {
                namespace: ns.into(),
                name: format!("p{i}"),
                labels: labels.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ips,
                node: format!("n{node}"),
                ports,
            }
        },
    )
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    let pods = (1usize..7).prop_flat_map(|n| (0..n).map(arb_pod).collect::<Vec<_>>());
    let ns_labels = prop::collection::vec(prop::sample::subsequence(vec![("team", "red"), ("app", "a")], 0..3), 3);
    (pods, prop::collection::vec(arb_policy(), 0..4), ns_labels).prop_map(|(pods, policies, nsl)| {
        let mut c = Cluster { pods, policies, ..Default::default() };
        for (name, l) in ["x", "y", "z"].into_iter().zip(nsl) {
            let (k, v) = ns(name, &l);
            c.namespaces.insert(k, v);
        }
        c.node_addrs =
            [("n1".into(), vec![ip("10.0.1.1")]), ("n2".into(), vec![ip("10.0.2.1"), ip("fd00:2::1")])].into();
        c
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn compiled_structure_agrees_with_the_reference(c in arb_cluster()) {
        let rs = rulesets(&c);
        let mut ends: Vec<IpAddr> = c.pods.iter().flat_map(|p| p.ips.clone()).collect();
        ends.extend(c.node_addrs.values().flatten().copied());
        ends.extend(["10.0.2.200", "10.0.9.9", "192.168.3.3", "8.8.8.8", "fd00:2::99", "fd00:7::1", "2001:db8::1"].map(ip));
        for &src in &ends {
            for &dst in &ends {
                if src == dst || src.is_ipv4() != dst.is_ipv4() {
                    continue;
                }
                if let (Some(a), Some(b)) = (c.pod_by_ip(src), c.pod_by_ip(dst)) && a == b {
                    continue;
                }
                for proto in [Proto::L4(Protocol::Tcp), Proto::L4(Protocol::Udp), Proto::L4(Protocol::Sctp), Proto::Other(1)] {
                    for port in [53u16, 80, 81, 82, 8080, 9999] {
                        let k = Conn { src, dst, proto, port };
                        prop_assert_eq!(compiled_allowed(&c, &rs, &k), allowed(&c, &k), "{:?}", k);
                    }
                }
            }
        }
        // And the rendered text holds no overlapping elements and one chain per group.
        for r in rs.values() {
            let text = render(r);
            prop_assert_eq!(text.matches("\tchain ").count(), 1 + r.ingress.groups.len() + r.egress.groups.len());
        }
    }
}

proptest! {
    /// Whatever arrives from the API (or a hostile client of it), parsing never panics and
    /// what it accepts is within the API's bounds.
    #[test]
    fn hostile_values_never_panic(
        cidr in "[0-9a-fA-F:./ x-]{0,45}",
        except in prop::collection::vec("[0-9a-f:./]{0,45}", 0..3),
        op in ".{0,12}",
        proto in prop::option::of(".{0,6}"),
        port in prop::option::of(prop_oneof![any::<i64>().prop_map(PortRef::Number), ".{0,20}".prop_map(PortRef::Name)]),
        end in prop::option::of(any::<i64>()),
        listing in ".{0,200}",
    ) {
        if let Ok(b) = IpBlock::parse(&cidr, &except) {
            for e in &b.except {
                prop_assert!(b.cidr.contains(e) && e.prefix_len() > b.cidr.prefix_len());
            }
        }
        let _ = Operator::parse(&op);
        if let Ok(p) = PolicyPort::new(proto.as_deref(), port, end) {
            match p.port {
                PortMatch::Range(a, z) => prop_assert!(a >= 1 && a <= z),
                PortMatch::Named(n) => prop_assert!(valid_port_name(&n)),
                PortMatch::Any => {}
            }
        }
        let _ = KernelTable::parse(&listing);
        let _ = KernelTable::parse(&format!("{{\"nftables\": [{listing}]}}"));
    }
}
