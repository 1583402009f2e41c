//! Lab pods as Kubernetes objects (labs with `--store kube`): every pod is a Pod object
//! (namespace, name, labels, IPs, node, phase Running, the upstream NetworkPolicy model's
//! container ports), its Namespace exists, and a responder of ours answers TCP and UDP on
//! ports 80 and 81 inside it. `weft lab pod add` / `pod del` add and remove single pods.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::error::LabError;
use super::kube::{kubectl, node_name};
use super::netns::in_netns;
use super::state::{Lab, Pod};
use super::topology::{self, alive, load};

/// The ports every lab pod serves, and the upstream model's container port names
/// (`serve-<port>-<proto>`).
pub const PORTS: [u16; 2] = [80, 81];

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

/// Whether `s` is a DNS-1123 label (a namespace or pod name): 1 to 63 lower-case letters,
/// digits and '-', starting and ending with a letter or digit.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn valid_label_part(s: &str, may_be_empty: bool) -> bool {
    if s.is_empty() {
        return may_be_empty;
    }
    let b = s.as_bytes();
    s.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Parses `k=v,k2=v2` into labels, with Kubernetes' rules for keys (optional DNS prefix
/// and '/', then a name) and values.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, LabError> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(LabError::Usage(format!("label {item:?} has no '=': write --labels key=value,key2=value2")));
        };
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k),
        };
        let prefix_ok = prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(valid_name));
        if !prefix_ok || !valid_label_part(name, false) {
            return Err(LabError::Usage(format!(
                "invalid label key {k:?}: a name of up to 63 letters, digits, '-', '_' and '.' (starting and ending with a letter or digit), optionally prefixed by a DNS subdomain and '/'"
            )));
        }
        if !valid_label_part(v, true) {
            return Err(LabError::Usage(format!(
                "invalid value {v:?} of label {k:?}: up to 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(LabError::Usage(format!("label {k:?} is given twice")));
        }
    }
    Ok(out)
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

/// Starts the responder (`weft lab responder`) in pod namespace `pod_ns`, detached, and
/// waits until it answers; returns its pid.
pub fn start_responder(lab: &Lab, pod_ns: &str) -> Result<u32, LabError> {
    let exe = std::env::current_exe().map_err(|e| LabError::Step(format!("locating the weft binary: {e}")))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.dir().join("responders.log"))
        .map_err(|e| LabError::Step(format!("opening the responders' log: {e}")))?;
    let err = log.try_clone().map_err(|e| LabError::Step(e.to_string()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", pod_ns])
        .arg(exe)
        .args(["lab", "responder"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::Step(format!("starting the responder in {pod_ns}: {e}")))?;
    let pid = child.id();
    // Not waited for: it outlives this command; `lab down` kills it.
    drop(child);
    let start = Instant::now();
    loop {
        let ok = in_netns(pod_ns, || {
            std::net::TcpStream::connect_timeout(&"127.0.0.1:81".parse().expect("literal"), Duration::from_millis(200))
                .is_ok()
        })
        .unwrap_or(false);
        if ok {
            return Ok(pid);
        }
        if !alive(pid) || start.elapsed() > Duration::from_secs(10) {
            topology::kill(pid, libc::SIGKILL);
            let log = std::fs::read_to_string(lab.dir().join("responders.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(LabError::Step(format!(
                "the responder in {pod_ns} did not answer on port 81; its log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The namespace name of a pod added with `weft lab pod add`.
pub fn netns_name(lab: &Lab, kube_ns: &str, name: &str) -> String {
    format!("{}-pod-{kube_ns}-{name}", lab.name)
}

fn need_kube(lab: &Lab) -> Result<(), LabError> {
    if lab.store != "kube" {
        return Err(LabError::Usage(format!(
            "lab {} has store {}: pods with namespaces, names and labels need a lab with --store kube",
            lab.name, lab.store
        )));
    }
    Ok(())
}

/// `weft lab pod add --host N --namespace NS --pod NAME [--labels k=v,…]`.
pub fn add(lab_name: &str, host: u8, kube_ns: &str, name: &str, labels: &str) -> Result<Lab, LabError> {
    let mut lab = load(lab_name)?;
    need_kube(&lab)?;
    for (what, v) in [("--namespace", kube_ns), ("--pod", name)] {
        if !valid_name(v) {
            return Err(LabError::Usage(format!(
                "invalid {what} {v:?}: use 1 to 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
            )));
        }
    }
    let labels = parse_labels(labels)?;
    let Some(pos) = lab.hosts.iter().position(|h| h.index == host) else {
        let have: Vec<String> = lab.hosts.iter().map(|h| h.index.to_string()).collect();
        return Err(LabError::Usage(format!("lab {} has no host {host}; its hosts are {}", lab.name, have.join(", "))));
    };
    if lab.pods().any(|p| p.kube_ns == kube_ns && p.name == name) {
        return Err(LabError::Usage(format!(
            "pod {kube_ns}/{name} already exists in lab {}; remove it with `weft lab pod del --name {} --namespace {kube_ns} --pod {name}`",
            lab.name, lab.name
        )));
    }
    let pod_ns = netns_name(&lab, kube_ns, name);
    let pod = topology::create_pod(&lab, host, &pod_ns, kube_ns, name, labels)?;
    if let Err(e) = register(&lab, &[(host, pod.clone())]) {
        topology::destroy_pod(&lab, host, &pod);
        let _ = delete_object(&lab, &pod);
        return Err(e);
    }
    lab.hosts[pos].pods.push(pod);
    lab.save().map_err(|e| LabError::Step(format!("saving the lab state: {e}")))?;
    Ok(lab)
}

/// `weft lab pod del --namespace NS --pod NAME`.
pub fn del(lab_name: &str, kube_ns: &str, name: &str) -> Result<Lab, LabError> {
    let mut lab = load(lab_name)?;
    need_kube(&lab)?;
    let found =
        lab.hosts.iter().enumerate().find_map(|(h, host)| {
            host.pods.iter().position(|p| p.kube_ns == kube_ns && p.name == name).map(|p| (h, p))
        });
    let Some((h, p)) = found else {
        return Err(LabError::Usage(format!("lab {} has no pod {kube_ns}/{name}; see `weft lab status`", lab.name)));
    };
    let pod = lab.hosts[h].pods[p].clone();
    delete_object(&lab, &pod)?;
    topology::destroy_pod(&lab, lab.hosts[h].index, &pod);
    lab.hosts[h].pods.remove(p);
    lab.save().map_err(|e| LabError::Step(format!("saving the lab state: {e}")))?;
    Ok(lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_kubernetes_rules() {
        let l = parse_labels("app=web, example.com/tier=1,empty=").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l["example.com/tier"], "1");
        assert_eq!(l["empty"], "");
        assert!(parse_labels("").unwrap().is_empty());
        for (bad, says) in [
            ("app", "has no '='"),
            ("bad key=v", "invalid label key"),
            ("=v", "invalid label key"),
            ("-a=v", "invalid label key"),
            ("Example.com/a=v", "invalid label key"),
            ("/a=v", "invalid label key"),
            ("a=-v", "invalid value"),
            ("a=v w", "invalid value"),
            (&format!("a={}", "v".repeat(64)), "invalid value"),
            ("a=1,a=2", "given twice"),
        ] {
            let e = parse_labels(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_name("x") && valid_name("a-1"));
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
