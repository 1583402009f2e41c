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
