//! The Kubernetes store against the test API server (`weft::apiserver`, TLS + token) in a LAN
//! namespace, with a real daemon in a host namespace: watch resumption after an API server
//! restart, a re-list after `410 Gone`, a node deleted while the daemon was down, a node
//! without a podCIDR (wait, not ready, then go on by itself), our node found through our pod,
//! and hostile nodes skipped. Kernel state is read with `ip -j`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cluster::Daemon;
use common::wait_for;
use serde_json::{Value, json};
use weft::apiserver::patch::PatchType;
use weft::apiserver::store::WriteOpts;
use weft::apiserver::{ApiServer, Options, resources};
use weft::lab::netns::{Lan, Netns, http_get, in_netns};

const API: &str = "192.0.2.1:6443";
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn start_server(lan: &Netns, dir: &Path) -> ApiServer {
    let opts = Options::new(API.parse().unwrap(), dir);
    in_netns(&lan.name, move || ApiServer::start(opts)).unwrap().unwrap()
}

fn nodes() -> &'static weft::apiserver::resources::Resource {
    resources::find("", "v1", "nodes").unwrap()
}

/// A peer node as flanneld leaves it (vxlan), with podCIDR 10.244.`i`.0/24.
fn peer(i: u8) -> Value {
    let p = "flannel.alpha.coreos.com";
    json!({
        "metadata": {"name": format!("p{i}"), "annotations": {
            format!("{p}/kube-subnet-manager"): "true",
            format!("{p}/backend-type"): "vxlan",
            format!("{p}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"0a:00:00:00:00:{i:02x}"}}"#),
            format!("{p}/public-ip"): format!("192.0.2.{}", 100 + u16::from(i)),
        }},
        "spec": {"podCIDR": format!("10.244.{i}.0/24"), "podCIDRs": [format!("10.244.{i}.0/24")]},
    })
}

fn create(srv: &ApiServer, node: Value) {
    srv.store().create(nodes(), "", node, WriteOpts::default()).unwrap();
}

fn delete(srv: &ApiServer, name: &str) {
    srv.store().delete(nodes(), "", name, None, false).unwrap();
}

/// Destinations of the routes in `ns` (`ip -j route`).
fn routes(ns: &Netns) -> Vec<String> {
    let out = ns.ip(&["-j", "route"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().iter().filter_map(|r| r["dst"].as_str().map(String::from)).collect()
}

fn wait_routes(ns: &Netns, present: &[u8], absent: &[u8], what: &str) {
    wait_for(Duration::from_secs(20), what, || {
        let r = routes(ns);
        let has = |i: &u8| r.contains(&format!("10.244.{i}.0/24"));
        (present.iter().all(has) && !absent.iter().any(has)).then_some(())
    });
}

struct World {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    lan: Lan,
    host: Netns,
}

fn world(tag: &str) -> World {
    let prefix = common::prefix(tag);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let lan = Lan::new(&prefix, "192.0.2").unwrap();
    let host = lan.add_host(1).unwrap();
    std::fs::write(dir.join("net-conf.json"), NET_CONF).unwrap();
    World { _tmp: tmp, dir, lan, host }
}

impl World {
    fn daemon(&self, env: &[(&str, &str)]) -> Daemon {
        let kc = format!("--kubeconfig-file={}", self.dir.join("api/kubeconfig").display());
        let nc = format!("--net-config-path={}", self.dir.join("net-conf.json").display());
        let sf = format!("--subnet-file={}", self.dir.join("subnet.env").display());
        let args = ["--kube-subnet-mgr", &kc, &nc, &sf, "--iface=eth0", "-healthz-port", "8081"];
        Daemon::start_with_env(&self.host, &self.dir, &args, env)
    }

    fn subnet_env(&self) -> String {
        let p = self.dir.join("subnet.env");
        wait_for(Duration::from_secs(20), "the subnet file", || std::fs::read_to_string(&p).ok())
    }

    fn block_api(&self, on: bool) {
        self.host.ip(&["route", if on { "add" } else { "del" }, "prohibit", "192.0.2.1/32"]).unwrap();
    }
}

#[test]
fn the_node_watch_resumes_after_restarts_relists_after_410_and_starts_from_the_truth() {
    let w = world("kre");
    let api_dir = w.dir.join("api");
    let mut srv = start_server(&w.lan.ns, &api_dir);
    create(&srv, json!({"metadata": {"name": "h1"}, "spec": {"podCIDR": "10.244.1.0/24"}}));
    create(&srv, peer(2));
    create(&srv, peer(3));
    let mut d = w.daemon(&[("NODE_NAME", "h1")]);
    assert!(w.subnet_env().contains("FLANNEL_SUBNET=10.244.1.1/24"));
    wait_routes(&w.host, &[2, 3], &[], "routes to both peers");

    // The API server restarts (every connection closed): the daemon stays up and resumes
    // its watch where it was; a node added afterwards arrives.
    srv.stop();
    std::thread::sleep(Duration::from_secs(1));
    assert!(d.alive(), "the daemon survives its API server going away:\n{}", d.log());
    srv = start_server(&w.lan.ns, &api_dir);
    std::thread::sleep(Duration::from_secs(7));
    create(&srv, peer(4));
    wait_routes(&w.host, &[2, 3, 4], &[], "the node added after the restart");
    assert!(!d.log().contains("410 Gone"), "resumed, not re-listed:\n{}", d.log());

    // Restarted again, and changed before the daemon is back: its resourceVersion is gone
    // (410), it lists again and sees the node deleted meanwhile go and the new one come.
    w.block_api(true);
    srv.stop();
    srv = start_server(&w.lan.ns, &api_dir);
    delete(&srv, "p2");
    create(&srv, peer(5));
    srv.compact();
    w.block_api(false);
    wait_routes(&w.host, &[3, 4, 5], &[2], "the re-list after 410");
    assert!(d.log().contains("410 Gone"), "{}", d.log());
    assert!(d.alive());

    // A node deleted while the daemon is down: its route goes when the daemon starts.
    drop(d);
    delete(&srv, "p3");
    let d = w.daemon(&[("NODE_NAME", "h1")]);
    wait_routes(&w.host, &[4, 5], &[3], "the stale route removed at start");
    assert!(w.subnet_env().contains("FLANNEL_SUBNET=10.244.1.1/24"), "the podCIDR is kept");
    wait_for(Duration::from_secs(10), "ready", || {
        http_get(&w.host.name, 8081, "/readyz").filter(|(c, _)| *c == 200).map(|_| ())
    });
    drop(d);
}

#[test]
fn a_node_without_pod_cidr_waits_then_goes_on_and_hostile_nodes_are_skipped() {
    let w = world("krf");
    let srv = start_server(&w.lan.ns, &w.dir.join("api"));
    create(&srv, json!({"metadata": {"name": "h1"}}));
    // Our node is found through our pod, as in the DaemonSet.
    let pods = resources::find("", "v1", "pods").unwrap();
    let pod = json!({"metadata": {"name": "weft-ds-abc", "namespace": "default"},
        "spec": {"nodeName": "h1", "containers": [{"name": "weft", "image": "weft"}]}});
    srv.store().create(pods, "default", pod, WriteOpts::default()).unwrap();
    // Hostile nodes beside one good peer.
    let p = "flannel.alpha.coreos.com";
    let mut bad = Vec::new();
    for (i, (k, v)) in [
        ("public-ip", json!("not-an-ip")),
        ("public-ip", json!("127.0.0.1")),
        ("backend-data", json!("{\"VNI\":")),
        ("backend-data", json!("{\"VNI\":1,\"VtepMAC\":\"ff:ff:ff:ff:ff:ff\"}")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut n = peer(10 + i as u8);
        n["metadata"]["annotations"][format!("{p}/{k}")] = v;
        bad.push(n);
    }
    let mut outside = peer(20);
    outside["spec"] = json!({"podCIDR": "10.99.0.0/24", "podCIDRs": ["10.99.0.0/24"]});
    bad.push(outside);
    let mut v6 = peer(21);
    v6["spec"] = json!({"podCIDR": "fd00::/64", "podCIDRs": ["fd00::/64"]});
    bad.push(v6);
    let mut three = peer(22);
    three["spec"]["podCIDRs"] = json!(["10.244.22.0/24", "fd00::/64", "10.244.23.0/24"]);
    bad.push(three);
    for n in bad {
        create(&srv, n);
    }
    create(&srv, peer(7));

    let mut d = w.daemon(&[("POD_NAME", "weft-ds-abc"), ("POD_NAMESPACE", "default")]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(d.alive(), "waiting is not crashing:\n{}", d.log());
    let (code, _) = http_get(&w.host.name, 8081, "/readyz").unwrap();
    assert_eq!(code, 503, "not ready without a podCIDR");
    let log = d.log();
    assert!(
        log.contains("node \"h1\" has no pod CIDR assigned")
            && log.contains("--allocate-node-cidrs=true")
            && log.contains("--cluster-cidr=10.244.0.0/16"),
        "says what to fix:\n{log}"
    );
    assert!(!w.dir.join("subnet.env").exists());

    // kube-controller-manager assigns it: the daemon goes on by itself.
    let cidr = json!({"spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}});
    srv.store().patch(nodes(), "", "h1", PatchType::Merge, &cidr, false, WriteOpts::default()).unwrap();
    assert!(w.subnet_env().contains("FLANNEL_SUBNET=10.244.1.1/24"));
    wait_routes(&w.host, &[7], &[], "the good peer");
    std::thread::sleep(Duration::from_secs(1));
    let r = routes(&w.host);
    for dst in
        ["10.244.10.0/24", "10.244.11.0/24", "10.244.12.0/24", "10.244.13.0/24", "10.99.0.0/24", "10.244.22.0/24"]
    {
        assert!(!r.contains(&dst.to_string()), "hostile node routed: {dst} in {r:?}");
    }
    assert!(d.alive());
    let log = d.log();
    for why in ["not an IPv4 address", "is not JSON", "has no IPv4 podCIDR", "at most one IPv4 and one IPv6"] {
        assert!(log.contains(why), "skip reason {why:?} logged:\n{log}");
    }
    // Our annotations were written, on the node found through the pod.
    let h1 = srv.store().get(nodes(), "", "h1").unwrap();
    assert_eq!(h1["metadata"]["annotations"][format!("{p}/public-ip")], "192.0.2.11");
    assert_eq!(h1["metadata"]["annotations"][format!("{p}/kube-subnet-manager")], "true");

    // Someone changes our annotations: they are put back.
    let edit = json!({"metadata": {"annotations": {format!("{p}/public-ip"): "6.6.6.6"}}});
    srv.store().patch(nodes(), "", "h1", PatchType::Merge, &edit, false, WriteOpts::default()).unwrap();
    wait_for(Duration::from_secs(10), "our public-ip annotation restored", || {
        let h1 = srv.store().get(nodes(), "", "h1").unwrap();
        (h1["metadata"]["annotations"][format!("{p}/public-ip")] == "192.0.2.11").then_some(())
    });
    assert!(d.alive());
}

/// Without `--kube-api-url` or `--kubeconfig-file` the daemon uses the in-cluster
/// configuration, as in the DaemonSet: `KUBERNETES_SERVICE_HOST/PORT` and the service
/// account's token and CA under `/var/run/secrets/kubernetes.io/serviceaccount` (mounted, as
/// kubelet does, in a private mount namespace of the daemon's only, over a private `/run`).
/// Without them it stops with an error that says what to give.
#[test]
fn in_cluster_configuration_is_used_without_url_or_kubeconfig() {
    let w = world("kic");
    let api_dir = w.dir.join("api");
    let srv = start_server(&w.lan.ns, &api_dir);
    create(&srv, json!({"metadata": {"name": "h1"}, "spec": {"podCIDR": "10.244.1.0/24"}}));
    create(&srv, peer(2));
    let nc = format!("--net-config-path={}", w.dir.join("net-conf.json").display());
    let sf = format!("--subnet-file={}", w.dir.join("subnet.env").display());

    // Neither flags nor an in-cluster environment: a clear error, no subnet file.
    let mut lost = Daemon::start_with_env(&w.host, &w.dir, &["--kube-subnet-mgr", &nc, &sf, "--iface=eth0"], &[]);
    let status = lost.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(lost.log().contains("--kubeconfig-file"), "the error names what to give: {}", lost.log());
    assert!(!w.dir.join("subnet.env").exists());

    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs weft-test /run && mkdir -p {sa} && \
         cp {api}/token {sa}/token && cp {api}/ca.crt {sa}/ca.crt && echo default > {sa}/namespace && \
         exec {weft} daemon --kube-subnet-mgr {nc} {sf} --iface=eth0",
        api = api_dir.display(),
        weft = common::weft_bin(),
    );
    let log = w.dir.join("incluster.log");
    let err = std::fs::File::create(&log).unwrap();
    let mut child = w
        .host
        .command("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("KUBERNETES_SERVICE_HOST", "192.0.2.1")
        .env("KUBERNETES_SERVICE_PORT", "6443")
        .env("NODE_NAME", "h1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let env = w.subnet_env();
    assert!(env.contains("FLANNEL_SUBNET=10.244.1.1/24"), "{env}");
    wait_routes(&w.host, &[2], &[], "the route to the peer, learnt through the in-cluster client");
    let node = srv.store().get(nodes(), "", "h1").unwrap();
    assert_eq!(
        node["metadata"]["annotations"]["flannel.alpha.coreos.com/kube-subnet-manager"], "true",
        "our annotations were written with the service account's token: {node}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let host_view = std::fs::read(Path::new(sa).join("token")).ok();
    assert_ne!(host_view, std::fs::read(api_dir.join("token")).ok(), "the token was mounted for the daemon only");
}
