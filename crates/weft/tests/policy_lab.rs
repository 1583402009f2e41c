//! NetworkPolicy in the lab, end to end: `weft lab up --store kube --network-policy` on
//! vxlan, host-gw (both dual-stack) and udp (IPv4: flannel's udp backend has no IPv6), then
//! `weft lab policy-check --json`, the upstream e2e model (namespaces x, y, z, pods a, b, c,
//! TCP/UDP/SCTP on ports 80 and 81), must pass every case in every family. Lab pods are Pod
//! objects (read back with the real `kubectl`); `weft lab pod add/del` refuse bad input
//! without losing state. The labs run one after another (a mutex): the probe matrices are
//! heavy for a small machine.

mod common;

use std::sync::Mutex;

use common::lab::{lab, ok, status};
use serde_json::Value;

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Takes the lab down when the test ends, also when it fails.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = lab(&["down", "--name", &self.0]);
    }
}

fn kubectl(name: &str, args: &[&str]) -> Value {
    let kc = weft::lab::state::dir(name).join("kubeconfig");
    let mut all = vec!["--kubeconfig", kc.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = weft::lab::netns::Netns::existing(&format!("{name}-lan"))
        .exec("kubectl", &all)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
    serde_json::from_str(&out).unwrap()
}

/// `weft lab <args>` must fail with exit status `code` and say `words` on stderr.
fn refused(args: &[&str], code: i32, words: &str) {
    let o = lab(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "weft lab {args:?}: {err}");
    assert!(err.contains(words), "weft lab {args:?} should say {words:?}: {err}");
}

fn pods_of(s: &Value) -> Vec<Value> {
    s["hosts"].as_array().unwrap().iter().flat_map(|h| h["pods"].as_array().unwrap().clone()).collect()
}

fn policy_lab(name: &str, backend: &str, ipv6: bool) {
    common::require_root();
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let _ = lab(&["down", "--name", name]);
    let _down = Down(name.to_string());
    let mut up = vec!["up", "--name", name, "--store", "kube", "--network-policy", "--backend", backend];
    up.extend_from_slice(&["--hosts", "3", "--pods-per-host", "1"]);
    if ipv6 {
        up.push("--ipv6");
    }
    ok(&up);

    // Every lab pod is a Pod object as the upstream model declares it.
    let s = status(name);
    assert_eq!(s["network_policy"], true);
    let pods = pods_of(&s);
    assert_eq!(pods.len(), 3, "{s}");
    for p in &pods {
        let obj = kubectl(name, &["get", "pod", "-n", "default", p["name"].as_str().unwrap()]);
        assert_eq!(obj["status"]["phase"], "Running", "{obj}");
        let ips: Vec<&str> =
            obj["status"]["podIPs"].as_array().unwrap().iter().map(|i| i["ip"].as_str().unwrap()).collect();
        let mut want = vec![p["ip"].as_str().unwrap()];
        if ipv6 {
            want.push(p["ip6"].as_str().unwrap_or_else(|| panic!("no IPv6 address in a dual-stack lab: {p}")));
        }
        assert_eq!(ips, want, "{obj}");
        let names: Vec<&str> = obj["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()))
            .collect();
        for n in ["serve-80-tcp", "serve-81-tcp", "serve-80-udp", "serve-81-udp", "serve-80-sctp", "serve-81-sctp"] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert!(obj["spec"]["nodeName"].as_str().unwrap().starts_with('h'), "{obj}");
    }

    // Hostile pod commands: a clear error, nothing changed.
    let before = status(name);
    let add = |extra: &[&str]| {
        let mut a = vec!["pod", "add", "--name", name];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>, code: i32, words: &str| {
        refused(&a.iter().map(String::as_str).collect::<Vec<_>>(), code, words)
    };
    run(add(&["--host", "1", "--namespace", "q", "--pod", "p", "--labels", "bad key=v"]), 2, "invalid label key");
    run(add(&["--host", "1", "--namespace", "q", "--pod", "p", "--labels", "k=-v"]), 2, "invalid value");
    run(add(&["--host", "9", "--namespace", "q", "--pod", "p"]), 2, "has no host 9");
    run(add(&["--host", "1", "--namespace", "Q", "--pod", "p"]), 2, "invalid --namespace");
    run(add(&["--host", "1", "--namespace", "default", "--pod", "h1-p1"]), 2, "already exists");
    refused(&["pod", "del", "--name", name, "--namespace", "q", "--pod", "nope"], 2, "has no pod q/nope");
    assert_eq!(status(name)["hosts"], before["hosts"], "a refused pod command changed the lab");

    // A pod added and removed: in the status and in the API, then gone from both.
    ok(&["pod", "add", "--name", name, "--host", "2", "--namespace", "q", "--pod", "p", "--labels", "app=web,tier=1"]);
    let added = pods_of(&status(name)).into_iter().find(|p| p["name"] == "p").expect("the added pod in the status");
    assert_eq!(added["kube_namespace"], "q");
    assert!(std::path::Path::new(&format!("/run/netns/{}", added["netns"].as_str().unwrap())).exists());
    let obj = kubectl(name, &["get", "pod", "-n", "q", "p"]);
    assert_eq!(obj["metadata"]["labels"]["app"], "web", "{obj}");
    assert_eq!(obj["status"]["podIP"], added["ip"], "{obj}");
    assert_eq!(kubectl(name, &["get", "namespace", "q"])["metadata"]["labels"]["kubernetes.io/metadata.name"], "q");
    ok(&["pod", "del", "--name", name, "--namespace", "q", "--pod", "p"]);
    assert!(pods_of(&status(name)).iter().all(|p| p["name"] != "p"));
    assert!(kubectl(name, &["get", "pods", "-n", "q"])["items"].as_array().unwrap().is_empty());

    // The model, every case.
    let o = lab(&["policy-check", "--name", name, "--json"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("policy-check printed no JSON ({e}): {out}{}", String::from_utf8_lossy(&o.stderr)));
    let cases = v["cases"].as_array().unwrap();
    let failed: Vec<&Value> = cases.iter().filter(|c| c["ok"] != true).collect();
    assert!(failed.is_empty(), "failed cases on {backend}: {}", serde_json::to_string_pretty(&failed).unwrap());
    assert!(o.status.success());
    let families: Vec<&str> = if ipv6 { vec!["IPv4", "IPv6"] } else { vec!["IPv4"] };
    for f in &families {
        let n = cases.iter().filter(|c| c["family"] == *f).count();
        assert!(n >= 23, "only {n} cases in {f}: {out}");
    }
    for want in [
        "default-deny ingress",
        "ipBlock with except",
        "named port",
        "endPort",
        "pod label change",
        "namespace label change",
    ] {
        assert!(cases.iter().any(|c| c["name"].as_str().unwrap().contains(want)), "no case {want:?}");
    }
    // 9 pods x 9 pods x 2 ports x 3 protocols per check.
    assert!(cases.iter().all(|c| c["probes"].as_u64().unwrap() % 486 == 0 && c["probes"].as_u64().unwrap() > 0));

    ok(&["down", "--name", name]);
    let left: Vec<String> = common::namespaces().into_iter().filter(|n| n.starts_with(&format!("{name}-"))).collect();
    assert!(left.is_empty(), "namespaces left after down: {left:?}");
}

#[test]
fn policy_check_passes_on_vxlan_dual_stack() {
    policy_lab("npl", "vxlan", true);
}

#[test]
fn policy_check_passes_on_host_gw_dual_stack() {
    policy_lab("npl2", "host-gw", true);
}

#[test]
fn policy_check_passes_on_udp() {
    policy_lab("npl3", "udp", false);
}

/// `--network-policy` outside the kube store, and policy-check on a lab that does not
/// enforce policy: clear errors, and nothing left behind.
#[test]
fn network_policy_needs_the_kube_store_and_policy_check_needs_network_policy() {
    common::require_root();
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let name = "npl3";
    let _ = lab(&["down", "--name", name]);
    refused(&["up", "--name", name, "--store", "local", "--network-policy"], 2, "--network-policy needs --store kube");
    refused(&["up", "--name", name, "--backend", "udp", "--ipv6"], 2, "--ipv6");
    assert!(!weft::lab::state::dir(name).exists(), "a refused up left state behind");
    let _down = Down(name.to_string());
    ok(&["up", "--name", name, "--store", "kube", "--hosts", "1", "--pods-per-host", "1"]);
    refused(&["policy-check", "--name", name], 2, "does not enforce NetworkPolicy");
    refused(&["bench", "--name", name, "--policies", "5"], 2, "does not enforce NetworkPolicy");
    ok(&["down", "--name", name]);
}
