//! The Kubernetes store at scale: one host running `weft daemon --kube-subnet-mgr` (vxlan)
//! in a cluster of N peer Nodes on the test API server (`weft::apiserver`, TLS + token, in a
//! LAN namespace this program creates). Measures the time from daemon start to ready, to all
//! peers known, and to all peers programmed in the kernel (a route, a neighbour and an FDB
//! entry each, counted with `ip -j` / `bridge -j`), and the daemon's RSS.
//!
//! `sudo cargo build --release && sudo target/release/examples/kube_scale [N] [--node-kb K]`
//! (default N = 5000; each Node is padded to about K KB (default 5) with status fields a
//! kubelet writes, as real Nodes are 5–15 KB). Peer public IPs are in 198.18.0.0/15
//! (benchmarking range); no packet is sent to them.

#[path = "support/mod.rs"]
mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{rss_mib, weft_bin};
use weft::apiserver::store::WriteOpts;
use weft::apiserver::{ApiServer, Options, resources};
use weft::lab::netns::{Lan, Netns, in_netns};

fn count(host: &Netns, program: &str, args: &[&str]) -> usize {
    let v: Value = serde_json::from_str(&host.exec(program, args).unwrap_or_else(|_| "[]".into())).unwrap_or_default();
    v.as_array().map_or(0, Vec::len)
}

fn kernel_entries(host: &Netns) -> (usize, usize, usize) {
    (
        count(host, "ip", &["-j", "route", "show", "dev", "flannel.1"]),
        count(host, "ip", &["-j", "neigh", "show", "dev", "flannel.1"]),
        count(host, "bridge", &["-j", "fdb", "show", "dev", "flannel.1"]),
    )
}

fn metric(host: &Netns, name: &str) -> Option<i64> {
    let body = host.exec("curl", &["-s", "-m", "2", "http://127.0.0.1:8081/metrics"]).ok()?;
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
    start.elapsed()
}

/// Peer `i` as flanneld leaves it, padded with kubelet-like status to about `kb` KB.
fn peer(i: u32, kb: usize) -> Value {
    let p = "flannel.alpha.coreos.com";
    let s = i + 1000;
    let cidr = format!("10.{}.{}.0/24", 64 + s / 256, s % 256);
    let ip = std::net::Ipv4Addr::from(0xC612_0000u32 + i + 1).to_string();
    let mac = format!("0e:77:{:02x}:{:02x}:{:02x}:01", (i >> 16) as u8, (i >> 8) as u8, i as u8);
    let images: Vec<Value> = (0..(kb * 1024 / 260).max(1))
        .map(|j| {
            json!({"names": [format!("registry.example.com/team-{j}/service-{i}@sha256:{:064x}", u64::from(i) * 1000 + j as u64)],
                   "sizeBytes": 123_456_789 + j})
        })
        .collect();
    json!({
        "metadata": {
            "name": format!("node-{i}"),
            "labels": {"kubernetes.io/hostname": format!("node-{i}"), "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"},
            "annotations": {
                format!("{p}/kube-subnet-manager"): "true",
                format!("{p}/backend-type"): "vxlan",
                format!("{p}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                format!("{p}/public-ip"): ip,
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": format!("node-{i}")}],
            "capacity": {"cpu": "8", "memory": "32780604Ki", "pods": "110"},
            "nodeInfo": {"kubeletVersion": "v1.33.1", "osImage": "Debian GNU/Linux 13", "kernelVersion": "6.12.0",
                         "containerRuntimeVersion": "containerd://2.0.0", "architecture": "amd64", "operatingSystem": "linux"},
            "images": images,
        },
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u32 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5000);
    let kb: usize = args.iter().position(|a| a == "--node-kb").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(5);
    let prefix = "wtkrf-";
    weft::lab::netns::remove_prefixed(prefix);
    let dir = tempfile::tempdir().unwrap();
    let lan = Lan::new(prefix, "192.0.2").unwrap();
    let host = lan.add_host(1).unwrap();
    let opts = Options::new("192.0.2.1:6443".parse().unwrap(), dir.path().join("api"));
    let srv = in_netns(&lan.ns.name, move || ApiServer::start(opts)).unwrap().unwrap();
    let nodes = resources::find("", "v1", "nodes").unwrap();
    let own = json!({"metadata": {"name": "h1"}, "spec": {"podCIDR": "10.64.1.0/24", "podCIDRs": ["10.64.1.0/24"]}});
    srv.store().create(nodes, "", own, WriteOpts::default()).unwrap();
    let t = Instant::now();
    let mut bytes = 0;
    for i in 0..n {
        let node = peer(i, kb);
        bytes += node.to_string().len();
        srv.store().create(nodes, "", node, WriteOpts::default()).unwrap();
    }
    println!(
        "{n} peer Nodes in the API server ({:.1} KB each on average) in {:.1} s",
        bytes as f64 / f64::from(n) / 1024.0,
        t.elapsed().as_secs_f64()
    );
    std::fs::write(dir.path().join("net-conf.json"), r#"{"Network":"10.64.0.0/10","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    let start = Instant::now();
    let d: Child = host
        .command(&weft_bin())
        .args([
            "daemon",
            "--kube-subnet-mgr",
            &format!("--kubeconfig-file={}", dir.path().join("api/kubeconfig").display()),
            &format!("--net-config-path={}", dir.path().join("net-conf.json").display()),
            &format!("--subnet-file={}", dir.path().join("subnet.env").display()),
            "--iface=eth0",
            "--healthz-port=8081",
        ])
        .env("NODE_NAME", "h1")
        .stderr(if std::env::var_os("WEFT_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .unwrap();
    let ready = wait("readiness", Duration::from_secs(120), || metric(&host, "weft_ready ") == Some(1));
    let known =
        wait("all peers known", Duration::from_secs(300), || metric(&host, "weft_peers ") == Some(i64::from(n)));
    let n_us = n as usize;
    wait("a converged kernel", Duration::from_secs(300), || kernel_entries(&host) == (n_us, n_us, n_us));
    let programmed = start.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_mib(d.id());
    // One more change at scale: a node deleted reaches the kernel.
    let t = Instant::now();
    srv.store().delete(nodes, "", "node-0", None, false).unwrap();
    wait("the deleted node's route gone", Duration::from_secs(60), || kernel_entries(&host).0 == n_us - 1);
    let delete_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "kube store, {n} peer nodes (vxlan): ready {:.2} s after start; all peers known {:.2} s after start; all programmed (route, neighbour, FDB each, verified with ip/bridge -j) {:.2} s after start; RSS {rss:.1} MiB; a node deleted -> its route gone in {delete_ms:.0} ms",
        ready.as_secs_f64(),
        (ready + known).as_secs_f64(),
        programmed.as_secs_f64()
    );
    let mut d = d;
    let _ = d.kill();
    let _ = d.wait();
    drop(srv);
}
