//! `weft lab status` and `weft lab check`: what runs, and whether every pod reaches every
//! other pod and the outside host.

use std::sync::mpsc;

use serde_json::{Value, json};

use super::netns::Netns;
use super::state::Lab;
use super::topology::{OUTSIDE_IP, health};

/// The status as JSON.
pub fn status_json(lab: &Lab) -> Value {
    json!({
        "name": lab.name,
        "backend": lab.backend,
        "store": lab.store,
        "network_policy": lab.network_policy,
        "ipv6": lab.ipv6,
        "kubeconfig": (lab.store == "kube").then(|| super::kube::kubeconfig_path(lab)),
        "hosts": lab.hosts.iter().map(|h| json!({
            "host": format!("h{}", h.index),
            "namespace": h.ns,
            "ip": h.ip,
            "subnet": h.subnet,
            "pid": h.pid,
            "health": health(h),
            "pods": h.pods.iter().map(|p| {
                let mut v = json!({"namespace": p.ns, "netns": p.ns, "ip": p.ip});
                if let Some(ip6) = &p.ip6 {
                    v["ip6"] = json!(ip6);
                }
                if !p.name.is_empty() {
                    v["kube_namespace"] = json!(p.kube_ns);
                    v["name"] = json!(p.name);
                    v["labels"] = json!(p.labels);
                }
                v
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The status as a table.
pub fn status_table(lab: &Lab) -> String {
    let mut rows = vec![["HOST", "NAMESPACE", "IP", "SUBNET", "PID", "HEALTH", "PODS"].map(String::from).to_vec()];
    for h in &lab.hosts {
        let pods = h.pods.iter().map(|p| format!("{} {}", p.ns, p.ip)).collect::<Vec<_>>().join(", ");
        rows.push(vec![
            format!("h{}", h.index),
            h.ns.clone(),
            h.ip.clone(),
            h.subnet.clone(),
            h.pid.to_string(),
            health(h).into(),
            pods,
        ]);
    }
    let mut out = format!(
        "lab {}: backend {}, store {}, outside host {OUTSIDE_IP} ({}-out)\n",
        lab.name, lab.backend, lab.store, lab.name
    );
    out.push_str(&table(&rows));
    out
}

/// Rows as aligned columns.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One ping of the check.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Source pod namespace.
    pub from: String,
    /// Destination: a pod namespace or "outside".
    pub to: String,
    /// Destination address.
    pub ip: String,
    /// Whether it answered.
    pub ok: bool,
}

fn ping(ns: &str, ip: &str) -> bool {
    let n = Netns::existing(ns);
    // Three tries: the first packet to a new neighbour may be spent on ARP.
    n.exec("ping", &["-c", "1", "-W", "1", ip]).is_ok() || n.exec("ping", &["-c", "2", "-W", "1", ip]).is_ok()
}

/// Pings every pod from every other pod, and the outside host from every pod.
pub fn check(lab: &Lab) -> Vec<Probe> {
    let pods: Vec<(String, String)> =
        lab.hosts.iter().flat_map(|h| h.pods.iter().map(|p| (p.ns.clone(), p.ip.clone()))).collect();
    let mut jobs = Vec::new();
    for (from, _) in &pods {
        for (to, ip) in &pods {
            if from != to {
                jobs.push((from.clone(), to.clone(), ip.clone()));
            }
        }
        jobs.push((from.clone(), "outside".to_string(), OUTSIDE_IP.to_string()));
    }
    // A few pings at a time: quick, without flooding a 2-core machine.
    let (tx, rx) = mpsc::channel();
    let chunks: Vec<Vec<(String, String, String)>> =
        jobs.chunks(jobs.len().div_ceil(8).max(1)).map(<[_]>::to_vec).collect();
    std::thread::scope(|s| {
        for chunk in chunks {
            let tx = tx.clone();
            s.spawn(move || {
                for (from, to, ip) in chunk {
                    let ok = ping(&from, &ip);
                    let _ = tx.send(Probe { from, to, ip, ok });
                }
            });
        }
    });
    drop(tx);
    let mut probes: Vec<Probe> = rx.into_iter().collect();
    let order = |n: &str| pods.iter().position(|(p, _)| p == n).unwrap_or(usize::MAX);
    probes.sort_by_key(|p| (order(&p.from), order(&p.to)));
    probes
}

/// The check as a matrix: rows are sources, columns destinations.
pub fn matrix(lab: &Lab, probes: &[Probe]) -> String {
    let pods: Vec<String> = lab.hosts.iter().flat_map(|h| h.pods.iter().map(|p| p.ns.clone())).collect();
    let short = |n: &str| n.strip_prefix(&format!("{}-", lab.name)).unwrap_or(n).to_string();
    let mut header = vec!["from \\ to".to_string()];
    header.extend(pods.iter().map(|p| short(p)));
    header.push("outside".into());
    let mut rows = vec![header];
    for from in &pods {
        let mut row = vec![short(from)];
        for to in pods.iter().map(String::as_str).chain(["outside"]) {
            let cell = if to == from {
                "-".to_string()
            } else {
                match probes.iter().find(|p| &p.from == from && p.to == to) {
                    Some(p) if p.ok => "ok".into(),
                    Some(_) => "FAIL".into(),
                    None => "?".into(),
                }
            };
            row.push(cell);
        }
        rows.push(row);
    }
    table(&rows)
}
