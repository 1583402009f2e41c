//! NetworkPolicy end to end: the real daemon (`weft daemon --kube-subnet-mgr
//! --network-policy`, vxlan) in a host namespace, following the test API server in a LAN
//! namespace that holds P pods (1 in 20 on the measured node, like a real cluster), their
//! namespaces and Q policies. Measured: the time from a change written to the API server to
//! the change visible in the kernel (`nft -j list map inet weft-netpol in-pods4` shows the
//! pod's address), for a new policy and for a pod label change; the daemon's own
//! compile+apply time (`weft_netpol_last_apply_seconds`); the size of the table's text; and
//! that a change to another node's pod costs no transaction here.
//!
//! `cargo build --release -p weft --bin weft --example netpol_e2e &&
//!  sudo target/release/examples/netpol_e2e [PODS,... POLICIES,...]` (default
//! `10,1000,5000 100,1000`; `WEFT_BIN` names another weft binary). Prints a table.

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Rng;
use weft::apiserver::patch::PatchType;
use weft::apiserver::store::WriteOpts;
use weft::apiserver::{ApiServer, Options, resources};
use weft::lab::netns::{Lan, Netns, in_netns};

fn res(plural: &str) -> &'static resources::Resource {
    match plural {
        "networkpolicies" => resources::find("networking.k8s.io", "v1", plural).unwrap(),
        _ => resources::find("", "v1", plural).unwrap(),
    }
}

struct LocalPod {
    namespace: String,
    name: String,
    ip: String,
}

/// Fills the API server: namespaces, pods (every 20th on h1), policies of five shapes.
fn populate(srv: &ApiServer, pods: usize, policies: usize) -> Vec<LocalPod> {
    let st = srv.store();
    let w = WriteOpts::default;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let namespaces = (pods / 50).max(2);
    let apps = (pods / 10).max(2);
    for s in 0..namespaces {
        let ns = json!({"metadata": {"name": format!("ns{s}"), "labels": {"team": format!("t{}", s % 5)}}});
        st.create(res("namespaces"), "", ns, w()).unwrap();
    }
    let mut local = Vec::new();
    let (mut nl, mut nr) = (0usize, 0usize);
    for i in 0..pods {
        let app = i % apps;
        let namespace = format!("ns{}", app * 7919 % namespaces);
        let name = format!("p{i}");
        let (node, ip) = if i.is_multiple_of(20) {
            nl += 1;
            ("h1".to_string(), format!("10.244.1.{}", 1 + nl))
        } else {
            nr += 1;
            (format!("n{}", i % 19), format!("10.245.{}.{}", nr / 250, 2 + nr % 250))
        };
        let port = if app.is_multiple_of(2) { 80 } else { 8080 };
        let tier = ["web", "api", "db"][i % 3];
        let obj = json!({"metadata": {"name": name, "namespace": namespace,
                "labels": {"app": format!("a{app}"), "tier": tier, "pod": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none",
                "ports": [{"name": "http", "containerPort": port}, {"name": "metrics", "containerPort": 9090}]}]}});
        st.create(res("pods"), &namespace, obj, w()).unwrap();
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        st.patch(res("pods"), &namespace, &name, PatchType::Merge, &status, true, w()).unwrap();
        if node == "h1" {
            local.push(LocalPod { namespace, name, ip });
        }
    }
    // Two local pods in a namespace of their own that no policy selects yet: the changes
    // measured select them.
    let ns = json!({"metadata": {"name": "bench"}});
    st.create(res("namespaces"), "", ns, w()).unwrap();
    for (name, ip) in [("bench-0", "10.244.1.252"), ("bench-1", "10.244.1.253")] {
        let obj = json!({"metadata": {"name": name, "namespace": "bench", "labels": {"pod": name}},
            "spec": {"nodeName": "h1", "containers": [{"name": "c", "image": "none"}]}});
        st.create(res("pods"), "bench", obj, w()).unwrap();
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        st.patch(res("pods"), "bench", name, PatchType::Merge, &status, true, w()).unwrap();
        local.push(LocalPod { namespace: "bench".into(), name: name.into(), ip: ip.into() });
    }
    for q in 0..policies {
        let app = rng.below(apps);
        let ns = format!("ns{}", app * 7919 % namespaces);
        let sel = json!({"matchLabels": {"app": format!("a{app}")}});
        let team = format!("t{}", rng.below(5));
        let spec = match rng.below(5) {
            0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
            1 => json!({"podSelector": sel, "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                        "ports": [{"port": 80}]}]}),
            2 => {
                json!({"podSelector": sel, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": team}}}],
                        "ports": [{"port": "http"}]}]})
            }
            3 => json!({"podSelector": sel, "policyTypes": ["Egress"], "egress": [
                        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.245.{}.0/24", rng.below(20))]}}],
                         "ports": [{"port": 443}]},
                        {"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}]}]}),
            _ => json!({"podSelector": sel, "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "api"}},
                        "namespaceSelector": {"matchLabels": {"team": team}}}], "ports": [{"port": 8000, "endPort": 8100}]}]}),
        };
        let obj = json!({"metadata": {"name": format!("np{q}"), "namespace": ns}, "spec": spec});
        st.create(res("networkpolicies"), &ns, obj, w()).unwrap();
    }
    local
}

/// The addresses in this node's ingress dispatch map (`None`: no table yet).
fn isolated(host: &Netns) -> Option<Vec<String>> {
    let out = host.exec("nft", &["-j", "list", "map", "inet", "weft-netpol", "in-pods4"]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    let items = v["nftables"].as_array()?.clone();
    Some(
        items
            .iter()
            .filter_map(|i| i.get("map"))
            .flat_map(|m| m["elem"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e[0].as_str().map(String::from))
            .collect(),
    )
}

fn metric(host: &Netns, name: &str) -> Option<f64> {
    let body = host.exec("curl", &["-s", "-m", "2", "http://127.0.0.1:8081/metrics"]).ok()?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// Polls every 2 ms until `f`, returning the time since `t0` (`None` after 120 s).
fn until(t0: Instant, mut f: impl FnMut() -> bool) -> Option<Duration> {
    while t0.elapsed() < Duration::from_secs(120) {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("timeout".into(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0))
}

fn case(weft: &Path, pods: usize, policies: usize) -> String {
    let prefix = format!("wtpdc{}-", std::process::id() % 100_000);
    weft::lab::netns::remove_prefixed("wtpdc");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let host = lan.add_host(1).unwrap();
    let opts = Options::new("192.0.2.1:6443".parse().unwrap(), dir.join("api"));
    let srv = in_netns(&lan.ns.name, move || ApiServer::start(opts)).unwrap().unwrap();
    let node = json!({"metadata": {"name": "h1"}, "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}});
    srv.store().create(res("nodes"), "", node, WriteOpts::default()).unwrap();
    let t = Instant::now();
    let local = populate(&srv, pods, policies);
    let fill = t.elapsed();
    std::fs::write(dir.join("net-conf.json"), r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let t0 = Instant::now();
    let mut child = host
        .command(weft.to_str().unwrap())
        .arg("daemon")
        .args(["--kube-subnet-mgr", "--network-policy", "--iface=eth0", "-healthz-port=8081"])
        .arg(format!("--kubeconfig-file={}", dir.join("api/kubeconfig").display()))
        .arg(format!("--net-config-path={}", dir.join("net-conf.json").display()))
        .arg(format!("--subnet-file={}", dir.join("subnet.env").display()))
        .env("NODE_NAME", "h1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let first = until(t0, || metric(&host, "weft_netpol_transactions_total").is_some_and(|n| n >= 1.0));
    let table_bytes = host.exec("nft", &["list", "table", "inet", "weft-netpol"]).map(|t| t.len()).unwrap_or(0);
    let first_apply = metric(&host, "weft_netpol_last_apply_seconds");
    let before = isolated(&host).unwrap_or_default();
    let mut open = local.iter().filter(|p| p.namespace == "bench" && !before.contains(&p.ip));
    let st = srv.store();

    // A new policy selecting one local pod that nothing isolated yet.
    let policy_latency = open.next().map(|p| {
        let obj = json!({"metadata": {"name": "bench-deny", "namespace": p.namespace},
            "spec": {"podSelector": {"matchLabels": {"pod": p.name}}, "policyTypes": ["Ingress"]}});
        let t = Instant::now();
        st.create(res("networkpolicies"), &p.namespace, obj, WriteOpts::default()).unwrap();
        until(t, || isolated(&host).is_some_and(|i| i.contains(&p.ip)))
    });
    let policy_apply = metric(&host, "weft_netpol_last_apply_seconds");
    // A label change that makes a policy select another local pod.
    let label_latency = open.next().map(|p| {
        let obj = json!({"metadata": {"name": "bench-label", "namespace": p.namespace},
            "spec": {"podSelector": {"matchLabels": {"bench": "deny"}}, "policyTypes": ["Ingress"]}});
        st.create(res("networkpolicies"), &p.namespace, obj, WriteOpts::default()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let patch = json!({"metadata": {"labels": {"bench": "deny"}}});
        let t = Instant::now();
        st.patch(res("pods"), &p.namespace, &p.name, PatchType::Merge, &patch, false, WriteOpts::default()).unwrap();
        until(t, || isolated(&host).is_some_and(|i| i.contains(&p.ip)))
    });
    // Another node's pod relabelled: no transaction here.
    std::thread::sleep(Duration::from_millis(500));
    let tx = metric(&host, "weft_netpol_transactions_total");
    let patch = json!({"metadata": {"labels": {"bench": "deny", "app": "moved"}}});
    let remote_ns = format!("ns{}", (1 % (pods / 10).max(2)) * 7919 % (pods / 50).max(2));
    if pods > 1 {
        let _ = st.patch(res("pods"), &remote_ns, "p1", PatchType::Merge, &patch, false, WriteOpts::default());
    }
    std::thread::sleep(Duration::from_secs(1));
    let remote_tx = match (tx, metric(&host, "weft_netpol_transactions_total")) {
        (Some(a), Some(b)) => format!("{}", b - a),
        _ => "?".into(),
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = host.exec("nft", &["delete", "table", "inet", "weft-netpol"]);
    srv.stop();
    let secs = |v: Option<f64>| v.map_or("-".into(), |s| format!("{:.0}", s * 1000.0));
    format!(
        "| {pods} | {policies} | {} | {:.1} | {} | {} | {:.0} | {} | {} | {} | {} |",
        local.len() - 2,
        fill.as_secs_f64(),
        ms(first),
        secs(first_apply),
        table_bytes as f64 / 1024.0,
        policy_latency.map_or("-".into(), ms),
        secs(policy_apply),
        label_latency.map_or("-".into(), ms),
        remote_tx,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let list = |i: usize, d: &str| -> Vec<usize> {
        args.get(i).map(String::as_str).unwrap_or(d).split(',').map(|s| s.parse().expect("a number")).collect()
    };
    let (pod_counts, policy_counts) = (list(0, "10,1000,5000"), list(1, "100,1000"));
    // SAFETY: geteuid has no preconditions and touches no memory.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root: the daemon runs in network namespaces");
    let weft = std::env::var_os("WEFT_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(Path::parent).unwrap().join("weft")
    });
    assert!(weft.exists(), "no weft binary at {} (build it, or set WEFT_BIN)", weft.display());
    println!(
        "| pods | policies | local pods | API fill s | start → first table ms | first compile+apply ms | table KiB | new policy → kernel ms | its compile+apply ms | pod label → kernel ms | remote change transactions |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &pods in &pod_counts {
        for &policies in &policy_counts {
            println!("{}", case(&weft, pods, policies));
        }
    }
}
