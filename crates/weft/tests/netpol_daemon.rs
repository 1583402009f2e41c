//! NetworkPolicy through the daemon: two kube-mode vxlan daemons (`--network-policy`) follow
//! the test API server; pods are namespaces on each host's `cni0` bridge with their Pod
//! objects in the API server; policies and labels are changed with `kubectl`. Checked with
//! real TCP connections (cross-host and same-host) and `nft -j list table inet weft-netpol`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::cluster::Daemon;
use common::wait_for;
use serde_json::{Value, json};
use weft::apiserver::patch::PatchType;
use weft::apiserver::store::WriteOpts;
use weft::apiserver::{ApiServer, Options, resources};
use weft::lab::netns::{Lan, Netns, in_netns};

const API: &str = "192.0.2.1:6443";
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// How long a change may take to reach the kernel (generous: the machine is shared).
const CHANGE: Duration = Duration::from_secs(30);

fn start_server(lan: &Netns, dir: &Path) -> ApiServer {
    let opts = Options::new(API.parse().unwrap(), dir);
    in_netns(&lan.name, move || ApiServer::start(opts)).unwrap().unwrap()
}

fn res(plural: &str) -> &'static resources::Resource {
    match plural {
        "networkpolicies" => resources::find("networking.k8s.io", "v1", plural).unwrap(),
        _ => resources::find("", "v1", plural).unwrap(),
    }
}

/// A TCP responder of our own on port 80 in `ns` ("ok" to every connection).
fn serve(ns: &Netns) {
    let l = in_netns(&ns.name, || TcpListener::bind(("0.0.0.0", 80)).expect("bind")).unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"ok");
        }
    });
}

/// One TCP connection from `from` to `ip`:80 (2 s; a dropped SYN takes all of it).
fn connects(from: &Netns, ip: &str) -> bool {
    let to: SocketAddr = format!("{ip}:80").parse().unwrap();
    in_netns(&from.name, move || {
        let wait = Duration::from_secs(2);
        TcpStream::connect_timeout(&to, wait)
            .and_then(|mut s| {
                s.set_read_timeout(Some(wait))?;
                let mut b = [0u8; 2];
                s.read_exact(&mut b)?;
                Ok(&b == b"ok")
            })
            .unwrap_or(false)
    })
    .unwrap()
}

struct Pod {
    ns: Netns,
    ip: &'static str,
}

struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    lan: Lan,
    hosts: Vec<Netns>,
    srv: Option<ApiServer>,
}

impl World {
    fn new(tag: &str) -> World {
        let prefix = common::prefix(tag);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let lan = Lan::new(&prefix, "192.0.2").unwrap();
        let hosts: Vec<Netns> = (1..=2).map(|i| lan.add_host(i).unwrap()).collect();
        std::fs::write(dir.join("net-conf.json"), NET_CONF).unwrap();
        let srv = start_server(&lan.ns, &dir.join("api"));
        for (n, cidr) in [("h1", "10.244.1.0/24"), ("h2", "10.244.2.0/24")] {
            let node = json!({"metadata": {"name": n}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
            srv.store().create(res("nodes"), "", node, WriteOpts::default()).unwrap();
        }
        World { _tmp: tmp, dir, lan, hosts, srv: Some(srv) }
    }

    fn srv(&self) -> &ApiServer {
        self.srv.as_ref().expect("the API server runs")
    }

    fn kube_args(&self, i: usize) -> Vec<String> {
        vec![
            "--kube-subnet-mgr".into(),
            format!("--kubeconfig-file={}", self.dir.join("api/kubeconfig").display()),
            format!("--net-config-path={}", self.dir.join("net-conf.json").display()),
            format!("--subnet-file={}", self.dir.join(format!("h{}.env", i + 1)).display()),
            "--iface=eth0".into(),
            "-healthz-port=8081".into(),
        ]
    }

    fn daemon(&self, i: usize, extra: &[&str]) -> Daemon {
        let mut args = self.kube_args(i);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let node = format!("h{}", i + 1);
        Daemon::start_with_env(&self.hosts[i], &self.dir, &args, &[("NODE_NAME", &node)])
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let o = self.kubectl_raw(args, stdin);
        assert!(o.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        o
    }

    fn kubectl_try(&self, args: &[&str]) -> Output {
        self.kubectl_raw(args, None)
    }

    fn kubectl_raw(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = self.lan.ns.command("kubectl");
        c.arg("--kubeconfig").arg(self.dir.join("api/kubeconfig")).arg("--cache-dir").arg(self.dir.join("kcache"));
        c.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            let mut input = input;
            input.write_all(s.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Creates a policy (`kubectl create -f -`), or replaces the spec of an existing one
    /// (`kubectl patch --type=merge`: arrays are replaced whole).
    fn apply(&self, obj: &Value) {
        let (ns, name) = (obj["metadata"]["namespace"].as_str().unwrap(), obj["metadata"]["name"].as_str().unwrap());
        let exists = self.kubectl_try(&["get", "networkpolicy", name, "-n", ns]).status.success();
        if exists {
            let patch = json!({"spec": obj["spec"]}).to_string();
            self.kubectl(&["patch", "networkpolicy", name, "-n", ns, "--type=merge", "-p", &patch], None);
        } else {
            self.kubectl(&["create", "-f", "-"], Some(&obj.to_string()));
        }
    }

    fn namespace(&self, name: &str, labels: Value) {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
        self.kubectl(&["create", "-f", "-"], Some(&ns.to_string()));
    }

    /// A pod on host `i`: a namespace with `eth0` on the host's `cni0`, and its Pod object
    /// (running, with its IP and a named container port), answering on port 80.
    fn pod(&self, i: usize, namespace: &str, name: &str, app: &str, ip: &'static str) -> Pod {
        let host = &self.hosts[i];
        let gw = format!("10.244.{}.1", i + 1);
        common::cni_bridge(host, &format!("{gw}/24"));
        let ns = Netns::add(&format!("{}{name}", host.name)).unwrap();
        let veth = format!("v{name}");
        host.ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]).unwrap();
        host.ip(&["link", "set", &veth, "master", "cni0", "up"]).unwrap();
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]).unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        ns.ip(&["link", "set", "lo", "up"]).unwrap();
        ns.ip(&["route", "add", "default", "via", &gw]).unwrap();
        host.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
        serve(&ns);
        let obj = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"nodeName": format!("h{}", i + 1),
                     "containers": [{"name": "c", "image": "none", "ports": [{"name": "http", "containerPort": 80}]}]}});
        let st = self.srv().store();
        st.create(res("pods"), namespace, obj, WriteOpts::default()).unwrap();
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        st.patch(res("pods"), namespace, name, PatchType::Merge, &status, true, WriteOpts::default()).unwrap();
        Pod { ns, ip }
    }

    fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let body = self.hosts[i].exec("curl", &["-s", "-m", "2", "http://127.0.0.1:8081/metrics"]).unwrap_or_default();
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
    }

    /// `nft -j list table inet weft-netpol` on host `i`; `None` when there is no table.
    fn table(&self, i: usize) -> Option<Value> {
        let out = self.hosts[i].exec("nft", &["-j", "list", "table", "inet", "weft-netpol"]).ok()?;
        serde_json::from_str(&out).ok()
    }
}

/// The keys of map `name` in a `nft -j` table listing.
fn map_keys(t: &Value, name: &str) -> Vec<String> {
    let items = t["nftables"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .filter_map(|i| i.get("map"))
        .filter(|m| m["name"] == name)
        .flat_map(|m| m["elem"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e[0].as_str().map(String::from))
        .collect()
}

/// Waits until every (from, to, allowed) holds, checking all each round.
fn expect(what: &str, cases: &[(&Pod, &Pod, bool)]) {
    let mut last = Vec::new();
    let ok = (0..15).any(|_| {
        last = cases
            .iter()
            .filter(|(f, t, want)| connects(&f.ns, t.ip) != *want)
            .map(|(f, t, w)| (f.ip, t.ip, *w))
            .collect();
        if !last.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
        last.is_empty()
    });
    assert!(ok, "{what}: these (from, to, expected allowed) differ: {last:?}");
}

fn policy(ns: &str, name: &str, selector: Value, ingress: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": ingress}})
}

#[test]
fn policies_labels_and_faults_through_the_api_server_reach_the_kernel() {
    let mut w = World::new("pda");
    w.namespace("x", json!({"team": "blue"}));
    w.namespace("y", json!({"team": "green"}));
    // A resync every second: the full check (every 12th) comes within the test's patience.
    let mut d1 = w.daemon(0, &["--network-policy", "--iptables-resync=1"]);
    let mut d2 = w.daemon(1, &["--network-policy", "--iptables-resync=1"]);
    let a = w.pod(0, "x", "a", "a", "10.244.1.2");
    let b = w.pod(0, "x", "b", "b", "10.244.1.3");
    let c = w.pod(1, "x", "c", "c", "10.244.2.2");
    let d = w.pod(1, "y", "d", "d", "10.244.2.3");
    wait_for(CHANGE, "both subnet files", || {
        (w.dir.join("h1.env").exists() && w.dir.join("h2.env").exists()).then_some(())
    });

    // No policy: everything connects; the table is there, dispatching nothing.
    expect("no policy", &[(&c, &a, true), (&b, &a, true), (&a, &c, true), (&d, &b, true)]);
    let t = w.table(0).expect("the policy table on h1");
    assert!(map_keys(&t, "in-pods4").is_empty(), "{t}");

    // Default-deny ingress for x/a: cross-host and same-host connections to it fail; a's own
    // connections out (and their replies) pass; b is not selected.
    w.apply(&policy("x", "deny-a", json!({"matchLabels": {"app": "a"}}), json!([])));
    expect("deny-a", &[(&c, &a, false), (&b, &a, false), (&d, &a, false), (&a, &c, true), (&c, &b, true)]);
    let t = w.table(0).unwrap();
    assert_eq!(map_keys(&t, "in-pods4"), ["10.244.1.2"], "{t}");

    // A policy update: ingress from app=c only (a named port, resolved on a's container).
    let from_c = json!([{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}], "ports": [{"port": "http"}]}]);
    w.apply(&policy("x", "deny-a", json!({"matchLabels": {"app": "a"}}), from_c));
    expect("from app=c", &[(&c, &a, true), (&b, &a, false), (&d, &a, false)]);

    // A pod label change: b becomes app=c.
    w.kubectl(&["label", "pod", "b", "-n", "x", "app=c", "--overwrite"], None);
    expect("b relabelled", &[(&b, &a, true), (&d, &a, false)]);

    // A namespace label change: a second policy admits namespaces with team=red.
    let from_red = json!([{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]);
    w.apply(&policy("x", "from-red", json!({"matchLabels": {"app": "a"}}), from_red));
    expect("y is green", &[(&d, &a, false)]);
    w.kubectl(&["label", "namespace", "y", "team=red", "--overwrite"], None);
    expect("y is red", &[(&d, &a, true), (&c, &a, true)]);

    // A change that selects only h2's pods: enforced there, no transaction on h1.
    let before = w.metric(0, "weft_netpol_transactions_total").expect("h1's transaction counter");
    w.apply(&policy("y", "deny-d", json!({"matchLabels": {"app": "d"}}), json!([])));
    expect("deny-d on h2", &[(&a, &d, false), (&c, &d, false)]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.metric(0, "weft_netpol_transactions_total"), Some(before), "h1 ran a transaction for h2's pods");
    assert!(w.metric(1, "weft_netpol_transactions_total").unwrap() >= 2.0);
    assert_eq!(w.metric(0, "weft_netpol_policies"), Some(3.0));
    // What `weft doctor` reads to know that a missing table is a problem here.
    assert_eq!(w.metric(0, "weft_netpol_enabled"), Some(1.0));

    // Drift: the table deleted by hand is repaired within seconds.
    w.hosts[0].exec("nft", &["delete", "table", "inet", "weft-netpol"]).unwrap();
    wait_for(CHANGE, "the policy table repaired", || w.table(0).filter(|t| map_keys(t, "in-pods4").len() == 1));
    expect("repaired", &[(&c, &a, true), (&d, &a, true), (&a, &d, false)]);
    // An element deleted by hand (the outline unchanged) is found by the full check.
    w.hosts[0].exec("nft", &["delete", "element", "inet", "weft-netpol", "in-pods4", "{ 10.244.1.2 }"]).unwrap();
    assert!(w.table(0).is_some_and(|t| map_keys(&t, "in-pods4").is_empty()));
    wait_for(CHANGE, "the deleted element repaired", || w.table(0).filter(|t| map_keys(t, "in-pods4").len() == 1));

    // Hostile: a policy with a bad ipBlock selecting x/b is enforced fail-closed; logged; the
    // daemon keeps running.
    let bad = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bad", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/40"}}]}]}});
    w.apply(&bad);
    // app=c in x: b (relabelled, on h1) and c (h2) are isolated, nothing allowed.
    expect("bad fails closed", &[(&a, &b, false), (&a, &c, false), (&b, &a, true)]);
    wait_for(CHANGE, "the error logged", || {
        d1.log().contains("NetworkPolicy x/bad: spec.ingress[0].from[0]").then_some(())
    });
    assert_eq!(w.metric(0, "weft_netpol_policy_errors"), Some(1.0));
    assert!(d1.alive() && d2.alive());
    // Logged once per change of the error, not per pass.
    w.kubectl(&["label", "pod", "a", "-n", "x", "touched=1"], None);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d1.log().matches("NetworkPolicy x/bad:").count(), 1, "{}", d1.log());

    // The API server dies: the daemons stay up, the overlay passes allowed traffic and the
    // rules stay.
    w.srv.take().unwrap().stop();
    std::thread::sleep(Duration::from_secs(3));
    assert!(d1.alive() && d2.alive(), "{}", d1.log());
    expect("API server down", &[(&b, &a, true), (&a, &d, false), (&d, &a, true), (&a, &c, false)]);
    assert!(w.table(0).is_some_and(|t| map_keys(&t, "in-pods4").len() == 2));
    // Back: changes apply again (the bad policy deleted: b and c open up).
    w.srv = Some(start_server(&w.lan.ns, &w.dir.join("api")));
    w.kubectl(&["delete", "networkpolicy", "bad", "-n", "x"], None);
    expect("bad deleted", &[(&a, &b, true), (&a, &c, true)]);
    wait_for(CHANGE, "the error count back to 0", || {
        (w.metric(0, "weft_netpol_policy_errors") == Some(0.0)).then_some(())
    });

    // Policy delete: a opens up.
    w.kubectl(&["delete", "networkpolicy", "deny-a", "from-red", "-n", "x"], None);
    w.kubectl(&["label", "namespace", "y", "team=green", "--overwrite"], None);
    expect("deny-a deleted", &[(&d, &a, true), (&c, &a, true)]);

    // Restarted without the flag: the table goes (turning it off removes every rule).
    d1.signal(libc::SIGTERM);
    d1.wait_exit(Duration::from_secs(15));
    assert!(w.table(0).is_some(), "a stopped daemon leaves the rules: its pods still run");
    let mut d1 = w.daemon(0, &[]);
    // The daemon removes the table and then logs it: wait for both, the log line last.
    wait_for(CHANGE, "the table removed by a daemon without --network-policy", || w.table(0).is_none().then_some(()));
    wait_for(CHANGE, "the removal logged", || d1.log().contains("removed the policy table").then_some(()));
    assert_eq!(w.metric(0, "weft_netpol_enabled"), Some(0.0), "no policy enforced now");
    expect("overlay without policy on h1", &[(&c, &a, true), (&a, &c, true), (&c, &d, false)]);
    d1.signal(libc::SIGTERM);
    d1.wait_exit(Duration::from_secs(15));

    // On with the net-conf key instead of the flag; then `weft cleanup` removes the table
    // and leaves a foreign one alone.
    let conf = w.dir.join("net-conf.json");
    std::fs::write(&conf, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"},"NetworkPolicy":true}"#).unwrap();
    let mut d1 = w.daemon(0, &[]);
    w.apply(&policy("x", "deny-a", json!({"matchLabels": {"app": "a"}}), json!([])));
    wait_for(CHANGE, "the table back with the net-conf key", || {
        w.table(0).filter(|t| map_keys(t, "in-pods4") == ["10.244.1.2"])
    });
    d1.signal(libc::SIGTERM);
    d1.wait_exit(Duration::from_secs(15));
    w.hosts[0].exec("nft", &["add", "table", "inet", "foreign"]).unwrap();
    let args = w.kube_args(0);
    let o = w.hosts[0].command(common::weft_bin()).arg("cleanup").args(&args).env("NODE_NAME", "h1").output().unwrap();
    assert!(o.status.success(), "cleanup: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("inet weft-netpol"), "{o:?}");
    assert!(w.table(0).is_none(), "cleanup removed the policy table");
    assert!(w.hosts[0].exec("nft", &["list", "table", "inet", "foreign"]).is_ok(), "a foreign table stays");
    drop(d2);
}

#[test]
fn network_policy_outside_kube_mode_is_a_startup_error_naming_the_fix() {
    // The flag with the etcd store (the default): refused before anything is touched.
    let o = Command::new(common::weft_bin()).args(["daemon", "--network-policy"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{o:?}");
    assert!(err.contains("needs the Kubernetes store") && err.contains("--kube-subnet-mgr"), "{err}");

    // The net-conf key with the local store: refused once the config is read.
    let prefix = common::prefix("pdb");
    let host = Netns::add(&format!("{prefix}h")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("net-conf.json");
    std::fs::write(&conf, r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"},"NetworkPolicy":true}"#).unwrap();
    let o = host
        .command(common::weft_bin())
        .args(["daemon", "--store=local"])
        .arg(format!("--local-store={}", tmp.path().join("l.db").display()))
        .arg(format!("--net-config-path={}", conf.display()))
        .arg(format!("--subnet-file={}", tmp.path().join("s.env").display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("needs the Kubernetes store") && err.contains("--kube-subnet-mgr"), "{err}");
    assert!(!tmp.path().join("s.env").exists(), "nothing written");
    assert!(host.exec("nft", &["list", "table", "inet", "weft-netpol"]).is_err());
}
