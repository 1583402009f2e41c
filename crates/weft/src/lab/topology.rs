//! Building and tearing down a lab: the LAN, the outside host, the store, one daemon per
//! host, and pods created through the CNI plugin with the real `bridge` and `host-local`.

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub use super::error::LabError;
use super::etcd::{Etcd, EtcdCluster};
use super::netns::{self, Netns, http_get, plug};
use super::pids::{alive, kill};
pub use super::state::LAN;
use super::state::{self, Host, Lab, Pod};

/// The outside host's address on the LAN.
pub const OUTSIDE_IP: &str = "192.0.2.254";
/// The pod network.
pub const NETWORK: &str = "10.244.0.0/16";
/// Where the standard CNI plugins live (Debian's containernetworking-plugins).
pub const CNI_BIN: &str = "/usr/lib/cni";
const HEALTH_PORT: u16 = 8081;

fn step<T>(what: &str, r: io::Result<T>) -> Result<T, LabError> {
    r.map_err(|e| LabError::Step(format!("{what}: {e}")))
}

/// Lab names become namespace prefixes: keep them short and unambiguous.
pub fn check_name(name: &str) -> Result<(), LabError> {
    if name.is_empty() || name.len() > 16 || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(LabError::Usage(format!("invalid lab name {name:?}: use 1 to 16 lower-case letters and digits")));
    }
    Ok(())
}

fn exists(name: &str) -> bool {
    state::dir(name).exists()
        || netns::ip(&["netns", "list"]).unwrap_or_default().lines().any(|l| l.starts_with(&format!("{name}-")))
}

/// Options of `weft lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Lab name.
    pub name: String,
    /// Hosts.
    pub hosts: u8,
    /// Pods per host.
    pub pods_per_host: u8,
    /// Backend type.
    pub backend: String,
    /// "local" or "etcd".
    pub store: String,
    /// etcd members (with `store` "etcd"); 1 is a single server on the LAN bridge.
    pub etcd_members: u8,
    /// Run etcd with TLS, each member with its own certificate.
    pub etcd_tls: bool,
    /// Daemons enforce NetworkPolicy (kube store only).
    pub network_policy: bool,
    /// Dual-stack: IPv6 on the LAN, in the network config and on every pod.
    pub ipv6: bool,
}

/// The file in a lab's directory that records its etcd cluster (members, TLS).
const CLUSTER_FILE: &str = "etcd-cluster.json";

/// The lab's multi-member (or TLS) etcd cluster, when `weft lab up` made one: kill, restart,
/// partition and heal members through it (see [`EtcdCluster`]). `None` for a lab with the
/// local store or a single plain etcd on the LAN bridge.
pub fn etcd_cluster(lab: &Lab) -> Option<EtcdCluster> {
    let text = std::fs::read_to_string(lab.dir().join(CLUSTER_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let members = usize::try_from(v["members"].as_u64()?).ok()?;
    let tls = v["tls"].as_bool().unwrap_or(false);
    Some(EtcdCluster::attach(&format!("{}-", lab.name), &lab.lan_ns(), LAN, members, &lab.dir().join("etcd"), tls))
}

/// Progress goes to stderr: stdout carries only results (tables, JSON).
fn progress(msg: &str) {
    eprint!("{msg}");
    let _ = io::stderr().flush();
}

fn daemon_args(lab: &Lab, index: u8) -> Vec<String> {
    let d = lab.dir();
    let mut args = vec![
        "daemon".into(),
        "--ip-masq".into(),
        "--iface=eth0".into(),
        format!("--subnet-file={}", d.join(format!("h{index}/subnet.env")).display()),
        format!("--healthz-port={HEALTH_PORT}"),
    ];
    if lab.network_policy {
        args.push("--network-policy".into());
    }
    if lab.store == "kube" {
        args.extend(super::kube::daemon_args(lab));
    } else if let Some(c) = etcd_cluster(lab) {
        args.extend(c.daemon_args());
    } else if lab.store == "etcd" {
        args.push(format!("--etcd-endpoints=http://{LAN}.1:2379"));
    } else {
        args.push("--store=local".into());
        args.push(format!("--local-store={}", d.join("leases.db").display()));
        args.push(format!("--net-config-path={}", d.join("net-conf.json").display()));
    }
    args
}

/// Starts host `index`'s daemon in its namespace, detached; logs go to `h<N>/daemon.log`.
fn spawn_daemon(lab: &Lab, index: u8) -> io::Result<u32> {
    let dir = lab.dir().join(format!("h{index}"));
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log"))?;
    let exe = std::env::current_exe()?;
    let child = Command::new("ip")
        .args(["netns", "exec", &format!("{}-h{index}", lab.name)])
        .arg(exe)
        .args(daemon_args(lab, index))
        // Each host its own WireGuard key, kept across `lab restart` (flannel's default path
        // is one file for the whole machine).
        .env(weft_core::wireguard::KEY_FILE_ENV, dir.join("wgkey"))
        .env("NODE_NAME", super::kube::node_name(index))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for `weft lab` does not reach the daemons.
        .process_group(0)
        .spawn()?;
    Ok(child.id())
}

fn log_tail(lab: &Lab, index: u8) -> String {
    let text = std::fs::read_to_string(lab.dir().join(format!("h{index}/daemon.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Waits until host `index`'s daemon answers /readyz with 200; returns its subnet.
fn wait_ready(lab: &Lab, index: u8, pid: u32, limit: Duration) -> Result<String, LabError> {
    let start = Instant::now();
    let ns = format!("{}-h{index}", lab.name);
    loop {
        if !alive(pid) {
            return Err(LabError::Step(format!(
                "the daemon of h{index} exited; its log ends with:\n{}",
                log_tail(lab, index)
            )));
        }
        if http_get(&ns, HEALTH_PORT, "/readyz").is_some_and(|(code, _)| code == 200) {
            let env = std::fs::read_to_string(lab.dir().join(format!("h{index}/subnet.env"))).unwrap_or_default();
            let parsed = weft_core::subnet_env::parse(&env);
            return Ok(parsed.previous_subnet().map(|s| s.to_string()).unwrap_or_default());
        }
        if start.elapsed() > limit {
            return Err(LabError::Step(format!(
                "the daemon of h{index} was not ready after {limit:?}; its log ends with:\n{}",
                log_tail(lab, index)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The network config the CNI plugin gets in the lab.
fn cni_conf(lab: &Lab, index: u8) -> Value {
    let d = lab.dir().join(format!("h{index}"));
    json!({
        "cniVersion": "1.0.0",
        "name": "weft-lab",
        "type": "flannel",
        "subnetFile": d.join("subnet.env"),
        "dataDir": d.join("cni"),
        "delegate": {"hairpinMode": true, "isDefaultGateway": true},
        "ipam": {"dataDir": d.join("ipam")},
    })
}

/// Runs the CNI plugin (this binary) inside host `index`'s namespace.
pub(crate) fn cni(lab: &Lab, index: u8, command: &str, pod_ns: &str) -> Result<Value, LabError> {
    let exe = step("locating the weft binary", std::env::current_exe())?;
    let mut child = step(
        "running the CNI plugin",
        Command::new("ip")
            .args(["netns", "exec", &format!("{}-h{index}", lab.name)])
            .arg(exe)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod_ns)
            .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn(),
    )?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(cni_conf(lab, index).to_string().as_bytes());
    }
    let out = step("running the CNI plugin", child.wait_with_output())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(LabError::Step(format!("CNI {command} for {pod_ns} failed: {text}")));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn add_pods(lab: &mut Lab, index: u8) -> Result<(), LabError> {
    let count = lab.pods_per_host;
    let mut added = Vec::new();
    for j in 1..=count {
        let pod_ns = format!("{}-h{index}-p{j}", lab.name);
        let name = format!("h{index}-p{j}");
        let labels = [("pod".to_string(), name.clone())].into();
        let pod = create_pod(lab, index, &pod_ns, "default", &name, labels)?;
        let host = lab.hosts.iter_mut().find(|h| h.index == index).expect("host exists");
        host.pods.push(pod.clone());
        added.push((index, pod));
    }
    if lab.store == "kube" && !added.is_empty() {
        super::kube::register(lab, &added)?;
    }
    Ok(())
}

/// Creates pod namespace `pod_ns` on host `index` through the CNI plugin; with the kube
/// store also starts its responder. The Pod object is the caller's.
pub(crate) fn create_pod(
    lab: &Lab,
    index: u8,
    pod_ns: &str,
    kube_ns: &str,
    name: &str,
    labels: std::collections::BTreeMap<String, String>,
) -> Result<Pod, LabError> {
    step("creating a pod namespace", Netns::add(pod_ns))?.persist();
    let made = (|| {
        let result = cni(lab, index, "ADD", pod_ns)?;
        let addrs: Vec<String> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str().and_then(|a| a.split('/').next()).map(String::from))
            .collect();
        let ip = addrs.iter().find(|a| !a.contains(':')).cloned().unwrap_or_default();
        if ip.is_empty() {
            return Err(LabError::Step(format!("the CNI result for {pod_ns} has no IPv4 address: {result}")));
        }
        let ip6 = addrs.iter().find(|a| a.contains(':')).cloned();
        if lab.ipv6 && ip6.is_none() {
            return Err(LabError::Step(format!("the CNI result for {pod_ns} has no IPv6 address: {result}")));
        }
        let mut pod = Pod {
            ns: pod_ns.into(),
            container_id: pod_ns.into(),
            ip,
            ip6,
            kube_ns: kube_ns.into(),
            name: name.into(),
            labels,
            responder_pid: None,
        };
        if lab.store == "kube" {
            pod.responder_pid = Some(super::responder::start(lab, pod_ns)?);
        }
        Ok(pod)
    })();
    if made.is_err() {
        let _ = cni(lab, index, "DEL", pod_ns);
        netns::remove(pod_ns);
    }
    made
}

/// Removes a pod: CNI DEL on its host, its namespace (and responder) gone.
pub(crate) fn destroy_pod(lab: &Lab, index: u8, pod: &Pod) {
    let _ = cni(lab, index, "DEL", &pod.ns);
    if let Some(pid) = pod.responder_pid {
        kill(pid, libc::SIGKILL);
    }
    netns::remove(&pod.ns);
}

fn start_host(lab: &mut Lab, index: u8) -> Result<(), LabError> {
    // The LAN belongs to the lab: never removed here, even when this step fails.
    let lan = Netns::existing(&lab.lan_ns());
    let host = step("creating a host namespace", Netns::add(&format!("{}-h{index}", lab.name)))?;
    let ip = format!("{LAN}.{}", 10 + u16::from(index));
    step("plugging the host into the LAN", plug(&lan, &host, &format!("h{index}"), &ip, Some(&format!("{LAN}.1"))))?;
    // Routers forward: the bridge plugin turns this on too, but the host must forward
    // before any pod exists (traffic to remote pods arrives here first).
    step("enabling forwarding", host.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]))?;
    if lab.ipv6 {
        let ip6 = format!("{}{}", state::LAN6, 10 + u16::from(index));
        step(
            "adding the host's IPv6 address",
            host.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]),
        )?;
        step(
            "adding the IPv6 default route",
            host.ip(&["-6", "route", "add", "default", "via", &format!("{}1", state::LAN6)]),
        )?;
        step("enabling IPv6 forwarding", host.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]))?;
    }
    if lab.network_policy {
        // Pod to pod on one host crosses the bridge: netfilter must see it (br_netfilter,
        // as flannel requires), or same-host traffic would bypass the policy table.
        for k in ["net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1"] {
            step("enabling bridge netfilter", host.exec("sysctl", &["-qw", k]))?;
        }
    }
    let ns = host.persist();
    if lab.store == "kube" {
        super::kube::create_node(lab, index)?;
    }
    let pid = step("starting the daemon", spawn_daemon(lab, index))?;
    lab.hosts.push(Host { index, ns, ip, pid, subnet: String::new(), pods: Vec::new() });
    let _ = lab.save();
    Ok(())
}

/// `weft lab up`.
pub fn up(o: &UpOptions) -> Result<Lab, LabError> {
    check_name(&o.name)?;
    if !(1..=50).contains(&o.hosts) || o.pods_per_host > 50 {
        return Err(LabError::Usage("use 1 to 50 --hosts and 0 to 50 --pods-per-host".into()));
    }
    if !["vxlan", "host-gw", "udp", "wireguard", "alloc"].contains(&o.backend.as_str()) {
        return Err(LabError::Usage(format!(
            "unknown --backend {:?}: use vxlan, host-gw, udp or wireguard",
            o.backend
        )));
    }
    if !["local", "etcd", "kube"].contains(&o.store.as_str()) {
        return Err(LabError::Usage(format!("unknown --store {:?}: use local, etcd or kube", o.store)));
    }
    if !(1..=9).contains(&o.etcd_members) || ((o.etcd_members > 1 || o.etcd_tls) && o.store != "etcd") {
        return Err(LabError::Usage("--etcd-members (1 to 9) and --etcd-tls need --store etcd".into()));
    }
    if o.network_policy && o.store != "kube" {
        return Err(LabError::Usage(
            "--network-policy needs --store kube: policies, pods and namespaces come from the Kubernetes API".into(),
        ));
    }
    if o.ipv6 && !["vxlan", "host-gw"].contains(&o.backend.as_str()) {
        return Err(LabError::Usage(format!(
            "--ipv6 (dual-stack) works with --backend vxlan or host-gw, not {:?} (flannel's udp backend is IPv4 only)",
            o.backend
        )));
    }
    if exists(&o.name) {
        return Err(LabError::Exists(o.name.clone()));
    }
    let mut lab = Lab {
        name: o.name.clone(),
        backend: o.backend.clone(),
        store: o.store.clone(),
        pods_per_host: o.pods_per_host,
        etcd_pid: None,
        apiserver_pid: None,
        hosts: Vec::new(),
        network_policy: o.network_policy,
        ipv6: o.ipv6,
    };
    let result = build(&mut lab, o);
    if let Err(e) = result {
        // Leave nothing half-built behind.
        down(&o.name);
        return Err(e);
    }
    Ok(lab)
}

fn build(lab: &mut Lab, o: &UpOptions) -> Result<(), LabError> {
    let started = Instant::now();
    eprintln!(
        "weft lab {}: {} hosts x {} pods, backend {}, store {}",
        o.name, o.hosts, o.pods_per_host, o.backend, o.store
    );
    step("creating the state directory", std::fs::create_dir_all(lab.dir()))?;
    step("saving the lab state", lab.save())?;
    progress(&format!("  network: LAN {LAN}.0/24 on a bridge, outside host {OUTSIDE_IP} ... "));
    let lan = step("creating the LAN", netns::Lan::new(&format!("{}-", o.name), LAN))?;
    let outside = step("creating the outside host", Netns::add(&lab.outside_ns()))?;
    step("plugging in the outside host", plug(&lan.ns, &outside, "out", OUTSIDE_IP, None))?;
    let lan_ns = lan.ns;
    if o.ipv6 {
        step(
            "adding the LAN's IPv6 address",
            lan_ns.ip(&["addr", "add", &format!("{}1/64", state::LAN6), "dev", "br0", "nodad"]),
        )?;
    }
    eprintln!("ok");
    let mut config = json!({"Network": NETWORK, "Backend": {"Type": o.backend}});
    if o.ipv6 {
        config["EnableIPv6"] = json!(true);
        config["IPv6Network"] = json!(state::NETWORK6);
    }
    let config = config.to_string();
    if o.store == "etcd" && (o.etcd_members > 1 || o.etcd_tls) {
        progress(&format!(
            "  store: etcd cluster of {} member(s){}, clients on {LAN}.201.., peers on their own network ... ",
            o.etcd_members,
            if o.etcd_tls { " with TLS" } else { "" }
        ));
        let c = step(
            "starting the etcd cluster",
            EtcdCluster::create(
                &format!("{}-", o.name),
                &lan_ns,
                LAN,
                usize::from(o.etcd_members),
                &lab.dir().join("etcd"),
                o.etcd_tls,
            ),
        )?;
        step("writing the network config", c.etcdctl(&["put", "/coreos.com/network/config", &config]))?;
        let layout = json!({"members": o.etcd_members, "tls": o.etcd_tls}).to_string();
        step("saving the cluster layout", std::fs::write(lab.dir().join(CLUSTER_FILE), layout))?;
        c.persist();
    } else if o.store == "etcd" {
        progress(&format!("  store: etcd on {LAN}.1:2379 ... "));
        let etcd = step(
            "starting etcd",
            Etcd::start(Some(&lan_ns), &format!("{LAN}.1"), 2379, 2380, &lab.dir().join("etcd"), None),
        )?;
        step("writing the network config", etcd.etcdctl(&["put", "/coreos.com/network/config", &config]))?;
        lab.etcd_pid = etcd.detach();
    } else if o.store == "kube" {
        progress(&format!(
            "  store: Kubernetes API server (weft test-apiserver) on https://{LAN}.1:{}, one node per host ... ",
            super::kube::API_PORT
        ));
        step("writing the network config", std::fs::write(super::kube::net_conf(lab), &config))?;
        lab.apiserver_pid = Some(super::kube::start_apiserver(lab)?);
        step("saving the lab state", lab.save())?;
        super::kube::link_kubeconfig(lab)?;
    } else {
        progress(&format!("  store: local file {} ... ", lab.dir().join("leases.db").display()));
        step("writing the network config", std::fs::write(lab.dir().join("net-conf.json"), &config))?;
    }
    eprintln!("ok");
    lan_ns.persist();
    outside.persist();
    progress("  daemons:");
    for i in 1..=o.hosts {
        start_host(lab, i)?;
        progress(&format!(" h{i}"));
    }
    progress(" started, waiting for readiness ... ");
    for i in 0..lab.hosts.len() {
        let (index, pid) = (lab.hosts[i].index, lab.hosts[i].pid);
        lab.hosts[i].subnet = wait_ready(lab, index, pid, Duration::from_secs(30))?;
    }
    eprintln!("ok");
    if o.pods_per_host > 0 {
        progress(&format!(
            "  pods: {} through the CNI plugin (flannel -> bridge + host-local) ... ",
            usize::from(o.hosts) * usize::from(o.pods_per_host)
        ));
        for i in 1..=o.hosts {
            add_pods(lab, i)?;
        }
        eprintln!("ok");
    }
    step("saving the lab state", lab.save())?;
    eprintln!("ready in {:.1} s\n", started.elapsed().as_secs_f64());
    Ok(())
}

/// `weft lab down`: stops every process, removes every namespace and file of the lab; works
/// without a state file too (after a crashed `up`). Returns what it removed.
pub fn down(name: &str) -> (usize, usize) {
    let mut processes = 0;
    if let Some(lab) = Lab::load(name) {
        for pid in lab.pods().filter_map(|p| p.responder_pid) {
            if alive(pid) {
                kill(pid, libc::SIGKILL);
                processes += 1;
            }
        }
        for pid in lab.hosts.iter().map(|h| h.pid).chain(lab.etcd_pid).chain(lab.apiserver_pid) {
            if alive(pid) {
                kill(pid, libc::SIGTERM);
                processes += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for pid in lab.hosts.iter().map(|h| h.pid).chain(lab.etcd_pid).chain(lab.apiserver_pid) {
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            kill(pid, libc::SIGKILL);
        }
    }
    let list = netns::ip(&["netns", "list"]).unwrap_or_default();
    let names: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{name}-")))
        .map(String::from)
        .collect();
    for n in &names {
        netns::remove(n);
    }
    let _ = std::fs::remove_dir_all(state::dir(name));
    (processes, names.len())
}

/// Loads a running lab.
pub fn load(name: &str) -> Result<Lab, LabError> {
    check_name(name)?;
    Lab::load(name).ok_or_else(|| LabError::Missing(name.to_string()))
}

fn host_position(lab: &Lab, index: u8) -> Result<usize, LabError> {
    lab.hosts
        .iter()
        .position(|h| h.index == index)
        .ok_or_else(|| LabError::Usage(format!("lab {} has no host h{index}", lab.name)))
}

/// `weft lab restart N`: kills host N's daemon (SIGKILL, as a crash) and starts it again.
pub fn restart(name: &str, index: u8) -> Result<Lab, LabError> {
    let mut lab = load(name)?;
    let pos = host_position(&lab, index)?;
    let old = lab.hosts[pos].pid;
    kill(old, libc::SIGKILL);
    while alive(old) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = step("starting the daemon", spawn_daemon(&lab, index))?;
    lab.hosts[pos].pid = pid;
    step("saving the lab state", lab.save())?;
    lab.hosts[pos].subnet = wait_ready(&lab, index, pid, Duration::from_secs(30))?;
    step("saving the lab state", lab.save())?;
    Ok(lab)
}

/// `weft lab add-host`: one more host with its pods.
pub fn add_host(name: &str) -> Result<Lab, LabError> {
    let mut lab = load(name)?;
    let index = lab.hosts.iter().map(|h| h.index).max().unwrap_or(0) + 1;
    start_host(&mut lab, index)?;
    let pid = lab.hosts.last().map(|h| h.pid).unwrap_or(0);
    let subnet = wait_ready(&lab, index, pid, Duration::from_secs(30))?;
    lab.hosts.last_mut().expect("just added").subnet = subnet;
    add_pods(&mut lab, index)?;
    step("saving the lab state", lab.save())?;
    Ok(lab)
}

/// `weft lab remove-host N`: the host leaves the cluster: daemon stopped, its lease deleted
/// (so the others remove their routes to it), its namespaces removed.
pub fn remove_host(name: &str, index: u8) -> Result<Lab, LabError> {
    let mut lab = load(name)?;
    let pos = host_position(&lab, index)?;
    let host = lab.hosts.remove(pos);
    kill(host.pid, libc::SIGTERM);
    let key = host.subnet.replace('/', "-");
    if lab.store == "kube" {
        super::kube::delete_node(&lab, index)?;
    } else if !key.is_empty() {
        delete_lease(&lab, &key)?;
    }
    for p in &host.pods {
        if let Some(pid) = p.responder_pid {
            kill(pid, libc::SIGKILL);
        }
        if lab.store == "kube" {
            let _ = super::kube::delete_object(&lab, p);
        }
        netns::remove(&p.ns);
    }
    netns::remove(&host.ns);
    let _ = std::fs::remove_dir_all(lab.dir().join(format!("h{index}")));
    step("saving the lab state", lab.save())?;
    Ok(lab)
}

fn delete_lease(lab: &Lab, key: &str) -> Result<(), LabError> {
    if let Some(c) = etcd_cluster(lab) {
        let r = c.etcdctl(&["del", &format!("/coreos.com/network/subnets/{key}")]);
        step("deleting the host's lease", r.map(|_| ()))
    } else if lab.store == "etcd" {
        let lan = Netns::existing(&lab.lan_ns());
        let r = lan.exec(
            "etcdctl",
            &[&format!("--endpoints=http://{LAN}.1:2379"), "del", &format!("/coreos.com/network/subnets/{key}")],
        );
        step("deleting the host's lease", r.map(|_| ()))
    } else {
        let reg = crate::registry::local::LocalRegistry::open(
            &lab.dir().join("leases.db"),
            "/coreos.com/network",
            Path::new("/dev/null"),
        )
        .map_err(|e| LabError::Step(e.to_string()))?;
        let key: weft_core::lease::SubnetKey =
            key.parse().map_err(|e: weft_core::lease::LeaseFormatError| LabError::Step(e.to_string()))?;
        let rt = step("starting a runtime", tokio::runtime::Builder::new_current_thread().enable_all().build())?;
        rt.block_on(async {
            use crate::registry::Registry;
            reg.delete(&key).await
        })
        .map_err(|e| LabError::Step(e.to_string()))
    }
}

/// Whether the daemon of `h` is running and ready.
pub fn health(h: &Host) -> &'static str {
    if !alive(h.pid) {
        return "down";
    }
    match http_get(&h.ns, HEALTH_PORT, "/readyz") {
        Some((200, _)) => "ready",
        Some(_) => "not ready",
        None => "no answer",
    }
}
