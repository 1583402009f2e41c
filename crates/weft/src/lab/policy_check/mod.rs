//! `weft lab policy-check`: the model of the upstream Kubernetes e2e suite
//! (`test/e2e/network/netpol`) run against the lab's daemons. Namespaces x, y, z (labels
//! `ns=<name>`) with pods a, b, c each (labels `pod=<name>`), spread over the hosts; per
//! case the policies go to the API server, and the full 9×9 matrix is probed per port
//! (80, 81) and protocol (TCP, UDP, SCTP), per address family, against a truth table
//! written by hand as upstream does — and that table is checked against the reference
//! evaluator (`weft_core::netpol::eval::allowed`) on the same model first.
//!
//! Traffic from a pod to itself is probed too and always expected to pass: the probe
//! goes to the pod's own address inside its namespace, never leaves it, and "a pod cannot
//! block access to itself" (Kubernetes docs); the evaluator agrees. Upstream ignores the
//! diagonal because its probes go through a Service (hairpin, implementation-defined).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde_json::{Value, json};
use weft_core::netpol::eval::{Conn, Proto, allowed};
use weft_core::netpol::model::{Cluster, Labels, Protocol};

mod cases;

pub use cases::{Case, Combo, ModelPod, NAMESPACES, PODS, Truth, cases, key};
use cases::{N, Step, proto_name};

use super::error::LabError;
use super::kube;
use super::kube::kubectl;
use super::pids;
use super::pods;
use super::probe::{self, Job};
use super::responder::PORTS;
use super::state::Lab;
use super::topology::{self, load};

/// The model's state as the API server holds it: labels and policies, for the evaluator.
struct World {
    ns_labels: BTreeMap<String, Labels>,
    pod_labels: Vec<Labels>,
    policies: BTreeMap<(String, String), Value>,
}

impl World {
    fn new() -> World {
        let ns_labels = NAMESPACES
            .iter()
            .map(|n| {
                let l: Labels =
                    [("kubernetes.io/metadata.name".to_string(), n.to_string()), ("ns".to_string(), n.to_string())]
                        .into();
                (n.to_string(), l)
            })
            .collect();
        let pod_labels = (0..N).map(|i| [("pod".to_string(), PODS[i % 3].to_string())].into()).collect();
        World { ns_labels, pod_labels, policies: BTreeMap::new() }
    }

    fn cluster(&self, lab: &Lab, model: &[ModelPod]) -> Result<Cluster, String> {
        let mut c = Cluster::default();
        for (name, l) in &self.ns_labels {
            let ns: core::Namespace =
                serde_json::from_value(json!({"metadata": {"name": name, "labels": l}})).map_err(|e| e.to_string())?;
            c.namespaces.insert(name.clone(), crate::netpol::namespace(&ns));
        }
        for (i, m) in model.iter().enumerate() {
            let mut p = m.pod.clone();
            p.labels = self.pod_labels[i].clone();
            let obj: core::Pod = serde_json::from_value(kube::object(lab, m.host, &p)).map_err(|e| e.to_string())?;
            c.pods.extend(crate::netpol::pod(&obj));
        }
        for v in self.policies.values() {
            let obj: net::NetworkPolicy = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
            c.policies.push(crate::netpol::policy(&obj).map_err(|e| e.to_string())?);
        }
        Ok(c)
    }
}

/// A cell that differs.
#[derive(Debug, Clone)]
pub struct Diff {
    /// Step number within the case (1-based, counting Expect steps).
    pub check: usize,
    /// The matrix.
    pub combo: Combo,
    /// From pod.
    pub from: String,
    /// To pod.
    pub to: String,
    /// Expected.
    pub expected: bool,
    /// Observed (or the evaluator's verdict).
    pub observed: bool,
}

/// The outcome of one case in one family.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// "IPv4" or "IPv6".
    pub family: &'static str,
    /// Probes run.
    pub probes: usize,
    /// Seconds taken (the whole case, both families).
    pub seconds: f64,
    /// Cells the probes found different from the hand-written table.
    pub mismatches: Vec<Diff>,
    /// Cells where the hand-written table and the reference evaluator disagree.
    pub evaluator_mismatches: Vec<Diff>,
    /// A step that could not be done (API error).
    pub error: Option<String>,
    /// The expected table of each matrix with differing cells (check, combo, table).
    pub expected: Vec<(usize, Combo, Truth)>,
}

impl CaseResult {
    /// Whether the case passed.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty() && self.evaluator_mismatches.is_empty() && self.error.is_none()
    }
}

/// Options of `weft lab policy-check`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lab name.
    pub name: String,
    /// Only cases whose name contains one of these (all when empty).
    pub only: Vec<String>,
    /// How long to wait for a change to be enforced.
    pub wait: Duration,
    /// How long one probe waits for an answer.
    pub probe_timeout: Duration,
}

fn k(lab: &Lab, args: &[&str]) -> Result<String, String> {
    kubectl(lab, args).map_err(|e| e.to_string())
}

fn apply_list(lab: &Lab, verb: &str, items: &[Value]) -> Result<(), String> {
    let path = super::kube::dir(lab).join("policy-check.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&path, list.to_string()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    k(lab, &[verb, "--validate=false", "-f", &path.to_string_lossy()]).map(|_| ())
}

/// Creates (or finds) the model's namespaces and pods; returns the pods in model order.
pub fn setup(lab: &mut Lab) -> Result<Vec<ModelPod>, LabError> {
    let step = |e: String| LabError::Step(e);
    let names: BTreeSet<String> = NAMESPACES.iter().map(|s| s.to_string()).collect();
    kube::ensure_namespaces(lab, &names)?;
    for n in NAMESPACES {
        k(lab, &["label", "namespace", n, &format!("ns={n}"), "ns2-", "--overwrite"]).map_err(step)?;
        k(lab, &["delete", "networkpolicies", "--all", "-n", n]).map_err(step)?;
    }
    let hosts: Vec<u8> = lab.hosts.iter().map(|h| h.index).collect();
    if hosts.is_empty() {
        return Err(LabError::Usage("the lab has no hosts".into()));
    }
    let mut added = Vec::new();
    for i in 0..N {
        let (ns, p) = (NAMESPACES[i / 3], PODS[i % 3]);
        if lab.pods().any(|q| q.kube_ns == ns && q.name == p) {
            continue;
        }
        let host = hosts[i % hosts.len()];
        let labels = [("pod".to_string(), p.to_string())].into();
        let pod = topology::create_pod(lab, host, &pods::netns_name(lab, ns, p), ns, p, labels)?;
        let pos = lab.hosts.iter().position(|h| h.index == host).expect("host exists");
        lab.hosts[pos].pods.push(pod.clone());
        added.push((host, pod));
        lab.save().map_err(|e| LabError::Step(format!("saving the lab state: {e}")))?;
    }
    if !added.is_empty() {
        kube::register(lab, &added)?;
    }
    for i in 0..N {
        let (ns, p) = (NAMESPACES[i / 3], PODS[i % 3]);
        k(lab, &["label", "pod", "-n", ns, p, &format!("pod={p}"), "pod2-", "--overwrite"]).map_err(step)?;
    }
    let mut model = Vec::new();
    for i in 0..N {
        let (ns, p) = (NAMESPACES[i / 3], PODS[i % 3]);
        let (host, pod) = lab
            .hosts
            .iter()
            .find_map(|h| h.pods.iter().find(|q| q.kube_ns == ns && q.name == p).map(|q| (h.index, q.clone())))
            .ok_or_else(|| LabError::Step(format!("pod {ns}/{p} is missing from the lab state")))?;
        if pod.responder_pid.is_none_or(|pid| !pids::alive(pid)) {
            return Err(LabError::Step(format!(
                "the responder of pod {ns}/{p} is not running; recreate the pod: weft lab pod del --name {0} --namespace {ns} --pod {p}",
                lab.name
            )));
        }
        model.push(ModelPod { pod, host });
    }
    Ok(model)
}

fn combos(v6: &[bool]) -> Vec<Combo> {
    let mut out = Vec::new();
    for &v6 in v6 {
        for proto in Protocol::ALL {
            for port in PORTS {
                out.push(Combo { proto, port, v6 });
            }
        }
    }
    out
}

fn addr(m: &ModelPod, v6: bool) -> Option<IpAddr> {
    if v6 { m.pod.ip6.as_deref()?.parse().ok() } else { m.pod.ip.parse().ok() }
}

/// Expected cells per combo.
type Tables = BTreeMap<Combo, Truth>;

/// Probes `cells` (combo, from, to); returns what each observed.
fn probe_cells(model: &[ModelPod], cells: &[(Combo, usize, usize)], timeout: Duration) -> Vec<bool> {
    let jobs: Vec<Job> = cells
        .iter()
        .map(|&(c, f, t)| Job {
            src: model[f].pod.ns.clone(),
            dst: model[t].pod.ns.clone(),
            dst_ip: addr(&model[t], c.v6).unwrap_or(IpAddr::from([0, 0, 0, 0])),
            proto: c.proto,
            port: c.port,
        })
        .collect();
    probe::run(&jobs, timeout)
}

/// Probes until every cell of `want` that differs from `before` has the wanted value (the
/// change is enforced) or `wait` passes, then the rest once, then what still differs once
/// more (upstream's second try). Returns the cells that differ, with what they showed.
fn observe(
    model: &[ModelPod],
    before: &Tables,
    want: &Tables,
    moved: &[usize],
    o: &Options,
) -> Vec<(Combo, usize, usize, bool)> {
    let all: Vec<(Combo, usize, usize)> =
        want.keys().flat_map(|&c| (0..N).flat_map(move |f| (0..N).map(move |t| (c, f, t)))).collect();
    let expected = |&(c, f, t): &(Combo, usize, usize)| want[&c].0[f][t];
    // Cells of a pod with a new address count as changed: the daemons must learn it.
    let changed: Vec<_> = all
        .iter()
        .copied()
        .filter(|&(c, f, t)| {
            moved.contains(&f) || moved.contains(&t) || before.get(&c).is_none_or(|b| b.0[f][t] != want[&c].0[f][t])
        })
        .collect();
    let mut pending = changed.clone();
    let start = Instant::now();
    while !pending.is_empty() {
        let seen = probe_cells(model, &pending, o.probe_timeout);
        pending = pending.into_iter().zip(seen).filter(|(cell, s)| *s != expected(cell)).map(|(c, _)| c).collect();
        if pending.is_empty() || start.elapsed() > o.wait {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let changed_set: BTreeSet<_> = changed.iter().map(|&(c, f, t)| (c, f, t)).collect();
    let mut rest: Vec<_> = all.iter().copied().filter(|cell| !changed_set.contains(cell)).collect();
    rest.extend(pending);
    let seen = probe_cells(model, &rest, o.probe_timeout);
    let mut wrong: Vec<_> =
        rest.into_iter().zip(seen).filter(|(cell, s)| *s != expected(cell)).map(|(c, _)| c).collect();
    if !wrong.is_empty() {
        std::thread::sleep(Duration::from_secs(1));
        let seen = probe_cells(model, &wrong, o.probe_timeout);
        wrong = wrong.into_iter().zip(seen).filter(|(cell, s)| *s != expected(cell)).map(|(c, _)| c).collect();
    }
    wrong.into_iter().map(|(c, f, t)| (c, f, t, !want[&c].0[f][t])).collect()
}

/// Does a step's change in the API server.
fn api_step(lab: &Lab, step: &Step) -> Result<(), String> {
    match step {
        Step::Create(items) => apply_list(lab, "create", items),
        Step::Replace(p) => apply_list(lab, "replace", std::slice::from_ref(p)),
        Step::Delete(ns, name) => k(lab, &["delete", "networkpolicy", "-n", ns, name]).map(|_| ()),
        Step::LabelPod(pod, key, value) => {
            let (ns, name) = pod.split_once('/').unwrap_or((pod, ""));
            let arg = match value {
                Some(v) => format!("{key}={v}"),
                None => format!("{key}-"),
            };
            k(lab, &["label", "pod", "-n", ns, name, &arg, "--overwrite"]).map(|_| ())
        }
        Step::LabelNs(ns, key, value) => {
            let arg = match value {
                Some(v) => format!("{key}={v}"),
                None => format!("{key}-"),
            };
            k(lab, &["label", "namespace", ns, &arg, "--overwrite"]).map(|_| ())
        }
        Step::Expect(_) | Step::Recreate(_) => Ok(()),
    }
}

fn policy_id(p: &Value) -> (String, String) {
    (
        p["metadata"]["namespace"].as_str().unwrap_or("").to_string(),
        p["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

/// Does a step's change in the model the evaluator reads.
fn world_step(world: &mut World, step: &Step) {
    match step {
        Step::Create(items) => {
            for p in items {
                world.policies.insert(policy_id(p), p.clone());
            }
        }
        Step::Replace(p) => {
            world.policies.insert(policy_id(p), p.clone());
        }
        Step::Delete(ns, name) => {
            world.policies.remove(&(ns.to_string(), name.to_string()));
        }
        Step::LabelPod(pod, key, value) => {
            if let Some(i) = (0..N).find(|&i| key_of(i) == *pod) {
                match value {
                    Some(v) => world.pod_labels[i].insert(key.to_string(), v.to_string()),
                    None => world.pod_labels[i].remove(*key),
                };
            }
        }
        Step::LabelNs(ns, key, value) => {
            let l = world.ns_labels.entry(ns.to_string()).or_default();
            match value {
                Some(v) => l.insert(key.to_string(), v.to_string()),
                None => l.remove(*key),
            };
        }
        Step::Expect(_) | Step::Recreate(_) => {}
    }
}

/// The cells where the hand-written tables `want` and the reference evaluator disagree.
fn evaluator_diffs(
    world: &World,
    lab: &Lab,
    model: &[ModelPod],
    want: &Tables,
    check: usize,
) -> Result<Vec<Diff>, String> {
    let cluster = world.cluster(lab, model)?;
    let combos: Vec<Combo> = want.keys().copied().collect();
    let ev = evaluator_tables(&cluster, model, &combos);
    let mut out = Vec::new();
    for (&c, t) in want {
        for fr in 0..N {
            for to in 0..N {
                if ev[&c].0[fr][to] != t.0[fr][to] {
                    out.push(Diff {
                        check,
                        combo: c,
                        from: key(fr),
                        to: key(to),
                        expected: t.0[fr][to],
                        observed: ev[&c].0[fr][to],
                    });
                }
            }
        }
    }
    Ok(out)
}

fn key_of(i: usize) -> String {
    key(i)
}

/// Undoes a case: its policies deleted, labels back to the model's.
fn clean(lab: &Lab, world: &mut World) -> Result<(), String> {
    for (ns, name) in std::mem::take(&mut world.policies).into_keys() {
        k(lab, &["delete", "networkpolicy", "-n", &ns, &name])?;
    }
    let fresh = World::new();
    for (i, l) in world.pod_labels.clone().iter().enumerate() {
        for key in l.keys().filter(|key| !fresh.pod_labels[i].contains_key(*key)) {
            let (ns, name) = (NAMESPACES[i / 3], PODS[i % 3]);
            k(lab, &["label", "pod", "-n", ns, name, &format!("{key}-")])?;
        }
    }
    for (ns, l) in world.ns_labels.clone() {
        for key in l.keys().filter(|key| !fresh.ns_labels[&ns].contains_key(*key)) {
            k(lab, &["label", "namespace", &ns, &format!("{key}-")])?;
        }
    }
    *world = fresh;
    Ok(())
}

fn evaluator_tables(cluster: &Cluster, model: &[ModelPod], combos: &[Combo]) -> Tables {
    let mut out = Tables::new();
    for &c in combos {
        let mut t = [[false; N]; N];
        for f in 0..N {
            for to in 0..N {
                let (Some(src), Some(dst)) = (addr(&model[f], c.v6), addr(&model[to], c.v6)) else { continue };
                t[f][to] = allowed(cluster, &Conn { src, dst, proto: Proto::L4(c.proto), port: c.port });
            }
        }
        out.insert(c, Truth(t));
    }
    out
}

/// Deletes model pod `key` (`ns/pod`) and adds it again on its host with its labels.
fn recreate(lab: &mut Lab, model: &mut [ModelPod], world: &World, pod: &str) -> Result<usize, LabError> {
    let i = (0..N).find(|&i| key(i) == pod).ok_or_else(|| LabError::Step(format!("no model pod {pod}")))?;
    let (ns, name) = (NAMESPACES[i / 3], PODS[i % 3]);
    let labels: Vec<String> = world.pod_labels[i].iter().map(|(k, v)| format!("{k}={v}")).collect();
    pods::del(&lab.name, ns, name)?;
    *lab = pods::add(&lab.name, model[i].host, ns, name, &labels.join(","))?;
    model[i].pod = lab
        .pods()
        .find(|p| p.kube_ns == ns && p.name == name)
        .cloned()
        .ok_or_else(|| LabError::Step(format!("pod {pod} is missing after it was added again")))?;
    Ok(i)
}

/// Runs the check; one result per case and family.
pub fn run(o: &Options) -> Result<Vec<CaseResult>, LabError> {
    let mut lab = load(&o.name)?;
    if !lab.network_policy || lab.store != "kube" {
        return Err(LabError::Usage(format!(
            "lab {} does not enforce NetworkPolicy: start one with `weft lab up --store kube --network-policy --name {}`",
            lab.name, lab.name
        )));
    }
    eprintln!("policy-check: setting up namespaces x, y, z and pods a, b, c ...");
    let mut model = setup(&mut lab)?;
    let families: Vec<bool> = if lab.ipv6 { vec![false, true] } else { vec![false] };
    let combos = combos(&families);
    let mut world = World::new();
    let mut results = Vec::new();
    let allowed_all: Tables = combos.iter().map(|&c| (c, Truth::all())).collect();
    let all_cases = cases(&model, lab.ipv6);
    for case in all_cases {
        if !o.only.is_empty() && !o.only.iter().any(|w| case.name.contains(w.as_str())) {
            continue;
        }
        let start = Instant::now();
        let mut per: BTreeMap<bool, CaseResult> = families
            .iter()
            .map(|&v6| {
                (
                    v6,
                    CaseResult {
                        name: case.name.into(),
                        family: if v6 { "IPv6" } else { "IPv4" },
                        probes: 0,
                        seconds: 0.0,
                        mismatches: Vec::new(),
                        evaluator_mismatches: Vec::new(),
                        error: None,
                        expected: Vec::new(),
                    },
                )
            })
            .collect();
        let mut before = allowed_all.clone();
        let mut check = 0;
        let mut error = None;
        let mut moved = Vec::new();
        for step in &case.steps {
            if let Step::Recreate(p) = step {
                match recreate(&mut lab, &mut model, &world, p) {
                    Ok(i) => moved.push(i),
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Err(e) = api_step(&lab, step) {
                error = Some(e);
                break;
            }
            world_step(&mut world, step);
            let Step::Expect(f) = step else { continue };
            check += 1;
            let want: Tables = combos.iter().map(|&c| (c, f(c).with_self())).collect();
            match evaluator_diffs(&world, &lab, &model, &want, check) {
                Ok(diffs) => {
                    for d in diffs {
                        per.get_mut(&d.combo.v6).expect("family").evaluator_mismatches.push(d);
                    }
                }
                Err(e) => {
                    error = Some(format!("building the evaluator's model: {e}"));
                    break;
                }
            }
            let wrong = observe(&model, &before, &want, &std::mem::take(&mut moved), o);
            for v6 in &families {
                per.get_mut(v6).expect("family").probes += want.keys().filter(|c| c.v6 == *v6).count() * N * N;
            }
            let mut shown = BTreeSet::new();
            for &(c, _, _, _) in &wrong {
                if shown.insert(c) {
                    per.get_mut(&c.v6).expect("family").expected.push((check, c, want[&c]));
                }
            }
            for (c, fr, to, seen) in wrong {
                per.get_mut(&c.v6).expect("family").mismatches.push(Diff {
                    check,
                    combo: c,
                    from: key(fr),
                    to: key(to),
                    expected: want[&c].0[fr][to],
                    observed: seen,
                });
            }
            before = want;
        }
        // Back to no policy: wait until what was denied passes again, so the next case
        // starts from a clean cluster.
        if let Err(e) = clean(&lab, &mut world) {
            error.get_or_insert(format!("cleaning up: {e}"));
        } else if before != allowed_all {
            let wrong = observe(&model, &before, &allowed_all, &[], o);
            if !wrong.is_empty() && error.is_none() {
                error = Some(format!(
                    "after its policies were deleted, {} cells were still denied, e.g. {} {}/{} {} -> {}",
                    wrong.len(),
                    if wrong[0].0.v6 { "IPv6" } else { "IPv4" },
                    proto_name(wrong[0].0.proto),
                    wrong[0].0.port,
                    key(wrong[0].1),
                    key(wrong[0].2)
                ));
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        for (_, mut r) in per {
            r.seconds = seconds;
            r.error.clone_from(&error);
            eprintln!("  {} {:<55} {}  {} probes", if r.ok() { "PASS" } else { "FAIL" }, r.name, r.family, r.probes);
            results.push(r);
        }
    }
    Ok(results)
}

fn diff_json(d: &Diff) -> Value {
    json!({
        "check": d.check,
        "protocol": proto_name(d.combo.proto),
        "port": d.combo.port,
        "family": if d.combo.v6 { "IPv6" } else { "IPv4" },
        "from": d.from,
        "to": d.to,
        "expected": if d.expected { "allowed" } else { "denied" },
        "observed": if d.observed { "allowed" } else { "denied" },
    })
}

/// The results as JSON.
pub fn to_json(results: &[CaseResult]) -> Value {
    json!({
        "ok": results.iter().all(CaseResult::ok),
        "cases": results.iter().map(|r| json!({
            "name": r.name,
            "family": r.family,
            "ok": r.ok(),
            "probes": r.probes,
            "seconds": (r.seconds * 10.0).round() / 10.0,
            "mismatches": r.mismatches.iter().map(diff_json).collect::<Vec<_>>(),
            "evaluator_mismatches": r.evaluator_mismatches.iter().map(diff_json).collect::<Vec<_>>(),
            "error": r.error,
        })).collect::<Vec<_>>(),
    })
}

/// The results as text: one line per case and family, the differing cells of failures.
pub fn render(results: &[CaseResult]) -> String {
    let mut out = String::new();
    for r in results {
        out.push_str(&format!(
            "{}  {:<55} {}  {:>4} probes  {:.1} s\n",
            if r.ok() { "PASS" } else { "FAIL" },
            r.name,
            r.family,
            r.probes,
            r.seconds
        ));
        if let Some(e) = &r.error {
            out.push_str(&format!("      error: {e}\n"));
        }
        for &(check, c, t) in &r.expected {
            out.push_str(&format!(
                "      check {check}, {} {}/{}: rows from, columns to; . allowed and X denied as expected, \
                 + allowed but expected denied, - denied but expected allowed\n",
                if c.v6 { "IPv6" } else { "IPv4" },
                proto_name(c.proto),
                c.port
            ));
            out.push_str(&format!("      {:>5}{}\n", "", (0..N).map(|i| format!("{:>4}", key(i))).collect::<String>()));
            for f in 0..N {
                let row: String = (0..N)
                    .map(|to| {
                        let wrong = r
                            .mismatches
                            .iter()
                            .any(|d| d.check == check && d.combo == c && d.from == key(f) && d.to == key(to));
                        let sym = match (t.0[f][to], wrong) {
                            (true, false) => ".",
                            (false, false) => "X",
                            (false, true) => "+",
                            (true, true) => "-",
                        };
                        format!("{sym:>4}")
                    })
                    .collect();
                out.push_str(&format!("      {:>5}{row}\n", key(f)));
            }
        }
        for d in r.evaluator_mismatches.iter().take(20) {
            out.push_str(&format!(
                "      hand table vs evaluator: check {} {} {}/{} {} -> {}: the table says {}, the evaluator {}\n",
                d.check,
                if d.combo.v6 { "IPv6" } else { "IPv4" },
                proto_name(d.combo.proto),
                d.combo.port,
                d.from,
                d.to,
                if d.expected { "allowed" } else { "denied" },
                if d.observed { "allowed" } else { "denied" },
            ));
        }
        if r.evaluator_mismatches.len() > 20 {
            out.push_str(&format!("      ... and {} more (see --json)\n", r.evaluator_mismatches.len() - 20));
        }
    }
    let failed = results.iter().filter(|r| !r.ok()).count();
    out.push_str(&format!("\n{} of {} cases passed\n", results.len() - failed, results.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::cases::{all, np};
    use super::*;
    use crate::lab::state::{Host, Pod};

    fn fake() -> (Lab, Vec<ModelPod>) {
        let hosts = (1..=3u8)
            .map(|i| Host {
                index: i,
                ns: format!("t-h{i}"),
                ip: format!("192.0.2.{}", 10 + i),
                pid: 0,
                subnet: format!("10.244.{i}.0/24"),
                pods: Vec::new(),
            })
            .collect();
        let lab = Lab {
            name: "t".into(),
            backend: "vxlan".into(),
            store: "kube".into(),
            pods_per_host: 0,
            etcd_pid: None,
            apiserver_pid: None,
            hosts,
            network_policy: true,
            ipv6: true,
        };
        let model = (0..N)
            .map(|i| {
                let host = (i % 3) as u8 + 1;
                ModelPod {
                    host,
                    pod: Pod {
                        ns: format!("t-pod-{}", key(i).replace('/', "-")),
                        container_id: String::new(),
                        ip: format!("10.244.{host}.{}", 10 + i),
                        ip6: Some(format!("fd00:10:244:{host}::{:x}", 10 + i)),
                        kube_ns: NAMESPACES[i / 3].into(),
                        name: PODS[i % 3].into(),
                        labels: [("pod".to_string(), PODS[i % 3].to_string())].into(),
                        responder_pid: None,
                    },
                }
            })
            .collect();
        (lab, model)
    }

    #[test]
    fn every_hand_written_table_agrees_with_the_reference_evaluator() {
        let (lab, model) = fake();
        let combos = combos(&[false, true]);
        let cases = cases(&model, true);
        assert!(cases.len() >= 23, "{} cases", cases.len());
        for case in &cases {
            let mut world = World::new();
            let mut check = 0;
            for step in &case.steps {
                world_step(&mut world, step);
                let Step::Expect(f) = step else { continue };
                check += 1;
                let want: Tables = combos.iter().map(|&c| (c, f(c).with_self())).collect();
                let diffs = evaluator_diffs(&world, &lab, &model, &want, check).unwrap();
                assert!(diffs.is_empty(), "{} check {check}: {diffs:?}", case.name);
            }
        }
    }

    #[test]
    fn a_wrong_hand_table_is_caught_by_the_evaluator() {
        let (lab, model) = fake();
        let mut world = World::new();
        world_step(&mut world, &Step::Create(vec![np("x", "deny-in", all(), &["Ingress"], None, None)]));
        let c = Combo { proto: Protocol::Udp, port: 81, v6: true };
        // Forgot that x/c is isolated too.
        let wrong = Truth::all().deny_to("x/a", &[]).deny_to("x/b", &[]).with_self();
        let diffs = evaluator_diffs(&world, &lab, &model, &[(c, wrong)].into(), 1).unwrap();
        assert_eq!(diffs.len(), 8, "{diffs:?}");
        assert!(diffs.iter().all(|d| d.to == "x/c" && d.expected && !d.observed && d.from != "x/c"));
    }

    #[test]
    fn a_failure_prints_its_matrix_with_the_differing_cells_marked() {
        let c = Combo { proto: Protocol::Sctp, port: 81, v6: false };
        let want = Truth::all().deny_to("x/a", &[]).with_self();
        let diff = |from: &str, expected| Diff {
            check: 2,
            combo: c,
            from: from.into(),
            to: "x/a".into(),
            expected,
            observed: !expected,
        };
        let r = CaseResult {
            name: "demo".into(),
            family: "IPv4",
            probes: 486,
            seconds: 1.0,
            mismatches: vec![diff("y/b", false)],
            evaluator_mismatches: vec![],
            error: None,
            expected: vec![(2, c, want)],
        };
        let text = render(std::slice::from_ref(&r));
        assert!(text.starts_with("FAIL  demo"), "{text}");
        assert!(text.contains("check 2, IPv4 SCTP/81"), "{text}");
        // A matrix row names one pod; the header names all nine.
        let row = |k: &str| {
            let is_row = |l: &&str| l.trim_start().starts_with(k) && l.matches('/').count() == 1;
            text.lines().find(is_row).unwrap().to_string()
        };
        assert!(row("y/b").split_whitespace().nth(1) == Some("+"), "{text}");
        assert!(row("y/a").split_whitespace().nth(1) == Some("X"), "{text}");
        assert!(row("x/a").split_whitespace().nth(1) == Some("."), "a pod reaches itself: {text}");
        assert!(text.contains("0 of 1 cases passed"), "{text}");
        let j = to_json(&[r]);
        assert_eq!(j["ok"], false);
        assert_eq!(j["cases"][0]["mismatches"][0]["observed"], "allowed");
        assert_eq!(j["cases"][0]["mismatches"][0]["protocol"], "SCTP");
    }

    #[test]
    fn truth_patterns_mark_rows_columns_and_cells() {
        let t = Truth::all().deny_to("x/*", &["y/a"]).with_self();
        let idx = |k: &str| (0..N).find(|&i| key(i) == k).unwrap();
        assert!(!t.0[idx("z/c")][idx("x/b")]);
        assert!(t.0[idx("y/a")][idx("x/b")], "the exception");
        assert!(t.0[idx("x/b")][idx("x/b")], "a pod reaches itself");
        assert!(t.0[idx("x/a")][idx("y/b")], "other columns untouched");
        let r = Truth::all().deny_from("*/b", &["z/*"]);
        assert!(!r.0[idx("y/b")][idx("x/a")] && r.0[idx("y/b")][idx("z/a")] && r.0[idx("y/a")][idx("x/a")]);
    }
}
