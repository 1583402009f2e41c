//! `weft lab` end to end, as a user runs it: up, check, a daemon crash and restart, a host
//! added and one removed, down; for vxlan and host-gw.

mod common;

use std::time::Duration;

use common::lab::{lab, ok, status};
use common::wait_for;
use serde_json::Value;

fn pod_ips(s: &Value) -> Vec<String> {
    s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| h["pods"].as_array().unwrap().iter().map(|p| p["ip"].as_str().unwrap().to_string()))
        .collect()
}

fn check_passes(name: &str) {
    let out = ok(&["check", "--name", name, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{out}");
}

/// The destinations of the main table of namespace `ns`. A failed `ip` (a namespace gone, a
/// parse error) fails the test: it is not a table without the route.
fn routes(ns: &str) -> Vec<String> {
    let out = weft::lab::netns::ip(&["-n", ns, "-j", "route"]).unwrap_or_else(|e| panic!("routes of {ns}: {e}"));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("`ip -j route` in {ns} printed {out:?}: {e}"));
    v.as_array()
        .unwrap_or_else(|| panic!("`ip -j route` in {ns} printed no list: {v}"))
        .iter()
        .filter_map(|r| r["dst"].as_str().map(String::from))
        .collect()
}

/// The state letter of process `pid` (`R`, `S`, `Z`, ...), or `None` once it is gone.
fn process_state(pid: u64) -> Option<String> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => Some(
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("unreadable /proc/{pid}/stat: {stat:?}"))
                .to_string(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot read /proc/{pid}/stat: {e}"),
    }
}

fn lifecycle(backend: &str, tag: &str) {
    common::require_root();
    // Lab names are letters and digits; leftovers of an earlier run of this test go first.
    weft::lab::netns::remove_prefixed(&format!("wtl{tag}"));
    for entry in std::fs::read_dir(weft::lab::state::STATE_ROOT).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&format!("wtl{tag}")) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let name = format!("wtl{tag}{}", std::process::id() % 100_000);
    let up = ok(&["up", "--name", &name, "--backend", backend, "--hosts", "3", "--pods-per-host", "2"]);
    assert!(up.contains("HOST") && up.contains(&format!("{name}-h3-p2")), "up ends with the lab's summary: {up}");
    let again = lab(&["up", "--name", &name]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&format!("weft lab down --name {name}")),
        "a name in use says how to free it"
    );
    check_passes(&name);

    // A daemon crashes and comes back: pods keep their addresses and traffic still flows.
    let before = status(&name);
    let old_pid = before["hosts"][1]["pid"].as_u64().unwrap();
    ok(&["restart", "2", "--name", &name]);
    let after = status(&name);
    assert_ne!(after["hosts"][1]["pid"].as_u64().unwrap(), old_pid);
    assert_eq!(pod_ips(&after), pod_ips(&before));
    assert_eq!(after["hosts"][1]["subnet"], before["hosts"][1]["subnet"]);
    check_passes(&name);

    // A host joins, another leaves: the others drop their routes to the one that left.
    ok(&["add-host", "--name", &name]);
    let grown = status(&name);
    assert_eq!(grown["hosts"].as_array().unwrap().len(), 4);
    let gone_subnet = grown["hosts"][0]["subnet"].as_str().unwrap().to_string();
    // vxlan and host-gw hold a route per peer; udp routes the whole network into flannel0
    // and keeps its peers in the engine: there, the daemon's peer count tells.
    let per_peer_routes = backend != "udp";
    let peers = |h: &str| -> Option<i64> {
        let (_, body) = weft::lab::netns::http_get(&format!("{name}-{h}"), 8081, "/metrics")?;
        body.lines().find_map(|l| l.strip_prefix("weft_peers ").and_then(|v| v.parse().ok()))
    };
    if per_peer_routes {
        assert!(routes(&format!("{name}-h2")).contains(&gone_subnet));
    }
    wait_for(Duration::from_secs(2), "h2 to know three peers", || (peers("h2") == Some(3)).then_some(()));
    ok(&["remove-host", "1", "--name", &name]);
    for h in ["h2", "h3", "h4"] {
        wait_for(Duration::from_secs(2), "the removed host to be forgotten", || {
            let route_gone = !per_peer_routes || !routes(&format!("{name}-{h}")).contains(&gone_subnet);
            (route_gone && peers(h) == Some(2)).then_some(())
        });
    }
    check_passes(&name);

    // Down leaves no namespace, process or file.
    let pids: Vec<u64> =
        status(&name)["hosts"].as_array().unwrap().iter().map(|h| h["pid"].as_u64().unwrap()).collect();
    assert!(common::namespaces().iter().any(|n| n.starts_with(&format!("{name}-"))), "the lab's namespaces exist");
    for pid in &pids {
        assert!(process_state(*pid).is_some_and(|s| s != "Z"), "daemon {pid} runs before down");
    }
    ok(&["down", "--name", &name]);
    let left: Vec<String> = common::namespaces().into_iter().filter(|n| n.starts_with(&format!("{name}-"))).collect();
    assert!(left.is_empty(), "namespaces left after down: {left:?}");
    for pid in pids {
        // An exited process may linger as a zombie until init reaps it: that is not running.
        let state = process_state(pid);
        assert!(state.as_deref().is_none_or(|s| s == "Z"), "daemon {pid} still runs (state {state:?})");
    }
    assert!(!weft::lab::state::dir(&name).exists());
    assert_eq!(lab(&["status", "--name", &name]).status.code(), Some(1));
}

#[test]
fn lab_lifecycle_with_vxlan() {
    lifecycle("vxlan", "vx");
}

#[test]
fn lab_lifecycle_with_host_gw() {
    lifecycle("host-gw", "hg");
}

#[test]
fn lab_lifecycle_with_udp() {
    lifecycle("udp", "ud");
}

#[test]
fn lab_down_cleans_up_after_an_interrupted_up() {
    common::require_root();
    let name = format!("wtlint{}", std::process::id() % 100_000);
    // What a crashed `up` leaves: namespaces and a state directory, no state file.
    let ns = weft::lab::netns::Netns::add(&format!("{name}-lan")).unwrap().persist();
    std::fs::create_dir_all(weft::lab::state::dir(&name)).unwrap();
    assert!(common::namespaces().contains(&ns), "the leftover namespace exists before down");
    let out = ok(&["down", "--name", &name]);
    assert!(out.contains("removed 1 namespaces"), "{out}");
    assert!(!common::namespaces().contains(&ns), "the leftover namespace is gone after down");
    assert!(!weft::lab::state::dir(&name).exists());
    let bad = lab(&["up", "--name", "Bad-Name"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid lab name"));
}

#[test]
fn bench_measures_a_backend_in_a_lab_of_its_own() {
    common::require_root();
    let name = format!("wtlbn{}", std::process::id() % 100_000);
    let out = ok(&["bench", "--name", &name, "--backend", "host-gw", "--seconds", "1", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let row = &v.as_array().unwrap()[0];
    assert_eq!(row["backend"], "host-gw");
    assert!(row["gbit_per_s"].as_f64().unwrap() > 0.0, "{out}");
    assert!(row["ping_avg_ms"].as_f64().unwrap() > 0.0, "{out}");
    let left: Vec<String> = common::namespaces().into_iter().filter(|n| n.contains(&name)).collect();
    assert!(left.is_empty(), "the temporary lab is gone: {left:?}");
    assert_eq!(lab(&["bench", "--name", &name, "--backend", "ipsec"]).status.code(), Some(2));
}
