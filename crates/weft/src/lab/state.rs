//! What a running lab consists of, saved as JSON in its state directory so every `weft lab`
//! command (and `down` after a crash) can find it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The LAN's /24 (TEST-NET-1: documentation addresses, used only inside the lab).
pub const LAN: &str = "192.0.2";

/// The LAN's IPv6 /64 in a dual-stack lab (ULA, only inside the lab); hosts are `::<10+N>`.
pub const LAN6: &str = "fd00:192::";

/// The pod network's IPv6 range in a dual-stack lab.
pub const NETWORK6: &str = "fd00:10:244::/56";

/// Where labs keep their state.
pub const STATE_ROOT: &str = "/run/weft-lab";

/// A pod: a network namespace given an address by the CNI plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pod {
    /// Namespace name.
    pub ns: String,
    /// CNI container ID.
    pub container_id: String,
    /// Address (without prefix length).
    pub ip: String,
    /// IPv6 address in a dual-stack lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<String>,
    /// Kubernetes namespace of its Pod object (labs with the kube store).
    #[serde(default)]
    pub kube_ns: String,
    /// Name of its Pod object.
    #[serde(default)]
    pub name: String,
    /// Labels of its Pod object.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The responder serving TCP, UDP on ports 80 and 81 in the pod (labs with the kube store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responder_pid: Option<u32>,
}

/// A host: a namespace on the LAN running `weft daemon`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Host {
    /// Host number (1-based).
    pub index: u8,
    /// Namespace name.
    pub ns: String,
    /// Address on the LAN.
    pub ip: String,
    /// Daemon process.
    pub pid: u32,
    /// Lease subnet (from its subnet.env).
    pub subnet: String,
    /// Its pods.
    pub pods: Vec<Pod>,
}

/// A lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lab {
    /// Name; every namespace of the lab starts with `<name>-`.
    pub name: String,
    /// Backend type.
    pub backend: String,
    /// "local" or "etcd".
    pub store: String,
    /// Pods created per host.
    pub pods_per_host: u8,
    /// The etcd process, with `--store etcd`.
    pub etcd_pid: Option<u32>,
    /// The test Kubernetes API server, with `--store kube`.
    #[serde(default)]
    pub apiserver_pid: Option<u32>,
    /// Hosts.
    pub hosts: Vec<Host>,
    /// Daemons enforce NetworkPolicy (`--network-policy`, kube store only).
    #[serde(default)]
    pub network_policy: bool,
    /// Dual-stack: hosts, subnets and pods have IPv6 addresses too.
    #[serde(default)]
    pub ipv6: bool,
}

/// A lab's state directory.
pub fn dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

impl Lab {
    /// Reads a lab's state, if it exists.
    pub fn load(name: &str) -> Option<Lab> {
        let text = std::fs::read_to_string(dir(name).join("state.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Saves the state (atomically).
    pub fn save(&self) -> std::io::Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&dir(&self.name).join("state.json"), &data, 0o644, 0o755)
    }

    /// The lab's state directory.
    pub fn dir(&self) -> PathBuf {
        dir(&self.name)
    }

    /// Namespace of the LAN bridge (and of etcd).
    pub fn lan_ns(&self) -> String {
        format!("{}-lan", self.name)
    }

    /// Every pod of the lab.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.hosts.iter().flat_map(|h| h.pods.iter())
    }

    /// Namespace of the outside host.
    pub fn outside_ns(&self) -> String {
        format!("{}-out", self.name)
    }
}
