//! NetworkPolicy in a real kernel: a "node" namespace with the pods' bridge `cni0` (and
//! br_netfilter on, as flannel requires), pod namespaces on veths, an outside host routed
//! through the node; the compiled table applied with real `nft`, checked with
//! `nft -j list table`, and real TCP/UDP connections compared with the reference evaluator.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, TcpListener, UdpSocket};
use std::time::Duration;

use weft::lab::netns::{Netns, in_netns};
use weft::lab::probe;
use weft::netpol::PolicyTable;
use weft_core::netpol::compile::{Ruleset, compile, interpret};
use weft_core::netpol::eval::{Conn, Proto, allowed};
use weft_core::netpol::kernel::KernelTable;
use weft_core::netpol::model::*;

const NODE: &str = "n1";
const TCP_PORTS: [u16; 2] = [80, 8080];
const UDP_PORTS: [u16; 2] = [53, 81];
/// SCTP is probed on this port with a raw INIT packet: this kernel has SCTP in netfilter
/// and conntrack but no SCTP sockets, so a raw socket at the destination sees whether the
/// packet got through.
const SCTP_PORT: u16 = 80;

/// One pod (or the outside host): its namespace and addresses.
struct Member {
    ns: Netns,
    v4: IpAddr,
    v6: IpAddr,
}

struct World {
    node: Netns,
    members: BTreeMap<&'static str, Member>,
    cluster: Cluster,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// TCP and UDP responders of our own on every test port (no netcat): TCP answers "ok",
/// UDP echoes. Dual-stack sockets on `[::]`.
fn serve(ns: &str) {
    let (tcp, udp) = in_netns(ns, || {
        let tcp: Vec<TcpListener> =
            TCP_PORTS.iter().map(|p| TcpListener::bind(("::", *p)).expect("bind tcp")).collect();
        let udp: Vec<UdpSocket> = UDP_PORTS.iter().map(|p| UdpSocket::bind(("::", *p)).expect("bind udp")).collect();
        (tcp, udp)
    })
    .unwrap();
    for l in tcp {
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(b"ok");
            }
        });
    }
    for u in udp {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
    }
}

/// One real connection attempt from namespace `ns` to a pod in `dst_ns`, with the lab's
/// probes (2.5 s: generous on a loaded machine; a denied attempt is a dropped packet and
/// always takes the whole wait). SCTP: a raw INIT, watched for in `dst_ns` (this kernel has
/// SCTP in netfilter and conntrack but no SCTP sockets).
fn probe(ns: &str, dst_ns: &str, dst: IpAddr, proto: Protocol, port: u16) -> bool {
    let job = probe::Job { src: ns.into(), dst: dst_ns.into(), dst_ip: dst, proto, port };
    probe::run(&[job], Duration::from_millis(2500))[0]
}

fn sysctl(ns: &Netns, key: &str) {
    ns.exec("sysctl", &["-qw", &format!("{key}=1")]).unwrap_or_else(|e| panic!("sysctl {key} in {}: {e}", ns.name));
}

/// Builds the node, pods x/a x/b y/a z/a (all on node n1) and the outside host `ext`.
fn world(prefix: &str) -> World {
    let node = Netns::add(&format!("{prefix}node")).unwrap();
    for k in [
        "net.ipv4.ip_forward",
        "net.ipv6.conf.all.forwarding",
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    ] {
        sysctl(&node, k);
    }
    node.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
    node.ip(&["addr", "add", "10.77.1.1/24", "dev", "cni0"]).unwrap();
    node.ip(&["addr", "add", "fd77:1::1/64", "dev", "cni0", "nodad"]).unwrap();
    node.ip(&["link", "set", "cni0", "up"]).unwrap();
    let mut members = BTreeMap::new();
    let pods: [(&str, u8); 4] = [("x/a", 2), ("x/b", 3), ("y/a", 4), ("z/a", 5)];
    for (name, n) in pods {
        let ns = Netns::add(&format!("{prefix}{}", name.replace('/', ""))).unwrap();
        let port = format!("v{n}");
        // Both ends are created inside namespaces: nothing appears in the root namespace.
        ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &node.name]).unwrap();
        node.ip(&["link", "set", &port, "master", "cni0", "up"]).unwrap();
        ns.ip(&["addr", "add", &format!("10.77.1.{n}/24"), "dev", "eth0"]).unwrap();
        ns.ip(&["addr", "add", &format!("fd77:1::{n}/64"), "dev", "eth0", "nodad"]).unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        ns.ip(&["route", "add", "default", "via", "10.77.1.1"]).unwrap();
        ns.ip(&["-6", "route", "add", "default", "via", "fd77:1::1"]).unwrap();
        members.insert(name, Member { ns, v4: ip(&format!("10.77.1.{n}")), v6: ip(&format!("fd77:1::{n}")) });
    }
    let ext = Netns::add(&format!("{prefix}ext")).unwrap();
    ext.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1", "netns", &node.name]).unwrap();
    node.ip(&["addr", "add", "10.77.9.1/24", "dev", "eth1"]).unwrap();
    node.ip(&["addr", "add", "fd77:9::1/64", "dev", "eth1", "nodad"]).unwrap();
    node.ip(&["link", "set", "eth1", "up"]).unwrap();
    ext.ip(&["addr", "add", "10.77.9.2/24", "dev", "eth0"]).unwrap();
    ext.ip(&["addr", "add", "fd77:9::2/64", "dev", "eth0", "nodad"]).unwrap();
    ext.ip(&["link", "set", "eth0", "up"]).unwrap();
    ext.ip(&["route", "add", "10.77.1.0/24", "via", "10.77.9.1"]).unwrap();
    ext.ip(&["-6", "route", "add", "fd77:1::/64", "via", "fd77:9::1"]).unwrap();
    members.insert("ext", Member { ns: ext, v4: ip("10.77.9.2"), v6: ip("fd77:9::2") });
    for m in members.values() {
        serve(&m.ns.name);
    }

    // The model of the same world: x/a serves "web" on 80, x/b on 8080 (one name, two numbers).
    let mut cluster = Cluster::default();
    for (name, labels) in [("x", vec![("team", "red")]), ("y", vec![("team", "blue")]), ("z", vec![])] {
        let mut l: Labels = labels.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.insert("kubernetes.io/metadata.name".into(), name.into());
        cluster.namespaces.insert(name.into(), Namespace { name: name.into(), labels: l });
    }
    for (name, _) in pods {
        let (nsn, pn) = name.split_once('/').unwrap();
        let m = &members[name];
        let web = match name {
            "x/a" => 80,
            "x/b" => 8080,
            _ => 8080,
        };
        cluster.pods.push(Pod {
            namespace: nsn.into(),
            name: pn.into(),
            labels: [("pod".to_string(), pn.to_string())].into(),
            ips: vec![m.v4, m.v6],
            node: NODE.into(),
            ports: vec![
                ContainerPort { name: Some("web".into()), port: web, protocol: Protocol::Tcp },
                ContainerPort { name: Some("dns".into()), port: 53, protocol: Protocol::Udp },
            ],
        });
    }
    cluster.node_addrs =
        [(NODE.into(), vec![ip("10.77.1.1"), ip("fd77:1::1"), ip("10.77.9.1"), ip("fd77:9::1")])].into();
    World { node, members, cluster }
}

/// Runs `update` (or `remove` when `rs` is None) inside the node namespace.
fn apply(node: &Netns, table: PolicyTable, rs: Option<Ruleset>) -> (PolicyTable, bool) {
    in_netns(&node.name, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut table = table;
        let changed = rt.block_on(async {
            match &rs {
                Some(rs) => table.update(rs).await.unwrap_or_else(|e| panic!("nft transaction failed: {e}")),
                None => {
                    table.remove().await.unwrap_or_else(|e| panic!("removing the table failed: {e}"));
                    true
                }
            }
        });
        (table, changed)
    })
    .unwrap()
}

fn resync(node: &Netns, table: PolicyTable) -> (PolicyTable, bool) {
    in_netns(&node.name, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut table = table;
        let repaired = rt.block_on(table.resync()).unwrap_or_else(|e| panic!("resync failed: {e}"));
        (table, repaired)
    })
    .unwrap()
}

/// The table as the kernel holds it (`nft -j list table inet weft-netpol`).
fn kernel(node: &Netns) -> Option<KernelTable> {
    let json = node.exec("nft", &["-j", "list", "table", "inet", "weft-netpol"]).ok()?;
    Some(KernelTable::parse(&json).unwrap_or_else(|e| panic!("{e}: {json}")))
}

/// Probes every (client, destination, protocol, port, family) in parallel and compares the
/// real outcome with the reference evaluator and with the interpreter run on the kernel's
/// own table. Returns how many probes were allowed, and how many ran.
fn check_matrix(w: &World, case: &str, kernel_rs: &Ruleset) -> (usize, usize) {
    let node_addrs = w.cluster.node_addrs[NODE].clone();
    let mut probes = Vec::new();
    let clients: Vec<(&str, String, IpAddr, IpAddr)> = w
        .members
        .iter()
        .map(|(n, m)| (*n, m.ns.name.clone(), m.v4, m.v6))
        .chain([("node", w.node.name.clone(), ip("10.77.1.1"), ip("fd77:1::1"))])
        .collect();
    for (cname, cns, c4, c6) in &clients {
        for (dname, d) in &w.members {
            if cname == dname {
                continue;
            }
            for (src, dst) in [(*c4, d.v4), (*c6, d.v6)] {
                for (proto, port) in TCP_PORTS
                    .iter()
                    .map(|p| (Protocol::Tcp, *p))
                    .chain(UDP_PORTS.iter().map(|p| (Protocol::Udp, *p)))
                    .chain([(Protocol::Sctp, SCTP_PORT)])
                {
                    let k = Conn { src, dst, proto: Proto::L4(proto), port };
                    let want = allowed(&w.cluster, &k);
                    assert_eq!(
                        interpret(kernel_rs, &node_addrs, &k),
                        want,
                        "{case}: the kernel's table and the reference disagree on {cname}->{dname} {k:?}"
                    );
                    probes.push((
                        format!("{cname}->{dname} {proto:?}/{port} {dst}"),
                        cns.clone(),
                        d.ns.name.clone(),
                        k,
                        want,
                    ));
                }
            }
        }
    }
    let results: Vec<(String, bool, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .chunks(6)
            .map(|chunk| {
                s.spawn(move || {
                    let proto = |k: &Conn| match k.proto {
                        Proto::L4(p) => p,
                        Proto::Other(_) => unreachable!(),
                    };
                    chunk
                        .iter()
                        .map(|(label, ns, dst_ns, k, want)| {
                            let got = probe(ns, dst_ns, k.dst, proto(k), k.port);
                            (label.clone(), *want, got)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let wrong: Vec<String> = results
        .iter()
        .filter(|(_, want, got)| want != got)
        .map(|(l, want, got)| {
            format!(
                "{l}: expected {}, got {}",
                if *want { "allowed" } else { "denied" },
                if *got { "allowed" } else { "denied" }
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{case}: {} of {} probes differ:\n{}", wrong.len(), results.len(), wrong.join("\n"));
    (results.iter().filter(|r| r.2).count(), results.len())
}

fn pol(ns: &str, name: &str, sel: Selector, types: &[&str], ingress: Vec<Rule>, egress: Vec<Rule>) -> Policy {
    let types: Vec<String> = types.iter().map(|s| s.to_string()).collect();
    Policy::new(ns, name, sel, &types, ingress, egress).unwrap()
}

fn port(proto: &str, p: PortRef) -> PolicyPort {
    PolicyPort::new(Some(proto), Some(p), None).unwrap()
}

#[test]
fn policies_are_enforced_on_real_traffic() {
    let prefix = common::prefix("npo");
    let mut w = world(&prefix);
    let mut table = PolicyTable::new();

    // No policy: an empty table (no pod isolated), everything passes.
    let cases: Vec<(&str, Vec<Policy>)> = vec![
        ("no policy", vec![]),
        ("default-deny ingress in x", vec![pol("x", "deny", Selector::default(), &["Ingress"], vec![], vec![])]),
        (
            "x/a from namespace team=blue",
            vec![
                pol("x", "deny", Selector::default(), &["Ingress"], vec![], vec![]),
                pol(
                    "x",
                    "from-blue",
                    Selector::labels([("pod", "a")]),
                    &[],
                    vec![Rule {
                        peers: vec![Peer::new(None, Some(Selector::labels([("team", "blue")])), None).unwrap()],
                        ports: vec![],
                    }],
                    vec![],
                ),
            ],
        ),
        (
            "x accepts only its named port web (80 on x/a, 8080 on x/b), dns and SCTP 80",
            vec![pol(
                "x",
                "named",
                Selector::default(),
                &["Ingress"],
                vec![Rule {
                    peers: vec![],
                    ports: vec![
                        port("TCP", PortRef::Name("web".into())),
                        port("UDP", PortRef::Name("dns".into())),
                        port("SCTP", PortRef::Number(80)),
                    ],
                }],
                vec![],
            )],
        ),
        (
            "x/a egress to 10.77.0.0/16 except y/a, and fd77:9::/64",
            vec![pol(
                "x",
                "block",
                Selector::labels([("pod", "a")]),
                &["Egress"],
                vec![],
                vec![Rule {
                    peers: vec![
                        Peer::Block(IpBlock::parse("10.77.0.0/16", &["10.77.1.4/32".into()]).unwrap()),
                        Peer::Block(IpBlock::parse("fd77:9::/64", &[]).unwrap()),
                    ],
                    ports: vec![],
                }],
            )],
        ),
        (
            "z denies egress except UDP 53 (DNS-like), y denies all ingress",
            vec![
                pol(
                    "z",
                    "dns-only",
                    Selector::default(),
                    &["Egress"],
                    vec![],
                    vec![Rule {
                        peers: vec![],
                        ports: vec![PolicyPort::new(Some("UDP"), Some(PortRef::Number(53)), None).unwrap()],
                    }],
                ),
                pol("y", "deny", Selector::default(), &["Ingress", "Egress"], vec![], vec![]),
            ],
        ),
    ];
    let mut allowed_counts = Vec::new();
    for (case, policies) in cases {
        w.cluster.policies = policies;
        let rs = compile(&w.cluster, NODE);
        let (t, changed) = apply(&w.node, table, Some(rs.clone()));
        table = t;
        assert!(changed, "{case}: a new ruleset must be written");
        let k = kernel(&w.node).unwrap_or_else(|| panic!("{case}: no table in the kernel"));
        assert!(k.matches(&rs), "{case}: the kernel holds\n{k:?}\nnot\n{rs:?}");
        assert_eq!(k.ruleset.ingress, rs.ingress);
        assert_eq!(k.ruleset.egress, rs.egress);
        allowed_counts.push((case, check_matrix(&w, case, &k.ruleset)));
    }
    // The cases are not vacuous: the first allows everything, the others deny some.
    assert!(allowed_counts[0].1.0 == allowed_counts[0].1.1, "{allowed_counts:?}");
    assert!(allowed_counts[1..].iter().all(|(_, (n, total))| n < total && *n > 0), "{allowed_counts:?}");

    // Feature off: the table goes, and with it every policy rule.
    let (_t, _) = apply(&w.node, table, None);
    assert!(kernel(&w.node).is_none(), "the table is still there after remove");
    w.cluster.policies.clear();
    check_matrix(&w, "after removal", &Ruleset::default());
}

#[test]
fn transactions_only_on_change_and_drift_is_repaired() {
    let prefix = common::prefix("npp");
    let node = Netns::add(&format!("{prefix}node")).unwrap();
    let mut c = Cluster::default();
    let pod = |ns: &str, name: &str, ip4: &str, node: &str| Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), name.to_string())].into(),
        ips: vec![ip(ip4)],
        node: node.into(),
        ports: vec![],
    };
    c.pods =
        vec![pod("x", "a", "10.88.1.2", NODE), pod("x", "b", "10.88.1.3", NODE), pod("w", "far", "10.88.2.2", "n2")];
    c.policies = vec![pol(
        "x",
        "from-x",
        Selector::default(),
        &["Ingress"],
        vec![Rule { peers: vec![Peer::new(Some(Selector::default()), None, None).unwrap()], ports: vec![] }],
        vec![],
    )];
    let rs = compile(&c, NODE);
    let (table, changed) = apply(&node, PolicyTable::new(), Some(rs.clone()));
    assert!(changed);
    assert_eq!(table.transactions(), 1);
    // The same ruleset again: no transaction.
    let (table, changed) = apply(&node, table, Some(rs.clone()));
    assert!(!changed && table.transactions() == 1);
    // A change elsewhere (a pod on another node, in a namespace no local policy looks at,
    // changes its labels): this node's ruleset is the same, so no transaction.
    c.pods[2].labels.insert("tier".into(), "db".into());
    let rs2 = compile(&c, NODE);
    assert_eq!(rs2, rs);
    let (table, changed) = apply(&node, table, Some(rs2));
    assert!(!changed && table.transactions() == 1);
    // A fresh manager (a restarted daemon) finds the right table and writes nothing.
    let (fresh, changed) = apply(&node, PolicyTable::new(), Some(rs.clone()));
    assert!(!changed && fresh.transactions() == 0);
    // A new pod in x changes the peer set: one transaction, and the kernel has the new element.
    c.pods.push(pod("x", "c", "10.88.1.4", "n3"));
    let rs3 = compile(&c, NODE);
    let (table, changed) = apply(&node, table, Some(rs3.clone()));
    assert!(changed && table.transactions() == 2);
    let k = kernel(&node).unwrap();
    assert!(k.matches(&rs3));
    let probe = Conn { src: ip("10.88.1.4"), dst: ip("10.88.1.2"), proto: Proto::L4(Protocol::Tcp), port: 80 };
    assert!(interpret(&k.ruleset, &[], &probe) && allowed(&c, &probe));

    // Drift: someone deletes an element, then a whole chain's rules; resync repairs both.
    node.exec("nft", &["delete", "element", "inet", "weft-netpol", "in-0-all4", "{ 10.88.1.2-10.88.1.4 }"]).unwrap();
    assert!(!kernel(&node).unwrap().matches(&rs3), "the deletion must be visible");
    let (table, repaired) = resync(&node, table);
    assert!(repaired, "an element deleted behind our back is restored");
    assert!(kernel(&node).unwrap().matches(&rs3));
    node.exec("nft", &["flush", "chain", "inet", "weft-netpol", "forward"]).unwrap();
    let (table, repaired) = resync(&node, table);
    assert!(repaired && kernel(&node).unwrap().matches(&rs3));
    node.exec("nft", &["delete", "table", "inet", "weft-netpol"]).unwrap();
    let (table, repaired) = resync(&node, table);
    assert!(repaired && kernel(&node).unwrap().matches(&rs3));
    let (table, repaired) = resync(&node, table);
    assert!(!repaired, "nothing to repair");
    assert_eq!(table.transactions(), 5);

    // Other tables are never touched: one of someone else's survives every transaction and removal.
    node.exec("nft", &["add", "table", "inet", "someone-else"]).unwrap();
    let (table, _) = apply(&node, table, Some(compile(&Cluster::default(), NODE)));
    let (_table, _) = apply(&node, table, None);
    assert!(kernel(&node).is_none());
    node.exec("nft", &["list", "table", "inet", "someone-else"]).expect("another program's table survives");
    // Removing an absent table is not an error.
    let (_t, _) = apply(&node, PolicyTable::new(), None);
}
