//! `weft lab up --store kube`: the test Kubernetes API server (`weft test-apiserver`) on the
//! LAN bridge, one Node per host with a podCIDR, daemons with `--kube-subnet-mgr`, a
//! kubeconfig and `NODE_NAME`. Nodes are written with the real `kubectl`.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::error::LabError;
use super::netns::Netns;
use super::state::{LAN, Lab};

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
