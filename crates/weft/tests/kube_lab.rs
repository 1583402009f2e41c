//! `weft lab up --store kube` end to end, for vxlan, host-gw and udp: every pod reaches every
//! pod; each node carries exactly the annotations flanneld writes (read with the real
//! `kubectl`) and the NetworkUnavailable=False condition; a daemon killed and restarted keeps
//! its podCIDR without a lost ping (udp, whose data path is the daemon, loses only what
//! arrives while it is down); a host removed (its Node deleted) is forgotten by the others.

mod common;

use std::process::Command;
use std::time::Duration;

use common::lab::{lab, ok, status};
use common::wait_for;
use serde_json::{Value, json};

fn check_passes(name: &str) {
    let out = ok(&["check", "--name", name, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{out}");
}

/// A node as the real kubectl prints it.
fn kubectl_node(name: &str, node: &str) -> Value {
    let kc = weft::lab::state::dir(name).join("kube/kubeconfig");
    let out = weft::lab::netns::Netns::existing(&format!("{name}-lan"))
        .exec("kubectl", &["--kubeconfig", kc.to_str().unwrap(), "get", "node", node, "-o", "json"])
        .unwrap_or_else(|e| panic!("kubectl get node {node}: {e}"));
    serde_json::from_str(&out).unwrap()
}

/// The VTEP MAC of `flannel.1` in host namespace `ns`, from `ip -j link`.
fn vtep_mac(ns: &str) -> String {
    let out = weft::lab::netns::ip(&["-n", ns, "-j", "link", "show", "flannel.1"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// What flanneld writes on a node for `backend` (§7 of the reference).
fn flannel_annotations(backend: &str, public_ip: &str, mac: Option<&str>) -> Value {
    let p = "flannel.alpha.coreos.com";
    let (ty, data) = match backend {
        "vxlan" => ("vxlan", format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, mac.unwrap())),
        "host-gw" => ("host-gw", "null".to_string()),
        // flanneld's udp backend writes no BackendType and no BackendData.
        _ => ("", "null".to_string()),
    };
    json!({
        format!("{p}/backend-data"): data,
        format!("{p}/backend-type"): ty,
        format!("{p}/kube-subnet-manager"): "true",
        format!("{p}/public-ip"): public_ip,
    })
}

/// Pings `ip` from pod namespace `pod` every 100 ms, `count` times; returns (sent, received).
fn ping_counts(pod: &str, ip: &str, count: u32) -> (u32, u32) {
    let out = Command::new("ip")
        .args(["netns", "exec", pod, "ping", "-n", "-q", "-i", "0.1", "-W", "1", "-c", &count.to_string(), ip])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("ping: {text}"));
    let num = |word: &str| -> u32 {
        let before = line.split(word).next().unwrap();
        before.trim().rsplit([' ', ',']).next().unwrap().parse().unwrap()
    };
    (num(" packets transmitted"), num(" received"))
}

/// Takes the lab down when the test ends, also when it fails.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = lab(&["down", "--name", &self.0]);
    }
}

fn kube_lab(backend: &str, tag: &str) {
    common::require_root();
    weft::lab::netns::remove_prefixed(&format!("wtl{tag}"));
    for entry in std::fs::read_dir(weft::lab::state::STATE_ROOT).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&format!("wtl{tag}")) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let name = format!("wtl{tag}{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    ok(&["up", "--name", &name, "--store", "kube", "--backend", backend, "--hosts", "3", "--pods-per-host", "1"]);
    check_passes(&name);

    // Every node: flanneld's annotations byte for byte, its podCIDR as the lease, and the
    // NetworkUnavailable=False condition.
    let s = status(&name);
    for (i, h) in s["hosts"].as_array().unwrap().iter().enumerate() {
        let node = format!("h{}", i + 1);
        let ns = h["namespace"].as_str().unwrap();
        let v = kubectl_node(&name, &node);
        let mac = (backend == "vxlan").then(|| vtep_mac(ns));
        assert_eq!(
            v["metadata"]["annotations"],
            flannel_annotations(backend, h["ip"].as_str().unwrap(), mac.as_deref()),
            "annotations of {node}"
        );
        assert_eq!(v["spec"]["podCIDR"], h["subnet"], "the lease of {node} is its podCIDR");
        let cond = v["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "NetworkUnavailable"))
            .unwrap_or_else(|| panic!("no NetworkUnavailable condition on {node}: {v}"));
        assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("FlannelIsUp")));
    }

    // A daemon crashes and comes back while pods talk through its host: same podCIDR, no
    // ping lost.
    let before = status(&name);
    let target = before["hosts"][1]["pods"][0]["ip"].as_str().unwrap().to_string();
    let from = before["hosts"][0]["pods"][0]["namespace"].as_str().unwrap().to_string();
    let pinger = std::thread::spawn(move || ping_counts(&from, &target, 50));
    std::thread::sleep(Duration::from_millis(500));
    ok(&["restart", "2", "--name", &name]);
    let (sent, received) = pinger.join().unwrap();
    if backend == "udp" {
        // udp's data path is the daemon itself: what arrives while it is down is lost, but
        // only then (the restart takes well under a second).
        assert!(sent == 50 && received >= 40, "pings lost across a daemon restart: {received} of {sent}");
    } else {
        assert_eq!((sent, received), (50, 50), "pings lost across a daemon restart (the kernel path never stops)");
    }
    let after = status(&name);
    assert_eq!(after["hosts"][1]["subnet"], before["hosts"][1]["subnet"]);
    assert_ne!(after["hosts"][1]["pid"], before["hosts"][1]["pid"]);
    check_passes(&name);

    // A host leaves (its Node deleted): the others forget it.
    let peers = |h: &str| -> Option<i64> {
        let (_, body) = weft::lab::netns::http_get(&format!("{name}-{h}"), 8081, "/metrics")?;
        body.lines().find_map(|l| l.strip_prefix("weft_peers ").and_then(|v| v.parse().ok()))
    };
    wait_for(Duration::from_secs(5), "h2 to know two peers", || (peers("h2") == Some(2)).then_some(()));
    ok(&["remove-host", "3", "--name", &name]);
    for h in ["h1", "h2"] {
        wait_for(Duration::from_secs(5), "the removed host to be forgotten", || (peers(h) == Some(1)).then_some(()));
    }
    check_passes(&name);
    ok(&["down", "--name", &name]);
    let left: Vec<String> = common::namespaces().into_iter().filter(|n| n.starts_with(&format!("{name}-"))).collect();
    assert!(left.is_empty(), "namespaces left after down: {left:?}");
}

#[test]
fn kube_lab_with_vxlan() {
    kube_lab("vxlan", "kre");
}

#[test]
fn kube_lab_with_host_gw() {
    kube_lab("host-gw", "krf");
}

#[test]
fn kube_lab_with_udp() {
    kube_lab("udp", "krg");
}
