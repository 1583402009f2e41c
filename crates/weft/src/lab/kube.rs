//! `weft lab up --store kube`: the test Kubernetes API server (`weft test-apiserver`) on the
//! LAN bridge, one Node per host with a podCIDR, daemons with `--kube-subnet-mgr`, a
//! kubeconfig and `NODE_NAME`; every lab pod as a Pod object (namespace, name, labels, IPs,
//! node, phase Running, the upstream NetworkPolicy model's container ports) in its
//! Namespace. Nodes and pods are written with the real `kubectl`.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::error::LabError;
use super::netns::Netns;
use super::responder::PORTS;
use super::state::{LAN, Lab, Pod};

/// Where the API server listens (the LAN bridge's address).
pub const API_PORT: u16 = 6443;

/// The API server's state directory (certificates, token, kubeconfig, objects).
pub fn dir(lab: &Lab) -> PathBuf {
    lab.dir().join("kube")
}

/// The kubeconfig daemons and kubectl use.
pub fn kubeconfig(lab: &Lab) -> PathBuf {
    dir(lab).join("kubeconfig")
}

/// The net-conf.json the daemons read (`--net-config-path`).
pub fn net_conf(lab: &Lab) -> PathBuf {
    lab.dir().join("net-conf.json")
}

/// Node name of host `index`.
pub fn node_name(index: u8) -> String {
    format!("h{index}")
}

/// The podCIDR given to host `index`.
pub fn pod_cidr(index: u8) -> String {
    format!("10.244.{index}.0/24")
}

/// The IPv6 podCIDR given to host `index` in a dual-stack lab (inside
/// [`NETWORK6`](super::state::NETWORK6)).
pub fn pod_cidr6(index: u8) -> String {
    format!("fd00:10:244:{index:x}::/64")
}

/// Starts the API server in the LAN namespace, detached; waits until it answers. Returns
/// its pid.
pub fn start_apiserver(lab: &Lab) -> Result<u32, LabError> {
    let d = dir(lab);
    std::fs::create_dir_all(&d).map_err(|e| LabError::Step(format!("creating {}: {e}", d.display())))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("apiserver.log"))
        .map_err(|e| LabError::Step(format!("opening the API server log: {e}")))?;
    let exe = std::env::current_exe().map_err(|e| LabError::Step(format!("locating the weft binary: {e}")))?;
    let err = log.try_clone().map_err(|e| LabError::Step(e.to_string()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.lan_ns()])
        .arg(exe)
        .args(["test-apiserver", "--listen", &format!("{LAN}.1:{API_PORT}"), "--dir"])
        .arg(&d)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::Step(format!("starting the API server: {e}")))?;
    let pid = child.id();
    let start = Instant::now();
    while kubectl(lab, &["get", "--raw", "/healthz"]).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            let log = std::fs::read_to_string(d.join("apiserver.log")).unwrap_or_default();
            return Err(LabError::Step(format!("the API server did not answer within 20 s; its log:\n{log}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(pid)
}

/// Runs `kubectl` in the LAN namespace against the lab's API server.
pub fn kubectl(lab: &Lab, args: &[&str]) -> io::Result<String> {
    let lan = Netns::existing(&lab.lan_ns());
    let kc = kubeconfig(lab);
    let mut all = vec!["--kubeconfig", kc.to_str().unwrap_or_default(), "--request-timeout=10s"];
    all.extend_from_slice(args);
    lan.exec("kubectl", &all)
}

/// Registers host `index`'s Node with its podCIDR (as kubelet and kube-controller-manager
/// would).
pub fn create_node(lab: &Lab, index: u8) -> Result<(), LabError> {
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node_name(index)},
        "spec": if lab.ipv6 {
            serde_json::json!({"podCIDR": pod_cidr(index), "podCIDRs": [pod_cidr(index), pod_cidr6(index)]})
        } else {
            serde_json::json!({"podCIDR": pod_cidr(index), "podCIDRs": [pod_cidr(index)]})
        },
    });
    let file = dir(lab).join(format!("node-h{index}.json"));
    std::fs::write(&file, node.to_string()).map_err(|e| LabError::Step(format!("writing {}: {e}", file.display())))?;
    kubectl(lab, &["create", "-f", file.to_str().unwrap_or_default()])
        .map(|_| ())
        .map_err(|e| LabError::Step(format!("creating node h{index}: {e}")))
}

/// Deletes host `index`'s Node (the host left the cluster).
pub fn delete_node(lab: &Lab, index: u8) -> Result<(), LabError> {
    kubectl(lab, &["delete", "node", &node_name(index)])
        .map(|_| ())
        .map_err(|e| LabError::Step(format!("deleting node h{index}: {e}")))
}

/// The daemon flags of the kube store.
pub fn daemon_args(lab: &Lab) -> Vec<String> {
    vec![
        "--kube-subnet-mgr".into(),
        format!("--kubeconfig-file={}", kubeconfig(lab).display()),
        format!("--net-config-path={}", net_conf(lab).display()),
    ]
}

/// The kubeconfig of a lab with the kube store, where users and tools look for it.
pub fn kubeconfig_path(lab: &Lab) -> std::path::PathBuf {
    lab.dir().join("kubeconfig")
}

/// Makes `/run/weft-lab/<name>/kubeconfig` the lab's kubeconfig (a copy of the API
/// server's, which lives in its own directory).
pub fn link_kubeconfig(lab: &Lab) -> Result<(), LabError> {
    let from = super::kube::kubeconfig(lab);
    std::fs::copy(&from, kubeconfig_path(lab))
        .map(|_| ())
        .map_err(|e| LabError::Step(format!("copying {} to the lab directory: {e}", from.display())))
}

/// The Pod object of `pod` on host `index`, with its status.
pub fn object(lab: &Lab, index: u8, pod: &Pod) -> Value {
    let mut containers = Vec::new();
    for proto in ["tcp", "udp", "sctp"] {
        for port in PORTS {
            containers.push(json!({
                "name": format!("cont-{port}-{proto}"),
                "image": "weft-lab-responder",
                "ports": [{"name": format!("serve-{port}-{proto}"), "containerPort": port, "protocol": proto.to_uppercase()}],
            }));
        }
    }
    let ips: Vec<Value> = std::iter::once(&pod.ip).chain(pod.ip6.as_ref()).map(|ip| json!({"ip": ip})).collect();
    let host_ip = lab.hosts.iter().find(|h| h.index == index).map(|h| h.ip.clone()).unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.kube_ns, "labels": pod.labels},
        "spec": {"nodeName": node_name(index), "containers": containers},
        "status": {"phase": "Running", "podIP": pod.ip, "podIPs": ips, "hostIP": host_ip},
    })
}

fn write_list(lab: &Lab, file: &str, items: Vec<Value>) -> Result<String, LabError> {
    let path = super::kube::dir(lab).join(file);
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&path, list.to_string()).map_err(|e| LabError::Step(format!("writing {}: {e}", path.display())))?;
    Ok(path.to_string_lossy().into_owned())
}

/// Creates the Namespace objects of `names` that do not exist yet (the server adds
/// `kubernetes.io/metadata.name`).
pub fn ensure_namespaces(lab: &Lab, names: &BTreeSet<String>) -> Result<(), LabError> {
    let have = kubectl(lab, &["get", "namespaces", "-o", "json"])
        .map_err(|e| LabError::Step(format!("listing namespaces: {e}")))?;
    let have: Value = serde_json::from_str(&have).unwrap_or(Value::Null);
    let existing: BTreeSet<&str> =
        have["items"].as_array().into_iter().flatten().filter_map(|n| n["metadata"]["name"].as_str()).collect();
    let missing: Vec<Value> = names
        .iter()
        .filter(|n| !existing.contains(n.as_str()))
        .map(|n| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let file = write_list(lab, "namespaces.json", missing)?;
    kubectl(lab, &["create", "--validate=false", "-f", &file])
        .map(|_| ())
        .map_err(|e| LabError::Step(format!("creating namespaces: {e}")))
}

/// Registers `pods` (host index, pod) as Pod objects: created, then their status written
/// through the status subresource (a create resets status, as in Kubernetes).
pub fn register(lab: &Lab, pods: &[(u8, Pod)]) -> Result<(), LabError> {
    let names: BTreeSet<String> = pods.iter().map(|(_, p)| p.kube_ns.clone()).collect();
    ensure_namespaces(lab, &names)?;
    let items: Vec<Value> = pods.iter().map(|(i, p)| object(lab, *i, p)).collect();
    let file = write_list(lab, "pods.json", items)?;
    kubectl(lab, &["create", "--validate=false", "-f", &file])
        .map_err(|e| LabError::Step(format!("creating the Pod objects: {e}")))?;
    kubectl(lab, &["replace", "--validate=false", "--subresource=status", "-f", &file])
        .map(|_| ())
        .map_err(|e| LabError::Step(format!("writing the Pod objects' status: {e}")))
}

/// Deletes the Pod object of `pod`.
pub fn delete_object(lab: &Lab, pod: &Pod) -> Result<(), LabError> {
    kubectl(lab, &["delete", "pod", "-n", &pod.kube_ns, &pod.name, "--wait=false"])
        .map(|_| ())
        .map_err(|e| LabError::Step(format!("deleting Pod {}/{}: {e}", pod.kube_ns, pod.name)))
}
