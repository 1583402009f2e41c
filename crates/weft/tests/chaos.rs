//! `weft lab chaos` per kernel backend, as a user runs it: a lab is built, a short seeded
//! chaos run injects every kind of fault that applies, and the run must end with exit 0: every
//! fault repaired, no rule broken, the lab whole. The lab is then checked independently
//! (real pings between all pods, the kernel's routes with `ip -j`). A harness that cannot
//! fail proves nothing: each test first shows it rejects a lab with a hijacked LAN route. On a
//! multi-member etcd cluster, members are also killed, cut off from their peers, and the
//! leader killed.

mod common;

use std::process::{Command, Output};

use common::weft_bin;
use serde_json::Value;

fn lab(args: &[&str]) -> Output {
    Command::new(weft_bin()).arg("lab").args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Takes the lab down when the test ends, also when it fails.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = lab(&["down", "--name", &self.0]);
    }
}

fn routes(ns: &str) -> Vec<Value> {
    let out = Command::new("ip").args(["-n", ns, "-j", "route"]).output().unwrap();
    serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// One chaos run of `seconds` on a lab of `backend` and `store` (with `extra` flags for
/// `weft lab up`); `applicable` kinds of the 15 apply, and each kind of `must` is injected.
fn chaos(backend: &str, store: &str, extra: &[&str], tag: &str, applicable: usize, seconds: u64, must: &[&str]) {
    // Leftovers of an earlier run of this test (any pid) go first: namespaces and state.
    common::prefix(tag);
    for entry in std::fs::read_dir(weft::lab::state::STATE_ROOT).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&format!("wt{tag}")) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let name = format!("wt{tag}{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    let mut up_args =
        vec!["up", "--name", &name, "--backend", backend, "--store", store, "--hosts", "3", "--pods-per-host", "2"];
    up_args.extend_from_slice(extra);
    let up = lab(&up_args);
    assert!(up.status.success(), "weft lab up failed:\n{}", text(&up));

    // A route that takes part of the LAN away from the connected route breaks a rule: the
    // harness refuses to start and says what it found.
    let h2 = format!("{name}-h2");
    let hijack = ["route", "add", "192.0.2.128/25", "via", "192.0.2.77", "dev", "eth0"];
    weft::lab::netns::Netns::existing(&h2).ip(&hijack).unwrap();
    let refused = lab(&["chaos", "--name", &name, "--seconds", "5", "--seed", "7"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("a route to the LAN other than the connected one"), "{}", text(&refused));
    weft::lab::netns::Netns::existing(&h2).ip(&["route", "del", "192.0.2.128/25"]).unwrap();

    let seconds = seconds.to_string();
    let run = lab(&["chaos", "--name", &name, "--seconds", &seconds, "--seed", "7", "--json"]);
    let report: Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("chaos --json printed no JSON ({e}):\n{}", text(&run)));
    let pretty = serde_json::to_string_pretty(&report).unwrap();
    assert_eq!(run.status.code(), Some(0), "the chaos run failed:\n{pretty}\n{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(report["ok"], true, "{pretty}");
    assert_eq!(report["converged"], true, "{pretty}");
    assert_eq!(report["rules_broken"].as_array().unwrap().len(), 0, "{pretty}");
    let events = report["events"].as_array().unwrap();
    assert!(events.iter().all(|e| e["repair_ms"].is_number()), "every fault repaired: {pretty}");
    // Kinds are drawn in rounds: a 20 s run reaches most of them, never one kind only.
    let kinds = report["kinds"].as_array().unwrap();
    assert!(kinds.len() >= applicable.min(6), "{} kinds injected:\n{pretty}", kinds.len());
    assert_eq!(report["not_applicable"].as_array().unwrap().len(), 15 - applicable, "{pretty}");
    for kind in must {
        let k = kinds.iter().find(|k| k["fault"] == *kind).unwrap_or_else(|| panic!("{kind} not injected:\n{pretty}"));
        assert_eq!(k["repaired"], k["count"], "{kind}: {pretty}");
    }

    // Independently of the harness: every pod reaches every pod, and each host reaches the
    // LAN through its connected route only.
    let check = lab(&["check", "--name", &name, "--json"]);
    assert!(check.status.success(), "weft lab check after chaos:\n{}", text(&check));
    for h in ["h1", "h2", "h3"] {
        let lan: Vec<Value> = routes(&format!("{name}-{h}"))
            .into_iter()
            .filter(|r| r["dst"].as_str().is_some_and(|d| d.starts_with("192.0.2.")))
            .collect();
        assert_eq!(lan.len(), 1, "{h}: {lan:?}");
        assert_eq!(lan[0]["dst"], "192.0.2.0/24");
        assert_eq!(lan[0]["protocol"], "kernel", "{h}: {lan:?}");
    }
}

#[test]
fn chaos_on_vxlan_repairs_every_fault() {
    // Not applicable: store-kill (the local store has no server), and the etcd member kinds.
    chaos("vxlan", "local", &[], "chv", 11, 20, &[]);
}

#[test]
fn chaos_on_host_gw_with_etcd_repairs_every_fault() {
    // On a 3-member cluster, so members are killed, cut off and the leader killed (and
    // store-kill kills every member). Not applicable: device-delete, device-down,
    // neigh-delete, fdb-delete. A full round of the 11 kinds takes about 40 s.
    chaos(
        "host-gw",
        "etcd",
        &["--etcd-members", "3"],
        "cha",
        11,
        45,
        &["store-kill", "member-kill", "member-partition", "leader-kill"],
    );
}

#[test]
fn chaos_on_udp_repairs_every_fault() {
    // Not applicable: store-kill, neigh-delete, fdb-delete, and the etcd member kinds.
    chaos("udp", "local", &[], "chu", 9, 20, &[]);
}

#[test]
fn chaos_on_vxlan_with_a_tls_etcd_cluster_repairs_every_fault() {
    // Every kind applies: a 3-member cluster with a certificate per member, so the harness
    // and the daemons reach the store through TLS while members die and are cut off.
    chaos(
        "vxlan",
        "etcd",
        &["--etcd-members", "3", "--etcd-tls"],
        "che",
        15,
        60,
        &["store-kill", "member-kill", "member-partition", "leader-kill"],
    );
}
