//! NetworkPolicy compile and apply figures: for clusters of P pods and Q policies, the time
//! to compile one node's ruleset and render its nft text, the text's size and element
//! count, and the time of the `nft -f` transaction that loads it into a fresh network
//! namespace this program creates (then a no-op update, a one-pod change and the
//! `nft -j list` read-back a resync costs).
//!
//! `sudo cargo run --release --example netpol_bench [-- PODS,... POLICIES,...]`
//! (default: `10,1000,5000 100,1000`). Without root only the compile figures are printed.
//!
//! The synthetic cluster: 100 pods per node (the node measured is n0), 50 pods per
//! namespace, deployments of 10 replicas (label `app`), three tiers, named port `http` at
//! 80 or 8080 depending on the app; each policy picks an app at random and is one of
//! default-deny, pod-selector
//! ingress on a port, namespace-selector ingress on a named port, egress to an ipBlock with
//! except plus DNS, and pod+namespace-selector ingress on a port range.

#[path = "support/mod.rs"]
mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::Rng;
use weft::lab::netns::{Netns, in_netns};
use weft::netpol::PolicyTable;
use weft_core::netpol::compile::{Ruleset, compile};
use weft_core::netpol::model::*;
use weft_core::netpol::render::render;

fn cluster(pods: usize, policies: usize) -> Cluster {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let nodes = pods.div_ceil(100).max(1);
    let namespaces = (pods / 50).max(2);
    let apps = (pods / 10).max(2);
    let mut c = Cluster::default();
    for s in 0..namespaces {
        let name = format!("ns{s}");
        let labels: Labels =
            [("kubernetes.io/metadata.name".to_string(), name.clone()), ("team".to_string(), format!("t{}", s % 5))]
                .into();
        c.namespaces.insert(name.clone(), Namespace { name, labels });
    }
    let mut per_node = vec![0usize; nodes];
    for i in 0..pods {
        let node = rng.below(nodes);
        per_node[node] += 1;
        let app = i % apps;
        let ip: IpAddr = format!("10.{}.{}.{}", 200 + node / 256, node % 256, 1 + per_node[node]).parse().unwrap();
        c.pods.push(Pod {
            // A deployment lives in one namespace.
            namespace: format!("ns{}", app * 7919 % namespaces),
            name: format!("p{i}"),
            labels: [
                ("app".to_string(), format!("a{app}")),
                ("tier".to_string(), ["web", "api", "db"][i % 3].to_string()),
            ]
            .into(),
            ips: vec![ip],
            node: format!("n{node}"),
            ports: vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: if app.is_multiple_of(2) { 80 } else { 8080 },
                    protocol: Protocol::Tcp,
                },
                ContainerPort { name: Some("metrics".into()), port: 9090, protocol: Protocol::Tcp },
            ],
        });
    }
    let tcp = |p: i64, end: Option<i64>| PolicyPort::new(Some("TCP"), Some(PortRef::Number(p)), end).unwrap();
    for _ in 0..policies {
        // An app, and the policy in its namespace.
        let app = rng.below(apps);
        let ns = format!("ns{}", app * 7919 % namespaces);
        let app_sel = Selector::labels([("app", format!("a{app}").as_str())]);
        let team = format!("t{}", rng.below(5));
        let p = match rng.below(5) {
            0 => Policy::new(&ns, "deny", Selector::default(), &["Ingress".into()], vec![], vec![]),
            1 => {
                let from = Peer::new(Some(Selector::labels([("tier", "web")])), None, None).unwrap();
                Policy::new(
                    &ns,
                    "web",
                    app_sel,
                    &[],
                    vec![Rule { peers: vec![from], ports: vec![tcp(80, None)] }],
                    vec![],
                )
            }
            2 => {
                let from = Peer::new(None, Some(Selector::labels([("team", team.as_str())])), None).unwrap();
                let http = PolicyPort::new(None, Some(PortRef::Name("http".into())), None).unwrap();
                Policy::new(&ns, "team", app_sel, &[], vec![Rule { peers: vec![from], ports: vec![http] }], vec![])
            }
            3 => {
                let k = rng.below(nodes);
                let block = IpBlock::parse("10.0.0.0/8", &[format!("10.200.{k}.0/24")]).unwrap();
                let dns = PolicyPort::new(Some("UDP"), Some(PortRef::Number(53)), None).unwrap();
                let egress = vec![
                    Rule { peers: vec![Peer::Block(block)], ports: vec![tcp(443, None)] },
                    Rule { peers: vec![Peer::new(None, Some(Selector::default()), None).unwrap()], ports: vec![dns] },
                ];
                Policy::new(&ns, "egress", app_sel, &["Egress".into()], vec![], egress)
            }
            _ => {
                let from = Peer::new(
                    Some(Selector::labels([("tier", "api")])),
                    Some(Selector::labels([("team", team.as_str())])),
                    None,
                )
                .unwrap();
                let ports = vec![tcp(8000, Some(8100))];
                Policy::new(&ns, "range", app_sel, &[], vec![Rule { peers: vec![from], ports }], vec![])
            }
        };
        c.policies.push(p.unwrap());
    }
    c
}

fn elements(rs: &Ruleset) -> usize {
    [&rs.ingress, &rs.egress]
        .iter()
        .map(|d| {
            d.dispatch.len()
                + d.groups
                    .iter()
                    .map(|g| g.v4.all.len() + g.v4.ports.len() + g.v6.all.len() + g.v6.ports.len())
                    .sum::<usize>()
        })
        .sum()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Runs `f` with a tokio runtime inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    in_netns(ns, move || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f()))
        .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = |i: usize, d: &str| -> Vec<usize> {
        args.get(i).map(String::as_str).unwrap_or(d).split(',').map(|s| s.parse().expect("a number")).collect()
    };
    let (pod_counts, policy_counts) = (list(0, "10,1000,5000"), list(1, "100,1000"));
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let ns = root.then(|| Netns::add(&format!("wtnpbench{}", std::process::id())).expect("a namespace"));
    println!(
        "| pods | policies | local pods | compile ms | render ms | text KiB | elements | groups in/out | nft load ms | no-op update ms | one-pod change (compile+nft) ms | nft -j list ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &pods in &pod_counts {
        for &policies in &policy_counts {
            let mut c = cluster(pods, policies);
            let t = Instant::now();
            let rs = compile(&c, "n0");
            let compile_time = t.elapsed();
            let t = Instant::now();
            let text = render(&rs);
            let render_time = t.elapsed();
            let local = c.pods.iter().filter(|p| p.node == "n0").count();
            let mut row = format!(
                "| {pods} | {policies} | {local} | {} | {} | {:.0} | {} | {}/{} |",
                ms(compile_time),
                ms(render_time),
                text.len() as f64 / 1024.0,
                elements(&rs),
                rs.ingress.groups.len(),
                rs.egress.groups.len()
            );
            if let Some(ns) = &ns {
                // Start from an empty namespace each time: the load is a fresh table.
                let _ = ns.exec("nft", &["flush", "ruleset"]);
                let rs1 = rs.clone();
                let (load, noop, table) = in_ns(&ns.name, async move || {
                    let mut table = PolicyTable::new();
                    let t = Instant::now();
                    assert!(table.update(&rs1).await.expect("nft load"));
                    let load = t.elapsed();
                    let t = Instant::now();
                    assert!(!table.update(&rs1).await.expect("no-op"));
                    (load, t.elapsed(), table)
                });
                // One isolated local pod is replaced by a pod with a new address: a new
                // ruleset, one full transaction.
                if let Some(p) = c.pods.iter_mut().find(|p| p.ips.iter().any(|ip| rs.ingress.dispatch.contains_key(ip)))
                {
                    p.ips = vec!["10.250.0.1".parse().unwrap()];
                }
                let t = Instant::now();
                let rs2 = compile(&c, "n0");
                let recompile = t.elapsed();
                assert!(rs2 != rs, "the change must reach this node's ruleset");
                let (change, list) = in_ns(&ns.name, async move || {
                    let mut table = table;
                    let t = Instant::now();
                    table.update(&rs2).await.expect("nft update");
                    let change = recompile + t.elapsed();
                    let t = Instant::now();
                    let k = weft::netpol::read_kernel().await.expect("a table to list");
                    let list = t.elapsed();
                    assert!(k.matches(&rs2), "the kernel holds what was compiled");
                    (change, list)
                });
                row.push_str(&format!(" {} | {} | {} | {} |", ms(load), ms(noop), ms(change), ms(list)));
            } else {
                row.push_str(" - | - | - | - |");
            }
            println!("{row}");
        }
    }
}
