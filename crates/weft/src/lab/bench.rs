//! `weft lab bench`: one TCP stream pod to pod across two hosts with iperf3, and ping
//! latency, per backend; `--all` measures every backend in one run.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::netns::Netns;
use super::state::Lab;
use super::topology::{LabError, UpOptions, down, up};

/// One backend's figures.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Backend (or "host (no overlay)").
    pub backend: String,
    /// Throughput of one TCP stream, Gbit/s.
    pub gbits: Option<f64>,
    /// Average ping round trip, ms.
    pub ping_ms: Option<f64>,
    /// Why there is no figure.
    pub note: Option<String>,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// iperf3 from namespace `src` to `dst_ip` (server in namespace `dst`), and ping.
pub fn measure_between(src: &str, dst: &str, dst_ip: &str, seconds: u32) -> Result<(f64, f64), LabError> {
    let server = Netns::existing(dst)
        .command("iperf3")
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| LabError::Step(format!("cannot start iperf3 (install iperf3): {e}")))?;
    let _server = Server(server);
    let client = Netns::existing(src);
    let mut v = Value::Null;
    for _ in 0..50 {
        // The server needs a moment to listen: a refused connection is retried.
        let out =
            client.command("iperf3").args(["-c", dst_ip, "-p", "5201", "-t", &seconds.to_string(), "-J"]).output();
        v = out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(Value::Null);
        if v["error"].as_str().is_some_and(|e| e.contains("refused")) || v.is_null() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        break;
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| LabError::Step(format!("iperf3 result without throughput: {}", v["error"])))?;
    let ping = client
        .exec("ping", &["-c", "50", "-i", "0.01", "-q", dst_ip])
        .map_err(|e| LabError::Step(format!("ping {dst_ip}: {e}")))?;
    // "rtt min/avg/max/mdev = 0.041/0.062/0.134/0.018 ms"
    let avg = ping
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Ok((bps / 1e9, avg))
}

/// Pod on the first host to pod on the second host of a running lab.
pub fn measure(lab: &Lab, seconds: u32) -> Result<Figures, LabError> {
    let pods: Vec<_> = lab.hosts.iter().filter_map(|h| h.pods.first()).take(2).collect();
    let [a, b] = pods[..] else {
        return Err(LabError::Usage("bench needs two hosts with at least one pod each".into()));
    };
    let (gbits, ping) = measure_between(&a.ns, &b.ns, &b.ip, seconds)?;
    Ok(Figures { backend: lab.backend.clone(), gbits: Some(gbits), ping_ms: Some(ping), note: None })
}

/// Every backend, with the suffix its temporary lab's name gets.
pub const BACKENDS: [(&str, &str); 4] = [("vxlan", "vx"), ("host-gw", "hg"), ("udp", "ud"), ("wireguard", "wg")];

/// Brings up a two-host lab per backend in `backends`, measures it, takes it down; with
/// vxlan also the LAN between the two hosts without any overlay, as the ceiling.
pub fn fresh(name: &str, backends: &[(&str, &str)], seconds: u32) -> Vec<Figures> {
    let mut results = Vec::new();
    for &(backend, suffix) in backends {
        let lab_name = format!("{name}{suffix}");
        let o = UpOptions {
            name: lab_name.clone(),
            hosts: 2,
            pods_per_host: 1,
            backend: backend.into(),
            store: "local".into(),
            etcd_members: 1,
            etcd_tls: false,
        };
        let fig = match up(&o) {
            Ok(lab) => {
                let mut f = measure(&lab, seconds).unwrap_or_else(|e| Figures {
                    backend: backend.into(),
                    gbits: None,
                    ping_ms: None,
                    note: Some(e.to_string()),
                });
                if backend == "vxlan" {
                    // Same two hosts, straight over the LAN: what any overlay is measured against.
                    if let Ok((g, p)) = measure_between(&lab.hosts[0].ns, &lab.hosts[1].ns, &lab.hosts[1].ip, seconds) {
                        results.push(Figures {
                            backend: "host (no overlay)".into(),
                            gbits: Some(g),
                            ping_ms: Some(p),
                            note: None,
                        });
                    }
                }
                f.backend = backend.into();
                f
            }
            Err(e) => Figures {
                backend: backend.into(),
                gbits: None,
                ping_ms: None,
                note: Some(e.to_string().lines().last().unwrap_or("").to_string()),
            },
        };
        down(&lab_name);
        results.push(fig);
    }
    results
}

/// The figures as a table, with each throughput's ratio to vxlan's from the same run.
pub fn render(results: &[Figures]) -> String {
    let vxlan = results.iter().find(|f| f.backend == "vxlan").and_then(|f| f.gbits);
    let mut rows = vec![["BACKEND", "GBIT/S", "VS VXLAN", "PING AVG"].map(String::from).to_vec()];
    for f in results {
        let ratio = match (f.gbits, vxlan) {
            (Some(g), Some(v)) if v > 0.0 => format!("{:.2}x", g / v),
            _ => "-".into(),
        };
        rows.push(vec![
            f.backend.clone(),
            f.gbits.map(|g| format!("{g:.2}")).unwrap_or_else(|| "n/a".into()),
            ratio,
            match (&f.ping_ms, &f.note) {
                (Some(p), _) => format!("{:.0} us", p * 1000.0),
                (None, Some(n)) => n.clone(),
                (None, None) => "-".into(),
            },
        ]);
    }
    super::check::table(&rows)
}

/// The figures as JSON.
pub fn to_json(results: &[Figures]) -> Value {
    let vxlan = results.iter().find(|f| f.backend == "vxlan").and_then(|f| f.gbits);
    Value::Array(
        results
            .iter()
            .map(|f| {
                json!({
                    "backend": f.backend,
                    "gbit_per_s": f.gbits,
                    "ratio_to_vxlan": f.gbits.zip(vxlan).map(|(g, v)| g / v),
                    "ping_avg_ms": f.ping_ms,
                    "note": f.note,
                })
            })
            .collect(),
    )
}
