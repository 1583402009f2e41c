//! A mixed cluster during a migration: host h1 runs weft (`--kube-subnet-mgr`, vxlan); host h2
//! is a flannel node: its node annotations are written as flanneld writes them and its data
//! plane is set up as flanneld sets it up (`flannel.1`, the peer's neighbour, FDB entry and
//! onlink route, with `ip`/`bridge`) from h1's annotations. Pods reach each other both ways.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cluster::Daemon;
use common::wait_for;
use serde_json::{Value, json};
use weft::apiserver::patch::PatchType;
use weft::apiserver::store::WriteOpts;
use weft::apiserver::{ApiServer, Options, resources};
use weft::lab::netns::{Lan, Netns, in_netns};

const P: &str = "flannel.alpha.coreos.com";
const FLANNEL_MAC: &str = "12:c6:65:89:b4:e3";

fn start_server(lan: &Netns, dir: &Path) -> ApiServer {
    let opts = Options::new("192.0.2.1:6443".parse().unwrap(), dir);
    in_netns(&lan.name, move || ApiServer::start(opts)).unwrap().unwrap()
}

/// A pod on `host`: a namespace with `eth0` = `ip`/24 on the host's `cni0` bridge (`gw`).
fn pod(host: &Netns, name: &str, ip: &str, gw: &str) -> Netns {
    common::cni_bridge(host, &format!("{gw}/24"));
    let p = Netns::add(name).unwrap();
    host.ip(&["link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns", &p.name]).unwrap();
    host.ip(&["link", "set", "veth-pod", "master", "cni0", "up"]).unwrap();
    p.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]).unwrap();
    p.ip(&["link", "set", "eth0", "up"]).unwrap();
    p.ip(&["link", "set", "lo", "up"]).unwrap();
    p.ip(&["route", "add", "default", "via", gw]).unwrap();
    host.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    p
}

fn ping(from: &Netns, ip: &str) -> bool {
    from.exec("ping", &["-c", "1", "-W", "1", ip]).is_ok()
}

#[test]
fn weft_and_flannel_nodes_reach_each_other_over_vxlan() {
    let prefix = common::prefix("krg");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let (h1, h2) = (lan.add_host(1).unwrap(), lan.add_host(2).unwrap());
    let srv = start_server(&lan.ns, &dir.join("api"));
    let nodes = resources::find("", "v1", "nodes").unwrap();
    for (n, cidr) in [("h1", "10.244.1.0/24"), ("h2", "10.244.2.0/24")] {
        let node = json!({"metadata": {"name": n}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
        srv.store().create(nodes, "", node, WriteOpts::default()).unwrap();
    }

    // h2, the flannel node: flanneld's device and its annotations patch on nodes/status.
    h2.ip(&[
        "link",
        "add",
        "flannel.1",
        "address",
        FLANNEL_MAC,
        "mtu",
        "1450",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "192.0.2.12",
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])
    .unwrap();
    h2.ip(&["addr", "add", "10.244.2.0/32", "dev", "flannel.1"]).unwrap();
    h2.ip(&["link", "set", "flannel.1", "up"]).unwrap();
    let flanneld_patch = json!({"metadata": {"annotations": {
        format!("{P}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{FLANNEL_MAC}"}}"#),
        format!("{P}/backend-type"): "vxlan",
        format!("{P}/kube-subnet-manager"): "true",
        format!("{P}/public-ip"): "192.0.2.12",
    }}});
    srv.store().patch(nodes, "", "h2", PatchType::Strategic, &flanneld_patch, true, WriteOpts::default()).unwrap();
    let pod2 = pod(&h2, &format!("{prefix}p2"), "10.244.2.2", "10.244.2.1");

    // h1 runs weft.
    std::fs::write(dir.join("net-conf.json"), r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    let kc = format!("--kubeconfig-file={}", dir.join("api/kubeconfig").display());
    let nc = format!("--net-config-path={}", dir.join("net-conf.json").display());
    let sf = format!("--subnet-file={}", dir.join("h1.env").display());
    let d =
        Daemon::start_with_env(&h1, dir, &["--kube-subnet-mgr", &kc, &nc, &sf, "--iface=eth0"], &[("NODE_NAME", "h1")]);
    let pod1 = pod(&h1, &format!("{prefix}p1"), "10.244.1.2", "10.244.1.1");

    // h2 programs itself from h1's annotations, as flanneld does.
    let ann = wait_for(Duration::from_secs(20), "weft's annotations on h1", || {
        let n = srv.store().get(nodes, "", "h1").ok()?;
        let a = n["metadata"]["annotations"].clone();
        (a[format!("{P}/kube-subnet-manager")] == "true").then_some(a)
    });
    assert_eq!(ann[format!("{P}/backend-type")], "vxlan");
    assert_eq!(ann[format!("{P}/public-ip")], "192.0.2.11");
    let data: Value = serde_json::from_str(ann[format!("{P}/backend-data")].as_str().unwrap()).unwrap();
    assert_eq!(data["VNI"], 1);
    let mac1 = data["VtepMAC"].as_str().unwrap().to_string();
    h2.ip(&["neigh", "replace", "10.244.1.0", "lladdr", &mac1, "dev", "flannel.1", "nud", "permanent"]).unwrap();
    h2.exec("bridge", &["fdb", "append", &mac1, "dev", "flannel.1", "dst", "192.0.2.11", "self", "permanent"]).unwrap();
    h2.ip(&["route", "add", "10.244.1.0/24", "via", "10.244.1.0", "dev", "flannel.1", "onlink"]).unwrap();

    // weft on h1 followed the flannel node's annotations into the kernel.
    wait_for(Duration::from_secs(20), "weft's entries for the flannel node", || {
        let neigh: Value = serde_json::from_str(&h1.ip(&["-j", "neigh", "show", "dev", "flannel.1"]).ok()?).ok()?;
        let fdb: Value =
            serde_json::from_str(&h1.exec("bridge", &["-j", "fdb", "show", "dev", "flannel.1"]).ok()?).ok()?;
        let has_neigh = neigh.as_array()?.iter().any(|n| n["dst"] == "10.244.2.0" && n["lladdr"] == FLANNEL_MAC);
        let has_fdb = fdb.as_array()?.iter().any(|f| f["mac"] == FLANNEL_MAC && f["dst"] == "192.0.2.12");
        (has_neigh && has_fdb).then_some(())
    });
    wait_for(Duration::from_secs(20), "pods to reach each other both ways", || {
        (ping(&pod1, "10.244.2.2") && ping(&pod2, "10.244.1.2")).then_some(())
    });
    // And steadily: five in a row each way.
    for _ in 0..5 {
        assert!(ping(&pod1, "10.244.2.2"), "weft pod → flannel pod");
        assert!(ping(&pod2, "10.244.1.2"), "flannel pod → weft pod");
    }
    drop(d);
}
