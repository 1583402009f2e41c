//! A cluster's hosts as the data-plane tests see them: each host's lease (read from its
//! subnet file, with a `cni0` bridge holding its first address), `ip -j` output as JSON,
//! and pings between pod addresses of different hosts.

use std::time::Duration;

use serde_json::Value;

use super::cluster::{Cluster, Daemon};
use super::wait_for;

/// A host's lease as the test sees it.
#[derive(Debug, Clone)]
pub struct Host {
    /// `10.5.X.0/24`.
    pub subnet: String,
    /// `10.5.X.0`: the vxlan gateway address of the host.
    pub base: String,
    /// `10.5.X.1`: the address the test puts on the host's `cni0` bridge.
    pub pod_ip: String,
    /// `192.0.2.1N`.
    pub public_ip: String,
}

/// What `program args` printed in namespace `ns`, parsed as JSON.
pub fn json(ns: &weft::lab::netns::Netns, program: &str, args: &[&str]) -> Value {
    serde_json::from_str(&ns.exec(program, args).unwrap()).unwrap()
}

/// Host `i`'s lease, once its subnet file is written; gives the host a `cni0` bridge holding
/// the first address of its subnet (what the CNI bridge plugin does).
pub fn host_info(c: &Cluster, i: usize) -> Host {
    let env = c.wait_env(i);
    let sub = env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap().to_string();
    let pod_ip = sub.split('/').next().unwrap().to_string();
    // strip_suffix, not trim_end_matches: 10.5.1.1 would lose both ".1"s (base 10.5.0).
    let base = pod_ip.strip_suffix(".1").unwrap_or_else(|| panic!("{pod_ip} is not .1")).to_string() + ".0";
    super::cni_bridge(&c.hosts[i], &sub);
    Host { subnet: format!("{base}/24"), base, pod_ip, public_ip: c.lan.host_ip(i as u8 + 1) }
}

/// Starts a daemon on every host (with `extra` flags) and reads each host's lease, giving
/// it its `cni0` bridge ([`host_info`]).
pub fn start_all(c: &Cluster, extra: &[&str]) -> (Vec<Daemon>, Vec<Host>) {
    let daemons: Vec<Daemon> = (0..c.hosts.len()).map(|i| c.daemon(i, extra)).collect();
    let hosts = (0..c.hosts.len()).map(|i| host_info(c, i)).collect();
    (daemons, hosts)
}

/// Host `i`'s main routing table, as `ip -j route` reports it.
pub fn routes(c: &Cluster, i: usize) -> Vec<Value> {
    json(&c.hosts[i], "ip", &["-j", "route", "show", "table", "main"]).as_array().unwrap().clone()
}

/// One ping from host `from`, sent from address `src` to `dst`.
pub fn ping(c: &Cluster, from: usize, src: &str, dst: &str) -> bool {
    c.hosts[from].exec("ping", &["-c", "1", "-W", "1", "-I", src, dst]).is_ok()
}

/// Every host's pod address reaches every other's, each pair within `limit` (the first
/// packet may wait for the peer's entries to be programmed).
pub fn assert_full_mesh(c: &Cluster, hosts: &[Host], limit: Duration) {
    for (i, a) in hosts.iter().enumerate() {
        for b in hosts.iter().filter(|b| b.pod_ip != a.pod_ip) {
            wait_for(limit, &format!("ping {} -> {}", a.pod_ip, b.pod_ip), || {
                ping(c, i, &a.pod_ip, &b.pod_ip).then_some(())
            });
        }
    }
}
