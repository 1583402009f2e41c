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
            network_policy: false,
            ipv6: false,
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

/// Throughput with and without NetworkPolicies selecting the destination pod.
#[derive(Debug, Clone)]
pub struct PolicyFigures {
    /// Policies selecting the destination.
    pub policies: usize,
    /// Gbit/s without policies (the mean of the runs before and after).
    pub without: f64,
    /// Gbit/s with the policies in force.
    pub with: f64,
    /// The runs without policies, before and after.
    pub without_runs: [f64; 2],
    /// Seconds from creating the policies to seeing them enforced.
    pub enforce_seconds: f64,
}

/// The policies of the benchmark: `n - 1` that each allow one /32 outside the lab on one
/// port (never matching the benchmark's traffic), and one that allows the source pod.
/// Every one selects the destination pod by its `pod` label.
fn bench_policies(ns: &str, dst_label: &str, src: &super::state::Pod, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..n.saturating_sub(1) {
        out.push(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": format!("bench-{i}"), "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"pod": dst_label}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"ipBlock": {"cidr": format!("198.18.{}.{}/32", i / 250, i % 250 + 1)}}],
                    "ports": [{"protocol": "TCP", "port": 1000 + (i % 60000) as u64}],
                }],
            },
        }));
    }
    out.push(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "bench-source", "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"pod": dst_label}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": src.labels.get("pod").cloned().unwrap_or_default()}}}]}],
        },
    }));
    out
}

/// `weft lab bench --policies N`: iperf3 from a pod on the first host to a pod on the
/// second without policies, with `n` policies selecting the destination, and without again
/// (the policies deleted); the ratio is with / mean(without).
pub fn with_policies(lab: &Lab, n: usize, seconds: u32) -> Result<PolicyFigures, LabError> {
    if !lab.network_policy {
        return Err(LabError::Usage(format!(
            "lab {} does not enforce NetworkPolicy: start one with `weft lab up --store kube --network-policy --name {}`",
            lab.name, lab.name
        )));
    }
    let pick = |h: usize| {
        lab.hosts.get(h).and_then(|h| h.pods.iter().find(|p| p.kube_ns == "default" && p.labels.contains_key("pod")))
    };
    let (Some(src), Some(dst)) = (pick(0), pick(1)) else {
        return Err(LabError::Usage(
            "bench --policies needs two hosts with a pod in namespace default each (--pods-per-host 1 or more)".into(),
        ));
    };
    let dst_label = dst.labels.get("pod").cloned().unwrap_or_default();
    let dst_host = lab.hosts[1].ns.clone();
    let (before, _) = measure_between(&src.ns, &dst.ns, &dst.ip, seconds)?;
    let policies = bench_policies("default", &dst_label, src, n);
    let path = super::kube::dir(lab).join("bench-policies.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": policies});
    std::fs::write(&path, list.to_string()).map_err(|e| LabError::Step(format!("writing {}: {e}", path.display())))?;
    let path = path.to_string_lossy().into_owned();
    let created = std::time::Instant::now();
    let cleanup = || {
        let _ = super::kube::kubectl(lab, &["delete", "-f", &path, "--wait=false"]);
    };
    if let Err(e) = super::kube::kubectl(lab, &["create", "--validate=false", "-f", &path]) {
        cleanup();
        return Err(LabError::Step(format!("creating the policies: {e}")));
    }
    // Enforced when the destination's host has the last of the outside /32s in its table
    // and the source still gets through.
    let last = format!("198.18.{}.{}", (n.saturating_sub(2)) / 250, (n.saturating_sub(2)) % 250 + 1);
    let host = Netns::existing(&dst_host);
    let mut enforced = false;
    while created.elapsed() < Duration::from_secs(120) {
        let table = host.exec("nft", &["list", "table", "inet", "weft-netpol"]).unwrap_or_default();
        if table.contains(&last) || (n == 1 && table.contains(&dst.ip)) {
            enforced = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let enforce_seconds = created.elapsed().as_secs_f64();
    if !enforced {
        cleanup();
        return Err(LabError::Step(format!(
            "the {n} policies were not in host {dst_host}'s nft table inet weft-netpol after 120 s"
        )));
    }
    let with = measure_between(&src.ns, &dst.ns, &dst.ip, seconds);
    cleanup();
    let (with, _) = with?;
    // The policies are gone once the destination's host has no table entry for them.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let table = host.exec("nft", &["list", "table", "inet", "weft-netpol"]).unwrap_or_default();
        if !table.contains(&last) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (after, _) = measure_between(&src.ns, &dst.ns, &dst.ip, seconds)?;
    Ok(PolicyFigures {
        policies: n,
        without: (before + after) / 2.0,
        with,
        without_runs: [before, after],
        enforce_seconds,
    })
}

/// The policy benchmark as text.
pub fn policies_render(r: &PolicyFigures) -> String {
    format!(
        "single TCP stream pod -> pod across hosts (iperf3)\n  without policies: {:.2} Gbit/s (runs {:.2} and {:.2})\n  with {} policies selecting the destination: {:.2} Gbit/s (enforced {:.1} s after creation)\n  ratio with / without: {:.3}\n",
        r.without,
        r.without_runs[0],
        r.without_runs[1],
        r.policies,
        r.with,
        r.enforce_seconds,
        r.with / r.without
    )
}

/// The policy benchmark as JSON.
pub fn policies_json(r: &PolicyFigures) -> Value {
    json!({
        "policies": r.policies,
        "gbit_per_s_without": r.without,
        "gbit_per_s_without_runs": r.without_runs,
        "gbit_per_s_with": r.with,
        "ratio": r.with / r.without,
        "enforce_seconds": r.enforce_seconds,
    })
}

/// The median and range of some figures (`None` when there are none).
fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
    Some((median, v[0], v[v.len() - 1]))
}

/// Runs `fresh` `k` times (each run measures every backend, so ratios come from one run)
/// and returns the runs.
pub fn repeated(name: &str, backends: &[(&str, &str)], seconds: u32, k: u32) -> Vec<Vec<Figures>> {
    (0..k.max(1))
        .map(|i| {
            eprintln!("run {} of {}", i + 1, k.max(1));
            fresh(name, backends, seconds)
        })
        .collect()
}

/// Per backend over `runs`: throughput, its ratio to vxlan's in the same run, ping, and
/// ping's ratio to vxlan's, each as (median, min, max).
struct Summary {
    backend: String,
    gbits: Option<(f64, f64, f64)>,
    ratio: Option<(f64, f64, f64)>,
    ping_ms: Option<(f64, f64, f64)>,
    ping_ratio: Option<(f64, f64, f64)>,
    runs: usize,
}

fn summarize(runs: &[Vec<Figures>]) -> Vec<Summary> {
    let mut names: Vec<String> = Vec::new();
    for f in runs.iter().flatten() {
        if !names.contains(&f.backend) {
            names.push(f.backend.clone());
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mut gbits = Vec::new();
            let mut ratio = Vec::new();
            let mut ping = Vec::new();
            let mut ping_ratio = Vec::new();
            let mut n = 0;
            for run in runs {
                let vx = run.iter().find(|f| f.backend == "vxlan");
                let Some(f) = run.iter().find(|f| f.backend == name) else { continue };
                n += 1;
                if let Some(g) = f.gbits {
                    gbits.push(g);
                    if let Some(v) = vx.and_then(|v| v.gbits).filter(|v| *v > 0.0) {
                        ratio.push(g / v);
                    }
                }
                if let Some(p) = f.ping_ms {
                    ping.push(p);
                    if let Some(v) = vx.and_then(|v| v.ping_ms).filter(|v| *v > 0.0) {
                        ping_ratio.push(p / v);
                    }
                }
            }
            Summary {
                backend: name,
                gbits: spread(gbits),
                ratio: spread(ratio),
                ping_ms: spread(ping),
                ping_ratio: spread(ping_ratio),
                runs: n,
            }
        })
        .collect()
}

/// Several runs as one table: medians with ranges; the ratios to vxlan are taken within each
/// run, then their median.
pub fn render_repeated(runs: &[Vec<Figures>]) -> String {
    let cell = |s: Option<(f64, f64, f64)>, f: &dyn Fn(f64) -> String| match s {
        Some((m, lo, hi)) => format!("{} ({}..{})", f(m), f(lo), f(hi)),
        None => "n/a".into(),
    };
    let mut rows = vec![
        ["BACKEND", "GBIT/S MEDIAN (RANGE)", "VS VXLAN", "PING AVG MEDIAN (RANGE)", "PING VS VXLAN", "RUNS"]
            .map(String::from)
            .to_vec(),
    ];
    for s in summarize(runs) {
        rows.push(vec![
            s.backend,
            cell(s.gbits, &|g| format!("{g:.2}")),
            cell(s.ratio, &|r| format!("{r:.2}x")),
            cell(s.ping_ms, &|p| format!("{:.0} us", p * 1000.0)),
            cell(s.ping_ratio, &|r| format!("{r:.2}x")),
            s.runs.to_string(),
        ]);
    }
    let mut out = super::check::table(&rows);
    for (i, run) in runs.iter().enumerate() {
        for f in run.iter().filter(|f| f.note.is_some()) {
            out.push_str(&format!("run {}: {}: {}\n", i + 1, f.backend, f.note.as_deref().unwrap_or("")));
        }
    }
    out
}

/// Several runs as JSON: every run's figures and the per-backend medians and ranges.
pub fn to_json_repeated(runs: &[Vec<Figures>]) -> Value {
    let triple = |s: Option<(f64, f64, f64)>| s.map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi}));
    json!({
        "runs": runs.iter().map(|r| to_json(r)).collect::<Vec<_>>(),
        "summary": summarize(runs).into_iter().map(|s| json!({
            "backend": s.backend,
            "gbit_per_s": triple(s.gbits),
            "ratio_to_vxlan": triple(s.ratio),
            "ping_avg_ms": triple(s.ping_ms),
            "ping_ratio_to_vxlan": triple(s.ping_ratio),
            "runs": s.runs,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(backend: &str, gbits: Option<f64>, ping_ms: Option<f64>) -> Figures {
        Figures { backend: backend.into(), gbits, ping_ms, note: None }
    }

    #[test]
    fn repeated_runs_give_medians_ranges_and_per_run_ratios() {
        let runs = vec![
            vec![fig("vxlan", Some(10.0), Some(0.100)), fig("udp", Some(5.0), Some(0.300))],
            vec![fig("vxlan", Some(20.0), Some(0.200)), fig("udp", Some(18.0), Some(0.220))],
            vec![fig("vxlan", Some(12.0), Some(0.120)), fig("udp", None, None)],
        ];
        let s = summarize(&runs);
        let udp = s.iter().find(|s| s.backend == "udp").unwrap();
        assert_eq!(udp.runs, 3);
        assert_eq!(udp.gbits, Some((11.5, 5.0, 18.0)), "an even count takes the middle two");
        // Ratios within each run (0.5 and 0.9), not the ratio of the medians.
        let (m, lo, hi) = udp.ratio.unwrap();
        assert!((m - 0.7).abs() < 1e-9 && (lo - 0.5).abs() < 1e-9 && (hi - 0.9).abs() < 1e-9, "{:?}", udp.ratio);
        let (pm, _, _) = udp.ping_ratio.unwrap();
        assert!((pm - 2.05).abs() < 1e-9, "{pm}");
        let vx = s.iter().find(|s| s.backend == "vxlan").unwrap();
        assert_eq!(vx.gbits, Some((12.0, 10.0, 20.0)));
        let table = render_repeated(&runs);
        assert!(table.contains("11.50 (5.00..18.00)"), "{table}");
        // NaN (a ping without a summary line) is left out, not sorted into the middle.
        assert_eq!(spread(vec![f64::NAN, 1.0, 3.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(vec![f64::NAN]), None);
    }
}
